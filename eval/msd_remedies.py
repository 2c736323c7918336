"""What MSD needs on ShapesWorld images beyond a true product sampler, measured (issue 12, README "What MSD needs
on images").

The 400-iteration table has MSD (``t2d_msd``: product-ODE sampler, N = 1 fresh sample per estimate) at prompt
accuracy 0.34 against SDS's 0.80. The measured reason (``eval.msd_images``): its single product samples are shapes
at independent random positions from one iteration to the next, as far from each other as the step they ask for,
so the generator follows their average. This study changes one thing at a time on a smaller preset than the table
and scores every variant the same way; the criterion, stated before any run, is the final **prompt accuracy**
(ties: the mode-alignment distance), with the UNet evaluations per iteration beside it:

* ``msd`` — ``t2d_msd`` as in the table;
* ``msd_common`` — common random numbers (``guidance.start_noise=common``): the product sampler's start noise is
  drawn once and reused at every iteration, so successive targets are one continuous function of x and λ (each
  target is still one draw of the product distribution; Algorithm 2 draws afresh);
* ``msd_n4`` — N = 4 product samples averaged per estimate (the paper's N; 4× the cost);
* ``msd_interval`` — CFG only for σ in [0.28, 5.42] (Kynkäänniemi et al. 2024's interval for SD-XL, as stated
  in their paper; w = 1 outside, for every method's calls and the DDIM reference), so the highest levels the
  sampler visits (up to 3λ₀ = 37) are unguided: the guided clean estimate there is the saturated frame of
  ``msd_targets.png``;
* ``sds`` — SDS on the same preset, the level to beat.

Beside the scores, each run's RMS per pixel of x − y (its target's distance; ``grad_norm``/√d) at a few iterations
says whether the generator settles onto its targets (a fixed point, small) or keeps chasing independent draws
(the spread of single product samples, ~0.2–0.3 here).

Preset (``STUDY_OVERRIDES``): ``experiment=table4_shapes`` with one image per prompt (12 images), 200 iterations
(λ decays linearly from 12.2 over 200 iterations and stops below λ_min = 3.1, after ~150), evaluations every
50 iterations against 16 DDIM samples per prompt; seeds 0..k−1 (``SEEDS``). Runs go to
``outputs/msd_remedies/<variant>/seed<k>/`` (resumed or reused like the table's), two single-threaded processes
at a time; ``results/table4/shapes/msd_remedies.csv`` gets one row per run and ``msd_remedies_summary.csv`` the
mean ± std per variant; ``msd_remedies.png`` shows every variant's final images (seed 0).
``python -m eval.msd_remedies`` (~30 minutes on 2 cores).

The same change on the toy, where MSD with fresh noise already works (``TOY_OVERRIDES``: the exact class-A
denoiser, unguided, the toy's MSD preset): ``results/toy2d/start_noise.csv`` (final NLL and in-HDR fraction of
the 4096 particles, fresh against common start noise; ~3 minutes).

``--protocol`` then runs the chosen variant as the Table 4 row ``msd_common`` (``guidance=t2d_msd_common``) under the
table's own preset and seeds (``experiment=table4_shapes``: 12 prompts × 4 images, 400 iterations; seeds 0..1, as
the other MSD rows) into the table's run directory (``outputs/table4/shapes/msd_common/seed<k>``, which ``make
reproduce-table4 PRIOR=shapes`` reuses), and writes ``msd_common_protocol.md`` (the table's row format, with the
iteration at which its seed-mean FID reaches SDS's final mean FID read from the committed ``fid_vs_iter.csv``),
``msd_common_protocol.csv`` (its evaluation rows) and ``images_msd_common.png`` (~60 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from eval.processes import run_missing
from eval.reproduce_table4 import (
    TARGET_METHOD,
    aggregate,
    curves_table,
    markdown_table,
    reaches_target,
    run_dir_of,
    run_overrides,
)
from eval.table4_figures import default_runs_dir, images_figure, load_run, seed_curve
from experiments.io import save_figure, write_csv, write_text
from msd.paths import REPO_ROOT

VARIANTS = {  # name -> overrides on top of STUDY_OVERRIDES
    "sds": ["guidance=t2d_sds"],
    "msd": ["guidance=t2d_msd"],
    "msd_common": ["guidance=t2d_msd", "guidance.start_noise=common"],
    "msd_n4": ["guidance=t2d_msd", "guidance.num_samples=4"],
    "msd_interval": ["guidance=t2d_msd", "guidance_interval=[0.28,5.42]"],
}
SEEDS = {"sds": 2, "msd": 2, "msd_common": 2, "msd_n4": 1, "msd_interval": 2}
"""Seeds per variant (``msd_n4`` costs 4× the others: one seed)."""
STUDY_OVERRIDES = ["experiment=table4_shapes", "task.images_per_prompt=1", "task.steps=200", "task.eval.every=50",
                   "task.eval.reference_per_prompt=16", "logger=none"]
TRACKED_ITERATIONS = (1, 25, 50, 100)
METRICS = ("prompt_accuracy", "mode_distance", "fid_true", "fid", "kid", "unet_evals_per_iter", "iterations",
           "ms_per_iter")
RUNS_DIR = REPO_ROOT / "outputs" / "msd_remedies"
OUT_DIR = REPO_ROOT / "results" / "table4" / "shapes"
COST_ORDER = ("msd_n4", "msd", "msd_common", "msd_interval", "sds")


def overrides_of(variant: str, seed: int) -> list[str]:
    return [*STUDY_OVERRIDES, *VARIANTS[variant], f"seed={seed}"]


def run_all(runs_dir: Path, force: bool) -> None:
    plan = sorted(((v, s) for v in VARIANTS for s in range(SEEDS[v])), key=lambda job: COST_ORDER.index(job[0]))
    run_missing([(runs_dir / variant / f"seed{seed}", overrides_of(variant, seed)) for variant, seed in plan], force)


def collect(runs_dir: Path) -> pd.DataFrame:
    """One row per run: its final metrics and ``rms_x_minus_y_<k>``, the RMS per pixel of x − y (the target's
    distance, ``grad_norm``/√d) at iterations ``TRACKED_ITERATIONS`` and at the last one (``final``)."""
    rows = []
    for variant in VARIANTS:
        for seed in range(SEEDS[variant]):
            run_dir = runs_dir / variant / f"seed{seed}"
            final = json.loads((run_dir / "final.json").read_text())
            steps = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["grad_norm"]).set_index("iteration")
            pixels = np.load(run_dir / "images.npz")["images"][0].size
            rms = {f"rms_x_minus_y_{k}": steps.grad_norm.get(k, np.nan) / pixels**0.5 for k in TRACKED_ITERATIONS}
            rows.append({"variant": variant, "seed": seed, **{k: final[k] for k in METRICS}, **rms,
                         "rms_x_minus_y_final": final["grad_norm"] / pixels**0.5})
    return pd.DataFrame(rows)


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    grouped = runs.groupby("variant", sort=False)
    frame = grouped[list(METRICS)].mean()
    rms = [column for column in runs if column.startswith("rms_x_minus_y_")]
    frame[rms] = grouped[rms].mean()
    for metric in ("prompt_accuracy", "mode_distance", "fid_true", "fid"):
        frame[f"{metric}_std"] = grouped[metric].std(ddof=1)
    frame["seeds"] = grouped.size()
    return frame.reset_index()


def variants_figure(runs_dir: Path) -> Figure:
    images = {v: np.load(runs_dir / v / "seed0" / "images.npz") for v in VARIANTS}
    prompts = list(next(iter(images.values()))["prompts"])
    figure = Figure(figsize=(1.1 * len(prompts), 1.25 * len(VARIANTS)), layout="constrained")
    axes = figure.subplots(len(VARIANTS), len(prompts), squeeze=False)
    for row, (variant, data) in enumerate(images.items()):
        for col, image in enumerate(data["images"]):
            ax = axes[row, col]
            ax.imshow(np.clip((image.transpose(1, 2, 0) + 1) / 2, 0, 1))
            ax.set_xticks([]), ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(variant, fontsize=8)
            if row == 0:
                ax.set_title(prompts[col].removeprefix("a "), fontsize=7)
    figure.suptitle("Final images per variant (seed 0, 200 iterations, one image per prompt)", fontsize=9)
    return figure


TOY_VARIANTS = {"msd": [], "msd_common": ["guidance.start_noise=common"]}
TOY_OVERRIDES = ["experiment=toy2d", "guidance=msd", "denoiser=exact", "guidance_scale=1", "logger=none"]
TOY_METRICS = ("nll", "nll_median", "in_hdr", "steps", "nfe")


def toy_check(runs_dir: Path, force: bool) -> pd.DataFrame:
    """Fresh against common start noise for MSD on the toy (exact denoiser, unguided): final metrics per variant."""
    jobs = {variant: (runs_dir / "toy" / variant, [*TOY_OVERRIDES, *extra]) for variant, extra in TOY_VARIANTS.items()}
    run_missing(list(jobs.values()), force)
    rows = []
    for variant, (run_dir, _) in jobs.items():
        final = json.loads((run_dir / "final.json").read_text())
        rows.append({"variant": variant, **{k: final.get(k) for k in TOY_METRICS}})
    return pd.DataFrame(rows)


PROTOCOL_METHOD, PROTOCOL_SEEDS = "msd_common", 2


def run_protocol(runs_dir: Path, force: bool) -> list:
    """The ``msd_common`` row's seeds under the Table 4 preset, in the table's run directory; their runs."""
    run_missing([(run_dir_of(runs_dir, PROTOCOL_METHOD, seed), run_overrides("shapes", PROTOCOL_METHOD, [], seed))
                 for seed in range(PROTOCOL_SEEDS)], force)
    return [load_run(run_dir_of(runs_dir, PROTOCOL_METHOD, seed)) for seed in range(PROTOCOL_SEEDS)]


def protocol_results(runs: list, out_dir: Path) -> str:
    """The row in table4.md's format, timed against SDS's final mean FID from the committed ``fid_vs_iter.csv``."""
    committed = pd.read_csv(out_dir / "fid_vs_iter.csv")
    sds = committed[committed.method == TARGET_METHOD]
    target = float(sds[sds.iteration == sds.iteration.max()].fid.mean())
    records = aggregate(runs)
    reached = reaches_target(seed_curve(runs, "fid"), target)
    records[0]["reach_target"] = target
    records[0]["reach_iteration"], records[0]["reach_unet_evals"] = reached if reached else (None, None)
    write_csv(out_dir / f"{PROTOCOL_METHOD}_protocol.csv", curves_table(runs))
    table = markdown_table(runs, runs[0].config, records)
    write_text(out_dir / f"{PROTOCOL_METHOD}_protocol.md", table)
    save_figure(out_dir / f"images_{PROTOCOL_METHOD}.png", images_figure(runs[0]))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    parser.add_argument("--toy-out", type=Path, default=REPO_ROOT / "results" / "toy2d" / "start_noise.csv")
    parser.add_argument("--protocol", action="store_true",
                        help="then run the msd_common row under the Table 4 preset (module docstring)")
    parser.add_argument("--table-runs-dir", type=Path, default=default_runs_dir("shapes"))
    args = parser.parse_args(argv)
    run_all(args.runs_dir, args.force)
    runs = collect(args.runs_dir)
    write_csv(args.out_dir / "msd_remedies.csv", runs)
    table = summary(runs)
    write_csv(args.out_dir / "msd_remedies_summary.csv", table)
    save_figure(args.out_dir / "msd_remedies.png", variants_figure(args.runs_dir))
    print(table.to_string(index=False))
    toy = toy_check(args.runs_dir, args.force)
    write_csv(args.toy_out, toy)
    print(toy.to_string(index=False))
    if args.protocol:
        print(protocol_results(run_protocol(args.table_runs_dir, args.force), args.out_dir))


if __name__ == "__main__":
    main()

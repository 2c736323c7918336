"""Reproduce the toy 2D grid: ``python -m eval.reproduce_toy2d`` (``make reproduce-toy2d``).

Runs {ddim, sds, vsd, sdi, msd, msd_tweedie} × {exact, learned} × {no guidance, CFG w = 4 with the class-AB
guide}, plus autoguidance (w = 3, the weak class-A guide) for the learned denoiser, and in the exact unguided
setting only MSD with exact product sampling (``msd_exact``, the reference for MSD's product sampler), the
eq. 12 ablation (``msd_ode``), SDI with a fine (exact) inversion grid (``sdi_exact``) and VSD with the ideal
particle model (``vsd_ideal``; these two are checks of the baselines, README "SDI and VSD checked exactly",
and are table rows only, not figure columns); each exactly as
``python -m experiments.run <overrides> hydra.run.dir=<runs-dir>/<denoiser>_<guide>_w<scale>/<method>/``
would run it (the command is printed), in ``--jobs`` long-lived single-threaded worker processes, then writes ``<results-dir>/metrics.csv``,
``metrics.md`` and ``figure_grid.png`` from those run directories. The mode metrics (precision, recall,
mmd, mode_distance; ``toy2d.metrics.ModeMetrics``) are computed here from each run's ``particles.npz``
and cached beside it in ``mode_metrics.json`` (so finished runs need not be rerun when they are added).

The guidance scales are EDM2's for this toy (Karras et al. 2024; docs/design.md §5): the
CFG-style guide (a two-class model) with w = 4, the autoguidance guide (a weaker class-A model) with
w = 3. The exact denoiser has no "weaker" model, so it gets no autoguidance row.

``--dataset spiral|pinwheel`` (``make reproduce-toy2d-datasets``) runs the same grid on that dataset's mixture
(``toy2d/datasets.py``; every run gets ``task.dataset=<dataset>``): these have no classes and hence no CFG guide,
so the settings are exact unguided, learned (``<dataset>``) unguided and learned with autoguidance w = 3 (the
weak ``<dataset>_weak`` guide). Runs go to ``outputs/toy2d_grid_<dataset>/`` and results to
``results/toy2d/<dataset>/`` (the fractal's: ``outputs/toy2d_grid/``, ``results/toy2d/``). The script never edits the
README, which shows a copy of each ``metrics.md`` with a link to it.

A finished run whose resolved config equals the one it would be started with now (ignoring
``experiments.checkpoint.RUN_INDEPENDENT_KEYS``) is reused and an interrupted one resumes from its checkpoint
(``--force`` reruns it). Extra ``key=value`` arguments go to
every run, e.g. a quick look (about 2 minutes):
``python -m eval.reproduce_toy2d --runs-dir outputs/toy2d_quick --results-dir outputs/toy2d_quick/results
task.grid_size=16 task.solver_steps=8`` (committed results use the paper-scale defaults).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import pandas as pd

from eval.processes import is_done, prepare_rerun, run_in_workers
from eval.toy2d_figures import RESULTS_DIR, RUNS_DIR, dataset_results_dir, dataset_runs_dir, particles_grid
from eval.tracking import records as records_of
from eval.tracking import study_logger
from experiments.figures import METHOD_COLUMNS, RunRecord, find_runs, setting_order
from experiments.io import save_figure, write_csv, write_json, write_text
from toy2d.datasets import DATASETS, task_dataset
from toy2d.metrics import (
    MMD_BANDWIDTHS,
    MODE_BANDWIDTH,
    MODE_METRICS_VERSION,
    MODE_N_REFERENCE,
    PR_K,
    class_mode_metrics,
)

CFG_SCALE = 4.0
AUTOGUIDANCE_SCALE = 3.0
MODE_COLUMNS = ("precision", "recall", "mmd", "mode_distance")
TABLE_COLUMNS = ("method", "denoiser", "guide", "guidance_scale", "nll", "nll_median", "in_hdr", *MODE_COLUMNS,
                 "steps", "nfe", "seconds", "particles", "run_dir")
MODE_METRICS_FILE = "mode_metrics.json"
TABLE_METHODS = ("ddim", "sds", "vsd", "vsd_ideal", "sdi", "sdi_exact", "msd", "msd_tweedie", "msd_ode", "msd_exact")
"""The table's methods, in its order: the figure's columns (``experiments.figures.METHOD_COLUMNS``) plus the exact checks
of the baselines (``vsd_ideal``, ``sdi_exact``), which are rows of the table only."""


def settings(denoisers: list[str], dataset: str = "fractal") -> list[tuple[str, str, float]]:
    """(denoiser, guide, scale) of every row of the grid; guide 'cfg' at scale 1 means unguided. Only the
    fractal has classes, hence a CFG (class-AB) guide."""
    rows = []
    for denoiser in denoisers:
        rows.append((denoiser, "cfg", 1.0))
        if dataset == "fractal":
            rows.append((denoiser, "cfg", CFG_SCALE))
        if denoiser == "learned":
            rows.append((denoiser, "autoguidance", AUTOGUIDANCE_SCALE))
    return rows


def setting_dir(runs_dir: Path, setting: tuple[str, str, float]) -> Path:
    denoiser, guide, scale = setting
    return runs_dir / f"{denoiser}_{guide if scale != 1.0 else 'none'}_w{scale:g}"


def run_overrides(method: str, setting: tuple[str, str, float], extra: list[str],
                  dataset: str = "fractal") -> list[str]:
    """The run's overrides; ``task.dataset`` is set for every dataset but the default fractal (whose commands,
    and so the reuse of its finished runs, stay as they were)."""
    denoiser, guide, scale = setting
    data = [] if dataset == "fractal" else [f"task.dataset={dataset}"]
    return ["experiment=toy2d", *data, f"guidance={method}", f"denoiser={denoiser}", f"guide={guide}",
            f"guidance_scale={scale:g}", *extra]


COST_ORDER = ("msd", "sdi_exact", "msd_ode", "sdi", "vsd_ideal", "vsd", "msd_exact", "sds", "msd_tweedie", "ddim")
"""Longest runs first (measured), so that parallel workers finish together."""


def expected_cost(job: tuple[tuple[str, str, float], str]) -> tuple:
    """Sort key, longest job first (the workers then finish together): method, then the learned MLP before the
    exact mixture, then guided (two models per call) before unguided."""
    (denoiser, _, scale), method = job
    rank = COST_ORDER.index(method) if method in COST_ORDER else 0
    return (rank, denoiser == "exact", scale == 1.0)


def run_jobs(runs_dir: Path, jobs: list[tuple[tuple[str, str, float], str]], extra: list[str], workers: int,
             dataset: str = "fractal") -> None:
    """Run every (setting, method) job into ``<runs-dir>/<setting>/<method>/``, longest first, in ``workers``
    single-threaded worker processes."""
    ordered = sorted(jobs, key=expected_cost)
    run_in_workers([(run_overrides(method, setting, extra, dataset), setting_dir(runs_dir, setting) / method)
                    for setting, method in ordered], workers)


EXACT_UNGUIDED_ONLY = ("msd_exact", "msd_ode", "sdi_exact", "vsd_ideal")
"""Exact product sampling exists only for the bare exact mixture (a guided density is no mixture). The eq. 12
ablation runs there only too: its collapse is the same in every setting (measured once with the learned model,
CFG and autoguidance; README), and with the 65-evaluation default sampler the grid must still fit its 5 minutes.
``sdi_exact`` (100 inversion steps) and ``vsd_ideal`` are checks of the baselines where everything is exact, and
the costliest rows after MSD's (about 60 s and 30 s of run loop)."""


def applicable(method: str, setting: tuple[str, str, float]) -> bool:
    denoiser, _, scale = setting
    return method not in EXACT_UNGUIDED_ONLY or (denoiser == "exact" and scale == 1.0)


def run_grid(runs_dir: Path, methods: list[str], denoisers: list[str], extra: list[str], force: bool,
             workers: int = 1, dataset: str = "fractal") -> None:
    jobs = []
    for setting in settings(denoisers, dataset):
        methods_here = [m for m in methods if applicable(m, setting)]
        todo = [m for m in methods_here if force or not is_done(setting_dir(runs_dir, setting) / m,
                                                                 run_overrides(m, setting, extra, dataset))]
        reused = [m for m in methods_here if m not in todo]
        if reused:
            print(f"reusing finished runs {reused} in {setting_dir(runs_dir, setting)}", flush=True)
        for method in todo:
            prepare_rerun(setting_dir(runs_dir, setting) / method, run_overrides(method, setting, extra, dataset),
                          force)
        jobs += [(setting, m) for m in todo]
    run_jobs(runs_dir, jobs, extra, workers, dataset)


def mode_metrics(record: RunRecord) -> dict[str, float]:
    """precision / recall / mmd / mode_distance of a run's final particles (``toy2d.metrics.ModeMetrics``)
    and ``modes``, the number of modes of the target.

    Computed from particles.npz and cached in ``<run>/mode_metrics.json``, keyed by the metric definitions'
    version, the target (``task.dataset``, "fractal" for runs made before it existed, and ``task.target_class``)
    and a hash of the particles (a rerun or a new definition recomputes them).
    """
    key = {"version": MODE_METRICS_VERSION, "dataset": task_dataset(record.config.task),
           "target_class": str(record.config.task.target_class),
           "particles_sha1": hashlib.sha1(record.particles.astype("float64").tobytes()).hexdigest()}
    cache = record.path / MODE_METRICS_FILE
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if {k: cached.get(k) for k in key} == key and "modes" in cached.get("metrics", {}):
            return cached["metrics"]
    evaluator = class_mode_metrics(key["target_class"], key["dataset"])
    metrics = {**evaluator(record.particles), "modes": len(evaluator.modes)}
    write_json(cache, {**key, "metrics": metrics})
    return metrics


def metrics_table(records: list[RunRecord], root: Path) -> pd.DataFrame:
    """One row per method × denoiser × guide × scale, in the figure's order."""
    rows = [{**{k: r.final[k] for k in TABLE_COLUMNS if k in r.final}, **{k: m[k] for k in MODE_COLUMNS},
             "run_dir": str(r.path.relative_to(root))} for r, m in zip(records, map(mode_metrics, records))]
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    order = [(setting_order(r.setting), TABLE_METHODS.index(r.final["method"])) for r in records]
    return table.iloc[sorted(range(len(records)), key=order.__getitem__)].reset_index(drop=True)


def markdown_table(table: pd.DataFrame, reference: RunRecord) -> str:
    """metrics.md: a note on the density the runs are scored against (``reference``'s ``task.dataset``: the
    fractal's class A, or the spiral / pinwheel mixture), then the table."""
    shown = ["method", "denoiser", "guide", "guidance_scale", "nll", "nll_median", "in_hdr", *MODE_COLUMNS,
             "steps", "nfe", "seconds"]
    formats = {"nll": "{:.3f}", "nll_median": "{:.3f}", "in_hdr": "{:.3f}", "guidance_scale": "{:g}",
               "precision": "{:.3f}", "recall": "{:.3f}", "mmd": "{:.4f}", "mode_distance": "{:.4f}",
               "nfe": "{:.0f}", "seconds": "{:.1f}"}
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(formats.get(c, "{}").format(row[c]) for c in shown) + " |")
    dataset = task_dataset(reference.config.task)
    if dataset == "fractal":
        title, p = "# Toy 2D: particles vs the exact class-A density", "p_A"
        mixture, guides = "", "cfg = class-AB guide; autoguidance = weak class-A guide"
    else:
        title, p = f"# Toy 2D, {dataset}: particles vs the exact {dataset} density", "p"
        mixture = f" under p, the exact {dataset} mixture (toy2d/datasets.py)"
        guides = (f"autoguidance = weak {dataset} model ({dataset}_weak); no CFG rows (the {dataset} has no "
                  "classes)")
    notes = [
        title,
        "",
        f"NLL: mean −log {p} (nats) of the final particles{mixture}; nll_median: its median; in_hdr: fraction "
        f"inside the exact 95% highest-density region (level = Monte-Carlo 5% quantile of log {p} over "
        f"{reference.config.task.eval.n_reference} exact samples). Exact samples of {p} have NLL ≈ "
        f"{reference.final['reference_nll']:.3f} (the entropy) and in_hdr = 0.95. "
        "seconds: wall time of the optimisation / sampling loop on this CPU (metrics excluded); "
        f"nfe: denoiser evaluations per particle. Guide 'none' = no guidance; {guides}. precision / recall: "
        f"improved precision and recall (k-NN manifolds, k = {PR_K}) against {MODE_N_REFERENCE} exact samples of "
        f"{p}; mmd: biased MMD² with the mean of RBF kernels of bandwidths "
        f"{', '.join(f'{h:g}' for h in MMD_BANDWIDTHS)}; mode_distance: mean distance to the nearest of the "
        f"{mode_metrics(reference)['modes']:.0f} modes of {p} ∗ G_λ, λ = {MODE_BANDWIDTH:g} (definitions: README, "
        "toy2d/metrics.py).",
        "",
    ]
    return "\n".join(notes + lines) + "\n"


def write_results(runs_dir: Path, results_dir: Path, dataset: str = "fractal") -> pd.DataFrame:
    """metrics.csv / metrics.md / figure_grid.png from the run directories of ``dataset`` (runs of another
    dataset there are an error); the table and the figure also go to a W&B summary run in ``<runs-dir>/summary``."""
    records = [r for r in find_runs(runs_dir) if r.final.get("method") in TABLE_METHODS]
    if not records:
        raise FileNotFoundError(f"no finished runs (final.json) under {runs_dir}")
    found = sorted({task_dataset(r.config.task) for r in records})
    if found != [dataset]:
        raise ValueError(f"--dataset {dataset}: the runs under {runs_dir} are of task.dataset {found}")
    table = metrics_table(records, runs_dir)
    write_csv(results_dir / "metrics.csv", table)
    table_md = markdown_table(table, records[0])
    write_text(results_dir / "metrics.md", table_md)
    figure = particles_grid([r for r in records if r.final["method"] in METHOD_COLUMNS])
    save_figure(results_dir / "figure_grid.png", figure)
    name = "toy2d-grid" if dataset == "fractal" else f"toy2d-grid-{dataset}"
    logger = study_logger(runs_dir / "summary", name, {"study": "toy2d_grid", "dataset": dataset,
                                                       "runs": len(records)})
    logger.log_table("toy2d_metrics", records_of(table))
    logger.log_figure("figure_grid", figure)
    logger.finish()
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides passed to every run")
    parser.add_argument("--dataset", choices=DATASETS, default="fractal",
                        help="the toy mixture (task.dataset); default: fractal")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="default: outputs/toy2d_grid (fractal), outputs/toy2d_grid_<dataset> (others)")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="default: results/toy2d (fractal), results/toy2d/<dataset> (others)")
    parser.add_argument("--methods", default=",".join(TABLE_METHODS))
    parser.add_argument("--denoisers", default="exact,learned")
    parser.add_argument("--force", action="store_true", help="rerun finished runs too")
    parser.add_argument("--aggregate-only", action="store_true", help="only rebuild the tables and figure")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs in parallel, one thread each (default: min(2, CPU count))")
    args = parser.parse_args(argv)
    if any(o.lstrip("+~").startswith("task.dataset=") for o in args.overrides):
        parser.error("set the dataset with --dataset, not the override task.dataset=...")
    start = time.perf_counter()
    runs_dir = (args.runs_dir or dataset_runs_dir(RUNS_DIR, args.dataset)).resolve()
    results_dir = (args.results_dir or dataset_results_dir(RESULTS_DIR, args.dataset)).resolve()
    if not args.aggregate_only:
        run_grid(runs_dir, args.methods.split(","), args.denoisers.split(","), args.overrides, args.force,
                 max(1, args.jobs), args.dataset)
    table = write_results(runs_dir, results_dir, args.dataset)
    print(table.drop(columns=["run_dir"]).to_string(index=False))
    print(f"sum of run loop times: {table['seconds'].sum():.1f} s; "
          f"total wall time: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()

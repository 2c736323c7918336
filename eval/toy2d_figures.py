"""The one figure builder of results/toy2d/: every figure there is redrawn from run directories.

* ``figure_grid.png`` — the final particles of every grid run (``<runs-dir>/<setting>/<method>/``:
  config.yaml, final.json, particles.npz), over the exact density of their target (class A of the fractal,
  or ``task.dataset``'s mixture); likewise ``<dataset>/figure_grid.png`` from ``<runs-dir>_<dataset>/`` for the
  spiral and pinwheel grids (``python -m eval.reproduce_toy2d --dataset <dataset>``).
* ``gradient_quality.png`` — from ``<studies-dir>/gradient_quality/gradient_quality.csv``.
* ``landscape_<denoiser>.png`` — from ``<studies-dir>/landscapes_<denoiser>/{surfaces.npz, landscapes.csv}``.

``python -m eval.toy2d_figures`` rebuilds whatever of these has its run directories (and says which it
skipped); the reproduce scripts draw their figures through the same functions.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from eval import gradient_quality, landscapes
from experiments.figures import METHOD_COLUMNS, Canvas, DensityMap, RunRecord, find_runs, grid_figure
from experiments.io import save_figure
from msd.paths import REPO_ROOT
from toy2d.datasets import DATASETS, target_mixture, task_dataset

RUNS_DIR = REPO_ROOT / "outputs" / "toy2d_grid"
STUDIES_DIR = REPO_ROOT / "outputs" / "toy2d_studies"
RESULTS_DIR = REPO_ROOT / "results" / "toy2d"


def dataset_runs_dir(runs_dir: Path, dataset: str) -> Path:
    """The grid runs of ``dataset`` beside the fractal's ``runs_dir``: ``runs_dir`` itself for the fractal,
    ``<runs_dir>_<dataset>`` for the others."""
    return runs_dir if dataset == "fractal" else runs_dir.with_name(f"{runs_dir.name}_{dataset}")


def dataset_results_dir(results_dir: Path, dataset: str) -> Path:
    """The results of ``dataset``'s grid: ``results_dir`` for the fractal, ``<results_dir>/<dataset>`` for the
    others."""
    return results_dir if dataset == "fractal" else results_dir / dataset


def grid_runs(runs_dir: Path) -> list[RunRecord]:
    """The finished grid runs (methods of the grid figure's columns) below ``runs_dir``."""
    return [r for r in find_runs(runs_dir) if r.final.get("method") in METHOD_COLUMNS]


def particles_grid(records: list[RunRecord]):
    """Grid figure of the runs' final particles over the exact density of their target (``task.dataset``, the
    fractal's ``task.target_class``), taken from the first run."""
    task = records[0].config.task
    canvas = Canvas(tuple(task.canvas.center), task.canvas.half_size)
    density = DensityMap.compute(target_mixture(task_dataset(task), task.target_class), canvas,
                                 records[0].final["hdr_level"], task.figure.resolution)
    return grid_figure(records, density)


def gradient_quality_figure(study_dir: Path):
    return gradient_quality.figure(pd.read_csv(study_dir / "gradient_quality.csv"))


def landscape_figure(study_dir: Path):
    return landscapes.figure(landscapes.load_data(study_dir / landscapes.SURFACES_FILE),
                             pd.read_csv(study_dir / "landscapes.csv"))


def build_all(runs_dir: Path = RUNS_DIR, studies_dir: Path = STUDIES_DIR, results_dir: Path = RESULTS_DIR) -> dict:
    """Redraw every figure whose inputs exist; returns {figure file (relative to ``results_dir``): source
    directory or None if skipped}."""
    built: dict[str, Path | None] = {}
    for dataset in DATASETS:
        source = dataset_runs_dir(runs_dir, dataset)
        target = dataset_results_dir(results_dir, dataset) / "figure_grid.png"
        records = grid_runs(source) if source.is_dir() else []
        if records:
            save_figure(target, particles_grid(records))
        built[str(target.relative_to(results_dir))] = source if records else None
    study = studies_dir / "gradient_quality"
    ok = (study / "gradient_quality.csv").is_file()
    if ok:
        save_figure(results_dir / "gradient_quality.png", gradient_quality_figure(study))
    built["gradient_quality.png"] = study if ok else None
    for denoiser in ("exact", "learned"):
        study = studies_dir / f"landscapes_{denoiser}"
        ok = (study / landscapes.SURFACES_FILE).is_file() and (study / "landscapes.csv").is_file()
        if ok:
            save_figure(results_dir / f"landscape_{denoiser}.png", landscape_figure(study))
        built[f"landscape_{denoiser}.png"] = study if ok else None
    return built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    parser.add_argument("--studies-dir", type=Path, default=STUDIES_DIR)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    for name, source in build_all(args.runs_dir, args.studies_dir, args.results_dir).items():
        print(f"{name}: " + (f"redrawn from {source}" if source else "skipped (no run directory)"))


if __name__ == "__main__":
    main()

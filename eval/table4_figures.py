"""The one figure builder of results/table4/<prior>/: every figure there is redrawn from the run directories
``<runs-dir>/<method>/`` of ``eval.reproduce_table4`` (config.yaml, final.json, metrics.csv, images.npz).

* ``fid_vs_iter.png`` — FID against the DDIM reference over the optimisation iterations (on ShapesWorld also
  FID against true renders and the prompt accuracy), one line per method; the DDIM row as a dashed level.
* ``fid_vs_compute.png`` — the same FID against the cumulative UNet evaluations per image (log scale); the
  DDIM row as a point at its own cost.
* ``images_<method>.png`` — each method's final images, one row per prompt.

``python -m eval.table4_figures --prior shapes`` rebuilds them; ``eval.reproduce_table4`` draws through the
same functions.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from eval.io import save_figure
from experiments.text2d import image_grid_figure

REPO_ROOT = Path(__file__).resolve().parent.parent
PRIORS = ("shapes", "sd21", "sd15")
REFERENCE_METHOD = "ddim"
METHOD_ORDER = ("ddim", "sds", "vsd", "sdi", "msd_stable", "msd_ode")
METHOD_TITLES = {"ddim": "DDIM (reference)", "sds": "SDS", "vsd": "VSD", "sdi": "SDI",
                 "msd_stable": "MSD (eq. 15 stable)", "msd_ode": "MSD (eq. 12 ODE)"}
METHOD_COLORS = {"ddim": "#444444", "sds": "#1f77b4", "vsd": "#2ca02c", "sdi": "#9467bd",
                 "msd_stable": "#ff7f0e", "msd_ode": "#d62728"}
CURVE_PANELS = {"fid": "FID vs DDIM reference", "fid_true": "FID vs true renders",
                "prompt_accuracy": "prompt accuracy"}


def default_runs_dir(prior: str) -> Path:
    return REPO_ROOT / "outputs" / "table4" / prior


def default_results_dir(prior: str) -> Path:
    return REPO_ROOT / "results" / "table4" / prior


@dataclass
class Table4Run:
    """A finished text-to-2D run directory: resolved config, final metrics and the metrics curve."""

    path: Path
    config: DictConfig
    final: dict
    curve: pd.DataFrame

    @property
    def method(self) -> str:
        return self.final["method"]

    @property
    def title(self) -> str:
        return METHOD_TITLES.get(self.method, self.method)

    @property
    def color(self) -> str | None:
        return METHOD_COLORS.get(self.method)

    def images(self) -> tuple[torch.Tensor, list[str]]:
        """The final images [N, 3, H, W] in [−1, 1] and their per-image prompts."""
        with np.load(self.path / "images.npz") as arrays:
            return torch.from_numpy(arrays["images"]), [str(p) for p in arrays["prompts"]]


def load_run(run_dir: Path) -> Table4Run:
    final = json.loads((run_dir / "final.json").read_text())
    return Table4Run(run_dir, OmegaConf.load(run_dir / "config.yaml"), final, pd.read_csv(run_dir / "metrics.csv"))


def method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def find_table4_runs(runs_dir: Path) -> list[Table4Run]:
    """The finished text-to-2D runs ``<runs_dir>/*/final.json``, in the table's method order (one per method)."""
    runs = [load_run(path.parent) for path in sorted(Path(runs_dir).glob("*/final.json"))]
    runs = [run for run in runs if run.config.task.name == "text2d"]
    seen: dict[str, Path] = {}
    for run in runs:
        if run.method in seen:
            raise ValueError(f"two runs of method {run.method!r} under {runs_dir}: {seen[run.method]} and {run.path}")
        seen[run.method] = run.path
    return sorted(runs, key=lambda run: method_rank(run.method))


def reference_run(runs: list[Table4Run]) -> Table4Run | None:
    return next((run for run in runs if run.method == REFERENCE_METHOD), None)


def _log_scale_if_positive(ax, values: pd.Series, axis: str) -> None:
    if len(values) and (values > 0).all():
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def fid_vs_iter_figure(runs: list[Table4Run]) -> Figure:
    """One panel per curve metric the runs have (FID vs DDIM; on ShapesWorld also FID vs true renders and
    prompt accuracy) over the iterations; the DDIM reference as a dashed horizontal level."""
    panels = [metric for metric in CURVE_PANELS if any(metric in run.curve for run in runs)]
    figure = Figure(figsize=(4.2 * len(panels), 3.4))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    reference = reference_run(runs)
    for ax, metric in zip(axes, panels):
        for run in runs:
            if run is reference or metric not in run.curve:
                continue
            ax.plot(run.curve["iteration"], run.curve[metric], marker="o", markersize=2.5, linewidth=1.2,
                    color=run.color, label=run.title)
        if reference is not None and metric in reference.curve:
            ax.axhline(float(reference.curve[metric].iloc[-1]), color=reference.color, linestyle="--", linewidth=1,
                       label=f"{reference.title}, {reference.final['iterations']} steps")
        if metric == "prompt_accuracy":
            ax.set_ylim(-0.02, 1.02)
        else:
            _log_scale_if_positive(ax, pd.concat([run.curve[metric] for run in runs if metric in run.curve]), "y")
        ax.set_xlabel("iteration")
        ax.set_title(CURVE_PANELS[metric], fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    return figure


def fid_vs_compute_figure(runs: list[Table4Run]) -> Figure:
    """FID vs the DDIM reference against cumulative UNet evaluations per image (log x; iteration 0, which
    costs nothing, is left out); the DDIM reference as a point at its cost with a dashed level."""
    figure = Figure(figsize=(5.2, 3.6))
    ax = figure.subplots()
    reference = reference_run(runs)
    for run in runs:
        if run is reference:
            continue
        curve = run.curve[run.curve["unet_evals"] > 0]
        ax.plot(curve["unet_evals"], curve["fid"], marker="o", markersize=2.5, linewidth=1.2, color=run.color,
                label=run.title)
    if reference is not None:
        point = reference.curve.iloc[-1]
        ax.axhline(float(point["fid"]), color=reference.color, linestyle="--", linewidth=0.8)
        ax.plot([float(point["unet_evals"])], [float(point["fid"])], marker="*", markersize=11, linestyle="none",
                color=reference.color, label=f"{reference.title}, {reference.final['iterations']} steps")
    ax.set_xscale("log")
    _log_scale_if_positive(ax, pd.concat([run.curve["fid"] for run in runs]), "y")
    ax.set_xlabel("cumulative UNet evaluations per image")
    ax.set_ylabel("FID vs DDIM reference")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def images_figure(run: Table4Run) -> Figure:
    """The run's final images (one row per prompt), redrawn from images.npz."""
    images, prompts = run.images()
    scale = float(run.final["guidance_scale"])
    title = f"{run.title} on {run.final['prior']}, w={scale:g}: FID {run.final['fid']:.2f}"
    return image_grid_figure(images, prompts, int(run.config.task.images_per_prompt), title)


def build_figures(runs: list[Table4Run], results_dir: Path) -> dict[str, Figure]:
    """Draw and atomically save every figure of ``results_dir``; returns {file name: figure}."""
    figures = {"fid_vs_iter.png": fid_vs_iter_figure(runs), "fid_vs_compute.png": fid_vs_compute_figure(runs),
               **{f"images_{run.method}.png": images_figure(run) for run in runs}}
    for name, figure in figures.items():
        save_figure(Path(results_dir) / name, figure)
    return figures


def build_all(runs_dir: Path, results_dir: Path) -> list[str]:
    """Redraw every figure of ``results_dir`` from the run directories under ``runs_dir``; returns the files."""
    runs = find_table4_runs(runs_dir)
    if not runs:
        raise FileNotFoundError(f"no finished text-to-2D runs (*/final.json) under {runs_dir}")
    return list(build_figures(runs, results_dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", choices=PRIORS, default="shapes")
    parser.add_argument("--runs-dir", type=Path, help="default: outputs/table4/<prior>")
    parser.add_argument("--results-dir", type=Path, help="default: results/table4/<prior>")
    args = parser.parse_args(argv)
    runs_dir = args.runs_dir or default_runs_dir(args.prior)
    results_dir = args.results_dir or default_results_dir(args.prior)
    for name in build_all(runs_dir, results_dir):
        print(f"{results_dir / name}: redrawn from {runs_dir}")


if __name__ == "__main__":
    main()

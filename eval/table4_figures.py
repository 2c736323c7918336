"""The one figure builder of results/table4/<prior>/: every figure there is redrawn from the run directories
``<runs-dir>/<method>/seed<k>/`` of ``eval.reproduce_table4`` (config.yaml, final.json, metrics.csv, images.npz).
metrics.csv has one row per iteration; the evaluation metrics (FID, ...) only on the evaluation rows (iteration 0,
every ``task.eval.every`` and the last), which are the runs' curves (:attr:`Table4Run.curve`).

Each method is drawn as the mean over its seeds with a shaded band of ± one standard deviation over seeds
(sample std, ddof 1; no band for a single seed):

* ``fid_vs_iter.png`` — FID against the DDIM reference over the optimisation iterations (and a panel per extra
  curve metric the runs have: FID against true renders, KID, prompt accuracy); the DDIM row as a dashed level.
* ``fid_vs_compute.png`` — the same FID against the seed-mean cumulative UNet evaluations per image (log x);
  the DDIM row as a point at its own cost.
* ``loss_vs_iter.png`` — the per-iteration loss ½‖x − sg(y)‖² and ``grad_norm`` (mean ‖x − y‖ per image), mean
  over seeds (log y).
* ``images_<method>.png`` — each method's final images of its first seed (seed 0), one row per prompt.

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

from experiments.io import save_figure
from experiments.text2d import image_grid_figure
from msd.paths import REPO_ROOT

PRIORS = ("shapes", "sd21", "sd15")
REFERENCE_METHOD = "ddim"
EVALUATION_METRIC = "fid"
"""The column that marks metrics.csv's evaluation rows (NaN on the other iterations)."""
METHOD_ORDER = ("ddim", "sds", "vsd", "sdi", "msd", "msd_common", "msd_tweedie", "msd_stable", "msd_ode")
METHOD_TITLES = {"ddim": "DDIM (reference)", "sds": "SDS", "vsd": "VSD", "sdi": "SDI",
                 "msd": "MSD (product ODE)", "msd_tweedie": "MSD (Tweedie)", "msd_stable": "MSD (eq. 15 stable)",
                 "msd_ode": "MSD (eq. 12 ODE)", "msd_common": "MSD (product ODE, common noise)"}
METHOD_COLORS = {"ddim": "#444444", "sds": "#1f77b4", "vsd": "#2ca02c", "sdi": "#9467bd", "msd": "#d62728",
                 "msd_tweedie": "#e377c2", "msd_stable": "#ff7f0e", "msd_ode": "#8c564b", "msd_common": "#17becf"}
CURVE_PANELS = {"fid": "FID vs DDIM reference", "fid_true": "FID vs true renders", "kid": "KID vs DDIM reference",
                "prompt_accuracy": "prompt accuracy"}
LOSS_PANELS = {"loss": "loss ½‖x − sg(y)‖² (batch mean)", "grad_norm": "‖x − y‖ per image (mean)"}
BAND_ALPHA = 0.18


def default_runs_dir(prior: str) -> Path:
    return REPO_ROOT / "outputs" / "table4" / prior


def default_results_dir(prior: str) -> Path:
    return REPO_ROOT / "results" / "table4" / prior


def seed_dir_name(seed: int) -> str:
    return f"seed{seed}"


@dataclass
class Table4Run:
    """A finished text-to-2D run directory: resolved config, final metrics and metrics.csv (one row per
    iteration; the evaluation metrics on the evaluation rows only)."""

    path: Path
    config: DictConfig
    final: dict
    metrics: pd.DataFrame

    @property
    def method(self) -> str:
        return self.final["method"]

    @property
    def seed(self) -> int:
        return int(self.final.get("seed", self.config.get("seed", 0)))

    @property
    def curve(self) -> pd.DataFrame:
        """The evaluation rows of metrics.csv (where FID was computed)."""
        if EVALUATION_METRIC not in self.metrics:
            return self.metrics.iloc[0:0]
        return self.metrics[self.metrics[EVALUATION_METRIC].notna()].reset_index(drop=True)

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
    """The finished text-to-2D runs ``<runs_dir>/<method>/seed<k>/final.json``, in the table's method order,
    then by seed. Raises if a run's method (final.json) is not the directory it lies in (a preset whose label
    changed), or if two runs share a method and seed."""
    runs = [load_run(path.parent) for path in sorted(Path(runs_dir).glob("*/seed*/final.json"))]
    runs = [run for run in runs if run.config.task.name == "text2d"]
    seen: dict[tuple[str, int], Path] = {}
    for run in runs:
        if run.path.parent.name != run.method or run.path.name != seed_dir_name(run.seed):
            raise ValueError(f"{run.path} holds a run of method {run.method!r}, seed {run.seed}: expected "
                             f"<runs-dir>/{run.method}/{seed_dir_name(run.seed)} (did a preset's label change? "
                             "rerun with --force)")
        key = (run.method, run.seed)
        if key in seen:
            raise ValueError(f"two runs of method {run.method!r} seed {run.seed} under {runs_dir}: {seen[key]} and "
                             f"{run.path}")
        seen[key] = run.path
    return sorted(runs, key=lambda run: (method_rank(run.method), run.seed))


def runs_by_method(runs: list[Table4Run]) -> dict[str, list[Table4Run]]:
    """{method: its runs by seed}, in the table's method order."""
    groups: dict[str, list[Table4Run]] = {}
    for run in sorted(runs, key=lambda run: (method_rank(run.method), run.seed)):
        groups.setdefault(run.method, []).append(run)
    return groups


def reference_runs(runs: list[Table4Run]) -> list[Table4Run]:
    return [run for run in runs if run.method == REFERENCE_METHOD]


def seed_curve(runs: list[Table4Run], metric: str, rows: str = "evaluations") -> pd.DataFrame:
    """One method's ``metric`` over the iterations across its seeds: columns iteration, unet_evals (mean over
    seeds), mean, std (sample std over seeds, ddof 1; 0 where one seed has the iteration) and n (seeds). ``rows``:
    "evaluations" (the evaluation rows) or "all" (every iteration of metrics.csv, e.g. for the loss)."""
    frames = [(run.curve if rows == "evaluations" else run.metrics) for run in runs]
    frames = [frame[["iteration", "unet_evals", metric]].dropna(subset=[metric]) for frame in frames if metric in frame]
    if not frames:
        return pd.DataFrame(columns=["iteration", "unet_evals", "mean", "std", "n"])
    grouped = pd.concat(frames, ignore_index=True).groupby("iteration", sort=True)
    return pd.DataFrame({"unet_evals": grouped["unet_evals"].mean(), "mean": grouped[metric].mean(),
                         "std": grouped[metric].std(ddof=1).fillna(0.0), "n": grouped[metric].count()}).reset_index()


def _log_scale_if_positive(ax, values: pd.Series, axis: str) -> None:
    values = pd.Series(values).dropna()
    if len(values) and (values > 0).all():
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _band(ax, x, curve: pd.DataFrame, color, label: str) -> None:
    """The seed mean as a line, ± one std over seeds as a shaded band (where more than one seed)."""
    ax.plot(x, curve["mean"], marker="o", markersize=2.0, linewidth=1.2, color=color, label=label)
    if (curve["n"] > 1).any():
        ax.fill_between(x, curve["mean"] - curve["std"], curve["mean"] + curve["std"], color=color,
                        alpha=BAND_ALPHA, linewidth=0)


def _label(runs: list[Table4Run]) -> str:
    return f"{runs[0].title} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"


def _reference_level(ax, reference: list[Table4Run], metric: str) -> None:
    """The DDIM row's final ``metric``: mean over seeds as a dashed level, ± std as a band."""
    values = np.array([run.final[metric] for run in reference if metric in run.final], dtype=float)
    if not len(values):
        return
    mean, std = float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
    run = reference[0]
    ax.axhline(mean, color=run.color, linestyle="--", linewidth=1,
               label=f"{_label(reference)}, {run.final['iterations']} steps")
    if std > 0:
        ax.axhspan(mean - std, mean + std, color=run.color, alpha=BAND_ALPHA / 2, linewidth=0)


def fid_vs_iter_figure(runs: list[Table4Run]) -> Figure:
    """One panel per curve metric the runs have (FID vs DDIM; on ShapesWorld also FID vs true renders and
    prompt accuracy; KID where recorded) over the iterations, seed mean ± std; the DDIM row as a dashed level."""
    groups = runs_by_method(runs)
    panels = [metric for metric in CURVE_PANELS if any(metric in run.curve for run in runs)]
    figure = Figure(figsize=(4.2 * len(panels), 3.4))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, metric in zip(axes, panels):
        values = []
        for method, group in groups.items():
            if method == REFERENCE_METHOD:
                continue
            curve = seed_curve(group, metric)
            if len(curve):
                _band(ax, curve["iteration"], curve, group[0].color, _label(group))
                values.append(curve["mean"])
        _reference_level(ax, groups.get(REFERENCE_METHOD, []), metric)
        if metric == "prompt_accuracy":
            ax.set_ylim(-0.02, 1.02)
        elif values:
            _log_scale_if_positive(ax, pd.concat(values), "y")
        ax.set_xlabel("iteration")
        ax.set_title(CURVE_PANELS[metric], fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    return figure


def fid_vs_compute_figure(runs: list[Table4Run]) -> Figure:
    """FID vs the DDIM reference against the seed-mean cumulative UNet evaluations per image (log x; iteration 0,
    which costs nothing, is left out), seed mean ± std; the DDIM row as a point at its cost with a dashed level."""
    groups = runs_by_method(runs)
    figure = Figure(figsize=(5.2, 3.6))
    ax = figure.subplots()
    values = []
    for method, group in groups.items():
        if method == REFERENCE_METHOD:
            continue
        curve = seed_curve(group, "fid")
        curve = curve[curve["unet_evals"] > 0]
        if len(curve):
            _band(ax, curve["unet_evals"], curve, group[0].color, _label(group))
            values.append(curve["mean"])
    reference = groups.get(REFERENCE_METHOD, [])
    if reference:
        fids = np.array([run.final["fid"] for run in reference], dtype=float)
        evals = float(np.mean([run.final["unet_evals"] for run in reference]))
        std = float(fids.std(ddof=1)) if len(fids) > 1 else 0.0
        ax.axhline(float(fids.mean()), color=reference[0].color, linestyle="--", linewidth=0.8)
        ax.errorbar([evals], [float(fids.mean())], yerr=[std], marker="*", markersize=11, linestyle="none",
                    color=reference[0].color, label=f"{_label(reference)}, {reference[0].final['iterations']} steps")
        values.append(pd.Series(fids))
    ax.set_xscale("log")
    if values:
        _log_scale_if_positive(ax, pd.concat(values), "y")
    ax.set_xlabel("cumulative UNet evaluations per image")
    ax.set_ylabel("FID vs DDIM reference")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def loss_vs_iter_figure(runs: list[Table4Run]) -> Figure:
    """The per-iteration loss and grad_norm of every optimised method (every row of metrics.csv), mean over seeds
    ± std, log y. The DDIM row has no loss."""
    groups = {m: g for m, g in runs_by_method(runs).items() if m != REFERENCE_METHOD}
    panels = [metric for metric in LOSS_PANELS if any(metric in run.metrics for g in groups.values() for run in g)]
    panels = panels or ["loss"]
    figure = Figure(figsize=(4.4 * len(panels), 3.4))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, metric in zip(axes, panels):
        values = []
        for group in groups.values():
            curve = seed_curve(group, metric, rows="all")
            if len(curve):
                _band(ax, curve["iteration"], curve, group[0].color, _label(group))
                values.append(curve["mean"])
        if values:
            _log_scale_if_positive(ax, pd.concat(values), "y")
        ax.set_xlabel("iteration")
        ax.set_title(LOSS_PANELS[metric], fontsize=9)
        ax.grid(alpha=0.3, which="both")
    if any(ax.get_legend_handles_labels()[0] for ax in axes):
        axes[0].legend(fontsize=7)
    figure.tight_layout()
    return figure


def images_figure(run: Table4Run) -> Figure:
    """The run's final images (one row per prompt), redrawn from images.npz."""
    images, prompts = run.images()
    scale = float(run.final["guidance_scale"])
    title = f"{run.title} on {run.final['prior']}, w={scale:g}, seed {run.seed}: FID {run.final['fid']:.2f}"
    return image_grid_figure(images, prompts, int(run.config.task.images_per_prompt), title)


def build_figures(runs: list[Table4Run], results_dir: Path) -> dict[str, Figure]:
    """Draw and atomically save every figure of ``results_dir``; returns {file name: figure}."""
    figures = {"fid_vs_iter.png": fid_vs_iter_figure(runs), "fid_vs_compute.png": fid_vs_compute_figure(runs),
               "loss_vs_iter.png": loss_vs_iter_figure(runs),
               **{f"images_{method}.png": images_figure(group[0]) for method, group in runs_by_method(runs).items()}}
    for name, figure in figures.items():
        save_figure(Path(results_dir) / name, figure)
    return figures


def build_all(runs_dir: Path, results_dir: Path) -> list[str]:
    """Redraw every figure of ``results_dir`` from the run directories under ``runs_dir``; returns the files."""
    runs = find_table4_runs(runs_dir)
    if not runs:
        raise FileNotFoundError(f"no finished text-to-2D runs (*/seed*/final.json) under {runs_dir}")
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

"""Aggregate a sweep: every run directory below a sweep directory → one table (config columns + final
metrics) in ``<out-dir>/<name>.csv`` and heat maps of chosen metrics over two swept keys.

    python -m eval.sweeps outputs/sweeps/toy2d_bandwidth --name toy2d_bandwidth [--expect 9]
        [--metrics mode_distance,in_hdr] [--x guidance.lambda0] [--y guidance_scale] [--facet guidance.lambda_min]

A run directory is a folder with our resolved ``config.yaml``; it is finished when it holds ``final.json``.
Config columns are the keys given on the command line of any run (``.hydra/overrides.yaml``) and every
config key whose value differs between the runs, under their dotted names. Toy runs also get the mode
metrics of ``eval.reproduce_toy2d`` (precision, recall, MMD, mode distance; cached in each run directory).
With ``--expect N`` fewer than N finished runs is an error that names the unfinished directories.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.patheffects import withStroke
from omegaconf import OmegaConf

from experiments.checkpoint import CONFIG_FILE, FINAL_FILE, RUN_INDEPENDENT_KEYS
from experiments.io import save_figure, write_csv
from msd.paths import REPO_ROOT

AXIS_PREFERENCE = ("guidance.lambda0", "guidance_scale", "guidance.lambda_min", "guidance.schedule",
                   "guidance.sampler", "seed")
DEFAULT_METRICS = {"toy2d": ("mode_distance", "recall", "precision", "mmd", "nll"),
                   "text2d": ("fid", "prompt_accuracy", "mode_distance"),
                   "text3d": ("silhouette_iou", "prompt_accuracy", "volumetric_iou_opaque", "kid_true")}
LOWER_IS_BETTER = ("nll", "nll_median", "mmd", "mode_distance", "fid", "fid_true", "kid_true", "kid_prior",
                   "fid_prior")
IGNORED_OVERRIDES = ("sweep", *RUN_INDEPENDENT_KEYS)


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested dict → {dotted key: leaf}; lists become tuples (hashable, comparable)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def run_dirs(sweep_dir: Path) -> list[Path]:
    """Every run directory below ``sweep_dir`` (a folder with our ``config.yaml``; Hydra's own ``.hydra/``
    copies are not run directories), in path order."""
    return sorted(path.parent for path in Path(sweep_dir).rglob(CONFIG_FILE) if path.parent.name != ".hydra")


def command_line_keys(run_dir: Path) -> list[str]:
    """The config keys set on the run's command line (``.hydra/overrides.yaml``), without +/~/++."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    keys = [item.split("=", 1)[0].lstrip("+~") for item in OmegaConf.load(path)]
    return [key for key in keys if key not in IGNORED_OVERRIDES and not key.startswith("hydra")]


def sweep_table(sweep_dir: Path, expect: int | None = None) -> pd.DataFrame:
    """One row per finished run: the swept / varying config keys, then the final metrics, then ``run_dir``."""
    sweep_dir = Path(sweep_dir)
    dirs = run_dirs(sweep_dir)
    finished = [d for d in dirs if (d / FINAL_FILE).is_file()]
    if expect is not None and len(finished) < expect:
        unfinished = [str(d.relative_to(sweep_dir)) for d in dirs if d not in finished]
        raise RuntimeError(f"{sweep_dir}: {len(finished)} finished runs, expected {expect}; unfinished: "
                           f"{unfinished or 'none (the other runs never started)'}")
    if not finished:
        raise FileNotFoundError(f"no finished runs (final.json) below {sweep_dir}")
    configs = [flatten(OmegaConf.to_container(OmegaConf.load(d / CONFIG_FILE), resolve=True)) for d in finished]
    swept = list(dict.fromkeys(key for d in finished for key in command_line_keys(d)))
    varying = [key for key in dict.fromkeys(k for c in configs for k in c)
               if len({repr(c.get(key)) for c in configs}) > 1
               and not any(key == k or key.startswith(f"{k}.") for k in IGNORED_OVERRIDES)]
    columns = list(dict.fromkeys(key for key in (*swept, *varying) if any(key in c for c in configs)))
    rows = []
    for run_dir, config in zip(finished, configs):
        row = {key: config.get(key) for key in columns}
        row.update(json.loads((run_dir / FINAL_FILE).read_text()))
        if config.get("task.name") == "toy2d":
            row.update(toy_mode_metrics(run_dir))
        row["run_dir"] = str(run_dir.relative_to(sweep_dir))
        rows.append(row)
    table = pd.DataFrame(rows)
    axes = [c for c in (*AXIS_PREFERENCE, *columns) if c in columns]
    table = table.sort_values(list(dict.fromkeys(axes)) or ["run_dir"], kind="stable").reset_index(drop=True)
    table.attrs["config_columns"] = columns
    return table


def toy_mode_metrics(run_dir: Path) -> dict:
    """precision / recall / mmd / mode_distance of a toy run (``eval.reproduce_toy2d.mode_metrics``)."""
    from eval.reproduce_toy2d import mode_metrics
    from experiments.figures import load_run

    return {k: v for k, v in mode_metrics(load_run(run_dir)).items() if k != "modes"}


def default_axes(table: pd.DataFrame, x: str | None, y: str | None, facet: str | None) -> tuple:
    """x, y and facet keys: the given ones, else the config columns with more than one value, in
    ``AXIS_PREFERENCE`` order."""
    multi = [c for c in table.attrs["config_columns"] if table[c].nunique(dropna=False) > 1]
    ordered = [c for c in AXIS_PREFERENCE if c in multi] + [c for c in multi if c not in AXIS_PREFERENCE]
    ordered = [c for c in ordered if c not in (x, y, facet)]
    x = x or (ordered.pop(0) if ordered else None)
    y = y or (ordered.pop(0) if ordered else None)
    facet = facet or (ordered.pop(0) if ordered else None)
    for field, key in (("--x", x), ("--y", y), ("--facet", facet)):
        if key is not None and key not in table.columns:
            raise ValueError(f"{field} must be a column of the sweep table ({sorted(table.columns)}), got {key!r}")
    if x is None:
        raise ValueError("a heat map needs at least one swept key with more than one value")
    return x, y, facet


def heatmap_figure(table: pd.DataFrame, metric: str, x: str, y: str | None, facet: str | None,
                   title: str) -> Figure:
    """``metric`` (mean over any remaining keys, e.g. seeds) on an x × y grid, one panel per facet value;
    cells annotated, the best cell of each panel outlined."""
    facets = sorted(table[facet].unique()) if facet else [None]
    figure = Figure(figsize=(3.4 * len(facets) + 0.8, 3.0))
    axes = figure.subplots(1, len(facets), squeeze=False)[0]
    values = table[metric].astype(float)
    low, high = float(values.min()), float(values.max())
    cmap = "viridis_r" if metric in LOWER_IS_BETTER else "viridis"
    for ax, value in zip(axes, facets):
        part = table if facet is None else table[table[facet] == value]
        grid = part.assign(_y=part[y] if y else "", _m=part[metric].astype(float)).pivot_table(
            index="_y", columns=x, values="_m", aggfunc="mean")
        image = ax.imshow(grid.to_numpy(), cmap=cmap, vmin=low, vmax=high, origin="lower", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), [_label(v) for v in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [_label(v) for v in grid.index])
        ax.set_xlabel(x)
        ax.set_ylabel(y or "")
        data = grid.to_numpy()
        finite = np.isfinite(data)
        for (i, j), cell in np.ndenumerate(data):
            if finite[i, j]:
                ax.text(j, i, f"{cell:.3g}", ha="center", va="center", fontsize=7, color="black",
                        path_effects=[withStroke(linewidth=2, foreground="white")])
        if finite.any():
            pick = np.nanargmin if metric in LOWER_IS_BETTER else np.nanargmax
            i, j = np.unravel_index(pick(np.where(finite, data, np.nan)), data.shape)
            ax.add_patch(_outline(j, i))
        ax.set_title(f"{facet} = {_label(value)}" if facet else "", fontsize=8)
    figure.colorbar(image, ax=list(axes), label=metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    figure.suptitle(title, fontsize=9)
    return figure


def _label(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _outline(x: float, y: float) -> Rectangle:
    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5)


def write_sweep(sweep_dir: Path, name: str, out_dir: Path, expect: int | None, metrics: list[str] | None,
                x: str | None = None, y: str | None = None, facet: str | None = None) -> pd.DataFrame:
    """``<out_dir>/<name>.csv`` and ``<out_dir>/<name>_<metric>.png`` for each metric (everything is checked
    before anything is written)."""
    table = sweep_table(sweep_dir, expect)
    task = OmegaConf.load(Path(sweep_dir) / table["run_dir"].iloc[0] / CONFIG_FILE).task.name
    metrics = metrics or [m for m in DEFAULT_METRICS.get(task, ()) if m in table.columns]
    numeric = sorted(c for c in table.columns if pd.api.types.is_numeric_dtype(table[c]))
    for metric in metrics:
        if metric not in numeric:
            raise ValueError(f"--metrics must name numeric columns of the sweep table {numeric}, got {metric!r}")
    x, y, facet = default_axes(table, x, y, facet)
    figures = {m: heatmap_figure(table, m, x, y, facet, f"{name}: {m} ({len(table)} runs)") for m in metrics}
    write_csv(Path(out_dir) / f"{name}.csv", table)
    for metric, figure in figures.items():
        save_figure(Path(out_dir) / f"{name}_{metric}.png", figure)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--name", required=True, help="table name: <out-dir>/<name>.csv")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "results" / "sweeps")
    parser.add_argument("--expect", type=int, default=None, help="fail unless at least this many runs finished")
    parser.add_argument("--metrics", default=None, help="comma-separated final metrics to draw (default per task)")
    parser.add_argument("--x", default=None)
    parser.add_argument("--y", default=None)
    parser.add_argument("--facet", default=None)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        raise SystemExit(f"sweep_dir must be an existing directory, got {str(args.sweep_dir)!r}")
    table = write_sweep(args.sweep_dir, args.name, args.out_dir, args.expect,
                        args.metrics.split(",") if args.metrics else None, args.x, args.y, args.facet)
    print(table.drop(columns="run_dir").to_string(index=False, max_cols=14))
    print(f"{len(table)} runs -> {args.out_dir / (args.name + '.csv')}", flush=True)


if __name__ == "__main__":
    main()

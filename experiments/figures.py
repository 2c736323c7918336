"""Toy figures built from run directories: one run's scatter plot and the method × setting grid
(the paper's Figure 1 / supplementary Fig. 3). The exact target density is drawn as a light heat map
(√p, so thin branches stay visible) with the 95% HDR outline; particles are small dark dots.
Figures are plain ``matplotlib.figure.Figure`` objects (no pyplot state, nothing to close)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

METHOD_COLUMNS = ("ddim", "sds", "vsd", "sdi", "msd", "msd_tweedie", "msd_ode", "msd_exact")
METHOD_TITLES = {"ddim": "DDIM (reference)", "sds": "SDS", "vsd": "VSD", "sdi": "SDI",
                 "msd": "MSD (product PF-ODE)", "msd_tweedie": "MSD (tweedie)", "msd_ode": "MSD (eq. 12 ODE)",
                 "msd_exact": "MSD (exact product)"}
DENSITY_CMAP = LinearSegmentedColormap.from_list("light_orange", ["#ffffff", "#fdd9b5", "#f4a460"])
PARTICLE_COLOR = "#1b2a49"
HDR_COLOR = "#d2691e"


@dataclass
class Canvas:
    """Square plot window: centre (cx, cy), half-size h."""

    center: tuple[float, float]
    half_size: float

    @property
    def extent(self) -> tuple[float, float, float, float]:
        (cx, cy), h = self.center, self.half_size
        return cx - h, cx + h, cy - h, cy + h


@dataclass
class DensityMap:
    """log p on a resolution × resolution pixel grid over the canvas, and the HDR level to outline."""

    canvas: Canvas
    log_density: np.ndarray
    hdr_level: float

    @classmethod
    def compute(cls, mixture, canvas: Canvas, hdr_level: float, resolution: int = 256) -> "DensityMap":
        x0, x1, y0, y1 = canvas.extent
        xs = torch.linspace(x0, x1, resolution, dtype=torch.float64)
        ys = torch.linspace(y0, y1, resolution, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
        log_p = mixture.log_prob(grid, 0.0).reshape(resolution, resolution)
        return cls(canvas, log_p.numpy(), hdr_level)

    def draw(self, ax) -> None:
        density = np.exp(self.log_density - self.log_density.max())
        ax.imshow(np.sqrt(density), origin="lower", extent=self.canvas.extent, cmap=DENSITY_CMAP,
                  vmin=0.0, vmax=1.0, interpolation="bilinear")
        x0, x1, y0, y1 = self.canvas.extent
        xs = np.linspace(x0, x1, self.log_density.shape[1])
        ys = np.linspace(y0, y1, self.log_density.shape[0])
        ax.contour(xs, ys, self.log_density, levels=[self.hdr_level], colors=HDR_COLOR, linewidths=0.4, alpha=0.6)


def draw_particles(ax, density: DensityMap, particles: np.ndarray, title: str | None = None) -> None:
    """One panel: density background, particles clipped to the canvas, no ticks."""
    density.draw(ax)
    ax.scatter(particles[:, 0], particles[:, 1], s=0.6, c=PARTICLE_COLOR, alpha=0.7, linewidths=0, rasterized=True)
    x0, x1, y0, y1 = density.canvas.extent
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def metrics_caption(final: dict) -> str:
    return f"NLL {final['nll']:.2f} · in-HDR {final['in_hdr']:.2f}"


def scatter_figure(density: DensityMap, particles: np.ndarray, title: str):
    """Final particles of one run over the exact density."""
    figure = Figure(figsize=(4.0, 4.0))
    ax = figure.subplots()
    draw_particles(ax, density, particles, title)
    return figure


@dataclass
class RunRecord:
    """What a finished run directory holds: its resolved config, final metrics and final particles."""

    path: Path
    config: DictConfig
    final: dict
    particles: np.ndarray

    @property
    def setting(self) -> tuple[str, str, float]:
        """(denoiser, guide, scale), with guide 'none' when unguided."""
        scale = float(self.final["guidance_scale"])
        return self.final["denoiser"], (self.final["guide"] if scale != 1.0 else "none"), scale


def load_run(run_dir: str | Path) -> RunRecord:
    run_dir = Path(run_dir)
    final = json.loads((run_dir / "final.json").read_text())
    with np.load(run_dir / "particles.npz") as arrays:
        particles = arrays["particles"]
    return RunRecord(run_dir, OmegaConf.load(run_dir / "config.yaml"), final, particles)


def find_runs(root: str | Path) -> list[RunRecord]:
    """Every finished run (a folder with final.json) below ``root``, in path order."""
    return [load_run(path.parent) for path in sorted(Path(root).rglob("final.json"))]


def setting_label(setting: tuple[str, str, float]) -> str:
    denoiser, guide, scale = setting
    guidance = "no guidance" if guide == "none" else f"{'CFG' if guide == 'cfg' else 'autoguidance'} w={scale:g}"
    return f"{denoiser}\n{guidance}"


def setting_order(setting: tuple[str, str, float]) -> tuple:
    denoiser, guide, scale = setting
    return (denoiser != "exact", denoiser, ("none", "cfg", "autoguidance").index(guide), scale)


def grid_figure(records: list[RunRecord], density: DensityMap):
    """Rows: denoiser × guidance setting; columns: DDIM, SDS, VSD, SDI, MSD (blank where a run is missing)."""
    settings = sorted({r.setting for r in records}, key=setting_order)
    by_cell = {(r.setting, r.final["method"]): r for r in records}
    figure = Figure(figsize=(2.1 * len(METHOD_COLUMNS), 2.35 * len(settings)))
    axes = figure.subplots(len(settings), len(METHOD_COLUMNS), squeeze=False)
    for i, setting in enumerate(settings):
        for j, method in enumerate(METHOD_COLUMNS):
            ax = axes[i, j]
            record = by_cell.get((setting, method))
            if record is None:
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
            else:
                draw_particles(ax, density, record.particles)
                ax.set_xlabel(metrics_caption(record.final), fontsize=7)
            if i == 0:
                ax.set_title(METHOD_TITLES[method], fontsize=10)
            if j == 0:
                ax.set_ylabel(setting_label(setting), fontsize=9)
    figure.tight_layout()
    return figure

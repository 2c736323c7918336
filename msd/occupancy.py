"""The occupancy grid of the packed rendering layout (docs/design.md §10.2): nerfacc's ``OccGridEstimator`` with
threestudio's settings, owned by a task, updated every step, saved and restored with its state dict.

The defaults are threestudio's ``nerf-volume-renderer`` (Apache-2.0, commit 28d9d80,
``threestudio/models/renderers/nerf_volume_renderer.py``: ``NeRFVolumeRenderer.configure``, ``forward`` and
``update_step``; ``configs/dreamfusion-sd.yaml``) and nerfacc 0.5.3's (MIT, ``nerfacc/estimators/occ_grid.py``),
reimplemented from their source, not copied:

* the grid: ``OccGridEstimator(roi_aabb=[−r, r]³, resolution=32, levels=1)``, r the renderer's radius
  (threestudio's ``radius``: 1, DreamFusion-SD 2);
* the march: ``render_step_size = 1.732 · 2r / num_samples_per_ray`` (the box's diagonal over the sample count),
  ``num_samples_per_ray = 512``; ``cone_angle = 0``; with ``grid_prune`` (on) and ``prune_alpha_threshold`` (on):
  σ at the interval midpoints (``sigma_fn``), ``alpha_thre = 0.01`` (nerfacc lowers it to the grid's mean
  occupancy while that is smaller) and nerfacc's ``early_stop_eps = 10⁻⁴``; without pruning: every cell occupied,
  no σ evaluation, no thresholds;
* the update (threestudio's ``update_step``, nerfacc's ``update_every_n_steps`` defaults): every 16 steps, the
  occupancy of a cell is ``σ(p) · render_step_size`` at one uniform point p of the cell, kept as
  ``max(0.95 · old, new)``; before step 256 every cell is visited, after it ``cells/4`` uniform cells and at most
  ``cells/4`` of the occupied ones; a cell is occupied where its value exceeds ``min(mean, occ_thre = 0.01)``.

Differences, each for this project's contracts:

* Every draw takes the generator passed in, on the grid's device (docs/design.md §7): :meth:`OccupancyGrid.update`
  is nerfacc's ``_update`` rewritten with the same draws in the same order (bitwise equal to nerfacc's for a CPU
  generator and a global RNG seeded alike: ``tests/test_packed_rendering.py``), and the stratified start is passed
  to nerfacc's sampling as ``t_min = near + u · step`` (u ~ U[0, 1) per ray) instead of ``stratified=True``, which
  would draw from the global RNG. The update runs in train and eval mode alike (nerfacc's raises in eval mode).
* A fresh grid marks every cell occupied. nerfacc's starts empty and renders nothing until its first update;
  threestudio updates at step 0, before the first render, so the two agree from the first update on.
* Rays are marched through the caller's [near, far] (the bounding sphere in ``render_cameras``); threestudio
  marches through the whole box.

The grid serves one scene: a field shared by all views (it is evaluated with points ``[1, P, 3]``).
"""
from __future__ import annotations

from collections.abc import Callable

import nerfacc
import torch
from torch import Tensor, nn

from msd.checks import require
from msd.rendering import RadianceField

THREESTUDIO_STEP_FACTOR = 1.732
"""threestudio's ``render_step_size = 1.732 * 2 * radius / num_samples_per_ray`` (√3 rounded: the box diagonal)."""


class OccupancyGrid(nn.Module):
    """nerfacc's ``OccGridEstimator`` over the box [−radius, radius]³ and the settings of its march and update (module
    docstring for the defaults and their sources). A task owns one, calls :meth:`update` every step and passes it as
    ``estimator`` to :func:`msd.rendering.render_cameras`; the packed path uses it on CUDA, the dense path (CPU)
    ignores it. Its state dict holds nerfacc's buffers (``estimator.occs``, ``estimator.binaries``, ...) for resume.

    radius (world units); resolution: cells per axis; levels: nerfacc's nested grids (level l covers 2^l times the
    box); samples_per_ray: threestudio's ``num_samples_per_ray``, fixing ``render_step_size``; alpha_threshold,
    early_stop_eps, cone_angle: nerfacc's ``sampling`` options; occupancy_threshold (``occ_thre``), ema_decay,
    warmup_steps, update_every (``n``): nerfacc's ``update_every_n_steps`` options; prune: threestudio's
    ``grid_prune`` (False: every cell stays occupied, no σ evaluation while sampling, no update).
    """

    def __init__(self, radius: float = 1.0, resolution: int = 32, levels: int = 1, samples_per_ray: int = 512,
                 alpha_threshold: float = 0.01, early_stop_eps: float = 1e-4, cone_angle: float = 0.0,
                 occupancy_threshold: float = 0.01, ema_decay: float = 0.95, warmup_steps: int = 256,
                 update_every: int = 16, prune: bool = True, device: torch.device | str | None = None):
        super().__init__()
        require(radius > 0, "occupancy.radius", "> 0 (world units)", radius)
        for name, value in (("resolution", resolution), ("levels", levels), ("samples_per_ray", samples_per_ray),
                            ("update_every", update_every)):
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"occupancy.{name}",
                    "an integer >= 1", value)
        require(isinstance(warmup_steps, int) and warmup_steps >= 0, "occupancy.warmup_steps", "an integer >= 0",
                warmup_steps)
        for name, value in (("alpha_threshold", alpha_threshold), ("early_stop_eps", early_stop_eps),
                            ("occupancy_threshold", occupancy_threshold)):
            require(0.0 <= value < 1.0, f"occupancy.{name}", "in [0, 1)", value)
        require(0.0 <= ema_decay <= 1.0, "occupancy.ema_decay", "in [0, 1]", ema_decay)
        require(cone_angle >= 0.0, "occupancy.cone_angle", ">= 0", cone_angle)
        self.radius, self.samples_per_ray, self.prune = float(radius), samples_per_ray, bool(prune)
        self.render_step_size = THREESTUDIO_STEP_FACTOR * 2.0 * radius / samples_per_ray
        self.alpha_threshold, self.early_stop_eps, self.cone_angle = alpha_threshold, early_stop_eps, cone_angle
        self.occupancy_threshold, self.ema_decay = occupancy_threshold, ema_decay
        self.warmup_steps, self.update_every = warmup_steps, update_every
        self.estimator = nerfacc.OccGridEstimator(roi_aabb=[-radius] * 3 + [radius] * 3, resolution=resolution,
                                                  levels=levels)
        self.estimator.binaries.fill_(True)  # a fresh grid: everything occupied (module docstring)
        if not self.prune:
            self.estimator.occs.fill_(1.0)  # threestudio's grid_prune=False
        self.to(device)

    def extra_repr(self) -> str:
        return (f"radius={self.radius}, resolution={self.estimator.resolution.tolist()}, levels={self.estimator.levels}, "
                f"render_step_size={self.render_step_size:.5g}, prune={self.prune}")

    @property
    def occupied_fraction(self) -> float:
        """The fraction of occupied cells over all levels."""
        return self.estimator.binaries.float().mean().item()

    @torch.no_grad()
    def sample(self, origins: Tensor, directions: Tensor, near: Tensor, far: Tensor,
               sigma_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """nerfacc's march (CUDA): rays origins, unit directions [R, 3], each through [near, far] [R] at
        ``render_step_size`` across occupied cells; with pruning, samples whose α = 1 − exp(−σδ) is below the
        threshold or whose transmittance is below ``early_stop_eps`` are dropped (σ = ``sigma_fn(t_starts, t_ends,
        ray_indices)`` [P]). ``generator``: each ray starts at ``near + u · step``, u ~ U[0, 1) (None: at near).
        Returns (ray_indices [P] long, non-decreasing; t_starts [P]; t_ends [P])."""
        t_min = near
        if generator is not None:
            t_min = near + self.render_step_size * torch.rand(near.shape, generator=generator, device=near.device,
                                                              dtype=near.dtype)
        ray_indices, t_starts, t_ends = self.estimator.sampling(
            origins, directions, sigma_fn=sigma_fn if self.prune else None, t_min=t_min, t_max=far,
            render_step_size=self.render_step_size, early_stop_eps=self.early_stop_eps if self.prune else 0.0,
            alpha_thre=self.alpha_threshold if self.prune else 0.0, stratified=False, cone_angle=self.cone_angle)
        return ray_indices.long(), t_starts, t_ends

    @torch.no_grad()
    def update(self, step: int, field: RadianceField, generator: torch.Generator) -> bool:
        """At every ``update_every``-th step (and with pruning), refresh the grid from ``field.density`` (module
        docstring: threestudio's occupancy σ · render_step_size, nerfacc's EMA and threshold); draws on
        ``generator``, which must be on the grid's device. Pure torch: runs on any device. Returns whether it
        updated."""
        require(isinstance(step, int) and step >= 0, "step", "an integer >= 0", step)
        if not self.prune or step % self.update_every != 0:
            return False
        grid = self.estimator
        device, cells = grid.device, grid.cells_per_lvl
        require(generator.device.type == device.type, "generator", f"a generator on the grid's device ({device})",
                generator.device)
        if step < self.warmup_steps:  # every cell not marked invisible (occs < 0: nerfacc's mark_invisible_cells)
            level_cells = [grid.grid_indices[grid.occs[level * cells + grid.grid_indices] >= 0.0]
                           for level in range(grid.levels)]
        else:  # cells/4 uniform cells and at most cells/4 occupied ones, drawn level by level, as nerfacc does
            n, level_cells = cells // 4, []
            for level in range(grid.levels):
                uniform = torch.randint(cells, (n,), generator=generator, device=device)
                uniform = uniform[grid.occs[level * cells + uniform] >= 0.0]
                occupied = torch.nonzero(grid.binaries[level].flatten())[:, 0]
                if n < len(occupied):
                    occupied = occupied[torch.randint(len(occupied), (n,), generator=generator, device=device)]
                level_cells.append(torch.cat([uniform, occupied]))
        for level, indices in enumerate(level_cells):
            corners = grid.grid_coords[indices]
            unit = (corners + torch.rand(corners.shape, generator=generator, device=device,
                                         dtype=torch.float32)) / grid.resolution
            low, high = grid.aabbs[level, :3], grid.aabbs[level, 3:]
            points = low + unit * (high - low)
            occupancy = field.density(points.unsqueeze(0))[0].to(grid.occs.dtype) * self.render_step_size
            ids = level * cells + indices
            grid.occs[ids] = torch.maximum(grid.occs[ids] * self.ema_decay, occupancy)
        threshold = grid.occs[grid.occs >= 0].mean().clamp(max=self.occupancy_threshold)
        grid.binaries.copy_((grid.occs > threshold).view(grid.binaries.shape))
        return True

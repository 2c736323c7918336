"""Geometric metrics of a radiance field against ShapesWorld-3D's truth (docs/design.md §10.7).

Pure math: tensors in, numbers and tensors out, no I/O. Lengths in world units, densities σ in 1 / world unit.

* **Silhouette IoU** (:func:`silhouette_iou`): render the opacity A of the field and of a reference (the true
  primitive) from the same cameras; a pixel is inside where ``A > ½`` (:data:`OPACITY_THRESHOLD`); per view
  ``|S ∩ S_ref| / |S ∪ S_ref|``.
* **Volumetric IoU** (:func:`volumetric_iou`): the field's density on a grid of N³ points over the box [−R, R]³
  (:func:`density_grid`), occupied where ``σ > τ`` (:data:`DENSITY_THRESHOLD`), against the occupancy
  ``d(p − t) < 0`` of every true primitive of the family — 4 shapes × sizes (:data:`FIT_SIZES`) × offsets t on a
  small translation grid (multiples of the grid spacing). The best IoU, and its shape, size and offset, is the fit
  (:class:`PrimitiveFit`); ``1 − IoU`` is the 3-D mode-alignment distance.

**Calibration of τ.** τ = s/2 = 200 (:data:`shapes.world3d.DENSITY_SCALE` / 2), the world's density on its surface
d = 0: the stated criterion is that every true :class:`shapes.world3d.PrimitiveField` (4 shapes × :data:`FIT_SIZES`)
thresholded at τ has IoU ≥ 0.95 (:data:`CALIBRATION_MIN_IOU`) with its own occupancy ``d < 0`` on the grid used
(:func:`ground_truth_self_iou`); docs/design.md §10.7 gives the measured range of τ that passes.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from msd.checks import require
from msd.rendering import Cameras, RadianceField, Rays, camera_rays, render_rays, sphere_near_far
from shapes.world3d import (
    DENSITY_SCALE,
    N_SAMPLES,
    NO_FRONT,
    PRIMITIVES,
    SCENE_RADIUS,
    SIZE_RANGE,
    PrimitiveField,
    Scene,
    signed_distance,
)

OPACITY_THRESHOLD = 0.5
"""A pixel belongs to a silhouette where the rendered opacity A > ½ (optical depth > ln 2)."""
DENSITY_THRESHOLD = DENSITY_SCALE / 2
"""τ = 200 / world unit: a grid point is occupied where σ > τ; the world's σ = s · sigmoid(−d/ε) equals τ exactly on
its surface d = 0 (module docstring: the calibration)."""
CALIBRATION_MIN_IOU = 0.95
"""The calibration criterion: every true primitive thresholded at τ has IoU ≥ this with its own occupancy."""
GRID_RADIUS = SCENE_RADIUS
"""Half-side R of the evaluation box [−R, R]³: the scene sphere's bounding box (the learned fields' box)."""
GRID_RESOLUTION = 129
"""N points per axis (vertices, both faces included): spacing h = 2R/(N − 1) = 1/64 world units; the smallest
primitive (r = 0.15) spans 19 points across."""
FIT_SIZES = tuple(round(SIZE_RANGE[0] + 0.0025 * k, 4) for k in range(61))
"""Sizes of the primitive family: 0.15, 0.1525, …, 0.30 (the world's :data:`shapes.world3d.SIZE_RANGE` in steps of
0.0025, a sixth of the grid spacing: a true size between two of them still gets IoU ≥ 1 − 3 · 0.00125 / 0.15 ≈ 0.975)."""
FIT_MAX_OFFSET = 0.125
"""The translation grid reaches ±0.125 per axis (8 grid spacings at N = 129) ..."""
FIT_OFFSET_STEP = 1 / 64
"""... in steps of one grid spacing (1/64 at N = 129, R = 1): 17 offsets per axis, 4913 in all."""
POINTS_PER_CHUNK = 2**18
"""Field evaluations per call in :func:`density_grid` and the renders."""


# --- evaluating a field ------------------------------------------------------------------------------------------


def field_device(field: RadianceField) -> torch.device:
    """Where a field's tensors live: an ``nn.Module``'s first parameter or buffer, a
    :class:`shapes.world3d.PrimitiveField`'s scene, a wrapper's ``.field``; else the CPU."""
    if isinstance(field, torch.nn.Module):
        for tensor in itertools.chain(field.parameters(), field.buffers()):
            return tensor.device
    if isinstance(field, PrimitiveField):
        return field.scene.size.device
    inner = getattr(field, "field", None)
    return field_device(inner) if inner is not None else torch.device("cpu")


def grid_axis(resolution: int = GRID_RESOLUTION, radius: float = GRID_RADIUS,
              device: torch.device | str | None = None) -> Tensor:
    """The N coordinates ``−R + 2R i/(N − 1)``, i = 0 … N − 1 (float32), shared by the three axes."""
    require(isinstance(resolution, int) and resolution >= 2, "resolution", "an integer >= 2", resolution)
    require(radius > 0, "radius", "> 0 (world units)", radius)
    return torch.linspace(-radius, radius, resolution, device=device)


def grid_points(axis: Tensor) -> Tensor:
    """Points [N, N, N, 3] with ``points[i, j, k] = (axis[i], axis[j], axis[k])`` (x along the first index)."""
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


@torch.no_grad()
def density_grid(field: RadianceField, resolution: int = GRID_RESOLUTION, radius: float = GRID_RADIUS,
                 points_per_chunk: int = POINTS_PER_CHUNK) -> Tensor:
    """σ [N, N, N] of ``field`` at :func:`grid_points` of :func:`grid_axis` (on the field's device, no autograd),
    ``points_per_chunk`` points per call of ``field.density``."""
    require(isinstance(points_per_chunk, int) and points_per_chunk >= 1, "points_per_chunk", "an integer >= 1",
            points_per_chunk)
    points = grid_points(grid_axis(resolution, radius, field_device(field))).reshape(1, -1, 3)
    sigma = torch.cat([field.density(chunk) for chunk in points.split(points_per_chunk, dim=1)], dim=1)
    return sigma.reshape(resolution, resolution, resolution)


class DensityOnlyField:
    """A field's density with black colour: what an opacity render needs (skips shading and normals)."""

    def __init__(self, field: RadianceField):
        self.field = field

    def density(self, points: Tensor) -> Tensor:
        return self.field.density(points)

    def density_and_colour(self, points: Tensor, light_positions: Tensor | None) -> tuple[Tensor, Tensor]:
        sigma = self.field.density(points)
        return sigma, sigma.new_zeros(*sigma.shape, 3)


class TranslatedField:
    """``field`` moved by ``offset`` [3] (world units): evaluated at ``p − offset``, its lights moved with it."""

    def __init__(self, field: RadianceField, offset: Tensor | Sequence[float]):
        self.field = field
        self.offset = torch.as_tensor(offset, dtype=torch.float32, device=field_device(field))
        require(self.offset.shape == (3,), "offset", "three coordinates (world units)", tuple(self.offset.shape))

    def density(self, points: Tensor) -> Tensor:
        return self.field.density(points - self.offset.to(points.dtype))

    def density_and_colour(self, points: Tensor, light_positions: Tensor | None) -> tuple[Tensor, Tensor]:
        offset = self.offset.to(points.dtype)
        lights = None if light_positions is None else light_positions - offset
        return self.field.density_and_colour(points - offset, lights)


@torch.no_grad()
def render_views(field: RadianceField, cameras: Cameras, n_samples: int = N_SAMPLES,
                 scene_radius: float = SCENE_RADIUS, background: Tensor | Sequence[float] | None = None,
                 points_per_chunk: int = POINTS_PER_CHUNK) -> tuple[Tensor, Tensor]:
    """(rgb [B, 3, H, W] in [0, 1], opacity [B, H, W]) of ``field`` through each camera, exactly as
    :func:`msd.rendering.render_cameras` (midpoint samples, no jitter) but one view and at most
    ``points_per_chunk // n_samples`` rays at a time, without autograd. background: RGB [3] (None: black)."""
    require(isinstance(points_per_chunk, int) and points_per_chunk >= n_samples, "points_per_chunk",
            f"an integer >= n_samples ({n_samples})", points_per_chunk)
    rays = camera_rays(cameras)
    near, far = sphere_near_far(rays, scene_radius)
    rays_per_chunk = points_per_chunk // n_samples
    rgb, opacity = [], []
    for view in range(len(cameras)):
        view_rgb, view_opacity = [], []
        for start in range(0, rays.origins.shape[1], rays_per_chunk):
            window = slice(start, start + rays_per_chunk)
            chunk = Rays(rays.origins[view:view + 1, window], rays.directions[view:view + 1, window],
                         rays.light_positions[view:view + 1])
            output = render_rays(field, chunk, n_samples, near[view:view + 1, window], far[view:view + 1, window],
                                 background)
            view_rgb.append(output.rgb)
            view_opacity.append(output.opacity)
        rgb.append(torch.cat(view_rgb, dim=1))
        opacity.append(torch.cat(view_opacity, dim=1))
    height, width = cameras.height, cameras.width
    rgb = torch.cat(rgb).reshape(len(cameras), height, width, 3).permute(0, 3, 1, 2)
    return rgb, torch.cat(opacity).reshape(len(cameras), height, width)


def render_opacity(field: RadianceField, cameras: Cameras, n_samples: int = N_SAMPLES,
                   scene_radius: float = SCENE_RADIUS, points_per_chunk: int = POINTS_PER_CHUNK) -> Tensor:
    """Opacity A = 1 − exp(−Σ σ δ) [B, H, W] of each camera's pixels (:func:`render_views` of the density alone)."""
    return render_views(DensityOnlyField(field), cameras, n_samples, scene_radius, None, points_per_chunk)[1]


# --- IoU ---------------------------------------------------------------------------------------------------------


def mask_iou(mask: Tensor, reference: Tensor) -> Tensor:
    """``|M ∩ M_ref| / |M ∪ M_ref|`` [B] of boolean masks [B, ...] over all but the first dimension (1 where both are
    empty: they agree)."""
    require(mask.shape == reference.shape, "mask", f"the reference's shape {tuple(reference.shape)}",
            tuple(mask.shape))
    mask, reference = mask.flatten(1).bool(), reference.flatten(1).bool()
    intersection = (mask & reference).sum(1)
    union = (mask | reference).sum(1)
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(intersection, dtype=torch.float))


def silhouette_iou(field: RadianceField, reference: RadianceField, cameras: Cameras, n_samples: int = N_SAMPLES,
                   scene_radius: float = SCENE_RADIUS, threshold: float = OPACITY_THRESHOLD) -> Tensor:
    """Per-view silhouette IoU [B] of ``field`` against ``reference`` (the true primitive: a
    :class:`shapes.world3d.PrimitiveField`, e.g. :meth:`PrimitiveFit.field`) rendered from the same cameras with the
    same samples; silhouettes ``A > threshold``. The metric is the mean over views."""
    require(0.0 < threshold < 1.0, "threshold", "in (0, 1) (an opacity)", threshold)
    opacity = render_opacity(field, cameras, n_samples, scene_radius)
    reference_opacity = render_opacity(reference, cameras, n_samples, scene_radius)
    return mask_iou(opacity > threshold, reference_opacity > threshold)


def primitive_occupancy(shape: str, size: float, points: Tensor) -> Tensor:
    """``d(p) < 0`` (bool, points' shape without the last axis) of the primitive ``shape`` of size ``size`` at the
    origin."""
    require(shape in PRIMITIVES, "shape", f"one of {PRIMITIVES}", shape)
    flat = points.reshape(1, -1, 3)
    shape_id = torch.tensor([PRIMITIVES.index(shape)], device=points.device)
    size_t = torch.tensor([float(size)], dtype=points.dtype, device=points.device)
    return (signed_distance(shape_id, size_t, flat) < 0).reshape(points.shape[:-1])


def primitive_field(shape: str, size: float, colour: int = 0, offset: Sequence[float] = (0.0, 0.0, 0.0),
                    device: torch.device | str | None = None) -> RadianceField:
    """The world's :class:`shapes.world3d.PrimitiveField` of one primitive (colour id into
    :data:`shapes.world.COLOURS`), moved by ``offset`` when it is not zero."""
    require(shape in PRIMITIVES, "shape", f"one of {PRIMITIVES}", shape)
    scene = Scene(torch.tensor([PRIMITIVES.index(shape)], device=device), torch.tensor([colour], device=device),
                  torch.tensor([float(size)], device=device), torch.tensor([NO_FRONT], device=device))
    field = PrimitiveField(scene)
    return field if not any(offset) else TranslatedField(field, offset)


@dataclass(frozen=True)
class PrimitiveFit:
    """The best-fitting true primitive of :func:`fit_primitive`: ``iou`` with the field's occupancy, its shape, size
    and offset (world units), the best IoU per shape, and the density threshold used (None for a given occupancy)."""

    iou: float
    shape: str
    size: float
    offset: tuple[float, float, float]
    iou_by_shape: dict[str, float]
    density_threshold: float | None = None

    @property
    def distance(self) -> float:
        """The 3-D mode-alignment distance ``1 − IoU``."""
        return 1.0 - self.iou

    def field(self, colour: int = 0, device: torch.device | str | None = None) -> RadianceField:
        """The fitted primitive as a field (for :func:`silhouette_iou`)."""
        return primitive_field(self.shape, self.size, colour, self.offset, device)


def _fft_size(n: int) -> int:
    """The smallest integer ≥ n whose prime factors are 2, 3 and 5 (a fast FFT length)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _grid_steps(value: float, spacing: float, name: str) -> int:
    """``value / spacing`` as an integer (required to be one, to 10⁻⁴ of a spacing)."""
    steps = round(value / spacing)
    require(abs(steps * spacing - value) <= 1e-4 * spacing, name,
            f"a multiple of the grid spacing {spacing:g} (2R/(N − 1))", value)
    return steps


@torch.no_grad()
def fit_primitive(occupancy: Tensor, radius: float = GRID_RADIUS, sizes: Sequence[float] = FIT_SIZES,
                  shapes: Sequence[str] = PRIMITIVES, max_offset: float = FIT_MAX_OFFSET,
                  offset_step: float = FIT_OFFSET_STEP, candidates_per_chunk: int = 32) -> PrimitiveFit:
    """The true primitive (shape × size × offset) of maximal IoU with ``occupancy`` [N, N, N] (bool, at
    :func:`grid_points` over [−radius, radius]³).

    Offsets t are the grid-aligned vectors with every coordinate in {−max_offset, −max_offset + offset_step, …,
    max_offset} (both multiples of the spacing h = 2R/(N − 1)), so the candidate's occupancy ``d(p − t) < 0`` is the
    one at the origin shifted by whole cells, and its IoU is exact on the grid: with T the candidate at the origin
    (non-zero only inside [−r, r]³) and L the occupancy, ``I(t) = Σ_p T(p) L(p + t)`` for every t at once by FFT
    cross-correlation, and ``IoU = I / (|L| + |T| − I)``. The search runs in float32 (errors ~10⁻⁶ in IoU); each
    shape's best candidate is then recounted exactly in integers, and those exact values are returned. Ties go to the
    first in the order shapes, sizes, offsets (x, then y, then z, ascending).
    """
    require(occupancy.dim() == 3 and len(set(occupancy.shape)) == 1, "occupancy", "a cubic grid [N, N, N]",
            tuple(occupancy.shape))
    require(len(sizes) >= 1 and all(s > 0 for s in sizes), "sizes", "one or more sizes > 0 (world units)", sizes)
    require(len(shapes) >= 1 and all(s in PRIMITIVES for s in shapes), "shapes", f"some of {PRIMITIVES}", shapes)
    resolution = occupancy.shape[0]
    axis = grid_axis(resolution, radius, occupancy.device)
    spacing = 2.0 * radius / (resolution - 1)
    max_steps, step = _grid_steps(max_offset, spacing, "max_offset"), _grid_steps(offset_step, spacing, "offset_step")
    require(step >= 1 and max_steps >= 0 and max_steps % step == 0, "offset_step",
            f"a positive divisor of max_offset ({max_offset:g})", offset_step)
    # the candidates at the origin live in the sub-box of indices [low, high) per axis: |x| <= max(sizes) (+ a cell)
    inside = (axis.abs() <= max(sizes) + spacing).nonzero().flatten()
    low, high = int(inside[0]), int(inside[-1]) + 1
    require(low - max_steps >= 0 and high + max_steps <= resolution, "max_offset",
            f"small enough that every candidate stays in the box [−{radius:g}, {radius:g}]³", max_offset)
    box_points = grid_points(axis[low:high])
    window = occupancy[low - max_steps:high + max_steps, low - max_steps:high + max_steps,
                       low - max_steps:high + max_steps].float()  # [M, M, M], M = m + 2K
    size = (_fft_size(window.shape[0]),) * 3  # zero padding beyond M changes no correlation index kept below
    window_spectrum = torch.fft.rfftn(window, s=size)
    candidates = [(shape, s) for shape in shapes for s in sizes]
    kept = slice(0, 2 * max_steps + 1, step)  # correlation index K + k of the offset k (cells), k = −K, …, K
    shifts = list(itertools.product(range(-max_steps, max_steps + 1, step), repeat=3))
    occupied = occupancy.sum().item()
    approximate = []
    for start in range(0, len(candidates), candidates_per_chunk):
        templates = torch.stack([primitive_occupancy(shape, s, box_points)
                                 for shape, s in candidates[start:start + candidates_per_chunk]]).float()
        # Σ_j T[j] W[j + K + k]: the correlation of W with T (zero-padded to M); no wrap-around for 0 ≤ K + k ≤ 2K
        correlation = torch.fft.irfftn(window_spectrum * torch.fft.rfftn(templates, s=size).conj(), s=size)
        intersection = correlation[:, kept, kept, kept].flatten(1)
        union = occupied + templates.sum((1, 2, 3)).unsqueeze(1) - intersection
        approximate.append(intersection / union.clamp(min=1.0))
    approximate = torch.cat(approximate).reshape(len(shapes), -1)  # [shapes, sizes × offsets]

    def exact_iou(shape: str, size: float, shift: tuple[int, int, int]) -> float:
        """The IoU of one candidate by integer counts (the FFT search runs in float32)."""
        template = primitive_occupancy(shape, size, box_points)
        i, j, k = (low + s for s in shift)
        moved = occupancy[i:i + high - low, j:j + high - low, k:k + high - low]
        intersection = (template & moved).sum().item()
        union = occupied + template.sum().item() - intersection
        return intersection / union if union > 0 else 1.0

    fits = []  # per shape: (exact IoU, size, shift) of its best candidate
    for a, shape in enumerate(shapes):
        size_index, shift_index = divmod(int(approximate[a].argmax()), len(shifts))
        size, shift = float(sizes[size_index]), shifts[shift_index]
        fits.append((exact_iou(shape, size, shift), size, shift))
    best = max(range(len(shapes)), key=lambda a: (fits[a][0], -a))
    iou, size, shift = fits[best]
    return PrimitiveFit(iou=iou, shape=shapes[best], size=size, offset=tuple(float(s * spacing) for s in shift),
                        iou_by_shape={shape: fit[0] for shape, fit in zip(shapes, fits)})


def volumetric_iou(field: RadianceField, threshold: float = DENSITY_THRESHOLD, resolution: int = GRID_RESOLUTION,
                   radius: float = GRID_RADIUS, sizes: Sequence[float] = FIT_SIZES,
                   shapes: Sequence[str] = PRIMITIVES, max_offset: float = FIT_MAX_OFFSET,
                   offset_step: float = FIT_OFFSET_STEP) -> PrimitiveFit:
    """:func:`fit_primitive` of the field's occupancy ``σ > threshold`` on the N³ grid (:func:`density_grid`): the
    best IoU with a true primitive, its shape, size and offset; ``.distance`` = 1 − IoU."""
    require(threshold > 0, "threshold", "> 0 (a density, 1 / world unit)", threshold)
    occupancy = density_grid(field, resolution, radius) > threshold
    fit = fit_primitive(occupancy, radius, sizes, shapes, max_offset, offset_step)
    return PrimitiveFit(fit.iou, fit.shape, fit.size, fit.offset, fit.iou_by_shape, float(threshold))


@torch.no_grad()
def ground_truth_self_iou(threshold: float = DENSITY_THRESHOLD, resolution: int = GRID_RESOLUTION,
                          radius: float = GRID_RADIUS, sizes: Sequence[float] = FIT_SIZES,
                          shapes: Sequence[str] = PRIMITIVES) -> Tensor:
    """The calibration measurement: IoU [len(shapes), len(sizes)] of each true :class:`shapes.world3d.PrimitiveField`
    thresholded at ``σ > threshold`` with its own occupancy ``d < 0``, on the N³ grid over [−R, R]³.

    Evaluated on the sub-box |x| ≤ r + 8h of each primitive (h the spacing): outside it d > 8h = 0.125 at N = 129,
    σ < s · sigmoid(−25) ≈ 10⁻⁸, and both occupancies are empty there."""
    axis = grid_axis(resolution, radius)
    spacing = 2.0 * radius / (resolution - 1)
    iou = torch.zeros(len(shapes), len(sizes))
    for (a, shape), (b, size) in itertools.product(enumerate(shapes), enumerate(sizes)):
        points = grid_points(axis[axis.abs() <= size + 8 * spacing])
        field = primitive_field(shape, size)
        occupied = field.density(points.reshape(1, -1, 3)).reshape(points.shape[:-1]) > threshold
        iou[a, b] = mask_iou(occupied[None], primitive_occupancy(shape, size, points)[None])[0]
    return iou

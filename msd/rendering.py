"""Cameras, rays and volume rendering of radiance fields for text-to-3D (docs/design.md §10).

Pure math: tensors in, tensors out, no I/O. Lengths are in world units, angles in degrees where a name says
``_deg`` and in radians otherwise. float32 unless the inputs carry another dtype.

**World frame** (threestudio's): right-handed, z up. A camera at elevation e and azimuth a on a sphere of
radius r around the origin sits at ``r (cos e cos a, cos e sin a, sin e)``: azimuth 0 looks at the origin from
+x (the "front"), azimuth 90° from +y, elevation 90° from straight above.

**Camera frame** (OpenGL, as threestudio): x right, y up, the camera looks along −z. ``camera_to_world`` is
``[[right, up, back, position], [0, 0, 0, 1]]`` with ``back = −look``. A pixel (row i from the top, column j
from the left) of an H × W image has the ray direction ``((j + ½ − W/2)/f, −(i + ½ − H/2)/f, −1)`` in the
camera frame, with the focal length ``f = ½ H / tan(½ fovy)`` in pixels (fovy: the vertical field of view).
World directions are normalised, so the ray parameter t is a distance.

**Volume rendering** (nerfacc 0.5.3, dense ``[n_rays, n_samples]`` layout). [near, far] of each ray is cut into
S equal intervals ``[t_k, t_{k+1}]``; the field is evaluated once per interval at ``t_k + u (t_{k+1} − t_k)``
(u ~ U[0, 1) drawn from the generator: stratified sampling; u = ½ without one). With δ_k = t_{k+1} − t_k:
``α_k = 1 − exp(−σ_k δ_k)``, ``T_k = exp(−Σ_{j<k} σ_j δ_j)``, ``w_k = T_k α_k``; colour ``Σ w_k c_k +
(1 − A) c_bg``, opacity ``A = Σ w_k = 1 − exp(−Σ σ_k δ_k)``, depth ``Σ w_k (t_k + t_{k+1})/2 / max(A, eps)``
(nerfacc's normalised depth; 0 where nothing is hit). Differentiable in σ and c (not in t).

**Layouts** (:func:`rendering_layout`). ``"dense"`` (above) on every device; ``"packed"`` on CUDA when an
occupancy grid (:class:`msd.occupancy.OccupancyGrid`, nerfacc's ``OccGridEstimator``) is passed: the grid marches
each ray at a fixed step through its occupied cells only, and the samples come as one flat list with the index of
their ray (``ray_indices``, sorted), composited by nerfacc's packed ``rendering`` (the same quadrature, the field
evaluated at interval midpoints). nerfacc's packed scans (``pack_info``, ``exclusive_sum``) and its traversal need
its CUDA extension, so the packed layout exists on CUDA only; a CPU render never loads that extension. The field is
still called with ``[B, M, 3]`` points: :func:`group_by_view` puts view b's samples (rays b·N … b·N + N − 1) in row
b, padded to the longest row, so per-view lights and per-view scenes keep their meaning.

**Camera distribution** (:class:`CameraDistribution`): threestudio's ``RandomCameraDataModuleConfig`` defaults
and its prompt processor's view thresholds, in one place; :func:`sample_cameras` draws as its
``RandomCameraIterableDataset.collate`` does, :func:`view_indices` / :func:`view_prompts` label views as its
``PromptProcessor`` does (threestudio, Apache-2.0, commit 28d9d80: threestudio/data/uncond.py and
threestudio/models/prompt_processors/base.py; reimplemented here, not copied).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import nerfacc
import torch
import torch.nn.functional as F
from torch import Tensor

from msd.checks import require

if TYPE_CHECKING:
    from msd.occupancy import OccupancyGrid

# --- radiance fields -------------------------------------------------------------------------------------------


@runtime_checkable
class RadianceField(Protocol):
    """What the renderer calls. Points come as ``[B, M, 3]`` where row b holds samples of camera b's rays: a field
    shared by every view ignores the split, a batch of B scenes (one per view) uses row b for scene b.

    * ``density(points) -> [B, M]``: σ(p) ≥ 0, in 1 / world unit;
    * ``density_and_colour(points, light_positions) -> ([B, M], [B, M, 3])``: σ(p) and the emitted colour at p
      in [0, 1]; ``light_positions`` is one point light per view [B, 3], or None (the field's unlit colour).
    """

    def density(self, points: Tensor) -> Tensor: ...

    def density_and_colour(self, points: Tensor, light_positions: Tensor | None) -> tuple[Tensor, Tensor]: ...


# --- cameras and rays ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cameras:
    """B pinhole cameras of one image size.

    camera_to_world [B, 4, 4] (OpenGL camera frame, see the module docstring); fovy [B] (radians, vertical);
    light_positions [B, 3] (one point light per view); elevation_deg, azimuth_deg, distance [B]: the nominal
    spherical coordinates the camera was built from (before perturbation), which view prompts read.
    """

    camera_to_world: Tensor
    fovy: Tensor
    height: int
    width: int
    light_positions: Tensor
    elevation_deg: Tensor
    azimuth_deg: Tensor
    distance: Tensor

    def __post_init__(self):
        batch = self.camera_to_world.shape[0]
        require(self.camera_to_world.shape == (batch, 4, 4), "cameras.camera_to_world", "[B, 4, 4]",
                tuple(self.camera_to_world.shape))
        for name in ("fovy", "elevation_deg", "azimuth_deg", "distance"):
            require(getattr(self, name).shape == (batch,), f"cameras.{name}", f"[B] = [{batch}]",
                    tuple(getattr(self, name).shape))
        require(self.light_positions.shape == (batch, 3), "cameras.light_positions", f"[B, 3] = [{batch}, 3]",
                tuple(self.light_positions.shape))
        for name in ("height", "width"):
            require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, f"cameras.{name}",
                    "an integer >= 1 (pixels)", getattr(self, name))

    def __len__(self) -> int:
        return self.camera_to_world.shape[0]

    @property
    def positions(self) -> Tensor:
        """Camera centres in the world [B, 3]."""
        return self.camera_to_world[:, :3, 3]

    @property
    def focal_length(self) -> Tensor:
        """``f = ½ H / tan(½ fovy)`` [B], in pixels."""
        return 0.5 * self.height / torch.tan(0.5 * self.fovy)


@dataclass(frozen=True)
class Rays:
    """Rays grouped by view: origins and unit directions [B, N, 3]; light_positions [B, 3] or None."""

    origins: Tensor
    directions: Tensor
    light_positions: Tensor | None = None


def spherical_to_cartesian(elevation: Tensor, azimuth: Tensor, distance: Tensor) -> Tensor:
    """``r (cos e cos a, cos e sin a, sin e)`` [..., 3] (angles in radians; z up, azimuth from +x towards +y)."""
    return torch.stack([distance * torch.cos(elevation) * torch.cos(azimuth),
                        distance * torch.cos(elevation) * torch.sin(azimuth),
                        distance * torch.sin(elevation)], dim=-1)


def look_at(positions: Tensor, targets: Tensor, up: Tensor) -> Tensor:
    """Camera-to-world [B, 4, 4] of cameras at ``positions`` [B, 3] looking at ``targets`` [B, 3].

    ``look = normalise(target − position)``, ``right = normalise(look × up)``, ``up' = right × look``; the columns
    are (right, up', −look, position): the OpenGL camera frame. ``up`` must not be parallel to ``look``.
    """
    look = F.normalize(targets - positions, dim=-1)
    right = F.normalize(torch.cross(look, up, dim=-1), dim=-1)
    true_up = torch.cross(right, look, dim=-1)
    top = torch.cat([torch.stack([right, true_up, -look], dim=-1), positions.unsqueeze(-1)], dim=-1)
    bottom = torch.zeros_like(top[:, :1])
    bottom[:, 0, 3] = 1.0
    return torch.cat([top, bottom], dim=1)


def orbit_cameras(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor, fovy_deg: Tensor, height: int,
                  width: int, light_positions: Tensor | None = None) -> Cameras:
    """Unperturbed cameras looking at the origin, from tensors [B] (degrees, world units).

    The up vector is the tangent of increasing elevation, ``(−sin e cos a, −sin e sin a, cos e)``: the same frame
    as world up +z for |e| < 90°, and still defined straight above. The light sits at the camera (threestudio's
    evaluation views) unless ``light_positions`` [B, 3] is given.
    """
    elevation, azimuth = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    positions = spherical_to_cartesian(elevation, azimuth, distance)
    up = torch.stack([-torch.sin(elevation) * torch.cos(azimuth), -torch.sin(elevation) * torch.sin(azimuth),
                      torch.cos(elevation)], dim=-1)
    camera_to_world = look_at(positions, torch.zeros_like(positions), up)
    lights = positions if light_positions is None else light_positions
    return Cameras(camera_to_world, torch.deg2rad(fovy_deg), height, width, lights, elevation_deg, azimuth_deg,
                   distance)


def camera_rays(cameras: Cameras) -> Rays:
    """One ray per pixel centre: origins and unit directions [B, H·W, 3] (row-major, row 0 at the top)."""
    device, dtype = cameras.camera_to_world.device, cameras.camera_to_world.dtype
    rows = torch.arange(cameras.height, device=device, dtype=dtype) + 0.5
    cols = torch.arange(cameras.width, device=device, dtype=dtype) + 0.5
    y = -(rows - cameras.height / 2).view(1, -1, 1) / cameras.focal_length.view(-1, 1, 1)  # [B, H, 1]
    x = (cols - cameras.width / 2).view(1, 1, -1) / cameras.focal_length.view(-1, 1, 1)  # [B, 1, W]
    x, y = torch.broadcast_tensors(x, y)
    local = torch.stack([x, y, -torch.ones_like(x)], dim=-1).reshape(len(cameras), -1, 3)  # [B, H·W, 3]
    rotation = cameras.camera_to_world[:, :3, :3]
    directions = F.normalize(torch.einsum("bij,bnj->bni", rotation, local), dim=-1)
    origins = cameras.positions.unsqueeze(1).expand_as(directions)
    return Rays(origins, directions, cameras.light_positions)


# --- sampling along rays ---------------------------------------------------------------------------------------


def sphere_near_far(rays: Rays, radius: float, min_near: float = 0.0) -> tuple[Tensor, Tensor]:
    """[near, far] [B, N] of each ray inside the sphere ``|p| ≤ radius`` about the origin.

    ``|o + t d|² = radius²`` gives ``t = −o·d ± √((o·d)² − |o|² + radius²)``; both ends are clamped to
    ``≥ min_near`` (a camera inside the sphere starts at min_near). A ray that misses gets ``near = far``: an empty
    interval, rendered as background.
    """
    require(radius > 0, "radius", "> 0 (world units)", radius)
    along = (rays.origins * rays.directions).sum(-1)
    discriminant = along**2 - (rays.origins**2).sum(-1) + radius**2
    half_chord = torch.sqrt(discriminant.clamp(min=0.0))
    near = (-along - half_chord).clamp(min=min_near)
    far = (-along + half_chord).clamp(min=min_near)
    return near, torch.where(discriminant > 0, far, near)


@dataclass(frozen=True)
class RaySamples:
    """S intervals per ray, ``t_starts``, ``t_ends`` [..., S], and where the field is evaluated in each,
    ``t_points`` [..., S] (``t_starts ≤ t_points < t_ends``)."""

    t_starts: Tensor
    t_ends: Tensor
    t_points: Tensor


def stratified_samples(near: Tensor, far: Tensor, n_samples: int,
                       generator: torch.Generator | None = None) -> RaySamples:
    """Cut [near, far] ([...]) into ``n_samples`` equal intervals; evaluate each at a uniform random point
    (drawn from ``generator`` on near's device), or at its midpoint when ``generator`` is None."""
    require(isinstance(n_samples, int) and n_samples >= 1, "n_samples", "an integer >= 1", n_samples)
    fractions = torch.linspace(0.0, 1.0, n_samples + 1, device=near.device, dtype=near.dtype)
    edges = near.unsqueeze(-1) + (far - near).unsqueeze(-1) * fractions
    t_starts, t_ends = edges[..., :-1], edges[..., 1:]
    if generator is None:
        offsets = torch.full_like(t_starts, 0.5)
    else:
        offsets = torch.rand(t_starts.shape, generator=generator, device=near.device, dtype=near.dtype)
    return RaySamples(t_starts, t_ends, t_starts + offsets * (t_ends - t_starts))


# --- rendering -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderOutput:
    """rgb [B, N, 3] (the field's colours composited on the background), opacity [B, N], depth [B, N]
    (normalised by opacity), and per sample the rendering weights, the interval midpoints t_mid and the points
    where the field was evaluated (what per-sample regularisers such as the orientation loss of msd/fields.py
    evaluate normals at).

    * Dense layout (``ray_indices`` None): weights [B, N, S], t_mid [B, N, S], points [B, N, S, 3].
    * Packed layout: weights [P], t_mid [P], points [P, 3] and ``ray_indices`` [P], the flat ray ``b·N + n`` of each
      sample, non-decreasing (a ray's samples are contiguous and in order along it). :meth:`padded` gives the same
      render in the dense layout, which the regularisers of msd/fields.py take unchanged.
    """

    rgb: Tensor
    opacity: Tensor
    depth: Tensor
    weights: Tensor
    t_mid: Tensor
    points: Tensor
    ray_indices: Tensor | None = None

    @property
    def layout(self) -> str:
        """``"dense"`` or ``"packed"`` (see the class docstring)."""
        return "dense" if self.ray_indices is None else "packed"

    def images(self, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
        """(rgb [B, 3, H, W], opacity [B, 1, H, W], depth [B, 1, H, W]) of rays laid out by :func:`camera_rays`."""
        batch = self.rgb.shape[0]
        rgb = self.rgb.reshape(batch, height, width, 3).permute(0, 3, 1, 2)
        return rgb, self.opacity.reshape(batch, 1, height, width), self.depth.reshape(batch, 1, height, width)

    def padded(self) -> RenderOutput:
        """This render in the dense layout. S is the largest number of samples on one ray (at least 1); ray r's
        samples fill slots 0 … count_r − 1 in their order, and the rest is padding with weight 0, t_mid 0 and the
        point of the first sample (a real point, so that normals evaluated there stay finite: ``0 · NaN`` would not
        vanish). Every weighted sum over samples (colour, opacity, the orientation loss, z-variance) is unchanged,
        and gradients reach the packed weights. A dense render is returned as it is."""
        if self.ray_indices is None:
            return self
        batch, n_rays = self.opacity.shape
        slots, counts = segment_slots(self.ray_indices, batch * n_rays)
        width = max(int(counts.max()), 1)
        index = (self.ray_indices, slots)
        weights = self.weights.new_zeros(batch * n_rays, width).index_put(index, self.weights)
        t_mid = self.t_mid.new_zeros(batch * n_rays, width).index_put(index, self.t_mid)
        filler = self.points[:1] if len(self.points) else self.points.new_zeros(1, 3)
        points = filler.expand(batch * n_rays, width, 3).contiguous().index_put(index, self.points)
        return RenderOutput(self.rgb, self.opacity, self.depth, weights.view(batch, n_rays, width),
                            t_mid.view(batch, n_rays, width), points.view(batch, n_rays, width, 3))


LAYOUTS = ("dense", "packed")
"""The sample layouts: ``"dense"`` — S samples on every ray, [B·N, S]; ``"packed"`` — the samples an occupancy grid
keeps, one flat list with their ray indices (CUDA only)."""


def rendering_layout(device: torch.device, layout: str | None = None) -> str:
    """The sample layout the renderer uses on ``device``: ``layout`` if given, else ``"packed"`` on CUDA and
    ``"dense"`` on every other device.

    ``"dense"``: every ray gets the same number of samples, ``[n_rays, n_samples]``, and nerfacc's rendering runs in
    plain torch (its CUDA extension is never loaded): every device. ``"packed"``: nerfacc's occupancy-grid traversal
    and packed compositing, whose kernels are in that extension: CUDA only. The render functions take the packed
    path only when the layout is ``"packed"`` *and* an occupancy grid is passed; ``layout="dense"`` forces the dense
    path on CUDA (e.g. to compare with a CPU render).
    """
    if layout is None:
        return "packed" if device.type == "cuda" else "dense"
    require(layout in LAYOUTS, "layout", f"one of {LAYOUTS} or None (chosen by the device)", layout)
    require(layout == "dense" or device.type == "cuda", "layout",
            f"'dense' or None on a {device.type} device ('packed' needs nerfacc's CUDA extension)", layout)
    return layout


def segment_slots(indices: Tensor, n_segments: int) -> tuple[Tensor, Tensor]:
    """Positions within their segment of elements sorted by segment: ``indices`` [P] non-decreasing in
    [0, n_segments) → (slots [P], element k is the slots[k]-th of its segment; counts [n_segments]). Pure torch."""
    require(indices.dim() == 1 and not indices.is_floating_point(), "ray_indices", "integers of shape [P]",
            (tuple(indices.shape), indices.dtype))
    counts = torch.bincount(indices, minlength=n_segments)  # raises on a negative index
    if counts.numel() != n_segments or not bool((indices[1:] >= indices[:-1]).all()):
        require(False, "ray_indices", f"non-decreasing indices in [0, {n_segments}) (a ray's samples contiguous, "
                "rays in order)", f"{len(indices)} indices, max {int(indices.max())}")
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(len(indices), device=indices.device) - starts[indices], counts


@dataclass(frozen=True)
class ViewBatch:
    """Where P packed samples sit in the ``[B, M]`` batch a :class:`RadianceField` is called with: row ``views`` [P]
    (the view of the sample's ray), column ``slots`` [P]; M = ``width``, the most samples of one view."""

    views: Tensor
    slots: Tensor
    n_views: int
    width: int

    def scatter(self, values: Tensor) -> Tensor:
        """[P, ...] → [B, M, ...]: row b holds view b's values in their order; the padding repeats values[0] (zeros
        when P = 0), a real value, so that a field evaluated on it stays finite. Its outputs are dropped by
        :meth:`gather`."""
        filler = values[:1] if len(values) else values.new_zeros(1, *values.shape[1:])
        batch = filler.expand(self.n_views, self.width, *values.shape[1:]).contiguous()
        return batch.index_put((self.views, self.slots), values)

    def gather(self, batched: Tensor) -> Tensor:
        """[B, M, ...] → [P, ...], the inverse of :meth:`scatter` on the samples (differentiable)."""
        return batched[self.views, self.slots]


def group_by_view(ray_indices: Tensor, rays_per_view: int, n_views: int) -> ViewBatch:
    """Group packed samples by view for the field call: the sample on flat ray r belongs to view ``r // N`` (rays
    are flattened view by view, N = rays_per_view). ``ray_indices`` must be non-decreasing (nerfacc's order), so each
    view's samples are contiguous and keep their order in the row. Pure torch."""
    require(isinstance(rays_per_view, int) and rays_per_view >= 1, "rays_per_view", "an integer >= 1", rays_per_view)
    views = torch.div(ray_indices, rays_per_view, rounding_mode="floor")
    slots, counts = segment_slots(views, n_views)
    return ViewBatch(views, slots, n_views, max(int(counts.max()), 1))


def _check_rays(rays: Rays) -> tuple[int, int]:
    """(B, N) of rays [B, N, 3]."""
    origins, directions = rays.origins, rays.directions
    require(origins.dim() == 3 and origins.shape[-1] == 3 and directions.shape == origins.shape, "rays",
            "origins and directions of one shape [B, N, 3]", (tuple(origins.shape), tuple(directions.shape)))
    return origins.shape[0], origins.shape[1]


def _background(background: Tensor | Sequence[float] | None, rays: Rays) -> Tensor:
    """The background as [1, 3] or [B·N, 3] (None: black)."""
    batch, n_rays = rays.origins.shape[:2]
    origins = rays.origins
    if background is None:
        background = torch.zeros(3, dtype=origins.dtype, device=origins.device)
    background = torch.as_tensor(background, dtype=origins.dtype, device=origins.device)
    require(background.shape in ((3,), (batch, n_rays, 3)), "background", f"[3] or [B, N, 3] = [{batch}, {n_rays}, 3]",
            tuple(background.shape))
    return background.reshape(-1, 3)


def render_rays(field: RadianceField, rays: Rays, n_samples: int, near: Tensor | float, far: Tensor | float,
                background: Tensor | Sequence[float] | None = None, generator: torch.Generator | None = None, *,
                layout: str | None = None, estimator: OccupancyGrid | None = None) -> RenderOutput:
    """Volume-render ``field`` along ``rays`` [B, N] (module docstring for the quadrature).

    near, far: [B, N] or scalars (world units); background: an RGB colour [3] or one per ray [B, N, 3]
    (None: black); generator: the stratified jitter (None: interval midpoints, or no jitter of the packed march).

    layout: see :func:`rendering_layout` (None: by the rays' device). The packed path
    (:func:`render_rays_packed`) is taken when the layout is ``"packed"`` and ``estimator`` is given; n_samples is
    then unused (the grid marches at ``estimator.render_step_size``). Without an estimator the dense path runs on
    every device; asking for ``layout="packed"`` without one is an error. The dense path ignores the estimator.
    """
    _check_rays(rays)
    chosen = rendering_layout(rays.origins.device, layout)
    if chosen == "packed":
        if estimator is not None:
            return render_rays_packed(field, rays, near, far, estimator, background, generator)
        require(layout is None, "estimator", "an OccupancyGrid (msd.occupancy) when layout='packed' is asked for",
                estimator)
    return _render_rays_dense(field, rays, n_samples, near, far, background, generator)


def _render_rays_dense(field: RadianceField, rays: Rays, n_samples: int, near: Tensor | float, far: Tensor | float,
                       background: Tensor | Sequence[float] | None, generator: torch.Generator | None) -> RenderOutput:
    """The dense layout: ``n_samples`` stratified samples on every ray, nerfacc's batched rendering (plain torch)."""
    origins, directions = rays.origins, rays.directions
    batch, n_rays = _check_rays(rays)
    near = torch.as_tensor(near, dtype=origins.dtype, device=origins.device).expand(batch, n_rays)
    far = torch.as_tensor(far, dtype=origins.dtype, device=origins.device).expand(batch, n_rays)
    samples = stratified_samples(near, far, n_samples, generator)
    points = origins.unsqueeze(2) + samples.t_points.unsqueeze(-1) * directions.unsqueeze(2)  # [B, N, S, 3]

    def rgb_sigma_fn(t_starts, t_ends, ray_indices):
        sigmas, rgbs = field.density_and_colour(points.reshape(batch, -1, 3), rays.light_positions)
        return rgbs.reshape(batch * n_rays, n_samples, 3), sigmas.reshape(batch * n_rays, n_samples)

    rgb, opacity, depth, extras = nerfacc.rendering(
        samples.t_starts.reshape(batch * n_rays, n_samples), samples.t_ends.reshape(batch * n_rays, n_samples),
        rgb_sigma_fn=rgb_sigma_fn, render_bkgd=_background(background, rays))
    return RenderOutput(rgb=rgb.reshape(batch, n_rays, 3), opacity=opacity.reshape(batch, n_rays),
                        depth=depth.reshape(batch, n_rays), weights=extras["weights"].reshape(batch, n_rays, n_samples),
                        t_mid=0.5 * (samples.t_starts + samples.t_ends), points=points)


def packed_points(rays: Rays, ray_indices: Tensor, t: Tensor) -> Tensor:
    """Points [P, 3] at distance t [P] along the flat rays ``ray_indices`` [P] (flat index b·N + n)."""
    origins, directions = rays.origins.reshape(-1, 3), rays.directions.reshape(-1, 3)
    return origins[ray_indices] + t.unsqueeze(-1) * directions[ray_indices]


def render_packed_samples(field: RadianceField, rays: Rays, ray_indices: Tensor, t_starts: Tensor, t_ends: Tensor,
                          background: Tensor | Sequence[float] | None = None) -> RenderOutput:
    """Composite packed samples: intervals ``[t_starts, t_ends]`` [P] on the flat rays ``ray_indices`` [P]
    (``b·N + n`` into rays [B, N]; non-decreasing, as nerfacc's sampling returns them), the field evaluated at the
    midpoints, grouped by view (:func:`group_by_view`, lit by view b's light), composited by
    ``nerfacc.rendering(..., ray_indices=, n_rays=B·N)``. Rays without samples render as background. No samples at
    all become one zero-length sample on ray 0 (weight 0: threestudio's ``validate_empty_rays``), so that the
    output stays connected to the field's parameters. nerfacc's packed compositing needs its CUDA extension
    (``pack_info`` raises on CPU tensors in 0.5.3)."""
    batch, n_rays = _check_rays(rays)
    require(ray_indices.dim() == 1 and t_starts.shape == t_ends.shape == ray_indices.shape, "packed samples",
            "ray_indices, t_starts and t_ends of one shape [P]",
            (tuple(ray_indices.shape), tuple(t_starts.shape), tuple(t_ends.shape)))
    if len(ray_indices) == 0:
        ray_indices = torch.zeros(1, dtype=torch.long, device=ray_indices.device)
        t_starts = t_ends = torch.zeros(1, dtype=t_starts.dtype, device=t_starts.device)
    ray_indices = ray_indices.long()
    t_mid = 0.5 * (t_starts + t_ends)
    points = packed_points(rays, ray_indices, t_mid)
    views = group_by_view(ray_indices, n_rays, batch)

    def rgb_sigma_fn(t_starts, t_ends, ray_indices):
        sigmas, rgbs = field.density_and_colour(views.scatter(points), rays.light_positions)
        return views.gather(rgbs), views.gather(sigmas)

    rgb, opacity, depth, extras = nerfacc.rendering(t_starts, t_ends, ray_indices=ray_indices, n_rays=batch * n_rays,
                                                    rgb_sigma_fn=rgb_sigma_fn, render_bkgd=_background(background, rays))
    return RenderOutput(rgb=rgb.reshape(batch, n_rays, 3), opacity=opacity.reshape(batch, n_rays),
                        depth=depth.reshape(batch, n_rays), weights=extras["weights"], t_mid=t_mid, points=points,
                        ray_indices=ray_indices)


def render_rays_packed(field: RadianceField, rays: Rays, near: Tensor | float, far: Tensor | float,
                       estimator: OccupancyGrid, background: Tensor | Sequence[float] | None = None,
                       generator: torch.Generator | None = None) -> RenderOutput:
    """The packed layout (CUDA): the occupancy grid marches each ray through [near, far] ([B, N] or scalars) at its
    fixed step, skipping empty cells and, with pruning, samples of α below its threshold or behind transmittance
    10⁻⁴ (σ from ``field.density`` at the midpoints, grouped by view); the kept samples are composited by
    :func:`render_packed_samples`. ``generator`` shifts each ray's start by u·step, u ~ U[0, 1) (threestudio's
    ``stratified``); None: no shift. See :class:`msd.occupancy.OccupancyGrid` for the defaults."""
    batch, n_rays = _check_rays(rays)
    origins = rays.origins
    near = torch.as_tensor(near, dtype=origins.dtype, device=origins.device).expand(batch, n_rays).reshape(-1)
    far = torch.as_tensor(far, dtype=origins.dtype, device=origins.device).expand(batch, n_rays).reshape(-1)

    def sigma_fn(t_starts, t_ends, ray_indices):
        ray_indices = ray_indices.long()
        views = group_by_view(ray_indices, n_rays, batch)
        points = packed_points(rays, ray_indices, 0.5 * (t_starts + t_ends))
        return views.gather(field.density(views.scatter(points)))

    ray_indices, t_starts, t_ends = estimator.sample(origins.reshape(-1, 3), rays.directions.reshape(-1, 3), near, far,
                                                     sigma_fn, generator)
    return render_packed_samples(field, rays, ray_indices, t_starts, t_ends, background)


def render_cameras(field: RadianceField, cameras: Cameras, n_samples: int, scene_radius: float,
                   background: Tensor | Sequence[float] | None = None, generator: torch.Generator | None = None, *,
                   layout: str | None = None, estimator: OccupancyGrid | None = None) -> RenderOutput:
    """Render one image per camera: rays through every pixel centre, sampled inside the bounding sphere
    ``|p| ≤ scene_radius``, lit by ``cameras.light_positions``. ``.images(H, W)`` gives [B, C, H, W] tensors.
    layout, estimator: as :func:`render_rays` (the packed path when the layout is ``"packed"`` and an occupancy grid
    is given; its box [−r, r]³ must hold the sphere, r ≥ scene_radius)."""
    if estimator is not None:
        require(estimator.radius >= scene_radius, "estimator.radius",
                f">= scene_radius ({scene_radius}): the grid's box must hold the rendered sphere", estimator.radius)
    rays = camera_rays(cameras)
    near, far = sphere_near_far(rays, scene_radius)
    return render_rays(field, rays, n_samples, near, far, background, generator, layout=layout, estimator=estimator)


# --- the camera distribution and view prompts --------------------------------------------------------------------

VIEWS = ("side", "front", "back", "overhead")
"""View names in threestudio's order; :func:`view_indices` returns indices into this tuple."""


@dataclass(frozen=True)
class CameraDistribution:
    """threestudio's random cameras and view-dependent prompting; the defaults are threestudio's own
    (``RandomCameraDataModuleConfig`` in threestudio/data/uncond.py, ``PromptProcessor.Config`` in
    threestudio/models/prompt_processors/base.py, commit 28d9d80). Its DreamFusion-SD config overrides some:
    distance (1.5, 2.0), elevation (−10, 45), evaluation distance 2.0 (configs/dreamfusion-sd.yaml).

    Angles in degrees, lengths in world units. Per batch of B cameras:
    * elevation: with probability ½ (one coin per batch) uniform in degrees over ``elevation_range_deg``, else
      uniform on the sphere (sin e uniform over the same range);
    * azimuth: uniform over ``azimuth_range_deg``; with ``batch_uniform_azimuth`` stratified, camera k of B in the
      k-th of B equal strata;
    * distance and fovy uniform over their ranges;
    * position + U[−camera_perturb, camera_perturb]³, look-at target N(0, center_perturb² I), up vector
      +z + N(0, up_perturb² I);
    * light ("dreamfusion" strategy): direction ``normalise(position + N(0, light_position_perturb² I))``,
      distance U(light_distance_range);
    * evaluation views: elevation ``eval_elevation_deg``, distance ``eval_distance``, fovy ``eval_fovy_deg``.

    View prompts: "front" if the azimuth, shifted to [−180, 180), lies strictly within ±front_threshold_deg, "back"
    if strictly beyond 180 − back_threshold_deg in magnitude, "overhead" if the elevation is strictly above
    overhead_threshold_deg (overriding the others), "side" otherwise.
    """

    elevation_range_deg: tuple[float, float] = (-10.0, 90.0)
    azimuth_range_deg: tuple[float, float] = (-180.0, 180.0)
    distance_range: tuple[float, float] = (1.0, 1.5)
    fovy_range_deg: tuple[float, float] = (40.0, 70.0)
    camera_perturb: float = 0.1
    center_perturb: float = 0.2
    up_perturb: float = 0.02
    light_position_perturb: float = 1.0
    light_distance_range: tuple[float, float] = (0.8, 1.5)
    batch_uniform_azimuth: bool = True
    eval_elevation_deg: float = 15.0
    eval_distance: float = 1.5
    eval_fovy_deg: float = 70.0
    front_threshold_deg: float = 45.0
    back_threshold_deg: float = 45.0
    overhead_threshold_deg: float = 60.0

    def __post_init__(self):
        def ordered(name, low_bound, high_bound, allowed):
            low, high = getattr(self, name)
            require(low_bound <= low <= high <= high_bound, f"cameras.{name}", allowed, getattr(self, name))

        ordered("elevation_range_deg", -90.0, 90.0, "(low, high) with -90 <= low <= high <= 90 degrees")
        ordered("azimuth_range_deg", -math.inf, math.inf, "(low, high) with low <= high degrees")
        ordered("distance_range", 1e-6, math.inf, "(low, high) with 0 < low <= high")
        ordered("fovy_range_deg", 1e-6, 180.0 - 1e-6, "(low, high) with 0 < low <= high < 180 degrees")
        ordered("light_distance_range", 0.0, math.inf, "(low, high) with 0 <= low <= high")
        for name in ("camera_perturb", "center_perturb", "up_perturb", "light_position_perturb"):
            require(getattr(self, name) >= 0, f"cameras.{name}", ">= 0", getattr(self, name))
        require(0 < self.eval_fovy_deg < 180, "cameras.eval_fovy_deg", "in (0, 180) degrees", self.eval_fovy_deg)
        require(self.eval_distance > 0, "cameras.eval_distance", "> 0", self.eval_distance)
        for name in ("front_threshold_deg", "back_threshold_deg"):
            require(0 <= getattr(self, name) <= 180, f"cameras.{name}", "in [0, 180] degrees", getattr(self, name))


def sample_cameras(distribution: CameraDistribution, batch_size: int, height: int, width: int,
                   generator: torch.Generator) -> Cameras:
    """Draw ``batch_size`` training cameras from ``distribution`` (see its docstring), on the generator's device."""
    require(isinstance(batch_size, int) and batch_size >= 1, "batch_size", "an integer >= 1", batch_size)
    device, dist = generator.device, distribution

    def uniform(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=generator, device=device)

    b = batch_size
    low, high = (math.radians(v) for v in dist.elevation_range_deg)
    coin = torch.rand((), generator=generator, device=device)
    u = torch.rand(b, generator=generator, device=device)
    elevation = torch.where(coin < 0.5, low + (high - low) * u,
                            torch.asin(math.sin(low) + (math.sin(high) - math.sin(low)) * u))
    elevation_deg = torch.rad2deg(elevation)
    a_low, a_high = dist.azimuth_range_deg
    u = torch.rand(b, generator=generator, device=device)
    strata = (u + torch.arange(b, device=device)) / b if dist.batch_uniform_azimuth else u
    azimuth_deg = a_low + (a_high - a_low) * strata
    distance = uniform(b, *dist.distance_range)
    positions = spherical_to_cartesian(elevation, torch.deg2rad(azimuth_deg), distance)
    positions = positions + uniform((b, 3), -dist.camera_perturb, dist.camera_perturb)
    targets = dist.center_perturb * torch.randn(b, 3, generator=generator, device=device)
    up = torch.tensor([0.0, 0.0, 1.0], device=device) + dist.up_perturb * torch.randn(b, 3, generator=generator,
                                                                                       device=device)
    fovy_deg = uniform(b, *dist.fovy_range_deg)
    light_distance = uniform(b, *dist.light_distance_range)
    light_direction = F.normalize(positions + dist.light_position_perturb * torch.randn(b, 3, generator=generator,
                                                                                         device=device), dim=-1)
    return Cameras(look_at(positions, targets, up), torch.deg2rad(fovy_deg), height, width,
                   light_direction * light_distance.unsqueeze(-1), elevation_deg, azimuth_deg, distance)


def evaluation_cameras(distribution: CameraDistribution, n_views: int, height: int, width: int,
                       device: torch.device) -> Cameras:
    """``n_views`` turntable cameras: azimuths 0, 360/n, …, at the distribution's evaluation elevation, distance and
    fovy, light at the camera (threestudio's validation views)."""
    require(isinstance(n_views, int) and n_views >= 1, "n_views", "an integer >= 1", n_views)
    azimuth_deg = torch.arange(n_views, device=device, dtype=torch.float32) * (360.0 / n_views)

    def full(value):
        return torch.full_like(azimuth_deg, value)

    return orbit_cameras(full(distribution.eval_elevation_deg), azimuth_deg, full(distribution.eval_distance),
                         full(distribution.eval_fovy_deg), height, width)


def shift_azimuth_deg(azimuth_deg: Tensor) -> Tensor:
    """Azimuth wrapped to [−180, 180): ``(a + 180) mod 360 − 180``."""
    return torch.remainder(azimuth_deg + 180.0, 360.0) - 180.0


def view_indices(elevation_deg: Tensor, azimuth_deg: Tensor, distribution: CameraDistribution) -> Tensor:
    """Index into :data:`VIEWS` per camera [B] (the thresholds of :class:`CameraDistribution`; later rules win)."""
    azimuth = shift_azimuth_deg(azimuth_deg)
    index = torch.zeros(azimuth.shape, dtype=torch.long, device=azimuth.device)  # side
    front = (azimuth > -distribution.front_threshold_deg) & (azimuth < distribution.front_threshold_deg)
    back = (azimuth > 180.0 - distribution.back_threshold_deg) | (azimuth < -180.0 + distribution.back_threshold_deg)
    index = torch.where(front, VIEWS.index("front"), index)
    index = torch.where(back, VIEWS.index("back"), index)
    return torch.where(elevation_deg > distribution.overhead_threshold_deg, VIEWS.index("overhead"), index)


def view_prompts(prompts: str | Sequence[str], elevation_deg: Tensor, azimuth_deg: Tensor,
                 distribution: CameraDistribution) -> list[str]:
    """threestudio's view-dependent prompts ``"<prompt>, <view> view"``, one per camera; ``prompts`` is one prompt
    for every camera or one per camera."""
    indices = view_indices(elevation_deg, azimuth_deg, distribution).tolist()
    prompts = [prompts] * len(indices) if isinstance(prompts, str) else list(prompts)
    require(len(prompts) == len(indices), "prompts", f"one prompt or one per camera ({len(indices)})", len(prompts))
    return [f"{prompt}, {VIEWS[i]} view" for prompt, i in zip(prompts, indices)]

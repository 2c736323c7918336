"""The packed rendering layout (docs/design.md §10.2): msd/rendering.py's packed path and msd/occupancy.py.

On the CPU (no nerfacc CUDA extension): the layout chosen per device and its validation; the pure-torch bookkeeping
that maps packed samples to views and back (:func:`group_by_view`) and to the dense layout (``RenderOutput.padded``);
packed compositing against the dense renderer, with nerfacc's two packed scans (``pack_info`` and the packed
``exclusive_sum``, CUDA kernels in nerfacc 0.5.3: ``pack_info`` raises ``NotImplementedError`` on CPU tensors) swapped
for torch equivalents in :func:`torch_packed_scans`, everything else nerfacc's own code; the occupancy update against
nerfacc's ``_update`` (bitwise, with the global RNG seeded like the generator); the device contract; and a CPU render
with an occupancy grid that stays dense and never loads nerfacc's CUDA backend.

On CUDA (skipped without a GPU; the same checks run in ``python -m tests.cuda_smoke``): a constant-density sphere
rendered through the occupancy grid against ``1 − exp(−σ·chord)`` and the dense renderer, with gradients; several
views with their own lights against the dense renderer; the occupancy update, regularisers through ``padded()``
and gradients of a voxel-grid field, under the device contract.
"""
from __future__ import annotations

import dataclasses
import math

import nerfacc
import nerfacc.volrend
import pytest
import torch
from torch import Tensor

from msd.fields import RegulariserWeights, ScheduledWeight, VoxelGridField, regularisation, z_variance_loss
from msd.occupancy import OccupancyGrid
from msd.rendering import (
    CameraDistribution,
    Rays,
    camera_rays,
    evaluation_cameras,
    group_by_view,
    render_cameras,
    render_packed_samples,
    render_rays,
    rendering_layout,
    segment_slots,
    sphere_near_far,
    stratified_samples,
)
from tests.test_device_contract import DrawRecorder, contract_violations
from tests.test_rendering import (
    BOUND,
    IMPACT,
    RADIUS,
    ConstantSphere,
    no_nerfacc_cuda,  # noqa: F401  (a fixture: blocks nerfacc's CUDA backend)
    rays_at_impacts,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the packed layout needs nerfacc's CUDA extension")


class LitSphere(ConstantSphere):
    """A constant-density sphere whose colour depends on the view's light: ``sigmoid(k ⊙ (p · l_b))`` with
    k = (4, −2, 1) and l_b the light of view b. A render that lit a sample with another view's light differs."""

    def density_and_colour(self, points, light_positions):
        along = (points * light_positions.unsqueeze(1)).sum(-1, keepdim=True)  # [B, M, 1]
        scale = torch.tensor([4.0, -2.0, 1.0], dtype=points.dtype, device=points.device)
        return self.density(points), torch.sigmoid(along * scale) * self.rgb


def two_view_rays(device: torch.device | str = "cpu") -> Rays:
    """Rays [2, 6]: view 0 at the IMPACT distances, view 1 at others (two misses), in other generic directions; the
    views' lights far apart."""
    first, _ = rays_at_impacts(IMPACT, seed=0)
    second, _ = rays_at_impacts((0.7, 0.1, 0.3, 0.0, 0.55, 0.4), seed=1)
    lights = torch.tensor([[2.0, 0.5, 1.0], [-1.0, -2.0, 0.5]])
    return Rays(torch.cat([first.origins, second.origins]).to(device),
                torch.cat([first.directions, second.directions]).to(device), lights.to(device))


def swap_lights(rays: Rays) -> Rays:
    return Rays(rays.origins, rays.directions, rays.light_positions.flip(0))


def to_device(rays: Rays, device) -> Rays:
    lights = None if rays.light_positions is None else rays.light_positions.to(device)
    return Rays(rays.origins.to(device), rays.directions.to(device), lights)


@pytest.fixture
def torch_packed_scans(monkeypatch):
    """nerfacc 0.5.3's packed scans in plain torch, for CPU tests of its packed ``rendering``: ``pack_info`` (which
    raises on CPU tensors) and ``exclusive_sum`` with ``packed_info`` (a CUDA kernel). The exclusive sum within each
    ray is the global exclusive cumsum minus its value at the ray's first sample."""
    original = nerfacc.volrend.exclusive_sum

    def pack_info(ray_indices: Tensor, n_rays: int | None = None) -> Tensor:
        counts = torch.bincount(ray_indices, minlength=n_rays or 0)
        return torch.stack([torch.cumsum(counts, 0) - counts, counts], dim=-1)

    def exclusive_sum(inputs: Tensor, packed_info: Tensor | None = None) -> Tensor:
        if packed_info is None:
            return original(inputs)
        starts, counts = packed_info.unbind(-1)
        exclusive = torch.cumsum(inputs, 0) - inputs
        ray = torch.repeat_interleave(torch.arange(len(counts)), counts)
        return exclusive - exclusive[starts[ray]]

    monkeypatch.setattr(nerfacc.volrend, "pack_info", pack_info)
    monkeypatch.setattr(nerfacc.volrend, "exclusive_sum", exclusive_sum)


# --- the layout --------------------------------------------------------------------------------------------------

def test_the_layout_is_packed_on_cuda_dense_elsewhere_and_can_be_forced_dense():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only: nothing is allocated
    assert rendering_layout(cuda) == rendering_layout(torch.device("cuda", 1)) == "packed"
    assert rendering_layout(cpu) == rendering_layout(torch.device("meta")) == "dense"
    assert rendering_layout(cuda, "dense") == "dense" and rendering_layout(cuda, "packed") == "packed"
    assert rendering_layout(cpu, "dense") == "dense"
    with pytest.raises(ValueError, match=r"layout must be one of \('dense', 'packed'\) or None"):
        rendering_layout(cuda, "sparse")
    with pytest.raises(ValueError, match="layout must be 'dense' or None on a cpu device"):
        rendering_layout(cpu, "packed")


def test_render_functions_validate_the_layout_and_the_grid():
    rays, _ = rays_at_impacts(IMPACT)
    field = ConstantSphere(3.0)
    for layout in ("packed", "sparse"):
        with pytest.raises(ValueError, match="layout must be"):
            render_rays(field, rays, 8, 0.0, 3.0, layout=layout)
    cameras = evaluation_cameras(CameraDistribution(), 1, 4, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"estimator.radius must be >= scene_radius \(1.0\)"):
        render_cameras(field, cameras, 8, 1.0, estimator=OccupancyGrid(radius=0.5))
    for name, kwargs in (("occupancy.resolution", {"resolution": 0}), ("occupancy.radius", {"radius": -1.0}),
                         ("occupancy.alpha_threshold", {"alpha_threshold": 1.5})):
        with pytest.raises(ValueError, match=name):
            OccupancyGrid(**kwargs)


# --- the bookkeeping (pure torch) --------------------------------------------------------------------------------

def test_packed_samples_map_to_view_rows_and_back():
    """Rays per view N = 3, three views: view 0 holds 3 samples, view 1 four, view 2 none."""
    ray_indices = torch.tensor([0, 0, 1, 4, 4, 4, 5])
    batch = group_by_view(ray_indices, rays_per_view=3, n_views=3)
    assert batch.views.tolist() == [0, 0, 0, 1, 1, 1, 1] and batch.slots.tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert batch.width == 4
    values = torch.arange(1.0, 8.0).unsqueeze(-1) * torch.tensor([1.0, 10.0])  # [P, 2]
    rows = batch.scatter(values)
    assert rows.shape == (3, 4, 2)
    assert rows[0, :3, 0].tolist() == [1, 2, 3] and rows[1, :, 0].tolist() == [4, 5, 6, 7]
    assert (rows[0, 3] == values[0]).all() and (rows[2] == values[0]).all()  # padding: a real value
    assert torch.equal(batch.gather(rows), values)
    slots, counts = segment_slots(ray_indices, 6)
    assert slots.tolist() == [0, 1, 0, 0, 1, 2, 0] and counts.tolist() == [2, 1, 0, 0, 3, 1]
    with pytest.raises(ValueError, match="ray_indices must be non-decreasing"):
        segment_slots(torch.tensor([0, 2, 1]), 3)
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        segment_slots(torch.tensor([0, 1, 3]), 3)
    empty = group_by_view(torch.zeros(0, dtype=torch.long), 3, 2)
    assert empty.width == 1 and empty.scatter(torch.zeros(0, 3)).shape == (2, 1, 3)


def dense_as_packed(rays: Rays, n_samples: int):
    """The dense midpoint samples of :func:`render_rays` as a packed list, keeping only the samples with δ > 0 inside
    the sphere |p| < RADIUS: every other sample has σδ = 0, so dropping it changes no weight. Rays that miss keep no
    sample, and the views keep different numbers."""
    near, far = sphere_near_far(rays, BOUND)
    samples = stratified_samples(near, far, n_samples)
    batch, n_rays = near.shape
    points = rays.origins.unsqueeze(2) + samples.t_points.unsqueeze(-1) * rays.directions.unsqueeze(2)
    keep = ((samples.t_ends > samples.t_starts) & (points.norm(dim=-1) < RADIUS)).reshape(-1)
    ray_indices = torch.arange(batch * n_rays).repeat_interleave(n_samples)
    return (near, far, ray_indices[keep], samples.t_starts.reshape(-1)[keep], samples.t_ends.reshape(-1)[keep],
            keep.view(batch, n_rays, n_samples))


@pytest.mark.usefixtures("no_nerfacc_cuda")
def test_packed_compositing_matches_the_dense_renderer_view_by_view(torch_packed_scans):
    """Two views of six rays with their own lights, 64 samples: the packed render of the kept samples (nerfacc's
    packed ``rendering``, torch scans) equals the dense render; so do its weights, placed by ``padded()``, the
    z-variance of the padded render and the gradients. With the lights swapped the colours differ."""
    rays, n_samples = two_view_rays(), 64
    background = torch.tensor([0.5, 0.2, 0.7])
    near, far, ray_indices, t_starts, t_ends, keep = dense_as_packed(rays, n_samples)
    counts = torch.bincount(ray_indices, minlength=12)
    assert (counts == 0).sum() >= 3 and counts[:6].sum() != counts[6:].sum()  # misses; views of unequal sizes
    field, reference = LitSphere(3.0), LitSphere(3.0)
    dense = render_rays(reference, rays, n_samples, near, far, background)
    packed = render_packed_samples(field, rays, ray_indices, t_starts, t_ends, background)
    assert packed.layout == "packed" and dense.layout == "dense"
    for name in ("rgb", "opacity", "depth"):
        torch.testing.assert_close(getattr(packed, name), getattr(dense, name), rtol=0, atol=2e-6)
    assert packed.opacity.max() > 0.9 and (packed.opacity[counts.view(2, 6) == 0] == 0).all()
    torch.testing.assert_close(packed.weights, dense.weights[keep], rtol=0, atol=1e-6)
    torch.testing.assert_close(packed.points, dense.points[keep])

    padded = packed.padded()
    assert padded.layout == "dense" and padded.weights.shape[:2] == (2, 6) and padded.weights.shape[2] == counts.max()
    torch.testing.assert_close(padded.weights.sum(-1), dense.weights.sum(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(z_variance_loss(padded.weights, padded.t_mid, padded.opacity),
                               z_variance_loss(dense.weights, dense.t_mid, dense.opacity), rtol=1e-5, atol=1e-7)
    assert torch.isfinite(padded.points).all() and dense.padded() is dense

    (packed.rgb.sum() + packed.opacity.sum() + packed.depth.sum()).backward()
    (dense.rgb.sum() + dense.opacity.sum() + dense.depth.sum()).backward()
    torch.testing.assert_close(field.sigma.grad, reference.sigma.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(field.rgb.grad, reference.rgb.grad, rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        swapped = render_packed_samples(field, swap_lights(rays), ray_indices, t_starts, t_ends, background)
    assert (swapped.rgb - packed.rgb).abs().max() > 0.1


def test_no_packed_samples_render_the_background_and_stay_connected(torch_packed_scans):
    rays, _ = rays_at_impacts(IMPACT)
    field = ConstantSphere(3.0)
    empty = torch.zeros(0)
    out = render_packed_samples(field, rays, empty.long(), empty, empty, [0.1, 0.2, 0.3])
    torch.testing.assert_close(out.rgb, torch.tensor([0.1, 0.2, 0.3]).expand(1, len(IMPACT), 3))
    assert (out.opacity == 0).all() and out.weights.tolist() == [0.0]
    out.rgb.sum().backward()  # the zero-length sample keeps the graph: no "does not require grad"
    assert field.sigma.grad == 0


# --- the occupancy grid ------------------------------------------------------------------------------------------

def test_occupancy_update_is_nerfaccs_update_drawn_from_the_generator():
    """Two levels of 8³ cells, warm-up until step 32: steps 0 and 16 visit every cell, 32 and 48 draw uniform and
    occupied cells. Each update equals nerfacc's own ``_update`` bitwise when the global RNG is seeded like the
    generator; it draws only from the generator, on its device, and leaves the global RNG alone."""
    field = ConstantSphere(3.0, radius=0.8)  # a quarter of level 0's cells: the occupied-cell draw is exercised
    grid = OccupancyGrid(resolution=8, levels=2, warmup_steps=32)
    reference = nerfacc.OccGridEstimator(roi_aabb=[-1.0] * 3 + [1.0] * 3, resolution=8, levels=2)
    step_size = grid.render_step_size
    assert step_size == 1.732 * 2 / 512

    def occ_eval_fn(x):
        return field.density(x.unsqueeze(0))[0] * step_size

    assert grid.estimator.binaries.all() and (grid.estimator.occs == 0).all()  # a fresh grid: all occupied
    state = torch.get_rng_state()
    for step in (0, 16, 32, 48):
        reference.load_state_dict(grid.estimator.state_dict())
        if step == 32:
            assert grid.estimator.binaries[0].sum() > 8**3 // 4  # nerfacc subsamples the occupied cells
        with DrawRecorder() as recorder, torch.no_grad():
            assert grid.update(step, field, torch.Generator().manual_seed(step + 1))
        assert not contract_violations(recorder.draws, "cpu") and len(recorder.draws) >= 2
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step + 1)
            reference._update(step, occ_eval_fn, occ_thre=0.01, ema_decay=0.95, warmup_steps=32)
        assert torch.equal(grid.estimator.occs, reference.occs), step
        assert torch.equal(grid.estimator.binaries, reference.binaries), step
    assert torch.equal(state, torch.get_rng_state())
    before = grid.estimator.occs.clone()
    assert not grid.update(50, field, torch.Generator())  # not an update step
    assert not OccupancyGrid(prune=False).update(0, field, torch.Generator())
    assert torch.equal(before, grid.estimator.occs)


def cell_centres(grid: OccupancyGrid, level: int = 0) -> Tensor:
    """World positions [cells, 3] of one level's cell centres, in the order of its occupancy values."""
    estimator = grid.estimator
    low, high = estimator.aabbs[level, :3], estimator.aabbs[level, 3:]
    return low + (estimator.grid_coords + 0.5) / estimator.resolution * (high - low)


def sphere_cells(grid: OccupancyGrid, radius: float) -> tuple[Tensor, Tensor]:
    """Level 0's cells wholly inside and wholly outside the sphere |p| < radius ([cells] masks)."""
    half_diagonal = math.sqrt(3) * grid.radius / grid.estimator.resolution[0].item()
    distance = cell_centres(grid).norm(dim=-1)
    return distance < radius - half_diagonal, distance > radius + half_diagonal


def test_the_occupancy_grid_marks_a_sphere_and_round_trips_its_state():
    """After the first update, every cell wholly inside a σ = 3 sphere is occupied (σ·step = 0.02 > the threshold
    ≤ 0.01) and every cell wholly outside is empty (0 > threshold). The state dict restores occs and binaries."""
    field = ConstantSphere(3.0)
    grid = OccupancyGrid(resolution=16)
    generator = torch.Generator().manual_seed(0)
    for step in (0, 16, 32):
        grid.update(step, field, generator)
    inside, outside = sphere_cells(grid, RADIUS)
    binaries = grid.estimator.binaries.view(-1)
    assert binaries[inside].all() and not binaries[outside].any()
    assert 0.05 < grid.occupied_fraction < 0.15  # the sphere fills π/48 ≈ 0.065 of the box
    restored = OccupancyGrid(resolution=16)
    restored.load_state_dict(grid.state_dict())
    assert {"estimator.occs", "estimator.binaries"} <= set(grid.state_dict())
    assert torch.equal(restored.estimator.occs, grid.estimator.occs)
    assert torch.equal(restored.estimator.binaries, grid.estimator.binaries)


@pytest.mark.usefixtures("no_nerfacc_cuda")
def test_a_cpu_render_with_an_occupancy_grid_is_dense_and_never_touches_nerfacc_cuda():
    """On the CPU the grid is ignored by the renderer (bitwise the render without it) and its update runs in torch."""
    field = ConstantSphere(3.0)
    grid = OccupancyGrid()
    assert grid.update(0, field, torch.Generator().manual_seed(0))
    cameras = evaluation_cameras(CameraDistribution(), 2, 8, 8, torch.device("cpu"))
    kwargs = {"background": [0.5, 0.5, 0.5]}
    out = render_cameras(field, cameras, 16, BOUND, generator=torch.Generator().manual_seed(0), estimator=grid,
                         **kwargs)
    plain = render_cameras(field, cameras, 16, BOUND, generator=torch.Generator().manual_seed(0), **kwargs)
    forced = render_cameras(field, cameras, 16, BOUND, generator=torch.Generator().manual_seed(0), layout="dense",
                            estimator=grid, **kwargs)
    assert out.layout == "dense" and torch.equal(out.rgb, plain.rgb) and torch.equal(forced.rgb, plain.rgb)
    (out.rgb.sum() + out.opacity.sum()).backward()
    assert field.sigma.grad is not None and field.rgb.grad.abs().sum() > 0


# --- CUDA: the packed path end to end (also run by tests/cuda_smoke.py) --------------------------------------------

def mark_sphere(grid: OccupancyGrid, sigma: float, radius: float) -> None:
    """Mark exactly the cells that meet the sphere |p| < radius (deterministic; the update is checked on its own),
    with the occupancy σ·step that an update would give them."""
    occupied = ~sphere_cells(grid, radius)[1]
    grid.estimator.binaries.copy_(occupied.view(grid.estimator.binaries.shape))
    grid.estimator.occs.copy_(occupied.float() * sigma * grid.render_step_size)


def check_packed_sphere(device: torch.device) -> str:
    """A constant-density sphere (σ = 3, radius ½) through the occupancy grid (threestudio's 512 samples per ray):
    opacity within 2σ·step (+ 2·10⁻⁴ for early stopping) of 1 − exp(−σ·chord), and of the dense render (512
    samples), with and without jitter; the miss stays empty; dA/dσ = Σ (τ/σ) e^{−τ} and d rgb/d colour = Σ A."""
    sigma = 3.0
    field = ConstantSphere(sigma).to(device)
    rays, chords = rays_at_impacts(IMPACT)
    rays, chords = to_device(rays, device), chords.to(device)
    near, far = sphere_near_far(rays, BOUND)
    grid = OccupancyGrid(radius=BOUND, device=device)
    mark_sphere(grid, sigma, RADIUS)
    exact = 1 - torch.exp(-sigma * chords)
    tolerance = 2 * sigma * grid.render_step_size + 2e-4
    dense_tolerance = tolerance + 2 * sigma * (far - near)[0] / 512
    with torch.no_grad():
        dense = render_rays(field, rays, 512, near, far, layout="dense")
    errors = []
    for generator in (None, torch.Generator(device).manual_seed(0)):
        with torch.no_grad():
            packed = render_rays(field, rays, 512, near, far, generator=generator, estimator=grid)
        assert packed.layout == "packed" and packed.ray_indices.device.type == device.type
        error = (packed.opacity[0] - exact).abs()
        assert (error <= tolerance).all(), (error, tolerance)
        assert ((packed.opacity - dense.opacity).abs()[0] <= dense_tolerance).all()
        assert packed.opacity[0, -1] == 0 and (packed.ray_indices != len(IMPACT) - 1).all()
        errors.append(error.max().item())
    out = render_rays(field, rays, 512, near, far, estimator=grid)
    out.opacity.sum().backward()
    tau = -torch.log1p(-out.opacity.detach())
    torch.testing.assert_close(field.sigma.grad, (tau / sigma * torch.exp(-tau)).sum(), rtol=1e-3, atol=1e-5)
    field.zero_grad()
    out = render_rays(field, rays, 512, near, far, estimator=grid)
    out.rgb[..., 1].sum().backward()
    torch.testing.assert_close(field.rgb.grad[1], out.opacity.detach().sum(), rtol=1e-4, atol=1e-5)
    return (f"max |A - closed form| {errors[0]:.2e} (midpoints), {errors[1]:.2e} (jittered), tolerance {tolerance:.2e}; "
            f"{len(out.ray_indices)} samples on {len(IMPACT)} rays")


def check_packed_views(device: torch.device) -> str:
    """Three turntable views (24 px, light at each camera) of a sphere lit per view: the packed render matches the
    dense one (mean |Δrgb| < 2·10⁻³, max below the rim's 2σ(δ_packed + δ_dense) + 0.01), while the render with the
    lights rolled by one view is far off; gradients reach σ and the colour."""
    sigma = 3.0
    field = LitSphere(sigma).to(device)
    cameras = evaluation_cameras(CameraDistribution(), 3, 24, 24, device)
    grid = OccupancyGrid(radius=BOUND, device=device)
    mark_sphere(grid, sigma, RADIUS)
    background = [0.5, 0.5, 0.5]
    packed = render_cameras(field, cameras, 512, BOUND, background, estimator=grid)
    with torch.no_grad():
        dense = render_cameras(field, cameras, 512, BOUND, background, layout="dense")
        rolled = dataclasses.replace(cameras, light_positions=cameras.light_positions.roll(1, 0))
        wrong = render_cameras(field, rolled, 512, BOUND, background, estimator=grid)
    difference = (packed.rgb.detach() - dense.rgb).abs()
    rim = 2 * sigma * (grid.render_step_size + 2 * BOUND / 512) + 0.01
    assert packed.layout == "packed" and difference.mean() < 2e-3 and difference.max() < rim, (difference.mean(),
                                                                                                difference.max())
    wrong_difference = (wrong.rgb - dense.rgb).abs().mean()
    assert wrong_difference > 10 * difference.mean(), wrong_difference
    (packed.rgb.sum() + packed.opacity.sum()).backward()
    assert field.sigma.grad.abs() > 0 and field.rgb.grad.abs().min() > 0
    return (f"mean |rgb packed - dense| {difference.mean():.2e}, max {difference.max():.2e}; lights rolled "
            f"{wrong_difference:.2e}; {len(packed.ray_indices)} samples")


def check_occupancy_grid(device: torch.device) -> str:
    """A voxel-grid field (its Magic3D blob) on ``device``: updates at steps 0, 16, 32 from one generator on the device
    (the blob's core occupied, the corners empty), a jittered packed render of two views, the orientation and
    z-variance regularisers through ``padded()``, gradients in all four grid channels; every draw from the generator
    on its device, the global RNGs untouched; the state dict restores the grid."""
    generator = torch.Generator(device).manual_seed(0)
    field = VoxelGridField(resolution=32, device=device)
    grid = OccupancyGrid(device=device)
    cameras = evaluation_cameras(CameraDistribution(), 2, 16, 16, device)
    weights = RegulariserWeights(z_variance=ScheduledWeight.constant(1.0))
    states = [torch.get_rng_state()] + (torch.cuda.get_rng_state_all() if device.type == "cuda" else [])
    with DrawRecorder() as recorder:
        updated = [grid.update(step, field, generator) for step in (0, 16, 32)]
        out = render_cameras(field, cameras, 512, 1.0, [1.0, 1.0, 1.0], generator, estimator=grid)
    assert all(updated)
    assert not contract_violations(recorder.draws, device), contract_violations(recorder.draws, device)
    after = [torch.get_rng_state()] + (torch.cuda.get_rng_state_all() if device.type == "cuda" else [])
    assert all(torch.equal(a, b) for a, b in zip(states, after, strict=True)), "the global RNG moved"
    binaries = grid.estimator.binaries.view(-1)
    distance = cell_centres(grid).norm(dim=-1)
    assert binaries[distance < 0.2].all() and not binaries[distance > 1.6].any()
    loss, terms = regularisation(field, out.padded(), camera_rays(cameras).directions, weights, step=0)
    assert set(terms) == {"orient", "sparsity", "z_variance"} and torch.isfinite(loss)
    (loss + out.rgb.mean()).backward()
    grad = field.grid.grad
    assert torch.isfinite(grad).all() and all(grad[c].abs().sum() > 0 for c in range(4))
    restored = OccupancyGrid(device=device)
    restored.load_state_dict(grid.state_dict())
    assert torch.equal(restored.estimator.binaries, grid.estimator.binaries)
    return (f"occupied {grid.occupied_fraction:.3f} of the cells, {len(out.ray_indices)} samples, "
            f"{len(recorder.draws)} draws; " + ", ".join(f"{k} {v.item():.3g}" for k, v in terms.items()))


@CUDA
def test_packed_sphere_on_cuda_matches_the_closed_form_and_the_dense_render():
    check_packed_sphere(torch.device("cuda"))


@CUDA
def test_packed_views_on_cuda_are_lit_by_their_own_lights():
    check_packed_views(torch.device("cuda"))


@CUDA
def test_occupancy_grid_on_cuda_updates_renders_and_regularises_under_the_device_contract():
    check_occupancy_grid(torch.device("cuda"))

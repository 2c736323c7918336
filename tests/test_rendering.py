"""msd/rendering.py (docs/design.md §10): the volume renderer against closed forms, the cameras and their rays,
threestudio's camera distribution and view prompts, the device contract, and no nerfacc CUDA backend on the CPU."""
from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.utils.cpp_extension
from torch import Tensor, nn

from msd.rendering import (
    VIEWS,
    CameraDistribution,
    RadianceField,
    Rays,
    camera_rays,
    evaluation_cameras,
    orbit_cameras,
    render_cameras,
    render_rays,
    rendering_layout,
    sample_cameras,
    sphere_near_far,
    stratified_samples,
    view_indices,
    view_prompts,
)
from tests.test_device_contract import DrawRecorder, contract_violations

RADIUS = 0.5  # of the constant-density sphere
BOUND = 1.0  # rays are sampled inside |p| <= BOUND, so the sphere's boundary falls inside the intervals
IMPACT = (0.0, 0.2, 0.35, 0.45, 0.499, 0.6)  # ray-centre distances: through the centre ... tangent-ish, a miss


class ConstantSphere(nn.Module):
    """σ = sigma inside |p| < radius, 0 outside; a constant colour."""

    def __init__(self, sigma: float, colour=(0.2, 0.5, 0.9), radius: float = RADIUS, dtype=torch.float32):
        super().__init__()
        self.sigma = nn.Parameter(torch.tensor(sigma, dtype=dtype))
        self.rgb = nn.Parameter(torch.tensor(colour, dtype=dtype))
        self.radius = radius

    def density(self, points: Tensor) -> Tensor:
        return self.sigma * (torch.linalg.vector_norm(points, dim=-1) < self.radius).to(points.dtype)

    def density_and_colour(self, points, light_positions):
        return self.density(points), self.rgb.expand(*points.shape[:-1], 3)


class SmoothBlob:
    """σ = sigma · exp(−|p|²/(2 · 0.3²)) and a constant colour, from plain tensors: smooth, for gradcheck."""

    def __init__(self, sigma: Tensor, rgb: Tensor):
        self.sigma, self.rgb = sigma, rgb

    def density(self, points: Tensor) -> Tensor:
        return self.sigma * torch.exp(-(points**2).sum(-1) / (2 * 0.3**2))

    def density_and_colour(self, points, light_positions):
        return self.density(points), self.rgb.expand(*points.shape[:-1], 3)


def rays_at_impacts(impacts, dtype=torch.float32, seed: int = 0) -> tuple[Rays, Tensor]:
    """Rays [1, N] in generic directions passing the origin at the given distances, and their exact chords
    through the sphere of radius RADIUS."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(len(impacts), 3, generator=g, dtype=dtype), dim=-1)
    across = torch.nn.functional.normalize(torch.linalg.cross(directions, torch.randn(len(impacts), 3, generator=g,
                                                                                      dtype=dtype)), dim=-1)
    b = torch.tensor(impacts, dtype=dtype)
    origins = -2.5 * directions + b.unsqueeze(-1) * across
    chords = 2 * torch.sqrt((RADIUS**2 - b**2).clamp(min=0))
    return Rays(origins.unsqueeze(0), directions.unsqueeze(0)), chords


def test_a_constant_density_sphere_has_opacity_one_minus_exp_sigma_chord():
    """A = 1 − exp(−σ·chord) per ray. The quadrature is exact except in the two intervals that hold the sphere's
    boundary, each off by at most σδ in optical depth, so |A − A_exact| ≤ 2σδ with δ = (far − near)/S: the tolerance
    shrinks as 1/S."""
    sigma = 3.0
    field = ConstantSphere(sigma)
    rays, chords = rays_at_impacts(IMPACT)
    near, far = sphere_near_far(rays, BOUND)
    exact = 1 - torch.exp(-sigma * chords)
    assert chords[-1] == 0 and 0 < chords[-2] < 0.07  # a miss and a near-tangent ray are in the set
    errors = {}
    for n_samples in (16, 64, 256):
        for generator in (None, torch.Generator().manual_seed(n_samples)):
            with torch.no_grad():
                out = render_rays(field, rays, n_samples, near, far, generator=generator)
            tolerance = 2 * sigma * (far - near)[0] / n_samples + 1e-6
            error = (out.opacity[0] - exact).abs()
            assert (error <= tolerance).all(), (n_samples, error, tolerance)
            errors[n_samples, generator is None] = error.max().item()
    assert errors[256, True] < errors[16, True]
    assert out.opacity[0, -1] == 0  # the miss


def test_a_constant_colour_renders_that_colour_times_opacity_plus_background():
    colour, background = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.7, 0.1, 0.3])
    rays, _ = rays_at_impacts(IMPACT)
    near, far = sphere_near_far(rays, BOUND)
    with torch.no_grad():
        out = render_rays(ConstantSphere(2.0, colour.tolist()), rays, 64, near, far, background,
                          torch.Generator().manual_seed(0))
    expected = colour * out.opacity[0, :, None] + background * (1 - out.opacity[0, :, None])
    torch.testing.assert_close(out.rgb[0], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.weights.sum(-1), out.opacity, rtol=0, atol=1e-6)
    hit = out.opacity[0] > 0  # depth, normalised by opacity, lies inside the sphere on the hit rays
    depth, mid_chord = out.depth[0, hit], 2.5
    assert ((depth > mid_chord - RADIUS - 0.05) & (depth < mid_chord + RADIUS)).all()


def test_gradients_reach_density_and_colour():
    """The closed form of the discrete sum: with τ = σ Σ_{inside} δ_k, A = 1 − exp(−τ) and dA/dσ = (τ/σ) exp(−τ);
    d rgb/d colour = A. And torch.autograd.gradcheck of a smooth field (float64)."""
    field = ConstantSphere(3.0)
    rays, _ = rays_at_impacts(IMPACT[:4])
    near, far = sphere_near_far(rays, BOUND)
    out = render_rays(field, rays, 64, near, far)
    out.opacity.sum().backward()
    tau = -torch.log1p(-out.opacity.detach())
    torch.testing.assert_close(field.sigma.grad, (tau / 3.0 * torch.exp(-tau)).sum(), rtol=1e-4, atol=1e-6)
    field.zero_grad()
    out = render_rays(field, rays, 64, near, far)
    out.rgb[..., 1].sum().backward()
    torch.testing.assert_close(field.rgb.grad[1], out.opacity.detach().sum(), rtol=1e-5, atol=1e-6)

    rays64, _ = rays_at_impacts((0.0, 0.25), dtype=torch.float64)
    near, far = sphere_near_far(rays64, BOUND)

    def rendered(sigma, rgb):
        out = render_rays(SmoothBlob(sigma, rgb), rays64, 12, near, far, background=[0.5, 0.5, 0.5])
        return out.rgb, out.opacity, out.depth

    sigma = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    rgb = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rendered, (sigma, rgb))


def test_stratified_samples_partition_the_interval_and_jitter_inside_each_bin():
    near, far = torch.tensor([[0.5, 1.0]]), torch.tensor([[2.5, 1.0]])  # the second interval is empty (a miss)
    samples = stratified_samples(near, far, 8, torch.Generator().manual_seed(0))
    assert samples.t_starts.shape == (1, 2, 8)
    torch.testing.assert_close(samples.t_starts[..., 1:], samples.t_ends[..., :-1])
    torch.testing.assert_close((samples.t_ends - samples.t_starts).sum(-1), far - near)
    assert ((samples.t_points >= samples.t_starts) & (samples.t_points <= samples.t_ends)).all()
    assert (samples.t_points[0, 0] != 0.5 * (samples.t_starts + samples.t_ends)[0, 0]).all()
    midpoints = stratified_samples(near, far, 8)
    torch.testing.assert_close(midpoints.t_points, 0.5 * (midpoints.t_starts + midpoints.t_ends))


def test_sphere_near_far():
    rays = Rays(torch.tensor([[[-3.0, 0, 0], [-3.0, 2.0, 0], [0.0, 0, 0]]]),
                torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0.0, 0, 1]]]))
    near, far = sphere_near_far(rays, 1.0)
    torch.testing.assert_close(near, torch.tensor([[2.0, 3.0, 0.0]]))  # hit; miss: empty at the closest point;
    torch.testing.assert_close(far, torch.tensor([[4.0, 3.0, 1.0]]))  # a camera inside starts at 0


# --- cameras ---------------------------------------------------------------------------------------------------

def test_orbit_cameras_look_at_the_origin_in_the_opengl_frame():
    """The ray through the image centre passes through the origin (odd sizes: it is the centre pixel's ray); the
    rotation is orthonormal with det +1; row 0 is the top of the image; the top row's ray makes the angle
    atan((H/2 − ½)/f) with the axis, f = ½H / tan(½ fovy)."""
    elevation = torch.tensor([0.0, 15.0, -10.0, 60.0, 90.0])
    azimuth = torch.tensor([0.0, 45.0, -120.0, 200.0, 33.0])
    cameras = orbit_cameras(elevation, azimuth, torch.tensor([1.5, 1.0, 1.2, 2.0, 1.3]),
                            torch.full((5,), 40.0), 33, 33)
    rays = camera_rays(cameras)
    origin, direction = rays.origins[:, 16 * 33 + 16], rays.directions[:, 16 * 33 + 16]  # the centre pixel
    closest = origin - (origin * direction).sum(-1, keepdim=True) * direction  # its point nearest the origin
    assert closest.norm(dim=-1).max() < 1e-5
    rotation = cameras.camera_to_world[:, :3, :3]
    torch.testing.assert_close(rotation.transpose(1, 2) @ rotation, torch.eye(3).expand(5, 3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotation), torch.ones(5))
    torch.testing.assert_close(cameras.positions.norm(dim=-1), cameras.distance)
    up = rotation[:, :, 1]
    assert (up[:4, 2] > 0).all()  # the camera's up points to world +z below the pole
    top, bottom = rays.directions[:, 16], rays.directions[:, 32 * 33 + 16]
    assert (top[:4, 2] > bottom[:4, 2]).all()
    f = 0.5 * 33 / math.tan(math.radians(20.0))
    angle = torch.acos((top * rays.directions[:, 16 * 33 + 16]).sum(-1))
    torch.testing.assert_close(angle, torch.full((5,), math.atan(16.0 / f)), atol=1e-5, rtol=0)
    torch.testing.assert_close(cameras.light_positions, cameras.positions)  # light at the camera


def test_threestudio_frame_azimuth_zero_sees_from_plus_x():
    cameras = orbit_cameras(torch.tensor([0.0, 0.0, 90.0]), torch.tensor([0.0, 90.0, 0.0]), torch.ones(3),
                            torch.full((3,), 40.0), 8, 8)
    torch.testing.assert_close(cameras.positions, torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]),
                               atol=1e-6, rtol=0)


def _sample(distribution: CameraDistribution, batch: int, seed: int = 0):
    return sample_cameras(distribution, batch, 16, 16, torch.Generator().manual_seed(seed))


def test_sampled_cameras_lie_in_the_configured_ranges():
    distribution = CameraDistribution()
    for seed in range(20):
        cameras = _sample(distribution, 8, seed)
        for values, (low, high) in ((cameras.elevation_deg, distribution.elevation_range_deg),
                                    (cameras.azimuth_deg, distribution.azimuth_range_deg),
                                    (cameras.distance, distribution.distance_range),
                                    (torch.rad2deg(cameras.fovy), distribution.fovy_range_deg),
                                    (cameras.light_positions.norm(dim=-1), distribution.light_distance_range)):
            assert ((values >= low - 1e-4) & (values <= high + 1e-4)).all(), (values, low, high)
        nominal = orbit_cameras(cameras.elevation_deg, cameras.azimuth_deg, cameras.distance,
                                torch.rad2deg(cameras.fovy), 16, 16).positions
        assert (cameras.positions - nominal).abs().max() <= distribution.camera_perturb + 1e-5


def test_unperturbed_sampled_cameras_look_at_the_origin():
    distribution = CameraDistribution(camera_perturb=0.0, center_perturb=0.0, up_perturb=0.0,
                                      elevation_range_deg=(-10.0, 80.0))
    cameras = _sample(distribution, 16)
    axis = -cameras.camera_to_world[:, :3, 2]
    closest = cameras.positions - (cameras.positions * axis).sum(-1, keepdim=True) * axis
    assert closest.norm(dim=-1).max() < 1e-5
    torch.testing.assert_close(cameras.positions.norm(dim=-1), cameras.distance)


def test_azimuth_stratification_puts_one_camera_per_stratum():
    distribution = CameraDistribution(azimuth_range_deg=(-180.0, 180.0))
    for batch in (1, 4, 7):
        cameras = _sample(distribution, batch, seed=batch)
        strata = torch.floor((cameras.azimuth_deg + 180.0) / (360.0 / batch)).long()
        assert strata.tolist() == list(range(batch))
    plain = CameraDistribution(batch_uniform_azimuth=False)
    strata = [torch.floor((_sample(plain, 4, s).azimuth_deg + 180.0) / 90.0).long().tolist() for s in range(5)]
    assert any(s != [0, 1, 2, 3] for s in strata)


def test_sampling_is_deterministic_for_a_seed_and_follows_the_device_contract():
    distribution = CameraDistribution()
    a, b = _sample(distribution, 4, 3), _sample(distribution, 4, 3)
    assert torch.equal(a.camera_to_world, b.camera_to_world) and torch.equal(a.light_positions, b.light_positions)
    assert not torch.equal(a.camera_to_world, _sample(distribution, 4, 4).camera_to_world)
    generator = torch.Generator().manual_seed(0)
    state = torch.get_rng_state()
    with DrawRecorder() as recorder:
        cameras = sample_cameras(distribution, 3, 8, 8, generator)
        render_cameras(ConstantSphere(2.0), cameras, 8, BOUND, generator=generator)
    assert recorder.draws and not contract_violations(recorder.draws, "cpu", library_only=True)
    assert torch.equal(state, torch.get_rng_state())


def test_evaluation_cameras_are_threestudio_turntables():
    distribution = CameraDistribution()
    cameras = evaluation_cameras(distribution, 4, 8, 8, torch.device("cpu"))
    assert cameras.azimuth_deg.tolist() == [0.0, 90.0, 180.0, 270.0]
    assert cameras.elevation_deg.tolist() == [15.0] * 4 and cameras.distance.tolist() == [1.5] * 4
    torch.testing.assert_close(torch.rad2deg(cameras.fovy), torch.full((4,), 70.0))


def test_camera_distribution_defaults_are_threestudios_and_bad_values_name_the_field():
    d = CameraDistribution()
    assert (d.elevation_range_deg, d.azimuth_range_deg, d.distance_range, d.fovy_range_deg) == \
        ((-10, 90), (-180, 180), (1, 1.5), (40, 70))
    assert (d.camera_perturb, d.center_perturb, d.up_perturb, d.light_position_perturb) == (0.1, 0.2, 0.02, 1.0)
    assert (d.front_threshold_deg, d.back_threshold_deg, d.overhead_threshold_deg) == (45, 45, 60)
    with pytest.raises(ValueError, match="cameras.fovy_range_deg"):
        CameraDistribution(fovy_range_deg=(70.0, 40.0))
    with pytest.raises(ValueError, match="cameras.elevation_range_deg"):
        CameraDistribution(elevation_range_deg=(-100.0, 0.0))


# --- view prompts ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("elevation, azimuth, view", [
    (0.0, 0.0, "front"), (0.0, 44.99, "front"), (0.0, 45.0, "side"), (0.0, -45.0, "side"), (0.0, -44.99, "front"),
    (0.0, 135.0, "side"), (0.0, 135.01, "back"), (0.0, -135.0, "side"), (0.0, -135.01, "back"),
    (0.0, 180.0, "back"), (0.0, -180.0, "back"), (0.0, 360.0, "front"), (0.0, 315.0, "side"), (0.0, 316.0, "front"),
    (0.0, 90.0, "side"), (60.0, 0.0, "front"), (60.01, 0.0, "overhead"), (89.0, 180.0, "overhead"),
    (-10.0, 180.0, "back"),
])
def test_view_prompts_follow_threestudios_thresholds(elevation, azimuth, view):
    distribution = CameraDistribution()
    index = view_indices(torch.tensor([elevation]), torch.tensor([azimuth]), distribution)
    assert VIEWS[index.item()] == view
    assert view_prompts("a red cube", torch.tensor([elevation]), torch.tensor([azimuth]), distribution) == \
        [f"a red cube, {view} view"]


def test_view_prompts_per_camera_and_custom_thresholds():
    distribution = CameraDistribution(front_threshold_deg=60.0, overhead_threshold_deg=30.0)
    prompts = view_prompts(["a", "b", "c"], torch.tensor([0.0, 0.0, 40.0]), torch.tensor([50.0, 170.0, 0.0]),
                           distribution)
    assert prompts == ["a, front view", "b, back view", "c, overhead view"]
    with pytest.raises(ValueError, match="prompts"):
        view_prompts(["a", "b"], torch.zeros(3), torch.zeros(3), distribution)


# --- devices ---------------------------------------------------------------------------------------------------

def test_rendering_layout_is_dense_on_the_cpu():
    assert rendering_layout(torch.device("cpu")) == "dense"


@pytest.fixture
def no_nerfacc_cuda(monkeypatch, tmp_path):
    """Make every route to nerfacc's CUDA backend fail: its extension module cannot be imported and torch's JIT
    compiler raises (TORCH_EXTENSIONS_DIR points to a scratch directory in case anything slipped through)."""
    import nerfacc.cuda

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "nerfacc.cuda._backend", None)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.utils.cpp_extension.load called: nerfacc's CUDA backend was touched")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", refuse)
    with pytest.raises(ImportError):  # the trap is live: a CUDA op fails at once
        nerfacc.cuda.exclusive_sum(torch.zeros(2), torch.zeros(1, 2, dtype=torch.long))


def test_a_cpu_render_with_backward_never_touches_nerfacc_cuda(no_nerfacc_cuda):
    field = ConstantSphere(3.0)
    cameras = evaluation_cameras(CameraDistribution(), 2, 8, 8, torch.device("cpu"))
    out = render_cameras(field, cameras, 16, BOUND, background=[0.5, 0.5, 0.5],
                         generator=torch.Generator().manual_seed(0))
    (out.rgb.sum() + out.opacity.sum() + out.depth.sum()).backward()
    assert field.sigma.grad is not None and field.rgb.grad.abs().sum() > 0
    assert isinstance(field, RadianceField)

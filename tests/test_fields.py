"""msd/fields.py (docs/design.md §10.6): the learned radiance fields against closed forms (trilinear interpolation,
constant and exponential densities, the blob), the hash encoding (dense levels = grid_sample, the stated primes,
continuity across cell faces), shading, regularisers on inputs with known answers, gradients to every parameter,
and the device contract."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msd.fields import (
    HASH_PRIMES,
    DiffuseMaterial,
    EnvironmentMapBackground,
    HashGridEncoding,
    ImplicitVolumeField,
    RegulariserWeights,
    ScheduledWeight,
    SolidBackground,
    VoxelGridField,
    opaque_loss,
    orientation_loss,
    random_background,
    regularisation,
    sparsity_loss,
    spatial_hash,
    z_variance_loss,
)
from msd.rendering import (
    CameraDistribution,
    RadianceField,
    Rays,
    camera_rays,
    evaluation_cameras,
    orbit_cameras,
    render_cameras,
    render_rays,
    sample_cameras,
    sphere_near_far,
)
from tests.test_device_contract import DrawRecorder, contract_violations

SMALL_HASH = {"n_levels": 4, "features_per_level": 2, "log2_table_size": 10, "base_resolution": 4,
              "per_level_scale": 2.0}
"""N_l = 4, 8, 16, 32 with T = 1024: levels 0 and 1 dense (5³, 9³ ≤ 1024), levels 2 and 3 hashed."""


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_volume(seed: int = 0, **kwargs) -> ImplicitVolumeField:
    return ImplicitVolumeField(seeded(seed), hidden=16, **SMALL_HASH, **kwargs)


def parallel_rays(impacts, axis: int = 0, offset=(0.0, 0.0, 0.0), dtype=torch.float32) -> Rays:
    """Rays [1, N] along +axis starting 2 units before the origin, at the given distances along the next axis."""
    n = len(impacts)
    origins = torch.tensor(offset, dtype=dtype).repeat(n, 1)
    origins[:, axis] = -2.0
    origins[:, (axis + 1) % 3] += torch.tensor(impacts, dtype=dtype)
    directions = torch.zeros(n, 3, dtype=dtype)
    directions[:, axis] = 1.0
    return Rays(origins.unsqueeze(0), directions.unsqueeze(0))


# --- the voxel grid: interpolation and closed-form renders ------------------------------------------------------

def test_the_voxel_grid_reproduces_linear_functions_with_x_on_the_last_axis():
    """Trilinear interpolation is exact for a field linear in p: logits = p at every vertex gives albedo sigmoid(p)
    everywhere in the box, which pins the vertex positions, the axis order and align_corners."""
    field = VoxelGridField(resolution=7)
    with torch.no_grad():
        field.grid[1:] = field.vertex_positions().permute(3, 0, 1, 2)
    points = 2 * torch.rand(1, 200, 3, generator=seeded(1)) - 1
    points[0, :3] = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [0.0, 0.0, 0.0]])  # corners, centre
    torch.testing.assert_close(field.albedo(points), torch.sigmoid(points), atol=1e-6, rtol=0)
    assert field.vertex_positions()[0, 0, 1].tolist() == pytest.approx([-1 + 2 / 6, -1.0, -1.0])


def test_a_constant_voxel_density_renders_one_minus_exp_sigma_chord():
    """ρ = c everywhere and a constant bias b: σ = softplus(c + b) along the whole chord of the sphere |p| ≤ 0.9 (inside
    the grid's box), so the quadrature is exact: A = 1 − exp(−σ · 2√(0.81 − h²)) at impact h, for any sampling."""
    field = VoxelGridField(resolution=5, density_bias=-0.5)
    with torch.no_grad():
        field.grid[0] = 1.7
    sigma = F.softplus(torch.tensor(1.2)).item()
    impacts = [0.0, 0.3, 0.6, 0.85, 0.95]
    rays = parallel_rays(impacts, axis=1, offset=(0.1, 0.0, 0.0))  # along y, at z = impact, x = 0.1
    radial = torch.tensor(impacts) ** 2 + 0.1**2  # squared distance of each ray from the origin
    chords = 2 * torch.sqrt((0.81 - radial).clamp(min=0))
    near, far = sphere_near_far(rays, 0.9)
    with torch.no_grad():
        out = render_rays(field, rays, 16, near, far, generator=seeded(2))
    torch.testing.assert_close(out.opacity[0], 1 - torch.exp(-sigma * chords), atol=2e-6, rtol=0)
    assert out.opacity[0, -1] == 0  # the last ray misses the sphere


def test_an_exponential_voxel_density_renders_its_integral():
    """ρ = β y (linear, reproduced exactly), no bias, σ = exp(ρ): along y from −0.9 to 0.9 the optical depth is
    ∫ e^{βy} dy = 2 sinh(0.9β)/β; along x at height y₀ it is 1.8 e^{βy₀} (the midpoint rule's error is ~(βδ)²/24)."""
    beta, y0 = 2.0, 0.3
    field = VoxelGridField(resolution=9, density_bias=0.0, density_activation="exp")
    with torch.no_grad():
        field.grid[0] = beta * field.vertex_positions()[..., 1]
    along_y = parallel_rays([0.0], axis=1, offset=(0.2, 0.0, -0.1))
    along_x = parallel_rays([y0], axis=0, offset=(0.0, 0.0, 0.25))
    expected = {"y": 2 * math.sinh(0.9 * beta) / beta, "x": 1.8 * math.exp(beta * y0)}
    for name, rays in (("y", along_y), ("x", along_x)):
        with torch.no_grad():
            out = render_rays(field, rays, 128, 1.1, 2.9)
        depth = -torch.log1p(-out.opacity[0, 0]).item()
        assert depth == pytest.approx(expected[name], rel=1e-3), name


# --- the hash encoding ------------------------------------------------------------------------------------------

def test_hash_levels_follow_instant_ngp():
    encoding = HashGridEncoding(seeded(), **SMALL_HASH)
    assert encoding.resolutions == [4, 8, 16, 32] and encoding.dense == [True, True, False, False]
    assert encoding.level_sizes == [125, 729, 1024, 1024] and encoding.n_output_dims == 8
    default = HashGridEncoding(seeded(), log2_table_size=12)  # threestudio's levels, a small table for speed
    assert default.resolutions[0] == 16 and default.resolutions[-1] == 4096 and len(default.resolutions) == 16


def test_a_dense_hash_level_is_trilinear_interpolation_of_its_table():
    """Where (N + 1)³ ≤ T the level's table, viewed as a [F, N+1, N+1, N+1] grid (z, y, x), is sampled exactly as
    grid_sample samples it (align_corners=True: vertex c at x = c / N)."""
    encoding = HashGridEncoding(seeded(), **SMALL_HASH, init_scale=1.0).double()
    x = torch.rand(300, 3, generator=seeded(3), dtype=torch.float64)
    x[:2] = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    features = encoding(x)
    for level in (0, 1):
        side = encoding.resolutions[level] + 1
        grid = encoding.level_table(level).reshape(side, side, side, 2).permute(3, 0, 1, 2).unsqueeze(0)
        expected = F.grid_sample(grid, (2 * x - 1).view(1, 1, 1, -1, 3), align_corners=True).reshape(2, -1).T
        torch.testing.assert_close(features[:, 2 * level:2 * level + 2], expected, atol=1e-12, rtol=0)


def test_hashed_levels_use_the_stated_primes():
    """h(c) = (c₀ · 1 ⊕ c₁ · 2654435761 ⊕ c₂ · 805459861) mod T (Instant-NGP), computed here with Python integers: at
    a vertex the level's feature is that table row; two encodings of one seed agree."""
    assert HASH_PRIMES == (1, 2654435761, 805459861)
    assert spatial_hash(torch.eye(3, dtype=torch.long), 2**32).tolist() == [1, 2654435761, 805459861]
    encoding = HashGridEncoding(seeded(), **SMALL_HASH, init_scale=1.0).double()
    vertices = torch.randint(0, 17, (50, 3), generator=seeded(4))
    vertices[0] = torch.tensor([16, 16, 16])
    features = encoding(vertices.double() / 16)[:, 4:6]  # level 2: N = 16, hashed
    rows = [(c0 * 1 ^ c1 * 2654435761 ^ c2 * 805459861) % 1024 for c0, c1, c2 in vertices.tolist()]
    torch.testing.assert_close(features, encoding.level_table(2)[rows], atol=1e-12, rtol=0)
    again = HashGridEncoding(seeded(), **SMALL_HASH, init_scale=1.0).double()
    assert torch.equal(again(vertices.double() / 16), encoding(vertices.double() / 16))


def test_every_level_is_continuous_across_cell_faces():
    """Points 10⁻⁹ either side of a face x_axis = k/N_l fall in different cells but get the same features (to the
    interpolation's slope × 2·10⁻⁹): the face's 4 vertices are shared, dense or hashed."""
    encoding = HashGridEncoding(seeded(), **SMALL_HASH, init_scale=1.0).double()
    base = torch.rand(20, 3, generator=seeded(5), dtype=torch.float64)
    for level, resolution in enumerate(encoding.resolutions):
        for axis in range(3):
            face = torch.randint(1, resolution, (20,), generator=seeded(level * 3 + axis)).double() / resolution
            below, above = base.clone(), base.clone()
            below[:, axis], above[:, axis] = face - 1e-9, face + 1e-9
            assert (torch.floor(below[:, axis] * resolution) != torch.floor(above[:, axis] * resolution)).all()
            columns = slice(2 * level, 2 * level + 2)
            jump = (encoding(above)[:, columns] - encoding(below)[:, columns]).abs().max()
            assert jump < 1e-6, (level, axis, jump)


# --- density: the blob ------------------------------------------------------------------------------------------

def test_blob_biases_have_their_stated_values():
    points = torch.tensor([[[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.3, 0.4], [0.0, 0.0, 1.0]]])
    magic3d = small_volume(density_blob_scale=10.0, density_blob_std=0.5)
    torch.testing.assert_close(magic3d.density_bias(points), torch.tensor([[10.0, 0.0, 0.0, -10.0]]))
    dreamfusion = small_volume(density_bias="blob_dreamfusion", density_blob_scale=5.0, density_blob_std=0.2)
    expected = 5 * torch.exp(torch.tensor([[0.0, -3.125, -3.125, -12.5]]))  # −|p|²/(2·0.04)
    torch.testing.assert_close(dreamfusion.density_bias(points), expected)
    assert small_volume(density_bias=-1.5).density_bias(points) == -1.5


def test_fresh_fields_are_the_blob_and_render_it():
    """At init σ(p) = softplus(bias(|p|)): exactly for the zero voxel grid, to 10⁻³ for the implicit volume (its MLPs
    see features ~10⁻⁴); the normals point outward, p/|p|; the opacity of parallel rays decreases with their distance
    from the centre and matches 1 − exp(−∫σ) integrated on a fine grid."""
    points = torch.rand(1, 500, 3, generator=seeded(6)) * 2 - 1
    points = points * (0.95 / torch.linalg.vector_norm(points, dim=-1, keepdim=True).clamp(min=0.95))
    radius = torch.linalg.vector_norm(points, dim=-1)
    voxels = VoxelGridField(resolution=16)
    torch.testing.assert_close(voxels.density(points), F.softplus(5.0 * (1 - radius / 0.5)), atol=1e-6, rtol=1e-6)
    volume = ImplicitVolumeField(seeded(), log2_table_size=14)  # threestudio's levels and MLP widths
    torch.testing.assert_close(volume.density(points), F.softplus(10.0 * (1 - radius / 0.5)), atol=1e-3, rtol=0)
    shell = (radius > 0.1) & (radius < 0.6)  # where the blob's slope dwarfs the hash features' ripples
    for field in (voxels, volume):
        outward = (field.normals(points) * points / radius.unsqueeze(-1)).sum(-1)
        assert (outward[shell] > 0.99).all()

    impacts = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8]
    rays = parallel_rays(impacts, axis=0, offset=(0.0, 0.0, 0.0))
    near, far = sphere_near_far(rays, 1.0)
    with torch.no_grad():
        opacity = render_rays(volume, rays, 256, near, far).opacity[0]
    assert (opacity[1:] < opacity[:-1]).all() and opacity[0] > 0.9
    t = torch.linspace(-1, 1, 20001)
    for h, a in zip(impacts, opacity.tolist()):
        depth = torch.trapezoid(F.softplus(10 * (1 - torch.sqrt(t**2 + h**2) / 0.5)), t).item()
        assert a == pytest.approx(1 - math.exp(-depth), abs=3e-3), h


# --- shading ----------------------------------------------------------------------------------------------------

def _sphere_with_colour(colour=(0.8, 0.4, 0.2), normal_type="finite_difference") -> VoxelGridField:
    field = VoxelGridField(resolution=24, normal_type=normal_type, density_blob_scale=40.0)  # a sharp blob
    with torch.no_grad():
        field.grid[1:] = torch.logit(torch.tensor(colour)).view(3, 1, 1, 1)
    return field


@pytest.mark.parametrize("normal_type", ["finite_difference", "analytic"])
def test_shading_with_the_light_at_the_camera(normal_type):
    """Light at the camera: lambertian ≤ albedo everywhere, ≈ albedo where the surface faces the camera (the image
    centre), darker towards the silhouette; textureless is grey; without a light every shading but textureless is
    the albedo."""
    field = _sphere_with_colour(normal_type=normal_type)
    cameras = orbit_cameras(torch.tensor([15.0]), torch.tensor([30.0]), torch.tensor([2.0]), torch.tensor([40.0]),
                            15, 15)
    renders = {s: render_cameras(field.with_shading(s), cameras, 64, 1.0).rgb[0].detach()
               for s in ("albedo", "lambertian", "textureless")}
    albedo, lambertian, textureless = renders["albedo"], renders["lambertian"], renders["textureless"]
    assert (lambertian <= albedo + 1e-6).all()
    centre, edge = 7 * 15 + 7, 7 * 15 + 3
    assert (lambertian[centre] / albedo[centre] > 0.97).all()
    assert (lambertian[edge] / albedo[edge] < lambertian[centre] / albedo[centre]).all()
    torch.testing.assert_close(textureless, textureless[:, :1].expand(-1, 3), atol=1e-6, rtol=0)
    assert textureless[centre, 0] > 0.9  # ambient 0.1 + diffuse 0.9 · cos ≈ 1, times the opacity
    torch.testing.assert_close(render_cameras(field, cameras, 64, 1.0).rgb[0], lambertian)  # the field's default
    points = torch.rand(1, 10, 3, generator=seeded(7)) * 0.4
    for shading in ("albedo", "lambertian"):
        torch.testing.assert_close(field.with_shading(shading).density_and_colour(points, None)[1],
                                   torch.tensor([0.8, 0.4, 0.2]).expand(1, 10, 3))
    with pytest.raises(ValueError, match="light_positions"):
        field.with_shading("textureless").density_and_colour(points, None)


def test_ambient_only_before_the_warm_up_then_threestudios_probabilities():
    material = DiffuseMaterial()
    assert (material.ambient_light_colour, material.diffuse_light_colour) == ((0.1,) * 3, (0.9,) * 3)
    generator = seeded(8)
    state = generator.get_state()
    assert {material.sample_shading(step, generator) for step in range(0, 1000, 7)} == {"albedo"}
    assert torch.equal(generator.get_state(), state)  # the warm-up draws nothing
    assert material.shading_probabilities(1000) == {"albedo": 0.25, "lambertian": 0.375, "textureless": 0.375}

    def choices(seed, n):
        g = seeded(seed)
        return [material.sample_shading(1000 + k, g) for k in range(n)]

    assert choices(3, 50) == choices(3, 50) and choices(3, 50) != choices(4, 50)
    n = 4000
    drawn = choices(9, n)
    for shading, p in material.shading_probabilities(5000).items():
        assert abs(drawn.count(shading) - n * p) < 4 * math.sqrt(n * p * (1 - p)), shading


# --- backgrounds ------------------------------------------------------------------------------------------------

def test_backgrounds_and_their_random_augmentation():
    directions = F.normalize(torch.randn(2, 6, 3, generator=seeded(10)), dim=-1)
    environment = EnvironmentMapBackground(seeded())
    colours = environment(directions)
    assert colours.shape == (2, 6, 3) and ((colours > 0) & (colours < 1)).all()
    assert torch.equal(SolidBackground()(directions), torch.ones(2, 6, 3))
    replaced = kept = 0
    generator = seeded(11)
    for _ in range(400):
        out = random_background(colours, generator, probability=0.3)
        if torch.equal(out, colours):
            kept += 1
        else:
            replaced += 1  # one uniform colour per view
            assert torch.equal(out, out[:, :1].expand_as(out))
    assert abs(replaced - 120) < 4 * math.sqrt(400 * 0.3 * 0.7) and kept + replaced == 400
    assert torch.equal(random_background(colours, seeded(), probability=0.0), colours)


# --- regularisers -----------------------------------------------------------------------------------------------

def test_orientation_loss_penalises_normals_facing_away():
    """One hit ray (A = 0.8, weights 0.3 and 0.5 along d = +x) and a miss (A = 0, which the mean leaves out)."""
    weights = torch.tensor([[[0.3, 0.5], [0.0, 0.0]]])
    opacity = torch.tensor([[0.8, 0.0]])
    directions = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])

    def loss(normal):
        return orientation_loss(weights, torch.tensor(normal).expand(1, 2, 2, 3), directions, opacity).item()

    assert loss([1.0, 0.0, 0.0]) == pytest.approx(0.8)  # facing away: the maximum, Σw · 1
    assert loss([-1.0, 0.0, 0.0]) == 0.0 and loss([0.0, 1.0, 0.0]) == 0.0  # facing the camera, or side-on
    assert loss([0.5, math.sqrt(0.75), 0.0]) == pytest.approx(0.8 * 0.25)  # 60° away: cos² = ¼


def test_sparsity_opaque_and_z_variance_on_known_cases():
    assert sparsity_loss(torch.zeros(3)).item() == pytest.approx(0.1)
    assert sparsity_loss(torch.tensor([0.0, 1.0])).item() == pytest.approx((0.1 + math.sqrt(1.01)) / 2)
    assert opaque_loss(torch.tensor([0.0, 1.0]), eps=0.0).item() == 0.0
    assert opaque_loss(torch.tensor([0.5, 0.5])).item() == pytest.approx(math.log(2))
    clamped_entropy = -(1e-3 * math.log(1e-3) + 0.999 * math.log(0.999))
    assert opaque_loss(torch.tensor([0.0, 1.0])).item() == pytest.approx(clamped_entropy, rel=1e-4)

    t = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]])
    one_depth = torch.tensor([[[0.0, 0.9, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    assert z_variance_loss(one_depth, t, one_depth.sum(-1)).item() == 0.0
    # ray 0: 0.4 at t = 1 and t = 3 (A = 0.8, normalised ½, ½: variance 1); ray 1: all at t = 2 (variance 0);
    # ray 2: A = 0.4 ≤ ½, left out however spread
    weights = torch.tensor([[[0.4, 0.0, 0.4], [0.0, 1.0, 0.0], [0.2, 0.0, 0.2]]])
    assert z_variance_loss(weights, t, weights.sum(-1)).item() == pytest.approx(0.5)
    assert z_variance_loss(weights[:, 2:], t[:, 2:], weights[:, 2:].sum(-1)).item() == 0.0


def test_scheduled_weights_interpolate_linearly_and_clamp():
    orient = ScheduledWeight(0, 10.0, 1000.0, 5000)  # DreamFusion-SD's lambda_orient
    assert [orient(s) for s in (-5, 0, 2500, 5000, 9000)] == [10.0, 10.0, 505.0, 1000.0, 1000.0]
    opaque = ScheduledWeight(10000, 0.0, 1000.0, 10001)  # ProlificDreamer's lambda_opaque: a switch at 10001
    assert [opaque(s) for s in (0, 10000, 10001, 20000)] == [0.0, 0.0, 1000.0, 1000.0]
    assert ScheduledWeight.constant(3.0)(-1) == ScheduledWeight.constant(3.0)(7) == 3.0
    assert RegulariserWeights().orient == orient
    with pytest.raises(ValueError, match="schedule.end_step"):
        ScheduledWeight(10, 1.0, 2.0, 5)


# --- gradients, rendering and the device contract ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["voxel_grid", "implicit_volume"])
def test_gradients_reach_every_parameter_through_a_render_and_the_losses(kind):
    generator = seeded(12)
    field = VoxelGridField(resolution=8) if kind == "voxel_grid" else small_volume()
    background = EnvironmentMapBackground(seeded(13))
    assert isinstance(field, RadianceField) and isinstance(field.with_shading("textureless"), RadianceField)
    cameras = sample_cameras(CameraDistribution(), 2, 6, 6, generator)
    rays = camera_rays(cameras)
    render = render_cameras(field.with_shading("lambertian"), cameras, 24, 1.0, background(rays.directions),
                            generator)
    assert render.points.shape == (2, 36, 24, 3)
    weights = RegulariserWeights(opaque=ScheduledWeight.constant(1.0), z_variance=ScheduledWeight.constant(1.0))
    total, terms = regularisation(field, render, rays.directions, weights, step=0)
    assert set(terms) == {"orient", "sparsity", "opaque", "z_variance"}
    (render.rgb.square().mean() + total).backward()
    parameters = dict(field.named_parameters()) | {f"background.{n}": p for n, p in background.named_parameters()}
    for name, parameter in parameters.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    if kind == "voxel_grid":
        assert all(field.grid.grad[c].abs().sum() > 0 for c in range(4))
    else:
        grad = field.encoding.table.grad
        for level in range(4):
            offset, size = field.encoding.offsets[level], field.encoding.level_sizes[level]
            assert grad[offset:offset + size].abs().sum() > 0, level
    _, later = regularisation(field, render, rays.directions, RegulariserWeights(), step=0)
    assert set(later) == {"orient", "sparsity"}  # DreamFusion-SD: opaque and z-variance off


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="field.density_activation"):
        VoxelGridField(density_activation="relu")
    with pytest.raises(ValueError, match="field.density_bias"):
        VoxelGridField(density_bias="blob")
    with pytest.raises(ValueError, match="field.normal_type"):
        small_volume(normal_type="pred")
    with pytest.raises(ValueError, match="material.diffuse_prob"):
        DiffuseMaterial(diffuse_prob=1.5)


def test_every_draw_uses_the_generator_on_the_tensors_device():
    """Building the implicit volume and the environment map, rendering with jitter, the shading choice and the
    background augmentation: every draw by the library takes the generator passed in, on the CPU where the tensors
    live, and the global RNG is untouched."""
    state = torch.get_rng_state()
    generator = seeded(14)
    with DrawRecorder() as recorder:
        field = small_volume(14)
        background = EnvironmentMapBackground(generator)
        cameras = evaluation_cameras(CameraDistribution(), 2, 4, 4, torch.device("cpu"))
        shading = DiffuseMaterial().sample_shading(2000, generator)
        colours = random_background(background(camera_rays(cameras).directions), generator, probability=1.0)
        render_cameras(field.with_shading(shading), cameras, 8, 1.0, colours, generator)
    assert torch.equal(state, torch.get_rng_state())
    assert not contract_violations(recorder.draws, "cpu", library_only=True)
    in_fields = [d for d in recorder.draws if d.caller.startswith("msd/fields.py")]
    assert len(in_fields) == 1 + 2 * 2 + 3 + 1 + 2  # table, 2 MLPs × 2 layers, background 3 layers, shading, colours
    assert all(d.generator is not None and d.device == torch.device("cpu") for d in in_fields)

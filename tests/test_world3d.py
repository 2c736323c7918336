"""ShapesWorld-3D (shapes/world3d.py, docs/design.md §10): exact signed distances, the density, captions and Janus
probes, and the world's renders through msd.rendering (deterministic, rotation invariant, the right silhouettes)."""
from __future__ import annotations

import math

import pytest
import torch

from msd.rendering import CameraDistribution, orbit_cameras, sample_cameras
from shapes import world as world2d
from shapes.world3d import (
    ALBEDO,
    AMBIENT,
    DENSITY_SCALE,
    DIFFUSE,
    EDGE_WIDTH,
    JANUS_PROBES,
    PRIMITIVES,
    PROMPTS,
    SIDE_VIEW,
    PrimitiveField,
    Scene,
    caption,
    density_from_distance,
    parse_caption,
    render_scenes,
    sample_scenes,
    signed_distance,
    world_images,
)
from tests.test_device_contract import DrawRecorder, contract_violations
from tests.test_rendering import no_nerfacc_cuda  # noqa: F401  (fixture)

R = 0.3
SQRT5 = math.sqrt(5.0)


def distance(shape: str, points) -> torch.Tensor:
    points = torch.tensor(points, dtype=torch.float64).view(1, -1, 3)
    return signed_distance(torch.tensor([PRIMITIVES.index(shape)]), torch.tensor([R], dtype=torch.float64), points)[0]


# (primitive, point, exact signed distance), r = 0.3
KNOWN = [
    ("sphere", (0, 0, 0), -R), ("sphere", (R, 0, 0), 0.0), ("sphere", (0, -0.6 * R, 0.8 * R), 0.0),
    ("sphere", (0, 0, 2 * R), R), ("sphere", (0.5 * R, 0, 0), -0.5 * R),
    ("cube", (0, 0, 0), -R), ("cube", (R, 0.1 * R, -0.3 * R), 0.0), ("cube", (R, R, R), 0.0),
    ("cube", (2 * R, 2 * R, 2 * R), math.sqrt(3) * R), ("cube", (R + 0.1, 0, 0), 0.1),
    ("cube", (R + 0.03, R + 0.04, 0), 0.05), ("cube", (0.5 * R, 0.2 * R, 0), -0.5 * R),
    ("cylinder", (0, 0, 0), -R), ("cylinder", (R * 0.6, R * 0.8, 0.5 * R), 0.0), ("cylinder", (0, 0, R), 0.0),
    ("cylinder", (0, 0, R + 0.1), 0.1), ("cylinder", ((R + 0.03) * 0.6, (R + 0.03) * 0.8, R + 0.04), 0.05),
    ("cylinder", (0, 0.5 * R, 0.2 * R), -0.5 * R),
    ("cone", (0, 0, 0), -R / SQRT5), ("cone", (0, 0, R), 0.0), ("cone", (0, 0, -R), 0.0),
    ("cone", (R, 0, -R), 0.0), ("cone", (0, 0.5 * R, 0), 0.0),  # apex, base centre, base rim, side midpoint
    ("cone", (0, 0, 2 * R), R), ("cone", (0.5 * R, 0, -R - 0.1), 0.1), ("cone", (R + 0.03, 0, -R - 0.04), 0.05),
    ("cone", (0, 0.5 * R + 0.1 * 2 / SQRT5, 0.1 / SQRT5), 0.1),  # 0.1 out along the side's normal (2, 1)/√5
    ("cone", (0, 0, -0.9 * R), -0.1 * R),  # nearer the base than the side (1.9r/√5)
]


@pytest.mark.parametrize("shape, point, expected", KNOWN)
def test_signed_distances_are_exact_at_known_points(shape, point, expected):
    assert distance(shape, point).item() == pytest.approx(expected, abs=1e-12)


def surface_samples(shape: str, n: int = 120) -> torch.Tensor:
    """Points on the primitive's surface (r = R) on grids of spacing <= ~2R/n · π (float64)."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    theta = 2 * math.pi * u
    grid_a, grid_b = torch.meshgrid(u, u, indexing="ij")
    square = torch.stack([2 * grid_a - 1, 2 * grid_b - 1], -1).reshape(-1, 2) * R
    ring_t, ring_u = torch.meshgrid(theta, u, indexing="ij")
    if shape == "sphere":
        z = R * (2 * ring_u - 1)
        rho = torch.sqrt(R**2 - z**2)
        return torch.stack([rho * torch.cos(ring_t), rho * torch.sin(ring_t), z], -1).reshape(-1, 3)
    if shape == "cube":
        faces = []
        for axis in range(3):
            for sign in (-1.0, 1.0):
                face = torch.zeros(len(square), 3, dtype=torch.float64)
                others = [i for i in range(3) if i != axis]
                face[:, others[0]], face[:, others[1]], face[:, axis] = square[:, 0], square[:, 1], sign * R
                faces.append(face)
        return torch.cat(faces)
    disc = square[square.norm(dim=-1) <= R]
    if shape == "cylinder":
        side = torch.stack([R * torch.cos(ring_t), R * torch.sin(ring_t), R * (2 * ring_u - 1)], -1).reshape(-1, 3)
        caps = [torch.cat([disc, torch.full((len(disc), 1), z, dtype=torch.float64)], -1) for z in (-R, R)]
        return torch.cat([side, *caps])
    radius = R * ring_u  # cone: radius grows linearly from the apex (z = R) to the base (z = −R)
    side = torch.stack([radius * torch.cos(ring_t), radius * torch.sin(ring_t), R - 2 * R * ring_u], -1)
    base = torch.cat([disc, torch.full((len(disc), 1), -R, dtype=torch.float64)], -1)
    return torch.cat([side.reshape(-1, 3), base])


def inside(shape: str, p: torch.Tensor) -> torch.Tensor:
    rho, z = p[:, :2].norm(dim=-1), p[:, 2]
    return {"sphere": p.norm(dim=-1) < R, "cube": p.abs().amax(-1) < R,
            "cylinder": (rho < R) & (z.abs() < R), "cone": (z > -R) & (rho < R * (R - z) / (2 * R))}[shape]


@pytest.mark.parametrize("shape", PRIMITIVES)
def test_signed_distances_match_brute_force_and_have_unit_gradient(shape):
    """|d| equals the distance to a dense sampling of the surface (which can only exceed it, by at most the sampling's
    spacing), the sign is − exactly inside, and |∇d| = 1 (an exact distance field) almost everywhere."""
    points = (torch.rand(800, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1) * 2 * R
    d = distance(shape, points.tolist())
    brute = torch.cdist(points, surface_samples(shape)).amin(-1)
    assert (brute - d.abs() >= -1e-9).all() and (brute - d.abs()).max() < 0.02
    assert torch.equal(d < 0, inside(shape, points))
    field = PrimitiveField(Scene.from_captions([caption(shape, "red")], torch.tensor([R], dtype=torch.float64)))
    normals_length = torch.linalg.vector_norm(torch.autograd.functional.jacobian(
        lambda p: field.signed_distance(p.view(1, -1, 3)).sum(), points).view(-1, 3), dim=-1)
    assert (normals_length - 1).abs().max() < 1e-9


def test_the_density_follows_the_distance():
    d = torch.tensor([-R, -10 * EDGE_WIDTH, 0.0, 10 * EDGE_WIDTH, R])
    sigma = density_from_distance(d)
    assert sigma[2].item() == pytest.approx(DENSITY_SCALE / 2)
    assert sigma[0].item() == pytest.approx(DENSITY_SCALE, rel=1e-6) and sigma[-1] < 1e-6 * DENSITY_SCALE
    assert (sigma.diff() < 0).all()
    field = PrimitiveField(Scene.from_captions(["a blue cone"], torch.tensor([R])))
    points = torch.tensor([[[0.0, 0, 0], [0, 0, R], [0, 0, 2 * R]]])
    torch.testing.assert_close(field.density(points)[0], density_from_distance(torch.tensor([-R / SQRT5, 0, R])))


def test_captions_and_janus_probes():
    assert len(PROMPTS) == 16 and PROMPTS[0] == "a red sphere" and PROMPTS[-1] == "a yellow cylinder"
    assert len(JANUS_PROBES) == 12 and "a red cube with a blue front" in JANUS_PROBES
    for text in PROMPTS + JANUS_PROBES:
        assert caption(*parse_caption(text)) == text
    assert set(SIDE_VIEW.values()) == set(world2d.SHAPES)
    for bad in ("a red pyramid", "a red cube with a red front", "red cube"):
        with pytest.raises(ValueError, match="caption"):
            parse_caption(bad)
    scene = Scene.from_captions(["a green cone", "a red cube with a blue front"], torch.tensor([0.2, 0.25]))
    assert scene.shape.tolist() == [2, 1] and scene.colour.tolist() == [1, 0] and scene.front_colour.tolist() == [-1, 2]


# --- renders ---------------------------------------------------------------------------------------------------

def test_world_renders_are_deterministic_for_a_seed_and_follow_the_device_contract():
    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        cameras = sample_cameras(CameraDistribution(), 3, 16, 16, generator)
        scene = sample_scenes(["a red sphere", "a green cone", "a red cube with a blue front"], generator)
        return world_images(scene, cameras, 32, generator)

    first = draw(0)
    assert torch.equal(first, draw(0)) and not torch.equal(first, draw(1))
    assert first.shape == (3, 3, 16, 16) and first.min() >= -1 - 1e-6 and first.max() <= 1 + 1e-6  # float rounding
    generator, state = torch.Generator().manual_seed(0), torch.get_rng_state()
    with DrawRecorder() as recorder:
        scene = sample_scenes(["a red sphere"] * 2, generator)
        render_scenes(scene, sample_cameras(CameraDistribution(), 2, 8, 8, generator), 8, generator)
    assert recorder.draws and not contract_violations(recorder.draws, "cpu", library_only=True)
    assert torch.equal(state, torch.get_rng_state())


def test_a_sphere_render_is_invariant_under_rotation_about_the_vertical_axis():
    """One sphere, light at the camera, elevation 20°: the same image from every azimuth (interval midpoints, so every
    view samples the same depths; only the rays' rounding differs)."""
    azimuths = torch.tensor([0.0, 73.0, 200.0, -95.0])
    cameras = orbit_cameras(torch.full((4,), 20.0), azimuths, torch.full((4,), 1.3), torch.full((4,), 50.0), 32, 32)
    images = world_images(Scene.from_captions(["a yellow sphere"], torch.tensor([0.25])), cameras)
    assert (images - images[:1]).abs().max() < 1e-3
    assert images[0, 0, 16, 16] > 0.5 and images[0, 2, 16, 16] < -0.9  # yellow, lit: red and green high, no blue
    assert images[0, :, 0, 0].abs().max() < 1e-6  # the corner is the mid-grey background


def test_a_cube_from_the_front_is_a_square_of_the_projected_size():
    """From azimuth 0, elevation 0 at distance D the silhouette of a cube of half-side r is its front face: a square
    of half-width w = f r / (D − r) pixels. The mask (opacity > ½) must be a filled, centred square with
    (2w − 1)² ≤ count ≤ (2w + 2h + 1)²: ±½ pixel of quantisation per edge, and the density's edge lying up to
    h = f · 4ε / (D − r) pixels outside (ε = EDGE_WIDTH; a grazing ray reaches optical depth ln 2 ≈ 4ε out)."""
    size, depth, fovy, pixels = 0.3, 1.5, 40.0, 64
    cameras = orbit_cameras(torch.zeros(1), torch.zeros(1), torch.tensor([depth]), torch.tensor([fovy]), pixels,
                            pixels)
    with torch.no_grad():
        _, opacity, _ = render_scenes(Scene.from_captions(["a red cube"], torch.tensor([size])), cameras,
                                      generator=torch.Generator().manual_seed(0)).images(pixels, pixels)
    mask = opacity[0, 0] > 0.5
    f = 0.5 * pixels / math.tan(math.radians(fovy / 2))
    w, h = f * size / (depth - size), f * 4 * EDGE_WIDTH / (depth - size)
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    side = len(rows)
    assert len(cols) == side and mask.sum() == side**2 and mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    assert rows[0] + rows[-1] == pixels - 1 and cols[0] + cols[-1] == pixels - 1  # centred
    assert (2 * w - 1) ** 2 <= mask.sum() <= (2 * w + 2 * h + 1) ** 2


def test_from_the_side_the_primitives_are_shapesworlds_circle_square_triangle_square():
    """Seen from far away at elevation 0 (near-orthographic: distance 20, the view spans 1 world unit), each
    primitive's silhouette is ShapesWorld-2D's shape of the same size: every pixel more than 1 px inside the 2-D
    shape is opaque, every pixel more than 1 px + 4ε outside is not."""
    pixels, span, far = 32, 1.0, 20.0
    fovy = math.degrees(2 * math.atan(span / 2 / far))
    cameras = orbit_cameras(torch.zeros(4), torch.zeros(4), torch.full((4,), far), torch.full((4,), fovy), pixels,
                            pixels)
    scene = Scene.from_captions([caption(shape, "green") for shape in PRIMITIVES], torch.full((4,), 0.3))
    with torch.no_grad():
        _, opacity, _ = render_scenes(scene, cameras).images(pixels, pixels)
    shapes_2d = torch.tensor([world2d.SHAPES.index(SIDE_VIEW[shape]) for shape in PRIMITIVES])
    distance_px = world2d.signed_distance(shapes_2d, torch.full((4, 2), 0.5), torch.full((4,), 0.3 / span), pixels)
    margin = 1.0 + 4 * EDGE_WIDTH / span * pixels
    assert (opacity[:, 0][distance_px < -1.0] > 0.5).all()
    assert (opacity[:, 0][distance_px > margin] < 0.5).all()


def test_the_janus_probe_differs_on_its_front_face_only():
    """Front view (azimuth 0): the centre shows the front colour; back and side views show the body's colour. With the
    light at the camera the face-on centre pixel is albedo · (ambient + diffuse)."""
    cameras = orbit_cameras(torch.zeros(3), torch.tensor([0.0, 180.0, 90.0]), torch.full((3,), 1.5),
                            torch.full((3,), 40.0), 15, 15)
    with torch.no_grad():
        rgb, _, _ = render_scenes(Scene.from_captions(["a red cube with a blue front"], torch.tensor([0.3])),
                                  cameras).images(15, 15)
    centre = rgb[:, :, 7, 7]
    blue, red = ALBEDO[2], ALBEDO[0]
    torch.testing.assert_close(centre[0], blue * (AMBIENT + DIFFUSE), atol=1e-3, rtol=0)
    torch.testing.assert_close(centre[1], red * (AMBIENT + DIFFUSE), atol=1e-3, rtol=0)
    torch.testing.assert_close(centre[2], red * (AMBIENT + DIFFUSE), atol=1e-3, rtol=0)


def test_a_cpu_world_render_with_backward_never_touches_nerfacc_cuda(no_nerfacc_cuda):  # noqa: F811
    size = torch.tensor([0.25, 0.2], requires_grad=True)
    scene = Scene(torch.tensor([1, 2]), torch.tensor([0, 3]), size, torch.tensor([2, -1]))
    cameras = sample_cameras(CameraDistribution(), 2, 8, 8, torch.Generator().manual_seed(0))
    world_images(scene, cameras, 16, torch.Generator().manual_seed(1)).sum().backward()
    assert torch.isfinite(size.grad).all() and (size.grad != 0).all()

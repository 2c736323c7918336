"""Geometric 3D metrics (shapes/metrics3d_geometry.py, docs/design.md §10.7): the calibrated density threshold, the
silhouette IoU against closed forms, and the volumetric fit over the true primitive family."""
from __future__ import annotations

import math

import pytest
import torch

from msd.fields import VoxelGridField
from msd.rendering import orbit_cameras
from shapes.metrics3d_geometry import (
    CALIBRATION_MIN_IOU,
    DENSITY_THRESHOLD,
    FIT_SIZES,
    GRID_RADIUS,
    GRID_RESOLUTION,
    DensityOnlyField,
    TranslatedField,
    density_grid,
    fit_primitive,
    grid_axis,
    grid_points,
    ground_truth_self_iou,
    mask_iou,
    primitive_field,
    primitive_occupancy,
    render_opacity,
    render_views,
    silhouette_iou,
    volumetric_iou,
)
from shapes.world3d import PRIMITIVES, PrimitiveField, Scene, density_from_distance, render_scenes, signed_distance

SPACING = 2 * GRID_RADIUS / (GRID_RESOLUTION - 1)  # 1/64


def sharp_field(shape: str, size: float) -> PrimitiveField:
    """A primitive with a 100× thinner edge (ε = 5·10⁻⁵, s = 4·10⁴): its silhouette is the nominal one to ~0.1 px."""
    scene = Scene(torch.tensor([PRIMITIVES.index(shape)]), torch.tensor([0]), torch.tensor([size]), torch.tensor([-1]))
    return PrimitiveField(scene, density_scale=4e4, edge_width=5e-5)


def test_the_calibrated_threshold_is_the_surface_density_and_every_true_primitive_passes_the_criterion():
    """τ = σ(d = 0); each of the 4 × 61 true primitives thresholded at τ recovers its own occupancy on the 129³ grid
    with IoU >= 0.95 (exactly 1 up to float rounding at d = 0); docs/design.md §10.7 has the scan over τ."""
    assert DENSITY_THRESHOLD == pytest.approx(float(density_from_distance(torch.zeros(()))))
    iou = ground_truth_self_iou()
    assert iou.shape == (len(PRIMITIVES), len(FIT_SIZES))
    assert float(iou.min()) >= CALIBRATION_MIN_IOU
    assert float(iou.min()) == pytest.approx(1.0, abs=1e-3)
    # 0.75 τ puts the thresholded surface ε ln(5/3) ≈ 0.0026 outside d = 0 and fails: the criterion is not vacuous
    assert float(ground_truth_self_iou(0.75 * DENSITY_THRESHOLD, shapes=("cube",)).min()) < CALIBRATION_MIN_IOU


def test_mask_iou_counts_intersection_over_union_and_two_empty_masks_agree():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    assert mask_iou(a, b).tolist() == pytest.approx([1 / 3, 1.0, 0.0])


def test_a_true_primitive_has_silhouette_iou_one_with_itself():
    cameras = orbit_cameras(torch.tensor([15.0, 15.0]), torch.tensor([0.0, 90.0]), torch.tensor([1.5, 1.5]),
                            torch.tensor([70.0, 70.0]), 32, 32)
    field = primitive_field("cone", 0.2)
    assert silhouette_iou(field, primitive_field("cone", 0.2), cameras).tolist() == [1.0, 1.0]
    assert float(silhouette_iou(field, primitive_field("cone", 0.25), cameras).max()) < 0.9


def test_sphere_against_cube_face_on_is_the_disc_over_the_square():
    """Seen face-on from distance D, a cube of half-side r is the square |u|, |v| < r/(D − r) (its front face) and a
    sphere of radius r the disc of radius r/√(D² − r²) (its tangent cone), in image-plane units; the disc lies inside
    the square, so IoU = π/4 · (D − r)/(D + r) (→ π/4 orthographically). fovy puts the square's edges on pixel
    boundaries (half-width 96 px of 256); tolerance 0.002: the disc's pixel count and the ~0.1 px soft edge."""
    distance, size, pixels, half_width = 4.0, 0.25, 256, 96
    fovy = math.degrees(2 * math.atan(pixels / 2 * size / (half_width * (distance - size))))
    one = torch.ones(1)
    cameras = orbit_cameras(0 * one, 0 * one, distance * one, fovy * one, pixels, pixels)
    iou = silhouette_iou(sharp_field("sphere", size), sharp_field("cube", size), cameras)
    assert float(iou) == pytest.approx(math.pi / 4 * (distance - size) / (distance + size), abs=2e-3)


def test_render_views_in_chunks_equals_the_one_shot_render():
    cameras = orbit_cameras(torch.tensor([15.0, 40.0]), torch.tensor([30.0, 200.0]), torch.tensor([1.5, 1.2]),
                            torch.tensor([60.0, 50.0]), 12, 10)
    scene = Scene.from_captions(["a green cube with a red front"], torch.tensor([0.25]))
    rgb, opacity = render_views(PrimitiveField(scene), cameras, background=(0.5, 0.5, 0.5), points_per_chunk=64 * 7)
    expected_rgb, expected_opacity, _ = render_scenes(scene, cameras).images(12, 10)
    torch.testing.assert_close(rgb, expected_rgb, atol=1e-5, rtol=0)
    torch.testing.assert_close(opacity, expected_opacity[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(render_opacity(DensityOnlyField(PrimitiveField(scene)), cameras), opacity, atol=1e-5,
                               rtol=0)


def test_density_grid_indexes_x_first_and_evaluates_in_chunks():
    axis = grid_axis(9, 1.0)
    assert axis[0] == -1.0 and axis[-1] == 1.0 and axis[4] == 0.0
    field = TranslatedField(primitive_field("sphere", 0.3), (0.5, 0.0, 0.0))
    sigma = density_grid(field, 9, 1.0, points_per_chunk=100)
    expected = density_from_distance(torch.linalg.vector_norm(grid_points(axis) - torch.tensor([0.5, 0, 0]), dim=-1)
                                     - 0.3)
    torch.testing.assert_close(sigma, expected)
    assert sigma[6, 4, 4] > DENSITY_THRESHOLD > sigma[2, 4, 4]  # x = +0.5 is inside, x = −0.5 outside


@pytest.mark.parametrize("shape, size, offset", [
    ("sphere", 0.15, (0.0, 0.0, 0.0)),
    ("cube", 0.2125, (0.03125, 0.0, -0.0625)),
    ("cone", 0.2675, (-0.125, 0.0625, 1 / 64)),
    ("cylinder", 0.3, (0.0, -3 / 64, 0.125)),
])
def test_the_family_search_recovers_each_true_primitive_its_size_and_offset(shape, size, offset):
    """A cube is resolved only to the grid planes (1/64 apart): sizes between two planes have the same occupancy, and
    ties go to the smaller size; the other primitives recover their size exactly."""
    fit = volumetric_iou(primitive_field(shape, size, offset=offset))
    assert fit.iou >= CALIBRATION_MIN_IOU and fit.iou == pytest.approx(1.0)
    assert fit.shape == shape and fit.distance == pytest.approx(0.0)
    assert fit.offset == pytest.approx(offset, abs=1e-6)
    assert fit.density_threshold == DENSITY_THRESHOLD
    if shape == "cube":
        assert size - SPACING < fit.size <= size
    else:
        assert fit.size == pytest.approx(size)
    assert max(v for k, v in fit.iou_by_shape.items() if k != shape) < 0.9


@pytest.mark.parametrize("other", [0.15, 0.25, 0.3])
def test_spheres_of_two_radii_have_iou_the_cubed_ratio(other):
    """Nested spheres: IoU = (r_small / r_large)³; tolerance 0.01 for the 129³ lattice count (measured ≤ 0.007)."""
    size = 0.2
    occupancy = density_grid(primitive_field("sphere", size)) > DENSITY_THRESHOLD
    occupancy_other = density_grid(primitive_field("sphere", other)) > DENSITY_THRESHOLD
    expected = (min(size, other) / max(size, other)) ** 3
    assert float(mask_iou(occupancy[None], occupancy_other[None])) == pytest.approx(expected, abs=0.01)
    fit = fit_primitive(occupancy, sizes=(other,), shapes=("sphere",), max_offset=0.0, offset_step=SPACING)
    assert fit.iou == pytest.approx(float(mask_iou(occupancy[None], occupancy_other[None])))


def test_a_learned_voxel_grid_shaped_as_a_sphere_fits_that_sphere():
    """A :class:`msd.fields.VoxelGridField` (65³ vertices, constant bias 0) whose density channel is the ramp
    ``200 − 4000 d`` of a sphere's signed distance: softplus keeps σ = 200 = τ where the interpolated d = 0, so the fit
    finds the sphere (trilinear interpolation of d errs by O(h²/r))."""
    size = 0.25
    field = VoxelGridField(resolution=65, density_bias=0.0)
    with torch.no_grad():
        vertices = field.vertex_positions().reshape(1, -1, 3)
        distance = signed_distance(torch.tensor([0]), torch.tensor([size]), vertices).reshape(field.grid.shape[1:])
        field.grid[0] = DENSITY_THRESHOLD - 4000.0 * distance
    fit = volumetric_iou(field)
    assert fit.shape == "sphere" and fit.size == pytest.approx(size, abs=0.0025)
    assert fit.offset == pytest.approx((0.0, 0.0, 0.0)) and fit.iou > 0.97
    expected = primitive_occupancy("sphere", fit.size, grid_points(grid_axis()))
    occupancy = density_grid(field) > DENSITY_THRESHOLD
    assert fit.iou == pytest.approx(float(mask_iou(occupancy[None], expected[None])))


def test_bad_search_settings_name_the_field():
    occupancy = torch.zeros(33, 33, 33, dtype=torch.bool)
    with pytest.raises(ValueError, match="max_offset"):
        fit_primitive(occupancy, max_offset=0.05, offset_step=1 / 16)
    with pytest.raises(ValueError, match="offset_step"):
        fit_primitive(occupancy, max_offset=0.0625 * 2, offset_step=0.0625 * 3)
    with pytest.raises(ValueError, match="max_offset"):
        fit_primitive(occupancy, max_offset=0.75, offset_step=1 / 16)
    with pytest.raises(ValueError, match="shapes"):
        fit_primitive(occupancy, shapes=("torus",), max_offset=0.0, offset_step=1 / 16)
    fit = fit_primitive(occupancy, max_offset=0.0, offset_step=1 / 16)
    assert fit.iou == 0.0  # an empty field matches no primitive

"""Turntables, multi-view grids and meshes (experiments/exports.py, docs/design.md §10.7): the files decode back to
what was rendered, within stated tolerances, and are written atomically."""
from __future__ import annotations

import math

import imageio.v2 as imageio_v2
import imageio.v3 as imageio_v3
import numpy as np
import pytest
import torch
import trimesh

from experiments import exports
from experiments.exports import (
    field_mesh,
    turntable_frames,
    write_gif,
    write_mesh,
    write_mp4,
    write_multiview_grid,
    write_turntable,
)
from msd.fields import VoxelGridField
from msd.rendering import CameraDistribution, evaluation_cameras, render_cameras
from shapes.metrics3d_geometry import GRID_RADIUS, GRID_RESOLUTION, primitive_field
from shapes.world3d import BACKGROUND, N_SAMPLES, SCENE_RADIUS, PrimitiveField, Scene

SPACING = 2 * GRID_RADIUS / (GRID_RESOLUTION - 1)


def janus_cube() -> PrimitiveField:
    """A red cube with a blue front: every view of a turntable differs (a GIF merges identical frames)."""
    return PrimitiveField(Scene.from_captions(["a red cube with a blue front"], torch.tensor([0.25])))


def files_in(folder) -> set[str]:
    return {path.name for path in folder.iterdir()}


def test_turntable_mp4_and_gif_decode_to_the_rendered_frames(tmp_path):
    """Frame 0 is the render of the first evaluation camera (azimuth 0) up to 8-bit rounding (≤ ½ of 255). The GIF is
    exact: each frame has ≤ 256 colours, all in Pillow's adaptive palette. The mp4 (H.264, yuv420p, crf 10) is lossy:
    mean |error| ≤ 3 of 255 (measured 1.2) and, since chroma is stored at half resolution, the means over 2×2 pixel
    blocks within 32 of 255 (measured 16 at the red/blue/grey edges)."""
    field, n_views, size = janus_cube(), 8, 64
    mp4, gif = write_turntable(tmp_path / "cube", field, n_views=n_views, height=size, width=size)
    assert files_in(tmp_path) == {"cube.mp4", "cube.gif"}  # no temporary file left
    frames = turntable_frames(field, n_views=n_views, height=size, width=size)
    assert frames.shape == (n_views, size, size, 3) and frames.dtype == np.uint8

    first_camera = evaluation_cameras(CameraDistribution(), 1, size, size, torch.device("cpu"))
    rgb, _, _ = render_cameras(field, first_camera, N_SAMPLES, SCENE_RADIUS, BACKGROUND).images(size, size)
    reference = rgb[0].permute(1, 2, 0).numpy() * 255.0
    assert np.abs(frames[0] - reference).max() <= 0.5 + 1e-3

    gif_frames = imageio_v3.imread(gif, index=None)
    assert gif_frames.shape[:3] == (n_views, size, size)
    assert all(len(np.unique(frame.reshape(-1, 3), axis=0)) <= 256 for frame in frames)
    np.testing.assert_array_equal(gif_frames[..., :3], frames)

    video = np.stack(imageio_v2.mimread(mp4, format="FFMPEG")).astype(float)
    assert video.shape == (n_views, size, size, 3)
    error = np.abs(video - frames)
    assert error.mean() <= 3.0

    def blocks(x):
        return x.reshape(n_views, size // 2, 2, size // 2, 2, 3).mean((2, 4))

    assert np.abs(blocks(video) - blocks(frames.astype(float))).max() <= 32.0
    assert np.abs(video[0] - reference).mean() <= 3.0


def test_the_turntable_turns_counterclockwise_from_the_front():
    """Frame k is azimuth 360k/n: the blue front faces the camera in frame 0 and is out of sight at 180°."""
    frames = turntable_frames(janus_cube(), n_views=4, height=32, width=32).astype(int)
    centre = frames[:, 16, 16]
    assert centre[0, 2] > centre[0, 0] and centre[2, 0] > centre[2, 2]  # blue at 0°, red at 180°


def test_a_failed_video_write_leaves_neither_a_file_nor_a_temporary_file(tmp_path, monkeypatch):
    frames = np.zeros((2, 16, 16, 3), np.uint8)

    class Broken:
        def append_data(self, frame):
            raise RuntimeError("disk full")

        def close(self):
            pass

    monkeypatch.setattr(exports.imageio_v2, "get_writer", lambda *args, **kwargs: Broken())
    with pytest.raises(RuntimeError, match="disk full"):
        write_mp4(tmp_path / "video.mp4", frames)
    assert files_in(tmp_path) == set()
    with pytest.raises(ValueError, match="frames"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="frames"):
        write_gif(tmp_path / "float.gif", np.zeros((2, 16, 16, 3), np.float32))
    assert files_in(tmp_path) == set()


def test_the_multiview_grid_has_one_row_per_field_and_one_column_per_view(tmp_path):
    path = tmp_path / "grid.png"
    figure = write_multiview_grid(path, {"sphere": primitive_field("sphere", 0.2),
                                         "cone": primitive_field("cone", 0.25, colour=2)},
                                  n_views=4, height=24, width=24)
    assert files_in(tmp_path) == {"grid.png"}
    axes = figure.get_axes()
    assert len(axes) == 8
    assert [ax.get_title() for ax in axes[:4]] == ["0°", "90°", "180°", "270°"]
    assert axes[0].get_ylabel() == "sphere" and axes[4].get_ylabel() == "cone"
    image = imageio_v3.imread(path)
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # wider than tall: 4 views by 2 fields


def test_the_mesh_of_a_sphere_is_closed_with_the_sphere_volume_and_radius(tmp_path):
    """Marching cubes at N = 129 (h = 1/64) on σ = τ, the sphere's surface d = 0: the mesh is watertight and wound
    outward, its volume within 1% of 4/3 π r³ (measured −0.25%: an inscribed polyhedron), every vertex within a grid
    cell h of radius r (measured 0.001), coloured red (the albedo of colour 0)."""
    size = 0.25
    mesh = field_mesh(primitive_field("sphere", size))
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * size**3, rel=0.01)
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert np.abs(radii - size).max() < SPACING
    np.testing.assert_array_equal(np.unique(mesh.visual.vertex_colors, axis=0), [[255, 0, 0, 255]])

    obj, glb = write_mesh(tmp_path / "sphere", mesh)
    assert files_in(tmp_path) == {"sphere.obj", "sphere.glb"}
    for path in (obj, glb):
        loaded = trimesh.load(path, force="mesh")
        assert loaded.is_watertight and len(loaded.vertices) == len(mesh.vertices)
        assert loaded.volume == pytest.approx(mesh.volume, rel=1e-4)


def test_the_mesh_follows_a_translated_cube_and_an_empty_field_gives_an_empty_mesh(tmp_path):
    mesh = field_mesh(primitive_field("cube", 0.2, offset=(0.1, 0.0, 0.0)), resolution=65)
    assert mesh.is_watertight
    np.testing.assert_allclose(mesh.bounds, [[-0.1, -0.2, -0.2], [0.3, 0.2, 0.2]], atol=2 / 64)
    empty = field_mesh(VoxelGridField(resolution=8), resolution=17)  # the blob's σ ≤ softplus(5) < τ everywhere
    assert len(empty.vertices) == 0 and len(empty.faces) == 0
    write_mesh(tmp_path / "empty", empty)
    assert files_in(tmp_path) == {"empty.obj", "empty.glb"}

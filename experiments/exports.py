"""What users look at for a text-to-3D result (issue 14 item 7, docs/design.md §10.7): a turntable video (mp4 and GIF),
a multi-view grid figure, and a mesh by marching cubes (.obj and .glb). Every file is written atomically: to a
temporary file in the target's folder, then renamed over it (as experiments/io.py).

* Turntable: :func:`msd.rendering.evaluation_cameras` (azimuths 0, 360/n, …, threestudio's evaluation elevation,
  distance and fovy, light at the camera), rendered one view at a time (:func:`shapes.metrics3d_geometry.
  render_views`), colours in [0, 1] mapped to 8 bits by ``round(255 c)``. mp4: H.264 (libx264, yuv420p, imageio's
  ``quality`` 8 = crf 10) through imageio-ffmpeg, so H and W must be even. GIF: Pillow's adaptive 256-colour palette
  per frame, looping; Pillow merges identical consecutive frames into one (their durations add up).
* Multi-view grid: one row per field, one column per view, the azimuth above each column.
* Mesh: the field's density on the N³ grid over [−R, R]³ (:func:`shapes.metrics3d_geometry.density_grid`), padded
  by one layer of σ = 0 so the surface closes at the box, the isosurface σ = τ (:data:`shapes.metrics3d_geometry.
  DENSITY_THRESHOLD`, the calibrated threshold of the volumetric IoU) by PyMCubes' marching cubes, vertices mapped
  from grid indices v to world ``−R + 2R v/(N − 1)``, coloured by the field's unlit colour (its albedo) at each
  vertex; degenerate faces dropped and duplicate vertices merged by trimesh, faces wound outward (σ > τ inside).
"""
from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import imageio.v2 as imageio_v2
import imageio.v3 as imageio_v3
import mcubes
import numpy as np
import torch
import trimesh
from matplotlib.figure import Figure
from torch import Tensor

from experiments.io import atomic_open, save_figure
from msd.checks import require
from msd.rendering import CameraDistribution, RadianceField, evaluation_cameras
from shapes.metrics3d_geometry import (
    DENSITY_THRESHOLD,
    GRID_RADIUS,
    GRID_RESOLUTION,
    density_grid,
    field_device,
    render_views,
)
from shapes.world3d import BACKGROUND, N_SAMPLES, SCENE_RADIUS

TURNTABLE_VIEWS = 36
"""Frames per turn (10° apart)."""
TURNTABLE_FPS = 12
"""Frames per second: one turn in 3 s."""
TURNTABLE_SIZE = 128
"""Height and width of a turntable frame (pixels)."""
MP4_QUALITY = 8
"""imageio-ffmpeg's quality 0–10; for libx264 it sets ``crf = int((1 − q/10) · 51)`` = 10 (visually lossless)."""
GRID_VIEWS = 8
"""Views of the multi-view grid (45° apart)."""
DEFAULT_CAMERAS = CameraDistribution()
"""threestudio's evaluation views: elevation 15°, distance 1.5, fovy 70° (docs/design.md §10.3)."""

_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder with the same suffix (for writers that take a file name and infer the
    format from it); on success it is renamed to ``path``, on failure deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- turntables ----------------------------------------------------------------------------------------------------


def to_uint8(rgb: Tensor) -> np.ndarray:
    """Images [B, 3, H, W] in [0, 1] → uint8 [B, H, W, 3], ``round(255 · clamp(c, 0, 1))``."""
    return (rgb.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def turntable_frames(field: RadianceField, n_views: int = TURNTABLE_VIEWS, height: int = TURNTABLE_SIZE,
                     width: int = TURNTABLE_SIZE, distribution: CameraDistribution = DEFAULT_CAMERAS,
                     n_samples: int = N_SAMPLES, scene_radius: float = SCENE_RADIUS,
                     background: Sequence[float] | Tensor = BACKGROUND) -> np.ndarray:
    """uint8 frames [n_views, H, W, 3]: ``field`` through :func:`msd.rendering.evaluation_cameras` (frame k at
    azimuth 360 k / n_views degrees) on ``background`` (RGB in [0, 1])."""
    cameras = evaluation_cameras(distribution, n_views, height, width, field_device(field))
    rgb, _ = render_views(field, cameras, n_samples, scene_radius, background)
    return to_uint8(rgb)


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = TURNTABLE_FPS, quality: int = MP4_QUALITY) -> Path:
    """uint8 frames [T, H, W, 3] (H, W even: yuv420p) as an H.264 mp4 at ``fps``, atomically."""
    require(frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8, "frames",
            "uint8 [T, H, W, 3]", (frames.shape, frames.dtype))
    require(frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0, "frames", "an even height and width (yuv420p)",
            frames.shape[1:3])
    with atomic_path(path) as tmp:
        writer = imageio_v2.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=quality,
                                       pixelformat="yuv420p", macro_block_size=1)
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
    return Path(path)


def write_gif(path: str | Path, frames: np.ndarray, fps: float = TURNTABLE_FPS) -> Path:
    """uint8 frames [T, H, W, 3] as a looping GIF (1000/fps ms per frame, Pillow's palette), atomically."""
    require(frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8, "frames",
            "uint8 [T, H, W, 3]", (frames.shape, frames.dtype))
    buffer = io.BytesIO()
    imageio_v3.imwrite(buffer, frames, extension=".gif", duration=1000.0 / fps, loop=0)
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def write_turntable(stem: str | Path, field: RadianceField, n_views: int = TURNTABLE_VIEWS,
                    height: int = TURNTABLE_SIZE, width: int = TURNTABLE_SIZE,
                    distribution: CameraDistribution = DEFAULT_CAMERAS, fps: float = TURNTABLE_FPS,
                    n_samples: int = N_SAMPLES, scene_radius: float = SCENE_RADIUS,
                    background: Sequence[float] | Tensor = BACKGROUND) -> tuple[Path, Path]:
    """``<stem>.mp4`` and ``<stem>.gif`` of :func:`turntable_frames`; returns their paths."""
    frames = turntable_frames(field, n_views, height, width, distribution, n_samples, scene_radius, background)
    stem = Path(stem)
    return (write_mp4(stem.with_name(stem.name + ".mp4"), frames, fps),
            write_gif(stem.with_name(stem.name + ".gif"), frames, fps))


# --- multi-view grids ----------------------------------------------------------------------------------------------


def multiview_figure(images: Mapping[str, np.ndarray], view_titles: Sequence[str] | None = None,
                     cell_inches: float = 1.2) -> Figure:
    """A grid: one row per entry of ``images`` (name → uint8 views [V, H, W, 3], the same V for all), one column per
    view, the name at the left of each row and ``view_titles`` above the columns."""
    require(len(images) >= 1, "images", "at least one field's views", len(images))
    n_views = {views.shape[0] for views in images.values()}
    require(len(n_views) == 1, "images", "the same number of views for every field", sorted(n_views))
    n_views = n_views.pop()
    require(view_titles is None or len(view_titles) == n_views, "view_titles", f"{n_views} titles", view_titles)
    figure = Figure(figsize=(cell_inches * n_views, cell_inches * len(images)))
    axes = figure.subplots(len(images), n_views, squeeze=False)
    for row, (name, views) in enumerate(images.items()):
        for column in range(n_views):
            ax = axes[row, column]
            ax.imshow(views[column], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(name, fontsize=8)
            if row == 0 and view_titles is not None:
                ax.set_title(view_titles[column], fontsize=8)
    figure.subplots_adjust(wspace=0.02, hspace=0.02)
    return figure


def write_multiview_grid(path: str | Path, fields: Mapping[str, RadianceField], n_views: int = GRID_VIEWS,
                         height: int = TURNTABLE_SIZE, width: int = TURNTABLE_SIZE,
                         distribution: CameraDistribution = DEFAULT_CAMERAS, n_samples: int = N_SAMPLES,
                         scene_radius: float = SCENE_RADIUS,
                         background: Sequence[float] | Tensor = BACKGROUND) -> Figure:
    """Render every field from the same ``n_views`` evaluation cameras, build :func:`multiview_figure` (columns
    titled by azimuth) and save it as PNG at ``path`` (experiments/io.py ``save_figure``); returns the figure."""
    images = {name: turntable_frames(field, n_views, height, width, distribution, n_samples, scene_radius,
                                     background) for name, field in fields.items()}
    titles = [f"{360.0 * k / n_views:g}°" for k in range(n_views)]
    figure = multiview_figure(images, titles)
    save_figure(path, figure)
    return figure


# --- meshes --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def field_mesh(field: RadianceField, threshold: float = DENSITY_THRESHOLD, resolution: int = GRID_RESOLUTION,
               radius: float = GRID_RADIUS) -> trimesh.Trimesh:
    """The isosurface σ = ``threshold`` of ``field`` by marching cubes on the N³ grid over [−R, R]³ (module
    docstring), in world units, with per-vertex RGBA colours (uint8) from the field's unlit colour. Empty (no vertex)
    where σ never exceeds the threshold."""
    require(threshold > 0, "threshold", "> 0 (a density, 1 / world unit)", threshold)
    sigma = density_grid(field, resolution, radius).double().cpu().numpy()
    vertices, faces = mcubes.marching_cubes(np.pad(sigma, 1, constant_values=0.0), float(threshold))
    vertices = -radius + (vertices - 1.0) * (2.0 * radius / (resolution - 1))  # undo the padding, index → world
    if len(vertices):
        points = torch.as_tensor(vertices, dtype=torch.float32, device=field_device(field)).unsqueeze(0)
        _, colour = field.density_and_colour(points, None)
        colours = (colour[0].clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()
        colours = np.concatenate([colours, np.full((len(colours), 1), 255, np.uint8)], axis=1)
    else:
        colours = np.zeros((0, 4), np.uint8)
    return trimesh.Trimesh(vertices=vertices, faces=faces.astype(np.int64), vertex_colors=colours, process=True,
                           validate=True)


def write_mesh(stem: str | Path, mesh: trimesh.Trimesh) -> tuple[Path, Path]:
    """``<stem>.obj`` (with vertex colours) and ``<stem>.glb`` of ``mesh``, atomically; returns their paths."""
    stem = Path(stem)
    obj_path, glb_path = stem.with_name(stem.name + ".obj"), stem.with_name(stem.name + ".glb")
    with atomic_open(obj_path, "w") as handle:
        handle.write(mesh.export(file_type="obj"))
    with atomic_open(glb_path, "wb") as handle:
        handle.write(mesh.export(file_type="glb"))
    return obj_path, glb_path

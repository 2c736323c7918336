"""ShapesWorld: a procedural text-to-image world of one coloured primitive on a plain background.

Geometry is in canvas units: the canvas is the unit square ``[0, 1]²`` (x to the right, y down), a
pixel of an ``R × R`` image has its centre at ``((j + ½)/R, (i + ½)/R)``. A shape is given by its
centre ``c = (c_x, c_y)`` and its *size* ``r``, the half-width of its bounding box:

* circle — radius r;
* square — axis-aligned, half-side r;
* triangle — isosceles, apex ``(c_x, c_y − r)``, base from ``(c_x − r, c_y + r)`` to ``(c_x + r, c_y + r)``.

Rendering is anti-aliased through a signed distance d (pixels, negative inside): the coverage of a
pixel is ``sigmoid(−d / softness)``, so the edge ramps over about one pixel and the image is a smooth
function of centre and size (the renderer is differentiable in both). Images are ``[B, 3, R, R]`` in
``[-1, 1]``: ``background + coverage · (colour − background)``.

A world sample draws the size uniformly in ``size_range`` and the centre uniformly over the positions
that keep the bounding box inside the canvas (``c ∈ [r, 1 − r]²``), so every prompt has a continuum of
modes (position × size): averaging them gives a blurry blob, seeking one gives a crisp shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
COLOUR_RGB = {  # in [-1, 1]
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
BACKGROUND = (0.0, 0.0, 0.0)  # mid grey in [-1, 1]
SIZE_RANGE = (0.15, 0.32)  # half-width of the bounding box, canvas units
SOFTNESS = 0.3  # pixels: coverage = sigmoid(−d/softness) goes 16% → 84% across ±0.5 px


def caption(shape: str, colour: str) -> str:
    """The caption of one (shape, colour) pair, e.g. ``caption("circle", "red") == "a red circle"``."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if colour not in COLOURS:
        raise ValueError(f"colour must be one of {COLOURS}, got {colour!r}")
    return f"a {colour} {shape}"


PROMPTS = tuple(caption(shape, colour) for shape in SHAPES for colour in COLOURS)
"""The 12 captions; prompt id ``k`` is shape ``k // 4`` and colour ``k % 4``."""


def parse_caption(text: str) -> tuple[str, str]:
    """Inverse of :func:`caption`: ``"a red circle" -> ("circle", "red")``."""
    words = text.strip().lower().split()
    if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
        raise ValueError(f"caption must read 'a <colour> <shape>' with colour in {COLOURS} and shape in "
                         f"{SHAPES}, got {text!r}")
    return words[2], words[1]


def prompt_id(text: str) -> int:
    """Index of a caption in :data:`PROMPTS`."""
    shape, colour = parse_caption(text)
    return SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)


def split_prompt_ids(prompt_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Prompt ids [B] → (shape ids, colour ids), each [B]."""
    prompt_ids = as_prompt_ids(prompt_ids)
    return prompt_ids // len(COLOURS), prompt_ids % len(COLOURS)


def as_prompt_ids(prompts: Tensor | list | tuple) -> Tensor:
    """Captions (strings) or integer ids → a long tensor of ids in ``[0, 12)``."""
    if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], str):
        return torch.tensor([prompt_id(p) for p in prompts], dtype=torch.long)
    ids = torch.as_tensor(prompts, dtype=torch.long).reshape(-1)
    if ids.numel() and (ids.min() < 0 or ids.max() >= len(PROMPTS)):
        raise ValueError(f"prompt ids must lie in [0, {len(PROMPTS)}), got {ids.tolist()}")
    return ids


@dataclass
class ShapeParams:
    """Per-image parameters of a render: ids [B] (long), centre [B, 2] and size [B] (canvas units)."""

    shape: Tensor
    colour: Tensor
    centre: Tensor
    size: Tensor

    @property
    def prompt_ids(self) -> Tensor:
        return self.shape * len(COLOURS) + self.colour


def signed_distance(shape: Tensor, centre: Tensor, size: Tensor, resolution: int) -> Tensor:
    """Signed distance (pixels, < 0 inside) from every pixel centre to each shape's boundary: [B, R, R].

    The circle and square distances are exact; the triangle uses the max over its three edge
    half-planes (exact inside and next to the edges, which is all the anti-aliasing needs).
    """
    coords = (torch.arange(resolution, dtype=centre.dtype, device=centre.device) + 0.5) / resolution
    px = coords.view(1, 1, -1) - centre[:, 0].view(-1, 1, 1)  # [B, 1, R] offsets from the centre
    py = coords.view(1, -1, 1) - centre[:, 1].view(-1, 1, 1)  # [B, R, 1]
    r = size.view(-1, 1, 1)
    circle = torch.sqrt(px**2 + py**2 + 1e-12) - r
    qx, qy = px.abs() - r, py.abs() - r
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2 + 1e-12)
    square = torch.where((qx > 0) | (qy > 0), outside, torch.maximum(qx, qy))
    # triangle edges: base y = r, and the two slanted sides through the apex (0, −r) and (±r, r),
    # whose outward unit normals are (±2, −1)/√5 with the side passing through (±r/2, 0).
    inv_sqrt5 = 5.0 ** -0.5
    base = py - r
    sides = (2.0 * px.abs() - py - r) * inv_sqrt5
    triangle = torch.maximum(base, sides)
    distance = torch.where(shape.view(-1, 1, 1) == 0, circle, torch.where(shape.view(-1, 1, 1) == 1, square, triangle))
    return distance * resolution


def render(shape: Tensor, colour: Tensor, centre: Tensor, size: Tensor, resolution: int = 32,
           softness: float = SOFTNESS, background: tuple[float, float, float] | Tensor = BACKGROUND) -> Tensor:
    """Render [B, 3, R, R] images in [-1, 1].

    shape, colour: [B] long ids into :data:`SHAPES`, :data:`COLOURS`; centre: [B, 2] (x, y) and size: [B]
    in canvas units (differentiable); softness: edge width in pixels (coverage = sigmoid(−d/softness));
    background: one RGB triple, or [B, 3] per image (the world's is :data:`BACKGROUND`).
    """
    shape, colour = torch.as_tensor(shape, dtype=torch.long), torch.as_tensor(colour, dtype=torch.long)
    batch = shape.shape[0]
    if resolution < 4:
        raise ValueError(f"resolution must be >= 4 pixels, got {resolution}")
    if softness <= 0:
        raise ValueError(f"softness must be > 0 pixels, got {softness}")
    if shape.shape != (batch,) or colour.shape != (batch,) or centre.shape != (batch, 2) or size.shape != (batch,):
        raise ValueError(f"need shape [B], colour [B], centre [B, 2], size [B]; got {tuple(shape.shape)}, "
                         f"{tuple(colour.shape)}, {tuple(centre.shape)}, {tuple(size.shape)}")
    if batch and (shape.min() < 0 or shape.max() >= len(SHAPES)):
        raise ValueError(f"shape ids must lie in [0, {len(SHAPES)}) for {SHAPES}, got {shape.tolist()}")
    if batch and (colour.min() < 0 or colour.max() >= len(COLOURS)):
        raise ValueError(f"colour ids must lie in [0, {len(COLOURS)}) for {COLOURS}, got {colour.tolist()}")
    coverage = torch.sigmoid(-signed_distance(shape, centre, size, resolution) / softness).unsqueeze(1)
    palette = torch.tensor([COLOUR_RGB[name] for name in COLOURS], dtype=centre.dtype, device=centre.device)
    background_rgb = torch.as_tensor(background, dtype=centre.dtype, device=centre.device)
    if background_rgb.shape not in ((3,), (batch, 3)):
        raise ValueError(f"background must be an RGB triple or [B, 3] = [{batch}, 3], got {tuple(background_rgb.shape)}")
    background_rgb = background_rgb.reshape(-1, 3, 1, 1)
    return background_rgb + coverage * (palette[colour].view(batch, 3, 1, 1) - background_rgb)


def render_params(params: ShapeParams, resolution: int = 32, softness: float = SOFTNESS) -> Tensor:
    """:func:`render` for a :class:`ShapeParams`."""
    return render(params.shape, params.colour, params.centre, params.size, resolution, softness)


def sample_params(prompt_ids: Tensor, generator: torch.Generator,
                  size_range: tuple[float, float] = SIZE_RANGE) -> ShapeParams:
    """Random position and size for each prompt id: r ~ U(size_range), c ~ U([r, 1 − r]²)."""
    low, high = size_range
    if not (0.0 < low <= high < 0.5):
        raise ValueError(f"size_range must satisfy 0 < low <= high < 0.5 (canvas units), got {size_range}")
    shape, colour = split_prompt_ids(prompt_ids)
    n = shape.shape[0]
    size = low + (high - low) * torch.rand(n, generator=generator)
    centre = size.unsqueeze(1) + (1.0 - 2.0 * size.unsqueeze(1)) * torch.rand(n, 2, generator=generator)
    return ShapeParams(shape=shape, colour=colour, centre=centre, size=size)


def sample_world(n: int, generator: torch.Generator, prompts: Tensor | list | tuple | None = None,
                 resolution: int = 32, size_range: tuple[float, float] = SIZE_RANGE) -> tuple[Tensor, ShapeParams]:
    """Draw n world images: [n, 3, R, R] in [-1, 1] and their :class:`ShapeParams`.

    prompts: captions or prompt ids (length n, or length 1 to repeat); None draws ids uniformly.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if prompts is None:
        ids = torch.randint(len(PROMPTS), (n,), generator=generator)
    else:
        ids = as_prompt_ids(prompts)
        if ids.numel() == 1:
            ids = ids.expand(n)
        if ids.numel() != n:
            raise ValueError(f"prompts must have length 1 or n={n}, got {ids.numel()}")
    params = sample_params(ids, generator, size_range)
    return render_params(params, resolution), params

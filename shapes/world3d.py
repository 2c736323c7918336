"""ShapesWorld-3D: one coloured primitive at the origin, a text-to-3D world whose truth is known
(docs/design.md §10).

Primitives, in threestudio's z-up world frame (msd/rendering.py), each of *size* r (half of its height, the
half-width of its bounding box):

* sphere — radius r (from the side: a circle);
* cube — axis-aligned, half-side r (a square);
* cone — axis z, apex (0, 0, r), base disc of radius r at z = −r (a triangle, apex up);
* cylinder — axis z, radius r, z ∈ [−r, r] (a square).

Each has an exact signed distance d(p) (world units, < 0 inside). The cone and cylinder are solids of
revolution, so their distance is the exact 2-D distance of ``(ρ, z)``, ``ρ = √(x² + y²)``, to the profile (a
triangle, a square). The density is ``σ = DENSITY_SCALE · sigmoid(−d / EDGE_WIDTH)`` (1 / world unit): σ/2 on
the surface, σ ≈ DENSITY_SCALE a few edge widths inside.

Colour is Lambert-shaded albedo in [0, 1], as threestudio's diffuse material: ``c = albedo · (AMBIENT + DIFFUSE
· max(0, n·l))`` with n = ∇d (unit, exact), l the unit vector from p to the view's point light. The albedo is one
of ShapesWorld's 4 colours (:data:`shapes.world.COLOURS`, mapped from [−1, 1] to [0, 1]); a *Janus probe* ("a red
cube with a blue front") paints the front region ``x > max(|y|, |z|)`` — for the cube exactly its +x face, the
one facing azimuth 0 — in a second colour. Renders use the same renderer as the optimised fields
(:func:`msd.rendering.render_cameras`) on the background :data:`BACKGROUND`; :func:`world_images` maps them to
[−1, 1] like ShapesWorld's 2-D images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from msd.checks import require
from msd.rendering import Cameras, RenderOutput, render_cameras
from shapes.world import COLOUR_RGB, COLOURS

PRIMITIVES = ("sphere", "cube", "cone", "cylinder")
SIDE_VIEW = {"sphere": "circle", "cube": "square", "cone": "triangle", "cylinder": "square"}
"""What each primitive looks like from the side (elevation 0): ShapesWorld's 2-D shapes."""
ALBEDO = torch.tensor([[(v + 1.0) / 2.0 for v in COLOUR_RGB[name]] for name in COLOURS])
"""[4, 3] albedo in [0, 1] of :data:`COLOURS` (red (1, 0, 0), green, blue, yellow (1, 1, 0))."""
SIZE_RANGE = (0.15, 0.30)
"""Sizes r ~ U(SIZE_RANGE) (world units): with threestudio's cameras (distance 1–1.5, fovy 40–70°) a primitive
spans 14–82% of the image's half-height, about ShapesWorld-2D's 30–64% of the half-canvas."""
EDGE_WIDTH = 0.005
"""ε of ``σ = s · sigmoid(−d/ε)`` (world units): 3% of the smallest size, ~1/6 of a 64-sample step in the unit
scene sphere. A grazing ray reaches optical depth ln 2 (opacity ½) about 4ε outside the surface, so silhouettes are
≈ 0.02 wider than the nominal size on each side (docs/design.md §10)."""
DENSITY_SCALE = 400.0
"""s of ``σ = s · sigmoid(−d/ε)`` (1 / world unit): one 64-sample step (δ ≈ 0.03) just inside is opaque."""
AMBIENT, DIFFUSE = 0.1, 0.9
"""Light intensities, threestudio's ``diffuse-with-point-light-material`` defaults."""
BACKGROUND = (0.5, 0.5, 0.5)
"""Mid grey in [0, 1]: ShapesWorld's background (0 in [−1, 1])."""
SCENE_RADIUS = 1.0
"""Rays are sampled inside ``|p| ≤ SCENE_RADIUS`` (threestudio's default geometry radius)."""
N_SAMPLES = 64
"""Samples per ray of the world's renders."""
NO_FRONT = -1
"""``Scene.front_colour`` of a plain primitive."""


def caption(shape: str, colour: str, front: str | None = None) -> str:
    """``"a red cube"``, or for a Janus probe ``"a red cube with a blue front"``."""
    require(shape in PRIMITIVES, "shape", f"one of {PRIMITIVES}", shape)
    require(colour in COLOURS, "colour", f"one of {COLOURS}", colour)
    if front is None:
        return f"a {colour} {shape}"
    require(front in COLOURS and front != colour, "front", f"one of {COLOURS} other than {colour!r}", front)
    return f"a {colour} {shape} with a {front} front"


PROMPTS = tuple(caption(shape, colour) for shape in PRIMITIVES for colour in COLOURS)
"""The 16 plain captions; id k is primitive k // 4, colour k % 4."""
JANUS_PROBES = tuple(caption("cube", colour, front) for colour in COLOURS for front in COLOURS if front != colour)
"""The 12 cube probes "a <colour> cube with a <other colour> front"."""


def parse_caption(text: str) -> tuple[str, str, str | None]:
    """Inverse of :func:`caption`: ``"a red cube with a blue front" -> ("cube", "red", "blue")``."""
    words = text.strip().lower().split()
    plain = len(words) == 3 and words[0] == "a" and words[1] in COLOURS and words[2] in PRIMITIVES
    probe = (len(words) == 7 and words[0] == "a" and words[1] in COLOURS and words[2] in PRIMITIVES
             and words[3:5] == ["with", "a"] and words[5] in COLOURS and words[5] != words[1] and words[6] == "front")
    require(plain or probe, "caption", f"'a <colour> <shape>' or 'a <colour> <shape> with a <other colour> front' "
            f"with colour in {COLOURS} and shape in {PRIMITIVES}", text)
    return words[2], words[1], words[5] if probe else None


@dataclass(frozen=True)
class Scene:
    """B primitives: shape, colour, front_colour [B] long (:data:`NO_FRONT` for a plain one) and size [B]
    (world units, differentiable). A scene of B = 1 is seen by every camera."""

    shape: Tensor
    colour: Tensor
    size: Tensor
    front_colour: Tensor

    def __post_init__(self):
        batch = self.shape.shape[0]
        for name in ("shape", "colour", "size", "front_colour"):
            require(getattr(self, name).shape == (batch,), f"scene.{name}", f"[B] = [{batch}]",
                    tuple(getattr(self, name).shape))
        require(bool(((self.shape >= 0) & (self.shape < len(PRIMITIVES))).all()), "scene.shape",
                f"ids in [0, {len(PRIMITIVES)})", self.shape)
        require(bool(((self.colour >= 0) & (self.colour < len(COLOURS))).all()), "scene.colour",
                f"ids in [0, {len(COLOURS)})", self.colour)
        require(bool(((self.front_colour >= NO_FRONT) & (self.front_colour < len(COLOURS))).all()),
                "scene.front_colour", f"ids in [0, {len(COLOURS)}) or {NO_FRONT}", self.front_colour)

    def __len__(self) -> int:
        return self.shape.shape[0]

    @classmethod
    def from_captions(cls, captions: list[str] | tuple[str, ...], size: Tensor) -> Scene:
        """One primitive per caption with the given sizes [B], on size's device."""
        parsed = [parse_caption(text) for text in captions]

        def ids(values):
            return torch.tensor(values, dtype=torch.long, device=size.device)

        return cls(ids([PRIMITIVES.index(s) for s, _, _ in parsed]), ids([COLOURS.index(c) for _, c, _ in parsed]),
                   size, ids([NO_FRONT if f is None else COLOURS.index(f) for _, _, f in parsed]))


def sample_scenes(captions: list[str] | tuple[str, ...], generator: torch.Generator,
                  size_range: tuple[float, float] = SIZE_RANGE) -> Scene:
    """One scene per caption, sizes r ~ U(size_range) drawn on the generator's device."""
    low, high = size_range
    require(0.0 < low <= high < SCENE_RADIUS / 3**0.5, "size_range",
            f"(low, high) with 0 < low <= high < {SCENE_RADIUS / 3**0.5:.3f} (a cube inside the scene sphere)",
            size_range)
    size = low + (high - low) * torch.rand(len(captions), generator=generator, device=generator.device)
    return Scene.from_captions(captions, size)


# --- geometry --------------------------------------------------------------------------------------------------


def _segment_distance(px: Tensor, py: Tensor, a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
    """Distance from (px, py) to the segment a–b (2-D, broadcast; vector_norm: a zero subgradient at 0, not NaN)."""
    ex, ey = b[0] - a[0], b[1] - a[1]
    wx, wy = px - a[0], py - a[1]
    h = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0)
    return torch.linalg.vector_norm(torch.stack([wx - h * ex, wy - h * ey], dim=-1), dim=-1)


def _box_distance(q: list[Tensor]) -> Tensor:
    """Exact distance to an axis-aligned box, from ``q_i = |p_i| − half_i``: ``|max(q, 0)| + min(max_i q_i, 0)``."""
    outside = torch.linalg.vector_norm(torch.stack(q, dim=-1).clamp(min=0.0), dim=-1)
    inside = torch.stack(q).amax(0).clamp(max=0.0)
    return outside + inside


def sphere_distance(points: Tensor, size: Tensor) -> Tensor:
    """``|p| − r``."""
    return torch.linalg.vector_norm(points, dim=-1) - size


def cube_distance(points: Tensor, size: Tensor) -> Tensor:
    """Box of half-side r."""
    return _box_distance([points[..., i].abs() - size for i in range(3)])


def cylinder_distance(points: Tensor, size: Tensor) -> Tensor:
    """Square profile ``|ρ| ≤ r, |z| ≤ r`` in the meridian plane."""
    radial = torch.linalg.vector_norm(points[..., :2], dim=-1)
    return _box_distance([radial - size, points[..., 2].abs() - size])


def cone_distance(points: Tensor, size: Tensor) -> Tensor:
    """Triangle profile with apex (ρ, z) = (0, r) and base corners (±r, −r): the distance to the nearer of the slanted
    side and the base (for ρ ≥ 0 the mirrored side is never nearer), negative inside (z ≥ −r and 2ρ + z ≤ r)."""
    rho = torch.linalg.vector_norm(points[..., :2], dim=-1)
    z = points[..., 2]
    zero = torch.zeros_like(size)
    apex, corner, base_centre = (zero, size), (size, -size), (zero, -size)
    distance = torch.minimum(_segment_distance(rho, z, apex, corner), _segment_distance(rho, z, base_centre, corner))
    inside = (z >= -size) & (2.0 * rho + z <= size)
    return torch.where(inside, -distance, distance)


_DISTANCES = (sphere_distance, cube_distance, cone_distance, cylinder_distance)


def signed_distance(shape: Tensor, size: Tensor, points: Tensor) -> Tensor:
    """Exact signed distance (world units, < 0 inside) [B, M] of points [B, M, 3] to primitive ``shape[b]`` of size
    ``size[b]`` (shape, size: [B] or [1])."""
    shape, size = shape.view(-1, 1), size.view(-1, 1).to(points.dtype)
    distance = torch.zeros(torch.broadcast_shapes(points.shape[:-1], shape.shape), dtype=points.dtype,
                           device=points.device)
    for index, primitive_distance in enumerate(_DISTANCES):
        if bool((shape == index).any()):
            distance = torch.where(shape == index, primitive_distance(points, size), distance)
    return distance


def density_from_distance(distance: Tensor, scale: float = DENSITY_SCALE, edge_width: float = EDGE_WIDTH) -> Tensor:
    """``σ = scale · sigmoid(−d / edge_width)`` (1 / world unit)."""
    return scale * torch.sigmoid(-distance / edge_width)


class PrimitiveField:
    """A :class:`Scene` as a :class:`msd.rendering.RadianceField`: row b of the points belongs to scene b (or to the
    one scene when B = 1). Colours are Lambert-shaded albedo in [0, 1]; without a light, the albedo itself."""

    def __init__(self, scene: Scene, density_scale: float = DENSITY_SCALE, edge_width: float = EDGE_WIDTH,
                 ambient: float = AMBIENT, diffuse: float = DIFFUSE):
        require(density_scale > 0, "density_scale", "> 0", density_scale)
        require(edge_width > 0, "edge_width", "> 0 (world units)", edge_width)
        self.scene, self.density_scale, self.edge_width = scene, density_scale, edge_width
        self.ambient, self.diffuse = ambient, diffuse

    def signed_distance(self, points: Tensor) -> Tensor:
        return signed_distance(self.scene.shape, self.scene.size, points)

    def density(self, points: Tensor) -> Tensor:
        return density_from_distance(self.signed_distance(points), self.density_scale, self.edge_width)

    def normals(self, points: Tensor) -> Tensor:
        """Unit ∇d [B, M, 3] (exact; autograd through the distance, kept in the graph when the points or the sizes
        require gradients)."""
        keep_graph = torch.is_grad_enabled() and (points.requires_grad or self.scene.size.requires_grad)
        with torch.enable_grad():
            query = points.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self.signed_distance(query).sum(), query, create_graph=keep_graph)
        return F.normalize(gradient, dim=-1)

    def albedo(self, points: Tensor) -> Tensor:
        """[B, M, 3] in [0, 1]: the colour, or the front colour in the region x > max(|y|, |z|) of a probe."""
        palette = ALBEDO.to(device=points.device, dtype=points.dtype)
        colour = palette[self.scene.colour].unsqueeze(1)  # [B, 1, 3]
        front = palette[self.scene.front_colour.clamp(min=0)].unsqueeze(1)
        has_front = (self.scene.front_colour != NO_FRONT).view(-1, 1, 1)
        x, y, z = points.unbind(-1)
        in_front = (x > torch.maximum(y.abs(), z.abs())).unsqueeze(-1)
        return torch.where(has_front & in_front, front, colour)

    def density_and_colour(self, points: Tensor, light_positions: Tensor | None) -> tuple[Tensor, Tensor]:
        albedo = self.albedo(points)
        if light_positions is None:
            return self.density(points), albedo
        to_light = F.normalize(light_positions.unsqueeze(1) - points, dim=-1)
        lambert = (self.normals(points) * to_light).sum(-1, keepdim=True).clamp(min=0.0)
        return self.density(points), albedo * (self.ambient + self.diffuse * lambert)


def render_scenes(scene: Scene, cameras: Cameras, n_samples: int = N_SAMPLES, generator: torch.Generator | None = None,
                  scene_radius: float = SCENE_RADIUS) -> RenderOutput:
    """Render scene b through camera b (or the one scene through every camera) with :func:`msd.rendering.
    render_cameras` on :data:`BACKGROUND`: colours in [0, 1]; ``generator`` jitters the samples (None: midpoints)."""
    require(len(scene) in (1, len(cameras)), "scene", f"1 or one scene per camera ({len(cameras)})", len(scene))
    return render_cameras(PrimitiveField(scene), cameras, n_samples, scene_radius, BACKGROUND, generator)


def world_images(scene: Scene, cameras: Cameras, n_samples: int = N_SAMPLES, generator: torch.Generator | None = None,
                 scene_radius: float = SCENE_RADIUS) -> Tensor:
    """The world's images [B, 3, H, W] in [−1, 1] (ShapesWorld's range; mid-grey background = 0)."""
    rgb, _, _ = render_scenes(scene, cameras, n_samples, generator, scene_radius).images(cameras.height, cameras.width)
    return 2.0 * rgb - 1.0

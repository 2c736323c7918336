"""Learned radiance fields g(ψ) for text-to-3D, their backgrounds, shading and regularisers (docs/design.md §10.6).

Pure math: tensors in, tensors out, no I/O. Points are world positions in threestudio's z-up frame
(msd/rendering.py), in world units; densities σ in 1 / world unit; colours in [0, 1].

The formulas and defaults are threestudio's (Apache-2.0, commit 28d9d80), re-derived from its source, not copied:
``threestudio/models/geometry/{implicit_volume,volume_grid,base}.py`` (geometry), ``models/networks.py`` (MLPs),
``models/materials/diffuse_with_point_light_material.py`` (shading), ``models/background/*.py`` (backgrounds),
``models/renderers/nerf_volume_renderer.py`` (z-variance), ``systems/dreamfusion.py`` (regularisers),
``utils/misc.py::C`` (schedules), ``utils/ops.py`` (activations), ``configs/dreamfusion-sd.yaml`` (weights). The
hash grid follows Instant-NGP (Müller et al. 2022, §3), the encoding threestudio runs through tiny-cuda-nn.

**Fields.** A :class:`VolumeField` maps a point p to a pre-activation density ρ(p) and albedo logits a(p):

* :class:`VoxelGridField` — a dense grid [1 + 3, R, R, R] over the box [−r, r]³, trilinear interpolation;
* :class:`ImplicitVolumeField` — a multiresolution hash grid encoding (:class:`HashGridEncoding`) and two small
  ReLU MLPs, one for ρ and one for a (threestudio's ``implicit-volume``).

Density ``σ(p) = act(ρ(p) + bias(p))`` with the blob bias (``"blob_magic3d"``: ``s (1 − |p|/std)``;
``"blob_dreamfusion"``: ``s exp(−|p|²/(2 std²))``; or a constant) and ``act`` one of :data:`DENSITY_ACTIVATIONS`
(softplus by default). Albedo ``sigmoid(a(p))``. Normals ``n = −∇σ / |∇σ|`` (outward), by forward differences of
σ (threestudio's default ``normal_type``) or by autograd (``"analytic"``).

**Rendering.** A field implements :class:`msd.rendering.RadianceField`: one field shared by every view (row b of
the points [B, M, 3] is lit by view b's light). ``field.with_shading(s)`` is the same field under shading s (see
:class:`DiffuseMaterial`); the field itself renders lambertian.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msd.checks import require
from msd.rendering import RenderOutput

# --- activations -------------------------------------------------------------------------------------------------


class _TruncatedExp(torch.autograd.Function):
    """exp(x) with the gradient exp(min(x, 15)) (threestudio's ``trunc_exp``, from torch-ngp): no overflow in the
    backward pass of a large pre-activation."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


DENSITY_ACTIVATIONS = {
    "softplus": F.softplus,
    "shifted_softplus": lambda x: F.softplus(x - 1.0),
    "exp": torch.exp,
    "trunc_exp": _TruncatedExp.apply,
}
"""threestudio's density activations (``utils/ops.py::get_activation``); ``implicit-volume`` and ``volume-grid``
default to softplus, DreamFusion's own blob pairs with exp."""
DENSITY_BIASES = ("blob_magic3d", "blob_dreamfusion")
NORMAL_TYPES = ("finite_difference", "analytic")
SHADINGS = ("albedo", "lambertian", "textureless")


def _uniform(shape, bound: float, generator: torch.Generator) -> Tensor:
    """U(−bound, bound) on the generator's device."""
    return bound * (2.0 * torch.rand(shape, generator=generator, device=generator.device) - 1.0)


class ReluMLP(nn.Module):
    """threestudio's ``VanillaMLP``: linear layers without bias, ReLU between them, no output activation. Weights
    ~ U(±1/√fan_in) (PyTorch's Linear default), drawn from ``generator`` on its device."""

    def __init__(self, widths: list[int], generator: torch.Generator):
        super().__init__()
        require(len(widths) >= 2 and all(isinstance(w, int) and w >= 1 for w in widths), "mlp widths",
                "at least two integers >= 1", widths)
        self.weights = nn.ParameterList(nn.Parameter(_uniform((fan_out, fan_in), 1.0 / math.sqrt(fan_in), generator))
                                        for fan_in, fan_out in itertools.pairwise(widths))

    def forward(self, x: Tensor) -> Tensor:
        for i, weight in enumerate(self.weights):
            x = x @ weight.T
            if i < len(self.weights) - 1:
                x = torch.relu(x)
        return x


# --- shading -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffuseMaterial:
    """threestudio's ``diffuse-with-point-light-material`` (its defaults; DreamFusion-SD sets ``ambient_only_steps``
    to 2001). With l the unit vector from p to the view's light and n the field's normal:

    * ``"albedo"``: the albedo itself (ambient only);
    * ``"lambertian"`` (threestudio's ``"diffuse"``): ``albedo · (ambient + diffuse · max(0, n·l))``;
    * ``"textureless"``: ``ambient + diffuse · max(0, n·l)`` — grey for grey lights: geometry without texture.

    Training draws one shading per batch (:meth:`sample_shading`): ``"albedo"`` before ``ambient_only_steps``; after
    it ``"albedo"`` with probability 1 − diffuse_prob, ``"textureless"`` with diffuse_prob · textureless_prob and
    ``"lambertian"`` with diffuse_prob · (1 − textureless_prob): 0.25 / 0.375 / 0.375 by default.
    """

    ambient_light_colour: tuple[float, float, float] = (0.1, 0.1, 0.1)
    diffuse_light_colour: tuple[float, float, float] = (0.9, 0.9, 0.9)
    ambient_only_steps: int = 1000
    diffuse_prob: float = 0.75
    textureless_prob: float = 0.5

    def __post_init__(self):
        for name in ("ambient_light_colour", "diffuse_light_colour"):
            require(len(getattr(self, name)) == 3 and all(v >= 0 for v in getattr(self, name)), f"material.{name}",
                    "three values >= 0", getattr(self, name))
        require(isinstance(self.ambient_only_steps, int) and self.ambient_only_steps >= 0,
                "material.ambient_only_steps", "an integer >= 0", self.ambient_only_steps)
        for name in ("diffuse_prob", "textureless_prob"):
            require(0.0 <= getattr(self, name) <= 1.0, f"material.{name}", "in [0, 1]", getattr(self, name))

    def shading_probabilities(self, step: int) -> dict[str, float]:
        """The probability of each shading at ``step``."""
        if step < self.ambient_only_steps:
            return {"albedo": 1.0, "lambertian": 0.0, "textureless": 0.0}
        return {"albedo": 1.0 - self.diffuse_prob, "lambertian": self.diffuse_prob * (1.0 - self.textureless_prob),
                "textureless": self.diffuse_prob * self.textureless_prob}

    def sample_shading(self, step: int, generator: torch.Generator) -> str:
        """One shading for the batch at ``step``: no draw before ``ambient_only_steps``, then one u ~ U[0, 1) on the
        generator's device: albedo if u ≥ diffuse_prob, textureless if u < diffuse_prob · textureless_prob, else
        lambertian (threestudio's two coins folded into one)."""
        if step < self.ambient_only_steps:
            return "albedo"
        u = torch.rand((), generator=generator, device=generator.device).item()
        if u >= self.diffuse_prob:
            return "albedo"
        return "textureless" if u < self.diffuse_prob * self.textureless_prob else "lambertian"

    def shade(self, albedo: Tensor, normals: Tensor | None, points: Tensor, light_positions: Tensor | None,
              shading: str) -> Tensor:
        """Colours [B, M, 3] of albedo [B, M, 3] at points [B, M, 3] with unit normals [B, M, 3] (unused, may be
        None, for ``"albedo"``), lit by one point light per view [B, 3]."""
        require(shading in SHADINGS, "shading", f"one of {SHADINGS}", shading)
        if shading == "albedo":
            return albedo
        require(light_positions is not None and normals is not None, "light_positions",
                f"a light per view for {shading!r} shading", light_positions)
        to_light = F.normalize(light_positions.unsqueeze(1) - points, dim=-1)
        cosine = (normals * to_light).sum(-1, keepdim=True).clamp(min=0.0)
        ambient = torch.tensor(self.ambient_light_colour, dtype=albedo.dtype, device=albedo.device)
        diffuse = torch.tensor(self.diffuse_light_colour, dtype=albedo.dtype, device=albedo.device)
        light = ambient + diffuse * cosine
        return light if shading == "textureless" else albedo * light


# --- fields --------------------------------------------------------------------------------------------------------


class VolumeField(nn.Module):
    """What the voxel grid and the implicit volume share: a pre-activation density ρ(p) and albedo logits a(p)
    inside the box [−radius, radius]³ (subclasses: :meth:`raw`), turned into σ, albedo, normals and colours.

    density_bias: ``"blob_magic3d"`` — ``bias(p) = blob_scale · (1 − |p| / blob_std)`` (Magic3D's init, threestudio's
    default); ``"blob_dreamfusion"`` — ``blob_scale · exp(−|p|² / (2 blob_std²))``; or a number (a constant bias).
    density_activation: a key of :data:`DENSITY_ACTIVATIONS`. normal_type: ``"finite_difference"`` —
    ``n_i ∝ −(σ(p + ε e_i) − σ(p)) / ε`` with the shifted points clamped to the box (threestudio's forward
    differences, ε = normal_eps in world units); ``"analytic"`` — ``n ∝ −∇σ`` by autograd (DreamFusion-SD's
    setting). Both are differentiable in the parameters (not in the points).
    """

    def __init__(self, radius: float, density_bias: str | float, density_blob_scale: float,
                 density_blob_std: float, density_activation: str, normal_type: str, normal_eps: float,
                 material: DiffuseMaterial):
        super().__init__()
        require(radius > 0, "field.radius", "> 0 (world units)", radius)
        require(density_bias in DENSITY_BIASES or isinstance(density_bias, (int, float)) and
                not isinstance(density_bias, bool), "field.density_bias", f"one of {DENSITY_BIASES} or a number",
                density_bias)
        require(density_blob_std > 0, "field.density_blob_std", "> 0 (world units)", density_blob_std)
        require(density_activation in DENSITY_ACTIVATIONS, "field.density_activation",
                f"one of {tuple(DENSITY_ACTIVATIONS)}", density_activation)
        require(normal_type in NORMAL_TYPES, "field.normal_type", f"one of {NORMAL_TYPES}", normal_type)
        require(normal_eps > 0, "field.normal_eps", "> 0 (world units)", normal_eps)
        self.radius, self.density_bias_type = radius, density_bias
        self.density_blob_scale, self.density_blob_std = density_blob_scale, density_blob_std
        self.density_activation, self.normal_type, self.normal_eps = density_activation, normal_type, normal_eps
        self.material = material

    def raw(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """(ρ [B, M], albedo logits [B, M, 3]) at points [B, M, 3]."""
        raise NotImplementedError

    def density_bias(self, points: Tensor) -> Tensor | float:
        """The pre-activation bias at points [B, M, 3] (world units): see the class docstring."""
        if self.density_bias_type == "blob_magic3d":
            return self.density_blob_scale * (1.0 - torch.linalg.vector_norm(points, dim=-1) / self.density_blob_std)
        if self.density_bias_type == "blob_dreamfusion":
            return self.density_blob_scale * torch.exp(-0.5 * (points**2).sum(-1) / self.density_blob_std**2)
        return float(self.density_bias_type)

    def activated_density(self, raw_density: Tensor, points: Tensor) -> Tensor:
        """σ = act(ρ + bias(p))."""
        return DENSITY_ACTIVATIONS[self.density_activation](raw_density + self.density_bias(points))

    def density(self, points: Tensor) -> Tensor:
        """σ [B, M] ≥ 0 at points [B, M, 3]."""
        return self.activated_density(self.raw(points)[0], points)

    def albedo(self, points: Tensor) -> Tensor:
        """sigmoid(a(p)) [B, M, 3]."""
        return torch.sigmoid(self.raw(points)[1])

    def normals(self, points: Tensor) -> Tensor:
        """Unit outward normals −∇σ/|∇σ| [B, M, 3] (``normal_type``)."""
        return self._evaluate(points, with_normals=True)[2]

    def _evaluate(self, points: Tensor, with_normals: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """(σ, albedo, normals or None) from one evaluation of the field at the points (plus 3 shifted ones per point
        for finite differences)."""
        if with_normals and self.normal_type == "analytic":
            keep_graph = torch.is_grad_enabled()
            with torch.enable_grad():
                query = points.detach().requires_grad_(True)
                raw_density, logits = self.raw(query)
                sigma = self.activated_density(raw_density, query)
                (gradient,) = torch.autograd.grad(sigma.sum(), query, create_graph=keep_graph)
            return sigma, torch.sigmoid(logits), F.normalize(-gradient, dim=-1)
        raw_density, logits = self.raw(points)
        sigma = self.activated_density(raw_density, points)
        if not with_normals:
            return sigma, torch.sigmoid(logits), None
        shift = self.normal_eps * torch.eye(3, dtype=points.dtype, device=points.device)
        shifted = (points.unsqueeze(-2) + shift).clamp(-self.radius, self.radius)  # [B, M, 3, 3]
        sigma_shifted = self.density(shifted.flatten(1, 2)).view_as(shifted[..., 0])
        return sigma, torch.sigmoid(logits), F.normalize(-(sigma_shifted - sigma.unsqueeze(-1)) / self.normal_eps,
                                                         dim=-1)

    def shaded_density_and_colour(self, points: Tensor, light_positions: Tensor | None,
                                  shading: str) -> tuple[Tensor, Tensor]:
        """(σ [B, M], colour [B, M, 3]) under ``shading`` (:class:`DiffuseMaterial`); without a light, the albedo."""
        require(shading in SHADINGS, "shading", f"one of {SHADINGS}", shading)
        if light_positions is None and shading != "textureless":
            shading = "albedo"
        sigma, albedo, normals = self._evaluate(points, with_normals=shading != "albedo")
        return sigma, self.material.shade(albedo, normals, points, light_positions, shading)

    def density_and_colour(self, points: Tensor, light_positions: Tensor | None) -> tuple[Tensor, Tensor]:
        """The :class:`msd.rendering.RadianceField` call: lambertian shading (albedo without a light)."""
        return self.shaded_density_and_colour(points, light_positions, "lambertian")

    def with_shading(self, shading: str) -> ShadedField:
        """This field under ``shading`` (one of :data:`SHADINGS`), for :func:`msd.rendering.render_cameras`."""
        require(shading in SHADINGS, "shading", f"one of {SHADINGS}", shading)
        return ShadedField(self, shading)


@dataclass(frozen=True)
class ShadedField:
    """A :class:`VolumeField` seen under one shading: a cheap view sharing the field's parameters."""

    field: VolumeField
    shading: str

    def density(self, points: Tensor) -> Tensor:
        return self.field.density(points)

    def normals(self, points: Tensor) -> Tensor:
        return self.field.normals(points)

    def density_and_colour(self, points: Tensor, light_positions: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.field.shaded_density_and_colour(points, light_positions, self.shading)


class VoxelGridField(VolumeField):
    """ψ = a dense grid ``grid`` [4, R, R, R]: channel 0 is ρ, channels 1–3 the albedo logits, indexed
    ``grid[c, k, j, i]`` at the vertex ``p = −r + 2r (i, j, k) / (R − 1)`` (x along the last axis: grid_sample's
    [C, D, H, W] with coordinates (x, y, z) = p / r, ``align_corners=True``: the outer vertices lie on the box's
    faces; border padding outside). Trilinear interpolation in between, so a field linear in p is reproduced
    exactly.

    threestudio's ``volume-grid`` defaults: zeros at init (albedo ½), a Magic3D blob of scale 5 and std 0.5, softplus,
    forward differences with ε = 10⁻³. Differences: its grid is 100³ and cell-centred (``align_corners=False``, zero
    padding); here R = 64 (the CPU default: ~0.1–0.2 s per 32 px, 64-sample step, issue 14) and vertex-aligned.
    """

    def __init__(self, resolution: int = 64, radius: float = 1.0, density_bias: str | float = "blob_magic3d",
                 density_blob_scale: float = 5.0, density_blob_std: float = 0.5, density_activation: str = "softplus",
                 normal_type: str = "finite_difference", normal_eps: float = 1e-3,
                 material: DiffuseMaterial = DiffuseMaterial(), device: torch.device | str | None = None):
        super().__init__(radius, density_bias, density_blob_scale, density_blob_std, density_activation, normal_type,
                         normal_eps, material)
        require(isinstance(resolution, int) and resolution >= 2, "field.resolution", "an integer >= 2", resolution)
        self.grid = nn.Parameter(torch.zeros(4, resolution, resolution, resolution, device=device))

    def vertex_positions(self) -> Tensor:
        """World positions [R, R, R, 3] of ``grid[:, k, j, i]``, as (x, y, z) = (i, j, k) spacing."""
        axis = torch.linspace(-self.radius, self.radius, self.grid.shape[-1], dtype=self.grid.dtype,
                              device=self.grid.device)
        z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
        return torch.stack([x, y, z], dim=-1)

    def raw(self, points: Tensor) -> tuple[Tensor, Tensor]:
        coordinates = (points / self.radius).reshape(1, 1, 1, -1, 3)
        values = F.grid_sample(self.grid.unsqueeze(0), coordinates, mode="bilinear", padding_mode="border",
                               align_corners=True)  # [1, 4, 1, 1, B·M]
        values = values.reshape(4, -1).T.reshape(*points.shape[:-1], 4)
        return values[..., 0], values[..., 1:]


# --- the hash grid -------------------------------------------------------------------------------------------------

HASH_PRIMES = (1, 2654435761, 805459861)
"""Instant-NGP's π₁, π₂, π₃ of ``h(c) = (c₀π₁ ⊕ c₁π₂ ⊕ c₂π₃) mod T`` (uint32 arithmetic: the low log₂T bits are
those of the int64 products)."""


def spatial_hash(vertices: Tensor, table_size: int) -> Tensor:
    """``(c₀π₁ ⊕ c₁π₂ ⊕ c₂π₃) mod table_size`` of integer vertices [..., 3] (table_size a power of two)."""
    c = vertices.long()
    return ((c[..., 0] * HASH_PRIMES[0]) ^ (c[..., 1] * HASH_PRIMES[1]) ^ (c[..., 2] * HASH_PRIMES[2])) % table_size


_CORNERS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1))


class HashGridEncoding(nn.Module):
    """Instant-NGP's multiresolution hash encoding of x ∈ [0, 1]³, in pure torch.

    Level l (0 … L−1) is a grid of ``N_l = ⌊N_min · b^l⌋`` cells per axis (``+ 10⁻⁶`` in the floor absorbs the rounding
    of b^l), vertices ``c ∈ {0 … N_l}³`` at ``x = c / N_l``, each holding F features in a table of
    ``T_l = min(T, (N_l + 1)³)`` rows: the dense index ``c₀ + c₁ (N_l + 1) + c₂ (N_l + 1)²`` where the grid fits,
    ``(N_l + 1)³ ≤ T``, else :func:`spatial_hash`. A point's level feature is the trilinear interpolation of its
    cell's 8 vertices; the encoding concatenates the L levels: [P, L·F]. Tables ~ U(±10⁻⁴) (Instant-NGP's init).

    Defaults: threestudio's ``implicit-volume`` ``pos_encoding_config`` — L = 16, F = 2, T = 2¹⁹, N_min = 16,
    b = 1.447269237440378 (= 2^{8/15}: N₁₅ = 4096). tiny-cuda-nn, which threestudio runs, places the vertices half a
    cell off (``x · (N_min b^l − 1) + ½``); this follows the paper.
    """

    def __init__(self, generator: torch.Generator, n_levels: int = 16, features_per_level: int = 2,
                 log2_table_size: int = 19, base_resolution: int = 16, per_level_scale: float = 1.447269237440378,
                 init_scale: float = 1e-4):
        super().__init__()
        for name, value in (("n_levels", n_levels), ("features_per_level", features_per_level),
                            ("log2_table_size", log2_table_size), ("base_resolution", base_resolution)):
            require(isinstance(value, int) and value >= 1, f"encoding.{name}", "an integer >= 1", value)
        require(log2_table_size <= 30, "encoding.log2_table_size", "<= 30", log2_table_size)
        require(per_level_scale >= 1.0, "encoding.per_level_scale", ">= 1", per_level_scale)
        self.features_per_level, self.table_size = features_per_level, 2**log2_table_size
        self.resolutions = [math.floor(base_resolution * per_level_scale**level + 1e-6) for level in range(n_levels)]
        self.dense = [(n + 1) ** 3 <= self.table_size for n in self.resolutions]
        self.level_sizes = [(n + 1) ** 3 if dense else self.table_size for n, dense in zip(self.resolutions, self.dense)]
        self.offsets = [sum(self.level_sizes[:level]) for level in range(n_levels)]
        self.table = nn.Parameter(_uniform((sum(self.level_sizes), features_per_level), init_scale, generator))

    @property
    def n_output_dims(self) -> int:
        return len(self.resolutions) * self.features_per_level

    def level_table(self, level: int) -> Tensor:
        """Rows [T_l, F] of ``level``."""
        return self.table[self.offsets[level]:self.offsets[level] + self.level_sizes[level]]

    def vertex_index(self, vertices: Tensor, level: int) -> Tensor:
        """Row of integer vertices [..., 3] in ``level``'s table: dense or hashed (class docstring)."""
        if self.dense[level]:
            side = self.resolutions[level] + 1
            return vertices[..., 0] + side * (vertices[..., 1] + side * vertices[..., 2])
        return spatial_hash(vertices, self.table_size)

    def forward(self, x: Tensor) -> Tensor:
        """[P, L·F] features of x [P, 3] in [0, 1]³."""
        corners = torch.tensor(_CORNERS, device=x.device)  # [8, 3]
        levels = []
        for level, resolution in enumerate(self.resolutions):
            position = x * resolution
            cell = position.floor().clamp(0, resolution - 1)
            fraction = (position - cell).unsqueeze(1)  # [P, 1, 3]
            vertices = cell.long().unsqueeze(1) + corners  # [P, 8, 3]
            weights = torch.where(corners.bool(), fraction, 1.0 - fraction).prod(-1)  # [P, 8]
            rows = F.embedding(self.vertex_index(vertices, level) + self.offsets[level], self.table)  # [P, 8, F]
            levels.append((weights.unsqueeze(-1) * rows).sum(1))
        return torch.cat(levels, dim=-1)


class ImplicitVolumeField(VolumeField):
    """threestudio's ``implicit-volume``: x = (p / r + 1) / 2 ∈ [0, 1]³ (clamped) → :class:`HashGridEncoding` →
    a density MLP (→ ρ) and a feature MLP (→ albedo logits), each ``L·F → hidden (ReLU) → out``, no biases.

    Defaults (``implicit-volume`` Config): the encoding's (see its docstring); 64 neurons, 1 hidden layer;
    ``"blob_magic3d"`` with scale 10 and std 0.5; softplus; forward-difference normals with ε = 0.01; radius 1
    (threestudio's ``BaseImplicitGeometry``; DreamFusion-SD uses 2). At init the MLPs see features ~10⁻⁴, so
    σ ≈ act(bias(p)): the blob. threestudio's DreamFusion-SD also unmasks the levels progressively (8 at first, one
    more every 500 steps from step 2000); not built here.
    """

    def __init__(self, generator: torch.Generator, radius: float = 1.0, n_levels: int = 16,
                 features_per_level: int = 2, log2_table_size: int = 19, base_resolution: int = 16,
                 per_level_scale: float = 1.447269237440378, hidden: int = 64, hidden_layers: int = 1,
                 density_bias: str | float = "blob_magic3d", density_blob_scale: float = 10.0,
                 density_blob_std: float = 0.5, density_activation: str = "softplus",
                 normal_type: str = "finite_difference", normal_eps: float = 0.01,
                 material: DiffuseMaterial = DiffuseMaterial()):
        super().__init__(radius, density_bias, density_blob_scale, density_blob_std, density_activation, normal_type,
                         normal_eps, material)
        require(isinstance(hidden_layers, int) and hidden_layers >= 1, "field.hidden_layers", "an integer >= 1",
                hidden_layers)
        self.encoding = HashGridEncoding(generator, n_levels, features_per_level, log2_table_size, base_resolution,
                                         per_level_scale)
        widths = [self.encoding.n_output_dims] + [hidden] * hidden_layers
        self.density_network = ReluMLP(widths + [1], generator)
        self.albedo_network = ReluMLP(widths + [3], generator)

    def raw(self, points: Tensor) -> tuple[Tensor, Tensor]:
        x = ((points / self.radius + 1.0) / 2.0).clamp(0.0, 1.0)
        features = self.encoding(x.reshape(-1, 3))
        return (self.density_network(features).reshape(points.shape[:-1]),
                self.albedo_network(features).reshape(*points.shape[:-1], 3))


# --- backgrounds ---------------------------------------------------------------------------------------------------


def spherical_harmonics(directions: Tensor) -> Tensor:
    """The 9 real spherical harmonics of degree < 3 [..., 9] of unit directions [..., 3] (tiny-cuda-nn's
    ``SphericalHarmonics`` with ``degree: 3``, the order and signs of its table)."""
    x, y, z = directions.unbind(-1)
    return torch.stack([
        torch.full_like(x, 0.28209479177387814),
        -0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x,
        1.0925484305920792 * x * y, -1.0925484305920792 * y * z, 0.94617469575756008 * z * z - 0.31539156525252005,
        -1.0925484305920792 * x * z, 0.54627421529603959 * (x * x - y * y),
    ], dim=-1)


class EnvironmentMapBackground(nn.Module):
    """threestudio's ``neural-environment-map-background``: ``c(d) = sigmoid(MLP(SH(d)))`` of the unit ray direction
    d, with :func:`spherical_harmonics` and a :class:`ReluMLP` 9 → 16 → 16 → 3 (16 neurons, 2 hidden layers)."""

    def __init__(self, generator: torch.Generator, hidden: int = 16, hidden_layers: int = 2):
        super().__init__()
        require(isinstance(hidden_layers, int) and hidden_layers >= 1, "background.hidden_layers",
                "an integer >= 1", hidden_layers)
        self.network = ReluMLP([9] + [hidden] * hidden_layers + [3], generator)

    def forward(self, directions: Tensor) -> Tensor:
        """Colours [..., 3] in (0, 1) of unit directions [..., 3]."""
        return torch.sigmoid(self.network(spherical_harmonics(directions)))


class SolidBackground(nn.Module):
    """threestudio's ``solid-color-background``: one colour (white by default), a parameter when ``learned``."""

    def __init__(self, colour: tuple[float, float, float] = (1.0, 1.0, 1.0), learned: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        require(len(colour) == 3, "background.colour", "three values in [0, 1]", colour)
        value = torch.tensor(colour, dtype=torch.float32, device=device)
        if learned:
            self.colour = nn.Parameter(value)
        else:
            self.register_buffer("colour", value)

    def forward(self, directions: Tensor) -> Tensor:
        """The colour [..., 3] for every direction [..., 3]."""
        return self.colour.to(directions.dtype).expand(*directions.shape[:-1], 3)


def random_background(colours: Tensor, generator: torch.Generator, probability: float = 0.5) -> Tensor:
    """threestudio's background augmentation (``random_aug``): with ``probability`` (one coin per batch) every view's
    background [B, N, 3] becomes one uniform random colour per view, else it is kept. Draws on colours' device.
    threestudio's default probability is 0.5, on in its ProlificDreamer config and off in DreamFusion-SD's."""
    require(0.0 <= probability <= 1.0, "random_background.probability", "in [0, 1]", probability)
    coin = torch.rand((), generator=generator, device=colours.device, dtype=colours.dtype)
    random = torch.rand((colours.shape[0], 1, 3), generator=generator, device=colours.device, dtype=colours.dtype)
    return torch.where(coin < probability, random.expand_as(colours), colours)


# --- regularisers --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduledWeight:
    """threestudio's ``C([start_step, start_value, end_value, end_step])``: ``start_value`` up to ``start_step``,
    linear to ``end_value`` at ``end_step``, constant after (a plain number is :meth:`constant`)."""

    start_step: int
    start_value: float
    end_value: float
    end_step: int

    def __post_init__(self):
        require(self.end_step >= self.start_step, "schedule.end_step", f">= start_step ({self.start_step})",
                self.end_step)

    @classmethod
    def constant(cls, value: float) -> ScheduledWeight:
        return cls(0, value, value, 0)

    def __call__(self, step: int) -> float:
        if step >= self.end_step:
            return self.end_value
        if step <= self.start_step:
            return self.start_value
        fraction = (step - self.start_step) / (self.end_step - self.start_step)
        return self.start_value + (self.end_value - self.start_value) * fraction


def orientation_loss(weights: Tensor, normals: Tensor, directions: Tensor, opacity: Tensor) -> Tensor:
    """DreamFusion's orientation loss as threestudio computes it: ``Σ_{rays, samples} sg(w) max(0, n·d)² / #{A > 0}``
    with rendering weights w [B, N, S] (detached), unit normals [B, N, S, 3], ray directions d [B, N, 3] (from the
    camera) and opacities A [B, N]: normals facing away from the camera are penalised."""
    facing_away = (normals * directions.unsqueeze(2)).sum(-1).clamp(min=0.0)
    return (weights.detach() * facing_away**2).sum() / (opacity > 0).sum().clamp(min=1)


def sparsity_loss(opacity: Tensor) -> Tensor:
    """threestudio's sparsity loss ``mean √(A² + 0.01)``, a smoothed mean opacity."""
    return torch.sqrt(opacity**2 + 0.01).mean()


def opaque_loss(opacity: Tensor, eps: float = 1e-3) -> Tensor:
    """threestudio's opaque loss: the mean binary entropy ``−(A log A + (1 − A) log(1 − A))`` of the opacity clamped
    to [eps, 1 − eps] (eps = 10⁻³ keeps the gradient finite; eps = 0: exactly 0 at A ∈ {0, 1}); maximal, ln 2, at ½."""
    clamped = opacity.clamp(eps, 1.0 - eps)
    return -(torch.xlogy(clamped, clamped) + torch.xlogy(1.0 - clamped, 1.0 - clamped)).mean()


def z_variance_loss(weights: Tensor, t_mid: Tensor, opacity: Tensor) -> Tensor:
    """HiFA's z-variance as threestudio computes it: per ray, with ŵ = w / max(A, 10⁻⁵), the variance
    ``Σ ŵ (t − Σ ŵ t)²`` of the sample depths t_mid [B, N, S]; the mean over rays with A > ½ (0 if none)."""
    normalised = weights / opacity.clamp(min=1e-5).unsqueeze(-1)
    mean_depth = (normalised * t_mid).sum(-1, keepdim=True)
    variance = (normalised * (t_mid - mean_depth) ** 2).sum(-1)
    solid = opacity > 0.5
    return variance[solid].sum() / solid.sum().clamp(min=1)


@dataclass(frozen=True)
class RegulariserWeights:
    """The weights λ(step) of the regularisers: threestudio's DreamFusion-SD ``loss`` section
    (``lambda_orient: [0, 10., 1000., 5000]``, ``lambda_sparsity: 1.``, ``lambda_opaque: 0.``; z-variance off:
    HiFA's config uses 100, ProlificDreamer's ``lambda_opaque`` is ``[10000, 0, 1000, 10001]``)."""

    orient: ScheduledWeight = ScheduledWeight(0, 10.0, 1000.0, 5000)
    sparsity: ScheduledWeight = ScheduledWeight(0, 1.0, 1.0, 0)
    opaque: ScheduledWeight = ScheduledWeight(0, 0.0, 0.0, 0)
    z_variance: ScheduledWeight = ScheduledWeight(0, 0.0, 0.0, 0)


def regularisation(field: VolumeField | ShadedField, render: RenderOutput, directions: Tensor,
                   weights: RegulariserWeights, step: int) -> tuple[Tensor, dict[str, Tensor]]:
    """``Σ_k λ_k(step) L_k`` over the regularisers whose weight is non-zero at ``step``, and those L_k by name.
    ``render`` is the field's render with ray directions [B, N, 3]; the orientation loss evaluates the field's normals
    at ``render.points`` (an extra field evaluation, only while λ_orient > 0)."""
    terms = {}
    if weights.orient(step) != 0:
        normals = field.normals(render.points.flatten(1, 2))
        terms["orient"] = orientation_loss(render.weights, normals.view_as(render.points), directions, render.opacity)
    if weights.sparsity(step) != 0:
        terms["sparsity"] = sparsity_loss(render.opacity)
    if weights.opaque(step) != 0:
        terms["opaque"] = opaque_loss(render.opacity)
    if weights.z_variance(step) != 0:
        terms["z_variance"] = z_variance_loss(render.weights, render.t_mid, render.opacity)
    total = sum((getattr(weights, name)(step) * loss for name, loss in terms.items()),
                torch.zeros((), dtype=render.opacity.dtype, device=render.opacity.device))
    return total, terms

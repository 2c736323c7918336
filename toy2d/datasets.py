"""The paper's other two toy datasets, spiral and pinwheel, as Gaussian mixtures, and the dataset registry.

Both are built here from their classic descriptions, as exact mixtures (float64 weights, means and
covariances, like :func:`toy2d.fractal_gmm`), so that every exact quantity of the toy (heat-diffused
``log_prob`` / ``score``, sampling, product-with-kernel sampling, modes) applies to them unchanged. Both
are centred at ``CENTER`` = (0.3, 0.3), the centre of the toy canvas (``conf/task/toy2d.yaml``: half-size
1.2, i.e. [−0.9, 1.5]²), and stay within ≈ 0.95 of it (every component mean within 0.90; the farthest of 200,000 exact
samples 0.93 for the spiral, 0.90 for the pinwheel), so the toy's default canvas fits both. Neither has classes: the only ``classes`` value
is ``"all"``.

**spiral** (:func:`spiral_gmm`): two Archimedean arms ``r(θ) = R₀ + (R₁ − R₀) θ / Θ``, θ ∈ [0, Θ], with
R₀ = 0.3, R₁ = 0.9, Θ = 2.5π (1.25 turns), the second arm the first rotated by π (the classic "two
spirals"), so neighbouring windings are (R₁ − R₀) π / Θ = 0.24 apart. Each arm (length ≈ 4.71) is cut at
equal arc length (measured on a fine θ grid) into ``_SPIRAL_SEGMENTS`` = 32 chords of length L ≈ 0.147; a
chord from ``a`` to ``b`` (unit direction d, normal n) carries 8 components with means ``a + u (b − a)``,
u ∈ linspace(0.15, 0.85, 8) (spacing h = 0.1 L ≈ 0.0147), one weight (every chord the same, so the mass
per arc length is uniform) and one covariance ``s_∥² d dᵀ + s_⊥² n nᵀ`` with s_∥ = h along the chord and
s_⊥ = ``_SPIRAL_THICKNESS`` = 0.01 across it. Within a chord the 8 components merge into one smooth bump
(spacing = s_∥); across a join the gap is 0.3 L = 3 s_∥, so the density dips there and every chord is one
distinct mode at small bandwidth (64 at λ = 0.01; the fractal's branches behave alike). The 8 components
of a chord share weight and covariance and have evenly stepped means: a chain of the compiled kernel
(``chains()`` = (64, 8)). 2 × 32 × 8 = 512 components; every mean within 0.90 of the centre.

**pinwheel** (:func:`pinwheel_gmm`): the pinwheel of Johnson et al. 2016 (SVAE), five blades. A blade
j ∈ {0, …, 4} is the image of a latent ``(ρ, t) ~ N(1, σ_ρ²) ⊗ N(0, σ_t²)`` (σ_ρ = 0.3 radial, σ_t = 0.05
tangential) under ``x = c + S · R(φ_j + κ e^ρ) (ρ, t)ᵀ`` with φ_j = 2π j / 5, rate κ = 0.25 (the warp
that bends the blades), R(α) the rotation by α, scale S = 0.45 and centre c = ``CENTER``. As a mixture,
ρ is discretised at M = ``_PINWHEEL_PER_BLADE`` = 48 points ρ_m evenly spaced on [1 − 3σ_ρ, 1 + 3σ_ρ]
(spacing Δ = 1.8 / 47): component m has latent covariance diag(τ², σ_t²) with τ = Δ (neighbours merge
smoothly), weight ∝ N(ρ_m; 1, σ_ρ² − τ²) (so the blade's ρ-marginal is the discretised N(1, σ_ρ²)), mean
the image of (ρ_m, 0) and covariance ``J diag(τ², σ_t²) Jᵀ``, J the Jacobian of the map at (ρ_m, 0)
(``∂x/∂ρ = S R (1, κ e^ρ ρ)ᵀ``, ``∂x/∂t = S R (0, 1)ᵀ``: the warp linearised over one component, off by
< 0.003 at ρ_m ± τ, against a tangential std of S σ_t = 0.0225). Each blade is one smooth,
curved, unimodal ridge: 5 modes at small bandwidth. 5 × 48 = 240 components, every covariance different
(``chains()`` = (240, 1)).

:func:`toy_mixture` is the registry: ``toy_mixture("fractal", "A")`` is :func:`toy2d.fractal_gmm`,
``toy_mixture("spiral", "all")`` and ``toy_mixture("pinwheel", "all")`` the two above.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from toy2d.fractal import CLASSES as FRACTAL_CLASSES
from toy2d.fractal import fractal_gmm
from toy2d.gmm import GaussianMixture

CENTER = np.array([0.3, 0.3])
"""Centre of both datasets: the toy canvas's centre."""
DATASETS = ("fractal", "spiral", "pinwheel")
ALL = "all"
"""The one ``classes`` value of the datasets without classes."""
DATASET_CLASSES = {"fractal": FRACTAL_CLASSES, "spiral": (ALL,), "pinwheel": (ALL,)}

_SPIRAL_ARMS, _SPIRAL_R0, _SPIRAL_R1, _SPIRAL_TURNS = 2, 0.3, 0.9, 1.25
_SPIRAL_SEGMENTS = 32
_SPIRAL_THICKNESS = 0.01
_SPIRAL_U = np.linspace(0.15, 0.85, 8)
_SPIRAL_ALONG = 1.0  # s_∥ in units of the within-chord spacing h

_PINWHEEL_BLADES, _PINWHEEL_PER_BLADE = 5, 48
_PINWHEEL_RADIAL, _PINWHEEL_TANGENTIAL, _PINWHEEL_RATE, _PINWHEEL_SCALE = 0.3, 0.05, 0.25, 0.45


def _rotation(angle: float) -> np.ndarray:
    return np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])


def _mixture(weights: list, means: list, covs: list) -> GaussianMixture:
    return GaussianMixture(torch.tensor(np.array(weights, dtype=np.float64)),
                           torch.tensor(np.array(means, dtype=np.float64)),
                           torch.tensor(np.array(covs, dtype=np.float64)))


def _spiral_cuts() -> np.ndarray:
    """[S + 1, 2] points of one arm (arm 0, relative to the centre) at equal arc length from θ = 0 to Θ."""
    theta_max = 2 * math.pi * _SPIRAL_TURNS
    theta = np.linspace(0.0, theta_max, 200_001)
    radius = _SPIRAL_R0 + (_SPIRAL_R1 - _SPIRAL_R0) * theta / theta_max
    curve = np.stack((radius * np.cos(theta), radius * np.sin(theta)), axis=1)
    arc = np.concatenate(([0.0], np.cumsum(np.linalg.norm(np.diff(curve, axis=0), axis=1))))
    at = np.interp(np.linspace(0.0, arc[-1], _SPIRAL_SEGMENTS + 1), arc, theta)
    radius = _SPIRAL_R0 + (_SPIRAL_R1 - _SPIRAL_R0) * at / theta_max
    return np.stack((radius * np.cos(at), radius * np.sin(at)), axis=1)


def spiral_gmm(classes: str = ALL) -> GaussianMixture:
    """The two-armed spiral (module docstring): 512 components in 64 chains of 8. Cached (one object)."""
    _check_classes("spiral", classes)
    return _spiral()


@functools.lru_cache(maxsize=None)
def _spiral() -> GaussianMixture:
    cuts = _spiral_cuts()
    weights, means, covs = [], [], []
    for arm in range(_SPIRAL_ARMS):
        points = cuts @ _rotation(2 * math.pi * arm / _SPIRAL_ARMS).T + CENTER
        for a, b in zip(points[:-1], points[1:]):
            chord = b - a
            length = float(np.linalg.norm(chord))
            d = chord / length
            n = np.array([-d[1], d[0]])
            along = _SPIRAL_ALONG * length * (_SPIRAL_U[-1] - _SPIRAL_U[0]) / (len(_SPIRAL_U) - 1)
            cov = along**2 * np.outer(d, d) + _SPIRAL_THICKNESS**2 * np.outer(n, n)
            for u in _SPIRAL_U:
                weights.append(1.0)
                means.append(a + u * chord)
                covs.append(cov)
    return _mixture(weights, means, covs)


def pinwheel_gmm(classes: str = ALL) -> GaussianMixture:
    """The five-bladed pinwheel of Johnson et al. 2016 (module docstring): 240 components. Cached (one object)."""
    _check_classes("pinwheel", classes)
    return _pinwheel()


@functools.lru_cache(maxsize=None)
def _pinwheel() -> GaussianMixture:
    rho = np.linspace(1 - 3 * _PINWHEEL_RADIAL, 1 + 3 * _PINWHEEL_RADIAL, _PINWHEEL_PER_BLADE)
    tau = rho[1] - rho[0]
    log_w = -0.5 * (rho - 1) ** 2 / (_PINWHEEL_RADIAL**2 - tau**2)
    latent_cov = np.diag([tau**2, _PINWHEEL_TANGENTIAL**2])
    weights, means, covs = [], [], []
    for blade in range(_PINWHEEL_BLADES):
        base = 2 * math.pi * blade / _PINWHEEL_BLADES
        for r, lw in zip(rho, log_w):
            rot = _rotation(base + _PINWHEEL_RATE * math.exp(r))
            jac = _PINWHEEL_SCALE * rot @ np.array([[1.0, 0.0], [_PINWHEEL_RATE * math.exp(r) * r, 1.0]])
            weights.append(math.exp(lw))
            means.append(CENTER + _PINWHEEL_SCALE * rot @ np.array([r, 0.0]))
            covs.append(jac @ latent_cov @ jac.T)
    return _mixture(weights, means, covs)


def _check_classes(dataset: str, classes: str) -> None:
    allowed = DATASET_CLASSES[dataset]
    if classes not in allowed:
        raise ValueError(f"classes of the {dataset} mixture must be one of {allowed}, got {classes!r}")


def toy_mixture(dataset: str = "fractal", classes: str = "A") -> GaussianMixture:
    """The mixture of toy ``dataset`` (one of :data:`DATASETS`) restricted to ``classes`` (one of
    ``DATASET_CLASSES[dataset]``: "A", "B", "AB" for the fractal, "all" for spiral and pinwheel). Cached."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    _check_classes(dataset, classes)
    return {"fractal": fractal_gmm, "spiral": spiral_gmm, "pinwheel": pinwheel_gmm}[dataset](classes)


def target_classes(dataset: str, target_class: str) -> str:
    """The ``classes`` a toy task with ``task.dataset`` and ``task.target_class`` scores against: the target
    class for the fractal, "all" for the datasets without classes (whose ``target_class`` is not used)."""
    return target_class if dataset == "fractal" else ALL


def target_mixture(dataset: str, target_class: str) -> GaussianMixture:
    """The mixture a toy task scores against: :func:`toy_mixture` of :func:`target_classes`."""
    return toy_mixture(dataset, target_classes(dataset, target_class))


def task_dataset(task) -> str:
    """``dataset`` of a toy task config (any mapping with ``get``); "fractal" for runs made before it existed."""
    return str(task.get("dataset", "fractal"))

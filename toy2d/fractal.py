"""The fractal two-class Gaussian mixture of Karras et al. 2024 (Autoguidance, 2D toy).

Re-derived from the published description (the original code is CC BY-NC-SA; none is copied here).
Each class is a binary tree of branches grown from ``origin``; class A from root angle π/4, class B
from 5π/4. A branch at depth d (0 ≤ d ≤ 6) with start ``pos`` and angle θ has

    dir   = (cos θ, sin θ)
    dist  = 0.292 · 0.8^d · (1 + 0.2 n₁)            n₁ ~ N(0, 1)
    thick = 0.2 · 0.8^d / dist,    size = scale · dist · 0.06   (per axis)

and is drawn as 8 Gaussians at u ∈ linspace(0.07, 0.93, 8): weight ``dist · 0.5^d``, mean
``(pos + u · dist · dir) ⊙ scale`` and covariance ``(dir dirᵀ + thick² (I − dir dirᵀ)) ⊙ size sizeᵀ``.
It then grows two children from ``pos + dist · dir`` with angles ``θ ± 0.7^d (1 + 0.2 n)``, the +
child first. All normals come from one ``np.random.RandomState(2)`` in depth-first order (the branch's
dist draw, then each child's angle draw immediately before that child recurses); class A is always
built before class B so both classes see the same random stream. 127 branches × 8 = 1016 components
per class. ``origin`` and ``scale`` make the two-class mixture have mean ≈ 0 and std ≈ 0.5 per axis.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from toy2d.gmm import GaussianMixture

CLASSES = ("A", "B", "AB")
_SEED = 2
_ORIGIN = np.array([0.0030, 0.0325])
_SCALE = np.array([1.3136, 1.3844])
_DEPTH = 7
_ROOT_ANGLES = {"A": np.pi / 4, "B": 5 * np.pi / 4}


def _grow(rng: np.random.RandomState, label: str, depth: int, pos: np.ndarray, angle: float, out: list) -> None:
    """Append the components of one branch and, depth-first, of its descendants to ``out``."""
    if depth >= _DEPTH:
        return
    direction = np.array([np.cos(angle), np.sin(angle)])
    dist = 0.292 * 0.8**depth * (1 + 0.2 * rng.randn())
    thick = 0.2 * 0.8**depth / dist
    size = _SCALE * dist * 0.06
    along = np.outer(direction, direction)
    cov = (along + (np.eye(2) - along) * thick**2) * np.outer(size, size)
    for u in np.linspace(0.07, 0.93, 8):
        out.append((label, dist * 0.5**depth, (pos + direction * dist * u) * _SCALE, cov))
    for sign in (1, -1):
        child_angle = angle + sign * 0.7**depth * (1 + 0.2 * rng.randn())
        _grow(rng, label, depth + 1, pos + direction * dist, child_angle, out)


@functools.lru_cache(maxsize=None)
def fractal_gmm(classes: str = "A") -> GaussianMixture:
    """The fractal mixture restricted to ``classes`` ("A", "B" or "AB"; weights renormalised). Cached."""
    if classes not in CLASSES:
        raise ValueError(f"classes must be one of {CLASSES}, got {classes!r}")
    rng = np.random.RandomState(_SEED)
    comps: list = []
    for label in ("A", "B"):
        _grow(rng, label, 0, _ORIGIN, _ROOT_ANGLES[label], comps)
    comps = [c for c in comps if c[0] in classes]
    weights = torch.tensor(np.array([c[1] for c in comps]))
    means = torch.tensor(np.stack([c[2] for c in comps]))
    covs = torch.tensor(np.stack([c[3] for c in comps]))
    return GaussianMixture(weights, means, covs)

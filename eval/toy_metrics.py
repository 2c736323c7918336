"""Metrics of 2D particles against the exact target density p (the class-A fractal mixture).

* ``nll``: mean of −log p(x) over the particles (σ = 0, nats); ``nll_median``: its median (robust to
  the few particles left far from the data, whose −log p grows quadratically with distance).
* ``in_hdr``: fraction of particles inside the 95% highest-density region
  ``R = {x : log p(x) ≥ ℓ}``, where ℓ is the level with ``P_{y∼p}(log p(y) ≥ ℓ) = 0.95``. ℓ is a
  Monte-Carlo estimate: the 5% quantile of log p over ``n_reference`` exact samples of p (for 200k
  samples its error in probability mass is about √(0.05·0.95/200000) ≈ 0.0005).
"""
from __future__ import annotations

import torch
from torch import Tensor


class ToyEvaluator:
    """Scores particles [N, 2] against a mixture with exact ``log_prob(x, sigma)`` and ``sample(n, generator=)``."""

    def __init__(self, mixture, n_reference: int = 200_000, seed: int = 0, hdr_mass: float = 0.95):
        if n_reference < 1:
            raise ValueError(f"task.eval.n_reference must be >= 1, got {n_reference!r}")
        if not 0.0 < hdr_mass < 1.0:
            raise ValueError(f"task.eval.hdr_mass must be in (0, 1), got {hdr_mass!r}")
        self.mixture, self.hdr_mass = mixture, float(hdr_mass)
        reference = mixture.sample(n_reference, generator=torch.Generator().manual_seed(seed))
        self.reference_log_prob = self.log_prob(reference)
        self.hdr_level = float(torch.quantile(self.reference_log_prob, 1.0 - self.hdr_mass))

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) at σ = 0 in float64, [N]."""
        return self.mixture.log_prob(x.detach().double().cpu(), 0.0).double()

    @property
    def entropy(self) -> float:
        """Monte-Carlo estimate of the differential entropy H(p) = E_p[−log p] (the NLL of ideal samples)."""
        return float(-self.reference_log_prob.mean())

    def __call__(self, x: Tensor) -> dict[str, float]:
        log_p = self.log_prob(x)
        return {
            "nll": float(-log_p.mean()),
            "nll_median": float(-log_p.median()),
            "in_hdr": float((log_p >= self.hdr_level).double().mean()),
        }

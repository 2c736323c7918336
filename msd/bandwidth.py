"""Bandwidth (kernel width λ) schedules for mean-shift distillation.

λ(k) goes from λ₀ at step 0 towards λ_end at step K = ``total_steps``; the optimisation terminates
once λ(k) < λ_min (the supplementary's stopping criterion). Units: λ is a standard deviation in the
coordinates the solvers work in (VE data units; for the toy, the canvas units).
"""
from __future__ import annotations

import math

BANDWIDTH_SCHEDULES = ("linear", "cosine", "exponential", "constant")


class BandwidthSchedule:
    """``linear``: λ₀ + (λ_end − λ₀)·k/K; ``cosine``: λ_end + (λ₀ − λ_end)(1 + cos(πk/K))/2;
    ``exponential``: λ₀ (λ_end/λ₀)^{k/K} (needs λ_end > 0); ``constant``: λ₀."""

    def __init__(self, lambda0: float, lambda_min: float = 0.01, total_steps: int = 150,
                 kind: str = "linear", lambda_end: float = 0.0):
        if kind not in BANDWIDTH_SCHEDULES:
            raise ValueError(f"guidance.schedule must be one of {BANDWIDTH_SCHEDULES}, got {kind!r}")
        if not lambda0 > 0:
            raise ValueError(f"guidance.lambda0 must be > 0, got {lambda0!r}")
        if not 0 <= lambda_min <= lambda0:
            raise ValueError(f"guidance.lambda_min must be in [0, lambda0={lambda0}], got {lambda_min!r}")
        if not 0 <= lambda_end <= lambda0:
            raise ValueError(f"guidance.lambda_end must be in [0, lambda0={lambda0}], got {lambda_end!r}")
        if kind == "exponential" and lambda_end <= 0:
            raise ValueError(f"guidance.lambda_end must be > 0 for the exponential schedule, got {lambda_end!r}")
        if total_steps < 1:
            raise ValueError(f"guidance.total_steps must be >= 1, got {total_steps!r}")
        self.lambda0, self.lambda_min, self.lambda_end = float(lambda0), float(lambda_min), float(lambda_end)
        self.total_steps, self.kind = int(total_steps), kind

    def __call__(self, step: int) -> float:
        progress = min(max(step, 0) / self.total_steps, 1.0)
        if self.kind == "linear":
            return self.lambda0 + (self.lambda_end - self.lambda0) * progress
        if self.kind == "cosine":
            return self.lambda_end + (self.lambda0 - self.lambda_end) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "exponential":
            return self.lambda0 * (self.lambda_end / self.lambda0) ** progress
        return self.lambda0

    def should_stop(self, step: int) -> bool:
        """True once λ(step) has fallen below λ_min."""
        return self(step) < self.lambda_min

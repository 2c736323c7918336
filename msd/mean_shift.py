"""Mean-shift distillation (MSD, supplementary Algorithm 2).

With the product distribution ``ṗ(y|x) ∝ p(y) G_λ(x − y)`` the mean-shift vector of the
kernel-smoothed density ``p*_λ = p ∗ G_λ`` is ``m(x) = E_ṗ[y] − x = λ² ∇log p*_λ(x)``. MSD estimates
it with N product samples and returns their mean as the target, so ``target − x`` estimates m(x).

Product samplers (VE coordinates, kernel time ``s = σ²/2``, DESIGN §3):

* ``ode`` (eq. 12): start from ``σ_max ε``; each step is one PF-ODE (DDIM/Heun) step with the model,
  then the exact solution of the kernel term ``dz/ds = (c − z)/λ²`` over the step,
  ``z ← c + (z − c)·exp(−Δs/λ²)``, ``Δs = (σ_i² − σ_{i+1}²)/2``. Kernel centre ``noise_scaled``:
  ``c = x`` (= α_t·x in a VP model's ``z_t``); ``raw``: ``c = x/α(σ)`` (= x in ``z_t``, eq. 12 literally).
* ``stable`` (eq. 15): DDIM-invert x on the solver grid to get ``{z*_σ}``; start from
  ``z*_max + (σ_max ε − z*_max)·e^{−Δs_0/λ²}`` and after each step decay towards ``z*_{σ_{i+1}}``.
  λ → 0 returns x (zero gradient); λ → ∞ is plain DDIM sampling from noise.
* ``exact``: the denoiser samples ṗ itself (``denoiser.product_sample``; the toy's mixtures).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from msd.bandwidth import BandwidthSchedule
from msd.denoiser import Denoiser
from msd.guidance import Guidance, GuidanceOutput, register, require, summarize
from msd.schedules import EDMSchedule, NoiseSchedule
from msd.solvers import check_solver, ddim_invert, solver_evaluations, solver_step

PRODUCT_SAMPLERS = ("ode", "stable", "exact")
KERNEL_CENTERS = ("noise_scaled", "raw")


@register("msd")
class MSDGuidance(Guidance):
    """Drop-in replacement for an SDS call: ``out = MSDGuidance(denoiser)(x, step, generator)``,
    then minimise ``target_loss(x, out.target)``; stop when ``should_stop(step)``."""

    def __init__(self, denoiser: Denoiser, sampler: str = "ode", lambda0: float = math.sqrt(0.1),
                 lambda_min: float = 0.01, lambda_end: float = 0.0, schedule: str = "linear",
                 total_steps: int = 150, num_samples: int = 1, solver_steps: int = 32, solver: str = "euler",
                 noise_schedule: NoiseSchedule | None = None, kernel_center: str = "noise_scaled",
                 kernel_interval: tuple[float, float] | None = None, kernel_time_scale: float = 1.0):
        require(sampler in PRODUCT_SAMPLERS, "guidance.sampler", f"one of {PRODUCT_SAMPLERS}", sampler)
        require(kernel_center in KERNEL_CENTERS, "guidance.kernel_center", f"one of {KERNEL_CENTERS}", kernel_center)
        require(num_samples >= 1, "guidance.num_samples", ">= 1", num_samples)
        require(solver_steps >= 1, "guidance.solver_steps", ">= 1", solver_steps)
        require(kernel_time_scale > 0, "guidance.kernel_time_scale", "> 0", kernel_time_scale)
        require(kernel_interval is None or 0 <= kernel_interval[0] < kernel_interval[1],
                "guidance.kernel_interval", "null or [lo, hi] with 0 <= lo < hi", kernel_interval)
        if sampler == "exact" and not hasattr(denoiser, "product_sample"):
            raise ValueError("guidance.sampler='exact' needs a denoiser that samples the product distribution "
                             "exactly (the toy's exact mixture denoiser, without guidance); use 'ode' or 'stable'")
        self.denoiser, self.sampler, self.solver = denoiser, sampler, check_solver(solver)
        self.bandwidth = BandwidthSchedule(lambda0, lambda_min, total_steps, schedule, lambda_end)
        self.num_samples, self.kernel_center = int(num_samples), kernel_center
        self.kernel_interval = tuple(kernel_interval) if kernel_interval is not None else None
        self.kernel_time_scale = float(kernel_time_scale)
        self.sigmas = [float(s) for s in (noise_schedule or EDMSchedule()).grid(solver_steps)]

    def should_stop(self, step: int) -> bool:
        return self.bandwidth.should_stop(step)

    def __call__(self, x: Tensor, step: int, generator: torch.Generator | None = None) -> GuidanceOutput:
        lam = self.bandwidth(step)
        require(lam > 0, "guidance bandwidth at this step", "> 0 (stop when should_stop(step) is True)", lam)
        with torch.no_grad():
            target = self.product_samples(x.detach(), lam, generator).mean(dim=0)
        return GuidanceOutput(target, summarize(x, target, bandwidth=lam, nfe=self.evaluations_per_estimate()))

    def evaluations_per_estimate(self) -> int:
        """Network evaluations one target costs per sample (0 for the exact sampler)."""
        if self.sampler == "exact":
            return 0
        steps = len(self.sigmas) - 1
        calls = solver_evaluations(steps, self.solver) + (steps if self.sampler == "stable" else 0)
        return self.num_samples * calls * self.denoiser.evaluations_per_call

    def product_samples(self, x: Tensor, lam: float, generator: torch.Generator | None) -> Tensor:
        """``num_samples`` draws y ~ ṗ(·|x) ∝ p(y) G_λ(x − y) per row of ``x``: [num_samples, *x.shape]."""
        if self.sampler == "exact":
            samples = self.denoiser.product_sample(x, lam, generator=generator, n_per_center=self.num_samples)
            return samples.reshape(self.num_samples, *x.shape)
        centers = x.repeat(self.num_samples, *([1] * (x.ndim - 1)))
        solve = self._stable_solve if self.sampler == "stable" else self._ode_solve
        return solve(centers, lam, generator).reshape(self.num_samples, *x.shape)

    def _decay(self, sigma: float, sigma_next: float, lam: float) -> float:
        """exp(−Δs/λ²) over a step, Δs = (σ² − σ_next²)/2 (scaled by kernel_time_scale); 1 if inactive."""
        if self.kernel_interval is not None and not (self.kernel_interval[0] <= sigma <= self.kernel_interval[1]):
            return 1.0
        return math.exp(-self.kernel_time_scale * 0.5 * (sigma**2 - sigma_next**2) / lam**2)

    def _center(self, centers: Tensor, sigma: float) -> Tensor:
        if self.kernel_center == "noise_scaled":
            return centers
        alpha = self.denoiser.signal_scale(torch.tensor([sigma], dtype=centers.dtype))
        return centers / float(alpha)

    def _noise(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        return self.sigmas[0] * torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    def _ode_solve(self, centers: Tensor, lam: float, generator: torch.Generator | None) -> Tensor:
        z = self._noise(centers, generator)
        for sigma, sigma_next in zip(self.sigmas[:-1], self.sigmas[1:]):
            z = solver_step(self.denoiser, z, sigma, sigma_next, self.solver)
            decay = self._decay(sigma, sigma_next, lam)
            if decay < 1.0:
                c = self._center(centers, sigma_next)
                z = c + (z - c) * decay
        return z

    def _stable_solve(self, centers: Tensor, lam: float, generator: torch.Generator | None) -> Tensor:
        ascending = torch.tensor(self.sigmas[::-1], dtype=torch.float64)
        anchors = ddim_invert(self.denoiser, centers, ascending).flip(0)  # anchors[i] at self.sigmas[i]
        decay0 = self._decay(self.sigmas[0], self.sigmas[1], lam)
        z = anchors[0] + (self._noise(centers, generator) - anchors[0]) * decay0
        for i, (sigma, sigma_next) in enumerate(zip(self.sigmas[:-1], self.sigmas[1:])):
            z = solver_step(self.denoiser, z, sigma, sigma_next, self.solver)
            z = anchors[i + 1] + (z - anchors[i + 1]) * self._decay(sigma, sigma_next, lam)
        return z

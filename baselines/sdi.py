"""Score distillation via reparametrised DDIM inversion (SDI, Lukoianov et al. 2024), VE coordinates.

t is drawn as for SDS (σ = schedule.sigma(t)); ``x`` is DDIM-inverted from σ = 0 up to σ on the levels
``0, σ(t/n), σ(2t/n), …, σ(t)`` (n = ``inversion_steps``, CFG scale ``inversion_scale`` for the
inversion, optional η noise), and the target is the one-step clean estimate
``y = D_cfg(z_σ, σ) = z_σ − σ ε̂_cfg(z_σ, σ)``.

Without inversion (``inversion=False``) ``z_σ = x + σ ε`` and ``x − y = σ(ε̂ − ε)``: SDS with w = σ.
Differences from the official code, on purpose: its inversion grid is the global DDIM grid
{0, 100, …} cut at t (ours: n equal steps in schedule time per sample, so every sample costs n
evaluations); its quirk of inverting to t + δ, δ ~ U[0, 1/n), but querying the target model at t
is ``level_jitter=True`` (off by default).
"""
from __future__ import annotations

import torch
from torch import Tensor

from baselines.sds import NoisedGuidance
from msd.denoiser import Denoiser, GuidedDenoiser, per_sample
from msd.guidance import GuidanceOutput, register, require, summarize
from msd.solvers import ddim_invert


@register("sdi")
class SDIGuidance(NoisedGuidance):
    def __init__(self, denoiser: Denoiser, inversion: bool = True, inversion_steps: int = 10,
                 inversion_scale: float | None = None, eta: float = 0.0, level_jitter: bool = False,
                 **timestep_kwargs):
        super().__init__(denoiser, **timestep_kwargs)
        require(inversion_steps >= 1, "guidance.inversion_steps", ">= 1", inversion_steps)
        require(eta >= 0, "guidance.eta", ">= 0", eta)
        self.inversion, self.inversion_steps = inversion, int(inversion_steps)
        self.eta, self.level_jitter = float(eta), level_jitter
        self.inversion_denoiser = self._inversion_denoiser(denoiser, inversion_scale)

    @staticmethod
    def _inversion_denoiser(denoiser: Denoiser, scale: float | None) -> Denoiser:
        """The target model, or the same main/guide pair at ``inversion_scale`` (SDI's negative CFG)."""
        if scale is None:
            return denoiser
        if isinstance(denoiser, GuidedDenoiser):  # same class: a prior's batched CFG stays batched
            return type(denoiser)(denoiser.main, denoiser.guide, scale, denoiser.interval)
        require(scale == 1.0, "guidance.inversion_scale", "null or 1 for an unguided denoiser", scale)
        return denoiser

    def invert(self, x: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        """z at level σ(t_top) by DDIM inversion of x, t_top = t (+ δ with level jitter)."""
        t_top = t
        if self.level_jitter:
            jitter = torch.rand(t.shape, generator=generator, dtype=t.dtype) / self.inversion_steps
            t_top = (t + jitter).clamp(max=1.0)
        fractions = torch.arange(1, self.inversion_steps + 1, dtype=t.dtype) / self.inversion_steps
        levels = self.noise_schedule.sigma(fractions[:, None] * t_top[None, :])
        levels = torch.cat([torch.zeros_like(levels[:1]), levels])
        return ddim_invert(self.inversion_denoiser, x, levels.to(x.dtype), self.eta, generator)[-1]

    def __call__(self, x: Tensor, step: int, generator: torch.Generator | None = None) -> GuidanceOutput:
        with torch.no_grad():
            x = x.detach()
            t = self.timesteps.t(x.shape[0], step, generator)
            sigma = self.noise_schedule.sigma(t).to(dtype=x.dtype, device=x.device)
            if self.inversion:
                z = self.invert(x, t, generator)
                nfe = self.inversion_steps * self.inversion_denoiser.evaluations_per_call
            else:
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                z, nfe = x + per_sample(sigma, x) * noise, 0
            target = self.denoiser.denoise(z, sigma)
        nfe += self.denoiser.evaluations_per_call
        return GuidanceOutput(target, summarize(x, target, sigma=sigma.mean(), nfe=nfe))

"""Score distillation sampling (SDS, supplementary Algorithm 1) in VE coordinates.

``σ ~ timestep sampler``, ``z = x + σ ε``, ``grad = w(σ)(ε̂_cfg(z, σ) − ε)``, target ``y = x − grad``.
Weightings: ``sds`` (= 1 − ᾱ = σ²/(1+σ²)), ``uniform``, ``fantasia3d``, ``sigma``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from msd.denoiser import Conditioning, Denoiser, per_sample
from msd.guidance import Guidance, GuidanceOutput, noise_schedule_of, register, summarize
from msd.schedules import WEIGHTINGS, NoiseSchedule, TimestepSampler, distillation_weight


class NoisedGuidance(Guidance):
    """Shared set-up of the guidances that perturb x at a sampled noise level σ (``noise_schedule``: the
    levels t maps to, default the denoiser's own)."""

    def __init__(self, denoiser: Denoiser, noise_schedule: NoiseSchedule | None = None, t_min: float = 0.02,
                 t_max: float = 0.98, timestep_mode: str = "uniform", total_steps: int = 150):
        self.denoiser = denoiser
        self.noise_schedule = noise_schedule_of(denoiser, noise_schedule)
        self.timesteps = TimestepSampler(self.noise_schedule, t_min, t_max, timestep_mode, total_steps)

    def draw(self, x: Tensor, step: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Noise levels σ [N] for this step and standard normal noise ε shaped like x."""
        sigma = self.timesteps.sample(x.shape[0], step, generator, dtype=x.dtype, device=x.device)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return sigma, noise


@register("sds")
class SDSGuidance(NoisedGuidance):
    """DreamFusion's SDS: ``y = x − w(σ)(ε̂(x + σε, σ) − ε)``."""

    def __init__(self, denoiser: Denoiser, weighting: str = "sds", **timestep_kwargs):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"guidance.weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        super().__init__(denoiser, **timestep_kwargs)
        self.weighting = weighting

    def __call__(self, x: Tensor, step: int, generator: torch.Generator | None = None,
                 cond: Conditioning | None = None) -> GuidanceOutput:
        with torch.no_grad():
            x = x.detach()
            sigma, noise = self.draw(x, step, generator)
            z = x + per_sample(sigma, x) * noise
            eps = self.denoiser.condition(cond).eps(z, sigma)
            grad = per_sample(distillation_weight(sigma, self.weighting), x) * (eps - noise)
            target = x - grad
        return GuidanceOutput(target, summarize(x, target, sigma=sigma.mean(), nfe=self.denoiser.evaluations_per_call))

"""Noise schedules, solver grids and timestep samplers, all expressed as VE noise levels σ.

* :class:`EDMSchedule` — Karras et al. (2022) ρ-spaced σ between σ_min and σ_max (the toy's schedule).
* :class:`VPSchedule` — the discrete DDPM schedule of Stable Diffusion seen in VE coordinates:
  ``σ_t = √((1 − ᾱ_t) / ᾱ_t)`` (so ``α_t = 1/√(1+σ_t²)``).

Both map a normalised time ``t ∈ [0, 1]`` (1 = most noise) to σ, give a descending solver grid ending in
σ = 0, and plug into :class:`TimestepSampler`, which draws the σ an SDS-like method perturbs at.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


def vp_sigma(alpha_bar: Tensor) -> Tensor:
    """VE noise level of a VP marginal: σ = √((1 − ᾱ)/ᾱ)."""
    return torch.sqrt((1.0 - alpha_bar) / alpha_bar)


def vp_alpha_bar(sigma: Tensor) -> Tensor:
    """Inverse of :func:`vp_sigma`: ᾱ = 1/(1 + σ²)."""
    return 1.0 / (1.0 + sigma**2)


class NoiseSchedule(ABC):
    """Maps normalised time t ∈ [0, 1] (1 = σ_max) to VE noise levels."""

    sigma_min: float
    sigma_max: float

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """σ(t), monotonically increasing in t, σ(0) = σ_min, σ(1) = σ_max."""

    @abstractmethod
    def time(self, sigma: Tensor) -> Tensor:
        """Inverse of :meth:`sigma`: the normalised time t ∈ [0, 1] of a level (σ ≤ σ_min → 0, σ ≥ σ_max → 1)."""

    def grid(self, steps: int) -> Tensor:
        """Descending solver grid σ(1) = σ_0 > … > σ_{steps−1} = σ(0) followed by a final 0 (float64)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        t = torch.linspace(1.0, 0.0, steps, dtype=torch.float64) if steps > 1 else torch.ones(1, dtype=torch.float64)
        return torch.cat([self.sigma(t), torch.zeros(1, dtype=torch.float64)])


class EDMSchedule(NoiseSchedule):
    """σ(t) = (σ_min^{1/ρ} + t (σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ (the toy's denoisers carry σ ∈ [0.002, 5], ρ = 7:
    ``toy2d.TOY_SCHEDULE``)."""

    def __init__(self, sigma_min: float, sigma_max: float, rho: float = 7.0):
        if not (0.0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def sigma(self, t: Tensor) -> Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + t * (hi - lo)) ** self.rho

    def time(self, sigma: Tensor) -> Tensor:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        root = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=0.0) ** (1 / self.rho)
        return ((root - lo) / (hi - lo)).clamp(0.0, 1.0)


class VPSchedule(NoiseSchedule):
    """Discrete DDPM schedule (T steps, ``alphas_cumprod``) in VE units, t = index/(T−1).

    σ between integer timesteps is interpolated linearly in log σ, so continuous t is allowed;
    :meth:`timestep` maps σ back to a (fractional) DDPM timestep for the network's conditioning.
    """

    def __init__(self, alphas_cumprod: Tensor):
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.log_sigmas = torch.log(vp_sigma(self.alphas_cumprod))
        self.num_train_timesteps = len(self.alphas_cumprod)
        self.sigma_min = float(self.log_sigmas[0].exp())
        self.sigma_max = float(self.log_sigmas[-1].exp())

    @classmethod
    def stable_diffusion(cls) -> "VPSchedule":
        """SD 1.x/2.x: 1000 steps, scaled_linear betas from 0.00085 to 0.012 (via diffusers)."""
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear")
        return cls(scheduler.alphas_cumprod)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "VPSchedule":
        """The training schedule of a diffusers model: ``alphas_cumprod`` of the DDPM scheduler built
        from its scheduler config (any SD-style scheduler class; betas, T and trained_betas are read)."""
        from diffusers import DDPMScheduler

        alphas_cumprod = DDPMScheduler.from_config(config).alphas_cumprod
        if not bool(((alphas_cumprod > 0) & (alphas_cumprod < 1)).all()):
            raise ValueError("scheduler config gives alphas_cumprod outside (0, 1) (e.g. a zero-terminal-SNR "
                             "schedule); a VE view needs finite, positive sigma at every timestep")
        return cls(alphas_cumprod)

    def sigma(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        pos = t.clamp(0.0, 1.0) * (self.num_train_timesteps - 1)
        lo = pos.floor().long().clamp(max=self.num_train_timesteps - 2)
        frac = pos - lo
        log_sigmas = self.log_sigmas.to(t.device)
        log_sigma = (1 - frac) * log_sigmas[lo] + frac * log_sigmas[lo + 1]
        return log_sigma.exp()

    def timestep(self, sigma: Tensor) -> Tensor:
        """Fractional DDPM timestep whose σ equals ``sigma`` (inverse of the log-linear interpolation)."""
        log_sigma = torch.log(torch.as_tensor(sigma, dtype=torch.float64)).clamp(
            self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, log_sigma.contiguous()).clamp(1, self.num_train_timesteps - 1)
        lo = hi - 1
        frac = (log_sigma - self.log_sigmas[lo]) / (self.log_sigmas[hi] - self.log_sigmas[lo])
        return lo + frac

    def time(self, sigma: Tensor) -> Tensor:
        return self.timestep(torch.as_tensor(sigma, dtype=torch.float64).clamp(min=self.sigma_min)) / (
            self.num_train_timesteps - 1)


TIMESTEP_MODES = ("uniform", "annealed", "linear", "sqrt")


class TimestepSampler:
    """Draws the noise level σ an SDS-like guidance perturbs at, per optimisation step.

    ``uniform``: t ~ U[t_min, t_max] per sample. ``annealed``: t ~ U[t_min, t_max(k)] with the upper
    end decayed linearly to ``t_end`` over ``total_steps`` (ProlificDreamer-style). ``linear`` / ``sqrt``:
    deterministic t(k) = t_max − (t_max − t_min)·f(k/K), f = id (SDI's t_anneal) or √ (HiFA),
    shared by the batch. σ = schedule.sigma(t).
    """

    def __init__(self, schedule: NoiseSchedule, t_min: float = 0.02, t_max: float = 0.98,
                 mode: str = "uniform", total_steps: int = 1, t_end: float | None = None):
        if mode not in TIMESTEP_MODES:
            raise ValueError(f"timestep mode must be one of {TIMESTEP_MODES}, got {mode!r}")
        if not (0.0 <= t_min <= t_max <= 1.0):
            raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.schedule, self.t_min, self.t_max, self.mode = schedule, float(t_min), float(t_max), mode
        self.total_steps = int(total_steps)
        self.t_end = float(t_min if t_end is None else t_end)

    def t(self, n: int, step: int, generator: torch.Generator | None = None,
          device: torch.device | str = "cpu") -> Tensor:
        """Normalised times [n] (float64, on ``device``, drawn with ``generator``, which must live there) for
        optimisation step ``step``."""
        progress = min(max(step, 0) / self.total_steps, 1.0)
        if self.mode in ("uniform", "annealed"):
            hi = self.t_max if self.mode == "uniform" else self.t_max + (self.t_end - self.t_max) * progress
            hi = max(hi, self.t_min)
            u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
            return self.t_min + (hi - self.t_min) * u
        shape = progress if self.mode == "linear" else math.sqrt(progress)
        return torch.full((n,), self.t_max - (self.t_max - self.t_min) * shape, dtype=torch.float64, device=device)

    def sample(self, n: int, step: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """Noise levels σ [n] on ``device`` for optimisation step ``step``."""
        return self.schedule.sigma(self.t(n, step, generator, device)).to(dtype=dtype)


WEIGHTINGS = ("sds", "uniform", "fantasia3d", "sigma")


def distillation_weight(sigma: Tensor, kind: str) -> Tensor:
    """SDS weighting w(σ) in VE terms: ``sds`` = 1 − ᾱ = σ²/(1+σ²); ``uniform`` = 1;
    ``fantasia3d`` = √ᾱ (1 − ᾱ); ``sigma`` = σ (the VE form of σ_t/α_t, which makes SDS equal SDI
    without inversion)."""
    if kind == "sds":
        return sigma**2 / (1.0 + sigma**2)
    if kind == "uniform":
        return torch.ones_like(sigma)
    if kind == "fantasia3d":
        alpha_bar = vp_alpha_bar(sigma)
        return alpha_bar.sqrt() * (1.0 - alpha_bar)
    if kind == "sigma":
        return sigma
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {kind!r}")

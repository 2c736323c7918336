"""The Denoiser protocol, the per-call conditioning and guidance combinators (CFG, autoguidance).

Conventions (docs/design.md §3): every denoiser works in variance-exploding coordinates ``x_σ = x + σ n`` and
returns the ε-prediction ``ε̂(x, σ)``, so ``D(x, σ) = x − σ ε̂`` and ``∇log p_σ(x) = −ε̂ / σ``.
``sigma`` is always a per-sample tensor of shape [N] (use :func:`as_sigma` to broadcast a float).
A variance-preserving model (Stable Diffusion) sets ``vp = True``; its VE input ``x̂`` corresponds to
``z_t = α x̂`` with ``α = 1/√(1+σ²)``.

Conditioning travels with each call, not with the model: a guidance receives the step's
:class:`Conditioning` (or None) and binds it with ``denoiser.condition(cond)``, so one denoiser, and the
guidance built on it, serves changing prompts (and, for text-to-3D, views). A denoiser also carries its
own ``noise_schedule`` (the levels it was trained on), which guidances use unless given another.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from msd.schedules import NoiseSchedule


@dataclass(frozen=True)
class Conditioning:
    """The conditioning of one batch of N samples for one call: text-encoder hidden states ``embeddings``
    [N or 1, L, D] and, optionally, one camera per row ``camera`` [N or 1, K] (text-to-3D: K = 16, the
    flattened 4×4 camera_to_world). A leading 1 means shared by the batch; each field is shared or per-row
    independently (one prompt for all views with per-view cameras, say). Only a camera-conditioned LoRA view
    reads ``camera`` (:meth:`msd.priors.DiffusersPrior.add_lora`); every other view ignores it."""

    embeddings: Tensor
    camera: Tensor | None = None

    def __post_init__(self):
        if self.embeddings.ndim != 3:
            raise ValueError(f"Conditioning.embeddings must be [N or 1, L, D], got {tuple(self.embeddings.shape)}")
        if self.camera is None:
            return
        if not isinstance(self.camera, Tensor) or self.camera.ndim != 2 or not self.camera.is_floating_point():
            shape = tuple(self.camera.shape) if isinstance(self.camera, Tensor) else type(self.camera).__name__
            raise ValueError(f"Conditioning.camera must be None or a floating-point tensor [N or 1, K] (K = 16 for a "
                             f"flattened camera_to_world), got {shape}")
        rows, cameras = self.embeddings.shape[0], self.camera.shape[0]
        if rows > 1 and cameras > 1 and rows != cameras:
            raise ValueError(f"Conditioning.camera has {cameras} rows but embeddings has {rows}: give one camera per "
                             f"row ({rows}) or one shared camera (1)")

    def __len__(self) -> int:
        """Rows of the batch this conditions (1: all of its fields are shared)."""
        return max(self.embeddings.shape[0], 1 if self.camera is None else self.camera.shape[0])

    def repeat(self, times: int) -> "Conditioning":
        """The conditioning of ``x.repeat(times, ...)``: rows tiled ``times`` times (a shared row stays shared,
        field by field)."""
        if len(self) == 1 or times == 1:
            return self
        embeddings = self.embeddings if self.embeddings.shape[0] == 1 else self.embeddings.repeat(times, 1, 1)
        camera = self.camera
        if camera is not None and camera.shape[0] > 1:
            camera = camera.repeat(times, 1)
        return Conditioning(embeddings, camera)

    def rows(self, index: Tensor | slice) -> "Conditioning":
        """The conditioning of ``x[index]`` (a shared row stays shared, field by field)."""
        if len(self) == 1:
            return self
        embeddings = self.embeddings if self.embeddings.shape[0] == 1 else self.embeddings[index]
        camera = self.camera
        if camera is not None and camera.shape[0] > 1:
            camera = camera[index]
        return Conditioning(embeddings, camera)


def as_sigma(sigma: float | Tensor, x: Tensor) -> Tensor:
    """Noise level(s) as an [N] tensor matching ``x``'s batch, device and dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a float or a tensor of shape [{x.shape[0]}], got {tuple(sigma.shape)}")
    return sigma


def per_sample(values: Tensor, x: Tensor) -> Tensor:
    """Reshape an [N] tensor to broadcast against ``x`` of shape [N, ...]."""
    return values.reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser(ABC):
    """ε-prediction in VE coordinates. Subclasses implement :meth:`eps`."""

    vp: bool = False
    """True for models that natively see VP inputs ``z_t = α_t x + s_t ε`` (then ``α = 1/√(1+σ²)``)."""

    noise_schedule: NoiseSchedule | None = None
    """The noise levels the model knows (σ_min, σ_max, its time parametrisation); None for a model that has no
    schedule of its own (a guidance built on it must then be given one)."""

    @abstractmethod
    def eps(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Predicted noise ε̂(x, σ) for x: [N, ...], sigma: [N] (VE noise std, data units)."""

    def condition(self, cond: Conditioning | None) -> "Denoiser":
        """This model under the call's conditioning ``cond`` (a cheap view). An unconditional model accepts
        only None and returns itself."""
        if cond is not None:
            raise ValueError(f"{type(self).__name__} is unconditional: it takes no conditioning (cond=None), "
                             f"got {type(cond).__name__}")
        return self

    @property
    def evaluations_per_call(self) -> int:
        """Network evaluations one :meth:`eps` call costs (2 for a guided pair)."""
        return 1

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        """One-step clean estimate D(x, σ) = x − σ ε̂."""
        sigma = as_sigma(sigma, x)
        return x - per_sample(sigma, x) * self.eps(x, sigma)

    def signal_scale(self, sigma: Tensor) -> Tensor:
        """α(σ): the factor between VE and the model's own coordinates (1 for VE-native models)."""
        return 1.0 / torch.sqrt(1.0 + sigma**2) if self.vp else torch.ones_like(sigma)


class GuidedDenoiser(Denoiser):
    """ε̂ = ε̂_guide + w (ε̂_main − ε̂_guide) on σ ∈ [σ_lo, σ_hi], ε̂_main elsewhere.

    Classifier-free guidance: ``main`` is the conditional model, ``guide`` the unconditional one.
    Autoguidance: ``guide`` is a weaker version of ``main``. ``w = 1`` is no guidance (the guide is
    then never evaluated). ``interval = None`` applies w at every σ.
    """

    def __init__(self, main: Denoiser, guide: Denoiser, scale: float,
                 interval: tuple[float, float] | None = None):
        if main.vp != guide.vp:
            raise ValueError("main and guide denoisers must share coordinates (vp flag)")
        if interval is not None and not (0.0 <= interval[0] < interval[1]):
            raise ValueError(f"guidance interval must satisfy 0 <= lo < hi, got {interval}")
        self.main, self.guide, self.scale, self.interval = main, guide, float(scale), interval
        self.vp = main.vp

    @property
    def noise_schedule(self) -> NoiseSchedule | None:
        return self.main.noise_schedule

    def condition(self, cond: Conditioning | None) -> "GuidedDenoiser":
        """Both models under ``cond`` (a CFG guide that ignores conditioning stays as it is)."""
        if cond is None:
            return self
        return type(self)(self.main.condition(cond), self.guide.condition(cond), self.scale, self.interval)

    @property
    def evaluations_per_call(self) -> int:
        return self.main.evaluations_per_call + (self.guide.evaluations_per_call if self.scale != 1.0 else 0)

    def eps(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = as_sigma(sigma, x)
        eps_main = self.main.eps(x, sigma)
        if self.scale == 1.0:
            return eps_main
        active = torch.ones_like(sigma, dtype=torch.bool)
        if self.interval is not None:
            active = (sigma >= self.interval[0]) & (sigma <= self.interval[1])
            if not bool(active.any()):
                return eps_main
        eps_guide = self.guide.eps(x, sigma)
        w = per_sample(torch.where(active, torch.full_like(sigma, self.scale), torch.ones_like(sigma)), x)
        return eps_guide + w * (eps_main - eps_guide)


def with_scale(denoiser: Denoiser, scale: float | None) -> Denoiser:
    """``denoiser`` itself (``scale`` None), or the same main/guide pair at guidance scale ``scale`` (SDI's and
    eq. 15's inversion model); an unguided denoiser accepts only ``scale`` None or 1."""
    if scale is None:
        return denoiser
    if isinstance(denoiser, GuidedDenoiser):  # same class: a prior's batched CFG stays batched
        return type(denoiser)(denoiser.main, denoiser.guide, scale, denoiser.interval)
    if scale != 1.0:
        raise ValueError(f"guidance.inversion_scale must be null or 1 for an unguided denoiser, got {scale!r}")
    return denoiser

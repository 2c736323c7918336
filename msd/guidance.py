"""The Guidance protocol, its registry and the one target loss.

Every guidance maps the current sample ``x`` (a 2D point, a latent or an image, [N, ...]) to a
detached target ``y``; the optimiser minimises ``L = ½‖x − sg(y)‖²`` summed over a sample's
dimensions and averaged over the batch, so ``∂L/∂x_i = (x_i − y_i)/N``. For SDS-like methods
``y = x − grad``; for MSD ``y`` is the mean of product-distribution samples, so ``y − x`` is the
mean-shift vector estimate.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from msd.checks import require
from msd.denoiser import Conditioning, Denoiser
from msd.schedules import NoiseSchedule


@dataclass
class GuidanceOutput:
    """``target``: detached y, same shape as x. ``aux``: scalars for logging (grad_norm, sigma, ...)."""

    target: Tensor
    aux: dict[str, float] = field(default_factory=dict)


class Guidance(ABC):
    """A score-distillation guidance: ``guidance(x, step, generator, cond) -> GuidanceOutput``.

    ``cond`` is the step's conditioning of the rows of ``x`` (:class:`~msd.denoiser.Conditioning`; None for an
    unconditional model such as the toy's), so one guidance serves changing prompts and views. Every random
    draw uses ``generator``, which must live on ``x.device``."""

    name: str = ""

    @abstractmethod
    def __call__(self, x: Tensor, step: int, generator: torch.Generator | None = None,
                 cond: Conditioning | None = None) -> GuidanceOutput:
        """Target for sample ``x`` at optimisation step ``step`` (0-based). Must not modify ``x``."""

    def should_stop(self, step: int) -> bool:
        """Termination criterion checked before step ``step`` (MSD: bandwidth below λ_min)."""
        return False

    def state_dict(self) -> dict:
        """What a resumed run needs beyond the step index (tensors and plain values only). Empty for a
        guidance whose state is a function of the step (SDS, SDI, MSD with fresh start noise: λ = schedule(step))."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (before the first call of a resumed run)."""
        if state:
            raise ValueError(f"guidance {self.name!r} keeps no state, got a checkpoint with {sorted(state)}")


def summarize(x: Tensor, target: Tensor, **extra: float) -> dict[str, float]:
    """Common aux scalars: mean per-sample ‖x − y‖ (``grad_norm``), the range of the target's coordinates
    (``target_min``, ``target_max``: where a method sends x), plus method-specific values."""
    grad_norm = (x.detach() - target).flatten(1).norm(dim=1).mean()
    return {"grad_norm": float(grad_norm), "target_min": float(target.min()), "target_max": float(target.max()),
            **{k: float(v) for k, v in extra.items()}}


def noise_schedule_of(denoiser: Denoiser, noise_schedule: NoiseSchedule | None) -> NoiseSchedule:
    """``noise_schedule`` if given, else the denoiser's own (a prior knows its schedule; there is no default)."""
    schedule = noise_schedule if noise_schedule is not None else denoiser.noise_schedule
    require(schedule is not None, "guidance noise_schedule",
            "given, or carried by the denoiser (denoiser.noise_schedule)", None)
    return schedule


def target_loss(x: Tensor, target: Tensor) -> Tensor:
    """½‖x − sg(y)‖² summed over each sample's dimensions, averaged over the batch."""
    return 0.5 * (x - target.detach()).pow(2).flatten(1).sum(dim=1).mean()


_REGISTRY: dict[str, Callable[..., Guidance]] = {}


def register(name: str):
    """Class decorator adding a guidance to the registry under ``name``."""

    def wrap(cls):
        if name in _REGISTRY:
            raise ValueError(f"guidance {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_guidances() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def build_guidance(name: str, **kwargs) -> Guidance:
    """Instantiate a registered guidance; an unknown name fails with the allowed values."""
    if name not in _REGISTRY:
        raise ValueError(f"guidance.name must be one of {available_guidances()}, got {name!r}")
    return _REGISTRY[name](**kwargs)

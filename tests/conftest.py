"""Shared fixtures: a Gaussian prior whose every diffusion quantity is known in closed form."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(1)  # small tensors: a second OpenMP thread only adds spin-wait overhead

from msd.denoiser import Denoiser, per_sample  # noqa: E402
from toy2d import TOY_SCHEDULE  # noqa: E402


class GaussianDenoiser(Denoiser):
    """Exact denoiser of p = N(μ, s² I): p_σ = N(μ, (s² + σ²) I), ε̂ = σ (x − μ)/(s² + σ²); it carries the
    toy's noise levels."""

    noise_schedule = TOY_SCHEDULE

    def __init__(self, mean, std: float):
        self.mean, self.std = torch.as_tensor(mean, dtype=torch.float32), float(std)

    def eps(self, x, sigma):
        s = per_sample(sigma, x)
        return s * (x - self.mean) / (self.std**2 + s**2)

    def flow(self, x, sigma_from: float, sigma_to: float):
        """Exact PF-ODE map between noise levels: μ + (x − μ)·√(s²+σ_to²)/√(s²+σ_from²)."""
        ratio = ((self.std**2 + sigma_to**2) / (self.std**2 + sigma_from**2)) ** 0.5
        return self.mean + (x - self.mean) * ratio


@pytest.fixture
def gaussian():
    return GaussianDenoiser([0.3, -0.2], 0.4)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)

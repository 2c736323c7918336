"""Shared fixtures: a Gaussian prior whose every diffusion quantity is known in closed form, and the expensive
objects several test files use, built once per session: the tiny random diffusers priors of ``tests/tiny_sd.py``
(latent, v-prediction, pixel, pixel with ``clip_sample``), the tiny ShapesWorld prior with its untrained classifier,
and the committed ShapesWorld prior. Session fixtures are shared read-only: a test that changes a prior (LoRA, a
swapped UNet) loads its own copy from the directory."""
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


# --- shared across files: built once per session ---------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_prior_dirs(tmp_path_factory):
    """Tiny random SD-style prior directories (seed 0): ``latent`` (4×12×12 latents, 24 px images), ``latent_v``
    (the same with v-prediction), ``pixel`` (3×16×8) and ``pixel_clip`` (the same UNet with ``clip_sample=True``)."""
    from tests.tiny_sd import build_tiny_prior

    root = tmp_path_factory.mktemp("tiny_priors")
    return {
        "latent": build_tiny_prior(root / "latent", latent=True, sample_size=12),
        "latent_v": build_tiny_prior(root / "latent_v", latent=True, sample_size=12, prediction_type="v_prediction"),
        "pixel": build_tiny_prior(root / "pixel", latent=False, sample_size=(16, 8)),
        "pixel_clip": build_tiny_prior(root / "pixel_clip", latent=False, sample_size=(16, 8), clip_sample=True),
    }


@pytest.fixture(scope="session")
def tiny_latent_prior(tiny_prior_dirs):
    """``tiny_prior_dirs["latent"]`` loaded on the CPU; read-only (load a fresh copy to add a LoRA or swap modules)."""
    from msd.priors import DiffusersPrior

    return DiffusersPrior.from_pretrained(tiny_prior_dirs["latent"], device="cpu")


@pytest.fixture(scope="session")
def tiny_shapes_prior(tmp_path_factory):
    """(prior directory, classifier directory): a tiny random 32 px pixel prior and an untrained ShapesWorld
    classifier (``tests.tiny_sd.build_tiny_shapes_prior``): the text-to-2D plumbing without the committed numbers."""
    from tests.tiny_sd import build_tiny_shapes_prior

    return build_tiny_shapes_prior(tmp_path_factory.mktemp("tiny_shapes"))


@pytest.fixture(scope="session")
def shapes_prior():
    """The committed ShapesWorld prior (``shapes/prior``) loaded on the CPU; read-only."""
    from msd.priors import load_prior

    return load_prior("shapes", device="cpu")

"""MSD and DDIM inversion on the fractal mixture, against its exact closed forms."""
import math

import torch

from msd.mean_shift import MSDGuidance
from msd.schedules import EDMSchedule
from msd.solvers import ddim_invert, sample
from toy2d import ExactDenoiser, fractal_gmm

QUERIES = torch.tensor([[0.35, 0.35], [0.6, 0.2], [0.0, 0.8], [1.2, 1.2], [-0.8, -0.5]])


def test_exact_product_sampler_mean_shift_equals_scaled_smoothed_score():
    """E_{y~ṗ(·|x)}[y] − x = λ² ∇log p*_λ(x), with p*_λ = p ∗ G_λ the mixture diffused to σ = λ."""
    mixture = fractal_gmm("A")
    lam, n = 0.3, 20_000
    guidance = MSDGuidance(ExactDenoiser(mixture), sampler="exact", lambda0=lam, num_samples=n)
    shift = guidance(QUERIES, 0, torch.Generator().manual_seed(0)).target - QUERIES
    expected = lam**2 * mixture.score(QUERIES, lam)
    spread = mixture.product_sample(QUERIES, lam, torch.Generator().manual_seed(1), n_per_center=n).std(dim=0)
    assert torch.all((shift - expected).abs() <= 4 * spread / math.sqrt(n) + 1e-6)


def test_ddim_inversion_round_trip_on_the_fractal():
    """η = 0, exact denoiser, 512 Euler levels: points sampled from class A return within 1e-2
    (median) after inversion to σ_max = 5 and integration back; the thin branches make the flow stiff
    near σ = 0, so a few points carry larger O(1/steps) errors."""
    mixture = fractal_gmm("A")
    denoiser = ExactDenoiser(mixture)
    x = mixture.sample(64, generator=torch.Generator().manual_seed(2))
    sigmas = EDMSchedule(0.002, 5.0).grid(512)
    back = sample(denoiser, ddim_invert(denoiser, x, sigmas.flip(0))[-1], sigmas)
    error = (back - x).norm(dim=1)
    assert float(error.median()) < 1e-2 and float(error.quantile(0.9)) < 5e-2


def test_stable_sampler_returns_x_as_bandwidth_vanishes_on_the_fractal():
    denoiser = ExactDenoiser(fractal_gmm("A"))
    msd = MSDGuidance(denoiser, sampler="stable", lambda0=1e-4, lambda_min=0.0, solver_steps=8)
    assert torch.allclose(msd(QUERIES, 0, torch.Generator().manual_seed(3)).target, QUERIES, atol=1e-5)

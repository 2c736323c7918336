"""The data range of a pixel-space prior's clean estimates (``msd.priors.CleanRange``, issue 12's saturation fix).

Exact references: diffusers' own DDPM scheduler (``pred_original_sample`` with ``clip_sample`` / ``thresholding``)
and the projection property of clipping. Then the committed ShapesWorld prior: its clean estimates, and SDI's
targets on true renders, stay in the images' range [−1, 1] (they spanned about [−8.7, 7.1] before).
"""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from baselines.sdi import SDIGuidance
from msd.priors import CleanRange, DiffusersPrior, load_prior

SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon")


def scheduler_clean_estimate(options: dict, sample: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """diffusers' ``pred_original_sample`` of one DDPM step (the reference the projection must match)."""
    scheduler = DDPMScheduler(**SCHEDULE, **options)
    scheduler.set_timesteps(1000)
    return scheduler.step(eps, t, sample, generator=torch.Generator().manual_seed(0)).pred_original_sample


@pytest.mark.parametrize("options", [dict(clip_sample=True, clip_sample_range=1.0),
                                     dict(clip_sample=True, clip_sample_range=0.5),
                                     dict(clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.9,
                                          sample_max_value=1.5)])
@pytest.mark.parametrize("t", [50, 500, 950])
def test_projection_matches_diffusers_scheduler(options, t):
    """``prior.in_data_range`` turns ε̂ into the ε whose VE clean estimate is diffusers' clipped / thresholded
    ``pred_original_sample`` at the same timestep (VP sample z = α x̂)."""
    generator = torch.Generator().manual_seed(t)
    alpha_bar = DDPMScheduler(**SCHEDULE).alphas_cumprod[t].double()
    alpha, sigma = alpha_bar.sqrt(), ((1 - alpha_bar) / alpha_bar).sqrt()
    x_hat = 2.0 * torch.randn(3, 3, 8, 8, generator=generator, dtype=torch.float64)
    eps = torch.randn(3, 3, 8, 8, generator=generator, dtype=torch.float64)
    reference = scheduler_clean_estimate({"clip_sample": False, **options}, (alpha * x_hat).float(), eps.float(), t)
    projected = CleanRange.from_scheduler_config(options)
    prior = DiffusersPrior.__new__(DiffusersPrior)  # only the projection is under test
    prior.clean_range = projected
    eps_in_range = prior.in_data_range(x_hat, torch.full((3,), float(sigma), dtype=torch.float64), eps)
    clean = x_hat - sigma * eps_in_range
    assert torch.allclose(clean.float(), reference, atol=2e-5), (clean.float() - reference).abs().max()


def test_no_range_in_config_leaves_eps_unchanged():
    assert CleanRange.from_scheduler_config({"clip_sample": False, "thresholding": False}) is None
    assert CleanRange.from_scheduler_config({}) is None  # Stable Diffusion's configs: latents are not clipped


def test_clipping_never_moves_an_estimate_away_from_any_in_range_value():
    """For every b in [−r, r]: |P(a) − b| ≤ |a − b| coordinate-wise (so clipping cannot hurt an estimate of a
    posterior mean of data in that range)."""
    generator = torch.Generator().manual_seed(0)
    a = 4 * torch.randn(4, 3, 6, 6, generator=generator)
    b = 2 * torch.rand(4, 3, 6, 6, generator=generator) - 1
    projected = CleanRange("clip", 1.0).project(a)
    assert bool(((projected - b).abs() <= (a - b).abs() + 1e-7).all())
    assert projected.abs().max() <= 1.0


def test_tiny_prior_reads_its_scheduler_config(tiny_prior_dirs):
    """The same random UNet with and without ``clip_sample`` in its scheduler config."""
    clipped = load_prior(path=tiny_prior_dirs["pixel_clip"], device="cpu")
    free = load_prior(path=tiny_prior_dirs["pixel"], device="cpu")
    assert clipped.clean_range == CleanRange("clip", 1.0) and free.clean_range is None
    x = 3 * torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.5, 8.0])
    for view in (clipped.denoiser().condition(clipped.conditioning("a cat")),
                 clipped.denoiser(4.0).condition(clipped.conditioning(["a cat", "a dog"]))):
        assert view.denoise(x, sigma).abs().max() <= 1.0 + 1e-4
    unclipped = free.denoiser(4.0).condition(free.conditioning("a cat")).denoise(x, sigma)
    assert unclipped.abs().max() > 1.0  # the same random UNet leaves the range without the config


def test_shapes_prior_clean_estimates_in_range(shapes_prior):
    """The committed ShapesWorld prior declares its range; its guided clean estimate stays in [−1, 1]."""
    assert shapes_prior.clean_range == CleanRange("clip", 1.0)
    from shapes.world import prompt_id, sample_world

    prompts = ["a red circle", "a blue square", "a yellow triangle", "a green circle"]
    renders, _ = sample_world(4, torch.Generator().manual_seed(0), prompts=torch.tensor([prompt_id(p) for p in prompts]),
                              resolution=32)
    noisy = renders + 3.0 * torch.randn(renders.shape, generator=torch.Generator().manual_seed(1))
    denoiser = shapes_prior.denoiser(4.0).condition(shapes_prior.conditioning(prompts))
    with torch.no_grad():
        clean = denoiser.denoise(noisy, torch.full((4,), 3.0))
    assert clean.abs().max() <= 1.0 + 1e-4


def test_sdi_targets_on_true_renders_stay_in_range(shapes_prior):
    """The measurement that exposed the saturation: SDI's target (10 inversion steps, high t, w = 4) on true
    renders; it spanned about [−8.7, 7.1] with the unclipped model."""
    from shapes.world import prompt_id, sample_world

    prompts = ["a red circle"] * 4
    renders, _ = sample_world(4, torch.Generator().manual_seed(2), prompts=torch.tensor([prompt_id(p) for p in prompts]),
                              resolution=32)
    guidance = SDIGuidance(shapes_prior.denoiser(4.0).condition(shapes_prior.conditioning(prompts)),
                           t_min=0.9, t_max=0.98)
    out = guidance(renders, 0, torch.Generator().manual_seed(3))
    assert out.target.abs().max() <= 1.0 + 1e-4

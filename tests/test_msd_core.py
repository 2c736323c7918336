"""Core identities: schedules, CFG, solvers, DDIM inversion, the target loss and the registry."""
import math

import pytest
import torch

import baselines  # noqa: F401  (registers sds/vsd/sdi)
from msd.bandwidth import BandwidthSchedule
from msd.denoiser import GuidedDenoiser, as_sigma
from msd.guidance import available_guidances, build_guidance, target_loss
from msd.schedules import EDMSchedule, TimestepSampler, VPSchedule, distillation_weight, vp_alpha_bar
from msd.solvers import ancestral_std, ddim_invert, sample


def test_edm_grid_endpoints_and_rho_spacing():
    schedule = EDMSchedule(0.002, 5.0, 7.0)
    grid = schedule.grid(32)
    assert grid.shape == (33,) and grid[-1] == 0
    assert math.isclose(grid[0], 5.0, rel_tol=1e-12) and math.isclose(grid[-2], 0.002, rel_tol=1e-12)
    assert bool((grid[1:] < grid[:-1]).all())
    steps = grid[:-1] ** (1 / 7)
    assert torch.allclose(steps[1:] - steps[:-1], (steps[1] - steps[0]).expand(31), atol=1e-12)


def test_vp_schedule_matches_ddpm_marginals():
    schedule = VPSchedule.stable_diffusion()
    t_index = torch.tensor([0, 499, 999])
    sigma = schedule.sigma(t_index / 999)
    alpha_bar = schedule.alphas_cumprod[t_index]
    assert torch.allclose(vp_alpha_bar(sigma), alpha_bar, rtol=1e-10)
    # z_t = √ᾱ x + √(1−ᾱ) ε  ⇔  z_t/√ᾱ = x + σ ε
    assert torch.allclose(sigma * alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), rtol=1e-10)
    assert torch.allclose(schedule.timestep(sigma), t_index.double(), atol=1e-6)
    assert schedule.sigma_max > 14 and schedule.sigma_min < 0.03


def test_timestep_sampler_modes(generator):
    schedule = EDMSchedule(0.002, 5.0)
    uniform = TimestepSampler(schedule, 0.2, 0.6)
    t = uniform.t(10_000, 0, generator)
    assert t.min() >= 0.2 and t.max() <= 0.6 and abs(float(t.mean()) - 0.4) < 0.01
    annealed = TimestepSampler(schedule, 0.02, 0.98, "annealed", total_steps=100, t_end=0.5)
    assert annealed.t(1000, 100, generator).max() <= 0.5
    linear = TimestepSampler(schedule, 0.02, 0.98, "linear", total_steps=100)
    assert torch.allclose(linear.t(3, 50), torch.full((3,), 0.5, dtype=torch.float64))
    sqrt = TimestepSampler(schedule, 0.0, 1.0, "sqrt", total_steps=100)
    assert math.isclose(float(sqrt.t(1, 25)[0]), 0.5)
    with pytest.raises(ValueError, match="timestep mode must be one of"):
        TimestepSampler(schedule, mode="cosine")


def test_weightings_in_ve_terms():
    sigma = torch.tensor([0.1, 1.0, 3.0])
    alpha_bar = vp_alpha_bar(sigma)
    assert torch.allclose(distillation_weight(sigma, "sds"), 1 - alpha_bar)
    assert torch.equal(distillation_weight(sigma, "uniform"), torch.ones(3))
    with pytest.raises(ValueError, match="weighting must be one of"):
        distillation_weight(sigma, "dreamfusion")


def test_cfg_formula_interval_and_no_guide_call(gaussian):
    from tests.conftest import GaussianDenoiser

    guide = GaussianDenoiser([0.0, 0.0], 1.0)
    x, sigma = torch.randn(6, 2), torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0, 4.0])
    guided = GuidedDenoiser(gaussian, guide, 3.0, interval=(0.4, 2.5))
    expected_full = guide.eps(x, sigma) + 3.0 * (gaussian.eps(x, sigma) - guide.eps(x, sigma))
    out = guided.eps(x, sigma)
    inside = (sigma >= 0.4) & (sigma <= 2.5)
    assert torch.allclose(out[inside], expected_full[inside], atol=1e-6)
    assert torch.allclose(out[~inside], gaussian.eps(x, sigma)[~inside])
    assert guided.evaluations_per_call == 2

    class Exploding(GaussianDenoiser):
        def eps(self, x, sigma):
            raise AssertionError("guide must not be evaluated at w = 1")

    assert torch.equal(GuidedDenoiser(gaussian, Exploding([0, 0], 1), 1.0).eps(x, sigma), gaussian.eps(x, sigma))


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2)])
def test_pf_ode_solvers_converge_to_closed_form_flow_at_their_order(gaussian, solver, order):
    x0 = 5.0 * torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    exact = gaussian.flow(x0, 5.0, 0.0)
    errors = [float((sample(gaussian, x0, EDMSchedule(0.002, 5.0).grid(n), solver) - exact).abs().max())
              for n in (32, 64, 128)]
    assert errors[2] < (3e-2 if order == 1 else 1e-3)
    for coarse, fine in zip(errors[:-1], errors[1:]):
        assert fine < coarse / (2**order * 0.85)


def test_ddim_inversion_then_sampling_returns_x(gaussian):
    """η = 0, exact denoiser: invert to σ_max and integrate back. Both legs are first-order (DDIM),
    so the round-trip error is O(1/steps): ≤ 1e-2 on a 1024-level grid and ~4× larger at 256."""
    x = gaussian.mean + gaussian.std * torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    errors = []
    for steps in (256, 1024):
        sigmas = EDMSchedule(0.002, 5.0).grid(steps)
        trajectory = ddim_invert(gaussian, x, sigmas.flip(0))
        assert trajectory.shape == (steps + 1, 500, 2) and torch.equal(trajectory[0], x)
        assert torch.allclose(trajectory[-1], gaussian.flow(x, 0.0, 5.0), rtol=2e-2, atol=2e-2)
        errors.append(float((sample(gaussian, trajectory[-1], sigmas) - x).abs().max()))
    assert errors[1] <= 1e-2
    assert 3.0 < errors[0] / errors[1] < 5.0


def test_ddim_inversion_per_sample_grid_and_eta(gaussian, generator):
    x = torch.randn(4, 2)
    grid = torch.stack([torch.linspace(0, s, 5) for s in (0.5, 1.0, 2.0, 4.0)], dim=1)
    batched = ddim_invert(gaussian, x, grid)
    for j in range(4):
        assert torch.allclose(batched[:, j], ddim_invert(gaussian, x[j:j + 1], grid[:, j])[:, 0], atol=1e-6)
    noisy = ddim_invert(gaussian, x, grid, eta=1.0, generator=generator)
    assert not torch.allclose(noisy[-1], batched[-1])
    assert math.isclose(ancestral_std(1.0, 2.0), (3 / 4) ** 0.5)
    with pytest.raises(ValueError, match="ascending"):
        ddim_invert(gaussian, x, torch.tensor([0.0, 1.0, 0.5]))


def test_target_loss_gradient_is_x_minus_y_over_batch():
    x = torch.randn(8, 3, 4, requires_grad=True)
    y = torch.randn(8, 3, 4, requires_grad=True)
    loss = target_loss(x, y)
    loss.backward()
    assert torch.allclose(x.grad, (x - y).detach() / 8)
    assert y.grad is None
    assert math.isclose(float(loss.detach()), float(0.5 * (x - y).detach().pow(2).sum() / 8), rel_tol=1e-6)


def test_registry_lists_all_methods_and_rejects_unknown(gaussian):
    assert available_guidances() == ("msd", "sdi", "sds", "vsd")
    with pytest.raises(ValueError, match=r"guidance.name must be one of \('msd', 'sdi', 'sds', 'vsd'\)"):
        build_guidance("ism", denoiser=gaussian)


def test_as_sigma_shapes():
    x = torch.zeros(3, 2)
    assert torch.equal(as_sigma(0.5, x), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="sigma must be"):
        as_sigma(torch.ones(2), x)


@pytest.mark.parametrize("kwargs,field", [
    ({"lambda0": 0.0}, "guidance.lambda0"), ({"lambda0": -1.0}, "guidance.lambda0"),
    ({"lambda0": 0.3, "lambda_min": 0.5}, "guidance.lambda_min"), ({"lambda0": 0.3, "kind": "step"}, "guidance.schedule"),
])
def test_bandwidth_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BandwidthSchedule(**kwargs)


def test_bandwidth_schedules_and_stop():
    linear = BandwidthSchedule(math.sqrt(0.1), lambda_min=0.01, total_steps=150)
    assert math.isclose(linear(0), math.sqrt(0.1)) and math.isclose(linear(75), math.sqrt(0.1) / 2)
    first_stop = next(k for k in range(200) if linear.should_stop(k))
    assert linear(first_stop) < 0.01 <= linear(first_stop - 1)
    exponential = BandwidthSchedule(1.0, 0.0, 10, "exponential", lambda_end=0.01)
    assert math.isclose(exponential(5), 0.1)
    cosine = BandwidthSchedule(1.0, 0.0, 10, "cosine")
    assert math.isclose(cosine(5), 0.5) and math.isclose(cosine(10), 0.0, abs_tol=1e-12)

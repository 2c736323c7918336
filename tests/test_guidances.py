"""The four guidances against closed forms on a Gaussian prior, and their invariants."""
import math

import pytest
import torch

from baselines import SDIGuidance, SDSGuidance, VSDGuidance
from msd.denoiser import GuidedDenoiser
from msd.guidance import build_guidance
from msd.mean_shift import MSDGuidance
from msd.schedules import EDMSchedule
from msd.solvers import sample
from tests.conftest import GaussianDenoiser


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sdi_without_inversion_equals_sds_with_sigma_weighting(gaussian):
    x = torch.randn(64, 2, generator=seeded(5))
    sds = SDSGuidance(gaussian, weighting="sigma", t_min=0.1, t_max=0.9)
    sdi = SDIGuidance(gaussian, inversion=False, t_min=0.1, t_max=0.9)
    assert torch.allclose(sds(x, 0, seeded(7)).target, sdi(x, 0, seeded(7)).target, atol=1e-6)


@pytest.mark.parametrize("weighting", ["sds", "uniform", "fantasia3d"])
def test_sds_expected_gradient_matches_closed_form(gaussian, weighting):
    """At fixed σ: E_ε[w(ε̂(x+σε, σ) − ε)] = w σ (x − μ)/(s² + σ²)."""
    t = 0.7
    sigma = float(EDMSchedule(0.002, 5.0).sigma(torch.tensor(t, dtype=torch.float64)))
    x = torch.tensor([[1.0, -0.5]]).expand(40_000, 2)
    guidance = SDSGuidance(gaussian, weighting=weighting, t_min=t, t_max=t)
    grad = x - guidance(x, 0, seeded(1)).target
    w = {"sds": sigma**2 / (1 + sigma**2), "uniform": 1.0,
         "fantasia3d": (1 + sigma**2) ** -0.5 * sigma**2 / (1 + sigma**2)}[weighting]
    expected = w * sigma * (x[0] - gaussian.mean) / (gaussian.std**2 + sigma**2)
    stderr = grad.std(dim=0) / math.sqrt(len(grad))
    assert torch.all((grad.mean(dim=0) - expected).abs() < 4 * stderr)


def test_sdi_inversion_gives_the_closed_form_target(gaussian):
    """η = 0: inversion follows the flow z_σ = μ + (x−μ)√(s²+σ²)/s, then D(z_σ, σ) = μ + (x−μ) s/√(s²+σ²)."""
    t = 0.6
    sigma = float(EDMSchedule(0.002, 5.0).sigma(torch.tensor(t, dtype=torch.float64)))
    x = torch.randn(100, 2, generator=seeded(2)) * 0.5 + gaussian.mean
    guidance = SDIGuidance(gaussian, inversion_steps=400, t_min=t, t_max=t)
    out = guidance(x, 0, seeded(3))
    expected = gaussian.mean + (x - gaussian.mean) * gaussian.std / math.sqrt(gaussian.std**2 + sigma**2)
    assert torch.allclose(out.target, expected, atol=5e-3)
    assert out.aux["nfe"] == 401


def test_sdi_inversion_scale_and_jitter(gaussian):
    guide = GaussianDenoiser([0.0, 0.0], 1.0)
    guided = GuidedDenoiser(gaussian, guide, 4.0)
    sdi = SDIGuidance(guided, inversion_scale=-2.0, eta=0.3, level_jitter=True)
    assert sdi.inversion_denoiser.scale == -2.0 and sdi.inversion_denoiser.main is gaussian
    x = torch.randn(16, 2)
    assert torch.equal(sdi(x, 0, seeded(1)).target, sdi(x, 0, seeded(1)).target)
    with pytest.raises(ValueError, match="guidance.inversion_scale"):
        SDIGuidance(gaussian, inversion_scale=3.0)


def test_vsd_starts_at_zero_gradient_and_learns_the_particles(gaussian):
    """ε̂_φ is initialised to the prior, so with w = 1 the first VSD gradient is exactly zero;
    denoising score matching on fixed particles then lowers its loss on a fixed (paired) draw."""
    x = torch.rand(512, 2, generator=seeded(4)) * 2 - 1
    vsd = VSDGuidance(gaussian, phi_lr=1e-2, phi_steps=1)
    first = vsd(x, 0, seeded(5))
    assert torch.equal(first.target, x)

    def held_out_loss():
        g = seeded(99)
        xs = x.repeat(20, 1)
        sigma = vsd.phi_timesteps.sample(len(xs), 0, g)
        noise = torch.randn(xs.shape, generator=g)
        with torch.no_grad():
            return float((vsd.particle_model.eps(xs + sigma[:, None] * noise, sigma) - noise).pow(2).sum(1).mean())

    before = held_out_loss()
    for k in range(300):
        vsd.train_particle_model(x, seeded(100 + k))
    assert held_out_loss() < before - 0.02
    assert float((vsd(x, 1, seeded(6)).target - x).abs().max()) > 0


def test_msd_stable_solver_limits(gaussian):
    """λ → 0 returns x (zero gradient); λ → ∞ is plain DDIM sampling from the same noise."""
    x = torch.randn(32, 2, generator=seeded(8))
    tiny = MSDGuidance(gaussian, sampler="stable", lambda0=1e-4, lambda_min=0.0, solver_steps=16, solver="euler")
    assert torch.allclose(tiny(x, 0, seeded(9)).target, x, atol=1e-5)
    huge = MSDGuidance(gaussian, sampler="stable", lambda0=1e4, lambda_min=0.0, solver_steps=16, solver="euler")
    sigmas = EDMSchedule(0.002, 5.0).grid(16)
    ddim = sample(gaussian, float(sigmas[0]) * torch.randn(32, 2, generator=seeded(9)), sigmas)
    assert torch.allclose(huge(x, 0, seeded(9)).target, ddim, atol=1e-4)


def test_msd_ode_solver_limits_and_kernel_interval(gaussian):
    x = torch.randn(32, 2, generator=seeded(10))
    sigmas = EDMSchedule(0.002, 5.0).grid(16)
    ddim = sample(gaussian, float(sigmas[0]) * torch.randn(32, 2, generator=seeded(11)), sigmas)
    huge = MSDGuidance(gaussian, sampler="ode", lambda0=1e4, lambda_min=0.0, solver_steps=16, solver="euler")
    assert torch.allclose(huge(x, 0, seeded(11)).target, ddim, atol=1e-4)
    tiny = MSDGuidance(gaussian, sampler="ode", lambda0=1e-5, lambda_min=0.0, solver_steps=16, solver="euler")
    assert torch.allclose(tiny(x, 0, seeded(11)).target, x, atol=1e-5)
    never = MSDGuidance(gaussian, sampler="ode", lambda0=0.3, kernel_interval=(50.0, 60.0), solver_steps=16,
                         solver="euler")
    assert torch.allclose(never(x, 0, seeded(11)).target, ddim, atol=1e-6)


def test_msd_kernel_centres():
    """For a VE-native model (α = 1) ``raw`` and ``noise_scaled`` coincide; for a VP model they differ."""
    ve = GaussianDenoiser([0.3, -0.2], 0.4)
    x = torch.randn(8, 2)
    a = MSDGuidance(ve, sampler="ode", kernel_center="raw", solver_steps=8)(x, 0, seeded(1)).target
    b = MSDGuidance(ve, sampler="ode", kernel_center="noise_scaled", solver_steps=8)(x, 0, seeded(1)).target
    assert torch.equal(a, b)
    vp = GaussianDenoiser([0.3, -0.2], 0.4)
    vp.vp = True
    c = MSDGuidance(vp, sampler="ode", kernel_center="raw", solver_steps=8)(x, 0, seeded(1)).target
    d = MSDGuidance(vp, sampler="ode", kernel_center="noise_scaled", solver_steps=8)(x, 0, seeded(1)).target
    assert not torch.allclose(c, d)


def test_msd_bandwidth_schedule_and_termination(gaussian):
    msd = MSDGuidance(gaussian, lambda0=math.sqrt(0.1), lambda_min=0.01, total_steps=150, solver_steps=4,
                      solver="euler")
    out = msd(torch.zeros(4, 2), 75, seeded(0))
    assert math.isclose(out.aux["bandwidth"], math.sqrt(0.1) / 2)
    assert not msd.should_stop(140) and msd.should_stop(149)
    assert out.aux["nfe"] == 4


@pytest.mark.parametrize("kwargs,field", [
    ({"sampler": "sde"}, "guidance.sampler"), ({"kernel_center": "x"}, "guidance.kernel_center"),
    ({"num_samples": 0}, "guidance.num_samples"), ({"sampler": "exact"}, "guidance.sampler='exact'"),
    ({"lambda0": 0.0}, "guidance.lambda0"), ({"lambda0": 0.1, "lambda_min": 0.2}, "guidance.lambda_min"),
    ({"kernel_interval": (2.0, 1.0)}, "guidance.kernel_interval"), ({"solver": "rk4"}, "solver"),
])
def test_msd_rejects_bad_settings(gaussian, kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        MSDGuidance(gaussian, **kwargs)


@pytest.mark.parametrize("name", ["sds", "vsd", "sdi", "msd"])
def test_same_seed_same_target(gaussian, name):
    x = torch.randn(16, 2, generator=seeded(3))
    outs = [build_guidance(name, denoiser=gaussian)(x, 1, seeded(42)).target for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("sampler", ["ode", "stable"])
def test_msd_ode_samplers_forget_their_initial_noise_at_small_bandwidth(gaussian, sampler):
    """With kernel time s = σ²/2 and the kernel on over [0, σ_max], the start noise is damped by
    exp(−(σ_max² − σ²)/(2λ²)): at λ = √0.1 two seeds give the same product 'sample' (a documented
    property of eq. 12/15 in our conventions); at λ = 3 the seed matters."""
    x = torch.randn(16, 2, generator=seeded(3))
    for lam, same in ((math.sqrt(0.1), True), (3.0, False)):
        msd = MSDGuidance(gaussian, sampler=sampler, lambda0=lam, solver_steps=16, solver="euler")
        a, b = msd(x, 0, seeded(1)).target, msd(x, 0, seeded(2)).target
        assert torch.allclose(a, b, atol=1e-5) == same


def test_sdi_global_grid_is_the_official_ddim_grid_cut_at_t():
    """inversion_grid='global': the levels {0, 1/n, …} below t, then t (official SDI); ⌈t·n⌉ steps."""
    schedule = EDMSchedule(0.002, 5.0)
    sdi = SDIGuidance(GaussianDenoiser(torch.zeros(2), 1.0), noise_schedule=schedule, inversion_grid="global",
                      inversion_steps=10)
    levels = sdi.global_grid(0.45)
    expected = schedule.sigma(torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.45], dtype=torch.float64))
    assert levels[0] == 0 and torch.allclose(levels[1:], expected[1:])
    assert len(sdi.global_grid(0.98)) - 1 == 10 and len(sdi.global_grid(0.1)) - 1 == 1
    from msd.schedules import VPSchedule

    vp = SDIGuidance(GaussianDenoiser(torch.zeros(2), 1.0), noise_schedule=VPSchedule.stable_diffusion(),
                     inversion_grid="global", timestep_mode="linear", total_steps=60)
    for step in range(60):  # t = 0.98 − 0.96·55/60 = 0.1000000000000001 lands on the grid time 0.1
        t = float(vp.timesteps.t(1, step)[0])
        assert bool((vp.global_grid(t).float().diff() > 0).all()), t
    with pytest.raises(ValueError, match="guidance.inversion_grid"):
        SDIGuidance(GaussianDenoiser(torch.zeros(2), 1.0), inversion_grid="fine")

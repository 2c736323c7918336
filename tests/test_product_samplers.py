"""MSD's product samplers against exact references (docs/design.md §3–4).

* ``product_ode`` (deterministic and η = 1) against exact samples of the product distribution
  ``ṗ(y|c) ∝ p(y) N(y; c, λ²I)`` of the class-A fractal (a Gaussian mixture times a Gaussian is a Gaussian
  mixture, sampled exactly by ``GaussianMixture.product_sample``); the eq. 12 ``ode`` sampler is scored by the
  same bound to show that the bound discriminates.
* ``tweedie`` against the exact product mean; :class:`ProductDenoiser` against ``−σ ∇log q_σ`` of the product
  mixture computed here in closed form; the λ → 0 / λ → ∞ limits with CFG and on a tiny diffusers pipeline.
* The eq. 12 kernel time conventions, checked on a zero model, and ``NoiseSchedule.time`` as σ's inverse.

MMD kernel (all of this file): ``toy2d.metrics.mmd_rbf`` (biased V-statistic of MMD², mean of RBF kernels
``exp(−‖u − v‖²/2h²)``) on samples divided by λ with h ∈ {0.25, 0.5, 1}, i.e. bandwidths λ·{0.25, 0.5, 1} in
data units, so one bound serves every λ.
"""
from __future__ import annotations

import math

import pytest
import torch

from msd.denoiser import Denoiser, GuidedDenoiser, as_sigma
from msd.mean_shift import MSDGuidance, ProductDenoiser
from msd.schedules import EDMSchedule, VPSchedule
from msd.solvers import sample
from toy2d import TOY_SCHEDULE, ExactDenoiser, GaussianMixture, fractal_gmm
from toy2d.metrics import mmd_rbf

LAMBDAS = (math.sqrt(0.1), 0.03)
N_SAMPLES = 2000
MMD_SCALES = (0.25, 0.5, 1.0)
FLOOR_FACTOR, FLOOR_MARGIN = 3.0, 5e-4
"""product_ode must be within FLOOR_FACTOR × the exact-vs-exact MMD (mean over the centres) + FLOOR_MARGIN."""
ETA_FACTOR, ETA_MARGIN = 6.0, 1e-3
"""The looser bound of the stochastic (η = 1, 64 Euler steps) variant, whose std is up to ~8 % low at 64 steps."""


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_mmd(a: torch.Tensor, b: torch.Tensor, lam: float) -> float:
    return mmd_rbf((a / lam).double().numpy(), (b / lam).double().numpy(), MMD_SCALES)


@pytest.fixture(scope="module")
def fractal():
    mixture = fractal_gmm("A")
    return mixture, ExactDenoiser(mixture)


@pytest.fixture(scope="module")
def centres(fractal) -> torch.Tensor:
    """Two canvas points (the canvas is centred at (0.3, 0.3), half-size 1.2) and one point near a branch
    (an exact sample of p_A ∗ N(0, 0.05²), seed 0: (0.6952, −0.2165)); float64 [3, 2]."""
    mixture, _ = fractal
    canvas = torch.tensor([[0.9, -0.3], [-0.3, 0.9]], dtype=torch.float64)
    return torch.cat([canvas, mixture.sample(1, 0.05, generator=seeded(0)).double()])


@pytest.fixture(scope="module", params=LAMBDAS, ids=["lam_sqrt0.1", "lam_0.03"])
def reference(request, fractal, centres):
    """(λ, exact product samples [N, 3, 2], the exact-vs-exact MMD floor, the exact product means [3, 2]).

    Measured exact-vs-exact MMD (two independent exact sets of 2000, seeds 100 / 200), per centre:
    λ = √0.1: 0.00043, 0.00106, 0.00069 (floor 0.00072, bound 3·floor + 5e-4 = 0.0027);
    λ = 0.03: 0.00048, 0.00152, 0.00044 (floor 0.00081, bound 0.0029).
    """
    mixture, _ = fractal
    lam = request.param
    exact = mixture.product_sample(centres, lam, generator=seeded(100), n_per_center=N_SAMPLES)
    other = mixture.product_sample(centres, lam, generator=seeded(200), n_per_center=N_SAMPLES)
    floor = sum(rel_mmd(other[:, c], exact[:, c], lam) for c in range(len(centres))) / len(centres)
    return lam, exact, floor, mixture.product_mean(centres, lam)


def draw(denoiser: Denoiser, centres: torch.Tensor, lam: float, seed: int, **settings) -> torch.Tensor:
    """[N_SAMPLES, 3, 2] float64 product samples (the samplers run in float32, as the toy runs do)."""
    guidance = MSDGuidance(denoiser, num_samples=N_SAMPLES, **settings)
    return guidance.product_samples(centres.float(), lam, seeded(seed)).double()


def scores(samples, reference):
    lam, exact, floor, means = reference
    mmd = [rel_mmd(samples[:, c], exact[:, c], lam) for c in range(exact.shape[1])]
    std_ratio = samples.std(0) / exact.std(0)  # [3, 2]: per centre and axis
    mean_err = (samples.mean(0) - means).norm(dim=-1) / lam  # [3]
    return mmd, std_ratio, mean_err


# ----- 1. product_ode samples ṗ; eq. 12 does not -------------------------------------------------------------

def test_product_ode_matches_exact_product_samples(fractal, centres, reference):
    """Default solver (Heun, 33 levels). Measured MMD(product_ode, exact) per centre: λ = √0.1: 0.00049, 0.00044,
    0.00048; λ = 0.03: 0.00080, 0.00083, 0.00095 (the floor's size); std ratios 0.97–1.03; mean error ≤ 0.07 λ."""
    lam, _, floor, _ = reference
    samples = draw(fractal[1], centres, lam, seed=1, sampler="product_ode", solver="heun", solver_steps=33)
    assert samples.shape == (N_SAMPLES, 3, 2) and torch.isfinite(samples).all()
    mmd, std_ratio, mean_err = scores(samples, reference)
    bound = FLOOR_FACTOR * floor + FLOOR_MARGIN
    assert max(mmd) <= bound, (mmd, floor)
    assert ((std_ratio - 1).abs() <= 0.1).all(), std_ratio
    assert (mean_err <= 0.15).all(), mean_err


def test_the_bound_discriminates_eq12_ode_is_not_a_sampler(fractal, centres, reference):
    """The paper-literal eq. 12 reading (kernel time σ²/2) damps its start noise by e^{−σ_max²/2λ²}: one point per
    centre whatever the seed. Measured MMD 0.52–0.75 against the exact samples (bound ~0.003), std ratio 0. This
    documents why it is not the default; it is not a property to keep."""
    lam, _, floor, _ = reference
    samples = draw(fractal[1], centres, lam, seed=1, sampler="ode", solver="heun", solver_steps=33,
                   kernel_time="sigma_sq_half")
    mmd, std_ratio, _ = scores(samples, reference)
    assert min(mmd) > FLOOR_FACTOR * floor + FLOOR_MARGIN, mmd
    assert (std_ratio < 0.01).all(), std_ratio


def test_truncated_start_matches_exact_product_samples(fractal, centres, reference):
    """start_factor = 10: the ODE starts at σ_s = 10λ from D(x, λ) + σ_s ε (Heun, 17 levels, 34 evaluations)."""
    lam, _, floor, _ = reference
    samples = draw(fractal[1], centres, lam, seed=1, sampler="product_ode", solver="heun", solver_steps=17,
                   start_factor=10.0)
    mmd, std_ratio, mean_err = scores(samples, reference)
    assert max(mmd) <= FLOOR_FACTOR * floor + FLOOR_MARGIN, (mmd, floor)
    assert ((std_ratio - 1).abs() <= 0.1).all(), std_ratio
    assert (mean_err <= 0.15).all(), mean_err


# ----- 6. the stochastic variant -------------------------------------------------------------------------------

def test_stochastic_product_ode_matches_exact_product_samples(fractal, centres, reference):
    """η = 1 (ancestral DDIM steps), 64 Euler levels. Measured MMD per centre: λ = √0.1: 0.00135, 0.00104, 0.00046;
    λ = 0.03: 0.00196, 0.00278, 0.00156 (bounds 0.0053, 0.0059); std ratios 0.92–1.00; mean error ≤ 0.034 λ."""
    lam, _, floor, _ = reference
    samples = draw(fractal[1], centres, lam, seed=1, sampler="product_ode", solver="euler", solver_steps=64, eta=1.0)
    mmd, std_ratio, mean_err = scores(samples, reference)
    assert max(mmd) <= ETA_FACTOR * floor + ETA_MARGIN, (mmd, floor)
    assert ((std_ratio > 0.8) & (std_ratio < 1.1)).all(), std_ratio
    assert (mean_err <= 0.15).all(), mean_err


def test_stochastic_product_ode_is_seeded(fractal):
    x = torch.tensor([[0.9, -0.3], [0.4, 0.15]])
    guidance = MSDGuidance(fractal[1], sampler="product_ode", solver="euler", solver_steps=8, eta=1.0, num_samples=3)
    a, b = (guidance.product_samples(x, 0.1, seeded(5)) for _ in range(2))
    assert torch.equal(a, b)
    c = guidance.product_samples(x, 0.1, seeded(6))
    assert (a - c).abs().min() > 0  # every coordinate differs
    # the η noise itself matters, not only the start noise: η = 1 differs from η = 0 from the same seed
    plain = MSDGuidance(fractal[1], sampler="product_ode", solver="euler", solver_steps=8, num_samples=3)
    assert not torch.allclose(plain.product_samples(x, 0.1, seeded(5)), a, atol=1e-3)


# ----- 7. common start noise -----------------------------------------------------------------------------------

def test_common_start_noise_is_drawn_once_and_still_samples_the_product(fractal, centres, reference):
    """start_noise='common': the first call draws ε from its generator (the same samples as a fresh sampler's
    from that generator state); later calls reuse ε whatever generator they get, so successive samples are one
    function of (x, λ) — and, ε being N(0, I) and independent per row, still exact product samples at the new λ."""
    lam, _, floor, _ = reference
    settings = dict(sampler="product_ode", solver="heun", solver_steps=17, start_factor=10.0, num_samples=N_SAMPLES)
    common, fresh = MSDGuidance(fractal[1], start_noise="common", **settings), MSDGuidance(fractal[1], **settings)
    x = centres.float()
    assert torch.equal(common.product_samples(x, 2 * lam, seeded(3)), fresh.product_samples(x, 2 * lam, seeded(3)))
    samples = common.product_samples(x, lam, seeded(4))
    assert torch.equal(samples, common.product_samples(x, lam, seeded(5)))
    assert not torch.equal(samples, fresh.product_samples(x, lam, seeded(4)))
    mmd, std_ratio, mean_err = scores(samples.double(), reference)
    assert max(mmd) <= FLOOR_FACTOR * floor + FLOOR_MARGIN, (mmd, floor)
    assert ((std_ratio - 1).abs() <= 0.1).all(), std_ratio
    assert (mean_err <= 0.15).all(), mean_err


def test_common_start_noise_is_the_guidance_state(fractal):
    """A checkpointed common noise makes a new guidance continue bitwise; a fresh-noise guidance refuses it; a
    change of the samples' shape names the field."""
    x = torch.tensor([[0.9, -0.3], [0.4, 0.15]])
    make = lambda **kw: MSDGuidance(fractal[1], solver_steps=8, **kw)  # noqa: E731
    first = make(start_noise="common")
    assert first.state_dict() == {}
    first.product_samples(x, 0.3, seeded(1))
    resumed = make(start_noise="common")
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(first.product_samples(x, 0.1, seeded(2)), resumed.product_samples(x, 0.1, seeded(9)))
    with pytest.raises(ValueError, match="keeps no state"):
        make().load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="start_noise"):
        first.product_samples(x[:1], 0.1, seeded(2))


@pytest.mark.parametrize("kwargs,field", [
    ({"start_noise": "bogus"}, "guidance.start_noise"),
    ({"sampler": "tweedie", "start_noise": "common"}, "guidance.start_noise"),
    ({"eta": 1.0, "solver": "heun"}, "guidance.eta"),
    ({"eta": 0.5, "solver": "euler", "sampler": "ode"}, "guidance.eta"),
    ({"eta": 1.5, "solver": "euler"}, "guidance.eta"),
    ({"sampler": "tweedie", "num_samples": 2}, "guidance.num_samples"),
    ({"kernel_time": "bogus"}, "guidance.kernel_time"),
    ({"kernel_time_scale": 0.0}, "guidance.kernel_time_scale"),
    ({"sampler": "tweedie", "start_factor": 3.0}, "guidance.start_factor"),
    ({"start_factor": 0.0}, "guidance.start_factor"),
    ({"inversion_scale": -2.0}, "guidance.inversion_scale"),
])
def test_bad_sampler_settings_name_the_field(fractal, kwargs, field):
    with pytest.raises(ValueError, match=field):
        MSDGuidance(fractal[1], **kwargs)


# ----- 2. tweedie is the exact mean shift ----------------------------------------------------------------------

@pytest.mark.parametrize("lam", [math.sqrt(0.1), 0.1, 0.01])
def test_tweedie_is_the_exact_product_mean(fractal, lam):
    """D(x, λ) = E_ṗ[y] exactly (float64): a 15 × 15 canvas grid plus 300 exact samples of p_A."""
    mixture, denoiser = fractal
    axis = torch.linspace(-0.9, 1.5, 15, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    x = torch.cat([grid, mixture.sample(300, generator=seeded(3)).double()])
    guidance = MSDGuidance(denoiser, sampler="tweedie", lambda0=lam, lambda_min=0.0)
    samples = guidance.product_samples(x, lam, seeded(0))
    assert samples.shape == (1, *x.shape) and samples.dtype == torch.float64
    exact = mixture.product_mean(x, lam)
    assert (samples[0] - exact).abs().max() <= 1e-10
    target = guidance(x, 0, seeded(0)).target  # the guidance call at step 0 (λ = λ0) returns the same
    assert (target - exact).abs().max() <= 1e-10
    assert (exact - x).abs().max() > 1e-3 * lam  # not a trivial identity: the shift is there


# ----- 3. ProductDenoiser is the product's ε̂ ------------------------------------------------------------------

def small_mixture() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weights = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64) / 4
    means = torch.tensor([[0.0, 0.0], [1.5, 0.5], [-1.0, 1.0]], dtype=torch.float64)
    covs = torch.tensor([[[0.10, 0.00], [0.00, 0.02]],
                         [[0.05, 0.03], [0.03, 0.04]],
                         [[0.02, -0.01], [-0.01, 0.08]]], dtype=torch.float64)
    return weights, means, covs


def product_eps(weights, means, covs, centres, lam, z, sigma) -> torch.Tensor:
    """−σ ∇log q_σ(z), q_σ = ṗ(·|c) ∗ N(0, σ²I), from the information form of the product of Gaussians:
    ``C_k = (Σ_k⁻¹ + I/λ²)⁻¹``, ``m_k = C_k (Σ_k⁻¹ μ_k + c/λ²)``, weights ∝ φ_k N(c; μ_k, Σ_k + λ²I); rows n
    have their own centre, point and σ."""
    eye = torch.eye(2, dtype=torch.float64)
    prec = torch.linalg.inv(covs)  # [K, 2, 2]
    cov_prod = torch.linalg.inv(prec + eye / lam**2)  # [K, 2, 2]
    rhs = (prec @ means[:, :, None])[None] + (centres / lam**2)[:, None, :, None]  # [N, K, 2, 1]
    mean_prod = (cov_prod[None] @ rhs)[..., 0]  # [N, K, 2]
    log_w = torch.log(weights) + torch.distributions.MultivariateNormal(means, covs + lam**2 * eye).log_prob(
        centres[:, None, :])  # [N, K]
    z = z.clone().requires_grad_(True)
    diffused = cov_prod[None] + (sigma**2)[:, None, None, None] * eye  # [N, K, 2, 2]
    log_q = torch.logsumexp(torch.log_softmax(log_w, -1) + torch.distributions.MultivariateNormal(
        mean_prod, diffused).log_prob(z[:, None, :]), -1)
    (grad,) = torch.autograd.grad(log_q.sum(), z)
    return -sigma[:, None] * grad


@pytest.mark.parametrize("lam", [0.05, 0.3, 2.0])
def test_product_denoiser_is_the_eps_of_the_diffused_product(lam):
    weights, means, covs = small_mixture()
    base = ExactDenoiser(GaussianMixture(weights, means, covs))
    n = 24
    centres = torch.rand(n, 2, generator=seeded(1), dtype=torch.float64) * 4 - torch.tensor([2.0, 1.5],
                                                                                                dtype=torch.float64)
    product = ProductDenoiser(base, centres, lam)
    levels = (0.01, 0.3, 5.0)
    for sigma in levels:  # one σ for the batch
        sig = torch.full((n,), sigma, dtype=torch.float64)
        z = centres + (sigma + lam) * torch.randn(n, 2, generator=seeded(2), dtype=torch.float64)
        torch.testing.assert_close(product.eps(z, sigma), product_eps(weights, means, covs, centres, lam, z, sig),
                                   rtol=1e-9, atol=1e-9)
    sig = torch.tensor(levels, dtype=torch.float64).repeat(n // 3)  # a σ per row
    z = centres + sig[:, None] * torch.randn(n, 2, generator=seeded(3), dtype=torch.float64)
    torch.testing.assert_close(product.eps(z, sig), product_eps(weights, means, covs, centres, lam, z, sig),
                               rtol=1e-9, atol=1e-9)


# ----- 4. with CFG (no exact product sampler exists): limits only ----------------------------------------------

def test_product_ode_with_cfg_limits(fractal):
    """Exact A model, exact AB guide, w = 4. λ → 0 returns x; λ → ∞ is plain PF-ODE sampling of the guided
    model from the sampler's own start ``x + σ_max ε``."""
    guided = GuidedDenoiser(fractal[1], ExactDenoiser(fractal_gmm("AB")), 4.0)
    axis = torch.linspace(-0.9, 1.5, 4)
    x = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    settings = dict(sampler="product_ode", solver="heun", solver_steps=9, lambda_min=0.0)
    samples = MSDGuidance(guided, num_samples=4, **settings).product_samples(x, 0.1, seeded(1))
    assert samples.shape == (4, 16, 2) and torch.isfinite(samples).all()
    assert ((samples - x).norm(dim=-1) > 1e-3).any()
    tiny = MSDGuidance(guided, lambda0=1e-4, **settings)(x, 0, seeded(1)).target
    assert (tiny - x).abs().max() < 1e-3  # measured 2.3e-4: a sample of ṗ ≈ N(x, λ²) is O(λ) from x
    huge = MSDGuidance(guided, lambda0=1e4, **settings)
    start = x + huge.sigmas[0] * torch.randn(x.shape, generator=seeded(2))
    plain = sample(guided, start, EDMSchedule(0.002, 5.0).grid(9), "heun")
    assert (huge(x, 0, seeded(2)).target - plain).abs().max() < 1e-5  # measured 4e-7 (|plain| ≤ 1.5)
    assert (plain - x).abs().max() > 0.1  # the limit is not x itself


# ----- 5. the tiny diffusers pipeline --------------------------------------------------------------------------

@pytest.fixture
def tiny_prior(tiny_latent_prior):
    """The session's tiny random latent prior (tests/conftest.py), read-only."""
    return tiny_latent_prior


def test_product_ode_on_the_tiny_pipeline(tiny_prior):
    denoiser = tiny_prior.denoiser(3.0).condition(tiny_prior.conditioning("the cat"))
    x = torch.randn(2, *tiny_prior.sample_shape, generator=seeded(11))
    settings = dict(sampler="product_ode", solver="euler", solver_steps=4, lambda_min=0.0,
                    noise_schedule=tiny_prior.schedule)
    with torch.no_grad():
        samples = MSDGuidance(denoiser, num_samples=2, **settings).product_samples(x, 0.5, seeded(12))
        assert samples.shape == (2, *x.shape) and torch.isfinite(samples).all()
        tiny = MSDGuidance(denoiser, lambda0=1e-4, **settings)(x, 0, seeded(12)).target
        assert (tiny - x).abs().max() < 1e-3  # measured 1.3e-4 (O(λ))
        # λ = 1e5: the product's PF-ODE differs from the plain one by O(σ_max²/λ²) (σ_max ≈ 14.6; measured
        # 1.6e-4 at λ = 1e4 on outputs of size ~50); at 1e5 what is left is float32 rounding (2.4e-5).
        huge = MSDGuidance(denoiser, lambda0=1e5, **settings)
        sigmas = tiny_prior.schedule.grid(4)
        start = x + float(sigmas[0]) * torch.randn(x.shape, generator=seeded(12))
        ddim = sample(denoiser, start, sigmas)
        assert (huge(x, 0, seeded(12)).target - ddim).abs().max() < 1e-4
        assert (ddim - x).abs().max() > 1.0  # the limit is not x itself
        lam = 0.5
        tweedie = MSDGuidance(denoiser, sampler="tweedie", lambda0=lam, lambda_min=0.0)(x, 0, seeded(0)).target
        assert torch.allclose(tweedie, x - lam * denoiser.eps(x, as_sigma(lam, x)), atol=1e-6)


# ----- 7. eq. 12's kernel time on a zero model; schedule time inverts σ ----------------------------------------

class ZeroDenoiser(Denoiser):
    """ε̂ ≡ 0: every PF-ODE step is the identity, so only the kernel decay moves the ``ode`` sampler."""

    noise_schedule = TOY_SCHEDULE

    def eps(self, x, sigma):
        return torch.zeros_like(x)


@pytest.mark.parametrize("schedule", [EDMSchedule(0.002, 5.0), VPSchedule.stable_diffusion()], ids=["edm", "vp"])
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_ode_kernel_time_conventions_on_a_zero_model(schedule, solver):
    """With ε̂ ≡ 0 the ``ode`` sampler returns ``c + (σ_max ε − c)·exp(−S/λ²)``: S = Σ Δt = 1 (t from 1 to 0)
    for ``timestep``, S = Σ (σ_i² − σ_{i+1}²)/2 = σ_max²/2 for ``sigma_sq_half``; times ``kernel_time_scale``."""
    steps, lam = 12, 1.5
    c = torch.tensor([[0.3, -0.2], [1.0, 2.0], [-4.0, 0.5]], dtype=torch.float64)
    start = schedule.sigma_max * torch.randn(c.shape, generator=seeded(4), dtype=torch.float64)
    for kernel_time, total in (("timestep", 1.0), ("sigma_sq_half", schedule.sigma_max**2 / 2)):
        lam_here = lam if kernel_time == "timestep" else lam * schedule.sigma_max
        for scale in (1.0, 2.5):
            guidance = MSDGuidance(ZeroDenoiser(), sampler="ode", solver=solver, solver_steps=steps,
                                   noise_schedule=schedule, kernel_time=kernel_time, kernel_time_scale=scale)
            got = guidance.product_samples(c, lam_here, seeded(4))[0]
            expected = c + (start - c) * math.exp(-scale * total / lam_here**2)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_timestep_kernel_time_is_the_grid_fraction_per_step():
    """Per step: with the kernel on only for σ_i in an interval, the exponent counts Δt = 1/(steps − 1) per active
    step (the grid is σ(t) at t = 1, 1 − 1/(steps−1), …, 0, then the final step σ_min → 0 has Δt = 0)."""
    schedule, steps, lam = EDMSchedule(0.002, 5.0), 9, 0.7
    grid = [float(s) for s in schedule.grid(steps)]
    interval = (0.05, 1.0)
    active = sum(interval[0] <= s <= interval[1] for s in grid[:-2])
    assert 0 < active < steps - 1
    c = torch.tensor([[0.3, -0.2], [1.0, 2.0]], dtype=torch.float64)
    start = schedule.sigma_max * torch.randn(c.shape, generator=seeded(4), dtype=torch.float64)
    guidance = MSDGuidance(ZeroDenoiser(), sampler="ode", solver="euler", solver_steps=steps, noise_schedule=schedule,
                           kernel_time="timestep", kernel_interval=interval)
    got = guidance.product_samples(c, lam, seeded(4))[0]
    expected = c + (start - c) * math.exp(-active / (steps - 1) / lam**2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("schedule", [EDMSchedule(0.002, 5.0), EDMSchedule(0.01, 80.0, 5.0), VPSchedule.stable_diffusion()],
                         ids=["edm", "edm_wide", "vp"])
def test_schedule_time_inverts_sigma(schedule):
    t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    assert (schedule.time(schedule.sigma(t)) - t).abs().max() <= 1e-9
    sigma = torch.exp(torch.linspace(math.log(schedule.sigma_min), math.log(schedule.sigma_max), 777,
                                     dtype=torch.float64))
    assert ((schedule.sigma(schedule.time(sigma)) - sigma).abs() / sigma).max() <= 1e-9
    edges = schedule.time(torch.tensor([0.0, schedule.sigma_min / 2, schedule.sigma_max * 2], dtype=torch.float64))
    assert edges.tolist() == [0.0, 0.0, 1.0]


def test_common_noise_fixed_point_is_offset_from_a_gaussian_mode():
    """Why common noise is biased: for data N(μ, w²I) the product ṗ(·|x) = N(m, s²I), m = (w²x + λ²μ)/(w² + λ²),
    s = λw/√(w² + λ²), and the PF-ODE from x + σ_max ε is the affine map y = m + c(x − m + σ_max ε),
    c = s/√(s² + σ_max²). Iterating x ← y(x) with one reused ε therefore converges to
    x* − μ = c σ_max ε / ((1 − c)(1 − a)), a = w²/(w² + λ²) (≈ ε w√(w² + λ²)/λ), not to the mode μ, while the
    fresh-noise mean E[y] = m has its fixed point at μ. Checked against the closed form (exact denoiser, Heun 33)."""
    mu, w, lam = torch.tensor([[0.3, -0.2]], dtype=torch.float64), 0.05, 0.03
    mixture = GaussianMixture(torch.ones(1, dtype=torch.float64), mu, (w**2 * torch.eye(2, dtype=torch.float64))[None])
    guidance = MSDGuidance(ExactDenoiser(mixture), solver_steps=33, start_noise="common")
    x = torch.zeros(1, 2, dtype=torch.float64)
    for _ in range(80):
        x = guidance.product_samples(x, lam, seeded(0))[0]
    a, s, sigma_max = w**2 / (w**2 + lam**2), lam * w / math.sqrt(w**2 + lam**2), TOY_SCHEDULE.sigma_max
    c = s / math.sqrt(s**2 + sigma_max**2)
    expected = mu + c * sigma_max * guidance.common_noise / ((1 - c) * (1 - a))
    assert torch.allclose(x, expected, rtol=0, atol=0.02 * (expected - mu).norm()), (x, expected)
    assert (x - mu).norm() > 2 * w  # the offset is several mode widths here (λ < w)

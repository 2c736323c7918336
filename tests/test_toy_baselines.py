"""SDI and VSD checked where the toy makes them exact (README "SDI and VSD checked exactly", eval/sdi_toy.py)."""
import pytest
import torch

from baselines.sdi import SDIGuidance
from baselines.sds import SDSGuidance
from baselines.vsd import EmpiricalDenoiser, VSDGuidance
from eval.sdi_toy import sdi_levels, spread
from experiments.toy2d import canvas_grid
from msd.denoiser import as_sigma
from msd.schedules import EDMSchedule
from msd.solvers import ddim_invert, sample
from toy2d import ExactDenoiser, GaussianMixture, fractal_gmm


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def two_blobs() -> GaussianMixture:
    """A wide two-component mixture: smooth enough for 4000 samples to represent it at σ = 0.5."""
    covs = torch.tensor([[[0.09, 0.02], [0.02, 0.04]], [[0.04, 0.0], [0.0, 0.09]]], dtype=torch.float64)
    return GaussianMixture(torch.tensor([0.6, 0.4], dtype=torch.float64),
                           torch.tensor([[-0.5, 0.0], [0.6, 0.3]], dtype=torch.float64), covs)


@pytest.mark.parametrize("sigma", [0.003, 0.05, 0.4, 3.0])
def test_empirical_denoiser_is_the_score_of_the_particle_mixture(sigma):
    """ε̂ = −σ ∇log q_σ with q_σ = (1/M) Σ N(x_j, σ²I), built independently as a GaussianMixture with covariance
    σ²/2 I diffused by another σ²/2 (float64, ≤ 1e-10 even where ε̂ is ~10³)."""
    points = torch.rand(60, 2, generator=seeded(0), dtype=torch.float64) * 2 - 1
    z = points[:40] + sigma * torch.randn(40, 2, generator=seeded(1), dtype=torch.float64)
    mixture = GaussianMixture(torch.ones(60, dtype=torch.float64), points,
                              (sigma**2 / 2 * torch.eye(2, dtype=torch.float64)).expand(60, 2, 2).clone())
    expected = -sigma * mixture.score(z, sigma / 2**0.5)
    got = EmpiricalDenoiser(points, chunk_elements=7 * 60).eps(z, as_sigma(sigma, z))  # several chunks
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-10)


def test_vsd_ideal_gradient_vanishes_when_the_particles_follow_p():
    """Particles that are samples of p: q_σ ≈ p_σ at σ = 0.4, so w(σ)(ε̂_p − ε̂_q) is small at every draw,
    a Monte-Carlo error that falls as 1/√N (rms 0.051 at N = 1000, 0.024 at 4000, 0.011 at 16000), against
    0.82 for particles on a grid."""
    mixture = two_blobs()
    vsd = VSDGuidance(ExactDenoiser(mixture), particle_model="ideal", t_min=0.55, t_max=0.55, weighting="uniform")

    def rms_gradient(x):
        return float((x - vsd(x, 0, seeded(3)).target).pow(2).sum(dim=1).mean().sqrt())

    small, large = (rms_gradient(mixture.sample(n, generator=seeded(2))) for n in (1000, 4000))
    grid = rms_gradient(canvas_grid((0.0, 0.1), 1.0, 64).double())
    assert large < 0.05 * grid
    assert 1.6 < small / large < 2.8  # ≈ √4


def test_vsd_ideal_equals_sds_where_sigma_is_below_the_particle_spacing():
    """With the own component included, ε̂_q(x_i + σε) = ε up to e^{−spacing²/2σ²}: VSD is SDS there (same draws)."""
    x = canvas_grid((0.0, 0.0), 1.0, 8).double()  # spacing 0.29
    denoiser = ExactDenoiser(two_blobs())
    kwargs = dict(t_min=0.05, t_max=0.05)  # σ ≈ 0.0035
    vsd = VSDGuidance(denoiser, particle_model="ideal", **kwargs)(x, 0, seeded(4)).target
    sds = SDSGuidance(denoiser, **kwargs)(x, 0, seeded(4)).target
    assert torch.allclose(vsd, sds, rtol=0, atol=1e-12)


def test_vsd_ideal_config_state_and_errors():
    denoiser = ExactDenoiser(two_blobs())
    vsd = VSDGuidance(denoiser, particle_model="ideal")
    x = torch.rand(16, 2, generator=seeded(5))
    out = vsd(x, 0, seeded(6))
    assert out.aux["nfe"] == 1 and "phi_loss" not in out.aux
    state = vsd.state_dict()
    assert state == {"particle_model": "ideal"}
    fresh = VSDGuidance(denoiser, particle_model="ideal")
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x, 0, seeded(6)).target, out.target)  # nothing but the particles matters
    with pytest.raises(ValueError, match="checkpoint guidance state"):
        VSDGuidance(denoiser).load_state_dict(state)
    with pytest.raises(ValueError, match="guidance.particle_model"):
        VSDGuidance(denoiser, particle_model="oracle")


def test_sdi_fine_inversion_round_trips_but_data_is_not_its_fixed_point():
    """Exact denoiser, x = exact fractal samples: SDI's inversion (``eval.sdi_toy.sdi_levels``, the grid of
    ``baselines.sdi``) with 200 steps returns x after DDIM back down to within 5e-3 (median) at σ ≈ 0.56 and
    converges as 1/n; yet SDI's target D(Inv_σ(x), σ) is 0.2 away from x there, and at σ = 4.5 every target lies
    near the data mean (spread < 1/5 of the data's): x is not SDI's fixed point, the inversion is not the cause."""
    mixture = fractal_gmm("A")
    denoiser, schedule = ExactDenoiser(mixture), EDMSchedule(0.002, 5.0)
    x = mixture.sample(64, generator=seeded(7)).double()
    errors = {}
    for steps in (50, 200):
        levels = sdi_levels(schedule, 0.6, steps)
        z = ddim_invert(denoiser, x, levels)[-1]
        errors[steps] = float((sample(denoiser, z, levels.flip(0)) - x).norm(dim=1).median())
    assert errors[200] < 5e-3 and errors[200] < errors[50] / 3
    target = denoiser.denoise(z, as_sigma(float(levels[-1]), z))
    assert float((target - x).norm(dim=1).median()) > 0.1
    top = sdi_levels(schedule, 0.98, 50)
    target_top = denoiser.denoise(ddim_invert(denoiser, x, top)[-1], as_sigma(float(top[-1]), x))
    assert spread(target_top) < spread(x) / 5


def test_sdi_guidance_uses_the_study_grid():
    """The study's inversion (``sdi_levels`` + ``ddim_invert``) is the guidance's: same target at fixed t."""
    denoiser = ExactDenoiser(two_blobs())
    guidance = SDIGuidance(denoiser, inversion_steps=20, t_min=0.4, t_max=0.4, inversion_grid="uniform")
    x = torch.rand(32, 2, generator=seeded(8), dtype=torch.float64)
    levels = sdi_levels(EDMSchedule(0.002, 5.0), 0.4, 20)
    expected = denoiser.denoise(ddim_invert(denoiser, x, levels)[-1], as_sigma(float(levels[-1]), x))
    assert torch.allclose(guidance(x, 0, seeded(9)).target, expected, rtol=0, atol=1e-12)

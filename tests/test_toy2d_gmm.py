"""Gaussian mixture: exact heat-diffused density and score, sampling, product-with-kernel, fractal tree."""
import math

import pytest
import torch

from toy2d import GaussianMixture, fractal_gmm


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def small() -> GaussianMixture:
    """Three anisotropic components, one rotated, with unequal (unnormalised) weights."""
    weights = torch.tensor([2.0, 1.0, 1.0])
    means = torch.tensor([[0.0, 0.0], [1.5, 0.5], [-1.0, 1.0]])
    covs = torch.tensor([[[0.10, 0.00], [0.00, 0.02]],
                         [[0.05, 0.03], [0.03, 0.04]],
                         [[0.02, -0.01], [-0.01, 0.08]]])
    return GaussianMixture(weights, means, covs)


def _moments(mix: GaussianMixture, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form mean and covariance of p ∗ N(0, σ² I)."""
    w, mu, cov = mix.weights.double(), mix.means.double(), mix.covs.double()
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (cov + mu[:, :, None] * mu[:, None, :])).sum(0)
    return mean, second - torch.outer(mean, mean) + sigma**2 * torch.eye(2, dtype=torch.float64)


def _sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    return x.mean(0), torch.cov(x.T)


def _autograd_score(mix: GaussianMixture, x: torch.Tensor, sigma) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(x, sigma).sum(), x)
    return grad


def test_basic_api(small):
    assert len(small) == 3
    assert small.weights.dtype == small.means.dtype == small.covs.dtype == torch.float32
    torch.testing.assert_close(small.weights.sum(), torch.tensor(1.0))
    x = small.sample(5, generator=_gen())
    assert x.shape == (5, 2) and small.log_prob(x).shape == (5,) and small.score(x).shape == (5, 2)
    with pytest.raises(ValueError):
        small.log_prob(x, torch.ones(4))
    with pytest.raises(ValueError):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.zeros(1, 2, 2))


@pytest.mark.parametrize("which", ["small", "fractal"])
@pytest.mark.parametrize("sigma", [0.0, 0.03, 0.3, 2.0, "per_sample"])
def test_score_matches_autograd_of_log_prob(small, which, sigma):
    mix = small if which == "small" else fractal_gmm("A")
    n = 256
    if sigma == "per_sample":
        sigma = torch.exp(torch.linspace(-6.0, 1.0, n))
    noise = sigma[:, None] if isinstance(sigma, torch.Tensor) else sigma
    x = mix.sample(n, generator=_gen(1)) + (0.05 + noise) * torch.randn(n, 2, generator=_gen(2))
    score, reference = mix.score(x, sigma), _autograd_score(mix, x, sigma)
    assert torch.isfinite(score).all()
    scale = reference.norm(dim=1, keepdim=True)
    assert ((score - reference).abs() <= 1e-4 * scale + 1e-4).all()


def test_log_prob_is_normalised(small):
    """∫ p_σ = 1 by quadrature on a fine grid, at σ = 0 and σ = 0.2."""
    step = 0.01
    axis = torch.arange(-3.0, 4.0, step)
    grid = torch.cartesian_prod(axis, axis)
    for sigma in (0.0, 0.2):
        total = small.log_prob(grid, sigma).double().exp().sum() * step**2
        assert abs(total.item() - 1.0) < 2e-3


@pytest.mark.parametrize("sigma", [0.0, 0.4])
def test_samples_match_heat_diffused_moments(small, sigma):
    n = 200_000
    mean, cov = _sample_moments(small.sample(n, sigma, generator=_gen(3)))
    ref_mean, ref_cov = _moments(small, sigma)
    torch.testing.assert_close(mean, ref_mean, atol=6e-3, rtol=0)
    torch.testing.assert_close(cov, ref_cov, atol=1.5e-2, rtol=0)


def test_samples_match_density(small):
    """Samples drawn with a per-sample σ tensor have E[log p_σ(x)] = ∫ p_σ log p_σ (quadrature)."""
    sigma = 0.15
    step = 0.01
    axis = torch.arange(-3.0, 4.0, step)
    grid = torch.cartesian_prod(axis, axis)
    logp = small.log_prob(grid, sigma).double()
    neg_entropy = (logp.exp() * logp).sum() * step**2
    n = 100_000
    x = small.sample(n, torch.full((n,), sigma), generator=_gen(4))
    estimate = small.log_prob(x, sigma).double()
    assert abs(estimate.mean() - neg_entropy) < 4 * estimate.std() / math.sqrt(n)


def test_fractal_golden_facts():
    assert len(fractal_gmm("A")) == 1016 and len(fractal_gmm("B")) == 1016 and len(fractal_gmm("AB")) == 2032
    assert fractal_gmm("A") is fractal_gmm("A")
    torch.testing.assert_close(fractal_gmm("AB").means[:1016], fractal_gmm("A").means)
    mean, cov = _sample_moments(fractal_gmm("A").sample(200_000, generator=_gen(5)))
    torch.testing.assert_close(mean, torch.tensor([0.371, 0.364], dtype=torch.float64), atol=5e-3, rtol=0)
    torch.testing.assert_close(cov.diagonal().sqrt(), torch.tensor([0.333, 0.341], dtype=torch.float64),
                               atol=5e-3, rtol=0)
    mean, cov = _sample_moments(fractal_gmm("AB").sample(200_000, generator=_gen(6)))
    torch.testing.assert_close(mean, torch.zeros(2, dtype=torch.float64), atol=5e-3, rtol=0)
    torch.testing.assert_close(cov.diagonal().sqrt(), torch.full((2,), 0.5, dtype=torch.float64), atol=5e-3, rtol=0)
    with pytest.raises(ValueError, match="'A', 'B', 'AB'"):
        fractal_gmm("C")


@pytest.mark.parametrize("classes", ["A", "AB"])
@pytest.mark.parametrize("distance", [100.0, 1000.0])
@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_far_points_are_finite_and_point_back(classes, distance, sigma):
    mix = fractal_gmm(classes)
    angles = torch.linspace(0, 2 * math.pi, 17)[:-1]
    x = distance * torch.stack((angles.cos(), angles.sin()), dim=1)
    logp, score = mix.log_prob(x, sigma), mix.score(x, sigma)
    assert torch.isfinite(logp).all() and torch.isfinite(score).all()
    inward = -x / x.norm(dim=1, keepdim=True)
    cosine = (score * inward).sum(1) / score.norm(dim=1)
    assert (cosine > 0.5).all()


def _product_moments_by_quadrature(mix: GaussianMixture, center: torch.Tensor, lam: float):
    """Mean and covariance of ṗ(y | c) ∝ p(y) N(y; c, λ² I) on a fine grid (independent of the closed forms)."""
    step = 0.005
    axis = torch.arange(-3.5, 4.0, step, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    log_w = mix.log_prob(grid.float()).double() - 0.5 * ((grid - center.double()) ** 2).sum(1) / lam**2
    w = torch.softmax(log_w, dim=0)
    mean = (w[:, None] * grid).sum(0)
    centred = grid - mean
    return mean, (w[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)


CENTERS = torch.tensor([[0.2, -0.1], [1.0, 1.0], [-2.0, 2.5], [0.7, 0.3]])
LAMBDAS = torch.tensor([0.1, 0.3, 0.5, 1.0])


def test_product_mean_identity_and_quadrature(small):
    """E_ṗ[y] − c = λ² ∇log p_λ(c), and E_ṗ[y] agrees with quadrature of y p(y) N(y; c, λ² I)."""
    mean = small.product_mean(CENTERS, LAMBDAS)
    torch.testing.assert_close(mean - CENTERS, LAMBDAS[:, None] ** 2 * small.score(CENTERS, LAMBDAS),
                               atol=1e-6, rtol=1e-4)
    for c, lam, m in zip(CENTERS, LAMBDAS, mean.double()):
        torch.testing.assert_close(m, _product_moments_by_quadrature(small, c, lam.item())[0], atol=2e-3, rtol=0)


def test_product_identity_on_fractal():
    mix = fractal_gmm("A")
    centers = torch.rand(512, 2, generator=_gen(7)) * 2.4 - 0.9
    for lam in (0.02, math.sqrt(0.1), torch.exp(torch.linspace(-5.0, 0.5, 512))):
        lam2 = lam**2 if isinstance(lam, float) else (lam**2)[:, None]
        expected = lam2 * mix.score(centers, lam)
        got = mix.product_mean(centers, lam) - centers
        assert ((got - expected).abs() <= 1e-4 * expected.norm(dim=1, keepdim=True) + 1e-5).all()


def test_product_sample_moments(small):
    """Product samples match the product distribution's mean (closed form) and covariance (quadrature)."""
    n = 40_000
    y = small.product_sample(CENTERS, LAMBDAS, generator=_gen(8), n_per_center=n).double()
    assert y.shape == (n, 4, 2)
    assert small.product_sample(CENTERS, LAMBDAS, generator=_gen(8)).shape == (4, 2)
    mean = small.product_mean(CENTERS, LAMBDAS).double()
    stderr = y.std(0) / math.sqrt(n)
    assert ((y.mean(0) - mean).abs() < 5 * stderr + 1e-6).all()
    for i, (c, lam) in enumerate(zip(CENTERS, LAMBDAS)):
        _, cov = _product_moments_by_quadrature(small, c, lam.item())
        torch.testing.assert_close(torch.cov(y[:, i].T), cov, atol=0.03 * cov.diagonal().max().item(), rtol=0)


def test_product_sample_limits(small):
    """λ → ∞ gives plain samples of p; λ → 0 returns the centre."""
    n = 100_000
    centers = torch.tensor([[5.0, -3.0]]).expand(n, 2)
    mean, cov = _sample_moments(small.product_sample(centers, 1e4, generator=_gen(9)))
    ref_mean, ref_cov = _moments(small, 0.0)
    torch.testing.assert_close(mean, ref_mean, atol=6e-3, rtol=0)
    torch.testing.assert_close(cov, ref_cov, atol=1.5e-2, rtol=0)
    centers = torch.randn(100, 2, generator=_gen(10))
    torch.testing.assert_close(small.product_sample(centers, 0.0, generator=_gen(11)), centers)
    assert (small.product_sample(centers, 1e-4, generator=_gen(11)) - centers).abs().max() < 1e-3


def test_same_seed_same_samples(small):
    mix = fractal_gmm("A")
    sigma = torch.rand(1000, generator=_gen(12))
    assert torch.equal(mix.sample(1000, sigma, generator=_gen(13)), mix.sample(1000, sigma, generator=_gen(13)))
    assert not torch.equal(mix.sample(1000, sigma, generator=_gen(13)), mix.sample(1000, sigma, generator=_gen(14)))
    centers = mix.sample(1000, generator=_gen(15))
    a = mix.product_sample(centers, 0.3, generator=_gen(16), n_per_center=4)
    assert torch.equal(a, mix.product_sample(centers, 0.3, generator=_gen(16), n_per_center=4))

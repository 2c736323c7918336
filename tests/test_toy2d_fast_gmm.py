"""Fast exact mixture evaluation (compiled kernel: chains, candidate lists, fallbacks) against the float64 dense
einsum reference."""
import pytest
import torch

from eval.bench_gmm import dense_log_prob_score
from toy2d import GaussianMixture, fractal_gmm, gmm

SIGMAS = (0.0, 1e-3, 0.05, 0.1, 0.2, 0.3, 1.0, 5.0)
TOL = 1e-4


@pytest.fixture(autouse=True)
def lists_at_once(monkeypatch):
    """Candidate lists from the first request on (normally after ``_TABLE_ROWS`` rows), so that the tests'
    small batches exercise them; ``test_candidate_lists_wait_for_enough_rows`` checks the default."""
    monkeypatch.setattr(gmm, "_TABLE_ROWS", 0)


def _reference(mix, x, sigma):
    """float64 dense log p and score; ``sigma`` a float or an [N] tensor (evaluated per distinct value)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
    lp, sc = torch.empty(x.shape[0], dtype=torch.float64), torch.empty(x.shape[0], 2, dtype=torch.float64)
    for s in torch.unique(sigma).tolist():
        rows = sigma == s
        lp[rows], sc[rows] = dense_log_prob_score(mix, x[rows], s, torch.float64)
    return lp, sc


def _check(mix, x, sigma):
    lp, sc = mix.log_prob(x, sigma), mix.score(x, sigma)
    assert lp.dtype == x.dtype and sc.shape == x.shape
    assert torch.isfinite(lp).all() and torch.isfinite(sc).all()
    lp_ref, sc_ref = _reference(mix, x, sigma)
    assert torch.isfinite(lp_ref).all() and torch.isfinite(sc_ref).all()
    err_lp = ((lp - lp_ref).abs() / lp_ref.abs().clamp_min(1.0)).max().item()
    err_sc = ((sc - sc_ref).norm(dim=1) / sc_ref.norm(dim=1).clamp_min(1e-300)).max().item()
    assert err_lp <= TOL and err_sc <= TOL, (err_lp, err_sc)


def _canvas(n, seed):
    return -0.9 + 2.4 * torch.rand(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("classes", ["A", "AB"])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_fast_matches_dense_on_canvas_and_samples(classes, sigma):
    mix = fractal_gmm(classes)
    _check(mix, _canvas(1000, 0), sigma)
    samples = mix.sample(1000, sigma, generator=torch.Generator().manual_seed(1)).double()
    _check(mix, samples, sigma)


@pytest.mark.parametrize("classes", ["A", "AB"])
def test_fast_matches_dense_per_sample_sigma(classes):
    """Shared levels (runs of rows at one σ) and continuous per-row σ (every row its own level)."""
    mix = fractal_gmm(classes)
    gen = torch.Generator().manual_seed(2)
    levels = torch.tensor([0.0, 1e-4, 1e-3, 4e-3, 0.02, 0.05, 0.13, 0.3, 0.7, 1.0, 2.5, 5.0, 20.0], dtype=torch.float64)
    x = torch.cat((_canvas(800, 3), mix.sample(800, generator=gen).double()))
    _check(mix, x, levels[torch.randint(len(levels), (x.shape[0],), generator=gen)])
    continuous = torch.exp(torch.empty(x.shape[0], dtype=torch.float64).uniform_(-9.0, 1.7, generator=gen))
    continuous[:50] = 0.0
    _check(mix, x, continuous)


def test_deterministic_and_independent_of_batch_composition():
    """Same values on repeated calls, for a row alone or among others, and in any row order."""
    mix = _fresh("A")
    x = _canvas(600, 11)
    gen = torch.Generator().manual_seed(3)
    sigma = torch.exp(torch.empty(600, dtype=torch.float64).uniform_(-7.0, 1.0, generator=gen))
    first = torch.cat((mix.log_prob(x, sigma)[:, None], mix.score(x, sigma)), 1)
    again = torch.cat((mix.log_prob(x, sigma)[:, None], mix.score(x, sigma)), 1)
    assert torch.equal(first, again)
    perm = torch.randperm(600, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(mix.score(x[perm], sigma[perm]), first[perm, 1:], rtol=1e-12, atol=0)
    torch.testing.assert_close(mix.score(x[:1], sigma[:1]), first[:1, 1:], rtol=1e-12, atol=0)


@pytest.mark.parametrize("classes", ["A", "AB"])
@pytest.mark.parametrize("distance", [100.0, 1000.0])
def test_far_points_finite(classes, distance):
    mix = fractal_gmm(classes)
    angles = torch.linspace(0, 6.283, 16, dtype=torch.float64)
    x = distance * torch.stack((angles.cos(), angles.sin()), dim=1)
    for sigma in (0.0, 0.05, 1.0, 5.0):
        _check(mix, x, sigma)
    _check(mix, x, torch.linspace(0, 5, 16, dtype=torch.float64))


def test_float32_inputs_and_autograd_match_fast_path():
    """float32 in, float32 out; autograd of log_prob (dense closed form) equals the fast path's score."""
    mix = fractal_gmm("A")
    x = mix.sample(300, 0.02, generator=torch.Generator().manual_seed(4)).double().requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(x, 0.02).sum(), x)
    torch.testing.assert_close(grad, mix.score(x.detach(), 0.02), rtol=1e-6, atol=1e-6)
    x32 = _canvas(100, 5).float()
    assert mix.log_prob(x32, 0.0).dtype == torch.float32 and mix.score(x32, 0.0).dtype == torch.float32
    assert mix.log_prob(x32[:0], 0.0).shape == (0,)


def _fresh(classes):
    """An uncached copy of a fractal mixture (``fractal_gmm`` is shared across tests, and so would its tables be)."""
    mix = fractal_gmm(classes)
    return GaussianMixture(mix.weights, mix.means, mix.covs)


def test_fractal_branches_are_chains_and_anything_else_is_not():
    """Each branch is 8 components with one weight and covariance and evenly stepped means; a permuted mixture,
    a moved mean (by 1e-6 of a component's width) or one changed weight breaks the chains."""
    assert fractal_gmm("A").chains() == (127, 8) and fractal_gmm("AB").chains() == (254, 8)
    mix = fractal_gmm("A")
    w, mu, cov = mix.weights.clone(), mix.means.clone(), mix.covs.clone()
    perm = torch.randperm(1016, generator=torch.Generator().manual_seed(0))
    assert GaussianMixture(w[perm], mu[perm], cov[perm]).chains() == (1016, 1)
    moved = mu.clone()
    moved[3, 0] += 1e-6 * float(cov[3].det().sqrt().sqrt())
    assert GaussianMixture(w, moved, cov).chains() == (1016, 1)
    reweighted = w.clone()
    reweighted[9] *= 1.001
    assert GaussianMixture(reweighted, mu, cov).chains() == (1016, 1)
    assert GaussianMixture(w.float(), mu.float(), cov.float()).chains() == (1016, 1)  # float32 means: steps inexact


@pytest.mark.parametrize("lists", [True, False])
def test_chains_and_single_components_agree(monkeypatch, lists):
    """The chain recurrence (two exponentials per branch) against the same mixture as 1016 single components
    (permuted), both against the dense reference: shared levels, per-row levels, canvas, samples, far points;
    with candidate lists and with every chain summed (lists off: small σ then takes the direct fallback)."""
    if not lists:
        monkeypatch.setattr(gmm, "_TABLE_ROWS", 1 << 40)
    mix = _fresh("A")
    perm = torch.randperm(1016, generator=torch.Generator().manual_seed(1))
    single = GaussianMixture(mix.weights[perm], mix.means[perm], mix.covs[perm])
    gen = torch.Generator().manual_seed(5)
    angles = 6.283 * torch.rand(8, generator=gen, dtype=torch.float64)
    far = 30.0 * torch.stack((angles.cos(), angles.sin()), dim=1)
    x = torch.cat((_canvas(300, 13), mix.sample(300, 0.01, generator=gen).double(), far))
    per_row = torch.exp(torch.empty(x.shape[0], dtype=torch.float64).uniform_(-9.0, 1.7, generator=gen))
    for sigma in (0.0, 2e-3, 0.02, 0.1, 0.5, 3.0, per_row):
        _check(mix, x, sigma)
        _check(single, x, sigma)
        torch.testing.assert_close(mix.score(x, sigma), single.score(x, sigma), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(mix.log_prob(x, sigma), single.log_prob(x, sigma), rtol=1e-12, atol=1e-9)


def test_candidate_lists_wait_for_enough_rows(monkeypatch):
    """A bucket's lists are built once ``_TABLE_ROWS`` rows were requested in it; values agree either way."""
    monkeypatch.setattr(gmm, "_TABLE_ROWS", 3000)
    mix = _fresh("A")
    x = _canvas(1000, 12)
    before = mix.score(x, 0.01)
    mix.score(x, 0.01)
    assert not mix._tables
    after = mix.score(x, 0.01)  # the third 1000-row request reaches 3000 rows: lists from here on
    assert list(mix._tables) == [int(mix._bucket_of(torch.tensor([0.01]))[0])]
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-12)


def test_polynomial_exponentials_match_libm():
    """The kernels' vectorisable exponentials against numpy's exp over their whole ranges (module docstring of
    ``toy2d.kernels``: ≤ 1.9e-9 on [−64, 0], ≤ 1.3e-10 on [−708, 708])."""
    import numba
    import numpy as np

    from toy2d import kernels

    def applied(f):
        @numba.njit
        def apply(xs):
            out = np.empty_like(xs)
            for i in range(xs.shape[0]):
                out[i] = f(xs[i])
            return out
        return apply

    d, w = -np.linspace(0.0, 64.0, 100_001), np.linspace(-708.0, 708.0, 100_001)
    assert np.abs(applied(kernels._exp_nonpositive)(d) / np.exp(d) - 1).max() <= 2e-9
    assert np.abs(applied(kernels._exp_wide)(w) / np.exp(w) - 1).max() <= 2e-10

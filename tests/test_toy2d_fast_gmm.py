"""Fast mixture evaluation (compiled candidate-list kernel, cached tile interpolants) against the float64 dense
einsum reference."""
import pytest
import torch

from eval.bench_gmm import dense_log_prob_score
from toy2d import GaussianMixture, fractal_gmm
from toy2d import gmm
from toy2d.gmm import _table_nodes

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
    mix = _fresh("A", cache_levels=False)
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


def _fresh(classes, cache_levels=True):
    """An uncached copy of a fractal mixture (``fractal_gmm`` is shared across tests, and so would its tables be)."""
    mix = fractal_gmm(classes)
    return GaussianMixture(mix.weights, mix.means, mix.covs, cache_levels=cache_levels)


@pytest.mark.parametrize("classes", ["A", "AB"])
@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.6, 1.5, 5.0, 30.0])
def test_repeated_levels_use_cached_interpolants_within_tolerance(classes, sigma):
    """A level is tabulated once the rows requested at it reach the table-size estimate; values stay within
    1e-4 (measured ~1e-7) of the dense reference on canvas points, samples and far points (exact fallback)."""
    mix = _fresh(classes)
    gen = torch.Generator().manual_seed(7)
    angles = 6.283 * torch.rand(16, generator=gen, dtype=torch.float64)
    far = 300.0 * torch.stack((angles.cos(), angles.sin()), dim=1)  # outside every box (pad 0.5 + 4σ)
    x = torch.cat((_canvas(700, 8), mix.sample(700, sigma, generator=gen).double(), far))
    requests = -(-int(_table_nodes(sigma)) // x.shape[0])  # ceil: requests until the rows reach the estimate
    for _ in range(requests - 1):
        mix.score(x, sigma)
        assert sigma not in mix._interpolants
    _check(mix, x, sigma)  # this request tabulates
    interpolant = mix._interpolants[sigma]
    values, resolved = interpolant(x)
    assert resolved[:1400].float().mean() > 0.95 and not resolved[1400:].any()  # far points fall back to exact
    _check(mix, x, sigma)


def test_interpolants_skip_small_batches_autograd_and_other_levels():
    mix = _fresh("A")
    x = _canvas(1200, 9)
    for _ in range(20):
        mix.score(x[:200], 0.77)  # too few rows at once
    x.requires_grad_(True)
    for _ in range(4):
        mix.log_prob(x, 1.5)  # autograd: always the exact path
    assert not {0.77, 1.5} & set(mix._interpolants)
    for sigma in (0.05, 60.0):  # outside [0.1, 50]
        for _ in range(30):
            mix.score(x.detach(), sigma)
        assert sigma not in mix._interpolants
    mix.score(x.detach(), 2.0)  # σ ≥ 1: the first 1200-row request pays for the ~1000-node table
    assert 2.0 in mix._interpolants


def test_tile_interpolant_reproduces_polynomials_and_refines_only_where_needed():
    """Degree < order polynomials are interpolated to rounding; a narrow bump is refined near its centre."""
    from toy2d.tiles import TileInterpolant

    def field(p):
        x, y = p[:, 0], p[:, 1]
        return torch.stack((3 * x**5 * y**2 - x * y + 2, torch.exp(-((x - 0.3) ** 2 + (y + 0.2) ** 2) / 2e-3)), 1)

    lo, hi = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0])
    interpolant = TileInterpolant(field, lo, hi, tiles=4, order=10, tol=1e-9, groups=[[0], [1]],
                                  floors=[1.0, 1e-3], max_depth=2)
    x = -1 + 2 * torch.rand(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values, resolved = interpolant(x)
    exact = field(x)
    assert torch.allclose(values[resolved, 0], exact[resolved, 0], atol=1e-12)
    assert (values[resolved, 1] - exact[resolved, 1]).abs().max() < 1e-6
    assert len(interpolant.levels) == 3 and interpolant.levels[1][2].shape[0] > 0  # the bump's tiles refined
    far_from_bump = ((x - torch.tensor([0.3, -0.2])).norm(dim=1) > 0.6)
    assert resolved[far_from_bump].all()
    outside = interpolant(torch.tensor([[1.5, 0.0], [0.0, -1.01]], dtype=torch.float64))[1]
    assert not outside.any()


def test_candidate_lists_wait_for_enough_rows(monkeypatch):
    """A bucket's lists are built once ``_TABLE_ROWS`` rows were requested in it; values agree either way."""
    monkeypatch.setattr(gmm, "_TABLE_ROWS", 3000)
    mix = _fresh("A", cache_levels=False)
    x = _canvas(1000, 12)
    before = mix.score(x, 0.01)
    mix.score(x, 0.01)
    assert not mix._tables
    after = mix.score(x, 0.01)  # the third 1000-row request reaches 3000 rows: lists from here on
    assert list(mix._tables) == [int(mix._bucket_of(torch.tensor([0.01]))[0])]
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-12)

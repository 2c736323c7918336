"""ToyEvaluator: NLL and the 95% HDR fraction against the exact class-A density."""
import math

import pytest
import torch

from toy2d import fractal_gmm  # noqa: E402
from toy2d.metrics import ToyEvaluator  # noqa: E402

N_REFERENCE = 50_000


@pytest.fixture(scope="module")
def evaluator():
    return ToyEvaluator(fractal_gmm("A"), n_reference=N_REFERENCE, seed=0)


@pytest.fixture(scope="module")
def fresh_samples():
    return fractal_gmm("A").sample(20_000, generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="module")
def fresh_metrics(evaluator, fresh_samples):
    return evaluator(fresh_samples)


def test_exact_samples_are_in_the_hdr_95_percent_of_the_time(evaluator, fresh_metrics):
    # MC error: threshold mass ±√(.05·.95/50k) ≈ .001, fraction ±√(.05·.95/20k) ≈ .0015; allow > 5σ.
    assert abs(fresh_metrics["in_hdr"] - 0.95) < 0.01
    reference_fraction = float((evaluator.reference_log_prob >= evaluator.hdr_level).double().mean())
    assert abs(reference_fraction - 0.95) < 1.0 / N_REFERENCE + 1e-12


def test_far_points_are_outside_with_large_finite_nll(evaluator):
    far = torch.tensor([[10.0, 10.0], [-8.0, 3.0], [0.3, -50.0]])
    metrics = evaluator(far)
    assert metrics["in_hdr"] == 0.0
    assert math.isfinite(metrics["nll"]) and metrics["nll"] > 100.0


@pytest.fixture(scope="module")
def fresh_log_prob(fresh_samples):
    return fractal_gmm("A").log_prob(fresh_samples.double(), 0.0)


def test_nll_of_exact_samples_matches_the_entropy_estimate(evaluator, fresh_metrics, fresh_log_prob):
    """Both are Monte-Carlo estimates of H(p) = E_p[−log p]; they agree within their standard errors."""
    stderr = float(fresh_log_prob.std()) * math.sqrt(1 / len(fresh_log_prob) + 1 / N_REFERENCE)
    assert abs(fresh_metrics["nll"] - evaluator.entropy) < 5 * stderr


def test_reference_level_is_deterministic_in_the_seed():
    mixture = fractal_gmm("A")
    a, b = ToyEvaluator(mixture, 5000, seed=7), ToyEvaluator(mixture, 5000, seed=7)
    assert a.hdr_level == b.hdr_level != ToyEvaluator(mixture, 5000, seed=8).hdr_level


@pytest.mark.parametrize("kwargs,field", [({"n_reference": 0}, "task.eval.n_reference"),
                                          ({"hdr_mass": 1.0}, "task.eval.hdr_mass")])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ToyEvaluator(fractal_gmm("A"), **kwargs)


# ----- mode metrics: improved precision / recall, MMD, modes --------------------------------------------------

import numpy as np  # noqa: E402

from toy2d import GaussianMixture  # noqa: E402
from toy2d.metrics import ModeMetrics, find_modes, improved_precision_recall, knn_radii, mmd_rbf, nearest_mode_distance  # noqa: E402


@pytest.fixture(scope="module")
def two_samples():
    mixture = fractal_gmm("A")
    return (mixture.sample(2000, generator=torch.Generator().manual_seed(11)).double().numpy(),
            mixture.sample(4000, generator=torch.Generator().manual_seed(12)).double().numpy())


def test_exact_samples_have_high_precision_and_recall(two_samples):
    """Two independent exact samples: a fresh point falls outside the other set's k-NN manifold only in the
    gaps between balls (≈ 3% for k = 3 in 2D, measured 0.97 / 0.97 at 4096 vs 10,000); allow down to 0.9."""
    generated, reference = two_samples
    precision, recall = improved_precision_recall(generated, reference, k=3)
    assert 0.9 < precision < 1.0 and 0.9 < recall < 1.0


def test_far_points_have_zero_precision(two_samples):
    _, reference = two_samples
    far = np.random.RandomState(0).normal(size=(100, 2)) * 0.1 + np.array([10.0, -10.0])
    precision, recall = improved_precision_recall(far, reference)
    assert precision == 0.0 and recall == 0.0


def test_collapsed_set_has_precision_one_and_recall_of_one_point(two_samples):
    """4096 copies of one reference point: radii 0, closed balls -> exactly that point is recalled."""
    _, reference = two_samples
    collapsed = np.repeat(reference[:1], 4096, axis=0)
    assert (knn_radii(collapsed) == 0.0).all()
    precision, recall = improved_precision_recall(collapsed, reference)
    assert precision == 1.0 and recall == 1.0 / len(reference)


def test_mmd_is_zero_on_itself_symmetric_and_grows_with_a_shift(two_samples):
    x, y = two_samples
    assert mmd_rbf(x, x) == 0.0
    assert mmd_rbf(x, y) == pytest.approx(mmd_rbf(y, x), rel=1e-9, abs=1e-15)
    same, shifted = mmd_rbf(x, y), mmd_rbf(x + np.array([0.05, 0.0]), y)
    # same law: only the V-statistic's O(1/n) bias, < (1/2000 + 1/4000)(1 − E k) ≈ 7.5e-4; a shift by 0.05
    # (a few branch widths) is seen by the small bandwidths
    assert 0.0 < same < 1e-3 and shifted > 5 * same
    assert mmd_rbf(x + 0.2, y) > shifted


def test_find_modes_of_two_separated_gaussians_are_their_means():
    means = torch.tensor([[0.0, 0.0], [1.0, 0.5]])
    covs = torch.tensor([[[0.01, 0.004], [0.004, 0.004]], [[0.002, 0.0], [0.0, 0.02]]])
    mixture = GaussianMixture(torch.tensor([0.3, 0.7]), means, covs)
    modes = find_modes(mixture, bandwidth=0.01)
    assert modes.shape == (2, 2)
    assert torch.allclose(modes, means.double()[[1, 0]], atol=1e-6)  # sorted by decreasing density
    assert nearest_mode_distance(modes, modes) == 0.0
    assert nearest_mode_distance(torch.tensor([[0.0, 0.1], [1.0, 0.2]]), modes) == pytest.approx(0.2, abs=1e-6)


@pytest.fixture(scope="module")
def fractal_modes():
    return find_modes(fractal_gmm("A"), bandwidth=0.01)


def test_fractal_modes_are_mean_shift_fixed_points(fractal_modes):
    """A deterministic count (160 maxima of p_A ∗ G_0.01 from the 1016 component means), each a fixed point
    of the exact mean shift x ← product_mean(x, λ), pairwise distinct by more than the merge tolerance."""
    mixture = fractal_gmm("A")
    assert fractal_modes.shape == (160, 2)
    residual = (mixture.product_mean(fractal_modes, 0.01) - fractal_modes).norm(dim=1)
    assert float(residual.max()) < 1e-8
    distances = torch.cdist(fractal_modes, fractal_modes) + torch.eye(len(fractal_modes))
    assert float(distances.min()) > 1e-3
    assert nearest_mode_distance(fractal_modes, fractal_modes) == 0.0


def test_mode_metrics_columns(fractal_modes, two_samples):
    metrics = ModeMetrics(fractal_gmm("A"), n_reference=3000, modes=fractal_modes)
    generated, _ = two_samples
    found = metrics(generated)
    assert set(found) == {"precision", "recall", "mmd", "mode_distance"}
    assert found["precision"] > 0.9 and found["recall"] > 0.85 and found["mmd"] < 0.01
    assert 0.0 < found["mode_distance"] < 0.05  # exact samples spread along the branches between modes
    at_modes = metrics(fractal_modes[torch.arange(500) % len(fractal_modes)])
    assert at_modes["mode_distance"] == 0.0 and at_modes["recall"] < found["recall"]


def test_compiled_kernel_sums_match_brute_force():
    """The compiled MMD kernel sums equal the all-pairs float64 sums (self-pairs via symmetry, cross pairs)."""
    from toy2d.metrics import _kernel_sum

    gen = np.random.default_rng(5)
    a, b = gen.normal(size=(300, 2)) * 0.2, gen.normal(size=(200, 2)) * 0.2 + 0.05
    bandwidths = (0.02, 0.05, 0.1, 0.2)

    def brute(p, q):
        d2 = ((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)
        return float(np.mean([np.exp(-d2 / (2 * h * h)).sum() for h in bandwidths]))

    assert _kernel_sum(a, a, bandwidths) == pytest.approx(brute(a, a), rel=1e-9)
    assert _kernel_sum(a, b, bandwidths) == pytest.approx(brute(a, b), rel=1e-9)


def test_ball_membership_matches_brute_force_including_boundaries():
    """Exact membership in a union of closed balls, also for queries exactly on a sphere and huge radii."""
    from toy2d.metrics import _distance, _inside_union

    gen = np.random.default_rng(6)
    centers = gen.uniform(-1, 1, size=(400, 2))
    radii = gen.uniform(0.0, 0.05, size=400)
    radii[:3] = (0.0, 3.0, 1e-12)
    queries = np.concatenate((gen.uniform(-1.5, 1.5, size=(600, 2)), centers[:50],
                              centers[3:10] + np.array([radii[3:10], np.zeros(7)]).T))  # on the spheres
    brute = (_distance(queries[:, None, :], centers[None]) <= radii[None]).any(1)
    np.testing.assert_array_equal(_inside_union(queries, centers, radii), brute)
    np.testing.assert_array_equal(_inside_union(queries, centers[3:4], np.zeros(1)), (queries == centers[3]).all(1))


def test_smoothed_terms_match_the_dense_closed_form():
    """log p_λ, its gradient (= the mixture's score at σ = λ) and the Hessian (finite differences of it)."""
    from toy2d import fractal_gmm
    from toy2d.metrics import _smoothed_terms

    mix, lam = fractal_gmm("A"), 0.03
    x = mix.sample(200, 0.05, generator=torch.Generator().manual_seed(8)).double()
    log_p, grad, hess = _smoothed_terms(mix, x, lam)
    torch.testing.assert_close(log_p, mix.log_prob(x, lam).double(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, mix.score(x, lam).double(), rtol=1e-8, atol=1e-8)
    step = 1e-6
    for axis in range(2):
        shift = torch.zeros(2, dtype=torch.float64)
        shift[axis] = step
        fd = (_smoothed_terms(mix, x + shift, lam)[1] - _smoothed_terms(mix, x - shift, lam)[1]) / (2 * step)
        torch.testing.assert_close(hess[:, :, axis], fd, rtol=1e-4, atol=1e-3 * float(hess.abs().max()))
    assert torch.equal(hess, hess.transpose(1, 2))

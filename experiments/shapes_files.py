"""Writing the ShapesWorld models to disk (the library, ``shapes/``, only reads them): the classifier, the
prior as a diffusers pipeline directory, and the tokenizer's vocabulary files."""
from __future__ import annotations

import json
from pathlib import Path

from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from shapes.models import ShapesClassifier
from shapes.tokenizer import WORDS, vocab_and_merges

PRIOR_COMPONENTS = {
    "unet": ["diffusers", "UNet2DConditionModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDPMScheduler"],
}


def save_classifier(model: ShapesClassifier, directory: str | Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (read by ``ShapesClassifier.load``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(model.config, indent=1) + "\n")


def save_prior(directory: str | Path, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
               tokenizer: CLIPTokenizer, scheduler: DDPMScheduler) -> None:
    """Write a diffusers pipeline directory: one ``save_pretrained`` subfolder per component (safetensors)
    and a ``model_index.json`` in Stable Diffusion's layout with ``vae: [null, null]`` (pixel space).

    Load it with ``shapes.models.load_prior``, or as ``StableDiffusionPipeline.from_pretrained(directory, vae=None,
    safety_checker=None, feature_extractor=None, image_encoder=None)`` (diffusers 0.42 insists that the
    null components be passed explicitly); ``pipe.vae is None`` marks a pixel-space prior.
    """
    import diffusers

    directory = Path(directory)
    for name, component in dict(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler).items():
        component.save_pretrained(directory / name)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             **PRIOR_COMPONENTS, "vae": [None, None], "safety_checker": [None, None],
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}
    (directory / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_tokenizer_files(directory: str | Path, words: tuple[str, ...] = WORDS) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (with CLIP's version header) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(words)
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_path, merges_path

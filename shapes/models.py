"""Config builders for the ShapesWorld prior (pixel-space text-conditional UNet + small CLIP text
encoder + Stable Diffusion's DDPM schedule) and the shape/colour classifier used for FID features and
prompt accuracy. Every size is an argument; the defaults are the committed models'.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from shapes.world import COLOURS, SHAPES


def text_encoder_config(tokenizer: CLIPTokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                        intermediate_size: int = 128) -> CLIPTextConfig:
    """A small CLIP text transformer sized to ``tokenizer`` (vocabulary, max length, special ids)."""
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
                          num_attention_heads=heads, intermediate_size=intermediate_size,
                          max_position_embeddings=tokenizer.model_max_length, projection_dim=hidden_size,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def build_text_encoder(tokenizer: CLIPTokenizer, **sizes) -> CLIPTextModel:
    """Randomly initialised :class:`CLIPTextModel` (see :func:`text_encoder_config` for ``sizes``)."""
    return CLIPTextModel(text_encoder_config(tokenizer, **sizes))


def unet_config(resolution: int = 32, channels: tuple[int, ...] = (16, 32, 64), layers_per_block: int = 1,
                cross_attention_dim: int = 64, attention_head_dim: int = 8, norm_groups: int = 8) -> dict:
    """Kwargs of a pixel-space RGB :class:`UNet2DConditionModel`.

    The first level is convolutional, every deeper level has cross-attention on the text encoder's
    last hidden states (``cross_attention_dim`` = its hidden size); ``resolution`` must be divisible
    by ``2^(len(channels) − 1)``.
    """
    levels = len(channels)
    if levels < 2 or resolution % 2 ** (levels - 1):
        raise ValueError(f"resolution {resolution} must be divisible by 2^(levels-1) = {2 ** (levels - 1)} "
                         f"for channels={channels} (need >= 2 levels)")
    return dict(sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=tuple(channels),
                layers_per_block=layers_per_block,
                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
                up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
                cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
                norm_num_groups=norm_groups)


def build_unet(**kwargs) -> UNet2DConditionModel:
    """Randomly initialised pixel-space UNet (kwargs of :func:`unet_config`)."""
    return UNet2DConditionModel(**unet_config(**kwargs))


def scheduler_config() -> dict:
    """Stable Diffusion's DDPM schedule: 1000 steps, scaled_linear β from 0.00085 to 0.012, ε-prediction; clean
    estimates clipped to the images' range [−1, 1] (``clip_sample``, diffusers' default for pixel-space DDPM)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0, steps_offset=1)


def build_scheduler() -> DDPMScheduler:
    """:class:`DDPMScheduler` with :func:`scheduler_config`."""
    return DDPMScheduler(**scheduler_config())


class ConvClassifier(nn.Module):
    """The ShapesWorld classifiers' trunk on [B, 3, R, R] images in [−1, 1]: ``channels`` conv stages (two 3×3
    convs + SiLU, then 2× average pooling), global average pooling, a linear layer to ``feature_dim`` + SiLU (the
    penultimate features, the FID embedding). Subclasses add their heads."""

    def __init__(self, channels: tuple[int, ...], feature_dim: int):
        super().__init__()
        self.config = dict(channels=list(channels), feature_dim=feature_dim)
        stages, previous = [], 3
        for width in channels:
            stages += [nn.Conv2d(previous, width, 3, padding=1), nn.SiLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2)]
            previous = width
        self.trunk = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(previous, feature_dim), nn.SiLU())

    @property
    def num_features(self) -> int:
        return self.config["feature_dim"]

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features [B, feature_dim] (the FID embedding)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        return self.trunk(images)


class ShapesClassifier(ConvClassifier):
    """Small CNN on [B, 3, R, R] images in [-1, 1] with two heads: shape (3-way) and colour (4-way).

    ``channels`` conv stages (two 3×3 convs + SiLU, then 2× average pooling), global average pooling,
    a linear layer to ``feature_dim`` + SiLU (the penultimate features used for FID), then the heads.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), feature_dim: int = 128):
        super().__init__(channels, feature_dim)
        self.shape_head = nn.Linear(feature_dim, len(SHAPES))
        self.colour_head = nn.Linear(feature_dim, len(COLOURS))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(shape logits [B, 3], colour logits [B, 4])."""
        feats = self.features(images)
        return self.shape_head(feats), self.colour_head(feats)

    def predict_prompt_ids(self, images: Tensor) -> Tensor:
        """Most likely prompt id per image: shape_id · 4 + colour_id."""
        shape_logits, colour_logits = self(images)
        return shape_logits.argmax(1) * len(COLOURS) + colour_logits.argmax(1)

    @classmethod
    def load(cls, directory: str | Path) -> "ShapesClassifier":
        """A classifier written by ``experiments.shapes_files.save_classifier``, in eval mode."""
        directory = Path(directory)
        if not (directory / "model.safetensors").is_file():
            raise FileNotFoundError(f"no classifier at {directory}; train it with `python -m experiments.train_shapes`")
        config = json.loads((directory / "config.json").read_text())
        with torch.device("meta"):  # no initialisation draws: the global RNG is never used, the weights are loaded
            model = cls(channels=tuple(config["channels"]), feature_dim=config["feature_dim"])
        model.load_state_dict(load_file(directory / "model.safetensors"), assign=True)
        return model.eval()


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())



def load_prior(directory: str | Path) -> tuple[UNet2DConditionModel, CLIPTextModel, CLIPTokenizer, DDPMScheduler]:
    """(unet, text_encoder, tokenizer, scheduler) from a prior directory written by
    ``experiments.shapes_files.save_prior``, models in eval mode."""
    directory = Path(directory)
    if not (directory / "model_index.json").is_file():
        raise FileNotFoundError(f"no ShapesWorld prior at {directory}; train it with `make shapes-prior` "
                                "(python -m experiments.train_shapes)")
    unet = UNet2DConditionModel.from_pretrained(directory / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(directory / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    if len(tokenizer) <= 2:
        raise RuntimeError(f"tokenizer at {directory / 'tokenizer'} did not load (only {len(tokenizer)} tokens)")
    return unet, text_encoder, tokenizer, DDPMScheduler.from_pretrained(directory / "scheduler")

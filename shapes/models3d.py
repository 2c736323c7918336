"""The ShapesWorld-3D models' pieces (docs/design.md §10): the tokenizer over the 3D caption vocabulary and the
classifier of renders (shape, colour, view, front colour) used for FID features and the multi-view metrics
(:mod:`shapes.metrics3d`). The prior itself uses ShapesWorld's builders unchanged (:mod:`shapes.models`:
pixel-space :class:`UNet2DConditionModel`, small :class:`CLIPTextModel`, SD's DDPM schedule with ``clip_sample``).

The captions are :func:`shapes.world3d.caption` with threestudio's view suffix (:func:`msd.rendering.view_prompts`):
``"a red cube, front view"``, ``"a red cube with a blue front, overhead view"``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import CLIPTokenizer

from msd.rendering import VIEWS
from shapes.models import ConvClassifier
from shapes.tokenizer import build_tokenizer
from shapes.world import COLOURS
from shapes.world3d import NO_FRONT, PRIMITIVES

WORDS3D = tuple(dict.fromkeys(("a", *COLOURS, *PRIMITIVES, "with", "front", ",", *VIEWS, "view")))
"""Every word of a 3D caption: ``a <colour> <primitive> [with a <colour> front], <view> view``; the comma is its own
token (CLIP's pre-tokeniser splits punctuation)."""
MAX_LENGTH3D = 12
"""BOS + the longest caption's 10 tokens ("a red cube with a blue front , overhead view") + EOS: the text encoder's
max_position_embeddings."""
FRONT_CLASSES = ("none", *COLOURS)
"""Classes of the front-colour head: 0 = no differing front (a plain primitive), 1 + c = colour c."""


def build_tokenizer3d() -> CLIPTokenizer:
    """The CLIP BPE tokenizer over :data:`WORDS3D` (each word one in-vocabulary token, checked), max length 12."""
    return build_tokenizer(WORDS3D, MAX_LENGTH3D)


def front_class(front_colour: Tensor) -> Tensor:
    """Front-colour head targets: :data:`shapes.world3d.NO_FRONT` → 0, colour c → 1 + c."""
    return torch.where(front_colour == NO_FRONT, torch.zeros_like(front_colour), front_colour + 1)


class Logits3D(NamedTuple):
    """One tensor per head: logits [B, K] from the classifier, or the predicted class ids [B] (:meth:`argmax`)."""

    shape: Tensor
    colour: Tensor
    view: Tensor
    front: Tensor

    def argmax(self) -> Logits3D:
        return Logits3D(*(logits.argmax(-1) for logits in self))


HEADS = dict(shape=len(PRIMITIVES), colour=len(COLOURS), view=len(VIEWS), front=len(FRONT_CLASSES))
"""Classes per head: shape (:data:`shapes.world3d.PRIMITIVES`), colour (:data:`shapes.world.COLOURS`), view
(:data:`msd.rendering.VIEWS`), front colour (:data:`FRONT_CLASSES`)."""


class ShapesClassifier3D(ConvClassifier):
    """Small CNN on renders [B, 3, R, R] in [−1, 1] with four heads (:data:`HEADS`).

    The trunk is :class:`shapes.models.ConvClassifier`: ``channels`` conv stages (two 3×3 convs + SiLU, then 2×
    average pooling), global average pooling, a linear layer to ``feature_dim`` + SiLU (the penultimate features,
    the FID embedding), then one linear head per output.

    What a render can tell: the four primitives are symmetric about z (the cube 4-fold), so a plain primitive's
    front, side and back views look alike; its view is readable only as overhead or not. A Janus probe's front
    face tells more. The view head's accuracy is bounded accordingly (about ½ on plain side-level views, where side
    is the likeliest label).
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64), feature_dim: int = 128):
        super().__init__(channels, feature_dim)
        self.config["heads"] = dict(HEADS)
        self.shape_head = nn.Linear(feature_dim, HEADS["shape"])
        self.colour_head = nn.Linear(feature_dim, HEADS["colour"])
        self.view_head = nn.Linear(feature_dim, HEADS["view"])
        self.front_head = nn.Linear(feature_dim, HEADS["front"])

    def forward(self, images: Tensor) -> Logits3D:
        """Logits of the four heads: shape [B, 4], colour [B, 4], view [B, 4], front [B, 5]."""
        feats = self.features(images)
        return Logits3D(self.shape_head(feats), self.colour_head(feats), self.view_head(feats), self.front_head(feats))

    @classmethod
    def load(cls, directory: str | Path) -> ShapesClassifier3D:
        """A classifier written by ``experiments.shapes_files.save_classifier``, in eval mode."""
        directory = Path(directory)
        if not (directory / "model.safetensors").is_file():
            raise FileNotFoundError(f"no ShapesWorld-3D classifier at {directory}; train it with `make shapes3d-prior` "
                                    "(python -m experiments.train_shapes3d)")
        config = json.loads((directory / "config.json").read_text())
        if config.get("heads") != HEADS:
            raise ValueError(f"{directory} holds a classifier with heads {config.get('heads')}, not ShapesWorld-3D's "
                             f"{HEADS}")
        with torch.device("meta"):  # no initialisation draws: the global RNG is never used, the weights are loaded
            model = cls(channels=tuple(config["channels"]), feature_dim=config["feature_dim"])
        model.load_state_dict(load_file(directory / "model.safetensors"), assign=True)
        return model.eval()

"""ShapesWorld: a procedural text-to-image world (one coloured primitive per image, captioned
"a red circle" etc.), its tiny pixel-space text-to-image prior and a shape/colour classifier."""
from pathlib import Path

from shapes.world import (
                          COLOURS,
                          PROMPTS,
                          SHAPES,
                          ShapeParams,
                          caption,
                          parse_caption,
                          prompt_id,
                          render,
                          render_params,
                          sample_params,
                          sample_world,
)

PRIOR_DIR = Path(__file__).parent / "prior"
"""Committed pixel-space prior (diffusers pipeline directory), rebuilt by ``make shapes-prior``."""
CLASSIFIER_DIR = Path(__file__).parent / "classifier"
"""Committed shape/colour classifier (``model.safetensors`` + ``config.json``)."""

__all__ = ["CLASSIFIER_DIR", "COLOURS", "PRIOR_DIR", "PROMPTS", "SHAPES", "ShapeParams", "caption", "parse_caption",
           "prompt_id", "render", "render_params", "sample_params", "sample_world"]

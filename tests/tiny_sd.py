"""Tiny random Stable-Diffusion-style prior directories, built from configs, for offline tests.

A prior directory holds ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and, for a latent
model, ``vae/`` (what :func:`msd.priors.load_prior` reads). Weights are random (seeded, with the global
RNG state restored afterwards); the CLIP tokenizer is built from a byte-level vocab and a few merges
written here, so nothing touches the network (see docs/environment.md §2 on transformers-5 traps).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TEXT_DIM = 8
MERGES = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP BPE uses for bytes: printable bytes map to themselves,
    the rest to code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tokenizer(directory: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single bytes plus MERGES, saved to ``directory`` (77 tokens max)."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    tokenizer = CLIPTokenizer(vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"),
                              model_max_length=77)
    assert len(tokenizer) == len(tokens)  # the transformers-5 trap yields a 2-token tokenizer silently
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_prior(root: Path, *, latent: bool = True, prediction_type: str = "epsilon",
                     sample_size: int | tuple[int, int] = 12, seed: int = 0, **scheduler_options) -> Path:
    """Save a tiny SD-style prior under ``root`` and return it (``scheduler_options`` override the DDIM
    scheduler config, e.g. ``clip_sample=True``).

    Latent: 4-channel UNet on ``sample_size`` (int or (H, W)) latents and a 2-level AutoencoderKL
    (scale factor 2), so images are twice that. Pixel: a 3-channel UNet on ``sample_size`` images, no VAE.
    """
    channels = 4 if latent else 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UNet2DConditionModel(
            sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
            block_out_channels=(4, 8), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM,
            attention_head_dim=2, norm_num_groups=2,
        ).save_pretrained(root / "unet")
        CLIPTextModel(CLIPTextConfig(
            vocab_size=len(byte_symbols()) * 2 + len(MERGES) + 2, hidden_size=TEXT_DIM, intermediate_size=16,
            num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0,
            eos_token_id=2, pad_token_id=1,
        )).save_pretrained(root / "text_encoder")
        if latent:
            AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 8),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=2, scaling_factor=0.5,
            ).save_pretrained(root / "vae")
    write_tokenizer(root / "tokenizer")
    options = {"clip_sample": False, **scheduler_options}
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                  steps_offset=1, prediction_type=prediction_type, **options).save_pretrained(root / "scheduler")
    return root


def build_tiny_shapes_prior(root: Path) -> tuple[Path, Path]:
    """A tiny random 32 px pixel prior (``root/pipeline``) and an untrained ShapesWorld classifier
    (``root/classifier``): the text-to-2D plumbing on ShapesWorld without the committed models' numbers.
    Returns (prior directory, classifier directory)."""
    from experiments.shapes_files import save_classifier
    from shapes.models import ShapesClassifier

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_classifier(ShapesClassifier(channels=(4, 8), feature_dim=8), root / "classifier")
    return build_tiny_prior(root / "pipeline", latent=False, sample_size=32), root / "classifier"

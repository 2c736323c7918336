"""Train the committed ShapesWorld prior and classifier: ``python -m experiments.train_shapes`` (``make shapes-prior``).

1. The prior: a pixel-space :class:`UNet2DConditionModel` with cross-attention on a small
   :class:`CLIPTextModel` (trained jointly from scratch), ε-prediction loss ``‖ε̂(z_t, t, c) − ε‖²`` with
   ``z_t = √ᾱ_t x + √(1−ᾱ_t) ε``, t uniform over Stable Diffusion's 1000-step DDPM schedule, on fresh world
   samples every step. A fraction ``--drop`` of the captions is replaced by the empty prompt "" so that
   classifier-free guidance against "" works. Adam, linear warm-up; the saved weights are an EMA
   (decay ``min(ema, (1+n)/(10+n))`` after step n). Saved to ``<out>/prior/`` as a diffusers pipeline
   directory (unet/, text_encoder/, tokenizer/, scheduler/, model_index.json) plus ``training.json``
   (the run's settings, seconds and final loss).
2. The classifier (shape and colour heads) on augmented world renders (blur, random plain background,
   smooth tint, pixel noise: see :func:`classifier_batch`), so it also reads imperfect samples; saved to
   ``<out>/classifier/``. ``--reuse-prior`` skips step 1 and loads ``<out>/prior/`` instead.
3. The check: DDIM (η = 0, ``--ddim-steps`` steps) with CFG ``ε̂_u + w(ε̂_c − ε̂_u)`` for every prompt; the
   classifier's accuracy on those samples and their mode-alignment distance go to
   ``<results>/prior_check.json``, the samples to ``<results>/prior_samples.png`` (one row per prompt).

Every output is written atomically (temp path + rename). Runs on one CPU thread by default: the machine
has two cores shared with other work.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image
from torch import Tensor, nn

from experiments.shapes_files import save_classifier, save_prior
from shapes.metrics import mode_alignment_distance, prompt_accuracy
from shapes.models import (
    ShapesClassifier,
    build_scheduler,
    build_text_encoder,
    build_unet,
    count_parameters,
    load_prior,
)
from shapes.tokenizer import build_tokenizer
from shapes.world import COLOURS, PROMPTS, SHAPES, render, sample_params, sample_world

REPO = Path(__file__).resolve().parents[1]


def caption_table(tokenizer) -> Tensor:
    """Token ids [13, L] of the 12 prompts followed by the empty prompt "" (row 12)."""
    return tokenizer(list(PROMPTS) + [""], padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """θ_ema ← decay·θ_ema + (1 − decay)·θ."""
    with torch.no_grad():
        for ema_param, param in zip(ema.parameters(), model.parameters()):
            ema_param.lerp_(param, 1.0 - decay)


def train_prior(args, generator: torch.Generator):
    """Train UNet + text encoder jointly; returns their EMA copies, the tokenizer, scheduler and losses."""
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer, hidden_size=args.text_width, layers=args.text_layers)
    unet = build_unet(resolution=args.resolution, channels=tuple(args.channels), layers_per_block=args.layers_per_block,
                      cross_attention_dim=args.text_width)
    scheduler = build_scheduler()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    print(f"prior: unet {count_parameters(unet):,} params, text encoder {count_parameters(text_encoder):,} params, "
          f"{args.resolution}x{args.resolution} px", flush=True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.warmup))
    captions = caption_table(tokenizer)
    alphas_cumprod = scheduler.alphas_cumprod
    losses, start = [], time.perf_counter()
    for step in range(args.iterations):
        images, world = sample_world(args.batch, generator, resolution=args.resolution)
        rows = torch.where(torch.rand(args.batch, generator=generator) < args.drop, len(PROMPTS), world.prompt_ids)
        t = torch.randint(scheduler.config.num_train_timesteps, (args.batch,), generator=generator)
        noise = torch.randn(images.shape, generator=generator)
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * images + (1.0 - alpha_bar).sqrt() * noise
        hidden = text_encoder(captions[rows])[0]
        loss = (unet(noisy, t, encoder_hidden_states=hidden).sample - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        warmup.step()
        decay = min(args.ema, (1.0 + step) / (10.0 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.iterations:
            recent = losses[-args.log_every:]
            print(f"prior step {step + 1}/{args.iterations} loss {sum(recent) / len(recent):.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return ema_unet, ema_text, tokenizer, scheduler, losses, time.perf_counter() - start


def classifier_batch(n: int, resolution: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Augmented world renders (images, prompt ids) so the classifier reads imperfect samples too.

    Per batch an edge softness ~ U(0.3, 1.5) px (blur); per image a plain background ~ U(−0.5, 0.5)³
    instead of grey, a smooth tint (bilinearly upsampled 4×4 noise, std ~ U(0, 0.2)) and pixel noise
    (std ~ U(0, 0.15)). Shape and colour are never changed: they are what the classifier must read.
    """
    ids = torch.randint(len(PROMPTS), (n,), generator=generator)
    world = sample_params(ids, generator)
    softness = 0.3 + 1.2 * torch.rand(1, generator=generator).item()
    background = torch.rand(n, 3, generator=generator) - 0.5
    images = render(world.shape, world.colour, world.centre, world.size, resolution, softness, background)
    tint = nn.functional.interpolate(torch.randn(n, 3, 4, 4, generator=generator), size=resolution,
                                     mode="bilinear", align_corners=False)
    tint_std, noise_std = 0.2 * torch.rand(n, 1, 1, 1, generator=generator), 0.15 * torch.rand(n, 1, 1, 1, generator=generator)
    return images + tint_std * tint + noise_std * torch.randn(images.shape, generator=generator), ids


def train_classifier(args, generator: torch.Generator) -> tuple[ShapesClassifier, float]:
    """Cross-entropy on both heads; returns the model (eval mode) and the training seconds."""
    classifier = ShapesClassifier(channels=tuple(args.classifier_channels), feature_dim=args.classifier_features)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    cross_entropy = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for step in range(args.classifier_iterations):
        images, ids = classifier_batch(args.classifier_batch, args.resolution, generator)
        shape_logits, colour_logits = classifier(images)
        loss = cross_entropy(shape_logits, ids // len(COLOURS)) + cross_entropy(colour_logits, ids % len(COLOURS))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.classifier_iterations:
            print(f"classifier step {step + 1}/{args.classifier_iterations} loss {loss.item():.4f}", flush=True)
    return classifier.eval(), time.perf_counter() - start


@torch.no_grad()
def ddim_sample(unet, text_encoder, tokenizer, scheduler, prompt_ids: Tensor, steps: int, guidance_scale: float,
                generator: torch.Generator) -> Tensor:
    """DDIM (η = 0) samples [B, 3, R, R] in [-1, 1] for prompt ids [B], CFG ε̂_u + w(ε̂_c − ε̂_u) against ""."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    captions = caption_table(tokenizer)
    hidden = text_encoder(torch.cat([captions[len(PROMPTS):].expand(len(prompt_ids), -1), captions[prompt_ids]]))[0]
    resolution = unet.config.sample_size
    sample = torch.randn(len(prompt_ids), 3, resolution, resolution, generator=generator)
    for t in ddim.timesteps:
        eps_u, eps_c = unet(torch.cat([sample, sample]), t, encoder_hidden_states=hidden).sample.chunk(2)
        sample = ddim.step(eps_u + guidance_scale * (eps_c - eps_u), t, sample).prev_sample
    return sample.clamp(-1.0, 1.0)


def replace_dir(build, target: Path) -> None:
    """Atomically (re)create directory ``target``: ``build(tmp)`` fills a sibling temp dir, then renames."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)


def write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def image_grid(images: Tensor, rows: int) -> Image.Image:
    """Tile [N, 3, H, W] images in [-1, 1] into a rows × (N / rows) PIL image with 1-px white gutters."""
    n, _, h, w = images.shape
    cols = n // rows
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = pixels[k]
    return Image.fromarray(grid)


def add_model_arguments(parser: argparse.ArgumentParser, *, iterations: int, classifier_iterations: int,
                        classifier_channels: list[int]) -> None:
    """The prior's and the classifier's sizes and training options, shared by the 2D and 3D training scripts (the
    defaults that differ are given)."""
    parser.add_argument("--iterations", type=int, default=iterations, help="prior training steps")
    parser.add_argument("--batch", type=int, default=32, help="prior batch size")
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64], help="UNet block widths")
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--text-width", type=int, default=64, help="text encoder hidden size (= cross-attention dim)")
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    parser.add_argument("--drop", type=float, default=0.15, help="fraction of captions replaced by the empty prompt")
    parser.add_argument("--classifier-iterations", type=int, default=classifier_iterations)
    parser.add_argument("--classifier-batch", type=int, default=64)
    parser.add_argument("--classifier-channels", type=int, nargs="+", default=classifier_channels)
    parser.add_argument("--classifier-features", type=int, default=128, help="FID feature dimension")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=4.0, help="CFG w (1 = no guidance)")


def add_run_arguments(parser: argparse.ArgumentParser, *, prior_dir: str, classifier_dir: str, results: Path) -> None:
    """Threads, seed, logging and where the models (``<out>/<prior_dir>``, ``<out>/<classifier_dir>``) and the check
    (``results``) go."""
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-prior", action="store_true",
                        help=f"load <out>/{prior_dir} instead of training it (retrain only the classifier, redo the "
                             "check)")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPO / "shapes",
                        help=f"writes <out>/{prior_dir} and <out>/{classifier_dir}")
    parser.add_argument("--results", type=Path, default=results, help="writes prior_check.json and prior_samples.png")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, iterations=2000, classifier_iterations=1000, classifier_channels=[32, 64, 128])
    parser.add_argument("--samples-per-prompt", type=int, default=16)
    add_run_arguments(parser, prior_dir="prior", classifier_dir="classifier", results=REPO / "results" / "shapes")
    args = parser.parse_args(argv)
    for name in ("iterations", "batch", "classifier_iterations", "classifier_batch", "ddim_steps",
                 "samples_per_prompt", "threads", "warmup", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.drop < 1.0:
        parser.error(f"--drop must lie in [0, 1), got {args.drop}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    prior_dir = args.out / "prior"
    if args.reuse_prior:
        unet, text_encoder, tokenizer, scheduler = load_prior(prior_dir)
        prior_training = json.loads((prior_dir / "training.json").read_text())
    else:
        unet, text_encoder, tokenizer, scheduler, losses, prior_seconds = train_prior(args, generator)
        tail = losses[-200:]
        prior_training = dict(resolution=args.resolution, iterations=args.iterations, batch=args.batch,
                              seed=args.seed, lr=args.lr, ema=args.ema, drop=args.drop,
                              train_seconds=round(prior_seconds, 1), final_loss_last200=round(sum(tail) / len(tail), 5))

        def build(tmp: Path) -> None:
            save_prior(tmp, unet, text_encoder, tokenizer, scheduler)
            (tmp / "training.json").write_text(json.dumps(prior_training, indent=1) + "\n")

        replace_dir(build, prior_dir)
    prior_mb = sum(f.stat().st_size for f in prior_dir.rglob("*") if f.is_file()) / 2**20

    classifier, classifier_seconds = train_classifier(args, generator)
    replace_dir(lambda tmp: save_classifier(classifier, tmp), args.out / "classifier")
    eval_generator = torch.Generator().manual_seed(args.seed + 1)
    renders, world = sample_world(1200, eval_generator, resolution=args.resolution)
    with torch.no_grad():
        render_accuracy = prompt_accuracy(classifier, renders, world.prompt_ids)

    start = time.perf_counter()
    prompt_ids = torch.arange(len(PROMPTS)).repeat_interleave(args.samples_per_prompt)
    samples = ddim_sample(unet, text_encoder, tokenizer, scheduler, prompt_ids, args.ddim_steps,
                          args.guidance_scale, eval_generator)
    sampling_seconds = time.perf_counter() - start
    with torch.no_grad():
        sample_accuracy = prompt_accuracy(classifier, samples, prompt_ids)
        predicted = classifier.predict_prompt_ids(samples)
    distance = mode_alignment_distance(samples, prompt_ids)
    report = dict(
        prior=prior_training, unet_parameters=count_parameters(unet),
        text_encoder_parameters=count_parameters(text_encoder), classifier_parameters=count_parameters(classifier),
        prior_dir_mb=round(prior_mb, 2), classifier_iterations=args.classifier_iterations,
        classifier_train_seconds=round(classifier_seconds, 1),
        classifier_accuracy_on_renders=round(render_accuracy, 4),
        ddim_steps=args.ddim_steps, guidance_scale=args.guidance_scale, samples_per_prompt=args.samples_per_prompt,
        sampling_seconds=round(sampling_seconds, 1),
        classifier_accuracy_on_samples=round(sample_accuracy, 4),
        shape_accuracy_on_samples=round((predicted // len(COLOURS) == prompt_ids // len(COLOURS)).float().mean().item(), 4),
        colour_accuracy_on_samples=round((predicted % len(COLOURS) == prompt_ids % len(COLOURS)).float().mean().item(), 4),
        accuracy_per_prompt={p: round((predicted[prompt_ids == k] == k).float().mean().item(), 4)
                             for k, p in enumerate(PROMPTS)},
        mode_alignment_distance_mean=round(distance.mean().item(), 4),
        mode_alignment_distance_median=round(distance.median().item(), 4),
    )
    write_atomic(args.results / "prior_check.json", lambda p: p.write_text(json.dumps(report, indent=1) + "\n"))
    write_atomic(args.results / "prior_samples.png",
                 lambda p: image_grid(samples, rows=len(PROMPTS)).save(p, format="PNG"))
    print(json.dumps(report, indent=1))
    print(f"shapes: {len(SHAPES)} x colours {len(COLOURS)}; wrote {args.out / 'prior'}, {args.out / 'classifier'}, "
          f"{args.results}")


if __name__ == "__main__":
    main()

"""Train the ShapesWorld-3D prior and classifier: ``python -m experiments.train_shapes3d`` (``make shapes3d-prior``).

The 3D twin of :mod:`experiments.train_shapes` (docs/design.md §6, §10). Every part is the 2D one's except the data.

0. **Data: a render pool.** ``--pool`` renders of :mod:`shapes.world3d` scenes through
   :func:`shapes.world3d.render_scenes` (the renderer the optimised fields use, 64 stratified samples per ray) from
   cameras drawn in batches of ``--camera-batch`` with threestudio's distribution
   (:class:`msd.rendering.CameraDistribution` defaults: elevation −10…90°, stratified azimuth, distance 1–1.5,
   fovy 40–70°, perturbations, "dreamfusion" light), each captioned with its view-dependent prompt
   (:func:`msd.rendering.view_prompts`: ``"a red cube, front view"``). A share ``--janus-share`` of the scenes are
   Janus probes (:data:`shapes.world3d.JANUS_PROBES`, ``"a red cube with a blue front, side view"``), the rest the
   16 plain prompts, uniformly. Rendering costs 15–22 ms per image on one thread when a call holds one primitive
   (the world evaluates the distance of every primitive present in a call), so each camera batch is rendered
   primitive by primitive (:func:`render_by_primitive`), once, before training; a fresh batch of 32 per step would
   cost ~0.5 s, more than half a prior step.
   A batch draws pool images uniformly and mirrors each with probability ½. The mirror is exact data
   augmentation: every primitive, the probe's front region and threestudio's camera distribution are symmetric
   under y → −y, so the mirrored render is a render from azimuth −a, and −a has the same view label as a.
1. **The prior**: a pixel-space :class:`UNet2DConditionModel` with cross-attention on a small
   :class:`CLIPTextModel` (trained jointly from scratch) and a CLIP tokenizer over the 3D caption vocabulary
   (:func:`shapes.models3d.build_tokenizer3d`: every word, the view suffixes and the probe words one token each,
   12 tokens long), SD's 1000-step DDPM schedule with ``clip_sample: true``; ε-prediction loss
   ``‖ε̂(z_t, t, c) − ε‖²``, t uniform; a fraction ``--drop`` of the captions replaced by "" (classifier-free
   guidance); Adam, linear warm-up, gradient norm clipped to 1; the saved weights are an EMA (decay
   ``min(ema, (1+n)/(10+n))`` after step n). 32 px as ShapesWorld-2D, and the 2D prior's sizes (UNet (16, 32, 64),
   1.06 M parameters; text encoder 2 × 64): the views, shading and perspective are what is new, and at 32 px the
   smallest, farthest primitive still spans ~2 px of radius (14% of the half-height, :data:`SIZE_RANGE`). Written to ``<out>/prior3d/`` (a diffusers directory:
   unet/, text_encoder/, tokenizer/, scheduler/, model_index.json) + ``training.json`` (settings, measured times,
   final loss); ``msd.priors.load_prior("shapes3d")`` reads it.
2. **The classifier** (:class:`shapes.models3d.ShapesClassifier3D`: shape, colour, view, front-colour heads; the
   front target is the front colour the render shows, none where the camera cannot see the probe's front face) on
   augmented pool renders (mirror, a random plain background composited through the render's opacity, blur,
   smooth tint, pixel noise: :func:`classifier_batch`), so that it also reads imperfect samples; written to
   ``<out>/classifier3d/``. ``--reuse-prior`` skips step 1 and loads ``<out>/prior3d/``.
3. **The check** → ``<results>/prior_check.json``: the classifier on fresh held-out renders (per head) and on
   turntables of the true primitives (8 evaluation views at elevation 15°: multi-view prompt accuracy, Janus count
   of the true probes, which must be 0); the prior's DDIM samples (η = 0, CFG w = ``--guidance-scale`` against "")
   for 16 plain prompts and 4 probes × 4 views read by the classifier. The samples grid (one row per prompt,
   columns front, side, back, overhead × ``--samples-per-view``) goes to ``<results>/prior_samples.png``.

Every output is written atomically (directories: a sibling temp dir, then renamed; files: temp + rename).

**Measured** (``--threads 1`` on the 2-core machine while another job kept it loaded, load average 2.9–3.0), two
runs of 20 prior and 20 classifier iterations (``--pool 512 --iterations 20 --classifier-iterations 20
--ddim-steps 2``): 1.02 and 0.78 s per prior iteration (batch 32; the 2D prior's full run measured 0.87 s), 21.7
and 14.8 ms per pool render (32, then 8 views per render call), 0.062 s per classifier
iteration (batch 64, channels (16, 32, 64); 0.20 s with the 2D classifier's (32, 64, 128)), 3.0–3.8 s per DDIM step
of the 160 grid samples (CFG: 320 UNet rows). The committed settings (``make shapes3d-prior``: ``--iterations 1300
--pool 8192 --classifier-iterations 3000``) therefore plan, at the slower rates, 8192 × 0.0217 ≈ 180 s of
rendering + 1300 × 1.02 ≈ 1330 s of prior training + 3000 × 0.07 = 210 s of classifier training ≈ 28.6 min of
training (≈ 22 min at the faster rates), and ≈ 3.5 min more for the check (512 held-out renders, 224 turntable
renders, 50 DDIM steps). ``training.json`` records what the real run measured (``pool_seconds``,
``train_seconds``, ``seconds_per_iteration``, the load average at its start).

The classifier's sizes come from short runs on pools of 1536–2048 renders: at (32, 64, 128) and 800 iterations its
shape accuracy on held-out renders was 0.73 (colour 0.95), and its front head, then trained on the scene's front
colour, learnt nothing (a view that hides the front face cannot show it; the target is now the front colour the
render shows); (16, 32, 64) runs 3× faster per iteration, and 3000 of its iterations reached shape 0.82, colour
0.96, front 0.90 (majority class 0.83), view 0.47 on held-out renders (on a pool 5× smaller than the committed one,
where it overfitted: its training loss fell to 0.8).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import Tensor, nn

from experiments.shapes_files import save_classifier, save_prior
from experiments.train_shapes import (
    add_model_arguments,
    add_run_arguments,
    ema_update,
    image_grid,
    replace_dir,
    write_atomic,
)
from msd.rendering import (
    VIEWS,
    CameraDistribution,
    Cameras,
    evaluation_cameras,
    sample_cameras,
    view_indices,
    view_prompts,
)
from shapes.metrics3d import classify, front_hidden, janus_count, multiview_prompt_accuracy, view_accuracy
from shapes.models import build_scheduler, build_text_encoder, build_unet, count_parameters, load_prior
from shapes.models3d import ShapesClassifier3D, build_tokenizer3d, front_class
from shapes.world import COLOURS
from shapes.world3d import (
    JANUS_PROBES,
    N_SAMPLES,
    NO_FRONT,
    PRIMITIVES,
    PROMPTS,
    SIZE_RANGE,
    Scene,
    caption,
    render_scenes,
    sample_scenes,
)

REPO = Path(__file__).resolve().parents[1]

BASE_CAPTIONS = PROMPTS + JANUS_PROBES
"""The 16 plain captions, then the 12 probes."""
CAPTIONS = tuple(f"{base}, {view} view" for base in BASE_CAPTIONS for view in VIEWS) + ("",)
"""Every training caption: base caption k with view v is row ``4k + v`` (:data:`msd.rendering.VIEWS` order); the
empty prompt "" (classifier-free dropout) is the last row, :data:`EMPTY`."""
EMPTY = len(CAPTIONS) - 1
CAMERAS = CameraDistribution()
"""threestudio's camera distribution and view thresholds (its defaults), the training cameras."""
GRID_VIEWS = ("front", "side", "back", "overhead")
"""Column order of the samples grid."""
GRID_PROBES = tuple(caption("cube", COLOURS[k], COLOURS[(k + 2) % len(COLOURS)]) for k in range(len(COLOURS)))
"""The probes of the samples grid: red/blue, green/yellow, blue/red, yellow/green fronts."""


# --- the render pool ---------------------------------------------------------------------------------------------


@dataclass
class RenderPool:
    """N renders with what they show: images [N, 3, R, R] in [−1, 1] (grey background = 0), opacity [N, 1, R, R];
    per render the scene (shape, colour, front_colour ids, size), the front colour the render shows
    (``seen_front``: the scene's front colour where the camera sees the probe cube's front face, x > size, else
    :data:`shapes.world3d.NO_FRONT`; mirroring keeps x), the camera's nominal elevation and azimuth (degrees), its
    view index into :data:`msd.rendering.VIEWS` and its caption's row in :data:`CAPTIONS`."""

    images: Tensor
    opacity: Tensor
    shape: Tensor
    colour: Tensor
    front_colour: Tensor
    size: Tensor
    seen_front: Tensor
    elevation_deg: Tensor
    azimuth_deg: Tensor
    view: Tensor
    caption_ids: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def captions(self) -> list[str]:
        return [CAPTIONS[k] for k in self.caption_ids.tolist()]


def _take(obj, index: Tensor):
    """A :class:`Scene` or :class:`Cameras` restricted to rows ``index`` (tensor fields indexed, the rest kept)."""
    return dataclasses.replace(obj, **{f.name: getattr(obj, f.name)[index] for f in dataclasses.fields(obj)
                                       if isinstance(getattr(obj, f.name), Tensor)})


def render_by_primitive(scene: Scene, cameras: Cameras, n_samples: int = N_SAMPLES,
                        generator: torch.Generator | None = None, chunk: int = 8) -> tuple[Tensor, Tensor]:
    """(images [B, 3, R, R] in [−1, 1], opacity [B, 1, R, R]) of scene b through camera b, rendered one primitive at a
    time, ``chunk`` views per call: the pixels of one :func:`render_scenes` call up to the order of the sample jitter's
    draws. The world evaluates the distance of every primitive present in a call on every point, so a batch that
    mixes the four costs ~3× more; 8 views per call are ~30% faster than 32 (measured: 17 vs 24 ms per render)."""
    images = torch.empty(len(cameras), 3, cameras.height, cameras.width)
    opacity = torch.empty(len(cameras), 1, cameras.height, cameras.width)
    with torch.no_grad():
        for index in range(len(PRIMITIVES)):
            for rows in (scene.shape == index).nonzero().squeeze(1).split(chunk):
                if not len(rows):  # split of an empty index gives one empty chunk
                    continue
                rgb, alpha, _ = render_scenes(_take(scene, rows), _take(cameras, rows), n_samples,
                                              generator).images(cameras.height, cameras.width)
                images[rows], opacity[rows] = 2.0 * rgb - 1.0, alpha
    return images, opacity


def draw_base_captions(n: int, janus_share: float, generator: torch.Generator) -> list[str]:
    """n captions: a probe (uniform over :data:`JANUS_PROBES`) with probability ``janus_share``, else a plain prompt
    (uniform over :data:`PROMPTS`)."""
    device = generator.device
    probe = torch.rand(n, generator=generator, device=device) < janus_share
    plain_ids = torch.randint(len(PROMPTS), (n,), generator=generator, device=device)
    probe_ids = torch.randint(len(JANUS_PROBES), (n,), generator=generator, device=device)
    return [JANUS_PROBES[j] if p else PROMPTS[i] for p, i, j in zip(probe.tolist(), plain_ids.tolist(),
                                                                       probe_ids.tolist())]


def render_pool(n: int, resolution: int, generator: torch.Generator,
                distribution: CameraDistribution = CAMERAS, janus_share: float = 1 / 3,
                camera_batch: int = 32, n_samples: int = N_SAMPLES, log_every: int = 0) -> RenderPool:
    """``n`` captioned renders: per batch of ``camera_batch`` cameras drawn by :func:`msd.rendering.sample_cameras`
    (threestudio's batches: one elevation coin per batch, stratified azimuths), one scene per camera
    (:func:`draw_base_captions`, sizes ~ U(SIZE_RANGE)), captions with the cameras' view suffixes."""
    parts, start = [], time.perf_counter()
    for first in range(0, n, camera_batch):
        b = min(camera_batch, n - first)
        cameras = sample_cameras(distribution, b, resolution, resolution, generator)
        bases = draw_base_captions(b, janus_share, generator)
        scene = sample_scenes(bases, generator)
        images, opacity = render_by_primitive(scene, cameras, n_samples, generator)
        captions = view_prompts(bases, cameras.elevation_deg, cameras.azimuth_deg, distribution)
        parts.append(dict(
            images=images, opacity=opacity, shape=scene.shape, colour=scene.colour,
            front_colour=scene.front_colour, size=scene.size,
            seen_front=torch.where(front_hidden(cameras.positions, scene.size), NO_FRONT, scene.front_colour),
            elevation_deg=cameras.elevation_deg, azimuth_deg=cameras.azimuth_deg,
            view=view_indices(cameras.elevation_deg, cameras.azimuth_deg, distribution),
            caption_ids=torch.tensor([CAPTIONS.index(c) for c in captions])))
        if log_every and ((first // camera_batch + 1) % log_every == 0 or first + b == n):
            print(f"rendered {first + b}/{n} ({time.perf_counter() - start:.0f} s)", flush=True)
    return RenderPool(**{name: torch.cat([part[name] for part in parts]) for name in parts[0]})


class PoolBatch(NamedTuple):
    """A training batch: images [B, 3, R, R] (mirrored where ``flipped``), opacity [B, 1, R, R], pool rows [B],
    flipped [B] bool, and the azimuths of the cameras the images are seen from (−a where mirrored)."""

    images: Tensor
    opacity: Tensor
    rows: Tensor
    flipped: Tensor
    azimuth_deg: Tensor


def pool_batch(pool: RenderPool, n: int, generator: torch.Generator) -> PoolBatch:
    """n pool renders drawn uniformly, each mirrored left–right with probability ½ (a render from azimuth −a)."""
    rows = torch.randint(len(pool), (n,), generator=generator, device=generator.device)
    flipped = torch.rand(n, generator=generator, device=generator.device) < 0.5
    mirror = flipped.view(-1, 1, 1, 1)
    images = torch.where(mirror, pool.images[rows].flip(-1), pool.images[rows])
    opacity = torch.where(mirror, pool.opacity[rows].flip(-1), pool.opacity[rows])
    azimuth = torch.where(flipped, -pool.azimuth_deg[rows], pool.azimuth_deg[rows])
    return PoolBatch(images, opacity, rows, flipped, azimuth)


def caption_table(tokenizer) -> Tensor:
    """Token ids [len(CAPTIONS), 12] of :data:`CAPTIONS`."""
    return tokenizer(list(CAPTIONS), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


# --- the prior ---------------------------------------------------------------------------------------------------


def train_prior(pool: RenderPool, generator: torch.Generator, iterations: int, batch: int = 32,
                channels: tuple[int, ...] = (16, 32, 64), layers_per_block: int = 1, text_width: int = 64,
                text_layers: int = 2, lr: float = 1e-3, warmup: int = 100, ema: float = 0.999, drop: float = 0.15,
                log_every: int = 100):
    """Train UNet + text encoder jointly on the pool; returns (EMA unet, EMA text encoder, tokenizer, scheduler,
    losses, seconds)."""
    resolution = pool.images.shape[-1]
    tokenizer = build_tokenizer3d()
    text_encoder = build_text_encoder(tokenizer, hidden_size=text_width, layers=text_layers)
    unet = build_unet(resolution=resolution, channels=tuple(channels), layers_per_block=layers_per_block,
                      cross_attention_dim=text_width)
    scheduler = build_scheduler()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    print(f"prior: unet {count_parameters(unet):,} params, text encoder {count_parameters(text_encoder):,} params, "
          f"{resolution}x{resolution} px, pool {len(pool)}", flush=True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    captions = caption_table(tokenizer)
    alphas_cumprod = scheduler.alphas_cumprod
    losses, start = [], time.perf_counter()
    for step in range(iterations):
        images, _, rows, _, _ = pool_batch(pool, batch, generator)
        caption_rows = torch.where(torch.rand(batch, generator=generator) < drop, EMPTY, pool.caption_ids[rows])
        t = torch.randint(scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(images.shape, generator=generator)
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * images + (1.0 - alpha_bar).sqrt() * noise
        hidden = text_encoder(captions[caption_rows])[0]
        loss = (unet(noisy, t, encoder_hidden_states=hidden).sample - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(ema, (1.0 + step) / (10.0 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == iterations:
            recent = losses[-log_every:]
            print(f"prior step {step + 1}/{iterations} loss {sum(recent) / len(recent):.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return ema_unet, ema_text, tokenizer, scheduler, losses, time.perf_counter() - start


# --- the classifier ----------------------------------------------------------------------------------------------


def _gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of std ``sigma`` pixels (radius ⌈2σ⌉, edges replicated); identity for σ < 0.05."""
    if sigma < 0.05:
        return images
    radius = max(1, int(2 * sigma + 0.999))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


class Targets(NamedTuple):
    shape: Tensor
    colour: Tensor
    view: Tensor
    front: Tensor


def classifier_batch(pool: RenderPool, n: int, generator: torch.Generator) -> tuple[Tensor, Targets]:
    """Augmented pool renders and their four targets (shape, colour, view, front class), so that the classifier
    reads imperfect samples too: mirror (exact, see the module docstring); per image a plain background
    ~ U(−0.5, 0.5)³ composited through the opacity instead of grey, a smooth tint (bilinearly upsampled 4 × 4 noise,
    std ~ U(0, 0.2)) and pixel noise (std ~ U(0, 0.15)); per batch a Gaussian blur of std ~ U(0, 1.2) px. Shape,
    colour, view and front colour are never changed: they are what the classifier must read."""
    device = generator.device
    images, opacity, rows, _, _ = pool_batch(pool, n, generator)
    resolution = images.shape[-1]
    background = torch.rand(n, 3, 1, 1, generator=generator, device=device) - 0.5
    images = images + (1.0 - opacity) * background  # the grey background is 0 in [−1, 1]
    images = _gaussian_blur(images, 1.2 * torch.rand((), generator=generator, device=device).item())
    tint = F.interpolate(torch.randn(n, 3, 4, 4, generator=generator, device=device), size=resolution,
                         mode="bilinear", align_corners=False)
    tint_std = 0.2 * torch.rand(n, 1, 1, 1, generator=generator, device=device)
    noise_std = 0.15 * torch.rand(n, 1, 1, 1, generator=generator, device=device)
    images = images + tint_std * tint + noise_std * torch.randn(images.shape, generator=generator, device=device)
    return images, Targets(pool.shape[rows], pool.colour[rows], pool.view[rows], front_class(pool.seen_front[rows]))


def train_classifier(pool: RenderPool, generator: torch.Generator, iterations: int, batch: int = 64,
                     channels: tuple[int, ...] = (16, 32, 64), feature_dim: int = 128, lr: float = 2e-3,
                     log_every: int = 100) -> tuple[ShapesClassifier3D, float]:
    """Cross-entropy summed over the four heads; returns the model (eval mode) and the training seconds."""
    classifier = ShapesClassifier3D(channels=tuple(channels), feature_dim=feature_dim)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    cross_entropy = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for step in range(iterations):
        images, targets = classifier_batch(pool, batch, generator)
        loss = sum(cross_entropy(logits, target) for logits, target in zip(classifier(images), targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == iterations:
            print(f"classifier step {step + 1}/{iterations} loss {loss.item():.4f}", flush=True)
    return classifier.eval(), time.perf_counter() - start


def head_accuracies(classifier: ShapesClassifier3D, pool: RenderPool) -> dict[str, float]:
    """Accuracy of each head on the pool's renders as they are (no augmentation), and the view head's on the
    overhead / non-overhead split (all a plain primitive's render can tell)."""
    predicted = classify(classifier, pool.images)
    truth = Targets(pool.shape, pool.colour, pool.view, front_class(pool.seen_front))
    overhead = VIEWS.index("overhead")
    result = {head: view_accuracy(getattr(predicted, head), getattr(truth, head)) for head in Targets._fields}
    result["overhead_or_not"] = view_accuracy(predicted.view == overhead, truth.view == overhead)
    return result


# --- the check ---------------------------------------------------------------------------------------------------


def turntables(captions: tuple[str, ...], resolution: int, n_views: int = 8, size: float | None = None,
               distribution: CameraDistribution = CAMERAS) -> tuple[Tensor, Cameras, Scene]:
    """True renders [P, V, 3, R, R] of each caption's primitive (size: the middle of SIZE_RANGE) from the
    distribution's ``n_views`` evaluation cameras (azimuths 0, 360/V, …; elevation 15°), midpoint samples; the
    cameras and scenes are returned tiled to P·V rows (caption-major)."""
    size = sum(SIZE_RANGE) / 2 if size is None else size
    views = evaluation_cameras(distribution, n_views, resolution, resolution, torch.device("cpu"))
    tiled = _take(views, torch.arange(n_views).repeat(len(captions)))
    scene = Scene.from_captions([c for c in captions for _ in range(n_views)], torch.full((len(tiled),), size))
    images, _ = render_by_primitive(scene, tiled)
    return images.view(len(captions), n_views, 3, resolution, resolution), tiled, scene


def truth_check(classifier: ShapesClassifier3D, resolution: int) -> dict:
    """The metrics on the true primitives' turntables: multi-view prompt accuracy (plain prompts, probes), view
    accuracy, and the probes' Janus count (must be 0 for the truth)."""
    images, cameras, scene = turntables(BASE_CAPTIONS, resolution)
    prompts, views = images.shape[:2]
    predicted = classify(classifier, images)
    shape, colour = scene.shape.view(prompts, views)[:, 0], scene.colour.view(prompts, views)[:, 0]
    plain = slice(0, len(PROMPTS))
    probes = slice(len(PROMPTS), prompts)
    hidden = front_hidden(cameras.positions, scene.size).view(prompts, views)
    janus = janus_count(predicted.front[probes], scene.front_colour.view(prompts, views)[probes, 0], hidden[probes])
    true_view = view_indices(cameras.elevation_deg, cameras.azimuth_deg, CAMERAS).view(prompts, views)
    front_truth = torch.where(hidden, 0, front_class(scene.front_colour).view(prompts, views))
    return dict(
        views=views, elevation_deg=CAMERAS.eval_elevation_deg, size=float(scene.size[0]),
        multiview_prompt_accuracy_plain=multiview_prompt_accuracy(predicted.shape[plain], predicted.colour[plain],
                                                                  shape[plain], colour[plain]),
        multiview_prompt_accuracy_probes=multiview_prompt_accuracy(predicted.shape[probes], predicted.colour[probes],
                                                                   shape[probes], colour[probes]),
        view_accuracy=view_accuracy(predicted.view, true_view),
        front_accuracy_probes_on_visibility=view_accuracy(predicted.front[probes], front_truth[probes]),
        janus_count_probes=janus.tolist())


@torch.no_grad()
def ddim_sample(unet, text_encoder, tokenizer, scheduler, captions: list[str], steps: int, guidance_scale: float,
                generator: torch.Generator) -> Tensor:
    """DDIM (η = 0) samples [B, 3, R, R] in [−1, 1], one per caption, CFG ``ε̂_u + w(ε̂_c − ε̂_u)`` against ""."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    tokens = tokenizer([""] * len(captions) + list(captions), padding="max_length",
                       max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    hidden = text_encoder(tokens)[0]
    resolution = unet.config.sample_size
    sample = torch.randn(len(captions), 3, resolution, resolution, generator=generator)
    for t in ddim.timesteps:
        eps_u, eps_c = unet(torch.cat([sample, sample]), t, encoder_hidden_states=hidden).sample.chunk(2)
        sample = ddim.step(eps_u + guidance_scale * (eps_c - eps_u), t, sample).prev_sample
    return sample.clamp(-1.0, 1.0)


def sample_check(classifier: ShapesClassifier3D, samples: Tensor, bases: list[str], views: list[str]) -> dict:
    """The classifier's reading of the prior's samples (one per (base caption, view) row): shape, colour and prompt
    accuracy per view, view accuracy, and for the probes how often the front head reads the front colour in
    front and in back views."""
    predicted = classify(classifier, samples)
    scene = Scene.from_captions(bases, torch.zeros(len(bases)))
    view = torch.tensor([VIEWS.index(v) for v in views])
    probe = scene.front_colour >= 0
    reads_front = predicted.front == scene.front_colour + 1
    result = {"view_accuracy": view_accuracy(predicted.view, view)}
    for name in GRID_VIEWS:
        rows = view == VIEWS.index(name)
        shape_right = predicted.shape[rows] == scene.shape[rows]
        colour_right = predicted.colour[rows] == scene.colour[rows]
        result[f"{name}_view"] = dict(shape=shape_right.float().mean().item(),
                                      colour=colour_right.float().mean().item(),
                                      prompt=(shape_right & colour_right).float().mean().item(),
                                      probes_reading_front_colour=reads_front[rows & probe].float().mean().item())
    return result


# --- the script --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, iterations=1300, classifier_iterations=3000, classifier_channels=[16, 32, 64])
    parser.add_argument("--pool", type=int, default=8192, help="renders in the training pool (mirrored: twice as many)")
    parser.add_argument("--camera-batch", type=int, default=32, help="cameras per threestudio batch of the pool")
    parser.add_argument("--n-samples", type=int, default=N_SAMPLES, help="samples per ray of the renders")
    parser.add_argument("--janus-share", type=float, default=1 / 3, help="fraction of pool scenes that are Janus probes")
    parser.add_argument("--heldout", type=int, default=512, help="fresh renders the classifier is checked on")
    parser.add_argument("--samples-per-view", type=int, default=2, help="samples per prompt and view in the grid")
    add_run_arguments(parser, prior_dir="prior3d", classifier_dir="classifier3d",
                      results=REPO / "results" / "shapes3d")
    args = parser.parse_args(argv)
    for name in ("iterations", "batch", "pool", "camera_batch", "n_samples", "classifier_iterations",
                 "classifier_batch", "heldout", "ddim_steps", "samples_per_view", "threads", "warmup", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("drop", "janus_share"):
        if not 0.0 <= getattr(args, name) < 1.0:
            parser.error(f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(args, name)}")
    if args.resolution % 2 ** (len(args.channels) - 1):
        parser.error(f"--resolution {args.resolution} must be divisible by 2^(len(--channels) - 1)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    distribution = CAMERAS
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    pool = render_pool(args.pool, args.resolution, generator, distribution, args.janus_share, args.camera_batch,
                       args.n_samples, log_every=max(1, args.log_every // 2))
    pool_seconds = time.perf_counter() - start
    print(f"pool: {len(pool)} renders in {pool_seconds:.0f} s", flush=True)
    prior_dir = args.out / "prior3d"
    if args.reuse_prior:
        unet, text_encoder, tokenizer, scheduler = load_prior(prior_dir)
        prior_training = json.loads((prior_dir / "training.json").read_text())
    else:
        unet, text_encoder, tokenizer, scheduler, losses, prior_seconds = train_prior(
            pool, generator, args.iterations, args.batch, tuple(args.channels), args.layers_per_block,
            args.text_width, args.text_layers, args.lr, args.warmup, args.ema, args.drop, args.log_every)
        tail = losses[-200:]
        prior_training = dict(
            resolution=args.resolution, iterations=args.iterations, batch=args.batch, seed=args.seed, lr=args.lr,
            warmup=args.warmup, ema=args.ema, drop=args.drop, channels=args.channels,
            layers_per_block=args.layers_per_block, text_width=args.text_width, text_layers=args.text_layers,
            unet_parameters=count_parameters(unet), text_encoder_parameters=count_parameters(text_encoder),
            pool=args.pool, camera_batch=args.camera_batch, n_samples=args.n_samples, janus_share=args.janus_share,
            mirror=True, cameras=dataclasses.asdict(distribution), threads=args.threads,
            pool_seconds=round(pool_seconds, 1), train_seconds=round(prior_seconds, 1),
            seconds_per_iteration=round(prior_seconds / args.iterations, 3),
            load_average_at_start=round(load_start, 2), final_loss_last200=round(sum(tail) / len(tail), 5))

        def build(tmp: Path) -> None:
            save_prior(tmp, unet, text_encoder, tokenizer, scheduler)
            (tmp / "training.json").write_text(json.dumps(prior_training, indent=1) + "\n")

        replace_dir(build, prior_dir)

    classifier, classifier_seconds = train_classifier(
        pool, generator, args.classifier_iterations, args.classifier_batch, tuple(args.classifier_channels),
        args.classifier_features, log_every=args.log_every)
    classifier_training = dict(iterations=args.classifier_iterations, batch=args.classifier_batch,
                               channels=args.classifier_channels, feature_dim=args.classifier_features,
                               parameters=count_parameters(classifier), seed=args.seed,
                               train_seconds=round(classifier_seconds, 1),
                               seconds_per_iteration=round(classifier_seconds / args.classifier_iterations, 3))

    def build_classifier(tmp: Path) -> None:
        save_classifier(classifier, tmp)
        (tmp / "training.json").write_text(json.dumps(classifier_training, indent=1) + "\n")

    replace_dir(build_classifier, args.out / "classifier3d")

    check_start = time.perf_counter()
    eval_generator = torch.Generator().manual_seed(args.seed + 1)
    heldout = render_pool(args.heldout, args.resolution, eval_generator, distribution, args.janus_share,
                          args.camera_batch, args.n_samples)
    bases = [b for b in PROMPTS + GRID_PROBES for _ in GRID_VIEWS for _ in range(args.samples_per_view)]
    views = [v for _ in PROMPTS + GRID_PROBES for v in GRID_VIEWS for _ in range(args.samples_per_view)]
    sample_start = time.perf_counter()
    samples = ddim_sample(unet, text_encoder, tokenizer, scheduler, [f"{b}, {v} view" for b, v in zip(bases, views)],
                          args.ddim_steps, args.guidance_scale, eval_generator)
    sampling_seconds = time.perf_counter() - sample_start
    report = dict(
        prior=prior_training, classifier=classifier_training,
        classifier_on_heldout_renders=dict(renders=args.heldout, **head_accuracies(classifier, heldout)),
        classifier_on_true_turntables=truth_check(classifier, args.resolution),
        ddim_steps=args.ddim_steps, guidance_scale=args.guidance_scale, samples_per_view=args.samples_per_view,
        sampling_seconds=round(sampling_seconds, 1),
        prior_samples=sample_check(classifier, samples, bases, views),
        check_seconds=round(time.perf_counter() - check_start, 1),
        total_seconds=round(time.perf_counter() - start, 1))
    args.results.mkdir(parents=True, exist_ok=True)
    write_atomic(args.results / "prior_check.json", lambda p: p.write_text(json.dumps(report, indent=1) + "\n"))
    write_atomic(args.results / "prior_samples.png",
                 lambda p: image_grid(samples, rows=len(PROMPTS + GRID_PROBES)).save(p, format="PNG"))
    print(json.dumps(report, indent=1))
    print(f"wrote {prior_dir}, {args.out / 'classifier3d'}, {args.results}")
    return report


if __name__ == "__main__":
    main()

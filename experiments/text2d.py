"""The text-to-2D task (paper Table 4 / supplementary Fig. 1): optimise ``images_per_prompt`` images per prompt
with a guidance on a diffusers prior, and track FID against DDIM samples of the same prior and prompts.

Per iteration (:func:`experiments.distill.distill`): ``x = g(ψ)`` in the prior's sample space (VAE latents or
pixels; a coordinate-MLP generator may instead render RGB that the VAE encodes, ``generator.space = image``),
the guidance gets the images' prompt conditioning with the call and gives a detached target ``y``, and Adam
descends ``½‖x − sg(y)‖²`` (docs/design.md §3). ``guidance=ddim`` is the reference row: DDIM
(Euler PF-ODE) samples of the same prompts. Every ``eval.every`` iterations (and at the first and last) the
decoded images are scored: FID against the DDIM reference set (cached per prior/prompts/seed, shared by all
methods), and on ShapesWorld also FID against true renders, prompt accuracy and the mode-alignment
distance. ``unet_evals`` counts network evaluations per image (CFG = 2 per call; VSD's LoRA forward and its
training steps included), as the guidances report them.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import baselines  # noqa: F401  (registers "sds", "vsd", "sdi")
import msd  # noqa: F401  (registers "msd")
from experiments.builders import method_label
from experiments.checkpoint import RunCheckpoint
from experiments.distill import distill
from experiments.image_metrics import ClassifierFeatures, CLIPSimilarity, FIDTracker, inception_features
from experiments.io import write_npz
from experiments.loggers import RunLogger
from experiments.outputs import finish_run
from experiments.tasks import Task, make_optimizer, register_task
from msd.checks import require
from msd.denoiser import Conditioning, Denoiser
from msd.generators import FourierImageMLP, ImageGrid
from msd.guidance import Guidance, available_guidances, build_guidance
from msd.paths import repo_path
from msd.priors import DiffusersPrior, locate_prior
from msd.solvers import SOLVERS, sample, solver_evaluations

REFERENCE_SAMPLER = "ddim"
GENERATORS = ("grid", "mlp")
SPACES = ("sample", "image")
FEATURES = ("classifier", "inception")
OPTIMIZERS = ("adam",)
LORA_FIELDS = ("lora_rank", "lora_alpha")


@dataclass
class Text2DSetup:
    """The run's objects; ``guidance`` is None for the DDIM reference row."""

    prior: DiffusersPrior
    prompts: list[str]
    cond: Conditioning
    denoiser: Denoiser
    guidance: Guidance | None
    generator: nn.Module | None
    world: bool


def per_image_prompts(task: DictConfig) -> list[str]:
    """Each prompt ``images_per_prompt`` times, prompt-major."""
    return [p for p in task.prompts for _ in range(int(task.images_per_prompt))]


def check_task(cfg: DictConfig) -> None:
    task = cfg.task
    require(len(task.prompts) >= 1, "task.prompts", "a non-empty list of strings", task.prompts)
    require(task.images_per_prompt >= 1, "task.images_per_prompt", ">= 1", task.images_per_prompt)
    require(task.steps >= 1, "task.steps", ">= 1", task.steps)
    require(task.generator.name in GENERATORS, "task.generator.name", f"one of {GENERATORS}", task.generator.name)
    require(task.generator.space in SPACES, "task.generator.space", f"one of {SPACES}", task.generator.space)
    require(task.optimizer.name in OPTIMIZERS, "task.optimizer.name", f"one of {OPTIMIZERS}", task.optimizer.name)
    require(task.optimizer.lr > 0, "task.optimizer.lr", "> 0", task.optimizer.lr)
    require(task.eval.every >= 1, "task.eval.every", ">= 1", task.eval.every)
    require(task.eval.reference_per_prompt >= 1, "task.eval.reference_per_prompt", ">= 1",
            task.eval.reference_per_prompt)
    require(task.eval.reference_solver in SOLVERS, "task.eval.reference_solver", f"one of {SOLVERS}",
            task.eval.reference_solver)
    require(task.eval.features in FEATURES, "task.eval.features", f"one of {FEATURES}", task.eval.features)
    require(task.eval.features != "inception" or task.eval.inception_path,
            "task.eval.inception_path", "a TorchScript Inception file when task.eval.features=inception",
            task.eval.inception_path)
    Scorer.check(cfg)


def build_generator(cfg: DictConfig, prior: DiffusersPrior, batch: int, generator: torch.Generator) -> nn.Module:
    """g(ψ): renders [B, C, H, W] in the prior's sample space (``space=sample``) or RGB (``space=image``)."""
    spec = cfg.task.generator
    if spec.space == "image":
        channels, (height, width) = prior.image_channels, prior.image_size
    else:
        channels, height, width = prior.sample_shape
    if spec.name == "grid":
        return ImageGrid(batch, channels, height, width, init_std=float(spec.init_std), generator=generator)
    output = "tanh" if spec.space == "image" or not prior.latent else "none"
    return FourierImageMLP(batch, channels, height, width, hidden=int(spec.hidden), layers=int(spec.layers),
                           num_frequencies=int(spec.num_frequencies), frequency_std=float(spec.frequency_std),
                           output=output, generator=generator)


def build_text2d_guidance(cfg: DictConfig, prior: DiffusersPrior, denoiser: Denoiser,
                          generator: torch.Generator, lora_camera_dim: int | None = None) -> Guidance:
    """``build_guidance(guidance.name, ...)`` on the prior's denoiser (which carries its VP schedule); VSD's ε̂_φ
    is a LoRA on the UNet, initialised from ``generator`` (conditioned on a camera vector of ``lora_camera_dim``
    values when given: text-to-3D, ProlificDreamer's camera-conditioned LoRA)."""
    kwargs = OmegaConf.to_container(cfg.guidance, resolve=True)
    name = kwargs.pop("name")
    lora = {field: kwargs.pop(field) for field in LORA_FIELDS if field in kwargs}
    if name == "vsd":
        require("lora_rank" in lora, "guidance.lora_rank", "set for a diffusers prior (VSD's ε̂_φ is a LoRA)", None)
        prior.add_lora(rank=int(lora["lora_rank"]), alpha=lora.get("lora_alpha"), generator=generator,
                       camera_dim=lora_camera_dim)
        kwargs["particle_model"] = prior.lora_denoiser()
        for toy_only in ("phi_hidden", "phi_layers"):
            kwargs.pop(toy_only, None)
    else:
        require(not lora, "guidance.lora_rank/lora_alpha", "only for guidance=vsd", lora)
    try:
        return build_guidance(name, denoiser=denoiser, **kwargs)
    except TypeError as error:
        raise ValueError(f"guidance={name}: {error}") from error


def build_setup(cfg: DictConfig) -> Text2DSetup:
    """Check the config and build the run's objects (fails with the field name before writing anything)."""
    require(cfg.get("prior") is not None, "prior", "a prior preset (prior=shapes | sd21 | sd15)", None)
    location = locate_prior(cfg.prior.name, cfg.prior.path)  # a missing model fails first, with how to get it
    check_task(cfg)
    name = cfg.guidance.name
    allowed = (*available_guidances(), REFERENCE_SAMPLER)
    require(name in allowed, "guidance.name", f"one of {allowed}", name)
    prior = DiffusersPrior.from_pretrained(location, device=cfg.device, dtype=cfg.prior.dtype)
    prompts = per_image_prompts(cfg.task)
    interval = cfg.guidance_interval
    cond = prior.conditioning(prompts)
    denoiser = prior.denoiser(float(cfg.guidance_scale), tuple(interval) if interval is not None else None)
    world = cfg.prior.name == "shapes"
    require(world or cfg.task.eval.features == "inception", "task.eval.features",
            "inception for a prior other than shapes (the classifier features are ShapesWorld's)",
            cfg.task.eval.features)
    if name == REFERENCE_SAMPLER:
        require(cfg.guidance.solver in SOLVERS, "guidance.solver", f"one of {SOLVERS}", cfg.guidance.solver)
        return Text2DSetup(prior, prompts, cond, denoiser, None, None, world)
    generator = torch.Generator(prior.device).manual_seed(int(cfg.seed))  # LoRA and g(ψ) initialisation
    guidance = build_text2d_guidance(cfg, prior, denoiser, generator)
    image_generator = build_generator(cfg, prior, len(prompts), generator)
    return Text2DSetup(prior, prompts, cond, denoiser, guidance, image_generator, world)


# --- sampling and evaluation ---------------------------------------------------------------------------------

def ddim_samples(prior: DiffusersPrior, prompts: list[str], scale: float, interval, steps: int, solver: str,
                 generator: torch.Generator, batch: int = 64) -> Tensor:
    """PF-ODE (DDIM = Euler) samples of the prior in its sample space, one per prompt: ``x̂_T = √(1+σ_max²) n``
    (``z_T = n``, drawn on the generator's device) integrated down ``prior.schedule.grid(steps)`` with CFG
    ``scale`` against "", in batches."""
    sigmas = prior.schedule.grid(steps)
    noise = torch.randn(len(prompts), *prior.sample_shape, generator=generator, device=generator.device)
    noise = noise.to(prior.device)
    model = prior.denoiser(scale, tuple(interval) if interval is not None else None)
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            denoiser = model.condition(prior.conditioning(prompts[start:start + batch]))
            x = noise[start:start + batch] * float((1 + sigmas[0] ** 2) ** 0.5)
            out.append(sample(denoiser, x, sigmas, solver))
    return torch.cat(out)


def reference_cache_path(cfg: DictConfig, prior: DiffusersPrior) -> Path:
    """Where the DDIM reference set of ``cfg`` is cached: a hash of everything it depends on (prior and its
    clean-estimate range, prompts, counts, steps, solver, scale, seed) under ``task.eval.cache_dir``."""
    ev = cfg.task.eval
    key = {"prior": cfg.prior.name, "path": str(cfg.prior.path), "clean_range": repr(prior.clean_range),
           "prompts": list(cfg.task.prompts),
           "per_prompt": int(ev.reference_per_prompt), "steps": int(ev.reference_steps),
           "solver": ev.reference_solver, "scale": float(ev.reference_guidance_scale), "seed": int(ev.reference_seed)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(ev.cache_dir) / f"ddim_reference_{digest}.npz"


def reference_images(cfg: DictConfig, prior: DiffusersPrior) -> tuple[Tensor, list[str]]:
    """DDIM reference images [P·R, C, H, W] in [−1, 1] and their prompts, computed once and cached at
    :func:`reference_cache_path`. Their noise is drawn on the CPU, so the reference set is the same on every
    device (up to the device's float rounding)."""
    ev = cfg.task.eval
    path = reference_cache_path(cfg, prior)
    prompts = [p for p in cfg.task.prompts for _ in range(int(ev.reference_per_prompt))]
    if path.is_file():
        with np.load(path) as arrays:
            return torch.from_numpy(arrays["images"]), prompts
    generator = torch.Generator().manual_seed(int(ev.reference_seed))
    samples = ddim_samples(prior, prompts, float(ev.reference_guidance_scale), None, int(ev.reference_steps),
                           ev.reference_solver, generator)
    images = decode_images(prior, samples)
    write_npz(path, images=images.numpy())
    return images, prompts


def decode_images(prior: DiffusersPrior, samples: Tensor, batch: int = 32) -> Tensor:
    """Model samples → float32 CPU images in [−1, 1]."""
    with torch.no_grad():
        return torch.cat([prior.decode(s).clamp(-1, 1).float().cpu() for s in samples.split(batch)])


class Scorer:
    """FID and KID against the DDIM reference (and, on ShapesWorld, against true renders), the CLIP score
    (``task.eval.clip_path`` set), prompt accuracy and the mode-alignment distance of a set of images.

    KID (experiments.image_metrics): unbiased at any N, subsets of ``min(task.eval.kid_subset_size, N, M)`` images
    (N generated, M reference), ``task.eval.kid_subsets`` of them drawn with ``task.eval.reference_seed``, so
    the same images score the same; ``kid_std`` is the std over the subsets."""

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """Fail with the field's name on a bad KID / CLIP setting (cheap: nothing is loaded)."""
        ev = cfg.task.eval
        size, subsets = ev.kid_subset_size, ev.kid_subsets
        require(isinstance(size, int) and not isinstance(size, bool) and size >= 2, "task.eval.kid_subset_size",
                "an integer >= 2 (runs use min(it, images, reference images); the unbiased MMD² needs 2)", size)
        require(isinstance(subsets, int) and not isinstance(subsets, bool) and subsets >= 1,
                "task.eval.kid_subsets", "an integer >= 1", subsets)
        if ev.clip_path is not None:
            require(bool(ev.clip_path) and (repo_path(ev.clip_path) / "config.json").is_file(),
                    "task.eval.clip_path", "null or a local CLIP model directory (config.json, weights, "
                    "preprocessor_config.json, tokenizer files; e.g. `hf download openai/clip-vit-large-patch14 "
                    "--local-dir <dir>`)", ev.clip_path)

    def __init__(self, cfg: DictConfig, setup: Text2DSetup):
        Scorer.check(cfg)
        ev = cfg.task.eval
        self.world, self.mode_distance = setup.world, bool(ev.mode_distance)
        self.prompts = list(setup.prompts)
        kid = {"kid_subset_size": int(ev.kid_subset_size), "kid_subsets": int(ev.kid_subsets),
               "kid_seed": int(ev.reference_seed)}
        self.clip = None
        if ev.clip_path is not None:
            try:
                self.clip = CLIPSimilarity(repo_path(ev.clip_path), device=setup.prior.device)
            except (OSError, ValueError) as error:
                raise ValueError(f"task.eval.clip_path: no CLIP model could be loaded from {ev.clip_path!r}: "
                                 f"{error}") from error
        if setup.world:
            from shapes.models import ShapesClassifier
            from shapes.world import prompt_id, sample_world

            self.classifier = ShapesClassifier.load(repo_path(cfg.prior.classifier)).eval()
            features = ClassifierFeatures(self.classifier.features, self.classifier.num_features)
            self.prompt_ids = torch.tensor([prompt_id(p) for p in setup.prompts])
            true_ids = torch.tensor([prompt_id(p) for p in cfg.task.prompts
                                     for _ in range(int(ev.reference_per_prompt))])
            renders, _ = sample_world(len(true_ids), torch.Generator().manual_seed(int(ev.reference_seed) + 1),
                                      prompts=true_ids, resolution=setup.prior.image_size[0])
            self.true_fid = FIDTracker(features, renders, **kid)
        else:
            features = inception_features(ev.inception_path)
        reference, _ = reference_images(cfg, setup.prior)
        self.reference = reference
        self.fid = FIDTracker(features, reference, **kid)

    def __call__(self, images: Tensor, final: bool = False) -> dict[str, float]:
        row = self.fid.scores(images)  # fid, kid, kid_std
        if self.clip is not None:
            row["clip_score"] = self.clip.score(images, self.prompts)
        if self.world:
            from shapes.metrics import mode_alignment_distance, prompt_accuracy

            true = self.true_fid.scores(images)
            row["fid_true"], row["kid_true"] = true["fid"], true["kid"]
            row["prompt_accuracy"] = prompt_accuracy(self.classifier, images, self.prompt_ids)
            if final or self.mode_distance:
                row["mode_distance"] = float(mode_alignment_distance(images, self.prompt_ids).mean())
        return row


# --- the run -------------------------------------------------------------------------------------------------

def image_grid_figure(images: Tensor, prompts: list[str], per_prompt: int, title: str) -> Figure:
    """Rows: prompts; columns: the images of each prompt (at most 8)."""
    rows, cols = len(prompts) // per_prompt, min(per_prompt, 8)
    figure = Figure(figsize=(1.1 * cols + 1.6, 1.1 * rows + 0.4))
    axes = figure.subplots(rows, cols, squeeze=False)
    pixels = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(pixels[r * per_prompt + c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(prompts[r * per_prompt], fontsize=6, rotation=0, ha="right", va="center")
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    return figure


@register_task("text2d")
class Text2DTask(Task):
    """ψ = the image generator's parameters; x = its images in the prior's sample space; each image is
    conditioned on its prompt (the same every step)."""

    objective = "fid"
    step_column = "iteration"
    evals_column = "unet_evals"

    def __init__(self, cfg: DictConfig, setup: Text2DSetup):
        self.cfg, self.setup = cfg, setup
        self.method = method_label(cfg.guidance)
        self.image_space = cfg.task.generator.space == "image"
        self.scorer: Scorer | None = None
        self.images: Tensor | None = None

    @classmethod
    def build(cls, cfg: DictConfig) -> "Text2DTask":
        return cls(cfg, build_setup(cfg))

    # --- the loop's interface ---------------------------------------------------------------------------------
    def render(self) -> Tensor:
        out = self.setup.generator()
        return self.setup.prior.encode(out) if self.image_space else out

    def conditioning(self, step: int) -> Conditioning:
        return self.setup.cond

    def evaluate(self, final: bool) -> dict[str, float]:
        """Scores of the current images (float32 CPU, [−1, 1]; kept in ``self.images``)."""
        with torch.no_grad():
            images = (self.setup.generator().clamp(-1, 1).float().cpu() if self.image_space
                      else decode_images(self.setup.prior, self.setup.generator()))
        self.images = images
        return self.scorer(images, final)

    def state_dict(self) -> dict:
        return {"image_generator": self.setup.generator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.setup.generator.load_state_dict(state["image_generator"])

    # --- the run ----------------------------------------------------------------------------------------------
    def run(self, run_dir: Path, logger: RunLogger, checkpoint: RunCheckpoint) -> dict:
        """metrics.csv (a row per iteration, scores every ``eval.every``), final.json, images.npz, images.png.
        The optimisation resumes from ``checkpoint``; the DDIM reference row simply reruns."""
        start = time.perf_counter()
        cfg, setup, task = self.cfg, self.setup, self.cfg.task
        self.scorer = Scorer(cfg, setup)
        if setup.guidance is None:
            rows, done, seconds = self.sample_reference()
        else:
            generator = torch.Generator(setup.prior.device).manual_seed(int(cfg.seed) + 1)  # the loop's stream
            params = [p for p in setup.generator.parameters() if p.requires_grad]
            outcome = distill(self, setup.guidance, make_optimizer(params, task.optimizer), generator, checkpoint,
                              logger, steps=int(task.steps), log_every=1, eval_every=int(task.eval.every),
                              progress_bar=bool(task.progress_bar), label=self.method)
            rows, done, seconds = outcome.rows, outcome.steps, outcome.seconds
        ms_per_iter = 1e3 * seconds / max(done, 1)
        final = {"method": self.method, "prior": cfg.prior.name, "guidance_scale": float(cfg.guidance_scale),
                 "seed": int(cfg.seed), **{k: v for k, v in rows[-1].items() if k not in ("iteration",)},
                 "iterations": done, "unet_evals_per_iter": rows[-1]["unet_evals"] / max(done, 1),
                 "ms_per_iter": round(ms_per_iter, 3), "seconds": round(seconds, 3), "images": len(setup.prompts)}
        write_npz(run_dir / "images.npz", images=self.images.numpy(), prompts=np.array(setup.prompts))
        figure = image_grid_figure(self.images, setup.prompts, int(task.images_per_prompt),
                                   f"{self.method} on {cfg.prior.name}, w={float(cfg.guidance_scale):g}: "
                                   f"FID {final['fid']:.2f}")
        return finish_run(run_dir, final, rows, "images", figure, logger, start)

    def sample_reference(self) -> tuple[list[dict], int, float]:
        """``guidance=ddim``: DDIM samples of the prompts, scored once; (rows, steps, seconds)."""
        cfg, setup = self.cfg, self.setup
        generator = torch.Generator(setup.prior.device).manual_seed(int(cfg.seed))
        steps = int(cfg.guidance.solver_steps)
        tic = time.perf_counter()
        samples = ddim_samples(setup.prior, setup.prompts, float(cfg.guidance_scale), cfg.guidance_interval, steps,
                               cfg.guidance.solver, generator)
        seconds = time.perf_counter() - tic
        self.images = decode_images(setup.prior, samples)
        evals = float(solver_evaluations(steps, cfg.guidance.solver) * setup.denoiser.evaluations_per_call)
        return [{"iteration": steps, "unet_evals": evals, **self.scorer(self.images, final=True)}], steps, seconds

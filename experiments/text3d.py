"""The text-to-3D task (issue 14; docs/design.md §10.8): a radiance field g(ψ) distilled from a text-conditional
diffusion prior by any guidance, on the one loop (:func:`experiments.distill.distill`).

Per iteration k: ``task.batch_size`` cameras from the threestudio camera distribution (``task.cameras``), drawn,
with the stratified ray jitter, the shading and the background augmentation, from a generator seeded by
(seed, k) on the prior's device, so that the step's draws depend on nothing else (a resumed run redraws them
exactly); the field rendered through them (dense samples on the CPU; on CUDA nerfacc's packed samples from an
occupancy grid the task owns and updates, ``task.occupancy_grid``) (``task.render_sizes`` px, switching at ``task.resolution_milestones``;
``task.n_samples`` per ray) on its background; the renders mapped to [−1, 1], bilinearly resized to the prior's
image size when they differ (threestudio's ``F.interpolate(..., align_corners=False)``) and VAE-encoded for a latent
prior. The conditioning is the view-dependent prompts (``"<prompt>, front view"``, threestudio's thresholds) and
the flattened camera-to-world matrices, which only a camera-conditioned model reads (VSD's LoRA). The guidance's
target loss goes back to ψ, plus the regularisers of ``task.regularisers`` (threestudio's schedules).

Evaluation with the 3-D truth of ShapesWorld-3D (``prior=shapes3d``), every ``task.eval.every`` iterations and at
the last: ``task.eval.views`` turntable views (threestudio's evaluation cameras) rendered without jitter on the
world's grey background, lambertian with the light at the camera, read by the ShapesWorld-3D classifier — shape /
colour accuracy over the views, multi-view prompt accuracy (all views right), view accuracy, the Janus count on a
probe prompt — the silhouette IoU against the prompt's primitive (the best size of :data:`SILHOUETTE_SIZES`), and at
the last evaluation the volumetric IoU at τ = 200 (calibrated on the truth, docs/design.md §10.7) and at
τ = ln 2 / 0.3 = 2.31 (where a ray through the world's thinnest object is half opaque; the mesh's isosurface too),
the field's largest density, and FID / KID of the views against true renders
and against the prior's own DDIM samples at the same view prompts.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from experiments.builders import method_label
from experiments.checkpoint import RunCheckpoint
from experiments.distill import distill
from experiments.image_metrics import ClassifierFeatures, FIDTracker
from experiments.io import write_npz
from experiments.loggers import RunLogger
from experiments.outputs import finish_run
from experiments.tasks import Penalty, Task, make_optimizer, register_task
from experiments.text2d import build_text2d_guidance, ddim_samples, decode_images
from msd.checks import require
from msd.denoiser import Conditioning, Denoiser
from msd.fields import (
    DiffuseMaterial,
    EnvironmentMapBackground,
    ImplicitVolumeField,
    RegulariserWeights,
    ScheduledWeight,
    SolidBackground,
    VolumeField,
    VoxelGridField,
    random_background,
    regularisation,
)
from msd.guidance import Guidance, available_guidances
from msd.occupancy import OccupancyGrid
from msd.paths import repo_path
from msd.priors import DiffusersPrior, locate_prior
from msd.rendering import (
    CameraDistribution,
    Cameras,
    Rays,
    RenderOutput,
    camera_rays,
    evaluation_cameras,
    render_rays,
    rendering_layout,
    sample_cameras,
    sphere_near_far,
    view_indices,
    view_prompts,
)
from shapes.world3d import SIZE_RANGE

FIELDS = ("voxel", "implicit")
BACKGROUNDS = ("solid", "environment")
OPTIMIZERS = ("adam",)
WORLD_PRIORS = ("shapes3d",)
CAMERA_DIM = 16
"""Length of a camera's conditioning vector: its 4 × 4 camera-to-world matrix, row-major (ProlificDreamer's)."""
SILHOUETTE_SIZES = (0.15, 0.175, 0.2, 0.225, 0.25, 0.275, 0.3)
"""Sizes of the prompt's primitive the silhouette IoU is taken against (the best one counts): ShapesWorld-3D's
size range in steps of 0.025."""


def thin_object_threshold(min_size: float) -> float:
    """τ = ln 2 / (2 r_min): the density at which a ray through the diameter of the world's thinnest object (size
    r_min) is half opaque, ``1 − exp(−τ · 2 r_min) = ½``, in 1 / world unit: where a learned field, whose interior
    density is a few units after a short run (not the world's 400), starts to render as a surface."""
    return math.log(2.0) / (2.0 * min_size)


# --- configuration ------------------------------------------------------------------------------------------------

def scheduled_weight(value, name: str) -> ScheduledWeight:
    """A number (constant) or threestudio's ``[start_step, start_value, end_value, end_step]``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ScheduledWeight.constant(float(value))
    require(value is not None and len(value) == 4, name, "a number or [start_step, start_value, end_value, end_step]",
            value)
    return ScheduledWeight(int(value[0]), float(value[1]), float(value[2]), int(value[3]))


def camera_distribution(cameras: DictConfig) -> CameraDistribution:
    """``task.cameras`` as a :class:`CameraDistribution` (ranges as tuples; its checks name the field)."""
    values = OmegaConf.to_container(cameras, resolve=True)
    return CameraDistribution(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def material_of(task: DictConfig) -> DiffuseMaterial:
    m = task.material
    return DiffuseMaterial(ambient_light_colour=tuple(m.ambient_light_colour),
                           diffuse_light_colour=tuple(m.diffuse_light_colour),
                           ambient_only_steps=int(m.ambient_only_steps), diffuse_prob=float(m.diffuse_prob),
                           textureless_prob=float(m.textureless_prob))


def regulariser_weights(task: DictConfig) -> RegulariserWeights:
    r = task.regularisers
    return RegulariserWeights(**{name: scheduled_weight(r[name], f"task.regularisers.{name}")
                                 for name in ("orient", "sparsity", "opaque", "z_variance")})


def check_task(cfg: DictConfig) -> None:
    task = cfg.task
    require(isinstance(task.prompt, str) and task.prompt.strip() != "", "task.prompt", "a non-empty string",
            task.prompt)
    require(task.steps >= 1, "task.steps", ">= 1", task.steps)
    require(task.batch_size >= 1, "task.batch_size", ">= 1 (cameras per iteration)", task.batch_size)
    sizes, milestones = list(task.render_sizes), list(task.resolution_milestones)
    require(len(sizes) >= 1 and all(int(s) >= 2 for s in sizes), "task.render_sizes", "a list of sizes >= 2 (px)",
            sizes)
    require(len(milestones) == len(sizes) - 1 and milestones == sorted(milestones) and all(m >= 1 for m in milestones),
            "task.resolution_milestones", f"{len(sizes) - 1} increasing steps >= 1 (one per size after the first)",
            milestones)
    require(task.n_samples >= 2, "task.n_samples", ">= 2 (samples per ray)", task.n_samples)
    require(task.scene_radius > 0, "task.scene_radius", "> 0 (world units)", task.scene_radius)
    require(task.field.name in FIELDS, "task.field.name", f"one of {FIELDS}", task.field.name)
    require(task.background.name in BACKGROUNDS, "task.background.name", f"one of {BACKGROUNDS}",
            task.background.name)
    require(0.0 <= task.background.random_probability <= 1.0, "task.background.random_probability", "in [0, 1]",
            task.background.random_probability)
    require(task.optimizer.name in OPTIMIZERS, "task.optimizer.name", f"one of {OPTIMIZERS}", task.optimizer.name)
    require(task.optimizer.lr > 0, "task.optimizer.lr", "> 0", task.optimizer.lr)
    ev = task.eval
    require(ev.every >= 1, "task.eval.every", ">= 1", ev.every)
    require(ev.views >= 8, "task.eval.views", ">= 8 (azimuths of the multi-view metrics)", ev.views)
    require(ev.reference_per_view >= 1, "task.eval.reference_per_view", ">= 1", ev.reference_per_view)
    require(ev.turntable_size % 2 == 0 and ev.turntable_size >= 2, "task.eval.turntable_size",
            "an even size >= 2 (px; yuv420p)", ev.turntable_size)
    camera_distribution(task.cameras)
    material_of(task)
    regulariser_weights(task)


# --- the run's objects --------------------------------------------------------------------------------------------

@dataclass
class Text3DSetup:
    prior: DiffusersPrior
    prompt: str
    denoiser: Denoiser
    guidance: Guidance
    field: VolumeField
    background: nn.Module
    cameras: CameraDistribution
    regularisers: RegulariserWeights
    world: bool


def build_field(task: DictConfig, generator: torch.Generator) -> VolumeField:
    """g(ψ): ``task.field`` (voxel grid or implicit hash-grid volume) with ``task.material``, on the generator's
    device (the implicit volume's weights are drawn from ``generator``)."""
    spec, material = task.field, material_of(task)
    common = {"radius": float(task.scene_radius), "density_bias": spec.density_bias,
              "density_blob_scale": float(spec.density_blob_scale), "density_blob_std": float(spec.density_blob_std),
              "density_activation": spec.density_activation, "normal_type": spec.normal_type,
              "normal_eps": float(spec.normal_eps), "material": material}
    if spec.name == "voxel":
        return VoxelGridField(resolution=int(spec.resolution), device=generator.device, **common)
    return ImplicitVolumeField(generator, **common).to(generator.device)


def build_background(task: DictConfig, generator: torch.Generator) -> nn.Module:
    spec = task.background
    if spec.name == "solid":
        return SolidBackground(tuple(spec.colour), learned=bool(spec.learned), device=generator.device)
    return EnvironmentMapBackground(generator).to(generator.device)


def build_setup(cfg: DictConfig) -> Text3DSetup:
    """Check the config and build the run's objects (fails with the field name before writing anything)."""
    require(cfg.get("prior") is not None, "prior", "a prior preset (prior=shapes3d | sd21 | sd15)", None)
    location = locate_prior(cfg.prior.name, cfg.prior.path)  # a missing model fails first, with how to get it
    check_task(cfg)
    name = cfg.guidance.name
    require(name in available_guidances(), "guidance.name", f"one of {available_guidances()}", name)
    prior = DiffusersPrior.from_pretrained(location, device=cfg.device, dtype=cfg.prior.dtype)
    require(prior.image_channels == 3, "prior", "a prior of RGB images", prior.image_channels)
    interval = cfg.guidance_interval
    denoiser = prior.denoiser(float(cfg.guidance_scale), tuple(interval) if interval is not None else None)
    generator = torch.Generator(prior.device).manual_seed(int(cfg.seed))  # LoRA, field and background init
    guidance = build_text2d_guidance(cfg, prior, denoiser, generator, lora_camera_dim=CAMERA_DIM)
    field = build_field(cfg.task, generator)
    background = build_background(cfg.task, generator)
    return Text3DSetup(prior, cfg.task.prompt, denoiser, guidance, field, background,
                       camera_distribution(cfg.task.cameras), regulariser_weights(cfg.task),
                       cfg.prior.name in WORLD_PRIORS)


# --- one step's render --------------------------------------------------------------------------------------------

@dataclass
class StepBatch:
    """What :meth:`Text3DTask.render` drew and rendered for one step (the conditioning and the regularisers read
    it)."""

    cameras: Cameras
    rays: Rays
    render: RenderOutput
    shading: str


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of step ``step``'s draws: seeded by a hash of (seed, step), on ``device``."""
    digest = hashlib.sha256(f"text3d/{int(seed)}/{int(step)}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def to_prior_space(prior: DiffusersPrior, rgb: Tensor) -> Tensor:
    """Renders [B, 3, h, w] in [0, 1] → the prior's samples: ``2 rgb − 1``, bilinearly resized to the prior's image
    size when it differs (``align_corners=False``, threestudio's), then :meth:`DiffusersPrior.encode` (the VAE
    posterior mean for a latent prior, the identity for a pixel prior)."""
    images = 2.0 * rgb - 1.0
    if tuple(images.shape[-2:]) != tuple(prior.image_size):
        images = F.interpolate(images, size=prior.image_size, mode="bilinear", align_corners=False)
    return prior.encode(images)


# --- evaluation ---------------------------------------------------------------------------------------------------

class Evaluator3D:
    """The multi-view and geometric metrics of a field against ShapesWorld-3D (module docstring)."""

    def __init__(self, cfg: DictConfig, setup: Text3DSetup):
        from shapes.models3d import ShapesClassifier3D
        from shapes.world3d import parse_caption

        ev = cfg.task.eval
        self.cfg, self.setup = cfg, setup
        self.n_samples, self.radius = int(ev.n_samples), float(cfg.task.scene_radius)
        height, width = setup.prior.image_size
        self.cameras = evaluation_cameras(setup.cameras, int(ev.views), height, width, setup.prior.device)
        self.views = view_indices(self.cameras.elevation_deg, self.cameras.azimuth_deg, setup.cameras).cpu()
        self.view_prompts = view_prompts(setup.prompt, self.cameras.elevation_deg, self.cameras.azimuth_deg,
                                         setup.cameras)
        self.shape, self.colour, self.front = parse_caption(setup.prompt)
        self.classifier = ShapesClassifier3D.load(repo_path(cfg.prior.classifier)).eval()
        self.kid = {"kid_subset_size": int(ev.kid_subset_size), "kid_subsets": int(ev.kid_subsets),
                    "kid_seed": int(ev.reference_seed)}
        self.images: Tensor | None = None
        self.reference_images: dict[str, Tensor] = {}

    def render(self, field) -> tuple[Tensor, Tensor]:
        """(images [V, 3, H, W] in [−1, 1] on the world's background, opacity [V, H, W]), float32 on the CPU."""
        from shapes.metrics3d_geometry import render_views
        from shapes.world3d import BACKGROUND

        with torch.no_grad():
            rgb, opacity = render_views(field, self.cameras, self.n_samples, self.radius, BACKGROUND)
        return (2.0 * rgb - 1.0).float().cpu(), opacity.float().cpu()

    def classifier_scores(self, images: Tensor) -> dict[str, float]:
        from shapes.metrics3d import classify, front_hidden, janus_count, multiview_prompt_accuracy, view_accuracy
        from shapes.world3d import COLOURS, PRIMITIVES

        predicted = classify(self.classifier, images.unsqueeze(0))  # [1, V] per head
        shape = torch.tensor([PRIMITIVES.index(self.shape)])
        colour = torch.tensor([COLOURS.index(self.colour)])
        row = {"shape_accuracy": (predicted.shape[0] == shape).float().mean().item(),
               "colour_accuracy": (predicted.colour[0] == colour).float().mean().item(),
               "prompt_accuracy": multiview_prompt_accuracy(predicted.shape, predicted.colour, shape, colour),
               "view_accuracy": view_accuracy(predicted.view[0], self.views)}
        if self.front is not None:
            hidden = front_hidden(self.cameras.positions.cpu()).unsqueeze(0)
            row["janus_count"] = float(janus_count(predicted.front, torch.tensor([COLOURS.index(self.front)]),
                                                   hidden)[0])
        return row

    def silhouette(self, field) -> tuple[float, float]:
        """(best mean silhouette IoU over the views, its size) against the prompt's primitive at the origin, over
        :data:`SILHOUETTE_SIZES`."""
        from shapes.metrics3d_geometry import primitive_field, silhouette_iou

        scores = [silhouette_iou(field, primitive_field(self.shape, size, device=self.setup.prior.device),
                                 self.cameras, self.n_samples, self.radius).mean().item()
                  for size in SILHOUETTE_SIZES]
        best = int(np.argmax(scores))
        return scores[best], SILHOUETTE_SIZES[best]

    def volumetric(self, field) -> dict[str, float | str]:
        from shapes.metrics3d_geometry import DENSITY_THRESHOLD, density_grid, volumetric_iou

        row: dict[str, float | str] = {"density_max": density_grid(field).max().item()}
        for suffix, tau in (("", DENSITY_THRESHOLD), ("_opaque", thin_object_threshold(SIZE_RANGE[0]))):
            fit = volumetric_iou(field, threshold=tau)
            row[f"volumetric_iou{suffix}"] = fit.iou
            row[f"volumetric_iou{suffix}_prompt_shape"] = fit.iou_by_shape[self.shape]
            row[f"fit{suffix}_shape"], row[f"fit{suffix}_size"] = fit.shape, fit.size
        return row

    def references(self) -> tuple[Tensor, Tensor]:
        """(true renders, prior samples) at the evaluation views, ``reference_per_view`` each, in [−1, 1]."""
        return self.true_renders(), self.prior_samples()

    def true_renders(self) -> Tensor:
        """The prompt's true object, ``reference_per_view`` sizes uniform in the world's range (drawn with
        ``eval.reference_seed``), through every evaluation camera: [R·V, 3, H, W], size-major."""
        from shapes.world3d import Scene, sample_scenes, world_images

        ev, per_view = self.cfg.task.eval, int(self.cfg.task.eval.reference_per_view)
        device = self.setup.prior.device
        scenes = sample_scenes([self.setup.prompt] * per_view, torch.Generator(device).manual_seed(
            int(ev.reference_seed) + 1))
        with torch.no_grad():
            return torch.cat([world_images(Scene(scenes.shape[k:k + 1], scenes.colour[k:k + 1], scenes.size[k:k + 1],
                                                 scenes.front_colour[k:k + 1]), self.cameras).float().cpu()
                              for k in range(per_view)])

    def prior_samples(self) -> Tensor:
        """DDIM samples of the prior at the evaluation views' prompts, cached by what they depend on."""
        ev, prior = self.cfg.task.eval, self.setup.prior
        prompts = [p for p in self.view_prompts for _ in range(int(ev.reference_per_view))]
        key = {"prior": self.cfg.prior.name, "path": str(self.cfg.prior.path), "clean_range": repr(prior.clean_range),
               "prompts": prompts, "steps": int(ev.reference_steps), "scale": float(ev.reference_guidance_scale),
               "seed": int(ev.reference_seed)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(ev.cache_dir) / f"ddim_views_{digest}.npz"
        if path.is_file():
            with np.load(path) as arrays:
                return torch.from_numpy(arrays["images"])
        generator = torch.Generator().manual_seed(int(ev.reference_seed))
        samples = ddim_samples(prior, prompts, float(ev.reference_guidance_scale), None, int(ev.reference_steps),
                               "euler", generator)
        images = decode_images(prior, samples)
        write_npz(path, images=images.numpy())
        return images

    def __call__(self, field, final: bool) -> dict[str, float | str]:
        images, _ = self.render(field)
        self.images = images
        row: dict[str, float | str] = self.classifier_scores(images)
        row["silhouette_iou"], row["silhouette_size"] = self.silhouette(field)
        if final:
            row.update(self.volumetric(field))
            features = ClassifierFeatures(self.classifier.features, self.classifier.num_features)
            true, prior_samples = self.references()
            self.reference_images = {"true": true, "prior": prior_samples}
            for name, reference in (("true", true), ("prior", prior_samples)):
                scores = FIDTracker(features, reference, **self.kid).scores(images)
                row[f"fid_{name}"], row[f"kid_{name}"] = scores["fid"], scores["kid"]
        return row


# --- the task -----------------------------------------------------------------------------------------------------

@register_task("text3d")
class Text3DTask(Task):
    """ψ = the radiance field's (and a learned background's) parameters; x = the step's renders in the prior's
    sample space; each render is conditioned on its view prompt and camera."""

    objective = "silhouette_iou"
    step_column = "iteration"
    evals_column = "unet_evals"

    def __init__(self, cfg: DictConfig, setup: Text3DSetup):
        self.cfg, self.setup = cfg, setup
        self.method = method_label(cfg.guidance)
        self.step = 0
        self.batch: StepBatch | None = None
        self.evaluator: Evaluator3D | None = None
        self.last_row: dict = {}
        self.occupancy: OccupancyGrid | None = None
        if cfg.task.occupancy_grid and rendering_layout(setup.prior.device) == "packed":
            self.occupancy = OccupancyGrid(radius=float(cfg.task.scene_radius), samples_per_ray=int(cfg.task.n_samples),
                                           device=setup.prior.device)

    @classmethod
    def build(cls, cfg: DictConfig) -> Text3DTask:
        return cls(cfg, build_setup(cfg))

    def parameters(self) -> list[nn.Parameter]:
        return [p for module in (self.setup.field, self.setup.background) for p in module.parameters()
                if p.requires_grad]

    def render_size(self, step: int) -> int:
        """The render size at ``step``: ``render_sizes[i]`` from ``resolution_milestones[i − 1]`` on."""
        task = self.cfg.task
        return int(task.render_sizes[sum(step >= int(m) for m in task.resolution_milestones)])

    # --- the loop's interface ---------------------------------------------------------------------------------
    def render(self) -> Tensor:
        task, setup = self.cfg.task, self.setup
        generator = step_generator(int(self.cfg.seed), self.step, setup.prior.device)
        size = self.render_size(self.step)
        cameras = sample_cameras(setup.cameras, int(task.batch_size), size, size, generator)
        shading = setup.field.material.sample_shading(self.step, generator)
        if self.occupancy is not None:
            self.occupancy.update(self.step, setup.field, generator)
        rays = camera_rays(cameras)
        near, far = sphere_near_far(rays, float(task.scene_radius))
        background = setup.background(rays.directions)
        if float(task.background.random_probability) > 0:
            background = random_background(background, generator, float(task.background.random_probability))
        output = render_rays(setup.field.with_shading(shading), rays, int(task.n_samples), near, far, background,
                             generator, estimator=self.occupancy)
        self.batch = StepBatch(cameras, rays, output, shading)
        rgb, _, _ = output.images(size, size)
        return to_prior_space(setup.prior, rgb)

    def conditioning(self, step: int) -> Conditioning:
        cameras = self.batch.cameras
        prompts = (view_prompts(self.setup.prompt, cameras.elevation_deg, cameras.azimuth_deg, self.setup.cameras)
                   if self.cfg.task.view_dependent_prompting else self.setup.prompt)
        text = self.setup.prior.conditioning(prompts)
        return Conditioning(text.embeddings, camera=cameras.camera_to_world.flatten(1))

    def regularisation(self, step: int) -> Penalty | None:
        batch = self.batch
        render = batch.render if batch.render.ray_indices is None else batch.render.padded()
        total, terms = regularisation(self.setup.field.with_shading(batch.shading), render,
                                      batch.rays.directions, self.setup.regularisers, step)
        if not terms:
            return None
        weighted = {name: getattr(self.setup.regularisers, name)(step) * value.detach() for name, value in terms.items()}
        return Penalty(total, weighted)

    def after_step(self, step: int, last: bool) -> None:
        self.step, self.batch = step, None

    def evaluate(self, final: bool) -> dict[str, float]:
        if self.evaluator is None:
            return {"opacity": self.mean_opacity()}
        row = self.evaluator(self.setup.field, final)
        self.last_row = row
        return {k: v for k, v in row.items() if not isinstance(v, str)}

    def mean_opacity(self) -> float:
        """Mean opacity of the evaluation views (the one score without a world's truth)."""
        height, width = self.setup.prior.image_size
        cameras = evaluation_cameras(self.setup.cameras, int(self.cfg.task.eval.views), height, width,
                                     self.setup.prior.device)
        from shapes.metrics3d_geometry import render_opacity

        with torch.no_grad():
            return render_opacity(self.setup.field, cameras, int(self.cfg.task.eval.n_samples),
                                  float(self.cfg.task.scene_radius)).mean().item()

    def state_dict(self) -> dict:
        return {"field": self.setup.field.state_dict(), "background": self.setup.background.state_dict(),
                "step": self.step, **({"occupancy": self.occupancy.state_dict()} if self.occupancy is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.setup.field.load_state_dict(state["field"])
        self.setup.background.load_state_dict(state["background"])
        self.step = int(state["step"])
        if self.occupancy is not None:
            self.occupancy.load_state_dict(state["occupancy"])

    # --- the run ----------------------------------------------------------------------------------------------
    def run(self, run_dir: Path, logger: RunLogger, checkpoint: RunCheckpoint) -> dict:
        """metrics.csv (a row per iteration, scores every ``eval.every``), final.json, views.npz (the evaluation
        views and the FID / KID reference sets), multiview.png, and the exports: turntable.mp4 / .gif, mesh.obj / .glb (``task.eval.exports``)."""
        start = time.perf_counter()
        cfg, setup, task = self.cfg, self.setup, self.cfg.task
        if setup.world:
            self.evaluator = Evaluator3D(cfg, setup)
        generator = torch.Generator(setup.prior.device).manual_seed(int(cfg.seed) + 1)  # the guidance's stream
        outcome = distill(self, setup.guidance, make_optimizer(self.parameters(), task.optimizer), generator,
                          checkpoint, logger, steps=int(task.steps), log_every=1, eval_every=int(task.eval.every),
                          progress_bar=bool(task.progress_bar), label=self.method)
        rows, done, seconds = outcome.rows, outcome.steps, outcome.seconds
        final = {"method": self.method, "prior": cfg.prior.name, "prompt": setup.prompt,
                 "guidance_scale": float(cfg.guidance_scale), "seed": int(cfg.seed),
                 **{k: v for k, v in rows[-1].items() if k != "iteration"},
                 **{k: v for k, v in self.last_row.items() if isinstance(v, str)},
                 "iterations": done, "unet_evals_per_iter": rows[-1]["unet_evals"] / max(done, 1),
                 "ms_per_iter": round(1e3 * seconds / max(done, 1), 3), "seconds": round(seconds, 3)}
        figure = self.write_exports(run_dir, logger, final)
        return finish_run(run_dir, final, rows, "multiview", figure, logger, start)

    def write_exports(self, run_dir: Path, logger: RunLogger, final: dict) -> Figure:
        """The final field (field.pt: its and the background's state dicts), the evaluation views (views.npz), the
        turntable and the mesh; returns the multi-view figure."""
        from experiments.exports import atomic_path, field_mesh, multiview_figure, to_uint8, write_mesh, write_turntable
        from shapes.world3d import BACKGROUND

        ev, setup = self.cfg.task.eval, self.setup
        with atomic_path(run_dir / "field.pt") as tmp:
            torch.save({"field": setup.field.state_dict(), "background": setup.background.state_dict()}, tmp)
        if self.evaluator is not None:
            write_npz(run_dir / "views.npz", images=self.evaluator.images.numpy(),
                      prompts=np.array(self.evaluator.view_prompts),
                      **{f"reference_{k}": v.numpy() for k, v in self.evaluator.reference_images.items()})
        if bool(ev.exports):
            size = int(ev.turntable_size)
            mp4, _ = write_turntable(run_dir / "turntable", setup.field, n_views=int(ev.turntable_views), height=size,
                                     width=size, distribution=setup.cameras, n_samples=int(ev.n_samples),
                                     scene_radius=float(self.cfg.task.scene_radius), background=BACKGROUND)
            logger.log_video("turntable", mp4)
            tau = thin_object_threshold(SIZE_RANGE[0])
            _, glb = write_mesh(run_dir / "mesh", field_mesh(setup.field, threshold=tau))
            logger.log_object3d("mesh", glb)
        title = f"{self.method}: {setup.prompt!r}, w={float(self.cfg.guidance_scale):g}, seed {int(self.cfg.seed)}"
        if self.evaluator is not None:
            images = self.evaluator.images
        else:  # no world: the evaluation views on the world's grey, as they are
            height, width = setup.prior.image_size
            cameras = evaluation_cameras(setup.cameras, int(ev.views), height, width, setup.prior.device)
            from shapes.metrics3d_geometry import render_views

            with torch.no_grad():
                images = 2.0 * render_views(setup.field, cameras, int(ev.n_samples), float(self.cfg.task.scene_radius),
                                            BACKGROUND)[0].float().cpu() - 1.0
        return multiview_figure({title: to_uint8((images + 1.0) / 2.0)})

"""Config → objects: the (guided) toy denoiser, the noise schedule, the guidance; and the start-up checks.

Every check fails with a ``ValueError`` naming the config field, the allowed values and what was
given, before the run writes anything. The guidances check their own parameters on construction
(``msd.guidance.require``), so :func:`build_toy2d` constructing everything is the validation.
"""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

import baselines  # noqa: F401  (registers "sds", "vsd", "sdi")
import msd  # noqa: F401  (registers "msd")
from msd.checks import require
from msd.denoiser import Denoiser, GuidedDenoiser
from msd.guidance import Guidance, available_guidances, build_guidance
from msd.schedules import EDMSchedule
from msd.solvers import SOLVERS
from toy2d import ExactDenoiser, load_denoiser, toy_mixture
from toy2d.datasets import DATASETS, target_classes, task_dataset

REFERENCE_SAMPLER = "ddim"
"""``guidance=ddim``: not a guidance but the PF-ODE sampling reference rows."""
DENOISERS = ("exact", "learned")
GUIDES = ("cfg", "autoguidance")
OPTIMIZERS = ("adam", "sgd")
TARGET_CLASSES = ("A", "B")
MODEL_ROLES = ("main", "cfg_guide", "autoguidance_guide")


def guidance_names() -> tuple[str, ...]:
    return (*available_guidances(), REFERENCE_SAMPLER)


def check_task(task: DictConfig) -> None:
    """The task fields the driver relies on."""
    require(task.grid_size >= 1, "task.grid_size", ">= 1", task.grid_size)
    require(task.steps >= 1, "task.steps", ">= 1", task.steps)
    require(task.canvas.half_size > 0, "task.canvas.half_size", "> 0", task.canvas.half_size)
    require(len(task.canvas.center) == 2, "task.canvas.center", "a pair [x, y]", task.canvas.center)
    require(task.optimizer.name in OPTIMIZERS, "task.optimizer.name", f"one of {OPTIMIZERS}", task.optimizer.name)
    require(task.optimizer.lr > 0, "task.optimizer.lr", "> 0", task.optimizer.lr)
    require(task.save_every >= 1, "task.save_every", ">= 1", task.save_every)
    require(task.metrics_every >= 1, "task.metrics_every", ">= 1", task.metrics_every)
    require(0 < task.sigma_min < task.sigma_max, "task.sigma_min/sigma_max", "0 < sigma_min < sigma_max",
            (task.sigma_min, task.sigma_max))
    require(task.rho > 0, "task.rho", "> 0", task.rho)
    require(task.solver_steps >= 1, "task.solver_steps", ">= 1", task.solver_steps)
    dataset = task_dataset(task)
    require(dataset in DATASETS, "task.dataset", f"one of {DATASETS}", dataset)
    require(task.target_class in TARGET_CLASSES, "task.target_class", f"one of {TARGET_CLASSES}", task.target_class)
    # spiral / pinwheel have no classes: target_class is not used, and must keep its default so that a run
    # asking for class B of the spiral fails instead of silently scoring against the whole spiral
    require(dataset == "fractal" or task.target_class == "A", "task.target_class",
            f"A (its default) for task.dataset={dataset}, which has no classes", task.target_class)
    require(task.eval.n_reference >= 1, "task.eval.n_reference", ">= 1", task.eval.n_reference)
    require(0 < task.eval.hdr_mass < 1, "task.eval.hdr_mass", "in (0, 1)", task.eval.hdr_mass)
    require(task.figure.resolution >= 2, "task.figure.resolution", ">= 2", task.figure.resolution)


def noise_schedule(task: DictConfig) -> EDMSchedule:
    return EDMSchedule(task.sigma_min, task.sigma_max, task.rho)


def toy_model_names(cfg: DictConfig) -> dict[str, str | None]:
    """Per role (:data:`MODEL_ROLES`), the classes of the exact mixture or the name of the committed learned
    model, None where there is none. The fractal takes them from ``denoiser.<role>``; spiral and pinwheel,
    which have no classes, always use their whole mixture (exact) or the models ``<dataset>`` and
    ``<dataset>_weak`` (learned, ``toy2d.denoisers.MODEL_NAMES``), and have no CFG guide."""
    dataset = task_dataset(cfg.task)
    if dataset == "fractal":
        return {role: cfg.denoiser[role] for role in MODEL_ROLES}
    if cfg.denoiser.name == "exact":
        return {"main": target_classes(dataset, cfg.task.target_class), "cfg_guide": None, "autoguidance_guide": None}
    return {"main": dataset, "cfg_guide": None, "autoguidance_guide": f"{dataset}_weak"}


def _toy_model(cfg: DictConfig, name: str) -> Denoiser:
    """The exact mixture of ``task.dataset`` restricted to classes ``name``, or the committed learned model ``name``;
    either carries the task's noise schedule (``task.sigma_min``, ``sigma_max``, ``rho``)."""
    if cfg.denoiser.name == "exact":
        return ExactDenoiser(toy_mixture(task_dataset(cfg.task), name), noise_schedule(cfg.task))
    model = load_denoiser(name)
    model.noise_schedule = noise_schedule(cfg.task)
    return model


def build_denoiser(cfg: DictConfig) -> Denoiser:
    """The main model, wrapped with its guide only when ``guidance_scale != 1`` (the MSD exact sampler
    needs the bare exact denoiser)."""
    require(cfg.denoiser.name in DENOISERS, "denoiser.name", f"one of {DENOISERS}", cfg.denoiser.name)
    require(cfg.guide in GUIDES, "guide", f"one of {GUIDES}", cfg.guide)
    interval = cfg.guidance_interval
    require(interval is None or len(interval) == 2, "guidance_interval", "null or [sigma_lo, sigma_hi]", interval)
    dataset, names = task_dataset(cfg.task), toy_model_names(cfg)
    guided = float(cfg.guidance_scale) != 1.0
    require(not guided or dataset == "fractal" or cfg.guide == "autoguidance", "guide",
            f"'autoguidance' (or guidance_scale=1) for task.dataset={dataset}, which has no classes and so no "
            "CFG guide", cfg.guide)
    main = _toy_model(cfg, names["main"])
    if not guided:
        return main
    guide_role = "cfg_guide" if cfg.guide == "cfg" else "autoguidance_guide"
    if names[guide_role] is None:
        raise ValueError(f"guide={cfg.guide!r} needs denoiser.{guide_role}, which denoiser={cfg.denoiser.name!r} "
                         f"does not have (use denoiser=learned for autoguidance"
                         f"{', or guide=cfg' if dataset == 'fractal' else ''})")
    return GuidedDenoiser(main, _toy_model(cfg, names[guide_role]), float(cfg.guidance_scale),
                          tuple(interval) if interval is not None else None)


@dataclass
class ReferenceSampler:
    """``guidance=ddim``: integrate the PF-ODE with ``solver`` over an EDM grid of ``solver_steps`` levels."""

    solver: str
    solver_steps: int


SDI_EXACT_INVERSION_STEPS = 100
"""SDI runs with at least this many inversion steps are labelled ``sdi_exact``: their DDIM inversion is exact to
well below SDI's own fixed-point error (``eval.sdi_toy``)."""


def method_label(guidance_cfg: DictConfig) -> str:
    """The row label of a run: the guidance name, with MSD's product sampler when it is not the default
    ``product_ode`` (``msd_tweedie``, ``msd_ode``, ``msd_stable``, ``msd_exact``) and ``_common`` for MSD with common
    start noise (``msd_common``, ``msd_stable_common``, ...); ``vsd_ideal`` for VSD with the
    ideal particle model (``particle_model: ideal``); ``sdi_exact`` for SDI with a fine inversion grid
    (``inversion_steps`` ≥ :data:`SDI_EXACT_INVERSION_STEPS`)."""
    name = guidance_cfg.name
    if name == "msd":
        sampler = guidance_cfg.get("sampler", "product_ode")
        label = name if sampler == "product_ode" else f"msd_{sampler}"
        return f"{label}_common" if guidance_cfg.get("start_noise", "fresh") == "common" else label
    if name == "vsd" and guidance_cfg.get("particle_model", "residual") == "ideal":
        return "vsd_ideal"
    if name == "sdi" and guidance_cfg.get("inversion", True) and \
            int(guidance_cfg.get("inversion_steps", 10)) >= SDI_EXACT_INVERSION_STEPS:
        return "sdi_exact"
    return name


def build_reference_sampler(guidance_cfg: DictConfig) -> ReferenceSampler:
    allowed = {"name", "solver", "solver_steps"}
    unknown = sorted(set(guidance_cfg) - allowed)
    require(not unknown, "guidance (ddim) fields", f"within {sorted(allowed)}", unknown)
    require(guidance_cfg.solver in SOLVERS, "guidance.solver", f"one of {SOLVERS}", guidance_cfg.solver)
    require(guidance_cfg.solver_steps >= 1, "guidance.solver_steps", ">= 1", guidance_cfg.solver_steps)
    return ReferenceSampler(guidance_cfg.solver, int(guidance_cfg.solver_steps))


def build_guidance_from_config(cfg: DictConfig, denoiser: Denoiser) -> Guidance:
    """``build_guidance(guidance.name, denoiser=..., **other guidance fields)``; the noise schedule is the
    denoiser's (the task's)."""
    kwargs = OmegaConf.to_container(cfg.guidance, resolve=True)
    name = kwargs.pop("name")
    try:
        return build_guidance(name, denoiser=denoiser, **kwargs)
    except TypeError as error:  # an unknown guidance.<field>
        raise ValueError(f"guidance={name}: {error}") from error


@dataclass
class Toy2DSetup:
    """Everything a toy run needs; ``guidance`` is None for the reference sampler (``guidance=ddim``)."""

    denoiser: Denoiser
    guidance: Guidance | None
    reference: ReferenceSampler | None


def build_toy2d(cfg: DictConfig) -> Toy2DSetup:
    """Check the config and build the run's objects (raises ``ValueError`` naming the bad field)."""
    name = cfg.guidance.name
    require(name in guidance_names(), "guidance.name", f"one of {guidance_names()}", name)
    check_task(cfg.task)
    denoiser = build_denoiser(cfg)
    if name == REFERENCE_SAMPLER:
        return Toy2DSetup(denoiser, None, build_reference_sampler(cfg.guidance))
    return Toy2DSetup(denoiser, build_guidance_from_config(cfg, denoiser), None)

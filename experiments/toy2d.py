"""The toy 2D task: particles on a grid over the canvas, optimised by a guidance against the exact
density of ``task.dataset`` (the fractal's class ``task.target_class``, or the spiral / pinwheel; or, for
``guidance=ddim``, the PF-ODE sampling reference).

ψ = x = the particles; unconditional. The loop is :func:`experiments.distill.distill`: every
``task.metrics_every`` steps (and at the last) a row of metrics.csv records the loss and aux scalars of that
update and the NLL / in-HDR of the particles after it. The run directory receives ``particles.npz``,
``metrics.csv``, ``final.json`` and ``scatter.png``; while it runs, ``checkpoint.pt`` every
``task.checkpoint_every`` steps (the same command resumes, bitwise identical to an uninterrupted run).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from experiments.builders import Toy2DSetup, build_toy2d, method_label, noise_schedule
from experiments.checkpoint import RunCheckpoint
from experiments.distill import Outcome, distill
from experiments.figures import Canvas, DensityMap, scatter_figure
from experiments.io import write_npz
from experiments.loggers import RunLogger
from experiments.outputs import finish_run
from experiments.tasks import Task, make_optimizer, register_task
from msd.solvers import solver_evaluations, solver_step
from toy2d.datasets import target_mixture, task_dataset
from toy2d.metrics import ToyEvaluator


@functools.lru_cache(maxsize=4)
def toy_evaluator(target_class: str, n_reference: int, seed: int, hdr_mass: float,
                  dataset: str = "fractal") -> ToyEvaluator:
    """Evaluators are deterministic in their arguments: cached across the jobs of one multirun process.
    ``target_class`` selects the fractal's class; the other datasets score against their whole mixture."""
    return ToyEvaluator(target_mixture(dataset, target_class), n_reference, seed, hdr_mass)


@functools.lru_cache(maxsize=4)
def density_map(target_class: str, center: tuple[float, float], half_size: float, hdr_level: float,
                resolution: int, dataset: str = "fractal") -> DensityMap:
    return DensityMap.compute(target_mixture(dataset, target_class), Canvas(center, half_size), hdr_level, resolution)


def canvas_grid(center: tuple[float, float], half_size: float, grid_size: int) -> Tensor:
    """grid_size² points on a regular grid spanning [c − h, c + h]² (edges included), [N, 2] float32."""
    xs = torch.linspace(center[0] - half_size, center[0] + half_size, grid_size)
    ys = torch.linspace(center[1] - half_size, center[1] + half_size, grid_size)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)


@dataclass
class History:
    """Snapshots of the particles every ``save_every`` steps (and at the last)."""

    save_every: int
    snapshot_steps: list[int] = field(default_factory=list)
    snapshots: list[np.ndarray] = field(default_factory=list)

    def snapshot(self, step: int, x: Tensor, force: bool = False) -> None:
        if (force or step % self.save_every == 0) and step not in self.snapshot_steps:
            self.snapshot_steps.append(step)
            self.snapshots.append(x.detach().cpu().numpy().copy())

    def state(self) -> dict:
        """For a checkpoint (tensors and plain values)."""
        return {"snapshot_steps": list(self.snapshot_steps), "snapshots": [torch.from_numpy(s) for s in self.snapshots]}

    def restore(self, state: dict) -> None:
        self.snapshot_steps = list(state["snapshot_steps"])
        self.snapshots = [s.numpy() for s in state["snapshots"]]


@register_task("toy2d")
class Toy2DTask(Task):
    """ψ = the particles themselves ([N, 2], a grid over the canvas at step 0); unconditional."""

    objective = "nll"

    def __init__(self, cfg: DictConfig, setup: Toy2DSetup):
        task = cfg.task
        self.cfg, self.setup, self.dataset = cfg, setup, task_dataset(task)
        self.evaluator = toy_evaluator(task.target_class, int(task.eval.n_reference), int(task.eval.reference_seed),
                                       float(task.eval.hdr_mass), self.dataset)
        self.device = torch.device(cfg.device)
        self.center = (float(task.canvas.center[0]), float(task.canvas.center[1]))
        self.half_size = float(task.canvas.half_size)
        self.history = History(int(task.save_every))
        self.method, self.scale = method_label(cfg.guidance), float(cfg.guidance_scale)
        self.label = f"{self.method}/{cfg.denoiser.name}/w={self.scale:g}" + (
            f" ({self.dataset})" if self.dataset != "fractal" else "")
        self.particles = canvas_grid(self.center, self.half_size, int(task.grid_size)).to(self.device)
        self.particles.requires_grad_(setup.guidance is not None)

    @classmethod
    def build(cls, cfg: DictConfig) -> "Toy2DTask":
        return cls(cfg, build_toy2d(cfg))

    # --- the loop's interface ---------------------------------------------------------------------------------
    def render(self) -> Tensor:
        return self.particles

    def after_step(self, step: int, last: bool) -> None:
        self.history.snapshot(step, self.particles, force=last)

    def evaluate(self, final: bool) -> dict[str, float]:
        return self.evaluator(self.particles)

    def state_dict(self) -> dict:
        return {"particles": self.particles.detach(), "history": self.history.state()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.particles.copy_(state["particles"])
        self.history.restore(state["history"])

    # --- the run ----------------------------------------------------------------------------------------------
    def run(self, run_dir: Path, logger: RunLogger, checkpoint: RunCheckpoint) -> dict:
        """Optimise (resuming from ``checkpoint``) or, for ``guidance=ddim``, sample the reference (a few ms: it
        simply reruns); write particles.npz, metrics.csv, scatter.png, final.json."""
        start = time.perf_counter()
        cfg, task = self.cfg, self.cfg.task
        generator = torch.Generator(self.device).manual_seed(int(cfg.seed))
        if self.setup.guidance is None:
            outcome = self.sample_reference(generator, logger)
        else:
            self.history.snapshot(0, self.particles)
            optimizer = make_optimizer([self.particles], task.optimizer)
            outcome = distill(self, self.setup.guidance, optimizer, generator, checkpoint, logger,
                              steps=int(task.steps), log_every=int(task.metrics_every),
                              eval_every=int(task.metrics_every), progress_bar=bool(task.progress_bar),
                              label=self.label)
        final = {
            "method": self.method,
            "denoiser": cfg.denoiser.name,
            "guide": cfg.guide if self.scale != 1.0 else "none",
            "guidance_scale": self.scale,
            "seed": int(cfg.seed),
            **self.evaluator(outcome.x),
            "steps": outcome.steps,
            "nfe": outcome.evals,
            "seconds": round(outcome.seconds, 3),
            "particles": int(outcome.x.shape[0]),
            "hdr_level": self.evaluator.hdr_level,
            "reference_nll": self.evaluator.entropy,
        }
        particles = outcome.x.cpu().numpy()
        write_npz(run_dir / "particles.npz", particles=particles, trajectory=np.stack(self.history.snapshots),
                  trajectory_steps=np.array(self.history.snapshot_steps))
        density = density_map(task.target_class, self.center, self.half_size, self.evaluator.hdr_level,
                              int(task.figure.resolution), self.dataset)
        figure = scatter_figure(density, particles, f"{self.label}: NLL {final['nll']:.2f}, "
                                f"in-HDR {final['in_hdr']:.2f}")
        return finish_run(run_dir, final, outcome.rows, "scatter", figure, logger, start)

    def sample_reference(self, generator: torch.Generator, logger: RunLogger) -> Outcome:
        """``guidance=ddim``: PF-ODE samples from σ_max noise (``msd.solvers.solver_step`` down the EDM grid),
        every level saved."""
        reference, denoiser = self.setup.reference, self.setup.denoiser
        n = int(self.cfg.task.grid_size) ** 2
        sigmas = [float(s) for s in noise_schedule(self.cfg.task).grid(reference.solver_steps)]
        x = sigmas[0] * torch.randn(n, 2, generator=generator, device=generator.device)
        self.history.snapshot(0, x, force=True)
        tic = time.perf_counter()
        with torch.no_grad():
            for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:]), start=1):
                x = solver_step(denoiser, x, sigma, sigma_next, reference.solver)
                self.history.snapshot(i, x, force=True)
        seconds = time.perf_counter() - tic
        steps = len(sigmas) - 1
        nfe = float(solver_evaluations(steps, reference.solver) * denoiser.evaluations_per_call)
        row = {"step": steps, "nfe": nfe, **self.evaluator(x)}
        logger.log_scalars(row, step=steps)
        return Outcome(x, steps, seconds, nfe, [row])

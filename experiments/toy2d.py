"""Toy 2D driver: particles on a grid over the canvas, optimised by a guidance against the exact
density of ``task.dataset`` (the fractal's class ``task.target_class``, or the spiral / pinwheel; or, for
``guidance=ddim``, the PF-ODE sampling reference).

Per step k: ``out = guidance(x, k, generator)``; ``L = ½‖x − sg(out.target)‖²`` (mean over particles);
one optimiser step; stop early when ``guidance.should_stop(k)``. Every ``task.metrics_every`` steps
(and at the last) a row of metrics.csv records the loss and aux scalars of that update and the NLL /
in-HDR of the particles after it. The run directory receives ``particles.npz``, ``metrics.csv``,
``final.json`` and ``scatter.png``; while it runs, ``checkpoint.pt`` every ``task.checkpoint_every`` steps
(``experiments.checkpoint``: the same command resumes, bitwise identical to an uninterrupted run).
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
from tqdm import tqdm

from experiments.builders import ReferenceSampler, Toy2DSetup, build_toy2d, method_label, noise_schedule
from experiments.checkpoint import RunCheckpoint
from experiments.figures import Canvas, DensityMap, scatter_figure
from experiments.io import write_npz
from experiments.loggers import RunLogger
from experiments.outputs import finish_run
from msd.guidance import Guidance, target_loss
from msd.solvers import solver_evaluations, solver_step
from toy2d.datasets import target_mixture, task_dataset
from toy2d.metrics import ToyEvaluator

build = build_toy2d
"""The driver interface of ``experiments.run``: ``build(cfg) -> setup``, then
``run(cfg, setup, run_dir, logger, checkpoint)``."""


OBJECTIVE = "nll"
"""The final metric a Hydra sweep over this task optimises."""


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


def make_optimizer(params: list[Tensor], optimizer_cfg: DictConfig) -> torch.optim.Optimizer:
    if optimizer_cfg.name == "adam":
        return torch.optim.Adam(params, lr=optimizer_cfg.lr, betas=tuple(optimizer_cfg.betas))
    return torch.optim.SGD(params, lr=optimizer_cfg.lr)


@dataclass
class History:
    """Snapshots of the particles every ``save_every`` steps and the metric rows."""

    save_every: int
    snapshot_steps: list[int] = field(default_factory=list)
    snapshots: list[np.ndarray] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    def snapshot(self, step: int, x: Tensor, force: bool = False) -> None:
        if (force or step % self.save_every == 0) and step not in self.snapshot_steps:
            self.snapshot_steps.append(step)
            self.snapshots.append(x.detach().cpu().numpy().copy())

    def state(self) -> dict:
        """For a checkpoint (tensors and plain values)."""
        return {"snapshot_steps": list(self.snapshot_steps), "rows": [dict(r) for r in self.rows],
                "snapshots": [torch.from_numpy(s) for s in self.snapshots]}

    def restore(self, state: dict) -> None:
        self.snapshot_steps, self.rows = list(state["snapshot_steps"]), [dict(r) for r in state["rows"]]
        self.snapshots = [s.numpy() for s in state["snapshots"]]


@dataclass
class Outcome:
    """Final particles, steps run, loop wall time (metrics excluded), denoiser evaluations per particle."""

    particles: Tensor
    steps: int
    seconds: float
    nfe: float


def optimise(guidance: Guidance, x_init: Tensor, task: DictConfig, generator: torch.Generator,
             evaluator: ToyEvaluator, history: History, logger: RunLogger, label: str,
             checkpoint: RunCheckpoint) -> Outcome:
    """Adam (or SGD) on the particles against ``guidance``'s targets; ``seconds`` excludes the metrics.
    Every ``checkpoint.every`` steps the loop state is saved; a saved state is resumed from."""
    x = x_init.clone().requires_grad_(True)
    optimizer = make_optimizer([x], task.optimizer)
    saved = checkpoint.load()
    if saved is None:
        history.snapshot(0, x)
        history.rows.append({"step": 0, **evaluator(x)})
        seconds, nfe, done = 0.0, 0.0, 0
    else:
        with torch.no_grad():
            x.copy_(saved["particles"])
        optimizer.load_state_dict(saved["optimizer"])
        guidance.load_state_dict(saved["guidance"])
        generator.set_state(saved["generator"])
        history.restore(saved["history"])
        seconds, nfe, done = saved["seconds"], saved["nfe"], saved["step"]
        print(f"resuming {label} from step {done} ({checkpoint.path})", flush=True)
    with tqdm(total=task.steps, initial=done, desc=label, disable=not task.progress_bar, mininterval=1.0) as bar:
        for step in range(done, task.steps):
            if guidance.should_stop(step):
                break
            tic = time.perf_counter()
            out = guidance(x.detach(), step, generator)
            loss = target_loss(x, out.target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seconds += time.perf_counter() - tic
            loss_value = loss.item()
            done, nfe = step + 1, nfe + out.aux.get("nfe", 0.0)
            last = done == task.steps or guidance.should_stop(done)
            history.snapshot(done, x, force=last)
            if done % task.metrics_every == 0 or last:
                row = {"step": done, "loss": loss_value, **out.aux, **evaluator(x)}
                history.rows.append(row)
                logger.log_scalars(row, step=done)
            if checkpoint.due(done) and not last:
                checkpoint.save(done, {"particles": x.detach(), "optimizer": optimizer.state_dict(),
                                       "guidance": guidance.state_dict(), "generator": generator.get_state(),
                                       "history": history.state(), "seconds": seconds, "nfe": nfe})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4g}", refresh=False)
    return Outcome(x.detach(), done, seconds, nfe)


def sample_reference(denoiser, reference: ReferenceSampler, n: int, task: DictConfig,
                     generator: torch.Generator, evaluator: ToyEvaluator, history: History,
                     logger: RunLogger) -> Outcome:
    """PF-ODE samples from σ_max noise (``msd.solvers.solver_step`` down the EDM grid), every level saved."""
    sigmas = [float(s) for s in noise_schedule(task).grid(reference.solver_steps)]
    x = sigmas[0] * torch.randn(n, 2, generator=generator, device=generator.device)
    history.snapshot(0, x, force=True)
    tic = time.perf_counter()
    with torch.no_grad():
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:]), start=1):
            x = solver_step(denoiser, x, sigma, sigma_next, reference.solver)
            history.snapshot(i, x, force=True)
    seconds = time.perf_counter() - tic
    steps = len(sigmas) - 1
    nfe = float(solver_evaluations(steps, reference.solver) * denoiser.evaluations_per_call)
    row = {"step": steps, "nfe": nfe, **evaluator(x)}
    history.rows.append(row)
    logger.log_scalars(row, step=steps)
    return Outcome(x, steps, seconds, nfe)


def run(cfg: DictConfig, setup: Toy2DSetup, run_dir: Path, logger: RunLogger, checkpoint: RunCheckpoint) -> dict:
    """Run one toy experiment and write its outputs into ``run_dir``; returns the final metrics. The particle
    optimisation resumes from ``checkpoint``; the reference sampler (a few ms) simply reruns."""
    start = time.perf_counter()
    task = cfg.task
    dataset = task_dataset(task)
    evaluator = toy_evaluator(task.target_class, int(task.eval.n_reference), int(task.eval.reference_seed),
                              float(task.eval.hdr_mass), dataset)
    device = torch.device(cfg.device)
    generator = torch.Generator(device).manual_seed(int(cfg.seed))
    center, half_size = (float(task.canvas.center[0]), float(task.canvas.center[1])), float(task.canvas.half_size)
    history = History(int(task.save_every))
    method, scale = method_label(cfg.guidance), float(cfg.guidance_scale)
    label = f"{method}/{cfg.denoiser.name}/w={scale:g}" + (f" ({dataset})" if dataset != "fractal" else "")
    if setup.guidance is None:
        outcome = sample_reference(setup.denoiser, setup.reference, task.grid_size**2, task, generator,
                                   evaluator, history, logger)
    else:
        x_init = canvas_grid(center, half_size, int(task.grid_size)).to(device)
        outcome = optimise(setup.guidance, x_init, task, generator, evaluator, history, logger, label, checkpoint)
    final = {
        "method": method,
        "denoiser": cfg.denoiser.name,
        "guide": cfg.guide if scale != 1.0 else "none",
        "guidance_scale": scale,
        "seed": int(cfg.seed),
        **evaluator(outcome.particles),
        "steps": outcome.steps,
        "nfe": outcome.nfe,
        "seconds": round(outcome.seconds, 3),
        "particles": int(outcome.particles.shape[0]),
        "hdr_level": evaluator.hdr_level,
        "reference_nll": evaluator.entropy,
    }
    write_npz(run_dir / "particles.npz", particles=outcome.particles.cpu().numpy(),
              trajectory=np.stack(history.snapshots), trajectory_steps=np.array(history.snapshot_steps))
    density = density_map(task.target_class, center, half_size, evaluator.hdr_level, int(task.figure.resolution),
                          dataset)
    figure = scatter_figure(density, outcome.particles.cpu().numpy(), f"{label}: NLL {final['nll']:.2f}, "
                            f"in-HDR {final['in_hdr']:.2f}")
    return finish_run(run_dir, final, history.rows, "scatter", figure, logger, start)

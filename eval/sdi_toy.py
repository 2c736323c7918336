"""SDI checked exactly on the toy: does SDI with an exact DDIM inversion reproduce DDIM's samples, and if not, why?

SDI (Lukoianov et al. 2024) reads DDIM (η = 0) as score distillation: a DDIM step from level σ' to σ maps the
clean estimate x = D(z_σ', σ') to the next one ``D(x + σ κ, σ)`` with κ the noise the trajectory carries;
SDI replaces κ by the DDIM inversion of x, ``z_σ = Inv_σ(x)`` (x inverted from σ = 0 up to σ), and anneals
σ from high to low. That equals DDIM if and only if ``Inv_σ(D(z_σ, σ)) = z_σ`` along DDIM trajectories, i.e. if
the PF-ODE from z_σ ended at its own one-step estimate D(z_σ, σ). Everything here uses the exact class-A
denoiser (``toy2d.ExactDenoiser``), no guidance, the toy's EDM schedule; parts of ``results/toy2d/sdi_exact.csv``
(long format: part, variant, inversion_steps, t, sigma, step, quantity, value):

* ``round_trip``: 1024 exact samples x of p (``exact_samples``) and 256 points on a grid over the canvas
  (``canvas_points``, mostly off the data like SDI's particles), inverted on SDI's grid (``inversion_steps`` n equal steps of
  schedule time from 0 to t, the first from σ = 0 queried at its upper level, as ``baselines.sdi``) and
  integrated back down the same levels with DDIM (Euler): ``round_trip_median`` / ``_q90`` = ‖back − x‖. Also
  the fixed-point residual of SDI itself, ``fixed_point_median`` / ``_q90`` = ‖D(Inv_σ(x), σ) − x‖ (0 for
  every x if exact samples were SDI's fixed points), and ``target_spread`` = rms distance of the targets
  D(Inv_σ(x), σ) to their mean (``data_spread``: the same for x).
* ``premise``: 1024 DDIM trajectories (Heun, the toy's 32-level EDM grid from σ_max noise); at each level,
  ``noise_error_median`` = median ‖Inv_σ(D(z_σ, σ)) − z_σ‖ / σ (SDI's κ against the trajectory's, in units
  of the noise; a standard 2D normal has norm ≈ 1.25) with n = 200, and ``estimate_to_sample_median`` =
  median ‖D(z_σ, σ) − x_0‖, x_0 the trajectory's end.
* ``run`` / ``final``: SDI from the toy's start (a 32 × 32 grid over the canvas, 1024 particles), 150 steps,
  t linear 0.98 → 0.02 (the preset), n ∈ {10, 50, 200}, with the toy's Adam (lr 0.08) on ½‖x − sg(y)‖²
  (``adam``) and with ``x ← y`` at every step (``assign``: the literal DDIM reading, each step the new clean
  estimate; n ∈ {10, 200}). ``run`` rows every 5 steps: σ, ``x_spread`` / ``target_spread`` (rms distance to the mean),
  ``grad_norm`` (mean ‖y − x‖), ``in_hdr``. ``final`` rows: nll, nll_median, in_hdr (``toy2d.metrics``,
  the grid's evaluator) and precision, recall, mmd, mode_distance (``ModeMetrics``), also for ``ddim`` (1024
  Heun samples of the same denoiser, the toy's reference sampler) and ``exact`` (1024 exact samples: the
  metrics' floor at this N).

``python -m eval.sdi_toy`` writes ``results/toy2d/sdi_exact.csv`` and ``sdi_exact.png`` (the final particles and
the spread over the run) and prints its runtime (about 4 minutes on one idle thread; 12 under a load of 7).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor

from baselines.sdi import SDIGuidance
from experiments.figures import Canvas, DensityMap, draw_particles
from experiments.io import save_figure, write_csv
from experiments.toy2d import canvas_grid
from msd.denoiser import as_sigma
from msd.guidance import target_loss
from msd.schedules import EDMSchedule
from msd.solvers import ddim_invert, sample
from toy2d import ExactDenoiser, fractal_gmm
from toy2d.metrics import ToyEvaluator, class_mode_metrics

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results" / "toy2d"
CANVAS_CENTER, CANVAS_HALF = (0.3, 0.3), 1.2
STEPS, LR = 150, 0.08
INVERSION_STEPS = (10, 50, 200)
ROUND_TRIP_TIMES = (0.1, 0.3, 0.6, 0.98)
PREMISE_STEPS = 200
COLUMNS = ["part", "variant", "inversion_steps", "t", "sigma", "step", "quantity", "value"]


def sdi_levels(schedule: EDMSchedule, t: float, steps: int) -> Tensor:
    """SDI's inversion grid (``baselines.sdi``, uniform): 0, σ(t/n), σ(2t/n), …, σ(t) (float64)."""
    fractions = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    return torch.cat([torch.zeros(1, dtype=torch.float64), schedule.sigma(fractions * t)])


def invert(denoiser, x: Tensor, schedule: EDMSchedule, t: float, steps: int) -> Tensor:
    return ddim_invert(denoiser, x, sdi_levels(schedule, t, steps).to(x.dtype))[-1]


def spread(x: Tensor) -> float:
    """rms distance of the points to their mean."""
    return float((x - x.mean(dim=0)).pow(2).sum(dim=1).mean().sqrt())


def round_trip_rows(denoiser, mixture, schedule: EDMSchedule, n: int = 1024, n_canvas: int = 256) -> list[dict]:
    samples = mixture.sample(n, generator=torch.Generator().manual_seed(0)).double()
    canvas = canvas_grid(CANVAS_CENTER, CANVAS_HALF, int(round(n_canvas**0.5))).double()
    return (_round_trip(denoiser, samples, schedule, "exact_samples")
            + _round_trip(denoiser, canvas, schedule, "canvas_points"))


def _round_trip(denoiser, x: Tensor, schedule: EDMSchedule, variant: str) -> list[dict]:
    rows = []
    for t in ROUND_TRIP_TIMES:
        for steps in INVERSION_STEPS:
            levels = sdi_levels(schedule, t, steps)
            z = ddim_invert(denoiser, x, levels)[-1]
            back = sample(denoiser, z, levels.flip(0))
            error = (back - x).norm(dim=1)
            target = denoiser.denoise(z, as_sigma(float(levels[-1]), z))
            residual = (target - x).norm(dim=1)
            values = {"round_trip_median": error.median(), "round_trip_q90": error.quantile(0.9),
                      "fixed_point_median": residual.median(), "fixed_point_q90": residual.quantile(0.9),
                      "target_spread": spread(target), "data_spread": spread(x)}
            rows += [dict(part="round_trip", variant=variant, inversion_steps=steps, t=t,
                          sigma=float(levels[-1]), step=np.nan, quantity=k, value=float(v)) for k, v in values.items()]
    return rows


def premise_rows(denoiser, schedule: EDMSchedule, n: int = 1024, solver_steps: int = 32) -> list[dict]:
    sigmas = schedule.grid(solver_steps)
    z = float(sigmas[0]) * torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    trajectory = [z]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        trajectory.append(sample(denoiser, trajectory[-1], torch.stack([sigma, sigma_next]), "heun"))
    end = trajectory[-1]
    rows = []
    for z_level, sigma in zip(trajectory[:-1:3], sigmas[:-1:3]):
        sigma = float(sigma)
        estimate = denoiser.denoise(z_level, as_sigma(sigma, z_level))
        t = float(schedule.time(torch.tensor(sigma, dtype=torch.float64)))
        recovered = invert(denoiser, estimate, schedule, t, PREMISE_STEPS)
        values = {"noise_error_median": ((recovered - z_level).norm(dim=1) / sigma).median(),
                  "estimate_to_sample_median": (estimate - end).norm(dim=1).median(),
                  "estimate_spread": spread(estimate)}
        rows += [dict(part="premise", variant="ddim_trajectories", inversion_steps=PREMISE_STEPS, t=t, sigma=sigma,
                      step=np.nan, quantity=k, value=float(v)) for k, v in values.items()]
    return rows


def run_sdi(denoiser, steps: int, mode: str, evaluator: ToyEvaluator, grid_size: int,
            seed: int = 0) -> tuple[Tensor, list[dict]]:
    """One SDI run from the canvas grid (module docstring); returns the final particles and the ``run`` rows."""
    guidance = SDIGuidance(denoiser, inversion_steps=steps, timestep_mode="linear", t_min=0.02, t_max=0.98,
                           total_steps=STEPS)
    generator = torch.Generator().manual_seed(seed)
    x = canvas_grid(CANVAS_CENTER, CANVAS_HALF, grid_size).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=LR) if mode == "adam" else None
    rows = []
    for step in range(STEPS):
        out = guidance(x.detach(), step, generator)
        if step % 5 == 0 or step == STEPS - 1:
            values = {"x_spread": spread(x.detach()), "target_spread": spread(out.target),
                      "grad_norm": out.aux["grad_norm"], "in_hdr": evaluator(x.detach())["in_hdr"]}
            rows += [dict(part="run", variant=mode, inversion_steps=steps, t=np.nan, sigma=out.aux["sigma"], step=step,
                          quantity=k, value=float(v)) for k, v in values.items()]
        if optimizer is None:
            x = out.target.clone().requires_grad_(True)
        else:
            loss = target_loss(x, out.target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return x.detach(), rows


def final_rows(variant: str, steps: int | float, x: Tensor, evaluator: ToyEvaluator, modes) -> list[dict]:
    values = {**evaluator(x), **modes(x)}
    return [dict(part="final", variant=variant, inversion_steps=steps, t=np.nan, sigma=np.nan, step=STEPS,
                 quantity=k, value=float(v)) for k, v in values.items()]


def figure(finals: dict[str, np.ndarray], table: pd.DataFrame, mixture, hdr_level: float) -> Figure:
    """Final particles per variant over the class-A density, then the particle spread over the runs."""
    density = DensityMap.compute(mixture, Canvas(CANVAS_CENTER, CANVAS_HALF), hdr_level, 192)
    fig = Figure(figsize=(2.4 * (len(finals) + 1), 2.7))
    axes = fig.subplots(1, len(finals) + 1)
    for ax, (label, particles) in zip(axes, finals.items()):
        draw_particles(ax, density, particles, label)
        ax.title.set_fontsize(8)
    ax = axes[-1]
    runs = table[(table.part == "run") & (table.quantity == "x_spread")]
    for (variant, steps), group in runs.groupby(["variant", "inversion_steps"]):
        ax.semilogy(group.step, group.value, ls="-" if variant == "adam" else "--", label=f"{variant} n={steps:g}")
    ax.set_xlabel("step (σ: 4.5 → 0.0025)", fontsize=8)
    ax.set_ylabel("particle spread (rms)", fontsize=8)
    ax.legend(fontsize=6)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--grid-size", type=int, default=32, help="particles per canvas side (default 32)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    mixture = fractal_gmm("A")
    denoiser, schedule = ExactDenoiser(mixture), EDMSchedule(0.002, 5.0, 7.0)
    evaluator, modes = ToyEvaluator(mixture, 200_000, 0, 0.95), class_mode_metrics("A")
    rows = round_trip_rows(denoiser, mixture, schedule) + premise_rows(denoiser, schedule)
    print(f"round trip and premise: {time.perf_counter() - start:.1f} s", flush=True)
    n = args.grid_size**2
    generator = torch.Generator().manual_seed(2)
    ddim = sample(denoiser, 5.0 * torch.randn(n, 2, generator=generator), schedule.grid(32), "heun")
    exact = mixture.sample(n, generator=generator)
    rows += final_rows("ddim", np.nan, ddim, evaluator, modes) + final_rows("exact", np.nan, exact, evaluator, modes)
    finals = {"DDIM (Heun 32)": ddim.numpy()}
    for mode in ("adam", "assign"):
        for steps in INVERSION_STEPS if mode == "adam" else (10, 200):
            tic = time.perf_counter()
            x, run = run_sdi(denoiser, steps, mode, evaluator, args.grid_size)
            rows += run + final_rows(mode, steps, x, evaluator, modes)
            if steps in (10, 200):
                finals[f"SDI {mode}, n={steps}"] = x.numpy()
            print(f"sdi {mode} n={steps}: {time.perf_counter() - tic:.1f} s", flush=True)
    table = pd.DataFrame(rows, columns=COLUMNS)
    write_csv(args.results_dir / "sdi_exact.csv", table)
    save_figure(args.results_dir / "sdi_exact.png", figure(finals, table, mixture, evaluator.hdr_level))
    summary = table[table.part == "final"].pivot_table(index=["variant", "inversion_steps"], columns="quantity",
                                                        values="value", dropna=False)
    print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

"""What MSD and the inversion-based methods do on ShapesWorld images, measured (issue 12, README "MSD on images").

``python -m eval.msd_images`` writes into ``results/table4/shapes/``:

* ``msd_scales.csv`` — the bandwidth rule in image units, from true renders alone (12 prompts × 32 renders,
  per-coordinate units of pixels in [−1, 1], d = 3·32·32): two equal modes at Euclidean distance D give a
  bimodal ``p ∗ G_λ`` along their segment iff λ < D/2, so ``lambda0`` = half the median distance between two
  renders of the same prompt (above it a prompt's modes merge into one basin: the optimisation starts from the
  prompt's single smoothed mode, as the toy's √0.1 spans its fractal) and ``lambda_min`` = half the median
  distance between a render and its one-pixel shift (below it every position is its own basin); also the
  nearest other prompt's scale and the distance of the generator's initial images (the table-4 MLPs) to the
  nearest clean render of their prompt.
* ``msd_drift.csv`` — per λ and starting point (initial MLP images; true renders), the mean-shift drift
  ``‖D(x, λ) − x‖/√d`` (RMS per pixel; = λ²‖∇log p_λ(x)‖/√d for the ideal model) against the spread of single
  product samples around their mean (RMS per pixel over 4 product_ode samples, t2d_msd's sampler) — the signal
  and the noise an Adam step sees with N = 1 — and the eq. 15 sampler's ``RMS(y − x)`` on the same x under both
  readings of its inversion scale (the sampling model's own w, which retraces; SDI's mirrored 2 − w).
* ``inversion.csv`` — DDIM inversion of true renders to t then DDIM back on the same grid (round-trip RMS per
  pixel) against steps and w, with and without the prior's clean-estimate range; and the range of SDI targets
  (official global grid, mirrored inversion scale) on true renders at several t, with and without it.
* ``msd_targets.png`` — for three prompts: x, the tweedie target D(x, λ) and two product samples at λ0,
  (λ0 + λ_min)/2 and λ_min, from an initial MLP image and from a true render.

Single thread, ~10 minutes on this CPU.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from baselines.sdi import SDIGuidance
from experiments.io import save_figure, write_csv
from msd.denoiser import as_sigma
from msd.mean_shift import MSDGuidance
from msd.paths import REPO_ROOT
from msd.priors import load_prior
from msd.solvers import ddim_invert, sample
from shapes.metrics import mode_alignment_distance
from shapes.world import PROMPTS, ShapeParams, render_params, sample_world

OUT_DIR = REPO_ROOT / "results" / "table4" / "shapes"
RENDERS_PER_PROMPT = 32
SCALE = 4.0  # the table-4 CFG scale
DRIFT_LAMBDAS = (0.3, 1.0, 3.1, 6.2, 12.2)
PRODUCT_SAMPLES = 4
INVERSION_STEPS = (10, 50, 200)
INVERSION_TIMES = (0.5, 0.98)
SDI_TIMES = (0.2, 0.5, 0.8, 0.98)


def renders(per_prompt: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str], ShapeParams]:
    """``per_prompt`` true renders of each of the 12 prompts (prompt-major), their ids, prompts and parameters."""
    ids = torch.arange(len(PROMPTS)).repeat_interleave(per_prompt)
    images, params = sample_world(len(ids), torch.Generator().manual_seed(seed), prompts=ids, resolution=32)
    return images, ids, [PROMPTS[int(i)] for i in ids], params


def table4_config():
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base=None):
        return compose("config", overrides=["experiment=table4_shapes", "guidance=t2d_msd", "logger=none"])


def initial_images(cfg, prior, prompts: list[str]) -> torch.Tensor:
    """The table-4 generator's images at iteration 0 (seed 0), one per prompt."""
    from experiments.text2d import build_generator

    generator = build_generator(cfg, prior, len(prompts), torch.Generator().manual_seed(int(cfg.seed)))
    with torch.no_grad():
        return generator().clamp(-1, 1)


def product_sampler(cfg, prior, denoiser) -> MSDGuidance:
    """t2d_msd's product sampler (its sampler, solver, grid and start) on ``denoiser``, one sample per call."""
    msd_cfg = OmegaConf.to_container(cfg.guidance, resolve=True)
    return MSDGuidance(denoiser, sampler=msd_cfg["sampler"], solver=msd_cfg["solver"],
                       solver_steps=msd_cfg["solver_steps"], start_factor=msd_cfg["start_factor"],
                       noise_schedule=prior.schedule)


def scales(cfg, prior) -> pd.DataFrame:
    images, ids, prompts, params = renders(RENDERS_PER_PROMPT, seed=0)
    d = images[0].numel()
    flat = images.flatten(1)
    dist = torch.cdist(flat, flat)
    same = ids[:, None] == ids[None, :]
    other = dist.masked_fill(same, math.inf).min(1).values
    pair = dist[same & ~torch.eye(len(ids), dtype=torch.bool)]
    shifted = render_params(replace(params, centre=params.centre + torch.tensor([1 / 32, 0.0])), 32)
    one_pixel = (shifted - images).flatten(1).norm(dim=1)
    init = initial_images(cfg, prior, list(PROMPTS))
    init_distance = mode_alignment_distance(init, torch.arange(len(PROMPTS))) * math.sqrt(d)
    rows = [("dimension", d), ("same_prompt_pair_distance_median", pair.median()),
            ("nearest_other_prompt_distance_median", other.median()), ("one_pixel_shift_distance_median",
                                                                        one_pixel.median()),
            ("initial_image_distance_to_nearest_render_median", init_distance.median()),
            ("lambda0", pair.median() / 2), ("lambda_min", one_pixel.median() / 2),
            ("lambda_merge_nearest_other_prompt", other.median() / 2)]
    return pd.DataFrame([{"quantity": k, "value": float(v)} for k, v in rows])


def drift(cfg, prior) -> pd.DataFrame:
    images, _, _, _ = renders(1, seed=1)
    prompts = list(PROMPTS)
    starts = {"initial": initial_images(cfg, prior, prompts), "render": images}
    denoiser = prior.denoiser(SCALE).condition(prior.conditioning(prompts))
    d = images[0].numel()
    product = product_sampler(cfg, prior, denoiser)
    rows = []
    for kind, x in starts.items():
        for lam in DRIFT_LAMBDAS:
            generator = torch.Generator().manual_seed(2)
            with torch.no_grad():
                tweedie = denoiser.denoise(x, as_sigma(lam, x))
                draws = torch.cat([product.product_samples(x, lam, generator) for _ in range(PRODUCT_SAMPLES)])
                row = {"start": kind, "lambda": lam,
                       "drift_rms": float((tweedie - x).flatten(1).norm(dim=1).mean() / math.sqrt(d)),
                       "sample_spread_rms": float((draws - draws.mean(0)).pow(2).mean().sqrt()
                                                  * math.sqrt(PRODUCT_SAMPLES / (PRODUCT_SAMPLES - 1))),
                       "sample_to_x_rms": float((draws - x).pow(2).mean().sqrt())}
                for reading, inversion_scale in (("same_model", None), ("mirrored", 2.0 - SCALE)):
                    stable = MSDGuidance(denoiser, sampler="stable", solver="euler", solver_steps=6,
                                         inversion_scale=inversion_scale, noise_schedule=prior.schedule)
                    y = stable.product_samples(x, lam, generator)[0]
                    row[f"stable_{reading}_rms"] = float((y - x).pow(2).mean().sqrt())
            row["drift_over_spread"] = row["drift_rms"] / row["sample_spread_rms"]
            rows.append(row)
            print(row, flush=True)
    return pd.DataFrame(rows)


def inversion(prior) -> pd.DataFrame:
    images, _, _, _ = renders(1, seed=1)
    prompts = list(PROMPTS)
    saved_range, rows = prior.clean_range, []
    for clipped in (True, False):
        prior.clean_range = saved_range if clipped else None
        for w in (1.0, SCALE):
            denoiser = prior.denoiser(w).condition(prior.conditioning(prompts))
            for t in INVERSION_TIMES:
                for steps in INVERSION_STEPS:
                    levels = prior.schedule.sigma(torch.linspace(0, t, steps + 1, dtype=torch.float64))
                    levels[0] = 0.0
                    with torch.no_grad():
                        z = ddim_invert(denoiser, images, levels.float())[-1]
                        back = sample(denoiser, z, levels.flip(0))
                    rows.append({"what": "round_trip", "clean_range": clipped, "w": w, "t": t, "steps": steps,
                                 "rms": float((back - images).pow(2).mean().sqrt()),
                                 "min": float(back.min()), "max": float(back.max())})
                    print(rows[-1], flush=True)
        guided = prior.denoiser(SCALE).condition(prior.conditioning(prompts))
        for t in SDI_TIMES:
            sdi = SDIGuidance(guided, noise_schedule=prior.schedule, t_min=t, t_max=t, inversion_grid="global",
                              inversion_scale=2.0 - SCALE, eta=0.3)
            out = sdi(images, 0, torch.Generator().manual_seed(3))
            rows.append({"what": "sdi_target", "clean_range": clipped, "w": SCALE, "t": t,
                         "steps": len(sdi.global_grid(t)) - 1, "rms": float((out.target - images).pow(2).mean().sqrt()),
                         "min": float(out.target.min()), "max": float(out.target.max())})
            print(rows[-1], flush=True)
    prior.clean_range = saved_range
    return pd.DataFrame(rows)


def targets_figure(cfg, prior, lam0: float, lam_min: float) -> Figure:
    chosen = [0, 5, 10]
    prompts = [PROMPTS[i] for i in chosen]
    images, _, _, _ = renders(1, seed=1)
    starts = {"initial MLP image": initial_images(cfg, prior, list(PROMPTS))[chosen], "true render": images[chosen]}
    denoiser = prior.denoiser(SCALE).condition(prior.conditioning(prompts))
    product = product_sampler(cfg, prior, denoiser)
    lambdas = (lam0, (lam0 + lam_min) / 2, lam_min)
    columns = 1 + 3 * len(lambdas)
    figure = Figure(figsize=(0.95 * columns + 1.2, 0.95 * len(chosen) * len(starts) + 0.6))
    axes = figure.subplots(len(chosen) * len(starts), columns, squeeze=False)
    generator = torch.Generator().manual_seed(4)
    for s, (kind, x) in enumerate(starts.items()):
        panels = [("x", x)]
        with torch.no_grad():
            for lam in lambdas:
                panels.append((f"D(x,{lam:.2g})", denoiser.denoise(x, as_sigma(lam, x))))
                draws = [product.product_samples(x, lam, generator)[0] for _ in range(2)]
                panels += [(f"y~ṗ λ={lam:.2g}", draws[0]), (f"y~ṗ λ={lam:.2g}", draws[1])]
        for r in range(len(chosen)):
            row = s * len(chosen) + r
            for c, (title, batch) in enumerate(panels):
                ax = axes[row, c]
                ax.imshow(((batch[r].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(), interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if row == 0:
                    ax.set_title(title, fontsize=6)
            axes[row, 0].set_ylabel(f"{kind}\n{prompts[r]}", fontsize=6, rotation=0, ha="right", va="center")
    figure.suptitle("MSD's targets on ShapesWorld: tweedie D(x, λ) and product samples y ~ p(y)G_λ(x − y) "
                    f"(w = {SCALE:g}, t2d_msd's sampler)", fontsize=8)
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    cfg = table4_config()
    prior = load_prior("shapes", device="cpu")
    scale_table = scales(cfg, prior)
    write_csv(args.out / "msd_scales.csv", scale_table)
    print(scale_table.to_string(index=False), flush=True)
    values = dict(zip(scale_table.quantity, scale_table.value))
    save_figure(args.out / "msd_targets.png", targets_figure(cfg, prior, values["lambda0"], values["lambda_min"]))
    write_csv(args.out / "msd_drift.csv", drift(cfg, prior))
    write_csv(args.out / "inversion.csv", inversion(prior))
    print(f"msd_images: {time.perf_counter() - start:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()

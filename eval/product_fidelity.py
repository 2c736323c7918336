"""Product-sampler fidelity: how well each MSD sampler samples ``ṗ(y|x) ∝ p(y) G_λ(x − y)``, per evaluation.

``python -m eval.product_fidelity`` writes ``results/toy2d/product_fidelity.csv`` (one row per denoiser ×
λ × sampler variant × centre), ``product_fidelity_summary.csv`` (means over centres, the default chosen) and
``product_fidelity.png``; it prints the chosen default and its runtime.

Set-up (fixed seeds): the class-A fractal mixture; 8 centres x — 4 canvas points (the toy canvas is
centred at (0.3, 0.3) with half-size 1.2; we take (0.3 ± 0.6, 0.3 ± 0.6)) and 4 points near the branches
(exact samples of p_A ∗ N(0, 0.05²)); λ ∈ {√0.1, 0.1, 0.03, 0.01}; 2000 samples per centre and variant.
Reference: 2000 exact samples of ṗ (the product of a Gaussian mixture and a Gaussian is a Gaussian
mixture, ``GaussianMixture.product_sample``); a second independent exact set gives each metric's floor
(row ``exact``). Columns:

* ``mmd``: biased MMD² (V-statistic) with the mean of RBF kernels of bandwidths 0.02, 0.05, 0.1
  (``toy2d.metrics.mmd_rbf``); ``energy``: the energy distance ``2E‖X−Y‖ − E‖X−X′‖ − E‖Y−Y′‖``
  (V-statistic), ``energy_rel`` = energy / λ (scale-free across bandwidths).
* ``mean_err_rel``: ‖sample mean − exact product mean‖ / λ, where the exact product mean is the exact mean
  shift target ``x + λ²∇log p_λ(x)``; ``std_ratio``: sample std / exact std (averaged over both axes) —
  a sampler that forgets its noise has std_ratio ≈ 0.
* ``tweedie_err_rel``: ‖sample mean − D(x, λ)‖ / λ with D the denoiser used (guided or not): for the
  guided rows (CFG, class-AB guide, w = 4) no exact product sampler of the guided density exists, so
  they are scored only against this target.
* ``nfe``: network evaluations per sample (CFG counts 2 per call).

Variants: ``product_ode`` (the product distribution's PF-ODE, msd.mean_shift.ProductDenoiser) with Euler
(4–64 steps), Heun (3–33 levels) and stochastic DDIM η = 1 (8–64 steps); ``tweedie`` (D(x, λ), one call);
the paper-literal ``ode`` (eq. 12) and ``stable`` (eq. 15) with both kernel-time conventions
(``sigma_sq_half``, ``timestep``), 32 steps.

The default (``conf/guidance/msd.yaml``) is chosen by a rule fixed before any toy run: among the
``product_ode`` variants, with the exact denoiser, the one with the fewest evaluations per sample whose
centre-mean MMD is within ``FAITHFUL_FACTOR`` × the exact-vs-exact floor at every λ (ties: lower mean MMD).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from experiments.io import save_figure, write_csv
from msd.denoiser import Denoiser, GuidedDenoiser, as_sigma
from msd.mean_shift import MSDGuidance
from msd.paths import REPO_ROOT
from msd.schedules import EDMSchedule
from toy2d import ExactDenoiser, fractal_gmm, load_denoiser
from toy2d.metrics import mmd_rbf

OUT_DIR = REPO_ROOT / "results" / "toy2d"
LAMBDAS = (math.sqrt(0.1), 0.1, 0.03, 0.01)
MMD_BANDWIDTHS = (0.02, 0.05, 0.1)
N_SAMPLES = 2000
CFG_SCALE = 4.0
FAITHFUL_FACTOR = 2.0
IMAGE_NFE_BUDGET = 10
"""Evaluations per product sample the text-to-2D protocol affords (400 iterations × 48 images × 2 seeds in the
CPU budget, with CFG doubling each): the image sampler is the most faithful variant within it."""
CANVAS_CENTER, CANVAS_OFFSET = (0.3, 0.3), 0.6
BRANCH_NOISE = 0.05

START_FACTORS = (3, 10)
"""Truncated starts of the product PF-ODE: σ_s = kλ (``MSDGuidance(start_factor=k)``), Heun variants ``heun_start<k>``."""
VARIANTS = (
    [("product_ode", "euler", steps, 0.0, "sigma_sq_half") for steps in (4, 8, 16, 32, 64)]
    + [("product_ode", "heun", steps, 0.0, "sigma_sq_half") for steps in (3, 5, 9, 17, 33)]
    + [("product_ode", "euler_eta1", steps, 1.0, "sigma_sq_half") for steps in (8, 16, 32, 64)]
    + [("product_ode", f"heun_start{k}", steps, 0.0, "sigma_sq_half") for k in START_FACTORS for steps in (3, 5, 9, 17)]
    + [("tweedie", "", 1, 0.0, "sigma_sq_half")]
    + [(sampler, kernel_time, 32, 0.0, kernel_time) for sampler in ("ode", "stable")
       for kernel_time in ("sigma_sq_half", "timestep")]
)
"""(sampler, variant label, solver grid levels, η, kernel time). ``solver_steps`` counts σ levels of the EDM
grid before the final 0, so a grid of n levels takes n Euler steps (n evaluations) or 2n − 1 Heun
evaluations."""


def centres(seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """4 canvas points and 4 near-branch points (float64), with their kinds."""
    cx, cy = CANVAS_CENTER
    canvas = torch.tensor([[cx + dx, cy + dy] for dy in (-CANVAS_OFFSET, CANVAS_OFFSET)
                           for dx in (-CANVAS_OFFSET, CANVAS_OFFSET)], dtype=torch.float64)
    branch = fractal_gmm("A").sample(4, BRANCH_NOISE, generator=torch.Generator().manual_seed(seed)).double()
    return torch.cat([canvas, branch]), ["canvas"] * 4 + ["branch"] * 4


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """V-statistic energy distance 2E‖X−Y‖ − E‖X−X′‖ − E‖Y−Y′‖ (≥ 0; 0 iff equal distributions)."""
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def sampler_for(denoiser: Denoiser, sampler: str, label: str, steps: int, eta: float, kernel_time: str) -> MSDGuidance:
    """The MSD sampler of a variant label: ``euler``, ``heun``, ``euler_eta1`` or ``heun_start<k>``."""
    solver = "heun" if label.startswith("heun") else "euler"
    start_factor = float(label.removeprefix("heun_start")) if label.startswith("heun_start") else None
    return MSDGuidance(denoiser, sampler=sampler, solver=solver, solver_steps=steps, eta=eta,
                       kernel_time=kernel_time, noise_schedule=EDMSchedule(0.002, 5.0, 7.0),
                       start_factor=start_factor)


def score(samples: torch.Tensor, reference: torch.Tensor, exact_mean: torch.Tensor, tweedie: torch.Tensor,
          lam: float, with_reference: bool) -> dict[str, float]:
    """Metrics of one centre's samples [n, 2] (float64)."""
    mean = samples.mean(0)
    row = {"tweedie_err_rel": float((mean - tweedie).norm() / lam), "mmd": math.nan, "energy": math.nan,
           "energy_rel": math.nan, "mean_err_rel": math.nan, "std_ratio": math.nan}
    if with_reference:
        energy = energy_distance(samples, reference)
        row.update(mmd=mmd_rbf(samples.numpy(), reference.numpy(), MMD_BANDWIDTHS), energy=energy,
                   energy_rel=energy / lam, mean_err_rel=float((mean - exact_mean).norm() / lam),
                   std_ratio=float((samples.std(0) / reference.std(0)).mean()) if len(samples) > 1 else 0.0)
    return row


def run_study(denoisers=("exact", "learned", "exact_cfg", "learned_cfg"), lambdas=LAMBDAS, variants=VARIANTS,
              n_samples: int = N_SAMPLES, seed: int = 0) -> pd.DataFrame:
    torch.set_num_threads(1)
    mixture = fractal_gmm("A")
    x, kinds = centres(seed)
    x32 = x.float()  # the samplers run in float32, as in the toy runs; metrics in float64
    rows_x = x32.repeat_interleave(n_samples, dim=0)
    models = {"exact": ExactDenoiser(mixture), "learned": load_denoiser("A")}
    models["exact_cfg"] = GuidedDenoiser(models["exact"], ExactDenoiser(fractal_gmm("AB")), CFG_SCALE)
    models["learned_cfg"] = GuidedDenoiser(models["learned"], load_denoiser("AB"), CFG_SCALE)
    rows = []
    for den_name in denoisers:
        den = models[den_name]
        guided = den_name.endswith("_cfg")
        for lam in lambdas:
            gen = torch.Generator().manual_seed(seed + 1)
            reference = mixture.product_sample(x, lam, generator=gen, n_per_center=n_samples).transpose(0, 1)
            exact_mean = mixture.product_mean(x, lam)
            with torch.no_grad():
                tweedie = den.denoise(x32, as_sigma(lam, x32)).detach().double()
            runs = [("exact", "", 0, 0.0, "")] if den_name == "exact" else []
            runs += list(variants)
            for sampler, label, steps, eta, kernel_time in runs:
                start = time.perf_counter()
                if sampler == "exact":
                    draws = mixture.product_sample(x, lam, generator=gen, n_per_center=n_samples).transpose(0, 1)
                    nfe = 0
                else:
                    msd = sampler_for(den, sampler, label, steps, eta, kernel_time)
                    queries = x32 if sampler == "tweedie" else rows_x  # tweedie: one deterministic point per centre
                    with torch.no_grad():
                        draws = msd.product_samples(queries, lam, gen)[0].reshape(len(x), -1, 2)
                    nfe = msd.evaluations_per_estimate()
                seconds = time.perf_counter() - start
                for i, kind in enumerate(kinds):
                    rows.append({"denoiser": den_name, "lambda": lam, "sampler": sampler, "variant": label,
                                 "solver_steps": steps, "eta": eta, "nfe": nfe, "centre": i, "centre_kind": kind,
                                 "cx": float(x[i, 0]), "cy": float(x[i, 1]),
                                 **score(draws[i].double(), reference[i], exact_mean[i], tweedie[i], lam,
                                         not guided),
                                 "seconds": seconds / len(kinds)})
            print(f"{den_name} λ={lam:.4g}: {len(runs)} variants", flush=True)
    return pd.DataFrame(rows)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Means over centres per denoiser × λ × variant, with each metric's exact-vs-exact floor."""
    keys = ["denoiser", "lambda", "sampler", "variant", "solver_steps", "eta", "nfe"]
    metrics = ["mmd", "energy_rel", "mean_err_rel", "std_ratio", "tweedie_err_rel", "seconds"]
    summary = frame.groupby(keys, sort=False)[metrics].mean().reset_index()
    floor = summary[(summary.sampler == "exact") & (summary.denoiser == "exact")].set_index("lambda")["mmd"]
    summary["mmd_floor"] = summary["lambda"].map(floor)
    return summary


def choose_within_budget(summary: pd.DataFrame, budget: int = IMAGE_NFE_BUDGET) -> pd.Series:
    """The image sampler: among exact-denoiser ``product_ode`` variants of at most ``budget`` evaluations per
    sample, the lowest worst-λ MMD/floor (ties: fewer nfe)."""
    ode = summary[(summary.denoiser == "exact") & (summary.sampler == "product_ode") & (summary.nfe <= budget)].copy()
    ode["ratio"] = ode["mmd"] / ode["mmd_floor"]
    per_variant = ode.groupby(["variant", "solver_steps", "eta", "nfe"]).agg(
        worst_ratio=("ratio", "max"), mean_mmd=("mmd", "mean")).reset_index()
    return per_variant.sort_values(["worst_ratio", "nfe"]).iloc[0]


def choose_default(summary: pd.DataFrame) -> pd.Series:
    """Fewest nfe among exact-denoiser ``product_ode`` variants whose mean MMD ≤ FAITHFUL_FACTOR × floor at
    every λ (ties: lower mean MMD); if none qualifies, the variant with the lowest worst-λ MMD/floor."""
    ode = summary[(summary.denoiser == "exact") & (summary.sampler == "product_ode")].copy()
    ode["ratio"] = ode["mmd"] / ode["mmd_floor"]
    per_variant = ode.groupby(["variant", "solver_steps", "eta", "nfe"]).agg(
        worst_ratio=("ratio", "max"), mean_mmd=("mmd", "mean")).reset_index()
    faithful = per_variant[per_variant.worst_ratio <= FAITHFUL_FACTOR]
    if len(faithful):
        return faithful.sort_values(["nfe", "mean_mmd"]).iloc[0]
    return per_variant.sort_values("worst_ratio").iloc[0]


STYLE = {"euler": ("#1f77b4", "o"), "heun": ("#2ca02c", "s"), "euler_eta1": ("#9467bd", "^")}


def figure(summary: pd.DataFrame, chosen: pd.Series) -> Figure:
    """Top: MMD to exact product samples vs nfe per λ (exact denoiser). Bottom: samples at one near-branch
    centre — exact, the chosen product_ode, eq. 12 ode, and the tweedie point."""
    lambdas = sorted(summary["lambda"].unique(), reverse=True)
    fig = Figure(figsize=(3.4 * len(lambdas), 6.6))
    axes = fig.subplots(2, len(lambdas), squeeze=False)
    exact = summary[summary.denoiser == "exact"]
    learned = summary[summary.denoiser == "learned"]
    for j, lam in enumerate(lambdas):
        ax = axes[0, j]
        for label, (color, marker) in STYLE.items():
            for den, frame_den, ls in (("exact", exact, "-"), ("learned", learned, ":")):
                g = frame_den[(frame_den["lambda"] == lam) & (frame_den.variant == label)].sort_values("nfe")
                ax.plot(g.nfe, g.mmd, color=color, marker=marker, ls=ls, ms=4,
                        label=f"product_ode {label} ({den})" if j == 0 else None)
        for sampler, kernel_time, marker in (("ode", "sigma_sq_half", "x"), ("ode", "timestep", "+"),
                                             ("stable", "sigma_sq_half", "D"), ("stable", "timestep", "d"),
                                             ("tweedie", "", "*")):
            g = exact[(exact["lambda"] == lam) & (exact.sampler == sampler) & (exact.variant == kernel_time)]
            ax.scatter(g.nfe, g.mmd, color="#d62728", marker=marker, s=30,
                       label=f"{sampler} {kernel_time}".strip() if j == 0 else None)
        floor = float(exact[(exact["lambda"] == lam) & (exact.sampler == "exact")]["mmd"].iloc[0])
        ax.axhline(floor, color="k", lw=0.8, ls="--", label="exact vs exact" if j == 0 else None)
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"λ = {lam:.3g}"), ax.set_xlabel("network evaluations per sample")
        if j == 0:
            ax.set_ylabel("MMD² to exact product samples")
    axes[0, -1].legend(*axes[0, 0].get_legend_handles_labels(), fontsize=5.5, loc="upper right", ncol=2)
    x, _ = centres()
    mixture = fractal_gmm("A")
    for j, lam in enumerate(lambdas):
        ax = axes[1, j]
        gen = torch.Generator().manual_seed(7)
        centre = x[4:5]
        ex = mixture.product_sample(centre, lam, generator=gen, n_per_center=500)[:, 0]
        den = ExactDenoiser(mixture)
        msd = sampler_for(den, "product_ode", chosen.variant, int(chosen.solver_steps), float(chosen.eta),
                          "sigma_sq_half")
        ours = msd.product_samples(centre.repeat(500, 1), lam, gen)[0]
        eq12 = sampler_for(den, "ode", "sigma_sq_half", 32, 0.0, "sigma_sq_half").product_samples(
            centre.repeat(500, 1), lam, gen)[0]
        ax.scatter(ex[:, 0], ex[:, 1], s=2, color="k", alpha=0.5, label="exact ṗ")
        ax.scatter(ours[:, 0], ours[:, 1], s=2, color="#2ca02c", alpha=0.5, label="product_ode (default)")
        ax.scatter(eq12[:, 0], eq12[:, 1], s=12, color="#d62728", marker="x", label="ode (eq. 12)")
        tw = den.denoise(centre, as_sigma(lam, centre))
        ax.scatter(tw[:, 0], tw[:, 1], s=60, color="#ff7f0e", marker="*", label="tweedie D(x, λ)")
        ax.scatter(centre[:, 0], centre[:, 1], s=30, color="b", marker="+", label="x")
        shown = torch.cat([ex, centre]).double()
        mid, half = (shown.max(0).values + shown.min(0).values) / 2, float((shown.max(0).values - shown.min(0).values).max())
        half = 0.6 * half + 0.01
        ax.set_xlim(float(mid[0]) - half, float(mid[0]) + half)
        ax.set_ylim(float(mid[1]) - half, float(mid[1]) + half)
        ax.set_aspect("equal"), ax.set_title(f"samples at a near-branch x, λ = {lam:.3g}", fontsize=8)
    axes[1, 0].legend(fontsize=6, loc="lower left", markerscale=2)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--samples", type=int, default=N_SAMPLES)
    parser.add_argument("--from-csv", action="store_true",
                        help="re-summarise and redraw from the committed per-centre CSV (no sampling study)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.from_csv:
        frame = pd.read_csv(args.out / "product_fidelity.csv", keep_default_na=False, na_values=[""])
        frame["variant"] = frame["variant"].fillna("")
    else:
        frame = run_study(n_samples=args.samples)
        write_csv(args.out / "product_fidelity.csv", frame)
    summary = summarize(frame)
    chosen, image = choose_default(summary), choose_within_budget(summary)
    for column, pick in (("default", chosen), ("image_default", image)):
        summary[column] = ((summary.sampler == "product_ode") & (summary.variant == pick.variant)
                           & (summary.solver_steps == pick.solver_steps))
    write_csv(args.out / "product_fidelity_summary.csv", summary)
    save_figure(args.out / "product_fidelity.png", figure(summary, chosen))
    pd.set_option("display.width", 220)
    print(summary.drop(columns=["seconds"]).to_string(index=False, float_format="%.4g"))
    print(f"default: product_ode {chosen.variant}, {int(chosen.solver_steps)} levels, {int(chosen.nfe)} nfe "
          f"(worst MMD/floor over λ {chosen.get('worst_ratio', math.nan):.2f})")
    print(f"images (<= {IMAGE_NFE_BUDGET} nfe): product_ode {image.variant}, {int(image.solver_steps)} levels, "
          f"{int(image.nfe)} nfe (worst MMD/floor over λ {image.worst_ratio:.2f})")
    print(f"product fidelity: {time.perf_counter() - start:.1f} s -> {args.out / 'product_fidelity.csv'}")


if __name__ == "__main__":
    main()

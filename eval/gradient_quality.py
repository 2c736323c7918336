"""Gradient quality (the paper's "efficiency"): each method's update direction ``target − x`` against the
exact mean-shift vector ``m(x) = λ² ∇log p*_λ(x)`` of the kernel-smoothed class-A density
(``p*_λ = p ∗ G_λ`` is the heat-diffused density at σ = λ, so ``m = λ² · mixture.score(x, λ)``).

Set-up (all fixed seeds): queries = 256 exact class-A samples + 256 uniform points on the toy canvas
(centre (0.3, 0.3), half-size 1.2); λ ∈ {√0.1, 0.1}; denoisers: the exact mixture and the learned
class-A model, no guidance. For every method a *pool* of S independent draws of ``target − x`` is taken per
query; an estimate with N samples is the mean of a disjoint group of N draws (M = S/N repeats). Columns:

* ``cos_median`` / ``cos_mean``: cosine of one N-sample estimate to m(x), over queries and repeats.
* ``nmse`` = Σ‖est − m‖² / Σ‖m‖² over queries and repeats (raw scale).
* ``nmse_scaled``: the same after the best single scalar α (least squares over the whole query set,
  column ``scale``): SDS/VSD/SDI are not estimators of m, only of a direction, so compare them here.
* ``bias_nmse`` = Σ‖Ē − m‖² / Σ‖m‖² with Ē the pool mean (debiased by the pool's variance / S), and
  ``var_nmse`` = the per-N variance part (nmse ≈ bias_nmse + var_nmse).
* ``nfe``: denoiser evaluations per query for one N-sample estimate (the exact sampler costs 0).

Methods: MSD with the ``product_ode`` sampler (the product distribution's PF-ODE, with the solver of
``conf/guidance/msd.yaml``, the default chosen by ``eval.product_fidelity``), the deterministic ``tweedie``
target D(x, λ) (1 evaluation; exact mean shift with the ideal denoiser), the paper-literal ``ode`` (eq. 12)
and ``stable`` (eq. 15) samplers (Euler, kernel time σ²/2), each at solver steps 4–32, and the toy's
``exact`` product sampler (exact denoiser only); SDS (t ~ U[0.02, 0.98], w = σ²/(1+σ²)); SDI
(10 inversion steps, t ~ U[0.02, 0.98], not annealed); VSD with the *ideal* particle model of particles
spread uniformly over the canvas (their start): ε̂_φ is the exact ε of the uniform square noised to σ,
so ``target − x = w(σ)(ε̂_q − ε̂_p)`` (VSD's own first step is exactly 0 since ε̂_φ starts as the prior).

``python -m eval.gradient_quality`` writes results/toy2d/gradient_quality.{csv,png}, keeps the raw CSV and a W&B run in
outputs/toy2d_studies/gradient_quality/ and prints its runtime.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from torch import Tensor, nn

import baselines  # noqa: F401
from baselines import SDIGuidance, SDSGuidance, VSDGuidance
from eval.tracking import records, study_logger
from experiments.io import save_figure, write_csv
from msd.denoiser import Denoiser, as_sigma, per_sample
from msd.mean_shift import MSDGuidance
from toy2d import ExactDenoiser, fractal_gmm, load_denoiser

CANVAS_CENTER = (0.3, 0.3)
CANVAS_HALF = 1.2
LAMBDAS = (math.sqrt(0.1), 0.1)
SOLVER_STEPS = (4, 8, 16, 32)
DEFAULT_PRODUCT_SOLVER = str(OmegaConf.load(Path(__file__).resolve().parent.parent / "conf/guidance/msd.yaml").solver)
"""The default MSD preset's solver (chosen by eval.product_fidelity) for the ``product_ode`` rows."""
OUT_DIR = Path("results/toy2d")
STUDY_DIR = Path("outputs/toy2d_studies")
COLUMNS = ["method", "denoiser", "lambda", "solver_steps", "num_samples", "nfe", "queries", "repeats",
           "cos_median", "cos_mean", "nmse", "nmse_scaled", "scale", "bias_nmse", "var_nmse", "norm_ratio"]


class UniformSquareDenoiser(nn.Module, Denoiser):
    """Exact ε of the uniform distribution on the square [c − h, c + h]² noised to σ (VE):
    ``q_σ(z) = Π_d (Φ((b − z_d)/σ) − Φ((a − z_d)/σ)) / (b − a)``, ``ε̂ = −σ ∇log q_σ``. Used as VSD's ideal
    particle model for particles spread over the canvas. (An ``nn.Module`` with one unused parameter so
    that VSD can build its optimiser; ``phi_steps = 0`` never trains it.)"""

    def __init__(self, center=CANVAS_CENTER, half_size: float = CANVAS_HALF):
        super().__init__()
        self.register_buffer("lo", torch.tensor(center, dtype=torch.float64) - half_size)
        self.register_buffer("hi", torch.tensor(center, dtype=torch.float64) + half_size)
        self.unused = nn.Parameter(torch.zeros(()))

    def eps(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = per_sample(as_sigma(sigma, x), x).double()
        z = x.double()
        u, l = (self.hi - z) / s, (self.lo - z) / s  # u > l
        # log(Φ(u) − Φ(l)), by symmetry on the side where it does not cancel: Φ(u) − Φ(l) = Φ(−l) − Φ(−u)
        flip = (u + l) > 0
        hi_t, lo_t = torch.where(flip, -l, u), torch.where(flip, -u, l)
        a, b = torch.special.log_ndtr(hi_t), torch.special.log_ndtr(lo_t)
        log_mass = a + torch.log1p(-torch.exp(b - a).clamp(max=1 - 1e-16))
        log_pdf = lambda v: -0.5 * v * v - 0.5 * math.log(2 * math.pi)  # noqa: E731
        # d/dz log(Φ(u) − Φ(l)) = (φ(l) − φ(u)) / (σ (Φ(u) − Φ(l)))
        grad = (torch.exp(log_pdf(l) - log_mass) - torch.exp(log_pdf(u) - log_mass)) / s
        return (-s * grad).to(x.dtype)


def query_set(mixture, n_samples: int = 256, n_canvas: int = 256, seed: int = 0) -> tuple[Tensor, np.ndarray]:
    """Exact class-A samples followed by uniform canvas points; returns (x [n, 2], group labels)."""
    gen = torch.Generator().manual_seed(seed)
    samples = mixture.sample(n_samples, generator=gen)
    canvas = (torch.rand(n_canvas, 2, generator=gen) * 2 - 1) * CANVAS_HALF + torch.tensor(CANVAS_CENTER)
    labels = np.array(["samples"] * n_samples + ["canvas"] * n_canvas)
    return torch.cat([samples, canvas]).float(), labels


def exact_mean_shift(mixture, x: Tensor, lam: float) -> Tensor:
    """m(x) = λ² ∇log p*_λ(x) (= product_mean(x, λ) − x)."""
    return lam**2 * mixture.score(x, lam)


def pool_msd(denoiser, sampler: str, x: Tensor, lam: float, pool: int, solver_steps: int, gen) -> tuple[Tensor, int]:
    """[pool, n, 2] independent draws of y − x (one product sample each) and the nfe per sample
    (``tweedie``: its one deterministic draw)."""
    solver = DEFAULT_PRODUCT_SOLVER if sampler == "product_ode" else "euler"
    pool = 1 if sampler == "tweedie" else pool
    g = MSDGuidance(denoiser, sampler=sampler, lambda0=lam, num_samples=pool, solver_steps=max(solver_steps, 1),
                    solver=solver)
    with torch.no_grad():
        y = g.product_samples(x, lam, gen)
    return y - x, g.evaluations_per_estimate() // pool


def pool_baseline(guidance, x: Tensor, pool: int, gen) -> tuple[Tensor, int]:
    """[pool, n, 2] independent draws of target − x of an SDS-like guidance (step 0) and its nfe."""
    xr = x.repeat(pool, 1)
    out = guidance(xr, 0, gen)
    return (out.target - xr).reshape(pool, *x.shape).detach(), int(out.aux["nfe"])


def baseline_guidances(denoiser) -> dict:
    common = dict(t_min=0.02, t_max=0.98, timestep_mode="uniform")
    return {
        "sds": SDSGuidance(denoiser, weighting="sds", **common),
        "sdi": SDIGuidance(denoiser, inversion_steps=10, **common),
        "vsd": VSDGuidance(denoiser, weighting="sds", phi_steps=0, particle_model=UniformSquareDenoiser(), **common),
    }


def score_pool(draws: Tensor, m: Tensor, n_per: int) -> dict:
    """Metrics of n_per-sample estimates formed from disjoint groups of a pool [S, n, 2] against m [n, 2]."""
    d, m = draws.double(), m.double()
    pool = d.shape[0]
    reps = pool // n_per
    est = d[: reps * n_per].reshape(reps, n_per, *d.shape[1:]).mean(dim=1)  # [reps, n, 2]
    m2 = m.pow(2).sum(-1)
    denom = float(m2.sum()) * reps
    cos = (est * m).sum(-1) / (est.norm(dim=-1) * m.norm(dim=-1)).clamp_min(1e-300)
    cos = torch.where(est.norm(dim=-1) > 0, cos, torch.full_like(cos, float("nan")))
    nmse = float((est - m).pow(2).sum()) / denom
    est_sq = float(est.pow(2).sum())
    scale = float((est * m).sum()) / est_sq if est_sq > 0 else float("nan")
    nmse_scaled = float((scale * est - m).pow(2).sum()) / denom if est_sq > 0 else 1.0
    mean = d.mean(dim=0)
    var1 = float((d - mean).pow(2).sum()) / max(pool - 1, 1)  # Σ_queries trace Cov of one draw
    bias = max(float((mean - m).pow(2).sum()) - var1 / pool, 0.0) / float(m2.sum())
    finite = cos[torch.isfinite(cos)]
    return {"repeats": reps, "cos_median": float(finite.median()) if finite.numel() else float("nan"),
            "cos_mean": float(finite.mean()) if finite.numel() else float("nan"), "nmse": nmse,
            "nmse_scaled": nmse_scaled, "scale": scale, "bias_nmse": bias, "var_nmse": var1 / n_per / float(m2.sum()),
            "norm_ratio": float(est.norm(dim=-1).mean() / m.norm(dim=-1).mean())}


def rows_for(method: str, den_name: str, lam: float, steps, draws: Tensor, nfe_one: int, m: Tensor,
             labels: np.ndarray, sample_counts) -> list[dict]:
    rows = []
    for n_per in sample_counts:
        if n_per > draws.shape[0]:
            continue
        for group in ("all", "samples", "canvas"):
            idx = torch.as_tensor(np.flatnonzero(labels == group) if group != "all" else np.arange(len(labels)))
            rows.append({"method": method, "denoiser": den_name, "lambda": lam, "solver_steps": steps,
                         "num_samples": n_per, "nfe": nfe_one * n_per, "queries": group,
                         **score_pool(draws[:, idx], m[idx], n_per)})
    return rows


def run_study(n_samples: int = 256, n_canvas: int = 256, msd_pool: int = 8, cheap_pool: int = 64,
              sdi_pool: int = 16, lambdas=LAMBDAS, solver_steps=SOLVER_STEPS, denoisers=("exact", "learned"),
              samplers=("product_ode", "tweedie", "ode", "stable"), baselines_on: bool = True, seed: int = 0) -> pd.DataFrame:
    torch.set_num_threads(1)
    mixture = fractal_gmm("A")
    x, labels = query_set(mixture, n_samples, n_canvas, seed)
    models = {"exact": ExactDenoiser(mixture), "learned": load_denoiser("A")}
    rows = []
    counts = (1, 2, 4, 8, 16, 32, 64)
    for lam in lambdas:
        m = exact_mean_shift(mixture, x, lam)
        gen = torch.Generator().manual_seed(seed + 1)
        if "exact" in denoisers:
            draws, _ = pool_msd(models["exact"], "exact", x, lam, cheap_pool, 32, gen)
            rows += rows_for("msd_exact", "exact", lam, 0, draws, 0, m, labels, counts)
        for den_name in denoisers:
            den = models[den_name]
            for sampler in samplers:
                for steps in (solver_steps if sampler != "tweedie" else (0,)):
                    draws, nfe = pool_msd(den, sampler, x, lam, msd_pool, steps, gen)
                    rows += rows_for(f"msd_{sampler}", den_name, lam, steps, draws, nfe, m, labels, counts)
            if baselines_on:
                for name, guidance in baseline_guidances(den).items():
                    pool = sdi_pool if name == "sdi" else cheap_pool
                    draws, nfe = pool_baseline(guidance, x, pool, gen)
                    rows += rows_for(name, den_name, lam, 0, draws, nfe, m, labels, counts)
    return pd.DataFrame(rows, columns=COLUMNS)


STYLE = {"msd_product_ode": "#17becf", "msd_tweedie": "#bcbd22", "msd_ode": "#1f77b4", "msd_stable": "#2ca02c", "msd_exact": "#d62728", "sds": "#7f7f7f",
         "sdi": "#9467bd", "vsd": "#ff7f0e"}


def figure(frame: pd.DataFrame) -> Figure:
    """Rows: λ. Columns: median cosine vs nfe; NMSE vs nfe (raw for MSD, best-rescaled for the baselines);
    bias and variance of the MSD samplers (32 solver steps) vs N."""
    lams = sorted(frame["lambda"].unique(), reverse=True)
    fig = Figure(figsize=(15, 4.6 * len(lams)), layout="constrained")
    axes = fig.subplots(len(lams), 3, squeeze=False)
    f = frame[frame.queries == "all"]
    for r, lam in enumerate(lams):
        fl = f[np.isclose(f["lambda"], lam)]
        ax_c, ax_n, ax_b = axes[r]
        for (method, den), g in fl.groupby(["method", "denoiser"]):
            ls = "-" if den == "exact" else "--"
            color = STYLE.get(method, "k")
            if method == "msd_tweedie":
                label = f"{method} ({den}, 1 nfe, NMSE {float(g.nmse.iloc[0]):.1e})"
                ax_c.scatter(g.nfe, g.cos_median, color=color, marker="*" if den == "exact" else "P", label=label)
                ax_n.scatter(g.nfe, g.nmse.clip(lower=1e-6), color=color, marker="*" if den == "exact" else "P",
                             label=label)
                continue
            if method.startswith("msd_") and method != "msd_exact":
                top = g.solver_steps.max()
                g32 = g[g.solver_steps == top].sort_values("nfe")  # N > 1 at the finest solver grid
                g = g[g.num_samples == 1].sort_values("nfe")  # cost axis: solver steps at N = 1
                g = pd.concat([g, g32[g32.num_samples > 1]])
                y_n = g["nmse"]
            elif method == "msd_exact":
                ax_c.axhline(float(g[g.num_samples == 1].cos_median.iloc[0]), color=color, ls=":", lw=1)
                ax_n.axhline(float(g[g.num_samples == 1].nmse.iloc[0]), color=color, ls=":", lw=1,
                             label="msd_exact N=1 (0 nfe)")
                ax_b.plot(g.num_samples, g.nmse, color=color, marker="o", ls=ls, label="msd_exact (exact)")
                continue
            else:
                g = g.sort_values("nfe")
                y_n = g["nmse_scaled"]
            label = f"{method} ({den})"
            ax_c.plot(g.nfe, g.cos_median, color=color, ls=ls, marker=".", label=label)
            ax_n.plot(g.nfe, y_n, color=color, ls=ls, marker=".", label=label)
            if method in ("msd_product_ode", "msd_ode", "msd_stable"):
                ax_b.plot(g32.num_samples, g32.nmse, color=color, marker="o", ls=ls, label=label)
                ax_b.axhline(float(g32.bias_nmse.iloc[0]), color=color, ls=ls, lw=0.8, alpha=0.6)
        ax_c.set(xscale="log", xlabel="denoiser evaluations per query", ylabel="median cosine to λ²∇log p*_λ",
                 title=f"λ = {lam:.3g}: direction")
        ax_n.set(xscale="log", yscale="log", xlabel="denoiser evaluations per query",
                 ylabel="NMSE (MSD raw; baselines best-rescaled)", title=f"λ = {lam:.3g}: error")
        ax_b.set(xscale="log", yscale="log", xlabel="product samples N (ode/stable: finest solver grid)",
                 ylabel="NMSE of the N-sample mean (o); bias² alone (thin line)",
                 title=f"λ = {lam:.3g}: MSD samplers, bias vs variance")
        for ax in (ax_c, ax_n, ax_b):
            ax.grid(alpha=0.3)
        ax_c.legend(fontsize=6)
        ax_b.legend(fontsize=6)
    fig.suptitle("Gradient quality vs the exact mean-shift vector λ²∇log p*_λ (solid: exact mixture, dashed: learned "
                 "model; red dotted: one exact product sample, 0 nfe)")
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--study-dir", type=Path, default=STUDY_DIR / "gradient_quality",
                        help="the study's run directory (raw CSV, W&B run)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    frame = run_study()
    elapsed = time.perf_counter() - start
    write_csv(args.study_dir / "gradient_quality.csv", frame)
    write_csv(args.out / "gradient_quality.csv", frame)
    fig = figure(frame)
    save_figure(args.out / "gradient_quality.png", fig)
    logger = study_logger(args.study_dir, "gradient-quality", {"study": "gradient_quality", "lambdas": list(LAMBDAS),
                                                               "solver_steps": list(SOLVER_STEPS)})
    logger.log_table("gradient_quality", records(frame))
    logger.log_figure("gradient_quality", fig)
    logger.finish()
    pd.set_option("display.width", 200)
    sel = frame[(frame.queries == "all") & (frame.num_samples == 1) & frame.solver_steps.isin([0, 32])]
    print(sel[["method", "denoiser", "lambda", "nfe", "cos_median", "nmse", "nmse_scaled", "bias_nmse",
               "var_nmse"]].to_string(index=False, float_format="%.4g"))
    print(f"gradient_quality: study {elapsed:.1f} s, total {time.perf_counter() - start:.1f} s "
          f"-> {args.out / 'gradient_quality.csv'}")


if __name__ == "__main__":
    main()

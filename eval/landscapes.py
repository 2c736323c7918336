"""Loss landscapes: each method's expected update field ``g(x) = E[target − x]`` on a grid over the toy
canvas, integrated by least squares into a potential φ (``∇_h φ ≈ g``), the landscape ``L = −φ``.

* Field: 64 × 64 grid over the canvas (centre (0.3, 0.3), half-size 1.2), exact class-A mixture or learned
  denoiser, no guidance, λ ∈ {√0.1 (MSD's initial bandwidth), 0.1}, σ-range of SDS / VSD / SDI: t ~ U[0.02, 0.98] on the toy's
  EDM schedule (SDI *not* annealed: a fixed range, so the field is the expectation over it). M draws per
  grid point: SDS, VSD, MSD-exact 32; SDI 8 (10 inversion steps each); MSD product_ode 16 (the default
  sampler and solver of ``conf/guidance/msd.yaml``); MSD-tweedie and MSD-ode 1 (deterministic).
* VSD has no fixed landscape (ε̂_φ follows the particles; its own first step is exactly 0 because ε̂_φ
  starts as the prior): we use the field with the *ideal* particle model of particles spread uniformly over
  the canvas (their start), ε̂_φ = exact ε of the noised uniform square (``eval.gradient_quality``).
* Least squares: ``φ = argmin Σ_edges (Δφ/h − ḡ_edge)²`` over the grid's horizontal and vertical edges
  (ḡ_edge = mean of the field at the edge's two nodes), solved with ``scipy.sparse.linalg.lsqr`` (the
  discrete Poisson equation with Neumann boundary); φ is fixed by mean zero. ``residual_ratio`` =
  ‖∇_h φ − ḡ‖ / ‖ḡ‖ over the edges: 0 for a gradient field, ≈ 1 for a pure curl.
* Exact reference: the field λ² ∇log p*_λ integrates to λ² log p*_λ, so ``exact`` is −λ² log p*_λ itself
  (``exact_field`` in the CSV: the least-squares integration of the closed-form field, with its residual
  and its RMS error against λ² log p*_λ — the check of the integrator).
* Minima: strict local minima of L over the 8-neighbourhood, interior grid points only (the border
  ring is excluded: a landscape still falling outside the canvas has artificial minima there); the exact
  modes are the local maxima of log p*_λ on the same grid. ``mean_dist_to_mode``: mean distance of each
  landscape minimum to its nearest exact mode; ``mode_recall_dist``: mean distance of each exact mode to
  its nearest landscape minimum. ``corr_exact``: Pearson correlation over the grid of L with −log p*_λ.

``python -m eval.landscapes`` writes results/toy2d/landscapes.csv and landscape_{exact,learned}.png (prints
runtime) and keeps each denoiser's raw surfaces, CSV and a W&B run in outputs/toy2d_studies/landscapes_<denoiser>/; λ ∈ {√0.1, 0.1}, the exact mixture and the learned class-A model (no MSD-exact for the latter).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from matplotlib.figure import Figure
from scipy.sparse.linalg import lsqr

from eval.gradient_quality import CANVAS_CENTER, CANVAS_HALF, DEFAULT_PRODUCT_SOLVER, baseline_guidances
from eval.tracking import records, study_logger
from experiments.io import save_figure, write_csv, write_npz
from msd.mean_shift import MSDGuidance
from toy2d import ExactDenoiser, fractal_gmm, load_denoiser

OUT_DIR = Path("results/toy2d")
STUDY_DIR = Path("outputs/toy2d_studies")
SURFACES_FILE = "surfaces.npz"
COLUMNS = ["method", "denoiser", "lambda", "grid", "repeats", "nfe_per_point", "residual_ratio", "n_minima",
           "n_exact_modes", "mean_dist_to_mode", "mode_recall_dist", "corr_exact", "potential_rel_rms"]
METHODS = ("sds", "sdi", "vsd", "msd_product_ode", "msd_tweedie", "msd_ode", "msd_exact")
TITLES = {"exact": "exact −λ² log p*_λ", "exact_field": "exact field, integrated", "sds": "SDS", "sdi": "SDI",
          "vsd": "VSD (ideal φ, uniform particles)", "msd_product_ode": "MSD (product PF-ODE, default)",
          "msd_tweedie": "MSD (tweedie D(x, λ))", "msd_ode": "MSD (eq. 12 ODE)", "msd_exact": "MSD (exact product)"}


def grid_points(n: int = 64, center=CANVAS_CENTER, half: float = CANVAS_HALF) -> tuple[np.ndarray, np.ndarray, float]:
    """Node coordinates xs, ys (ascending) and spacing h; points are ``meshgrid(xs, ys, indexing='xy')``
    so that array[i, j] is at (xs[j], ys[i])."""
    xs = np.linspace(center[0] - half, center[0] + half, n)
    ys = np.linspace(center[1] - half, center[1] + half, n)
    return xs, ys, float(xs[1] - xs[0])


def grid_tensor(xs: np.ndarray, ys: np.ndarray) -> torch.Tensor:
    gx, gy = np.meshgrid(xs, ys, indexing="xy")
    return torch.tensor(np.stack([gx.ravel(), gy.ravel()], -1), dtype=torch.float32)


def _difference_operator(ny: int, nx: int, h: float) -> sp.csr_matrix:
    """Forward differences over horizontal then vertical edges of an ny × nx grid (row-major nodes)."""
    def d1(n):
        return sp.diags([-np.ones(n - 1), np.ones(n - 1)], [0, 1], shape=(n - 1, n)) / h
    dx = sp.kron(sp.identity(ny), d1(nx))  # along axis 1 (x)
    dy = sp.kron(d1(ny), sp.identity(nx))  # along axis 0 (y)
    return sp.vstack([dx, dy]).tocsr()


def integrate_field(gx: np.ndarray, gy: np.ndarray, h: float) -> tuple[np.ndarray, float]:
    """Least-squares potential φ (mean 0) with ∇_h φ ≈ (gx, gy) on the grid's edges; residual ratio."""
    ny, nx = gx.shape
    rhs = np.concatenate([(0.5 * (gx[:, 1:] + gx[:, :-1])).ravel(), (0.5 * (gy[1:, :] + gy[:-1, :])).ravel()])
    op = _difference_operator(ny, nx, h)
    phi = lsqr(op, rhs, atol=1e-12, btol=1e-12, iter_lim=20000)[0]
    phi -= phi.mean()
    norm = np.linalg.norm(rhs)
    ratio = float(np.linalg.norm(op @ phi - rhs) / norm) if norm > 0 else 0.0
    return phi.reshape(ny, nx), ratio


def local_minima(values: np.ndarray) -> np.ndarray:
    """(i, j) of strict local minima over the 8-neighbourhood, interior points only."""
    v = values
    centre = v[1:-1, 1:-1]
    is_min = np.ones_like(centre, dtype=bool)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di == 0 and dj == 0:
                continue
            is_min &= centre < v[1 + di: v.shape[0] - 1 + di, 1 + dj: v.shape[1] - 1 + dj]
    i, j = np.nonzero(is_min)
    return np.stack([i + 1, j + 1], -1)


def _coords(idx: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    return np.stack([xs[idx[:, 1]], ys[idx[:, 0]]], -1) if len(idx) else np.zeros((0, 2))


def _mean_nearest(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    return float(np.linalg.norm(a[:, None] - b[None], axis=-1).min(axis=1).mean())


def expected_field(method: str, denoiser, x: torch.Tensor, lam: float, repeats: int, gen) -> tuple[np.ndarray, int]:
    """Mean over ``repeats`` draws of target − x at every point [n, 2] and the nfe per draw."""
    if method.startswith("msd_"):
        sampler = method[4:]
        g = MSDGuidance(denoiser, sampler=sampler, lambda0=lam, num_samples=repeats,
                        solver=DEFAULT_PRODUCT_SOLVER if sampler == "product_ode" else "euler")
        with torch.no_grad():
            y = g.product_samples(x, lam, gen).mean(0)
        return (y - x).double().numpy(), g.evaluations_per_estimate() // repeats
    guidance = baseline_guidances(denoiser)[method]
    total = torch.zeros_like(x, dtype=torch.float64)
    chunk = max(1, 65536 // x.shape[0])
    done, nfe = 0, 0
    while done < repeats:
        k = min(chunk, repeats - done)
        xr = x.repeat(k, 1)
        out = guidance(xr, 0, gen)
        total += (out.target - xr).detach().double().reshape(k, *x.shape).sum(0)
        done, nfe = done + k, int(out.aux["nfe"])
    return (total / repeats).numpy(), nfe


def analyse(name: str, potential: np.ndarray, residual: float, exact_l: np.ndarray, modes_xy: np.ndarray,
            xs, ys, lam: float, repeats: int, nfe: int, denoiser: str, ref_potential: np.ndarray | None = None) -> dict:
    landscape = -potential
    minima = _coords(local_minima(landscape), xs, ys)
    corr = float(np.corrcoef(landscape.ravel(), exact_l.ravel())[0, 1])
    rel = float("nan")
    if ref_potential is not None:
        diff = (potential - potential.mean()) - (ref_potential - ref_potential.mean())
        rel = float(np.sqrt((diff**2).mean()) / (ref_potential - ref_potential.mean()).std())
    return {"method": name, "denoiser": denoiser, "lambda": lam, "grid": landscape.shape[0], "repeats": repeats,
            "nfe_per_point": nfe * repeats, "residual_ratio": residual, "n_minima": len(minima),
            "n_exact_modes": len(modes_xy), "mean_dist_to_mode": _mean_nearest(minima, modes_xy),
            "mode_recall_dist": _mean_nearest(modes_xy, minima), "corr_exact": corr, "potential_rel_rms": rel}


def run_landscapes(n: int = 64, lambdas=(math.sqrt(0.1), 0.1), denoiser_name: str = "exact", methods=METHODS,
                   repeats: dict | None = None, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Rows for every λ; SDS / SDI / VSD fields do not depend on λ and are computed once per denoiser."""
    torch.set_num_threads(1)
    repeats = {"sds": 32, "vsd": 32, "sdi": 8, "msd_product_ode": 16, "msd_tweedie": 1, "msd_ode": 1, "msd_exact": 32,
               **(repeats or {})}
    mixture = fractal_gmm("A")
    denoiser = ExactDenoiser(mixture) if denoiser_name == "exact" else load_denoiser("A")
    xs, ys, h = grid_points(n)
    x = grid_tensor(xs, ys)
    gen = torch.Generator().manual_seed(seed)
    rows, per_lambda, timings, cache = [], {}, {}, {}
    for lam in lambdas:
        log_p = mixture.log_prob(x.double(), lam).numpy().reshape(n, n)
        exact_l, ref_potential = -log_p, lam**2 * log_p
        modes_xy = _coords(local_minima(exact_l), xs, ys)
        surfaces = {"exact": -ref_potential}
        # the closed-form field λ² ∇log p*_λ, integrated: checks the integrator (must give λ² log p*_λ)
        field = (lam**2 * mixture.score(x.double(), lam)).numpy()
        phi, res = integrate_field(field[:, 0].reshape(n, n), field[:, 1].reshape(n, n), h)
        rows.append(analyse("exact_field", phi, res, exact_l, modes_xy, xs, ys, lam, 0, 0, "closed form",
                            ref_potential))
        for method in methods:
            if method == "msd_exact" and denoiser_name != "exact":
                continue
            key = method if not method.startswith("msd_") else (method, lam)
            if key not in cache:
                start = time.perf_counter()
                g, nfe = expected_field(method, denoiser, x, lam, repeats[method], gen)
                phi, res = integrate_field(g[:, 0].reshape(n, n), g[:, 1].reshape(n, n), h)
                cache[key] = (phi, res, nfe)
                timings[f"{method}@{lam:.3g}" if method.startswith("msd_") else method] = time.perf_counter() - start
            phi, res, nfe = cache[key]
            ref = ref_potential if method.startswith("msd_") else None
            rows.append(analyse(method, phi, res, exact_l, modes_xy, xs, ys, lam, repeats[method], nfe,
                                denoiser_name, ref))
            surfaces[method] = -phi
        per_lambda[lam] = {"surfaces": surfaces, "modes": modes_xy}
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame, {"per_lambda": per_lambda, "xs": xs, "ys": ys, "timings": timings, "denoiser": denoiser_name}


def figure(data: dict, frame: pd.DataFrame) -> Figure:
    """Rows: λ. A row of filled-contour panels: exact −λ² log p*_λ, then each method's landscape L = −φ
    (each shifted to min 0 and clipped at its 95th percentile); × = exact modes, • = the landscape's minima."""
    xs, ys = data["xs"], data["ys"]
    lams = list(data["per_lambda"])
    first = data["per_lambda"][lams[0]]["surfaces"]
    names = ["exact"] + [m for m in METHODS if m in first]
    fig = Figure(figsize=(2.9 * len(names), 3.2 * len(lams)))
    axes = fig.subplots(len(lams), len(names), squeeze=False)
    for r, lam in enumerate(lams):
        surfaces, modes = data["per_lambda"][lam]["surfaces"], data["per_lambda"][lam]["modes"]
        for ax, name in zip(axes[r], names):
            s = surfaces[name] - surfaces[name].min()
            levels = np.linspace(0, np.percentile(s, 95), 25)
            ax.contourf(xs, ys, np.minimum(s, levels[-1]), levels=levels, cmap="viridis")
            ax.contour(xs, ys, np.minimum(s, levels[-1]), levels=levels[::3], colors="k", linewidths=0.3)
            ax.plot(modes[:, 0], modes[:, 1], "x", color="red", ms=5, mew=1.2)
            minima = _coords(local_minima(s), xs, ys)
            if len(minima):
                ax.plot(minima[:, 0], minima[:, 1], "o", color="white", ms=3, mec="k", mew=0.5)
            row = frame[(frame.method == name) & np.isclose(frame["lambda"], lam)]
            sub = "" if row.empty else f"\nresid {row.residual_ratio.iloc[0]:.2f}, corr {row.corr_exact.iloc[0]:.2f}"
            ax.set_title(f"{TITLES.get(name, name)}, λ={lam:.3g}{sub}", fontsize=7)
            ax.set(xlim=(xs[0], xs[-1]), ylim=(ys[0], ys[-1]), aspect="equal", xticks=[], yticks=[])
    fig.suptitle(f"Loss landscapes L = −φ (least-squares potential of E[target − x]), {data['denoiser']} "
                 "denoiser; × exact modes of p*_λ, • landscape minima", fontsize=9)
    return fig


def save_data(path: Path, data: dict) -> None:
    """The landscapes of one denoiser as an .npz (what :func:`figure` draws): grid, λs, surfaces, modes."""
    lams = list(data["per_lambda"])
    arrays = {"xs": data["xs"], "ys": data["ys"], "lambdas": np.array(lams), "denoiser": np.array(data["denoiser"])}
    for i, lam in enumerate(lams):
        arrays[f"modes__{i}"] = data["per_lambda"][lam]["modes"]
        for name, surface in data["per_lambda"][lam]["surfaces"].items():
            arrays[f"surface__{i}__{name}"] = surface
    write_npz(path, **arrays)


def load_data(path: Path) -> dict:
    """Inverse of :func:`save_data`."""
    with np.load(path) as arrays:
        lams = [float(v) for v in arrays["lambdas"]]
        per_lambda = {}
        for i, lam in enumerate(lams):
            surfaces = {key.split("__", 2)[2]: arrays[key] for key in arrays.files
                        if key.startswith(f"surface__{i}__")}
            per_lambda[lam] = {"surfaces": surfaces, "modes": arrays[f"modes__{i}"]}
        return {"per_lambda": per_lambda, "xs": arrays["xs"], "ys": arrays["ys"],
                "denoiser": str(arrays["denoiser"]), "timings": {}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--study-dir", type=Path, default=STUDY_DIR,
                        help="run directories landscapes_<denoiser>/ (raw surfaces, CSV, W&B run)")
    parser.add_argument("--denoisers", nargs="+", choices=("exact", "learned"), default=["exact", "learned"])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    frames = []
    for name in args.denoisers:
        frame, data = run_landscapes(denoiser_name=name)
        run_dir = args.study_dir / f"landscapes_{name}"
        save_data(run_dir / SURFACES_FILE, data)
        write_csv(run_dir / "landscapes.csv", frame)
        fig = figure(data, frame)
        save_figure(args.out / f"landscape_{name}.png", fig)
        logger = study_logger(run_dir, f"landscapes-{name}", {"study": "landscapes", "denoiser": name})
        logger.log_table("landscapes", records(frame))
        logger.log_figure(f"landscape_{name}", fig)
        logger.finish()
        frames.append(frame if not frames else frame[frame.method != "exact_field"])
        print(f"{name}: field + integration seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in data["timings"].items()))
    frame = pd.concat(frames, ignore_index=True)
    write_csv(args.out / "landscapes.csv", frame)
    pd.set_option("display.width", 200)
    print(frame.to_string(index=False, float_format="%.4g"))
    print(f"landscapes: total {time.perf_counter() - start:.1f} s -> {args.out / 'landscapes.csv'}")


if __name__ == "__main__":
    main()

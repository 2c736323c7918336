"""Metrics of 2D particles against the exact target density p (the class-A fractal mixture, or the spiral /
pinwheel of ``toy2d.datasets``: any ``toy2d.toy_mixture(dataset, classes)``).

Per-iteration metrics (cheap, :class:`ToyEvaluator`):

* ``nll``: mean of −log p(x) over the particles (σ = 0, nats); ``nll_median``: its median (robust to
  the few particles left far from the data, whose −log p grows quadratically with distance).
* ``in_hdr``: fraction of particles inside the 95% highest-density region
  ``R = {x : log p(x) ≥ ℓ}``, where ℓ is the level with ``P_{y∼p}(log p(y) ≥ ℓ) = 0.95``. ℓ is a
  Monte-Carlo estimate: the 5% quantile of log p over ``n_reference`` exact samples of p (for 200k
  samples its error in probability mass is about √(0.05·0.95/200000) ≈ 0.0005).

Mode metrics of the final particles (:class:`ModeMetrics`, computed once per run), against a reference set
Y of ``MODE_N_REFERENCE`` = 10,000 exact samples of p (seed ``MODE_REFERENCE_SEED``):

* ``precision`` / ``recall``: improved precision and recall (Kynkäänniemi et al. 2019) with k-NN
  manifolds, k = 3 (:func:`improved_precision_recall`).
* ``mmd``: biased (V-statistic) estimate of MMD² with the kernel ``k = mean_h exp(−‖x − y‖²/(2h²))`` over
  the RBF bandwidths ``MMD_BANDWIDTHS`` = (0.02, 0.05, 0.1, 0.2) canvas units (:func:`mmd_rbf`).
* ``mode_distance``: mean Euclidean distance of a particle to the nearest mode of p, the modes being the
  local maxima of ``p_λ = p ∗ G_λ`` at λ = ``MODE_BANDWIDTH`` = 0.01 reached by exact mean shift from every
  component mean (:func:`find_modes`, :func:`nearest_mode_distance`).
"""
from __future__ import annotations

import functools
import math

import numba
import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

from toy2d.kernels import _FASTMATH, _exp_nonpositive

PR_K = 3
MMD_BANDWIDTHS = (0.02, 0.05, 0.1, 0.2)
MODE_BANDWIDTH = 0.01
MODE_N_REFERENCE = 10_000
MODE_REFERENCE_SEED = 1
MODE_METRICS_VERSION = (f"v1:k={PR_K}:n_ref={MODE_N_REFERENCE}:seed={MODE_REFERENCE_SEED}:"
                        f"mmd2_biased_bw={','.join(f'{h:g}' for h in MMD_BANDWIDTHS)}:mode_lambda={MODE_BANDWIDTH:g}")
"""Identifies the definitions and settings above; cached mode metrics with another version are recomputed."""


class ToyEvaluator:
    """Scores particles [N, 2] against a mixture with exact ``log_prob(x, sigma)`` and ``sample(n, generator=)``."""

    def __init__(self, mixture, n_reference: int = 200_000, seed: int = 0, hdr_mass: float = 0.95):
        if n_reference < 1:
            raise ValueError(f"task.eval.n_reference must be >= 1, got {n_reference!r}")
        if not 0.0 < hdr_mass < 1.0:
            raise ValueError(f"task.eval.hdr_mass must be in (0, 1), got {hdr_mass!r}")
        self.mixture, self.hdr_mass = mixture, float(hdr_mass)
        reference = mixture.sample(n_reference, generator=torch.Generator().manual_seed(seed))
        self.reference_log_prob = self.log_prob(reference)
        self.hdr_level = float(torch.quantile(self.reference_log_prob, 1.0 - self.hdr_mass))

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) at σ = 0 in float64, [N]."""
        return self.mixture.log_prob(x.detach().double().cpu(), 0.0).double()

    @property
    def entropy(self) -> float:
        """Monte-Carlo estimate of the differential entropy H(p) = E_p[−log p] (the NLL of ideal samples)."""
        return float(-self.reference_log_prob.mean())

    def __call__(self, x: Tensor) -> dict[str, float]:
        log_p = self.log_prob(x)
        return {
            "nll": float(-log_p.mean()),
            "nll_median": float(-log_p.median()),
            "in_hdr": float((log_p >= self.hdr_level).double().mean()),
        }


# ----- improved precision and recall -----------------------------------------------------------------------

def _as_array(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected points [N, D], got shape {x.shape}")
    return x


def _distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """‖a − b‖ row-wise (broadcasting), one formula everywhere so that equal points give exactly 0."""
    return np.sqrt(((a - b) ** 2).sum(-1))


def knn_radii(points, k: int = PR_K) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour in its own set, itself excluded, [N] float64.

    Duplicates count as neighbours at distance 0 (a set collapsed onto one point has radii 0).
    """
    x = _as_array(points)
    if len(x) <= k:
        raise ValueError(f"need more than k = {k} points, got {len(x)}")
    _, idx = cKDTree(x).query(x, k=k + 1)
    # the k+1 nearest include the point itself (or a duplicate of it at distance 0, which is the same);
    # re-measure with _distance so that the radius and the membership test use the same arithmetic
    dist = _distance(x[:, None, :], x[idx])
    return np.sort(dist, axis=1)[:, k]


def _inside_union(queries: np.ndarray, centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """[Q] bool: query q lies in some closed ball B(c, r_c), i.e. ‖q − c‖ ≤ r_c, exactly (:func:`_in_balls`)."""
    order = np.argsort(centers[:, 0], kind="stable")
    return _in_balls(np.ascontiguousarray(queries), np.ascontiguousarray(centers[order]),
                     np.ascontiguousarray(radii[order]))


@numba.njit(cache=True)
def _in_balls(queries: np.ndarray, centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Membership of each query in the union of the balls ``‖q − c‖ ≤ r_c``, centres sorted by x.

    Only centres with ``|c_x − q_x| ≤ max r`` (widened by 1e-9 relative, against rounding) can contain q;
    those are found by bisection and tested with :func:`_distance`'s arithmetic, ``√((q_x − c_x)² +
    (q_y − c_y)²)`` (no fast-math, so the same bits), stopping at the first hit.
    """
    out = np.zeros(len(queries), dtype=np.bool_)
    reach = radii.max() * (1.0 + 1e-9) if len(radii) else 0.0
    xs = centers[:, 0]
    for i in range(len(queries)):
        qx, qy = queries[i, 0], queries[i, 1]
        j = np.searchsorted(xs, qx - reach)
        end = np.searchsorted(xs, qx + reach, side="right")
        while j < end:
            dx, dy = qx - centers[j, 0], qy - centers[j, 1]
            if math.sqrt(dx * dx + dy * dy) <= radii[j]:
                out[i] = True
                break
            j += 1
    return out


def improved_precision_recall(generated, reference, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall of Kynkäänniemi et al. (2019) with k-NN manifolds.

    The manifold of a set S is ``∪_{s∈S} B(s, r_k(s))``, ``r_k(s)`` the distance from s to its k-th nearest
    neighbour in S (s excluded), balls closed (``‖x − s‖ ≤ r``, so a set collapsed onto one point has the
    manifold {that point}). precision = fraction of generated points in the reference manifold; recall =
    fraction of reference points in the generated manifold. Returns (precision, recall).
    """
    gen, ref = _as_array(generated), _as_array(reference)
    precision = _inside_union(gen, ref, knn_radii(ref, k)).mean()
    recall = _inside_union(ref, gen, knn_radii(gen, k)).mean()
    return float(precision), float(recall)


# ----- MMD ---------------------------------------------------------------------------------------------------

def _kernel_sum(a: np.ndarray, b: np.ndarray, bandwidths: tuple[float, ...]) -> float:
    """Σ_{i,j} k(a_i, b_j) with k = mean_h exp(−‖a − b‖²/(2h²)), float64 (:func:`_pair_kernel_sums`)."""
    scales = np.array([-0.5 / float(h) ** 2 for h in bandwidths])
    if a is b:  # k is symmetric and k(a, a) = 1: the diagonal plus twice the pairs i < j
        return len(a) + 2.0 * _pair_kernel_sums(a, a, scales, True).sum() / len(scales)
    return _pair_kernel_sums(a, b, scales, False).sum() / len(scales)


@numba.njit(fastmath=_FASTMATH, cache=True)
def _pair_kernel_sums(a: np.ndarray, b: np.ndarray, scales: np.ndarray, upper: bool) -> np.ndarray:
    """Per bandwidth, Σ_{i,j} exp(s ‖a_i − b_j‖²) over all pairs (``upper``: only j > i), [len(scales)].

    The exponential is ``toy2d.kernels._exp_nonpositive`` (≤ 1.9e-9 relative error on [−64, 0]); terms with
    s‖a − b‖² < −64 (each < 2e-28) are left out.
    """
    out = np.zeros(len(scales))
    row = np.empty(len(b))
    for i in range(len(a)):
        start = i + 1 if upper else 0
        for j in range(start, len(b)):
            row[j] = (a[i, 0] - b[j, 0]) ** 2 + (a[i, 1] - b[j, 1]) ** 2
        for h in range(len(scales)):
            s, total = scales[h], 0.0
            for j in range(start, len(b)):
                z = s * row[j]
                total += _exp_nonpositive(max(z, -64.0)) if z >= -64.0 else 0.0
            out[h] += total
    return out


def mmd_rbf(x, y, bandwidths: tuple[float, ...] = MMD_BANDWIDTHS, yy: float | None = None) -> float:
    """Biased (V-statistic) estimate of MMD²(x, y) = mean k(x, x') + mean k(y, y') − 2 mean k(x, y).

    The kernel is the average of RBF kernels ``exp(−‖u − v‖²/(2h²))`` over ``bandwidths`` (itself a
    characteristic kernel, so MMD² = 0 only for equal distributions). All pairs, diagonals included: the
    estimate is ≥ 0, exactly 0 for ``x`` equal to ``y``, symmetric, and biased upward by O(1/n) for two
    independent samples of one distribution. ``yy``: a precomputed ``mean k(y, y')`` (the reference's).
    """
    x, y = _as_array(x), _as_array(y)
    if yy is None:
        yy = _kernel_sum(y, y, bandwidths) / len(y) ** 2
    xx = _kernel_sum(x, x, bandwidths) / len(x) ** 2
    xy = _kernel_sum(x, y, bandwidths) / (len(x) * len(y))
    return max(float(xx + yy - 2.0 * xy), 0.0)


# ----- modes -------------------------------------------------------------------------------------------------

def _smoothed_terms(mixture, x: Tensor, bandwidth: float, derivatives: bool = True) -> tuple[Tensor, ...]:
    """log p_λ(x) [N], ∇log p_λ(x) [N, 2] and its Hessian [N, 2, 2] for ``p_λ = p ∗ N(0, λ² I)`` (float64).

    With ``A_k = (Σ_k + λ² I)⁻¹``, ``u_k = A_k (μ_k − x)`` and responsibilities r_k:
    ``∇log p_λ = Σ r_k u_k``, ``∇²log p_λ = Σ r_k (u_k u_kᵀ − A_k) − ∇∇ᵀ`` (:func:`_smoothed_rows`).
    ``derivatives=False``: log p_λ only.
    """
    mu = mixture.means.double()
    cov = mixture.covs.double() + bandwidth**2 * torch.eye(2, dtype=torch.float64)
    a, b, c = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]
    det = a * c - b * b
    prec = torch.stack((c / det, -b / det, a / det))
    const = torch.log(mixture.weights.double()) - 0.5 * det.log() - math.log(2 * math.pi)
    out = np.empty((len(x), 6))
    _smoothed_rows(x.detach().double().contiguous().numpy(), mu[:, 0].contiguous().numpy(),
                   mu[:, 1].contiguous().numpy(), *(t.contiguous().numpy() for t in prec), const.numpy(), out)
    out = torch.from_numpy(out)
    if not derivatives:
        return (out[:, 0],)
    hess = torch.stack((out[:, 3:5], out[:, 4:6]), dim=1)  # [[h00, h01], [h01, h11]]
    return out[:, 0], out[:, 1:3], hess


@numba.njit(fastmath=_FASTMATH, cache=True)
def _smoothed_rows(x, mx, my, p00, p01, p11, const, out):
    """Per row of x [N, 2]: (log p_λ, ∇ (2), Hessian entries h00, h01, h11) into out [N, 6].

    Terms ``l_k = const_k − ½ (μ_k − x)ᵀ A_k (μ_k − x)``; ``log p_λ = m + log Σ e^{l_k − m}``, ``m = max l``
    (terms below m − 64, each < 2e-28 relative, left out; exponentials by ``_exp_nonpositive``).
    """
    k_all = len(mx)
    logit, u0, u1 = np.empty(k_all), np.empty(k_all), np.empty(k_all)
    for i in range(len(x)):
        m = -np.inf
        for k in range(k_all):
            d0, d1 = mx[k] - x[i, 0], my[k] - x[i, 1]
            u0[k] = p00[k] * d0 + p01[k] * d1
            u1[k] = p01[k] * d0 + p11[k] * d1
            logit[k] = const[k] - 0.5 * (d0 * u0[k] + d1 * u1[k])
            m = max(m, logit[k])
        s, g0, g1, s00, s01, s11 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        for k in range(k_all):
            d = logit[k] - m
            r = _exp_nonpositive(max(d, -64.0)) if d >= -64.0 else 0.0
            s += r
            g0 += r * u0[k]
            g1 += r * u1[k]
            s00 += r * (u0[k] * u0[k] - p00[k])
            s01 += r * (u0[k] * u1[k] - p01[k])
            s11 += r * (u1[k] * u1[k] - p11[k])
        g0, g1 = g0 / s, g1 / s
        out[i, 0] = m + math.log(s)
        out[i, 1], out[i, 2] = g0, g1
        out[i, 3] = s00 / s - g0 * g0
        out[i, 4] = s01 / s - g0 * g1
        out[i, 5] = s11 / s - g1 * g1


def find_modes(mixture, bandwidth: float = MODE_BANDWIDTH, tol: float = 1e-9, merge_tol: float = 1e-4,
               max_iter: int = 10_000) -> Tensor:
    """Local maxima of ``p_λ = p ∗ N(0, λ² I)`` reached by exact mean shift from every component mean.

    Mean shift is ``x ← m_λ(x)``, the mean of ``p(y) N(y; x, λ² I)`` (``GaussianMixture.product_mean``),
    and ``m_λ(x) − x = λ² ∇log p_λ(x)``: its fixed points are the stationary points of p_λ. Along the
    nearly flat ridges of overlapping thin components plain mean shift creeps (thousands of steps), so each
    iteration takes the longest step ``2^j (m_λ(x) − x)``, j ≤ 10, along which log p_λ keeps increasing, or
    the Newton step ``−H⁻¹∇log p_λ`` where the Hessian H is negative definite, the step shorter than 10λ
    and its p_λ at least as high (same fixed points; an ascent that stays on the hill of the plain step).
    A point is converged when its mean-shift step ``‖m_λ(x) − x‖ < tol``. Converged points with a
    negative-definite Hessian (maxima, not saddles) are merged greedily within ``merge_tol`` (highest p_λ
    first). Returns [M, 2] float64, sorted by decreasing p_λ. The fractal class A (1016 components) at
    λ = 0.01 gives 160 modes in about 8 s on one CPU thread.
    """
    lam = float(bandwidth)
    x = mixture.means.double().clone()
    active = torch.ones(len(x), dtype=torch.bool)
    multipliers = [2.0**j for j in range(11)]
    for _ in range(max_iter):
        idx = active.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        xi = x[idx]
        log_p, g, h = _smoothed_terms(mixture, xi, lam)
        shift = lam**2 * g
        done = shift.norm(dim=1) < tol
        det = h[:, 0, 0] * h[:, 1, 1] - h[:, 0, 1] ** 2
        neg_def = (h[:, 0, 0] < 0) & (det > 0)
        newton = -torch.linalg.solve(torch.where(neg_def[:, None, None], h, -torch.eye(2, dtype=h.dtype)), g)
        # the Newton step where it is defined, short and at least as good as plain mean shift (which never
        # decreases p_λ); elsewhere a line search along the mean-shift direction: the longest step
        # 2^j·shift (j ≤ 10) before log p_λ stops increasing
        best = _smoothed_terms(mixture, xi + shift, lam, False)[0]
        lp_newton = _smoothed_terms(mixture, xi + newton, lam, False)[0]
        use_newton = neg_def & (newton.norm(dim=1) < 10 * lam) & (lp_newton >= best)
        step = torch.where(use_newton[:, None], newton, shift)
        search = (~use_newton & ~done).nonzero().squeeze(1)
        rising = torch.ones(len(search), dtype=torch.bool)
        best = best[search]
        for t in multipliers[1:]:
            if not bool(rising.any()):
                break
            lp = _smoothed_terms(mixture, xi[search] + t * shift[search], lam, False)[0]
            rising &= lp > best
            step[search[rising]] = t * shift[search[rising]]
            best = torch.where(rising, lp, best)
        x[idx[~done]] += step[~done]
        active[idx[done]] = False
    if bool(active.any()):
        raise RuntimeError(f"mean shift did not converge in {max_iter} iterations for {int(active.sum())} points")
    log_p, _, h = _smoothed_terms(mixture, x, lam)
    det = h[:, 0, 0] * h[:, 1, 1] - h[:, 0, 1] ** 2
    maxima = (h[:, 0, 0] < 0) & (det > 0)
    x, log_p = x[maxima], log_p[maxima]
    kept: list[Tensor] = []
    for i in torch.argsort(log_p, descending=True).tolist():
        if not kept or float((torch.stack(kept) - x[i]).norm(dim=1).min()) > merge_tol:
            kept.append(x[i])
    return torch.stack(kept)


def nearest_mode_distance(points, modes) -> float:
    """Mean over the points of the Euclidean distance to the nearest mode."""
    distance, _ = cKDTree(_as_array(modes)).query(_as_array(points), k=1)
    return float(np.mean(distance))


def class_modes(target_class: str, bandwidth: float = MODE_BANDWIDTH, dataset: str = "fractal") -> Tensor:
    """Modes at bandwidth λ of the target of a toy task (``task.dataset``, ``task.target_class``): the fractal's
    class ``target_class``, or the whole spiral / pinwheel (which have no classes; ``target_class`` is then not
    used). Cached per (dataset, classes, λ)."""
    from toy2d.datasets import target_classes

    return _dataset_modes(dataset, target_classes(dataset, target_class), float(bandwidth))


@functools.lru_cache(maxsize=8)
def _dataset_modes(dataset: str, classes: str, bandwidth: float) -> Tensor:
    from toy2d import toy_mixture

    return find_modes(toy_mixture(dataset, classes), bandwidth)


class ModeMetrics:
    """precision, recall, mmd and mode_distance of final particles [N, 2] against a mixture (module docstring).

    The reference set (``n_reference`` exact samples, ``seed``), its k-NN radii, its kernel mean and the
    modes are computed once here; ``modes`` may be given (e.g. :func:`class_modes`).
    """

    def __init__(self, mixture, n_reference: int = MODE_N_REFERENCE, seed: int = MODE_REFERENCE_SEED,
                 k: int = PR_K, bandwidths: tuple[float, ...] = MMD_BANDWIDTHS,
                 mode_bandwidth: float = MODE_BANDWIDTH, modes: Tensor | None = None):
        self.k, self.bandwidths = int(k), tuple(float(h) for h in bandwidths)
        self.reference = _as_array(mixture.sample(n_reference, generator=torch.Generator().manual_seed(seed)))
        self.reference_radii = knn_radii(self.reference, self.k)
        self.reference_kernel_mean = _kernel_sum(self.reference, self.reference, self.bandwidths) / n_reference**2
        self.modes = find_modes(mixture, mode_bandwidth) if modes is None else torch.as_tensor(modes)

    def __call__(self, x) -> dict[str, float]:
        x = _as_array(x)
        return {
            "precision": float(_inside_union(x, self.reference, self.reference_radii).mean()),
            "recall": float(_inside_union(self.reference, x, knn_radii(x, self.k)).mean()),
            "mmd": mmd_rbf(x, self.reference, self.bandwidths, yy=self.reference_kernel_mean),
            "mode_distance": nearest_mode_distance(x, self.modes),
        }


def class_mode_metrics(target_class: str, dataset: str = "fractal") -> ModeMetrics:
    """The :class:`ModeMetrics` with the default settings of the target of a toy task (``task.dataset``,
    ``task.target_class``; :func:`class_modes`). Cached per (dataset, classes)."""
    from toy2d.datasets import target_classes

    return _dataset_mode_metrics(dataset, target_classes(dataset, target_class))


@functools.lru_cache(maxsize=4)
def _dataset_mode_metrics(dataset: str, classes: str) -> ModeMetrics:
    from toy2d import toy_mixture

    return ModeMetrics(toy_mixture(dataset, classes), modes=_dataset_modes(dataset, classes, MODE_BANDWIDTH))

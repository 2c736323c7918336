"""Compiled (numba) inner loops of the fast mixture evaluation and of the tile interpolants.

Everything here is float64 and single-threaded (the callers run one process per core); the kernels are
compiled on first use and cached on disk by numba (``cache=True``), so later processes load them.

Mixture terms, for a point x, added variance v = σ² and component k with ``Σ_k = [[a, b], [b, c]]``::

    D_k   = det Σ_k + v (a + c) + v²                      (det(Σ_k + vI))
    g_k   = (Σ_k + vI)⁻¹ (μ_k − x) = [[c + v, −b], [−b, a + v]] (μ_k − x) / D_k
    l_k   = log φ_k − ½ log D_k − log 2π − ½ (μ_k − x)·g_k
    log p = m + log Σ_k e^{l_k − m},    score = Σ_k e^{l_k − m} g_k / Σ_k e^{l_k − m},    m = max_k l_k.

Terms with ``l_k − m < −trunc`` are skipped (each carries relative weight below e^{−trunc}); which k a
row visits comes from per-cell candidate lists (:func:`candidate_lists`, CSR) or is every component. The
exponentials use :func:`_exp_nonpositive`, ``exp(d) = (Σ_{j≤13} (d/64)^j / j!)^64`` for d ∈ [−64, 0]
(Taylor remainder ≤ 1/14! ≈ 1e-11 relative at |d/64| = 1, times 64 through the 6 squarings: measured
max relative error 1.9e-9 on [−64, 0], 8e-14 on [−32, 0], which holds every term the 30-nat truncation
keeps), and, unlike libm's exp, the loop vectorises.
"""
from __future__ import annotations

import math

import numba
import numpy as np

_LOG_2PI = math.log(2.0 * math.pi)
_FASTMATH = {"contract", "reassoc", "nsz", "arcp"}
"""LLVM fast-math flags of the kernels: fused multiply-adds and reassociated sums (so loops vectorise), but
not "no NaNs / no infinities" (−∞ starts every running maximum)."""


@numba.njit(fastmath=_FASTMATH, inline="always")
def _exp_nonpositive(d: float) -> float:
    """e^d for d ∈ [−64, 0] (module docstring: ≤ 1.9e-9 relative error, ≤ 8e-14 on [−32, 0])."""
    y = d * (1.0 / 64.0)
    p = 1.0 / 6227020800.0
    p = p * y + 1.0 / 479001600.0
    p = p * y + 1.0 / 39916800.0
    p = p * y + 1.0 / 3628800.0
    p = p * y + 1.0 / 362880.0
    p = p * y + 1.0 / 40320.0
    p = p * y + 1.0 / 5040.0
    p = p * y + 1.0 / 720.0
    p = p * y + 1.0 / 120.0
    p = p * y + 1.0 / 24.0
    p = p * y + 1.0 / 6.0
    p = p * y + 0.5
    p = p * y + 1.0
    p = p * y + 1.0
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    return p * p


@numba.njit(cache=True)
def _level_terms(v, log_w, a, b, c, det, const, p00, p01, p11):
    """Per-component constants at added variance v: ``log φ − ½ log D − log 2π`` and the precision entries."""
    for k in range(log_w.shape[0]):
        d = det[k] + v * (a[k] + c[k]) + v * v
        const[k] = log_w[k] - 0.5 * math.log(d) - _LOG_2PI
        p00[k] = (c[k] + v) / d
        p01[k] = -b[k] / d
        p11[k] = (a[k] + v) / d


def _row_loops(gathered: bool):
    """The two per-row loops of :func:`mixture_rows`, over components ``idx[first + j]`` (``gathered``) or
    ``first + j``, j < size, compiled separately so that the contiguous (all-component) case vectorises."""

    @numba.njit(fastmath=_FASTMATH, inline="always")
    def shared_terms(x0, x1, idx, first, size, mx, my, const, p00, p01, p11, logit, g0, g1):
        m = -np.inf
        for j in range(size):
            k = idx[first + j] if gathered else first + j
            d0, d1 = mx[k] - x0, my[k] - x1
            h0 = p00[k] * d0 + p01[k] * d1
            h1 = p01[k] * d0 + p11[k] * d1
            logit[j] = const[k] - 0.5 * (d0 * h0 + d1 * h1)
            g0[j], g1[j] = h0, h1
            m = max(m, logit[j])
        return m

    @numba.njit(fastmath=_FASTMATH, inline="always")
    def own_terms(x0, x1, v, idx, first, size, mx, my, log_w, a, b, c, det, logit, scale, g0, g1):
        m = -np.inf
        for j in range(size):
            k = idx[first + j] if gathered else first + j
            d0, d1 = mx[k] - x0, my[k] - x1
            inv = 1.0 / (det[k] + v * (a[k] + c[k]) + v * v)
            h0 = ((c[k] + v) * d0 - b[k] * d1) * inv
            h1 = ((a[k] + v) * d1 - b[k] * d0) * inv
            logit[j] = log_w[k] - 0.5 * (d0 * h0 + d1 * h1)
            scale[j] = math.sqrt(inv)
            g0[j], g1[j] = h0, h1
            m = max(m, logit[j])
        return m

    return shared_terms, own_terms


_shared_gathered, _own_gathered = _row_loops(True)
_shared_all, _own_all = _row_loops(False)


@numba.njit(fastmath=_FASTMATH, inline="always")
def _weighted_sums(logit, scale, g0, g1, size, m, cut, scaled):
    """(Σ e_j, Σ e_j g0_j, Σ e_j g1_j) with ``e_j = e^{logit_j − m}`` (times ``scale_j`` if ``scaled``) over
    the terms with ``logit_j − m ≥ −cut``."""
    s, s0, s1 = 0.0, 0.0, 0.0
    for j in range(size):
        d = logit[j] - m
        e = _exp_nonpositive(max(d, -cut)) if d >= -cut else 0.0
        if scaled:
            e *= scale[j]
        s += e
        s0 += e * g0[j]
        s1 += e * g1[j]
    return s, s0, s1


@numba.njit(fastmath=_FASTMATH, cache=True)
def mixture_rows(x, var, cell, offsets, flat, dense, log_w, mx, my, a, b, c, det, trunc, out):
    """log p and score (module docstring) of rows x [n, 2] at added variances var [n] into out [n, 3].

    Row i sums over the components ``flat[offsets[cell[i]]:offsets[cell[i] + 1]]`` (:func:`candidate_lists`),
    or over all K components when ``cell[i] < 0`` or ``dense[cell[i]]``. Rows sharing a variance should be
    adjacent: a run of ≥ 16 such rows gets the per-component constants ``log φ − ½ log D − log 2π`` and the
    precision once (:func:`_level_terms`), and drops terms more than ``trunc`` nats below the best. Rows with
    their own variance avoid the K logarithms: with ``u_k = log φ_k − ½ (μ_k − x)·g_k`` and ``m = max_k u_k``
    they sum ``e^{u_k − m} D_k^{−½}`` (so ``log p = m + log Σ − log 2π``), dropping terms with
    ``u_k − m < −64`` (the dropped mass is ≤ K e^{−64} max_k D_k^{−½} / min_k D_k^{−½} of the total).
    """
    k_all, n = log_w.shape[0], x.shape[0]
    const, p00, p01, p11 = np.empty(k_all), np.empty(k_all), np.empty(k_all), np.empty(k_all)
    logit, scale, g0, g1 = np.empty(k_all), np.empty(k_all), np.empty(k_all), np.empty(k_all)
    start = 0
    while start < n:
        v = var[start]
        end = start + 1
        while end < n and var[end] == v:
            end += 1
        shared = end - start >= 16
        if shared:
            _level_terms(v, log_w, a, b, c, det, const, p00, p01, p11)
        for i in range(start, end):
            x0, x1 = x[i, 0], x[i, 1]
            every = cell[i] < 0 or dense[cell[i]]
            first = 0 if every else offsets[cell[i]]
            size = k_all if every else offsets[cell[i] + 1] - first
            if shared:
                if every:
                    m = _shared_all(x0, x1, flat, 0, k_all, mx, my, const, p00, p01, p11, logit, g0, g1)
                else:
                    m = _shared_gathered(x0, x1, flat, first, size, mx, my, const, p00, p01, p11, logit, g0, g1)
                s, s0, s1 = _weighted_sums(logit, scale, g0, g1, size, m, trunc, False)
                out[i, 0] = m + math.log(s)
            else:
                if every:
                    m = _own_all(x0, x1, v, flat, 0, k_all, mx, my, log_w, a, b, c, det, logit, scale, g0, g1)
                else:
                    m = _own_gathered(x0, x1, v, flat, first, size, mx, my, log_w, a, b, c, det, logit, scale,
                                      g0, g1)
                s, s0, s1 = _weighted_sums(logit, scale, g0, g1, size, m, 64.0, True)
                out[i, 0] = m + math.log(s) - _LOG_2PI
            out[i, 1] = s0 / s
            out[i, 2] = s1 / s
        start = end


@numba.njit(fastmath=_FASTMATH, cache=True)
def chebyshev_rows(rel, visit, cells, index, coefficients, out, resolved):
    """Evaluate one level of a tile interpolant (``toy2d.tiles``) at box coordinates rel [n, 2] ∈ [0, 1)².

    ``index`` [cells²] maps a tile to its row of ``coefficients`` [rows, C, n, n] (−1: not on this level).
    Rows are visited in the order ``visit`` (rows sorted by tile keep a tile's coefficients in cache); rows
    already ``resolved`` are skipped; the others on this level get ``Σ_{k,m} a_{ckm} T_k(u) T_m(v)`` in
    out [n, C] (T by the three-term recurrence ``T_{k+1} = 2u T_k − T_{k−1}``) and are marked resolved.
    """
    channels, order = coefficients.shape[1], coefficients.shape[2]
    tx, ty = np.empty(order), np.empty(order)
    for i in visit:
        if resolved[i]:
            continue
        sx, sy = rel[i, 0] * cells, rel[i, 1] * cells
        cx, cy = min(max(int(math.floor(sx)), 0), cells - 1), min(max(int(math.floor(sy)), 0), cells - 1)
        r = index[cx * cells + cy]
        if r < 0:
            continue
        u, w = 2.0 * (sx - cx) - 1.0, 2.0 * (sy - cy) - 1.0
        tx[0], tx[1], ty[0], ty[1] = 1.0, u, 1.0, w
        for k in range(2, order):
            tx[k] = 2.0 * u * tx[k - 1] - tx[k - 2]
            ty[k] = 2.0 * w * ty[k - 1] - ty[k - 2]
        for ch in range(channels):
            total = 0.0
            for k in range(order):
                inner = 0.0
                for m in range(order):
                    inner += coefficients[r, ch, k, m] * ty[m]
                total += tx[k] * inner
            out[i, ch] = total
        resolved[i] = True


@numba.njit(cache=True)
def _bound_terms(v, v_det, log_w, a, b, c, det, p00, p01, p11, const):
    """Precision entries of Σ_k + vI into p00, p01, p11 and ``log φ_k − log 2π − ½ log det(Σ_k + v_det I)``
    into const (the bounds of :func:`candidate_lists` take the two from opposite ends of the bucket)."""
    for k in range(a.shape[0]):
        d = det[k] + v * (a[k] + c[k]) + v * v
        p00[k], p01[k], p11[k] = (c[k] + v) / d, -b[k] / d, (a[k] + v) / d
        const[k] = log_w[k] - _LOG_2PI - 0.5 * math.log(det[k] + v_det * (a[k] + c[k]) + v_det * v_det)


@numba.njit(fastmath=_FASTMATH, cache=True)
def candidate_lists(lo0, lo1, size0, size1, grid, v_lo, v_hi, log_w, mx, my, a, b, c, det, trunc, max_len):
    """Per grid cell, the components whose log-term can come within ``trunc`` nats of the best one anywhere
    in the cell, for every added variance in [v_lo, v_hi] (bounds: ``toy2d.gmm`` module docstring).

    Cell (i, j) (row i·grid + j) is ``[lo0 + i·size0, lo0 + (i+1)·size0] × [lo1 + j·size1, …]``. Returns
    CSR lists: ``offsets`` [cells + 1] (int64) and ``flat`` component indices (int32); a cell with more than
    ``max_len`` candidates gets an empty list and ``dense[cell] = True`` (evaluate all components there).
    """
    k_all = a.shape[0]
    # upper bound of a log-term: smallest Mahalanobis distance (largest v), log det at the smallest v
    q00, q01, q11, up_const = np.empty(k_all), np.empty(k_all), np.empty(k_all), np.empty(k_all)
    _bound_terms(v_hi, v_lo, log_w, a, b, c, det, q00, q01, q11, up_const)
    # lower bound: largest Mahalanobis distance (smallest v), log det at the largest v
    r00, r01, r11, low_const = np.empty(k_all), np.empty(k_all), np.empty(k_all), np.empty(k_all)
    _bound_terms(v_lo, v_hi, log_w, a, b, c, det, r00, r01, r11, low_const)
    cells = grid * grid
    offsets = np.zeros(cells + 1, dtype=np.int64)
    dense = np.zeros(cells, dtype=np.bool_)
    flat = np.empty(cells * max_len, dtype=np.int32)
    upper = np.empty(k_all)
    used = 0
    for i in range(grid):
        for j in range(grid):
            best_lower = -np.inf
            for k in range(k_all):
                ex0 = lo0 + i * size0 - mx[k]
                ey0 = lo1 + j * size1 - my[k]
                ex1, ey1 = ex0 + size0, ey0 + size1
                # largest quadratic over the cell: at a corner (convex quadratic)
                worst = -np.inf
                for ex in (ex0, ex1):
                    for ey in (ey0, ey1):
                        worst = max(worst, r00[k] * ex * ex + 2.0 * r01[k] * ex * ey + r11[k] * ey * ey)
                best_lower = max(best_lower, low_const[k] - 0.5 * worst)
                # smallest quadratic over the cell: 0 inside, else the least of the four clamped edge minima
                if ex0 <= 0.0 <= ex1 and ey0 <= 0.0 <= ey1:
                    best = 0.0
                else:
                    best = np.inf
                    for ex in (ex0, ex1):
                        dy = min(max(-q01[k] * ex / q11[k], ey0), ey1)
                        best = min(best, q00[k] * ex * ex + 2.0 * q01[k] * ex * dy + q11[k] * dy * dy)
                    for ey in (ey0, ey1):
                        dx = min(max(-q01[k] * ey / q00[k], ex0), ex1)
                        best = min(best, q00[k] * dx * dx + 2.0 * q01[k] * dx * ey + q11[k] * ey * ey)
                upper[k] = up_const[k] - 0.5 * best
            cut = best_lower - trunc
            cell = i * grid + j
            count = 0
            for k in range(k_all):
                if upper[k] >= cut:
                    count += 1
            if count > max_len:
                dense[cell] = True
            else:
                for k in range(k_all):
                    if upper[k] >= cut:
                        flat[used] = k
                        used += 1
            offsets[cell + 1] = used
    return offsets, flat[:used].copy(), dense

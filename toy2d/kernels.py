"""Compiled (numba) inner loops of the fast exact mixture evaluation.

Everything here is float64 and single-threaded (the callers run one process per core); the kernels are
compiled on first use and cached on disk by numba (``cache=True``), so later processes load them.

Mixture terms, for a point x, added variance v = σ² and component k with ``Σ_k = [[a, b], [b, c]]``::

    D_k   = det Σ_k + v (a + c) + v²                      (det(Σ_k + vI))
    g_k   = (Σ_k + vI)⁻¹ (μ_k − x) = [[c + v, −b], [−b, a + v]] (μ_k − x) / D_k
    l_k   = log φ_k − ½ log D_k − log 2π − ½ (μ_k − x)·g_k
    log p = m + log Σ_k e^{l_k − m},    score = Σ_k e^{l_k − m} g_k / Σ_k e^{l_k − m}.

Chains. The components come in chains of L consecutive ones sharing φ and Σ whose means step evenly,
``μ_i = μ₀ + iΔ`` (the fractal's branches: L = 8; any mixture is chains of L = 1). With P = (Σ + vI)⁻¹,
``h = P(μ₀ − x)``, ``l₀`` the log-term of μ₀, ``β = −Δ·h`` and ``γ = −½ ΔᵀPΔ`` (exact algebra)::

    l_i = l₀ + iβ + i²γ,    g_i = h + i PΔ,
    e^{l_{i+1} − m} = e^{l_i − m} t_i,    t_i = e^{β + (2i + 1)γ},    t_{i+1} = t_i e^{2γ},

so a chain costs two exponentials (``e^{l₀ − m}`` and ``t₀``; ``e^{2γ}`` is per level) and L − 1 steps of
the recurrence, and contributes ``Σ_i e_i`` and ``Σ_i e_i g_i = (Σ_i e_i) h + (Σ_i i e_i) PΔ``.

The reference m is not the row's largest term (a maximum does not vectorise) but a bound ``top`` of every
log-term: at a shared level the largest ``log φ − ½ log D − log 2π`` over the chains, for a row with its own
level the largest log φ (the factor D^{−½} is applied after the exponentials), so every e_i ≤ 1. A row
takes this single vectorised pass when every chain's ``spread = (L − 1)|β| − (L − 1)²γ`` (≥ the span of its
log-terms) is below ``_SAFE_SPREAD`` = 300 nats and Σ_i e_i ≥ e^{−300}. Then nothing is clamped but
possibly e^{l₀ − top} at e^{−700}, for a chain whose terms all lie below top − 400, i.e. ≤ 8e^{−100} of the
row's total. Other rows (points far from every listed component at small σ, or branches whose components
are far apart relative to their width) take a scalar pass for their exact largest term M and then every
term by its own exponential ``e^{max(l_i − M, −700)}``.

Which chains a row visits comes from per-cell candidate lists (:func:`candidate_lists`, CSR) or is every
chain. The exponentials are vectorisable polynomials, unlike libm's exp: :func:`_exp_wide`,
``exp(d) = (Σ_{j≤13} (d/1024)^j / j!)^1024`` for |d| ≤ 708 (Taylor remainder ≤ 0.69¹⁴/14! ≈ 6e-14 at
|d/1024| ≤ 0.69, times 1024 through the 10 squarings, plus their rounding: measured max relative error
1.3e-10 on [−708, 708]), and :func:`_exp_nonpositive`,
``(Σ_{j≤13} (d/64)^j / j!)^64`` for d ∈ [−64, 0] (measured max relative error 1.9e-9 on [−64, 0], 8e-14
on [−32, 0]), used by the compiled toy metrics (``toy2d.metrics``).
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
def _taylor_exp(y: float) -> float:
    """Σ_{j≤13} y^j / j! (Horner), e^y for small |y|; the exponentials below raise it to a power of two."""
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
    return p * y + 1.0


@numba.njit(fastmath=_FASTMATH, inline="always")
def _exp_by_squaring(d: float, squarings: int) -> float:
    """e^d as ``T(d / 2^s)^(2^s)`` with s = ``squarings`` (the loop unrolls once s is a constant)."""
    p = _taylor_exp(d * (1.0 / (1 << squarings)))
    for _ in range(squarings):
        p = p * p
    return p


@numba.njit(fastmath=_FASTMATH, inline="always")
def _exp_nonpositive(d: float) -> float:
    """e^d for d ∈ [−64, 0] (module docstring: ≤ 1.9e-9 relative error, ≤ 8e-14 on [−32, 0]): ``T(d/64)^64``."""
    return _exp_by_squaring(d, 6)


@numba.njit(fastmath=_FASTMATH, inline="always")
def _exp_wide(d: float) -> float:
    """e^d for |d| ≤ 708 (module docstring: ≤ 1.3e-10 relative error): ``T(d/1024)^1024``."""
    return _exp_by_squaring(d, 10)


_EXP_CLAMP = 700.0
"""Exponents are clamped to [−700, 700] (inside the range of :func:`_exp_wide`)."""
_SAFE_SPREAD = 300.0
"""Rows with a chain whose log-terms may span this many nats or more take the direct sum (module docstring)."""
_UNDERFLOW = 300.0
"""Rows whose terms sum to less than e^{−300} of the bound ``top`` take the direct sum (module docstring)."""


@numba.njit(cache=True, error_model="numpy")
def _level_terms(v, log_w, dx, dy, a, b, c, det, const, p00, p01, p11, q0, q1, gam, ratio2):
    """Per-chain constants at added variance v: ``log φ − ½ log D − log 2π``, the precision P, ``PΔ``,
    ``γ = −½ ΔᵀPΔ`` and ``e^{2γ}``; returns the largest constant (a bound of every log-term at v)."""
    top = -np.inf
    for k in range(log_w.shape[0]):
        d = det[k] + v * (a[k] + c[k]) + v * v
        const[k] = log_w[k] - 0.5 * math.log(d) - _LOG_2PI
        p00[k], p01[k], p11[k] = (c[k] + v) / d, -b[k] / d, (a[k] + v) / d
        q0[k] = p00[k] * dx[k] + p01[k] * dy[k]
        q1[k] = p01[k] * dx[k] + p11[k] * dy[k]
        gam[k] = -0.5 * (dx[k] * q0[k] + dy[k] * q1[k])
        ratio2[k] = math.exp(max(2.0 * gam[k], -_EXP_CLAMP))
        top = max(top, const[k])
    return top


@numba.njit(fastmath=_FASTMATH, inline="always")
def _own_terms(x0, x1, v, k, mx, my, dx, dy, log_w, a, b, c, det):
    """Chain k at a row's own level v: (l₀ = log φ − ½ (μ₀ − x)ᵀP(μ₀ − x), β, γ, h = P(μ₀ − x), PΔ, D^{−½})."""
    inv = 1.0 / (det[k] + v * (a[k] + c[k]) + v * v)
    r00, r01, r11 = (c[k] + v) * inv, -b[k] * inv, (a[k] + v) * inv
    d0, d1 = mx[k] - x0, my[k] - x1
    h0 = r00 * d0 + r01 * d1
    h1 = r01 * d0 + r11 * d1
    w0 = r00 * dx[k] + r01 * dy[k]
    w1 = r01 * dx[k] + r11 * dy[k]
    return (log_w[k] - 0.5 * (d0 * h0 + d1 * h1), -(dx[k] * h0 + dy[k] * h1), -0.5 * (dx[k] * w0 + dy[k] * w1),
            h0, h1, w0, w1, math.sqrt(inv))


@numba.njit(fastmath=_FASTMATH, inline="always")
def _chain_sums_8(e, t, r):
    """(Σ_i e_i, Σ_i i e_i), i < 8, for e_0 = e, e_{i+1} = e_i t_i, t_{i+1} = t_i r."""
    total, moment = e, 0.0
    for i in range(1, 8):
        e *= t
        t *= r
        total += e
        moment += i * e
    return total, moment


@numba.njit(fastmath=_FASTMATH, inline="always")
def _chain_sums_1(e, t, r):
    """(e, 0): a chain of one component."""
    return e, 0.0


def _chain_loop(gathered: bool, length: int, shared: bool):
    """The loop over a row's chains (``idx[first + j]`` if ``gathered``, else ``first + j``; j < size) for chains
    of ``length`` at a shared level (its arrays) or the row's own v, compiled per case so that it vectorises.
    Returns (Σ e, Σ e g₀, Σ e g₁, Σ e without the factors D^{−½}, number of chains spanning ≥ ``_SAFE_SPREAD``)
    with ``e_i = e^{l_i − top}`` (module docstring)."""
    last = float(length - 1)
    chain_sums = _chain_sums_8 if length == 8 else _chain_sums_1

    @numba.njit(fastmath=_FASTMATH, inline="always")
    def chain_terms(x0, x1, v, k, mx, my, dx, dy, log_w, a, b, c, det, const, p00, p01, p11, q0, q1, gam):
        """(l₀, β, γ, h, PΔ, D^{−½}) of chain k at the shared level (factor 1) or the row's own."""
        if shared:
            d0, d1 = mx[k] - x0, my[k] - x1
            h0 = p00[k] * d0 + p01[k] * d1
            h1 = p01[k] * d0 + p11[k] * d1
            return (const[k] - 0.5 * (d0 * h0 + d1 * h1), -(dx[k] * h0 + dy[k] * h1), gam[k], h0, h1, q0[k], q1[k],
                    1.0)
        return _own_terms(x0, x1, v, k, mx, my, dx, dy, log_w, a, b, c, det)

    @numba.njit(fastmath=_FASTMATH)
    def largest(x0, x1, v, idx, first, size, mx, my, dx, dy, log_w, a, b, c, det, const, p00, p01, p11, q0, q1, gam):
        """The row's exact largest log-term (without the factors D^{−½}): a scalar pass."""
        top = -np.inf
        for j in range(size):
            k = idx[first + j] if gathered else first + j
            l0, beta, g, _, _, _, _, _ = chain_terms(x0, x1, v, k, mx, my, dx, dy, log_w, a, b, c, det, const, p00,
                                                     p01, p11, q0, q1, gam)
            for i in range(length):
                top = max(top, l0 + i * beta + i * i * g)
        return top

    @numba.njit(fastmath=_FASTMATH, inline="always")
    def direct(x0, x1, v, idx, first, size, top, mx, my, dx, dy, log_w, a, b, c, det, const, p00, p01, p11, q0, q1,
               gam):
        """(Σ e, Σ e g₀, Σ e g₁) with every term its own exponential ``e^{max(l_i − top, −700)}`` (times D^{−½})."""
        s, s0, s1 = 0.0, 0.0, 0.0
        for j in range(size):
            k = idx[first + j] if gathered else first + j
            l0, beta, g, h0, h1, w0, w1, scale = chain_terms(x0, x1, v, k, mx, my, dx, dy, log_w, a, b, c, det,
                                                             const, p00, p01, p11, q0, q1, gam)
            for i in range(length):
                e = scale * _exp_wide(max(l0 + i * beta + i * i * g - top, -_EXP_CLAMP))
                s += e
                s0 += e * (h0 + i * w0)
                s1 += e * (h1 + i * w1)
        return s, s0, s1

    @numba.njit(fastmath=_FASTMATH, inline="always")
    def loop(x0, x1, v, idx, first, size, top, mx, my, dx, dy, log_w, a, b, c, det, const, p00, p01, p11, q0, q1,
             gam, ratio2):
        """The single vectorised pass: two exponentials and the recurrence per chain (module docstring)."""
        s, s0, s1, plain, unsafe = 0.0, 0.0, 0.0, 0.0, 0.0
        for j in range(size):
            k = idx[first + j] if gathered else first + j
            l0, beta, g, h0, h1, w0, w1, scale = chain_terms(x0, x1, v, k, mx, my, dx, dy, log_w, a, b, c, det,
                                                             const, p00, p01, p11, q0, q1, gam)
            r = ratio2[k] if shared else _exp_wide(max(2.0 * g, -_EXP_CLAMP))
            unsafe += 1.0 if last * abs(beta) - last * last * g >= _SAFE_SPREAD else 0.0
            e = _exp_wide(max(l0 - top, -_EXP_CLAMP))
            t = _exp_wide(min(max(beta + g, -_EXP_CLAMP), _EXP_CLAMP))
            total, moment = chain_sums(e, t, r)
            if not shared:
                plain += total
                total *= scale
                moment *= scale
            s += total
            s0 += total * h0 + moment * w0
            s1 += total * h1 + moment * w1
        return s, s0, s1, (s if shared else plain), unsafe

    return loop, largest, direct


def _row_run(length: int, shared: bool):
    """Rows [start, end) of one level (:func:`mixture_rows`) into out, each over every chain or its cell's list:
    the recurrence against the bound ``top``, or, where that underflows or a chain spans ≥ ``_SAFE_SPREAD``
    nats, every term by its own exponential against the row's exact largest term."""
    every_loop, every_largest, every_direct = _chain_loop(False, length, shared)
    listed_loop, listed_largest, listed_direct = _chain_loop(True, length, shared)
    floor = math.exp(-_UNDERFLOW)

    @numba.njit(fastmath=_FASTMATH, inline="always")
    def run(x, start, end, v, top, cell, offsets, flat, dense, mx, my, dx, dy, log_w, a, b, c, det, const, p00, p01,
            p11, q0, q1, gam, ratio2, out):
        for i in range(start, end):
            x0, x1 = x[i, 0], x[i, 1]
            every = cell[i] < 0 or dense[cell[i]]
            first = 0 if every else offsets[cell[i]]
            size = log_w.shape[0] if every else offsets[cell[i] + 1] - first
            row_top = top
            if every:
                s, s0, s1, plain, unsafe = every_loop(x0, x1, v, flat, 0, size, top, mx, my, dx, dy, log_w, a, b, c,
                                                      det, const, p00, p01, p11, q0, q1, gam, ratio2)
            else:
                s, s0, s1, plain, unsafe = listed_loop(x0, x1, v, flat, first, size, top, mx, my, dx, dy, log_w, a, b,
                                                       c, det, const, p00, p01, p11, q0, q1, gam, ratio2)
            if unsafe > 0.0 or not plain >= floor:
                if every:
                    row_top = every_largest(x0, x1, v, flat, 0, size, mx, my, dx, dy, log_w, a, b, c, det, const, p00,
                                            p01, p11, q0, q1, gam)
                    s, s0, s1 = every_direct(x0, x1, v, flat, 0, size, row_top, mx, my, dx, dy, log_w, a, b, c, det,
                                             const, p00, p01, p11, q0, q1, gam)
                else:
                    row_top = listed_largest(x0, x1, v, flat, first, size, mx, my, dx, dy, log_w, a, b, c, det, const,
                                             p00, p01, p11, q0, q1, gam)
                    s, s0, s1 = listed_direct(x0, x1, v, flat, first, size, row_top, mx, my, dx, dy, log_w, a, b, c,
                                              det, const, p00, p01, p11, q0, q1, gam)
            out[i, 0] = row_top + math.log(s) - (0.0 if shared else _LOG_2PI)
            out[i, 1] = s0 / s
            out[i, 2] = s1 / s

    return run


_run_8s, _run_8o, _run_1s, _run_1o = (_row_run(length, shared) for length in (8, 1) for shared in (True, False))


def _mixture_rows(length: int):
    """:func:`mixture_rows` for chains of ``length`` (compiled on first use of that length, cached on disk: the
    row runs are module globals and ``length`` a constant, so the cache key is stable and the other length's
    branch is pruned before compilation)."""

    @numba.njit(fastmath=_FASTMATH, cache=True, error_model="numpy")
    def rows(x, var, cell, offsets, flat, dense, log_w, mx, my, dx, dy, a, b, c, det, out):
        n_chains, n = log_w.shape[0], x.shape[0]
        const, p00, p01, p11 = np.empty(n_chains), np.empty(n_chains), np.empty(n_chains), np.empty(n_chains)
        q0, q1, gam, ratio2 = np.empty(n_chains), np.empty(n_chains), np.empty(n_chains), np.empty(n_chains)
        top_own = log_w.max()
        start = 0
        while start < n:
            v = var[start]
            end = start + 1
            while end < n and var[end] == v:
                end += 1
            shared = end - start >= 16
            top = _level_terms(v, log_w, dx, dy, a, b, c, det, const, p00, p01, p11, q0, q1, gam, ratio2) if shared \
                else top_own
            if length == 8 and shared:
                _run_8s(x, start, end, v, top, cell, offsets, flat, dense, mx, my, dx, dy, log_w, a, b, c, det, const,
                        p00, p01, p11, q0, q1, gam, ratio2, out)
            elif length == 8:
                _run_8o(x, start, end, v, top, cell, offsets, flat, dense, mx, my, dx, dy, log_w, a, b, c, det, const,
                        p00, p01, p11, q0, q1, gam, ratio2, out)
            elif shared:
                _run_1s(x, start, end, v, top, cell, offsets, flat, dense, mx, my, dx, dy, log_w, a, b, c, det, const,
                        p00, p01, p11, q0, q1, gam, ratio2, out)
            else:
                _run_1o(x, start, end, v, top, cell, offsets, flat, dense, mx, my, dx, dy, log_w, a, b, c, det, const,
                        p00, p01, p11, q0, q1, gam, ratio2, out)
            start = end

    return rows


CHAIN_LENGTHS = (8, 1)
"""Chain lengths the kernels are compiled for: the fractal's branches of 8, and single components."""
_ROWS = {length: _mixture_rows(length) for length in CHAIN_LENGTHS}


def mixture_rows(x, var, cell, offsets, flat, dense, length, log_w, mx, my, dx, dy, a, b, c, det, out):
    """log p and score (module docstring) of rows x [n, 2] at added variances var [n] into out [n, 3].

    The mixture is given as C chains of ``length`` ∈ ``CHAIN_LENGTHS`` components (first mean (mx, my),
    step (dx, dy), shared log-weight and covariance [[a, b], [b, c]] with determinant det). Row i sums over
    the chains ``flat[offsets[cell[i]]:offsets[cell[i] + 1]]`` (:func:`candidate_lists`), or over all
    chains when ``cell[i] < 0`` or ``dense[cell[i]]``. Rows sharing a variance should be adjacent: a run of
    ≥ 16 such rows gets the per-chain constants once (:func:`_level_terms`); other rows compute them per
    chain, with the factor D^{−½} instead of a logarithm.
    """
    if length not in _ROWS:
        raise ValueError(f"chain length must be one of {CHAIN_LENGTHS}, got {length}")
    _ROWS[length](x, var, cell, offsets, flat, dense, log_w, mx, my, dx, dy, a, b, c, det, out)


@numba.njit(cache=True)
def _bound_terms(v, v_det, log_w, a, b, c, det, p00, p01, p11, const):
    """Precision entries of Σ_k + vI into p00, p01, p11 and ``log φ_k − log 2π − ½ log det(Σ_k + v_det I)``
    into const (the bounds of :func:`candidate_lists` take the two from opposite ends of the bucket)."""
    for k in range(a.shape[0]):
        d = det[k] + v * (a[k] + c[k]) + v * v
        p00[k], p01[k], p11[k] = (c[k] + v) / d, -b[k] / d, (a[k] + v) / d
        const[k] = log_w[k] - _LOG_2PI - 0.5 * math.log(det[k] + v_det * (a[k] + c[k]) + v_det * v_det)


@numba.njit(fastmath=_FASTMATH, cache=True)
def candidate_lists(lo0, lo1, size0, size1, grid, v_lo, v_hi, log_w, mx, my, a, b, c, det, trunc, max_len,
                    length):
    """Per grid cell, the chains (runs of ``length`` consecutive components) with a component whose log-term
    can come within ``trunc`` nats of the best one anywhere in the cell, for every added variance in
    [v_lo, v_hi] (bounds: ``toy2d.gmm`` module docstring); the arguments are per component.

    Cell (i, j) (row i·grid + j) is ``[lo0 + i·size0, lo0 + (i+1)·size0] × [lo1 + j·size1, …]``. Returns
    CSR lists: ``offsets`` [cells + 1] (int64) and ``flat`` chain indices (int32); a cell with more than
    ``max_len`` candidate chains gets an empty list and ``dense[cell] = True`` (evaluate every chain there).
    """
    k_all = a.shape[0]
    # upper bound of a log-term: smallest Mahalanobis distance (largest v), log det at the smallest v
    q00, q01, q11, up_const = np.empty(k_all), np.empty(k_all), np.empty(k_all), np.empty(k_all)
    _bound_terms(v_hi, v_lo, log_w, a, b, c, det, q00, q01, q11, up_const)
    # lower bound: largest Mahalanobis distance (smallest v), log det at the largest v
    r00, r01, r11, low_const = np.empty(k_all), np.empty(k_all), np.empty(k_all), np.empty(k_all)
    _bound_terms(v_lo, v_hi, log_w, a, b, c, det, r00, r01, r11, low_const)
    cells, n_chains = grid * grid, k_all // length
    offsets = np.zeros(cells + 1, dtype=np.int64)
    dense = np.zeros(cells, dtype=np.bool_)
    flat = np.empty(cells * max_len, dtype=np.int32)
    upper = np.empty(k_all)
    chain_upper = np.empty(n_chains)
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
            for q in range(n_chains):
                chain_upper[q] = upper[q * length]
                for r in range(1, length):
                    chain_upper[q] = max(chain_upper[q], upper[q * length + r])
                if chain_upper[q] >= cut:
                    count += 1
            if count > max_len:
                dense[cell] = True
            else:
                for q in range(n_chains):
                    if chain_upper[q] >= cut:
                        flat[used] = q
                        used += 1
            offsets[cell + 1] = used
    return offsets, flat[:used].copy(), dense

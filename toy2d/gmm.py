"""2D Gaussian mixtures with exact heat diffusion, scores and product-with-kernel sampling.

The mixture is ``p(x) = Σ_k φ_k N(x; μ_k, Σ_k)``. Heat diffusion to noise level σ convolves it with
``N(0, σ² I)``, which only adds σ² to every covariance:

    p_σ(x) = Σ_k φ_k N(x; μ_k, Σ'_k),    Σ'_k = Σ_k + σ² I,
    ∇log p_σ(x) = Σ_k r_k(x) Σ'_k⁻¹ (μ_k − x),    r_k = φ_k N(x; μ_k, Σ'_k) / p_σ(x).

Everything is evaluated with the closed forms of a 2×2 symmetric matrix ``[[a, b], [b, c]]``
(``det = ac − b²``, ``inverse = [[c, −b], [−b, a]] / det``) on [N, K] tensors, in float64, with the
responsibilities taken from a log-sum-exp. Points arbitrarily far from the data (distance 10³ and
more) therefore get finite log-densities and scores; the score there points back toward the data.
Outputs are returned in the dtype of the query points.

Fast exact evaluation (mixtures of ``_FAST_MIN_K`` components or more): a component whose log-term is more
than ``_TRUNCATION`` = 40 nats below the largest one at x carries responsibility < e⁻⁴⁰ and is dropped.
The canvas around the means is cut into ``_GRID``² cells and σ into geometric buckets; per (bucket, cell)
the components that can come within 40 nats of the best one anywhere in the cell are listed: an upper
bound of each log-term over the cell from the exact minimum of the Mahalanobis quadratic over the cell
(0 inside, else a clamped 1-D minimum on each edge) at the bucket's largest v = σ², with log det at its
smallest v, against a lower bound from the exact maximum (at a corner) at the smallest v, with log det at
the largest v; the Mahalanobis term decreases and log det increases with v, so the lists are
conservative. Query points are sorted by list length and evaluated on gathered [rows, M] blocks (M ≪ K
at small σ) with the same float64 closed forms. The dropped mass is ≤ K e⁻⁴⁰ of the total (log-density
error ≤ 1e-14 for K ≈ 2000; score error ≤ K e⁻⁴⁰ max_k ‖(Σ_k+vI)⁻¹(μ_k − x)‖). Points off the grid, and
cells whose lists keep more than half the components (most cells at σ ≳ 0.1), use the dense closed form.
The lists of a bucket are built on first use and cached (≈ 0.5 s for K = 1016, ≈ 1 s for K = 2032).

Smooth levels (σ ∈ [0.3, 50]) requested with ≥ 1024 rows and no autograd (at once for σ ≥ 1, else
from the third request on, e.g. an ODE solve's σ grid met again at every optimisation step) get a cached
interpolant of (log p_σ, ∇log p_σ): adaptive piecewise Chebyshev tiles (``toy2d.tiles``: top tiles of side
8σ, 16 × 16 points, up to five levels of 2 × 2 refinement wherever the tail coefficients exceed 1e-6 of the
tile's scale) over the means' box padded by 0.5 + 4σ, tabulated with the exact evaluation above. Points
off the box or on rejected tiles are evaluated exactly. Not exact, but ≤ 1e-7 relative error on log p and
the score against the float64 dense reference at every tested σ (tests, ``make bench``); a table costs
~10³ exact evaluations at σ ≥ 1 and ~10⁴ at σ = 0.3, once per level.

Multiplying the mixture by a Gaussian kernel ``N(y; c, λ² I)`` gives another mixture (the product
distribution of mean-shift, ``ṗ(y | c) ∝ p(y) N(y; c, λ² I)``):

    weights ∝ φ_k N(c; μ_k, S_k),  means μ_k + Σ_k S_k⁻¹ (c − μ_k),  covs Σ_k − Σ_k S_k⁻¹ Σ_k = λ² Σ_k S_k⁻¹,

with ``S_k = Σ_k + λ² I``; it is sampled exactly by :meth:`GaussianMixture.product_sample`. Its mean
obeys ``E[y] − c = λ² ∇log p_λ(c)`` (the kernel-smoothed density ``p ∗ G_λ`` is ``p_σ`` at σ = λ).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor

from toy2d.tiles import TileInterpolant

_LOG_2PI = math.log(2.0 * math.pi)
_CHUNK_ELEMENTS = 1 << 14
"""Rows × components evaluated at once: small enough for the [rows, K] float64 intermediates to stay in
CPU cache (measured ~4× faster than one 2^21-element block for K = 1016)."""


_FAST_MIN_K = 64
"""Mixtures with fewer components always use the dense closed form (nothing to gain from pruning)."""
_TRUNCATION = 40.0
"""Components more than this many nats below the best one at a point are dropped (responsibility < e⁻⁴⁰)."""
_GRID = 64
"""Cells per axis of the candidate-list grid."""
_SIGMA_FLOOR, _SIGMA_RATIO, _N_BUCKETS = 1e-3, 1.5, 24
"""σ buckets: [0, 1e-3) then [1e-3·1.5^(i−1), 1e-3·1.5^i) for i = 1 … 23 (up to ≈ 11); beyond: dense."""
_FAST_ELEMENTS = 1 << 15
"""Rows × candidates evaluated at once on the fast path."""
_TILE_SIGMA_MIN, _TILE_SIGMA_MAX = 0.3, 50.0
"""Noise levels that may get cached interpolants. Below 0.3 a table needs 10⁴–10⁵ nodes (0.1: ~3·10⁵), which
a few hundred calls on 4096 points do not pay back; below ~0.05 the candidate lists are fast anyway."""
_TILE_WIDTH, _TILE_MAX, _TILE_ORDER, _TILE_TOL, _TILE_DEPTH = 8.0, 64, 16, 1e-6, 5
"""Top-level tile side 8σ (at most 64 tiles per axis), 16 × 16 Chebyshev points per tile, tail tolerance
1e-6 of the tile's largest |log p| (≥ 1) or ‖score‖, and up to five levels of 2 × 2 refinement."""
_TILE_MIN_ROWS, _TILE_CACHE, _TILE_FIRST_REQUEST, _TILE_REPEATS = 1024, 64, 1.0, 3
"""A level is tabulated when requested with ≥ 1024 rows: at once for σ ≥ 1 (about a thousand nodes), else on
its third request (a Heun solve asks for each level twice; a table costs more than one exact call); at most
64 levels are kept."""


def _levels(value: float | Tensor, n: int, device: torch.device, name: str) -> Tensor:
    """A noise level or bandwidth given as a float or an [n] tensor, as a float64 [n] tensor."""
    value = torch.as_tensor(value, dtype=torch.float64, device=device)
    if value.ndim == 0:
        value = value.expand(n)
    if value.shape != (n,):
        raise ValueError(f"{name} must be a float or a tensor of shape [{n}], got {tuple(value.shape)}")
    return value


def _cholesky(a11: Tensor, a21: Tensor, det: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Lower Cholesky factor ``[[l11, 0], [l21, l22]]`` of ``[[a11, a21], [a21, ·]]`` with determinant ``det``.

    ``l11 = √a11``, ``l21 = a21 / l11``, ``l22 = √(det / a11)`` (no subtraction, so no cancellation).
    """
    l11 = a11.sqrt()
    return l11, a21 / l11, (det / a11).sqrt()


class GaussianMixture:
    """A mixture of K 2D Gaussians with exact heat-diffused density, score and sampling.

    Args:
        weights: [K] non-negative mixture weights (normalised here).
        means: [K, 2] component means.
        covs: [K, 2, 2] symmetric positive-definite component covariances.
        cache_levels: tabulate repeatedly requested noise levels (module docstring); False: always exact.
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor, cache_levels: bool = True):
        weights = torch.as_tensor(weights, dtype=torch.float32)
        means = torch.as_tensor(means, dtype=torch.float32)
        covs = torch.as_tensor(covs, dtype=torch.float32)
        k = weights.shape[0]
        if weights.ndim != 1 or means.shape != (k, 2) or covs.shape != (k, 2, 2):
            raise ValueError(f"expected weights [K], means [K, 2], covs [K, 2, 2]; got "
                             f"{tuple(weights.shape)}, {tuple(means.shape)}, {tuple(covs.shape)}")
        if k == 0 or bool((weights < 0).any()) or float(weights.sum()) <= 0.0:
            raise ValueError("weights must be non-negative with a positive sum")
        self._weights = weights / weights.sum()
        self._means = means
        self._covs = 0.5 * (covs + covs.transpose(1, 2))
        # float64 working copies: log-weights, means and the entries [[a, b], [b, c]] of each Σ_k.
        cov64 = self._covs.double()
        self._log_w = torch.log(self._weights.double())
        self._mu = means.double()
        self._a, self._b, self._c = cov64[:, 0, 0], cov64[:, 0, 1], cov64[:, 1, 1]
        self._det = self._a * self._c - self._b**2
        if bool((self._a <= 0).any()) or bool((self._det <= 0).any()):
            raise ValueError("covariances must be positive definite")
        self._tables: dict[int, tuple[Tensor, Tensor] | None] = {}  # σ bucket -> ([cells, M] lists, [cells] lengths)
        self._grid: tuple[Tensor, Tensor, Tensor] | None = None  # (lower corner, cell size, cells per axis)
        self.cache_levels = bool(cache_levels)
        self._interpolants: OrderedDict[float, TileInterpolant] = OrderedDict()  # σ -> interpolant (LRU)
        self._requests: dict[float, int] = {}  # σ -> requests seen (insertion-ordered, bounded)

    @property
    def weights(self) -> Tensor:
        """[K] normalised mixture weights φ_k."""
        return self._weights

    @property
    def means(self) -> Tensor:
        """[K, 2] component means μ_k."""
        return self._means

    @property
    def covs(self) -> Tensor:
        """[K, 2, 2] component covariances Σ_k (at σ = 0)."""
        return self._covs

    def __len__(self) -> int:
        return self._weights.shape[0]

    def _component(self, idx: Tensor | slice, device: torch.device) -> tuple[Tensor, ...]:
        """(log φ, μ, a, b, c, det Σ) of the components ``idx``, on ``device``."""
        return tuple(t[idx].to(device) for t in (self._log_w, self._mu, self._a, self._b, self._c, self._det))

    def _row_slices(self, n: int) -> list[slice]:
        """Row blocks of an [n, ...] batch, each small enough for the [rows, K] intermediates."""
        step = max(1, _CHUNK_ELEMENTS // len(self))
        return [slice(i, i + step) for i in range(0, max(n, 1), step)]

    def _log_terms(self, x: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component terms at points x [n, 2] (float64) for added variance ``var`` [n].

        Returns ``log φ_k + log N(x; μ_k, Σ_k + var·I)`` [n, K] and the two coordinates of
        ``(Σ_k + var·I)⁻¹ (μ_k − x)`` [n, K].
        """
        log_w, mu, a, b, c, det = self._component(slice(None), x.device)
        if x.shape[0] > 1 and not var.requires_grad and bool((var == var[0]).all()):
            # one level for every row: the precision (Σ + vI)⁻¹ and log det are per component, [K]
            v = var[0]
            det = det + v * (a + c) + v * v
            p00, p01, p11 = (c + v) / det, -b / det, (a + v) / det
            const = log_w - 0.5 * det.log() - _LOG_2PI
            d0, d1 = mu[:, 0] - x[:, :1], mu[:, 1] - x[:, 1:]
            g0 = p00 * d0 + p01 * d1
            g1 = p01 * d0 + p11 * d1
            return const - 0.5 * (d0 * g0 + d1 * g1), g0, g1
        v = var[:, None]
        det = det + v * (a + c) + v * v  # det(Σ + vI) = det Σ + v tr Σ + v²
        a, c = a + v, c + v
        d0, d1 = mu[:, 0] - x[:, :1], mu[:, 1] - x[:, 1:]
        g0 = (c * d0 - b * d1) / det
        g1 = (a * d1 - b * d0) / det
        maha = d0 * g0 + d1 * g1
        return log_w - 0.5 * (maha + det.log()) - _LOG_2PI, g0, g1


    # ----- fast exact evaluation: per-cell candidate lists (module docstring) -----

    def _grid_setup(self) -> tuple[Tensor, Tensor]:
        """Lower corner [2] and cell size [2] of the candidate grid (means' box, padded generously)."""
        if self._grid is None:
            lo, hi = self._mu.min(0).values, self._mu.max(0).values
            pad = 0.5 * float((hi - lo).max()) + 0.5
            lo, hi = lo - pad, hi + pad
            self._grid = (lo, (hi - lo) / _GRID)
        return self._grid

    @staticmethod
    def _bucket_of(sigma: Tensor) -> Tensor:
        """σ bucket index of each level (int64); ``_N_BUCKETS`` and above mean dense evaluation."""
        s = sigma.abs()
        idx = torch.floor(torch.log(s.clamp_min(_SIGMA_FLOOR) / _SIGMA_FLOOR) / math.log(_SIGMA_RATIO)) + 1
        idx = torch.where(s < _SIGMA_FLOOR, torch.zeros_like(idx), idx)
        return torch.nan_to_num(idx, nan=_N_BUCKETS, posinf=_N_BUCKETS).clamp(0, _N_BUCKETS).long()

    def _table(self, bucket: int) -> tuple[Tensor, Tensor] | None:
        """[cells, M] candidate components per cell for σ bucket ``bucket`` (index K pads) and the [cells]
        list lengths (K + 1: more than half the components are kept, evaluate densely), or None if no cell
        has a short list."""
        if bucket in self._tables:
            return self._tables[bucket]
        lo, size = self._grid_setup()
        k = len(self)
        s_lo = 0.0 if bucket == 0 else _SIGMA_FLOOR * _SIGMA_RATIO ** (bucket - 1)
        s_hi = _SIGMA_FLOOR * _SIGMA_RATIO**bucket
        v_lo, v_hi = s_lo**2, s_hi**2
        cells = torch.arange(_GRID, dtype=torch.float64)
        # cell edges relative to each mean, [G, 1, K] along x and [1, G, K] along y (cell (i, j) -> row i·G + j)
        ex0 = (lo[0] + cells * size[0])[:, None] - self._mu[:, 0]
        ey0 = (lo[1] + cells * size[1])[:, None] - self._mu[:, 1]
        ex0, ex1 = ex0[:, None, :], (ex0 + size[0])[:, None, :]
        ey0, ey1 = ey0[None], (ey0 + size[1])[None]
        tr, b = self._a + self._c, self._b

        def quad(v: float):
            """(p00, p01, p11) of (Σ + vI)⁻¹ and log det(Σ + vI), each [K]."""
            det = self._det + v * tr + v * v
            return (self._c + v) / det, -b / det, (self._a + v) / det, det.log()

        # smallest Mahalanobis distance over the cell (largest v): 0 inside, else the least of the four edges,
        # each a 1-D quadratic minimised in closed form and clamped to the edge
        p00, p01, p11, _ = quad(v_hi)
        inside = (ex0 <= 0) & (ex1 >= 0) & (ey0 <= 0) & (ey1 >= 0)
        best = None
        for ex in (ex0, ex1):  # vertical edges: dx fixed, dy in [ey0, ey1]
            dy = torch.minimum(torch.maximum(-p01 * ex / p11, ey0), ey1)
            q = (dy * (2 * p01 * ex + p11 * dy)).add_(p00 * ex * ex)
            best = q if best is None else torch.minimum(best, q, out=best)
        for ey in (ey0, ey1):  # horizontal edges: dy fixed, dx in [ex0, ex1]
            dx = torch.minimum(torch.maximum(-p01 * ey / p00, ex0), ex1)
            torch.minimum(best, (dx * (2 * p01 * ey + p00 * dx)).add_(p11 * ey * ey), out=best)
        best = torch.where(inside, torch.zeros_like(best), best)
        _, _, _, log_det_lo = quad(v_lo)
        upper = (self._log_w - _LOG_2PI - 0.5 * log_det_lo) - 0.5 * best.reshape(_GRID * _GRID, k)
        # largest Mahalanobis distance over the cell (smallest v): a convex quadratic peaks at a corner
        p00, p01, p11, _ = quad(v_lo)
        worst = None
        for ex in (ex0, ex1):
            for ey in (ey0, ey1):
                q = ((2 * p01 * ex) * ey).add_(p00 * ex * ex).add_(p11 * ey * ey)
                worst = q if worst is None else torch.maximum(worst, q, out=worst)
        _, _, _, log_det_hi = quad(v_hi)
        lower = (self._log_w - _LOG_2PI - 0.5 * log_det_hi) - 0.5 * worst.reshape(_GRID * _GRID, k)
        keep = upper >= lower.max(1, keepdim=True).values - _TRUNCATION
        counts = keep.sum(1)
        listed = counts <= k // 2  # cells whose lists are short enough to pay off; the others go dense
        if not bool(listed.any()):
            table = None
        else:
            m = int(counts[listed].max())
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :m]
            lists = torch.where(torch.gather(keep, 1, order), order, torch.full_like(order, k))
            lengths = torch.where(listed, counts, torch.full_like(counts, k + 1))
            table = (lists.to(torch.int16 if k < 32767 else torch.int32).contiguous(), lengths)
        self._tables[bucket] = table
        return table

    def _padded(self) -> Tensor:
        """[7, K + 1]: rows log φ, μx, μy, a, b, c, det, with a padding component of log-weight −∞ (index K)."""
        if not hasattr(self, "_pad_cache"):
            cols = torch.stack((self._log_w, self._mu[:, 0], self._mu[:, 1], self._a, self._b, self._c, self._det))
            pad = torch.tensor([-math.inf, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)[:, None]
            self._pad_cache = torch.cat((cols, pad), dim=1).contiguous()
        return self._pad_cache

    def _gathered_terms(self, x: Tensor, var: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`_log_terms` but only for the components ``idx`` [n, M] of each row."""
        params = self._padded().to(x.device).index_select(1, idx.reshape(-1)).view(7, *idx.shape)
        log_w, mx, my, a, b, c, det = params.unbind(0)
        v = var[:, None]
        det = det + v * (a + c) + v * v
        a, c = a + v, c + v
        d0, d1 = mx - x[:, :1], my - x[:, 1:]
        g0 = (c * d0 - b * d1) / det
        g1 = (a * d1 - b * d0) / det
        maha = d0 * g0 + d1 * g1
        return log_w - 0.5 * (maha + det.log()) - _LOG_2PI, g0, g1

    def _blocks(self, x64: Tensor, sigma: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        """Split the rows into blocks: (row indices, candidate lists [rows, M] or None for all components)."""
        n = x64.shape[0]
        rows = torch.arange(n, device=x64.device)
        if len(self) < _FAST_MIN_K or n == 0:
            return [(r, None) for r in rows.split(max(1, _CHUNK_ELEMENTS // len(self)))]
        lo, size = self._grid_setup()
        lo, size = lo.to(x64.device), size.to(x64.device)
        cell = torch.floor((x64.detach() - lo) / size)
        inside = ((cell >= 0) & (cell < _GRID)).all(1)  # False for NaN too
        cell = torch.where(inside[:, None], cell, torch.zeros_like(cell)).long()
        cell = cell[:, 0] * _GRID + cell[:, 1]
        bucket = torch.where(inside, self._bucket_of(sigma), torch.full_like(cell, _N_BUCKETS))
        blocks, dense_rows = [], [rows[bucket >= _N_BUCKETS]]
        for b in torch.unique(bucket).tolist():
            if b >= _N_BUCKETS:
                continue
            sel = rows[bucket == b]
            entry = self._table(b)
            if entry is None:
                dense_rows.append(sel)
                continue
            table, lengths = (t.to(x64.device) for t in entry)
            counts = lengths[cell[sel]]
            dense_rows.append(sel[counts > len(self)])
            sel, counts = sel[counts <= len(self)], counts[counts <= len(self)]
            order = torch.argsort(counts)
            sel, counts = sel[order], counts[order].tolist()
            counts_t = torch.tensor(counts)
            start = 0
            while start < len(sel):  # blocks of similar list length (padding ≤ 25 % + 4), ≤ _FAST_ELEMENTS each
                limit = int(counts[start] * 1.25) + 4
                end = int(torch.searchsorted(counts_t, limit, right=True))
                m = max(counts[end - 1], 1)
                end = min(end, start + max(1, _FAST_ELEMENTS // m))
                m = max(counts[end - 1], 1)
                blocks.append((sel[start:end], table[:, :m].index_select(0, cell[sel[start:end]]).long()))
                start = end
        dense = torch.cat(dense_rows)
        blocks += [(r, None) for r in dense.split(max(1, _CHUNK_ELEMENTS // len(self)))]
        return blocks

    def _terms(self, x64: Tensor, var: Tensor, idx: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        return self._log_terms(x64, var) if idx is None else self._gathered_terms(x64, var, idx)

    def _unpermute(self, rows: list[Tensor], values: list[Tensor], n: int) -> Tensor:
        """Concatenate per-block outputs and restore the original row order."""
        perm = torch.cat(rows)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(n, device=perm.device)
        return torch.cat(values)[inv]

    # ----- cached interpolants for repeated noise levels (module docstring) -----

    def _exact_both(self, x64: Tensor, sigma: Tensor) -> Tensor:
        """[N, 3]: log p_σ and the score at x64 [N, 2] (float64, no autograd) by the exact paths."""
        var = sigma**2
        blocks = self._blocks(x64, sigma)
        out = []
        for r, idx in blocks:
            logits, g0, g1 = self._terms(x64[r], var[r], idx)
            w = torch.softmax(logits, dim=-1)
            out.append(torch.stack((torch.logsumexp(logits, dim=-1), (w * g0).sum(-1), (w * g1).sum(-1)), dim=-1))
        return self._unpermute([r for r, _ in blocks], out, x64.shape[0])

    def _interpolant(self, sigma: float) -> TileInterpolant:
        """The tile interpolant of (log p_σ, ∇log p_σ) over the means' box padded by 0.5 + 4σ, cached (LRU)."""
        if sigma in self._interpolants:
            self._interpolants.move_to_end(sigma)
            return self._interpolants[sigma]
        pad = 0.5 + 4.0 * sigma
        lo, hi = self._mu.min(0).values - pad, self._mu.max(0).values + pad
        tiles = min(_TILE_MAX, math.ceil(float((hi - lo).max()) / (_TILE_WIDTH * sigma)))
        level = torch.tensor([sigma], dtype=torch.float64)
        interpolant = TileInterpolant(lambda p: self._exact_both(p, level.expand(p.shape[0])), lo, hi, tiles,
                                      _TILE_ORDER, _TILE_TOL, groups=[[0], [1, 2]], floors=[1.0, 1e-12],
                                      max_depth=_TILE_DEPTH)
        self._interpolants[sigma] = interpolant
        if len(self._interpolants) > _TILE_CACHE:
            self._interpolants.popitem(last=False)
        return interpolant

    def _interpolated(self, x64: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """[N, 3] (log p, score) from cached interpolants and the [N] mask of rows they resolved.

        A level σ ≥ ``_TILE_FIRST_REQUEST`` gets an interpolant on its first request with at least
        ``_TILE_MIN_ROWS`` rows, a smaller one on its ``_TILE_REPEATS``-th (levels met only once or twice are
        cheaper to evaluate exactly than to tabulate)."""
        n = x64.shape[0]
        values, done = torch.zeros(n, 3, dtype=torch.float64), torch.zeros(n, dtype=torch.bool)
        if not self.cache_levels or len(self) < _FAST_MIN_K or n < _TILE_MIN_ROWS or x64.device.type != "cpu":
            return values, done
        levels, inverse, counts = torch.unique(sigma.abs(), return_inverse=True, return_counts=True)
        for i in torch.nonzero(counts >= _TILE_MIN_ROWS).squeeze(1).tolist():
            level = float(levels[i])
            if not (_TILE_SIGMA_MIN <= level <= _TILE_SIGMA_MAX):
                continue
            seen = self._requests.pop(level, 0) + 1
            self._requests[level] = seen
            if len(self._requests) > 4 * _TILE_CACHE:
                self._requests.pop(next(iter(self._requests)))
            if seen < _TILE_REPEATS and level < _TILE_FIRST_REQUEST and level not in self._interpolants:
                continue
            rows = torch.nonzero(inverse == i).squeeze(1)
            out, ok = self._interpolant(level)(x64[rows])
            values[rows[ok]], done[rows[ok]] = out[ok], True
        return values, done

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """log p_σ(x) = logsumexp_k [log φ_k + log N(x; μ_k, Σ_k + σ² I)] for x [N, 2] -> [N].

        Differentiable with respect to x (autograd goes through the exact float64 computation).
        """
        x64 = x.double()
        sig = _levels(sigma, x.shape[0], x.device, "sigma")
        if x.requires_grad or sig.requires_grad:
            return self._exact_log_prob(x64, sig).to(x.dtype)
        values, done = self._interpolated(x64, sig)
        out = values[:, 0]
        rest = torch.nonzero(~done).squeeze(1)
        if rest.numel():
            out[rest] = self._exact_log_prob(x64[rest], sig[rest])
        return out.to(x.dtype)

    def _exact_log_prob(self, x64: Tensor, sig: Tensor) -> Tensor:
        var = sig**2
        blocks = self._blocks(x64, sig.detach())
        out = [torch.logsumexp(self._terms(x64[r], var[r], idx)[0], dim=-1) for r, idx in blocks]
        return self._unpermute([r for r, _ in blocks], out, x64.shape[0])

    def score(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """∇_x log p_σ(x) = Σ_k r_k (Σ_k + σ² I)⁻¹ (μ_k − x), r = softmax of the log terms; [N, 2] -> [N, 2]."""
        x64 = x.detach().double()
        sig = _levels(sigma, x.shape[0], x.device, "sigma").detach()
        values, done = self._interpolated(x64, sig)
        out = values[:, 1:]
        rest = torch.nonzero(~done).squeeze(1)
        if rest.numel():
            out[rest] = self._exact_both(x64[rest], sig[rest])[:, 1:]
        return out.to(x.dtype)

    def sample(self, n: int, sigma: float | Tensor = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """n exact samples of p_σ = p ∗ N(0, σ² I): k ~ Categorical(φ), x = μ_k + L z with L Lᵀ = Σ_k + σ² I.

        ``sigma`` is a float or an [n] tensor (one level per sample). Returns float32 [n, 2].
        """
        device = self._weights.device if generator is None else generator.device
        var = _levels(sigma, n, device, "sigma") ** 2
        idx = torch.multinomial(self._weights.to(device), n, replacement=True, generator=generator)
        z = torch.randn(n, 2, generator=generator, device=device, dtype=torch.float64)
        _, mu, a, b, c, det = self._component(idx, device)
        l11, l21, l22 = _cholesky(a + var, b, det + var * (a + c) + var * var)
        return torch.stack((mu[:, 0] + l11 * z[:, 0], mu[:, 1] + l21 * z[:, 0] + l22 * z[:, 1]), -1).float()

    def _product_params(self, center: Tensor, lam2: Tensor, idx: Tensor) -> tuple[Tensor, ...]:
        """Mean and Cholesky factor of component(s) ``idx`` of the product ``p(y) N(y; c, λ² I)``.

        With ``S = Σ + λ²I`` one has ``Σ adj(S) = det Σ · I + λ² Σ``, hence (no cancellation anywhere)
        ``mean = μ + (det Σ (c − μ) + λ² Σ (c − μ)) / det S`` and ``cov = λ² (det Σ · I + λ² Σ) / det S``.
        ``center`` [..., 2], ``lam2`` [...] and ``idx`` broadcast together; float64 throughout.
        """
        _, mu, a, b, c, det = self._component(idx, center.device)
        det_s = det + lam2 * (a + c) + lam2 * lam2
        e0, e1 = center[..., 0] - mu[..., 0], center[..., 1] - mu[..., 1]
        m0 = mu[..., 0] + (det * e0 + lam2 * (a * e0 + b * e1)) / det_s
        m1 = mu[..., 1] + (det * e1 + lam2 * (b * e0 + c * e1)) / det_s
        m11 = det + lam2 * a
        l11, l21, l22 = _cholesky(m11, lam2 * b, det * det_s)
        scale = (lam2 / det_s).sqrt()
        return m0, m1, l11 * scale, l21 * scale, l22 * scale

    def product_mean(self, center: Tensor, bandwidth: float | Tensor) -> Tensor:
        """Exact mean of ṗ(y | c) ∝ p(y) N(y; c, λ² I) for centres [N, 2]; λ a float or [N] tensor -> [N, 2].

        ``Σ_k w_k m_k`` with ``w_k ∝ φ_k N(c; μ_k, Σ_k + λ² I)`` and ``m_k`` the product component means.
        """
        c64 = center.detach().double()
        lam2 = _levels(bandwidth, center.shape[0], center.device, "bandwidth") ** 2
        all_k = torch.arange(len(self), device=center.device)
        out = []
        for s in self._row_slices(center.shape[0]):
            ci, li = c64[s], lam2[s]
            w = torch.softmax(self._log_terms(ci, li)[0], dim=-1)
            m0, m1, *_ = self._product_params(ci[:, None, :], li[:, None], all_k)
            out.append(torch.stack(((w * m0).sum(-1), (w * m1).sum(-1)), dim=-1))
        return torch.cat(out).to(center.dtype)

    def product_sample(self, center: Tensor, bandwidth: float | Tensor, generator: torch.Generator | None = None,
                       n_per_center: int = 1) -> Tensor:
        """Exact samples of ṗ(y | c) ∝ p(y) N(y; c, λ² I), itself a Gaussian mixture (module docstring).

        ``center`` [N, 2]; ``bandwidth`` λ a float or an [N] tensor (λ = 0 returns the centres, λ → ∞
        plain samples of p). Returns [N, 2] for ``n_per_center = 1``, else [n_per_center, N, 2].
        """
        c64 = center.detach().double()
        lam2 = _levels(bandwidth, center.shape[0], center.device, "bandwidth") ** 2
        out = []
        for s in self._row_slices(center.shape[0]):
            ci, li = c64[s], lam2[s]
            probs = torch.softmax(self._log_terms(ci, li)[0], dim=-1)
            idx = torch.multinomial(probs, n_per_center, replacement=True, generator=generator)  # [n, m]
            z = torch.randn(*idx.shape, 2, generator=generator, device=center.device, dtype=torch.float64)
            m0, m1, l11, l21, l22 = self._product_params(ci[:, None, :], li[:, None], idx)
            out.append(torch.stack((m0 + l11 * z[..., 0], m1 + l21 * z[..., 0] + l22 * z[..., 1]), dim=-1))
        samples = torch.cat(out).transpose(0, 1).to(center.dtype)  # [m, N, 2]
        return samples[0] if n_per_center == 1 else samples

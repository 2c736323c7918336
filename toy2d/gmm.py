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

Fast exact evaluation (no autograd; mixtures of ``_FAST_MIN_K`` components or more): the sums run in the
compiled kernel :func:`toy2d.kernels.mixture_rows` (float64, the closed forms above). The components are
read as chains (:meth:`GaussianMixture.chains`): runs of 8 sharing weight and covariance with evenly
stepped means, the fractal's branches, whose 8 log-terms are a quadratic in the index, so a branch costs
two exponentials and a recurrence instead of eight exponentials (``toy2d.kernels``); a mixture without
that structure is chains of one. Nothing is truncated or approximated in the sums themselves: the result
equals the dense evaluation up to float64 rounding (≤ 1e-11 relative in the tests and ``make bench``).

At small σ most components are negligible at a given point, so the box around the means is cut into
``_GRID``² cells and σ into geometric buckets up to σ ≈ 0.13; per (bucket, cell) the chains with a
component that can come within ``_TRUNCATION`` = 30 nats of the best one anywhere in the cell are listed
(:func:`toy2d.kernels.candidate_lists`): an upper bound of each log-term over the cell from the exact
minimum of the Mahalanobis quadratic over the cell (0 inside, else a clamped 1-D minimum on each edge) at
the bucket's largest v = σ², with log det at its smallest v, against a lower bound from the exact maximum
(at a corner) at the smallest v, with log det at the largest v; the Mahalanobis term decreases and log det
increases with v, so the lists are conservative. A point sums over its cell's list (≈ 5 of the 127 chains
at σ = 0, ≈ 31 at σ = 0.05); the components left out each carry responsibility < e⁻³⁰, so the dropped
mass is ≤ K e⁻³⁰ of the total (log-density error ≤ 2e-10 for K ≈ 2000; score error ≤ K e⁻³⁰
max_k ‖(Σ_k+vI)⁻¹(μ_k − x)‖ over the dropped k, whose Mahalanobis distances are large). Points off the
grid, cells whose lists keep more than half the chains, and levels above the buckets sum over every chain.
The lists of a bucket are built once ``_TABLE_ROWS`` rows have been requested in it and cached (≈ 0.035 s
for K = 1016, ≈ 0.07 s for K = 2032).

Multiplying the mixture by a Gaussian kernel ``N(y; c, λ² I)`` gives another mixture (the product
distribution of mean-shift, ``ṗ(y | c) ∝ p(y) N(y; c, λ² I)``):

    weights ∝ φ_k N(c; μ_k, S_k),  means μ_k + Σ_k S_k⁻¹ (c − μ_k),  covs Σ_k − Σ_k S_k⁻¹ Σ_k = λ² Σ_k S_k⁻¹,

with ``S_k = Σ_k + λ² I``; it is sampled exactly by :meth:`GaussianMixture.product_sample`. Its mean
obeys ``E[y] − c = λ² ∇log p_λ(c)`` (the kernel-smoothed density ``p ∗ G_λ`` is ``p_σ`` at σ = λ).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from toy2d import kernels

_LOG_2PI = math.log(2.0 * math.pi)
_CHUNK_ELEMENTS = 1 << 14
"""Rows × components evaluated at once: small enough for the [rows, K] float64 intermediates to stay in
CPU cache (measured ~4× faster than one 2^21-element block for K = 1016)."""


_CHAIN_TOL = 1e-12
"""A block of components is a chain when its means lie within this many of the components' smallest standard
deviations of evenly stepped means: the recurrence then changes a log-term by ≲ 1e-12 × its Mahalanobis
distance (the fractal's branches, built in float64: ≤ 9e-14)."""
_FAST_MIN_K = 64
"""Mixtures with fewer components always use the dense closed form (nothing to gain from pruning)."""
_TRUNCATION = 30.0
"""Candidate lists leave out components more than this many nats below the best one anywhere in their cell
(responsibility < e⁻³⁰)."""
_GRID = 64
"""Cells per axis of the candidate-list grid."""
_TABLE_ROWS = 32768
"""A bucket's lists are built once this many rows have been requested in it: a build bounds every (cell,
component) pair, about the cost of that many all-component rows (measured), so rare buckets (e.g. per-row
random σ) stay on the all-component sum until the lists pay off."""
_SIGMA_FLOOR, _SIGMA_RATIO, _N_BUCKETS = 1e-3, 1.5, 13
"""σ buckets: [0, 1e-3) then [1e-3·1.5^(i−1), 1e-3·1.5^i) for i = 1 … 12 (up to ≈ 0.13); beyond, every
chain is evaluated (at σ ≈ 0.13 half the canvas cells already keep more than half the components)."""
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
        means: [K, 2] component means. The three are stored in float64 when ``means`` is float64, else in
            float32; every evaluation runs in float64 on the stored values.
        covs: [K, 2, 2] symmetric positive-definite component covariances.
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor):
        dtype = torch.float64 if torch.as_tensor(means).dtype == torch.float64 else torch.float32
        weights = torch.as_tensor(weights, dtype=dtype)
        means = torch.as_tensor(means, dtype=dtype)
        covs = torch.as_tensor(covs, dtype=dtype)
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
        self._tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # σ bucket -> candidate lists
        self._bucket_rows: dict[int, int] = {}  # σ bucket -> rows requested in it so far
        self._grid: tuple[Tensor, Tensor, Tensor] | None = None  # (lower corner, cell size, cells per axis)
        self._kernel_cache: tuple[np.ndarray, ...] | None = None  # per-component arrays (candidate lists)
        self._chain_cache: tuple | None = None  # chain length and per-chain arrays (mixture kernel)
        # empty candidate lists (CSR offsets, indices, dense mask) for rows that sum over every component
        self._no_table = (np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int32), np.ones(0, dtype=np.bool_))

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

    def _table(self, bucket: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidate lists of σ bucket ``bucket`` (:func:`toy2d.kernels.candidate_lists`: CSR offsets, flat
        chain indices, dense-cell mask), built on first use and cached."""
        if bucket not in self._tables:
            lo, size = self._grid_setup()
            s_lo = 0.0 if bucket == 0 else _SIGMA_FLOOR * _SIGMA_RATIO ** (bucket - 1)
            s_hi = _SIGMA_FLOOR * _SIGMA_RATIO**bucket
            self._tables[bucket] = kernels.candidate_lists(
                float(lo[0]), float(lo[1]), float(size[0]), float(size[1]), _GRID, s_lo**2, s_hi**2,
                *self._kernel_params(), _TRUNCATION, self.chains()[0] // 2, self.chains()[1])
        return self._tables[bucket]

    def _cells(self, x64: Tensor) -> Tensor:
        """Candidate-grid cell (row-major) of each row of x64 [N, 2]; −1 off the grid (or NaN)."""
        lo, size = self._grid_setup()
        cell = torch.floor((x64 - lo) / size)
        inside = ((cell >= 0) & (cell < _GRID)).all(1)  # False for NaN too
        cell = torch.where(inside[:, None], cell, torch.zeros_like(cell)).long()
        return torch.where(inside, cell[:, 0] * _GRID + cell[:, 1], torch.full_like(cell[:, 0], -1))

    def _exact_both(self, x64: Tensor, sigma: Tensor) -> Tensor:
        """[N, 3]: log p_σ and the score at x64 [N, 2] (float64, no autograd) by the compiled kernel, over each
        row's candidate list or every chain (module docstring)."""
        n = x64.shape[0]
        out = np.empty((n, 3))
        if n == 0:
            return torch.from_numpy(out)
        x_cpu, sig = x64.detach().cpu(), sigma.detach().cpu().abs()
        shared = bool((sig == sig[0]).all())
        order = None if shared else torch.argsort(sig, stable=True)
        if order is not None:  # rows sharing a level adjacent (the kernel reuses per-level constants over a run)
            x_cpu, sig = x_cpu[order], sig[order]
        var = (sig**2).numpy()
        bucket = self._bucket_of(sig[:1] if shared else sig)
        x_np, chains = x_cpu.contiguous().numpy(), self._chain_params()
        for b in torch.unique(bucket).tolist():
            rows = slice(None) if shared else torch.nonzero(bucket == b).squeeze(1).numpy()  # a slice: no copies
            x_b = x_np[rows]
            listed = b < _N_BUCKETS and len(self) >= _FAST_MIN_K
            if listed:
                self._bucket_rows[b] = self._bucket_rows.get(b, 0) + len(x_b)
            if b in self._tables or (listed and self._bucket_rows[b] >= _TABLE_ROWS):
                cells, table = self._cells(torch.from_numpy(x_b)).numpy(), self._table(b)
            else:  # σ beyond the listed buckets, a small mixture, or lists not yet worth building: every chain
                cells, table = np.full(len(x_b), -1), self._no_table
            part = np.empty((len(x_b), 3))
            kernels.mixture_rows(x_b, var[rows], cells, *table, *chains, part)
            out[rows] = part
        result = torch.from_numpy(out)
        if order is not None:
            result = torch.empty_like(result).index_copy_(0, order, result)
        return result.to(x64.device)

    def chains(self) -> tuple[int, int]:
        """(number of chains C, chain length L): the components as C runs of L consecutive ones sharing weight
        and covariance with evenly stepped means (``toy2d.kernels``); L = 8 when every block of 8 is one (the
        fractal's branches), else L = 1. A block counts when weights and covariances are equal and every
        mean is within ``_CHAIN_TOL`` × (the smallest standard deviation of Σ) of the even steps."""
        length = self._chain_params()[0]
        return len(self) // length, length

    def _chain_params(self) -> tuple:
        """(L, then per chain: log φ, μ₀x, μ₀y, Δx, Δy, a, b, c, det Σ as float64 numpy arrays)."""
        if self._chain_cache is None:
            length = kernels.CHAIN_LENGTHS[0]
            self._chain_cache = self._chain_split(length if len(self) % length == 0 else 1)
        return self._chain_cache

    def _chain_split(self, length: int) -> tuple:
        """:meth:`_chain_params` for chains of ``length``, falling back to single components."""
        per = [t.view(-1, length) for t in (self._log_w, self._a, self._b, self._c)]
        mu = self._mu.view(-1, length, 2)
        step = (mu[:, -1] - mu[:, 0]) / max(length - 1, 1)
        even = mu[:, :1] + torch.arange(length, dtype=torch.float64)[None, :, None] * step[:, None]
        std_min = (self._det.view(-1, length)[:, 0] / (per[1][:, 0] + per[3][:, 0])).sqrt()
        ok = all(bool((t == t[:, :1]).all()) for t in per) and bool(
            ((mu - even).norm(dim=-1).amax(1) <= _CHAIN_TOL * std_min).all())
        if length > 1 and not ok:
            return self._chain_split(1)
        first = slice(None, None, length)
        arrays = (self._log_w[first], mu[:, 0, 0], mu[:, 0, 1], step[:, 0], step[:, 1], self._a[first],
                  self._b[first], self._c[first], self._det[first])
        return (length, *(t.contiguous().numpy() for t in arrays))

    def _kernel_params(self) -> tuple[np.ndarray, ...]:
        """(log φ, μx, μy, a, b, c, det Σ) per component as contiguous float64 numpy arrays (the inputs of the
        candidate-list bounds)."""
        if self._kernel_cache is None:
            self._kernel_cache = tuple(t.contiguous().numpy() for t in
                                       (self._log_w, self._mu[:, 0], self._mu[:, 1], self._a, self._b, self._c,
                                        self._det))
        return self._kernel_cache

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """log p_σ(x) = logsumexp_k [log φ_k + log N(x; μ_k, Σ_k + σ² I)] for x [N, 2] -> [N].

        Differentiable with respect to x and σ: with autograd the dense float64 closed form is used.
        """
        sig = _levels(sigma, x.shape[0], x.device, "sigma")
        if x.requires_grad or sig.requires_grad:
            x64, var = x.double(), sig**2
            out = [torch.logsumexp(self._log_terms(x64[s], var[s])[0], dim=-1) for s in self._row_slices(x.shape[0])]
            return torch.cat(out).to(x.dtype)
        return self._evaluate(x, sig)[:, 0].to(x.dtype)

    def score(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """∇_x log p_σ(x) = Σ_k r_k (Σ_k + σ² I)⁻¹ (μ_k − x), r = softmax of the log terms; [N, 2] -> [N, 2]."""
        sig = _levels(sigma, x.shape[0], x.device, "sigma").detach()
        return self._evaluate(x, sig)[:, 1:].to(x.dtype)

    def _evaluate(self, x: Tensor, sig: Tensor) -> Tensor:
        """[N, 3] float64 (log p_σ, score) by the compiled kernel."""
        return self._exact_both(x.detach().double(), sig)

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

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

Multiplying the mixture by a Gaussian kernel ``N(y; c, λ² I)`` gives another mixture (the product
distribution of mean-shift, ``ṗ(y | c) ∝ p(y) N(y; c, λ² I)``):

    weights ∝ φ_k N(c; μ_k, S_k),  means μ_k + Σ_k S_k⁻¹ (c − μ_k),  covs Σ_k − Σ_k S_k⁻¹ Σ_k = λ² Σ_k S_k⁻¹,

with ``S_k = Σ_k + λ² I``; it is sampled exactly by :meth:`GaussianMixture.product_sample`. Its mean
obeys ``E[y] − c = λ² ∇log p_λ(c)`` (the kernel-smoothed density ``p ∗ G_λ`` is ``p_σ`` at σ = λ).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_LOG_2PI = math.log(2.0 * math.pi)
_CHUNK_ELEMENTS = 1 << 14
"""Rows × components evaluated at once: small enough for the [rows, K] float64 intermediates to stay in
CPU cache (measured ~4× faster than one 2^21-element block for K = 1016)."""


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
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor):
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
        v = var[:, None]
        det = det + v * (a + c) + v * v  # det(Σ + vI) = det Σ + v tr Σ + v²
        a, c = a + v, c + v
        d0, d1 = mu[:, 0] - x[:, :1], mu[:, 1] - x[:, 1:]
        g0 = (c * d0 - b * d1) / det
        g1 = (a * d1 - b * d0) / det
        maha = d0 * g0 + d1 * g1
        return log_w - 0.5 * (maha + det.log()) - _LOG_2PI, g0, g1

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """log p_σ(x) = logsumexp_k [log φ_k + log N(x; μ_k, Σ_k + σ² I)] for x [N, 2] -> [N].

        Differentiable with respect to x (autograd goes through the float64 computation).
        """
        x64 = x.double()
        var = _levels(sigma, x.shape[0], x.device, "sigma") ** 2
        out = [torch.logsumexp(self._log_terms(x64[s], var[s])[0], dim=-1) for s in self._row_slices(x.shape[0])]
        return torch.cat(out).to(x.dtype)

    def score(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """∇_x log p_σ(x) = Σ_k r_k (Σ_k + σ² I)⁻¹ (μ_k − x), r = softmax of the log terms; [N, 2] -> [N, 2]."""
        x64 = x.detach().double()
        var = _levels(sigma, x.shape[0], x.device, "sigma").detach() ** 2
        out = []
        for s in self._row_slices(x.shape[0]):
            logits, g0, g1 = self._log_terms(x64[s], var[s])
            r = torch.softmax(logits, dim=-1)
            out.append(torch.stack(((r * g0).sum(-1), (r * g1).sum(-1)), dim=-1))
        return torch.cat(out).to(x.dtype)

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

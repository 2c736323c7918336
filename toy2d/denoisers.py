"""Denoisers of the 2D world: the exact one of a Gaussian mixture and a small learned energy MLP.

Both follow :class:`msd.denoiser.Denoiser` (VE coordinates, ε-prediction): ``ε̂(x, σ) = −σ ∇log p_σ(x)``,
so ``D(x, σ) = x + σ² ∇log p_σ(x)``.

The learned model (re-derived from the description of the EDM2 autoguidance toy) is an *energy*
model: it outputs a scalar log-density and its score is the autograd gradient, which makes the score
field conservative by construction. With ``s = √(σ_data² + σ²)`` and ``x̃ = x / s``:

    h        = W_L ∘ (SiLU/0.596) ∘ … ∘ W_1 ∘ (SiLU/0.596) ∘ W_0 ([x̃, log(σ)/4, 1])
    log p(x; σ) = gain · mean(h²) / σ − ½ ‖x̃‖²
    score    = ∇_x log p(x; σ),    ε̂ = −σ · score

``gain`` starts at 0, so the untrained model is exactly the Gaussian ``N(0, (σ_data² + σ²) I)``. Every
``W`` is a weight-normalised linear map without bias (each output unit's weight row is divided by its
norm in the forward pass; the constant input 1 plays the role of the first layer's bias), and
``SiLU/0.596`` keeps unit-variance activations at unit variance. σ is floored at 1e-4 inside ``log``
and the ``1/σ`` factor so that σ = 0 is valid input (ε̂ is then exactly 0).

Training (:func:`train_mlp_denoiser`) is exact score matching against the mixture:
``σ ~ exp(N(P_mean, P_std²))``, ``x ~ p_σ``, loss ``= mean_batch σ² ‖∇log p_σ(x) − score_net(x, σ)‖²``
(``= ‖ε̂_exact − ε̂_net‖²``), Adam with ``lr = lr0 / √max(i / 512, 1)``, and a power-function EMA of the
weights (``β_i = (1 − 1/i)^(γ+1)``, EDM2's profile; γ = 97 ⇔ relative EMA width 0.010).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msd.denoiser import Denoiser, as_sigma, per_sample
from msd.schedules import EDMSchedule, NoiseSchedule
from toy2d.gmm import GaussianMixture

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODEL_NAMES = ("A", "AB", "A_weak", "spiral", "spiral_weak", "pinwheel", "pinwheel_weak")
"""Committed models: the fractal's class-A model (4 × 64), the two-class CFG guide and the weak class-A
autoguidance guide (both 4 × 32, trained briefly); for spiral and pinwheel (``toy2d.datasets``, no classes)
a main model ``<dataset>`` (4 × 64) and a weak autoguidance guide ``<dataset>_weak`` (4 × 32), trained the
same way. Retrain with ``make toy2d-weights`` (``experiments.train_toy2d``)."""


TOY_SCHEDULE = EDMSchedule(0.002, 5.0, 7.0)
"""The toy world's noise levels (EDM2's toy: σ ∈ [0.002, 5], ρ = 7), carried by its denoisers."""


class ExactDenoiser(Denoiser):
    """The ideal denoiser of a Gaussian mixture: ε̂(x, σ) = −σ ∇log p_σ(x) (exactly 0 at σ = 0)."""

    noise_schedule = TOY_SCHEDULE

    def __init__(self, mixture: GaussianMixture, noise_schedule: NoiseSchedule | None = None):
        self.mixture = mixture
        if noise_schedule is not None:
            self.noise_schedule = noise_schedule

    def eps(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = as_sigma(sigma, x)
        return -per_sample(sigma, x) * self.mixture.score(x, sigma)

    def product_sample(self, center: Tensor, bandwidth: float | Tensor, generator: torch.Generator | None = None,
                       n_per_center: int = 1) -> Tensor:
        """Exact samples of ṗ(y | c) ∝ p(y) N(y; c, λ² I); see :meth:`GaussianMixture.product_sample`."""
        return self.mixture.product_sample(center, bandwidth, generator=generator, n_per_center=n_per_center)

    def product_mean(self, center: Tensor, bandwidth: float | Tensor) -> Tensor:
        """Exact mean of ṗ(y | c); equals ``c + λ² ∇log p_λ(c)``."""
        return self.mixture.product_mean(center, bandwidth)


class _NormalizedLinear(nn.Module):
    """``y = x Ŵᵀ`` with every row of Ŵ the corresponding row of W scaled to unit norm (no bias)."""

    def __init__(self, fan_in: int, fan_out: int, generator: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in, generator=generator))

    def forward(self, x: Tensor) -> Tensor:
        return x @ F.normalize(self.weight, dim=1).T


class MLPDenoiser(nn.Module, Denoiser):
    """Energy-parameterised MLP denoiser (module docstring). ``layers`` (SiLU, Linear) blocks of width ``hidden``.

    ``seed`` fixes the (Gaussian) weight initialisation; the global RNG is never used.
    """

    noise_schedule = TOY_SCHEDULE
    sigma_floor = 1e-4

    def __init__(self, hidden: int = 64, layers: int = 4, sigma_data: float = 0.5, seed: int = 0):
        super().__init__()
        self.config = dict(hidden=hidden, layers=layers, sigma_data=sigma_data, seed=seed)
        self.sigma_data = sigma_data
        generator = torch.Generator().manual_seed(seed)
        self.input = _NormalizedLinear(4, hidden, generator)
        self.blocks = nn.ModuleList(_NormalizedLinear(hidden, hidden, generator) for _ in range(layers))
        self.gain = nn.Parameter(torch.zeros([]))

    def log_prob(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Unnormalised log p(x; σ) = gain · mean(h²) / σ − ½ ‖x / √(σ_data² + σ²)‖², [N, 2] -> [N]."""
        sigma = as_sigma(sigma, x)
        floored = sigma.clamp_min(self.sigma_floor)
        x_in = x / per_sample(torch.sqrt(self.sigma_data**2 + sigma**2), x)
        h = self.input(torch.cat([x_in, per_sample(floored.log() / 4, x), torch.ones_like(x[:, :1])], dim=1))
        for block in self.blocks:
            h = block(F.silu(h) / 0.596)
        return self.gain * h.square().mean(dim=1) / floored - 0.5 * x_in.square().sum(dim=1)

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """∇_x log p(x; σ) by autograd (works under ``no_grad``; differentiable in the weights in train mode).

        ``x`` is treated as data: no gradient flows back to it.
        """
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob(x, sigma).sum(), x, create_graph=self.training)
        return grad

    def eps(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = as_sigma(sigma, x)
        return -per_sample(sigma, x) * self.score(x, sigma)


def score_matching_loss(net: MLPDenoiser, mixture: GaussianMixture, x: Tensor, sigma: Tensor) -> Tensor:
    """Exact score-matching loss ``mean_batch σ² ‖∇log p_σ(x) − score_net(x, σ)‖²`` (= ‖ε̂_exact − ε̂_net‖²)."""
    error = net.score(x, sigma) - mixture.score(x, sigma)
    return (sigma**2 * error.square().sum(dim=1)).mean()


def train_mlp_denoiser(mixture: GaussianMixture, *, hidden: int = 64, layers: int = 4, iterations: int = 4096,
                       batch: int = 4096, seed: int = 0, lr: float = 1e-2, lr_ref_iterations: int = 512,
                       betas: tuple[float, float] = (0.9, 0.99), ema_gamma: float = 97.0, p_mean: float = -2.3,
                       p_std: float = 1.5, sigma_data: float = 0.5,
                       on_step: Callable[[int, float], None] | None = None) -> MLPDenoiser:
    """Train an :class:`MLPDenoiser` by exact score matching against ``mixture``; returns the EMA model.

    Per iteration i: ``σ = exp(P_mean + P_std·n)``, ``x ~ p_σ`` (exact samples), one Adam step on
    :func:`score_matching_loss` with ``lr = lr / √max(i / lr_ref_iterations, 1)``, then the EMA update
    ``θ_ema ← β θ_ema + (1 − β) θ`` with ``β = (1 − 1/(i+1))^(ema_gamma+1)``. All randomness comes from a
    generator seeded with ``seed`` (bitwise reproducible on CPU). ``on_step(i, loss)`` is called after
    each step. The returned model is in eval mode with frozen parameters.
    """
    generator = torch.Generator().manual_seed(seed)
    net = MLPDenoiser(hidden=hidden, layers=layers, sigma_data=sigma_data, seed=seed).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=betas)
    for i in range(iterations):
        for group in optimizer.param_groups:
            group["lr"] = lr / math.sqrt(max(i / lr_ref_iterations, 1.0))
        sigma = torch.exp(p_mean + p_std * torch.randn(batch, generator=generator))
        x = mixture.sample(batch, sigma, generator=generator)
        loss = score_matching_loss(net, mixture, x, sigma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        beta = (1.0 - 1.0 / (i + 1)) ** (ema_gamma + 1.0)
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1.0 - beta)
        if on_step is not None:
            on_step(i, loss.item())
    return ema


def load_denoiser(name: str) -> MLPDenoiser:
    """A committed learned denoiser (``name`` in :data:`MODEL_NAMES`), in eval mode with frozen parameters."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown toy2d model {name!r}; allowed: {MODEL_NAMES}")
    path = WEIGHTS_DIR / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `make toy2d-weights` to train the toy2d models")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    net = MLPDenoiser(**checkpoint["config"])
    net.load_state_dict(checkpoint["state_dict"])
    return net.eval().requires_grad_(False)

"""Probability-flow ODE solvers in VE coordinates and DDIM inversion.

The PF-ODE is ``dx/dσ = ε̂(x, σ)``. Its Euler step from σ_i to σ_{i+1},
``x ← x + (σ_{i+1} − σ_i) ε̂(x, σ_i)``, is exactly DDIM with η = 0 (for a VP model seen through
``x̂ = z/α``). Heun is the EDM second-order correction (skipped on a step to σ = 0).
"""
from __future__ import annotations

import torch
from torch import Tensor

from msd.denoiser import Denoiser, as_sigma, per_sample

SOLVERS = ("euler", "heun")


def check_solver(name: str) -> str:
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {name!r}")
    return name


def solver_evaluations(steps: int, solver: str) -> int:
    """Model calls of a ``steps``-step solve: Euler 1 per step; Heun 2 per step but none for the
    correction of the final step to σ = 0."""
    return steps if solver == "euler" else 2 * steps - 1


def solver_step(denoiser: Denoiser, x: Tensor, sigma: float, sigma_next: float, solver: str = "euler") -> Tensor:
    """One PF-ODE step of ``x`` from noise level ``sigma`` to ``sigma_next`` (either direction)."""
    h = sigma_next - sigma
    d = denoiser.eps(x, as_sigma(sigma, x))
    x_next = x + h * d
    if solver == "heun" and sigma_next > 0:
        d_next = denoiser.eps(x_next, as_sigma(sigma_next, x))
        x_next = x + h * 0.5 * (d + d_next)
    return x_next


def ddim_eta_step(denoiser: Denoiser, x: Tensor, sigma: float, sigma_next: float, eta: float,
                  generator: torch.Generator | None) -> Tensor:
    """One DDIM step with stochasticity η (VE units): with ``D = x − σ ε̂`` and
    ``c = η·ancestral_std(σ_next, σ)``, ``x ← D + √(σ_next² − c²)·ε̂ + c·ξ``. η = 0 is the Euler step;
    η = 1 is ancestral (DDPM-like) sampling. Both keep the marginals of the diffused density."""
    d = denoiser.eps(x, as_sigma(sigma, x))
    std = eta * ancestral_std(sigma_next, sigma)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x - sigma * d + (sigma_next**2 - std**2) ** 0.5 * d + std * noise


def sample(denoiser: Denoiser, x: Tensor, sigmas: Tensor, solver: str = "euler", eta: float = 0.0,
           generator: torch.Generator | None = None) -> Tensor:
    """Integrate the PF-ODE from ``sigmas[0]`` (``x`` is at that level) down the grid ``sigmas``;
    ``eta > 0`` takes stochastic DDIM steps instead (Euler only)."""
    check_solver(solver)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if eta > 0 and solver != "euler":
        raise ValueError(f"eta > 0 takes stochastic DDIM (Euler) steps; solver must be 'euler', got {solver!r}")
    levels = [float(s) for s in sigmas]
    for sigma, sigma_next in zip(levels[:-1], levels[1:]):
        if eta > 0:
            x = ddim_eta_step(denoiser, x, sigma, sigma_next, eta, generator)
        else:
            x = solver_step(denoiser, x, sigma, sigma_next, solver)
    return x


def ancestral_std(sigma_lo: Tensor | float, sigma_hi: Tensor | float) -> Tensor | float:
    """Std of DDIM's η = 1 noise between two levels, in VE units: σ_lo √(σ_hi² − σ_lo²) / σ_hi.

    (DDIM's VP variance (1−ᾱ_lo)/(1−ᾱ_hi)·(1 − ᾱ_hi/ᾱ_lo), divided by ᾱ_lo: the α factors cancel.)
    """
    return sigma_lo * (sigma_hi**2 - sigma_lo**2) ** 0.5 / sigma_hi


def ddim_invert(denoiser: Denoiser, x: Tensor, sigmas: Tensor, eta: float = 0.0,
                generator: torch.Generator | None = None) -> Tensor:
    """DDIM inversion of clean ``x`` up an ascending grid (``sigmas[0]`` is x's level, often 0).

    ``sigmas`` is [L] (one grid) or [L, N] (a grid per sample). Step i:
    ``z ← z + (σ_{i+1} − σ_i) ε̂(z, σ_i) + η·ancestral_std(σ_i, σ_{i+1})·ξ``. Where σ_i = 0 the model is
    queried at σ_{i+1} (ε̂ at σ = 0 is undefined for a learned model), and no noise is added. Returns
    the whole trajectory, shape [L, *x.shape], with ``trajectory[0] = x``.
    """
    grid = torch.as_tensor(sigmas, dtype=x.dtype, device=x.device)
    grid = grid[:, None].expand(-1, x.shape[0]) if grid.ndim == 1 else grid
    if grid.shape[1:] != (x.shape[0],):
        raise ValueError(f"sigmas must be [L] or [L, {x.shape[0]}], got {tuple(sigmas.shape)}")
    if bool((grid[1:] <= grid[:-1]).any()):
        raise ValueError("ddim_invert needs a strictly ascending sigma grid")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    trajectory = [x]
    z = x
    for sigma, sigma_next in zip(grid[:-1], grid[1:]):
        query = torch.where(sigma > 0, sigma, sigma_next)
        z = z + per_sample(sigma_next - sigma, z) * denoiser.eps(z, query)
        if eta > 0:
            std = torch.where(sigma > 0, ancestral_std(sigma, sigma_next), torch.zeros_like(sigma))
            noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
            z = z + eta * per_sample(std, z) * noise
        trajectory.append(z)
    return torch.stack(trajectory)

"""Score distillation via reparametrised DDIM inversion (SDI, Lukoianov et al. 2024), VE coordinates.

t is drawn as for SDS (σ = schedule.sigma(t)); ``x`` is DDIM-inverted from σ = 0 up to σ on the levels
``0, σ(t/n), σ(2t/n), …, σ(t)`` (n = ``inversion_steps``, CFG scale ``inversion_scale`` for the
inversion, optional η noise), and the target is the one-step clean estimate
``y = D_cfg(z_σ, σ) = z_σ − σ ε̂_cfg(z_σ, σ)``.

Without inversion (``inversion=False``) ``z_σ = x + σ ε`` and ``x − y = σ(ε̂ − ε)``: SDS with w = σ.
Inversion grids (``inversion_grid``): ``global`` is the official code's — the global DDIM grid
``{0, 1/n, 2/n, …}`` (in schedule time) cut below t, then t itself, so a step at t costs ⌈t·n⌉ inversion
calls (≈ n/2 on average over SDI's linear anneal); ``uniform`` takes n equal steps from 0 to t whatever t
(the fine-grid reference with large n). The official quirk of inverting to t + δ, δ ~ U[0, 1/n), but
querying the target model at t is ``level_jitter=True`` (off by default). A prior with a data range
(``clip_sample``) keeps every clean estimate, the target included, in that range, as the official target
``DDIMScheduler.step(...).pred_original_sample`` does.
"""
from __future__ import annotations

import torch
from torch import Tensor

from baselines.sds import NoisedGuidance
from msd.checks import require
from msd.denoiser import Conditioning, Denoiser, per_sample, with_scale
from msd.guidance import GuidanceOutput, register, summarize
from msd.solvers import ddim_invert

INVERSION_GRIDS = ("uniform", "global")
GRID_TOLERANCE = 1e-6


@register("sdi")
class SDIGuidance(NoisedGuidance):
    def __init__(self, denoiser: Denoiser, inversion: bool = True, inversion_steps: int = 10,
                 inversion_scale: float | None = None, eta: float = 0.0, level_jitter: bool = False,
                 inversion_grid: str = "uniform", **timestep_kwargs):
        super().__init__(denoiser, **timestep_kwargs)
        require(inversion_steps >= 1, "guidance.inversion_steps", ">= 1", inversion_steps)
        require(inversion_grid in INVERSION_GRIDS, "guidance.inversion_grid", f"one of {INVERSION_GRIDS}",
                inversion_grid)
        self.inversion_grid = inversion_grid
        require(eta >= 0, "guidance.eta", ">= 0", eta)
        self.inversion, self.inversion_steps = inversion, int(inversion_steps)
        self.eta, self.level_jitter = float(eta), level_jitter
        self.inversion_denoiser = with_scale(denoiser, inversion_scale)  # SDI's negative CFG

    def global_grid(self, t_top: float) -> Tensor:
        """The official grid's levels from 0 to σ(t_top): times ``k/n < t_top``, then ``t_top`` (a grid time within
        ``GRID_TOLERANCE`` of t_top is t_top itself, e.g. 0.5 from 0.98 − 0.48 in floating point)."""
        n = self.inversion_steps
        below = [k / n for k in range(n) if k / n < t_top - GRID_TOLERANCE]
        times = torch.tensor(below + [t_top], dtype=torch.float64)
        levels = self.noise_schedule.sigma(times)
        levels[0] = 0.0
        return levels

    def invert(self, x: Tensor, t: Tensor, generator: torch.Generator | None,
               cond: Conditioning | None = None) -> tuple[Tensor, int]:
        """z at level σ(t_top) by DDIM inversion of x, t_top = t (+ δ with level jitter), and the number of
        inversion steps per sample (the most any sample took). ``uniform``: one [n+1, N] grid for the batch;
        ``global``: samples sharing a t (all of them under SDI's linear anneal) share one batched grid."""
        model = self.inversion_denoiser.condition(cond)
        t_top = t
        if self.level_jitter:
            jitter = torch.rand(t.shape, generator=generator, dtype=t.dtype, device=t.device) / self.inversion_steps
            t_top = (t + jitter).clamp(max=1.0)
        if self.inversion_grid == "uniform":
            fractions = torch.arange(1, self.inversion_steps + 1, dtype=t.dtype, device=t.device) / self.inversion_steps
            levels = self.noise_schedule.sigma(fractions[:, None] * t_top[None, :])
            levels = torch.cat([torch.zeros_like(levels[:1]), levels])
            z = ddim_invert(model, x, levels.to(x.dtype), self.eta, generator)[-1]
            return z, self.inversion_steps
        z, steps = torch.empty_like(x), 0
        for value in torch.unique(t_top):
            rows = (t_top == value).nonzero().flatten().to(x.device)
            levels = self.global_grid(float(value)).to(x.dtype)
            rows_model = model if cond is None else self.inversion_denoiser.condition(cond.rows(rows))
            z[rows] = ddim_invert(rows_model, x[rows], levels, self.eta, generator)[-1]
            steps = max(steps, len(levels) - 1)
        return z, steps

    def __call__(self, x: Tensor, step: int, generator: torch.Generator | None = None,
                 cond: Conditioning | None = None) -> GuidanceOutput:
        with torch.no_grad():
            x = x.detach()
            t = self.timesteps.t(x.shape[0], step, generator, x.device)
            sigma = self.noise_schedule.sigma(t).to(dtype=x.dtype)
            if self.inversion:
                z, steps = self.invert(x, t, generator, cond)
                nfe = steps * self.inversion_denoiser.evaluations_per_call
            else:
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                z, nfe = x + per_sample(sigma, x) * noise, 0
            target = self.denoiser.condition(cond).denoise(z, sigma)
        nfe += self.denoiser.evaluations_per_call
        return GuidanceOutput(target, summarize(x, target, sigma=sigma.mean(), nfe=nfe))

"""Variational score distillation (VSD, ProlificDreamer) in VE coordinates.

``grad = w(σ)(ε̂_cfg(z, σ) − ε̂_φ(z, σ))`` with ``z = x + σ ε``; target ``y = x − grad``. ε̂_φ models the
distribution of the current particles and is trained online by denoising score matching on the
detached particles, ``E_{σ, n} ‖ε̂_φ(x + σ n, σ) − n‖²`` (σ uniform in schedule time over [0, 1]),
``phi_steps`` Adam steps per guidance call, after the gradient is formed (ProlificDreamer's order).

Like ProlificDreamer's LoRA, ε̂_φ starts as the unguided prior: ``ε̂_φ = ε̂_base + r_φ`` with a
zero-initialised residual MLP ``r_φ([x·α(σ), log σ / 4])`` over the flattened sample (fine for
low-dimensional samples; an image prior passes its own ``particle_model``, e.g. a LoRA-adapted UNet).
``particle_model="ideal"`` replaces the learned ε̂_φ by the exact noised score of the particles' empirical
distribution (:class:`EmpiricalDenoiser`, rebuilt from the detached particles at every call, never trained):
VSD with a perfect particle model, the limit the learned one chases.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from baselines.sds import NoisedGuidance
from msd.checks import require
from msd.denoiser import Conditioning, Denoiser, GuidedDenoiser, as_sigma, per_sample
from msd.guidance import GuidanceOutput, register, summarize
from msd.schedules import WEIGHTINGS, TimestepSampler, distillation_weight


class ResidualDenoiser(nn.Module, Denoiser):
    """ε̂_φ(x, σ) = ε̂_base(x, σ) + r_φ(x, σ): a frozen prior plus a trainable, zero-initialised MLP."""

    def __init__(self, base: Denoiser, dim: int, hidden: int, layers: int, generator: torch.Generator):
        """Weights ~ N(0, 1/fan_in) drawn with ``generator``, on its device; the head is zero."""
        super().__init__()
        self.base, self.vp = base, base.vp
        widths = [dim + 1] + [hidden] * layers
        blocks: list[nn.Module] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            blocks += [self._linear(fan_in, fan_out, generator), nn.SiLU()]
        head = nn.utils.skip_init(nn.Linear, hidden, dim, device=generator.device)
        nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
        self.residual = nn.Sequential(*blocks, head)

    @property
    def noise_schedule(self):
        return self.base.noise_schedule

    @staticmethod
    def _linear(fan_in: int, fan_out: int, generator: torch.Generator) -> nn.Linear:
        layer = nn.utils.skip_init(nn.Linear, fan_in, fan_out, device=generator.device)  # no global-RNG init
        with torch.no_grad():
            draw = torch.randn(fan_out, fan_in, generator=generator, device=generator.device)
            layer.weight.copy_(draw / math.sqrt(fan_in))
            layer.bias.zero_()
        return layer

    def eps(self, x: Tensor, sigma: Tensor) -> Tensor:
        with torch.no_grad():
            eps_base = self.base.eps(x, sigma).detach()
        scale = per_sample(1.0 / torch.sqrt(1.0 + sigma**2), x)
        features = torch.cat([(x * scale).flatten(1), (sigma.clamp_min(1e-8).log() / 4)[:, None]], dim=1)
        return eps_base + self.residual(features).reshape(x.shape)


class EmpiricalDenoiser(Denoiser):
    """The ideal denoiser of the empirical distribution ``q = (1/M) Σ_j δ(x_j)`` of ``points`` (VE): q noised to
    σ is the mixture ``q_σ(z) = (1/M) Σ_j N(z; x_j, σ² I)``, so

        D(z, σ) = Σ_j w_j(z) x_j,   w_j ∝ exp(−‖z − x_j‖² / 2σ²),   ε̂(z, σ) = (z − D(z, σ)) / σ = −σ ∇log q_σ(z).

    It is also the exact minimiser of the denoising score-matching loss on the points (what VSD's ε̂_φ is trained
    towards, with unlimited capacity). Every point's own component is included: ε̂ must be a function of
    (z, σ) alone, as VSD queries it at z = x_i + σε without saying which particle z came from, and the
    distribution the particles represent is all of them. Consequence, on purpose: where σ is small against the
    spacing of the points the nearest (usually the own) component dominates, ε̂(x_i + σε) ≈ ε, and VSD acts
    like SDS there; where σ is large it is the kernel-density score of the whole set.

    The logits ``(z·x_j − ½‖x_j‖²) / σ²`` (the row constant ‖z‖² dropped) are one float64 product
    ``[z/σ², −1/σ²] · [x_j, ½‖x_j‖²]``, accurate at σ far below the points' scale; ``chunk_elements`` bounds the
    [rows, M] intermediates. σ must be > 0.
    """

    def __init__(self, points: Tensor, chunk_elements: int = 1 << 22):
        require(points.ndim >= 2 and points.shape[0] >= 1, "EmpiricalDenoiser points", "a non-empty [M, ...] tensor",
                tuple(points.shape))
        self.points = points.detach()
        flat = self.points.flatten(1).double()
        self._keys = torch.cat([flat, 0.5 * flat.pow(2).sum(dim=1, keepdim=True)], dim=1)  # [M, D + 1]
        self._values = torch.cat([flat, torch.ones_like(flat[:, :1])], dim=1)  # [M, D + 1]: Σ w x, Σ w
        self.chunk_rows = max(1, chunk_elements // flat.shape[0])

    def denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = as_sigma(sigma, x)
        require(bool((sigma > 0).all()), "EmpiricalDenoiser sigma", "> 0", float(sigma.min()))
        inv_var = 1.0 / sigma.double().pow(2)[:, None]
        queries = torch.cat([x.flatten(1).double() * inv_var, -inv_var], dim=1)  # [N, D + 1]
        keys, values = self._keys.to(x.device), self._values.to(x.device)
        means = []
        for chunk in torch.split(queries, self.chunk_rows):
            logits = chunk @ keys.T
            weights = logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
            sums = weights @ values
            means.append(sums[:, :-1] / sums[:, -1:])
        return torch.cat(means).reshape(x.shape).to(x.dtype)

    def eps(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = as_sigma(sigma, x)
        return ((x.double() - self.denoise(x, sigma).double()) / per_sample(sigma.double(), x)).to(x.dtype)


PARTICLE_MODELS = ("residual", "ideal")
"""VSD's ε̂_φ: ``residual`` = the prior plus a trained MLP residual (ProlificDreamer's LoRA stand-in);
``ideal`` = :class:`EmpiricalDenoiser` of the current particles."""


@register("vsd")
class VSDGuidance(NoisedGuidance):
    def __init__(self, denoiser: Denoiser, weighting: str = "sds", phi_lr: float = 1e-3, phi_steps: int = 1,
                 phi_hidden: int = 64, phi_layers: int = 3, particle_model: Denoiser | str | None = "residual",
                 **timestep_kwargs):
        """``particle_model``: ``"residual"`` (or None; the default, built on the first call), ``"ideal"`` (the exact
        empirical score of the current particles, :class:`EmpiricalDenoiser`; ``phi_*`` are then unused), or a
        trainable :class:`Denoiser` module (e.g. the prior's LoRA)."""
        if particle_model is None:
            particle_model = "residual"
        require(not isinstance(particle_model, str) or particle_model in PARTICLE_MODELS, "guidance.particle_model",
                f"one of {PARTICLE_MODELS} (or a Denoiser)", particle_model)
        require(weighting in WEIGHTINGS, "guidance.weighting", f"one of {WEIGHTINGS}", weighting)
        require(phi_lr > 0, "guidance.phi_lr", "> 0", phi_lr)
        require(phi_steps >= 0, "guidance.phi_steps", ">= 0", phi_steps)
        require(phi_hidden >= 1 and phi_layers >= 1, "guidance.phi_hidden/phi_layers", ">= 1", (phi_hidden, phi_layers))
        super().__init__(denoiser, **timestep_kwargs)
        self.weighting, self.phi_lr, self.phi_steps = weighting, float(phi_lr), int(phi_steps)
        self.phi_hidden, self.phi_layers = int(phi_hidden), int(phi_layers)
        self.phi_timesteps = TimestepSampler(self.noise_schedule, 0.0, 1.0)
        self.ideal = particle_model == "ideal"
        self.particle_model = None if isinstance(particle_model, str) else particle_model
        self.phi_optimizer, self.particle_dim = None, None
        if self.particle_model is not None:
            self.phi_optimizer = torch.optim.Adam(particle_model.parameters(), lr=self.phi_lr)

    def _ensure_particle_model(self, x: Tensor, generator: torch.Generator | None) -> None:
        """Build ε̂_φ on the first call, once the sample dimension is known (seeded from ``generator``)."""
        if self.particle_model is not None:
            return
        self.particle_dim = x[0].numel()
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=x.device))
        base = self.denoiser.main if isinstance(self.denoiser, GuidedDenoiser) else self.denoiser
        self.particle_model = ResidualDenoiser(base, self.particle_dim, self.phi_hidden, self.phi_layers,
                                               torch.Generator(x.device).manual_seed(seed)).to(x.device, x.dtype)
        self.phi_optimizer = torch.optim.Adam(self.particle_model.parameters(), lr=self.phi_lr)

    def state_dict(self) -> dict:
        """ε̂_φ's trainable parameters (the toy MLP or the prior's LoRA) and its Adam state; empty before the
        first call (the toy ε̂_φ does not exist yet). The ideal model has no state (it is rebuilt from the
        particles, which the run checkpoints): ``{"particle_model": "ideal"}``."""
        if self.ideal:
            return {"particle_model": "ideal"}
        if self.phi_optimizer is None:
            return {}
        return {"dim": self.particle_dim, "parameters": [p.detach().clone() for p in self._phi_parameters()],
                "optimizer": copy.deepcopy(self.phi_optimizer.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        saved_kind = state.get("particle_model", "residual") if state else None
        require(saved_kind is None or (saved_kind == "ideal") == self.ideal, "checkpoint guidance state",
                f"VSD state of particle_model={'ideal' if self.ideal else 'residual'}", saved_kind)
        if not state or self.ideal:
            return
        if self.particle_model is None:  # the toy ε̂_φ: build it (its random init is overwritten below)
            like = torch.empty(1, state["dim"], dtype=state["parameters"][0].dtype,
                               device=state["parameters"][0].device)
            self._ensure_particle_model(like, torch.Generator(like.device))
        parameters = self._phi_parameters()
        require(len(parameters) == len(state["parameters"]) and all(
            p.shape == q.shape for p, q in zip(parameters, state["parameters"])),
            "checkpoint guidance state", "ε̂_φ parameters of the same shapes as this run's", "a different model")
        with torch.no_grad():
            for parameter, saved in zip(parameters, state["parameters"]):
                parameter.copy_(saved)
        self.phi_optimizer.load_state_dict(state["optimizer"])

    def _phi_parameters(self) -> list[Tensor]:
        return [p for group in self.phi_optimizer.param_groups for p in group["params"]]

    def train_particle_model(self, x: Tensor, generator: torch.Generator | None,
                             cond: Conditioning | None = None) -> float:
        """``phi_steps`` Adam steps of denoising score matching on the detached particles (ε̂_φ conditioned like
        the particles, ``cond``); last loss."""
        loss = torch.zeros(())
        model = self.particle_model.condition(cond)
        for _ in range(self.phi_steps):
            sigma = self.phi_timesteps.sample(x.shape[0], 0, generator, dtype=x.dtype, device=x.device)
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            prediction = model.eps(x + per_sample(sigma, x) * noise, sigma)
            loss = (prediction - noise).pow(2).flatten(1).sum(dim=1).mean()
            self.phi_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.phi_optimizer.step()
        return float(loss.detach())

    def __call__(self, x: Tensor, step: int, generator: torch.Generator | None = None,
                 cond: Conditioning | None = None) -> GuidanceOutput:
        x = x.detach()
        if self.ideal:
            return self._ideal_call(x, step, generator, cond)
        self._ensure_particle_model(x, generator)
        sigma, noise = self.draw(x, step, generator)
        z = x + per_sample(sigma, x) * noise
        with torch.no_grad():
            eps_prior = self.denoiser.condition(cond).eps(z, sigma)
            eps_particles = self.particle_model.condition(cond).eps(z, sigma)
            target = x - per_sample(distillation_weight(sigma, self.weighting), x) * (eps_prior - eps_particles)
        phi_loss = self.train_particle_model(x, generator, cond)
        nfe = self.denoiser.evaluations_per_call + 1 + self.phi_steps
        return GuidanceOutput(target, summarize(x, target, sigma=sigma.mean(), phi_loss=phi_loss, nfe=nfe))

    def _ideal_call(self, x: Tensor, step: int, generator: torch.Generator | None,
                    cond: Conditioning | None) -> GuidanceOutput:
        """VSD with ε̂_φ = the exact empirical score of the current particles (no training, no φ evaluations;
        the particles' distribution is the one of this batch, so ``cond`` conditions the prior only)."""
        self.particle_model = EmpiricalDenoiser(x)
        sigma, noise = self.draw(x, step, generator)
        z = x + per_sample(sigma, x) * noise
        with torch.no_grad():
            grad = self.denoiser.condition(cond).eps(z, sigma) - self.particle_model.eps(z, sigma)
            target = x - per_sample(distillation_weight(sigma, self.weighting), x) * grad
        nfe = self.denoiser.evaluations_per_call
        return GuidanceOutput(target, summarize(x, target, sigma=sigma.mean(), nfe=nfe))

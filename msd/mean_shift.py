"""Mean-shift distillation (MSD, supplementary Algorithm 2).

With the product distribution ``ṗ(y|x) ∝ p(y) G_λ(x − y)`` the mean-shift vector of the
kernel-smoothed density ``p*_λ = p ∗ G_λ`` is ``m(x) = E_ṗ[y] − x = λ² ∇log p*_λ(x)``. MSD estimates
it with N product samples and returns their mean as the target, so ``target − x`` estimates m(x).
All in VE coordinates with the denoiser ``D(u, s) = u − s·ε̂(u, s)`` (docs/design.md §4 has the derivations).

Product samplers:

* ``product_ode`` (default): the probability-flow ODE of ṗ itself. ``q_σ = ṗ(·|x) ∗ N(0, σ²I)`` has
  ``∇log q_σ(z) = (D(z′, σ′) − z)/σ²`` with ``σ′ = λσ/√(λ² + σ²)``, ``z′ = (λ²z + σ²x)/(λ² + σ²)``
  (because ``p(y) N(y; z, σ²) N(y; x, λ²) ∝ p(y) N(y; z′, σ′²)``), so :class:`ProductDenoiser` is a
  :class:`~msd.denoiser.Denoiser` and any PF-ODE solver started at ``x + σ_max ε`` samples ṗ up to
  discretisation error (``eta > 0``: stochastic DDIM steps). λ → 0 returns x; λ → ∞ is plain sampling.
  ``start_factor = k`` starts instead at ``σ_s = min(kλ, σ_max)`` from ``D(x, λ) + σ_s ε`` — the exact mean of
  ``q_{σ_s}`` (Tweedie: ``E_ṗ[y] = D(x, λ)``) with its covariance ``Cov_ṗ + σ_s² I`` taken as ``σ_s² I`` — on an
  EDM ρ = 7 grid of ``solver_steps`` levels from σ_s down to the schedule's σ_min: ṗ lives within a few λ of
  x, so levels far above λ only transport a Gaussian (one extra call per estimate).
* ``tweedie``: ``y = D(x, λ)``, one call, deterministic; ``p*_λ`` is the heat-diffused density at σ = λ, so
  with the ideal denoiser ``y − x = λ² ∇log p_λ(x)`` is the exact mean shift.
* ``ode`` (eq. 12, paper-literal): start from ``σ_max ε``; each step is one PF-ODE (DDIM/Heun) step with
  the model, then the exact solution of the kernel term ``dz/ds = (c − z)/λ²`` over the step,
  ``z ← c + (z − c)·exp(−Δs/λ²)``. Kernel time ``sigma_sq_half``: ``Δs = (σ_i² − σ_{i+1}²)/2`` (the
  PF-ODE's own time, in which the kernel score shares units with ∇log p_σ); ``timestep``: ``Δs = t_i − t_{i+1}``
  in the schedule's normalised time t ∈ [0, 1] (the pseudocode's Δt). Either scaled by ``kernel_time_scale``.
  Kernel centre ``noise_scaled``: ``c = x`` (= α_t·x in a VP model's ``z_t``); ``raw``: ``c = x/α(σ)``
  (= x in ``z_t``, eq. 12 literally). Not a sampler of ṗ: it damps its start noise by ``e^{−Δs_total/λ²}``.
* ``stable`` (eq. 15): DDIM-invert x on the solver grid (with the model at ``inversion_scale``; null: the
  same guided model, whose DDIM steps then retrace the inversion) to get ``{z*_σ}``; start from
  ``z*_max + (σ_max ε − z*_max)·e^{−Δs_0/λ²}`` and after each step decay towards ``z*_{σ_{i+1}}``.
  λ → 0 returns x (zero gradient); λ → ∞ is plain DDIM sampling from noise.
* ``exact``: the denoiser samples ṗ itself (``denoiser.product_sample``; the toy's mixtures).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from msd.bandwidth import BandwidthSchedule
from msd.checks import require
from msd.denoiser import Conditioning, Denoiser, as_sigma, per_sample, with_scale
from msd.guidance import Guidance, GuidanceOutput, noise_schedule_of, register, summarize
from msd.schedules import EDMSchedule, NoiseSchedule
from msd.solvers import check_solver, ddim_invert, sample, solver_evaluations, solver_step

PRODUCT_SAMPLERS = ("product_ode", "tweedie", "ode", "stable", "exact")
START_NOISES = ("fresh", "common")
KERNEL_CENTERS = ("noise_scaled", "raw")
KERNEL_TIMES = ("sigma_sq_half", "timestep")


class ProductDenoiser(Denoiser):
    """ε̂ of the product distribution ``ṗ(y|c) ∝ p(y) N(y; c, λ²I)`` diffused to level σ (VE):
    ``ε̂_q(z, σ) = (z − D(z′, σ′))/σ``, ``σ′ = λσ/√(λ² + σ²)``, ``z′ = (λ²z + σ²c)/(λ² + σ²)``.

    ``base`` is the model of p (guided or not; D is queried only at levels σ′ < λ), ``centers`` [N, ...]
    the kernel centres (one per row of the inputs), ``bandwidth`` λ > 0 (data units). Works in VE
    coordinates whatever the base model's native parameterisation (``vp`` stays False).
    """

    def __init__(self, base: Denoiser, centers: Tensor, bandwidth: float):
        require(bandwidth > 0, "product bandwidth", "> 0", bandwidth)
        self.base, self.centers, self.bandwidth = base, centers, float(bandwidth)

    @property
    def noise_schedule(self) -> NoiseSchedule | None:
        return self.base.noise_schedule

    @property
    def evaluations_per_call(self) -> int:
        return self.base.evaluations_per_call

    def eps(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = as_sigma(sigma, x)
        lam2, var = self.bandwidth**2, sigma**2
        query_sigma = self.bandwidth * sigma / torch.sqrt(lam2 + var)
        query = (lam2 * x + per_sample(var, x) * self.centers) / per_sample(lam2 + var, x)
        return (x - self.base.denoise(query, query_sigma)) / per_sample(sigma, x)


@register("msd")
class MSDGuidance(Guidance):
    """Drop-in replacement for an SDS call: ``out = MSDGuidance(denoiser)(x, step, generator, cond)``,
    then minimise ``target_loss(x, out.target)``; stop when ``should_stop(step)``.

    ``sampler`` picks the product sampler (module docstring); ``solver_steps`` / ``solver`` / ``eta`` its
    PF-ODE grid (over ``noise_schedule``, default: the denoiser's own), ``kernel_*`` the eq. 12/15 kernel term
    (``ode``, ``stable`` only).
    """

    def __init__(self, denoiser: Denoiser, sampler: str = "product_ode", lambda0: float = math.sqrt(0.1),
                 lambda_min: float = 0.01, lambda_end: float = 0.0, schedule: str = "linear",
                 total_steps: int = 150, num_samples: int = 1, solver_steps: int = 33, solver: str = "heun",
                 eta: float = 0.0, noise_schedule: NoiseSchedule | None = None, kernel_center: str = "noise_scaled",
                 kernel_interval: tuple[float, float] | None = None, kernel_time: str = "sigma_sq_half",
                 kernel_time_scale: float = 1.0, start_factor: float | None = None,
                 inversion_scale: float | None = None, start_noise: str = "fresh"):
        require(sampler in PRODUCT_SAMPLERS, "guidance.sampler", f"one of {PRODUCT_SAMPLERS}", sampler)
        require(kernel_center in KERNEL_CENTERS, "guidance.kernel_center", f"one of {KERNEL_CENTERS}", kernel_center)
        require(kernel_time in KERNEL_TIMES, "guidance.kernel_time", f"one of {KERNEL_TIMES}", kernel_time)
        require(num_samples >= 1, "guidance.num_samples", ">= 1", num_samples)
        require(solver_steps >= 1, "guidance.solver_steps", ">= 1", solver_steps)
        require(kernel_time_scale > 0, "guidance.kernel_time_scale", "> 0", kernel_time_scale)
        require(kernel_interval is None or 0 <= kernel_interval[0] < kernel_interval[1],
                "guidance.kernel_interval", "null or [lo, hi] with 0 <= lo < hi", kernel_interval)
        require(sampler != "tweedie" or num_samples == 1, "guidance.num_samples",
                "1 for sampler='tweedie' (deterministic)", num_samples)
        require(0.0 <= eta <= 1.0, "guidance.eta", "in [0, 1]", eta)
        require(start_noise in START_NOISES, "guidance.start_noise", f"one of {START_NOISES}", start_noise)
        require(start_noise == "fresh" or sampler in ("product_ode", "ode", "stable"), "guidance.start_noise",
                "'fresh' for samplers without start noise (tweedie, exact)", start_noise)
        require(start_factor is None or (start_factor > 0 and sampler == "product_ode"), "guidance.start_factor",
                "null, or > 0 with sampler='product_ode'", start_factor)
        require(eta == 0.0 or (sampler == "product_ode" and solver == "euler"), "guidance.eta",
                "0 unless sampler='product_ode' with solver='euler' (stochastic DDIM steps)", eta)
        if sampler == "exact" and not hasattr(denoiser, "product_sample"):
            raise ValueError("guidance.sampler='exact' needs a denoiser that samples the product distribution "
                             "exactly (the toy's exact mixture denoiser, without guidance); use 'product_ode'")
        self.denoiser, self.sampler, self.solver, self.eta = denoiser, sampler, check_solver(solver), float(eta)
        self.bandwidth = BandwidthSchedule(lambda0, lambda_min, total_steps, schedule, lambda_end)
        self.num_samples, self.kernel_center, self.kernel_time = int(num_samples), kernel_center, kernel_time
        self.kernel_interval = tuple(kernel_interval) if kernel_interval is not None else None
        self.kernel_time_scale = float(kernel_time_scale)
        self.start_factor = None if start_factor is None else float(start_factor)
        self.start_noise, self.common_noise = start_noise, None
        require(inversion_scale is None or sampler == "stable", "guidance.inversion_scale",
                "null unless sampler='stable' (the guidance scale of its DDIM inversion)", inversion_scale)
        self.inversion_denoiser = with_scale(denoiser, inversion_scale)
        self.noise_schedule = noise_schedule_of(denoiser, noise_schedule)
        grid = self.noise_schedule.grid(solver_steps)
        self.sigmas = [float(s) for s in grid]
        self.times = [float(t) for t in self.noise_schedule.time(grid)]

    def should_stop(self, step: int) -> bool:
        return self.bandwidth.should_stop(step)

    def state_dict(self) -> dict:
        """``start_noise='common'``: the standard-normal start noise drawn at the first call (empty before)."""
        return {} if self.common_noise is None else {"common_noise": self.common_noise.clone()}

    def load_state_dict(self, state: dict) -> None:
        if self.start_noise == "fresh" or not state:
            super().load_state_dict(state)
            return
        self.common_noise = state["common_noise"].clone()

    def __call__(self, x: Tensor, step: int, generator: torch.Generator | None = None,
                 cond: Conditioning | None = None) -> GuidanceOutput:
        lam = self.bandwidth(step)
        require(lam > 0, "guidance bandwidth at this step", "> 0 (stop when should_stop(step) is True)", lam)
        with torch.no_grad():
            target = self.product_samples(x.detach(), lam, generator, cond).mean(dim=0)
        return GuidanceOutput(target, summarize(x, target, bandwidth=lam, nfe=self.evaluations_per_estimate()))

    def evaluations_per_estimate(self) -> int:
        """Network evaluations one target costs (all ``num_samples`` samples; 0 for the exact sampler)."""
        if self.sampler == "exact":
            return 0
        if self.sampler == "tweedie":
            return self.denoiser.evaluations_per_call
        steps = len(self.sigmas) - 1
        per_sample_cost = solver_evaluations(steps, self.solver) * self.denoiser.evaluations_per_call
        if self.sampler == "stable":
            per_sample_cost += steps * self.inversion_denoiser.evaluations_per_call
        start = self.denoiser.evaluations_per_call if self.start_factor is not None else 0  # D(x, λ), shared
        return self.num_samples * per_sample_cost + start

    def product_samples(self, x: Tensor, lam: float, generator: torch.Generator | None,
                        cond: Conditioning | None = None) -> Tensor:
        """``num_samples`` draws y ~ ṗ(·|x) ∝ p(y) G_λ(x − y) per row of ``x`` (conditioned on ``cond``):
        [num_samples, *x.shape] (``tweedie``: the one deterministic estimate D(x, λ), [1, *x.shape])."""
        if self.sampler == "tweedie":
            return self.denoiser.condition(cond).denoise(x, as_sigma(lam, x))[None]
        if self.sampler == "exact":
            require(cond is None, "cond", "None for sampler='exact' (the toy's unconditional mixtures)", cond)
            samples = self.denoiser.product_sample(x, lam, generator=generator, n_per_center=self.num_samples)
            return samples.reshape(self.num_samples, *x.shape)
        centers = x.repeat(self.num_samples, *([1] * (x.ndim - 1)))
        solve = {"product_ode": self._product_solve, "ode": self._ode_solve, "stable": self._stable_solve}
        samples = solve[self.sampler](centers, lam, generator, cond)
        return samples.reshape(self.num_samples, *x.shape)

    def start_grid(self, lam: float) -> list[float]:
        """The truncated start's grid: EDM ρ = 7 levels from σ_s = min(kλ, σ_max) to σ_min, then 0."""
        sigma_min = self.noise_schedule.sigma_min
        top = min(self.start_factor * lam, self.noise_schedule.sigma_max)
        require(top > sigma_min, "guidance.start_factor * bandwidth", f"> the schedule's sigma_min {sigma_min:g}",
                top)
        return [float(s) for s in EDMSchedule(sigma_min, top).grid(len(self.sigmas) - 1)]

    def _product_solve(self, centers: Tensor, lam: float, generator: torch.Generator | None,
                       cond: Conditioning | None) -> Tensor:
        """The PF-ODE of ``ProductDenoiser`` from ``x + σ_max ε`` (or the truncated start) down the grid."""
        model = self.denoiser.condition(None if cond is None else cond.repeat(self.num_samples))
        product = ProductDenoiser(model, centers, lam)
        if self.start_factor is None:
            z = centers + self._noise(centers, generator)
            return sample(product, z, self.sigmas, self.solver, self.eta, generator)
        sigmas = self.start_grid(lam)
        n = centers.shape[0] // self.num_samples
        mean = self.denoiser.condition(cond).denoise(centers[:n], as_sigma(lam, centers[:n])).repeat(
            self.num_samples, *([1] * (centers.ndim - 1)))
        z = mean + self._noise(centers, generator, sigmas[0])
        return sample(product, z, sigmas, self.solver, self.eta, generator)

    def _decay(self, i: int, lam: float) -> float:
        """exp(−Δs/λ²) over solver step i (σ_i → σ_{i+1}), Δs in the ``kernel_time`` convention times
        ``kernel_time_scale``; 1 where σ_i is outside ``kernel_interval``."""
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        if self.kernel_interval is not None and not (self.kernel_interval[0] <= sigma <= self.kernel_interval[1]):
            return 1.0
        if self.kernel_time == "sigma_sq_half":
            delta = 0.5 * (sigma**2 - sigma_next**2)
        else:
            delta = self.times[i] - self.times[i + 1]
        return math.exp(-self.kernel_time_scale * delta / lam**2)

    def _center(self, centers: Tensor, sigma: float) -> Tensor:
        if self.kernel_center == "noise_scaled":
            return centers
        alpha = self.denoiser.signal_scale(torch.tensor([sigma], dtype=centers.dtype))
        return centers / float(alpha)

    def _noise(self, like: Tensor, generator: torch.Generator | None, sigma: float | None = None) -> Tensor:
        """σ ε with ε ~ N(0, I) shaped like ``like`` (σ: the grid's first level unless given). ``start_noise=
        'common'``: ε is drawn at the first call and reused at every later one (common random numbers: each
        target is still one draw of ṗ, and successive targets are a continuous function of x and λ)."""
        sigma = self.sigmas[0] if sigma is None else sigma
        if self.start_noise == "fresh":
            return sigma * torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
        if self.common_noise is None:
            self.common_noise = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
        require(self.common_noise.shape == like.shape, "the samples' shape with guidance.start_noise='common'",
                f"the first call's {tuple(self.common_noise.shape)}", tuple(like.shape))
        return sigma * self.common_noise.to(like.device)

    def _ode_solve(self, centers: Tensor, lam: float, generator: torch.Generator | None,
                   cond: Conditioning | None) -> Tensor:
        model = self.denoiser.condition(None if cond is None else cond.repeat(self.num_samples))
        z = self._noise(centers, generator)
        for i, (sigma, sigma_next) in enumerate(zip(self.sigmas[:-1], self.sigmas[1:])):
            z = solver_step(model, z, sigma, sigma_next, self.solver)
            decay = self._decay(i, lam)
            if decay < 1.0:
                c = self._center(centers, sigma_next)
                z = c + (z - c) * decay
        return z

    def _stable_solve(self, centers: Tensor, lam: float, generator: torch.Generator | None,
                      cond: Conditioning | None) -> Tensor:
        cond = None if cond is None else cond.repeat(self.num_samples)
        model, inversion_model = self.denoiser.condition(cond), self.inversion_denoiser.condition(cond)
        ascending = torch.tensor(self.sigmas[::-1], dtype=torch.float64)
        anchors = ddim_invert(inversion_model, centers, ascending).flip(0)  # anchors[i] at self.sigmas[i]
        z = anchors[0] + (self._noise(centers, generator) - anchors[0]) * self._decay(0, lam)
        for i, (sigma, sigma_next) in enumerate(zip(self.sigmas[:-1], self.sigmas[1:])):
            z = solver_step(model, z, sigma, sigma_next, self.solver)
            z = anchors[i + 1] + (z - anchors[i + 1]) * self._decay(i, lam)
        return z

"""The device contract (docs/design.md §3.8, §7), checked on the CPU: every random draw the library makes takes the
``torch.Generator`` it is given (never the global RNG), states the device it draws on, and that device is the
generator's and ``x``'s; a guidance call leaves the global RNG as it found it; and an SD-style prior's guidances
live on the prior's own VP schedule, never on the toy's EDM levels (σ_max 5 instead of SD's ≈ 14.6).

:class:`DrawRecorder` records every draw at torch's function layer (a ``TorchFunctionMode`` sees each ``torch.*``
call and Tensor method however it is imported, which a monkeypatch of ``torch.randn`` would miss for
``from torch import randn``): the generator passed, the device asked for (the ``device=`` of a factory such as
``torch.rand``, the input's device for ``*_like``, in-place and input-driven draws such as ``multinomial``;
"unspecified" when a factory names none) and the first caller outside torch.

What it catches. Before 19364c5, ``TimestepSampler.t`` (msd/schedules.py at 1c55cd2) drew
``torch.rand(n, generator=g, dtype=torch.float64)`` with no device, i.e. on the CPU whatever x's device: with the
CUDA generator a CUDA run must use, SDS, VSD and SDI failed on their first call ("Expected a 'cpu' device type for
generator"), and the runs were given a CPU generator instead, which then met x on CUDA in the next draw. VSD's ε̂_φ
init (``torch.randint``/``torch.randn`` without a device, ``torch.Generator()``), the image generators' init and
``prior.add_lora``'s draw of A had the same fault. A CPU-only machine cannot see a CPU/CUDA mismatch, so the
contract is checked on what a CPU run does show: a draw without a generator, without a device (the default
device, the CPU), or with a device given as a literal string (a hard-coded ``"cpu"`` rather than a device taken from
a tensor, a generator or the prior) is a violation. :func:`test_the_contract_flags_the_old_timestep_draw` replays
the old ``TimestepSampler.t`` and checks that the contract reports it for SDS, SDI and VSD; ``tests/cuda_smoke.py``
runs the same guidances on a GPU with one CUDA generator. Its real-loop cases found one more global-RNG user, now
fixed: ``ShapesClassifier.load`` built its layers with PyTorch's default initialisation before loading the weights
(:func:`test_loading_the_shapes_classifier_draws_nothing`).
"""
from __future__ import annotations

import inspect
import sys
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import baselines  # noqa: F401  (registers "sds", "vsd", "sdi")
from msd.denoiser import Denoiser, GuidedDenoiser, as_sigma
from msd.generators import FourierImageMLP, ImageGrid
from msd.guidance import build_guidance
from msd.priors import DiffusersPrior
from msd.schedules import TimestepSampler, VPSchedule
from msd.solvers import ddim_invert, sample
from toy2d import TOY_SCHEDULE, ExactDenoiser, fractal_gmm

REPO = Path(__file__).resolve().parent.parent
LIBRARY = ("msd", "baselines", "toy2d", "shapes")
"""The library packages the contract binds (evaluation draws in experiments/ are deliberately on the CPU)."""
_TORCH_DIRS = tuple({f"{Path(torch.__file__).parent}/", f"{Path(torch.__file__).resolve().parent}/"})  # not torchvision

# --- the recorder --------------------------------------------------------------------------------------------

_FACTORIES = {torch.randn, torch.rand, torch.randint, torch.randperm}
_LIKE = {torch.randn_like, torch.rand_like, torch.randint_like}
_FROM_INPUT = {torch.multinomial, torch.bernoulli, torch.poisson, torch.normal, torch.Tensor.multinomial,
               torch.Tensor.bernoulli}
_IN_PLACE = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.random_, torch.Tensor.exponential_,
             torch.Tensor.bernoulli_, torch.Tensor.cauchy_, torch.Tensor.log_normal_, torch.Tensor.geometric_}
_INIT = {nn.init.uniform_, nn.init.normal_, nn.init.trunc_normal_, nn.init.kaiming_uniform_, nn.init.kaiming_normal_,
         nn.init.xavier_uniform_, nn.init.xavier_normal_, nn.init.orthogonal_, nn.init.sparse_}
_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_ALWAYS_GLOBAL = {F.gumbel_softmax}  # random, and no generator argument at all


@dataclass
class Draw:
    """One random draw: ``device`` None = unspecified (the default device); ``raw_device`` as passed."""

    op: str
    generator: torch.Generator | None
    device: torch.device | None
    raw_device: object
    caller: str
    library: bool


_RECORDER_FRAMES = {"_caller", "_draw", "_describe", "__torch_function__"}


def _caller() -> tuple[str, bool]:
    """``path:line`` of the innermost frame outside torch and this recorder, and whether it is library code."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(_TORCH_DIRS)
                                 or frame.f_code.co_filename == __file__ and frame.f_code.co_name in _RECORDER_FRAMES):
        frame = frame.f_back
    if frame is None:
        return "<torch>", False
    path = Path(frame.f_code.co_filename).resolve()
    try:
        relative = path.relative_to(REPO)
    except ValueError:
        return f"{path}:{frame.f_lineno}", False
    return f"{relative}:{frame.f_lineno}", relative.parts[0] in LIBRARY


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


class DrawRecorder(TorchFunctionMode):
    """``with DrawRecorder() as recorder: ...`` records every random draw in ``recorder.draws`` (draws on the
    meta device, which draw nothing, e.g. ``nn.utils.skip_init``'s, are left out)."""

    def __init__(self):
        super().__init__()
        self.draws: list[Draw] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        draw = self._describe(func, args, kwargs)
        if draw is not None and (draw.device is None or draw.device.type != "meta"):
            self.draws.append(draw)
        return func(*args, **kwargs)

    def _describe(self, func, args, kwargs) -> Draw | None:
        name = getattr(func, "__name__", repr(func))
        if func in _FACTORIES or func in _LIKE or func in _FROM_INPUT or func in _IN_PLACE:
            raw = kwargs.get("device")
            if raw is None and func not in _FACTORIES:
                source = _first_tensor(args, kwargs)
                raw = source.device if source is not None else None  # torch.normal(float, float, size): none
            return self._draw(name, kwargs.get("generator"), raw)
        if func in _INIT:
            bound = inspect.signature(func).bind(*args, **kwargs)
            return self._draw(name, bound.arguments.get("generator"), bound.arguments["tensor"].device)
        if func in _DROPOUT:
            bound = inspect.signature(func).bind(*args, **kwargs)
            bound.apply_defaults()
            if bound.arguments["training"] and bound.arguments["p"] > 0:
                return self._draw(name, None, bound.arguments["input"].device)
            return None
        if func in _ALWAYS_GLOBAL:
            return self._draw(name, None, _first_tensor(args, kwargs).device)
        return None

    @staticmethod
    def _draw(name: str, generator, raw) -> Draw:
        caller, library = _caller()
        device = None if raw is None else torch.device(raw)
        return Draw(name, generator, device, raw, caller, library)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def contract_violations(draws: list[Draw], device: torch.device | str | None, library_only: bool = False) -> list[str]:
    """What breaks the contract: a draw by the library without a generator, without a device, with a literal
    device string, or on a device other than its generator's or ``device`` (x's; None: not checked); and, unless
    ``library_only``, any draw by code outside the library (a guidance call should make none)."""
    device = None if device is None else torch.device(device)
    problems = []
    for d in draws:
        where = f"{d.op} at {d.caller}"
        if not d.library:
            if not library_only:
                problems.append(f"{where}: a draw outside the library (generator {d.generator})")
            continue
        if d.generator is None:
            problems.append(f"{where}: no generator (the global RNG)")
        if d.device is None:
            problems.append(f"{where}: device unspecified (the default device, whatever x's)")
            continue
        if isinstance(d.raw_device, str):
            problems.append(f"{where}: device given as the literal {d.raw_device!r}, not taken from a tensor or "
                            f"generator")
        if d.generator is not None and not _same_device(d.device, d.generator.device):
            problems.append(f"{where}: draws on {d.device} with a generator on {d.generator.device}")
        if device is not None and not _same_device(d.device, device):
            problems.append(f"{where}: draws on {d.device}, x lives on {device}")
    return problems


# --- fixtures ------------------------------------------------------------------------------------------------

PROMPTS = ["the cat", "a dog"]


def seeded(seed: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


@pytest.fixture(scope="module")
def toy():
    return ExactDenoiser(fractal_gmm("A"))


@pytest.fixture(scope="module")
def prior_dirs(tmp_path_factory):
    from tests.tiny_sd import build_tiny_prior

    root = tmp_path_factory.mktemp("device_priors")
    return {"pixel": build_tiny_prior(root / "pixel", latent=False, sample_size=8),
            "latent": build_tiny_prior(root / "latent", latent=True, sample_size=8)}


@pytest.fixture(scope="module")
def priors(prior_dirs):
    return {kind: DiffusersPrior.from_pretrained(path, device="cpu") for kind, path in prior_dirs.items()}


@pytest.fixture(scope="module")
def lora_priors(prior_dirs):
    """Fresh priors with VSD's LoRA (added once per module: a prior holds one adapter)."""
    loaded = {kind: DiffusersPrior.from_pretrained(path, device="cpu") for kind, path in prior_dirs.items()}
    for prior in loaded.values():
        prior.add_lora(rank=2, generator=seeded(3))
    return loaded


def record_calls(guidance, x: torch.Tensor, cond=None, steps=(0, 1), random: bool = True) -> list:
    """Call ``guidance`` at ``steps`` with one generator on x's device under the recorder and check the contract,
    the global RNG (untouched) and the generator (advanced by a random guidance, untouched by a deterministic one)."""
    generator = seeded(0, x.device)
    global_state, generator_state = torch.get_rng_state(), generator.get_state()
    with DrawRecorder() as recorder:
        outs = [guidance(x, step, generator, cond) for step in steps]
    assert torch.equal(torch.get_rng_state(), global_state), "the guidance call moved the global RNG"
    problems = contract_violations(recorder.draws, x.device)
    assert not problems, "\n".join(problems)
    if random:
        assert recorder.draws and not torch.equal(generator.get_state(), generator_state)
    else:
        assert not recorder.draws and torch.equal(generator.get_state(), generator_state)
    for out in outs:
        assert out.target.shape == x.shape and out.target.device == x.device
        assert bool(torch.isfinite(out.target).all())
    return outs


# --- the recorder itself -------------------------------------------------------------------------------------

def test_the_recorder_sees_every_kind_of_draw():
    x, g = torch.zeros(4), seeded(1)
    with torch.random.fork_rng(devices=[]), DrawRecorder() as recorder:  # some of these draw from the global RNG
        torch.randn(3)
        torch.rand(3, generator=g, device="cpu")
        torch.randint(0, 5, (2,), generator=g, device=x.device)
        torch.randn_like(x)
        x.clone().normal_(generator=g)
        torch.multinomial(torch.ones(3), 2, generator=g)
        nn.init.kaiming_uniform_(torch.empty(2, 2), generator=g)
        F.dropout(x, 0.5, training=True)
        F.dropout(x, 0.5, training=False)  # no draw
        nn.utils.skip_init(nn.Linear, 2, 2)  # initialises on the meta device: no draw
    seen = [(d.op, d.generator is g, d.device, d.raw_device) for d in recorder.draws]
    cpu = torch.device("cpu")
    assert seen == [("randn", False, None, None), ("rand", True, cpu, "cpu"), ("randint", True, cpu, cpu),
                    ("randn_like", False, cpu, cpu), ("normal_", True, cpu, cpu),
                    ("multinomial", True, cpu, cpu), ("kaiming_uniform_", True, cpu, cpu), ("dropout", False, cpu, cpu)]
    assert all(d.caller.startswith("tests/test_device_contract.py:") and not d.library for d in recorder.draws)


def test_contract_violations_name_each_fault():
    g = seeded(1)
    draws = [Draw("randn", None, torch.device("cpu"), torch.device("cpu"), "msd/a.py:1", True),
             Draw("rand", g, None, None, "msd/b.py:2", True),
             Draw("rand", g, torch.device("cpu"), "cpu", "msd/c.py:3", True),
             Draw("randn", g, torch.device("cuda"), torch.device("cuda"), "msd/d.py:4", True),
             Draw("kaiming_uniform_", None, torch.device("cpu"), torch.device("cpu"), "peft/x.py:5", False),
             Draw("randn", g, torch.device("cpu"), torch.device("cpu"), "msd/ok.py:6", True)]
    problems = contract_violations(draws, "cpu")
    assert [p.split(":")[0] for p in problems] == ["randn at msd/a.py", "rand at msd/b.py", "rand at msd/c.py",
                                                   "randn at msd/d.py", "randn at msd/d.py",
                                                   "kaiming_uniform_ at peft/x.py"]
    assert "global RNG" in problems[0] and "unspecified" in problems[1] and "literal 'cpu'" in problems[2]
    assert "generator on cpu" in problems[3] and "x lives on cpu" in problems[4]
    assert len(contract_violations(draws, "cpu", library_only=True)) == 5


# TimestepSampler.t as it was at 1c55cd2 (msd/schedules.py), compiled under that file's name so that the recorder
# attributes its draw to the library as it did then; `device` is accepted (and, as then, only moved to afterwards).
_OLD_TIMESTEP_T = '''
def t(self, n, step, generator=None, device="cpu"):
    progress = min(max(step, 0) / self.total_steps, 1.0)
    if self.mode in ("uniform", "annealed"):
        hi = self.t_max if self.mode == "uniform" else self.t_max + (self.t_end - self.t_max) * progress
        hi = max(hi, self.t_min)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return (self.t_min + (hi - self.t_min) * u).to(device)
    shape = progress if self.mode == "linear" else math.sqrt(progress)
    return torch.full((n,), self.t_max - (self.t_max - self.t_min) * shape, dtype=torch.float64).to(device)
'''


@pytest.mark.parametrize("name", ["sds", "sdi", "vsd"])
def test_the_contract_flags_the_old_timestep_draw(toy, monkeypatch, name):
    """The GPU bug of 1c55cd2: the σ draw of every SDS-like guidance named no device."""
    namespace = {"torch": torch, "math": __import__("math")}
    exec(compile(textwrap.dedent(_OLD_TIMESTEP_T), str(REPO / "msd" / "schedules.py"), "exec"), namespace)
    monkeypatch.setattr(TimestepSampler, "t", namespace["t"])
    x = torch.randn(8, 2, generator=seeded(2))
    guidance = build_guidance(name, denoiser=toy)
    with DrawRecorder() as recorder:
        guidance(x, 0, seeded(0))
    problems = contract_violations(recorder.draws, x.device)
    assert problems and all("rand at msd/schedules.py" in p and "device unspecified" in p for p in problems)


# --- the guidances on the toy --------------------------------------------------------------------------------

MSD_TOY = {"solver_steps": 4, "num_samples": 2}
TOY_CASES = {
    "sds": ("sds", {}),
    "sds_annealed": ("sds", {"timestep_mode": "annealed"}),
    "vsd_residual": ("vsd", {"phi_hidden": 16, "phi_layers": 2}),
    "vsd_ideal": ("vsd", {"particle_model": "ideal"}),
    "sdi_uniform": ("sdi", {"inversion_steps": 4}),
    "sdi_global_jitter_eta": ("sdi", {"inversion_steps": 4, "inversion_grid": "global", "level_jitter": True,
                                      "eta": 0.3}),
    "sdi_no_inversion": ("sdi", {"inversion": False}),
    "msd_product_ode": ("msd", MSD_TOY),
    "msd_product_ode_start": ("msd", {**MSD_TOY, "start_factor": 3.0}),
    "msd_product_ode_eta": ("msd", {**MSD_TOY, "solver": "euler", "eta": 0.5}),
    "msd_tweedie": ("msd", {"sampler": "tweedie"}),
    "msd_ode": ("msd", {**MSD_TOY, "sampler": "ode"}),
    "msd_stable": ("msd", {**MSD_TOY, "sampler": "stable"}),
    "msd_exact": ("msd", {"sampler": "exact", "num_samples": 2}),
}


@pytest.mark.parametrize("case", TOY_CASES)
def test_toy_guidance_draws_follow_the_contract(toy, case):
    name, kwargs = TOY_CASES[case]
    guidance = build_guidance(name, denoiser=toy, **kwargs)
    assert guidance.noise_schedule is TOY_SCHEDULE
    record_calls(guidance, torch.randn(8, 2, generator=seeded(2)), random=case != "msd_tweedie")


# --- the guidances on tiny diffusers priors ------------------------------------------------------------------

MSD_PRIOR = {"lambda0": 1.0, "lambda_min": 0.01, "solver_steps": 3, "num_samples": 2}
PRIOR_CASES = {
    "sds": ("sds", {}),
    "vsd_lora": ("vsd", None),  # the prior's LoRA as ε̂_φ
    "vsd_ideal": ("vsd", {"particle_model": "ideal"}),
    "sdi_uniform": ("sdi", {"inversion_steps": 3}),
    "sdi_global_jitter_eta": ("sdi", {"inversion_steps": 4, "inversion_grid": "global", "level_jitter": True,
                                      "eta": 0.3, "inversion_scale": -2.0}),
    "msd_product_ode": ("msd", MSD_PRIOR),
    "msd_product_ode_start": ("msd", {**MSD_PRIOR, "start_factor": 3.0}),
    "msd_product_ode_eta": ("msd", {**MSD_PRIOR, "solver": "euler", "eta": 0.5}),
    "msd_tweedie": ("msd", {"lambda0": 1.0, "sampler": "tweedie"}),
    "msd_ode": ("msd", {**MSD_PRIOR, "sampler": "ode", "solver": "euler"}),
    "msd_stable": ("msd", {**MSD_PRIOR, "sampler": "stable", "solver": "euler", "inversion_scale": -2.0}),
}


@pytest.mark.parametrize("kind", ["pixel", "latent"])
@pytest.mark.parametrize("case", PRIOR_CASES)
def test_prior_guidance_draws_follow_the_contract(priors, lora_priors, kind, case):
    name, kwargs = PRIOR_CASES[case]
    prior = lora_priors[kind] if kwargs is None else priors[kind]
    if kwargs is None:
        kwargs = {"particle_model": prior.lora_denoiser(), "phi_steps": 1}
    guidance = build_guidance(name, denoiser=prior.denoiser(4.0), **kwargs)
    assert guidance.noise_schedule is prior.schedule
    x = torch.randn(len(PROMPTS), *prior.sample_shape, generator=seeded(2))
    record_calls(guidance, x, prior.conditioning(PROMPTS), random=case != "msd_tweedie")


def test_add_lora_draws_from_its_generator_alone(prior_dirs):
    """The LoRA's A is drawn from the given generator on the prior's device; PEFT's own initialisation (global
    RNG, on the CPU, overwritten) leaves the global RNG as it was; so A is a function of the generator alone."""
    loras = []
    for global_seed in (0, 1):
        prior = DiffusersPrior.from_pretrained(prior_dirs["latent"], device="cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(global_seed)
            global_state = torch.get_rng_state()
            with DrawRecorder() as recorder:
                parameters = prior.add_lora(rank=2, generator=seeded(5))
            assert torch.equal(torch.get_rng_state(), global_state)
        assert not contract_violations(recorder.draws, prior.device, library_only=True)
        library = [d for d in recorder.draws if d.library]
        assert len(library) == sum(".lora_A." in n for n, _ in prior.unet.named_parameters())
        foreign = [d for d in recorder.draws if not d.library]
        assert foreign and all("/peft/" in d.caller for d in foreign)
        assert all(d.device == torch.device("cpu") for d in foreign)  # what fork_rng(devices=[]) protects
        loras.append([p.detach().clone() for p in parameters])
    assert all(torch.equal(a, b) for a, b in zip(*loras, strict=True))


def test_image_generators_draw_on_their_generator(priors):
    global_state = torch.get_rng_state()
    with DrawRecorder() as recorder:
        grid = ImageGrid(2, 4, 8, 8, init_std=1.0, generator=seeded(1))
        mlp = FourierImageMLP(2, 3, 8, 8, hidden=8, layers=2, num_frequencies=4, generator=seeded(1))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert len(recorder.draws) == 1 + 1 + 2 * 3  # image; frequencies; weight and bias of 3 layers
    assert not contract_violations(recorder.draws, "cpu")
    assert all(p.device == torch.device("cpu") for p in (*grid.parameters(), *mlp.parameters(), *mlp.buffers()))


def test_solvers_draw_on_their_generator(toy):
    x = torch.randn(8, 2, generator=seeded(2))
    grid = TOY_SCHEDULE.grid(4)
    generator, global_state = seeded(0), torch.get_rng_state()
    with DrawRecorder() as recorder:
        sampled = sample(toy, x * float(grid[0]), grid, "euler", eta=0.5, generator=generator)
        trajectory = ddim_invert(toy, x, grid.flip(0), eta=0.3, generator=generator)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert len(recorder.draws) == 4 + 4  # one per stochastic step (the inversion's first, from σ = 0, scaled by 0)
    assert not contract_violations(recorder.draws, x.device)
    assert bool(torch.isfinite(sampled).all() and torch.isfinite(trajectory).all())


# --- the schedule contract -----------------------------------------------------------------------------------

@contextmanager
def queried_sigmas(prior: DiffusersPrior):
    """Every σ the prior's UNet is queried at (float64, CPU), in call order."""
    seen: list[torch.Tensor] = []
    original = prior.eps

    def eps(x, sigma, embeddings, adapters=False):
        seen.append(as_sigma(sigma, x).detach().double().cpu())
        return original(x, sigma, embeddings, adapters)

    prior.eps = eps
    try:
        yield seen
    finally:
        del prior.eps


ALL_GUIDANCES = {"sds": {}, "vsd": {}, "vsd_ideal": {"particle_model": "ideal"}, "sdi": {},
                 "sdi_global": {"inversion_grid": "global"}, "msd": {}, "msd_tweedie": {"sampler": "tweedie"},
                 "msd_ode": {"sampler": "ode"}, "msd_stable": {"sampler": "stable"},
                 "msd_start": {"start_factor": 3.0}}


@pytest.mark.parametrize("case", ALL_GUIDANCES)
def test_prior_guidances_take_the_prior_vp_schedule(priors, case):
    """No noise_schedule given: every guidance works on the prior's own VPSchedule (SD's σ ∈ [0.029, 14.6]),
    its timestep samplers and MSD's solver grid included."""
    prior = priors["pixel"]
    sd = VPSchedule.stable_diffusion()
    assert isinstance(prior.schedule, VPSchedule) and prior.schedule.sigma_max == pytest.approx(sd.sigma_max)
    assert prior.schedule.sigma_max > 14 and prior.schedule.sigma_min == pytest.approx(sd.sigma_min)
    guidance = build_guidance(case.split("_")[0], denoiser=prior.denoiser(4.0), **ALL_GUIDANCES[case])
    assert guidance.noise_schedule is prior.schedule
    if case.startswith("msd"):
        assert guidance.sigmas[0] == pytest.approx(prior.schedule.sigma_max, rel=1e-12)
        assert guidance.sigmas[-2] == pytest.approx(prior.schedule.sigma_min, rel=1e-12) and guidance.sigmas[-1] == 0
    else:
        assert guidance.timesteps.schedule is prior.schedule
    if case.startswith("vsd"):
        assert guidance.phi_timesteps.schedule is prior.schedule


TOP_CASES = {  # guidances whose largest query is the schedule's σ_max
    "sds": ("sds", {"t_min": 1.0, "t_max": 1.0}),
    "vsd_ideal": ("vsd", {"particle_model": "ideal", "t_min": 1.0, "t_max": 1.0}),
    "sdi": ("sdi", {"t_min": 1.0, "t_max": 1.0, "inversion_steps": 3}),
    "sdi_global": ("sdi", {"t_min": 1.0, "t_max": 1.0, "inversion_steps": 3, "inversion_grid": "global"}),
    "msd_ode": ("msd", {"sampler": "ode", "solver": "euler", "solver_steps": 3}),
    "msd_stable": ("msd", {"sampler": "stable", "solver": "euler", "solver_steps": 3}),
    # λ ≫ σ_max: the product sampler is plain sampling, and its first query σ' = λσ/√(λ²+σ²) is σ_max
    "msd_product_ode": ("msd", {"lambda0": 1e4, "solver": "euler", "solver_steps": 3}),
}


@pytest.mark.parametrize("case", TOP_CASES)
def test_prior_guidances_solve_up_to_the_prior_sigma_max(priors, case):
    prior = priors["latent"]
    name, kwargs = TOP_CASES[case]
    guidance = build_guidance(name, denoiser=prior.denoiser(4.0), **kwargs)
    x = torch.randn(len(PROMPTS), *prior.sample_shape, generator=seeded(2))
    with queried_sigmas(prior) as seen:
        guidance(x, 0, seeded(0), prior.conditioning(PROMPTS))
    sigmas = torch.cat(seen)
    assert float(sigmas.max()) == pytest.approx(prior.schedule.sigma_max, rel=1e-5)  # ≈ 14.6, not the toy's 5
    assert bool((sigmas > 0).all())


@pytest.mark.parametrize("name", ["sds", "vsd", "sdi"])
def test_drawn_sigmas_lie_in_the_prior_range(priors, name):
    """t ~ U[t_min, t_max] (and VSD's φ training, t ~ U[0, 1]) mapped through the prior's schedule."""
    prior = priors["pixel"]
    guidance = build_guidance(name, denoiser=prior.denoiser(4.0), t_min=0.0, t_max=1.0, **(
        {"particle_model": "ideal"} if name == "vsd" else {}))
    x = torch.randn(len(PROMPTS), *prior.sample_shape, generator=seeded(2))
    generator = seeded(0)
    with queried_sigmas(prior) as seen:
        for step in range(4):
            guidance(x, step, generator, prior.conditioning(PROMPTS))
    sigmas = torch.cat(seen)
    low, high = prior.schedule.sigma_min, prior.schedule.sigma_max
    assert bool(((sigmas >= low * (1 - 1e-6)) & (sigmas <= high * (1 + 1e-6))).all())
    assert float(sigmas.max()) > TOY_SCHEDULE.sigma_max  # some draws above the toy's σ_max = 5


class _Unscheduled(Denoiser):
    def eps(self, x, sigma):
        return torch.zeros_like(x)


@pytest.mark.parametrize("name", ["sds", "vsd", "sdi", "msd"])
def test_a_denoiser_without_schedule_fails_naming_the_field(name):
    for denoiser in (_Unscheduled(), GuidedDenoiser(_Unscheduled(), _Unscheduled(), 2.0)):
        with pytest.raises(ValueError, match=r"noise_schedule"):
            build_guidance(name, denoiser=denoiser)
    assert build_guidance(name, denoiser=_Unscheduled(), noise_schedule=TOY_SCHEDULE).noise_schedule is TOY_SCHEDULE


@pytest.fixture
def tiny_pixel_prior(tiny_shapes_prior):
    """The session's tiny random ShapesWorld pixel prior (tests/conftest.py); its classifier lies beside it."""
    return tiny_shapes_prior[0]


def test_loading_the_shapes_classifier_draws_nothing(tiny_pixel_prior):
    """The text-to-2D scorer loads ShapesWorld's classifier every run: it used to build its layers with PyTorch's
    default initialisation (global RNG) before loading the weights over them (found by tests/cuda_smoke.py's loop)."""
    from safetensors.torch import load_file

    from shapes.models import ShapesClassifier

    directory = tiny_pixel_prior.parent / "classifier"
    global_state = torch.get_rng_state()
    with DrawRecorder() as recorder:
        classifier = ShapesClassifier.load(directory)
    assert not recorder.draws and torch.equal(torch.get_rng_state(), global_state)
    saved = load_file(directory / "model.safetensors")
    assert classifier.state_dict().keys() == saved.keys()
    assert all(torch.equal(classifier.state_dict()[k], v) for k, v in saved.items())
    assert not classifier.training and all(isinstance(p, nn.Parameter) and p.requires_grad and p.device.type == "cpu"
                                           for p in classifier.parameters())


@pytest.mark.parametrize("guidance", ["t2d_sds", "t2d_vsd", "t2d_sdi", "t2d_msd", "t2d_msd_ode", "t2d_msd_stable",
                                      "t2d_msd_tweedie"])
def test_text2d_builds_its_guidance_on_the_prior_schedule(tiny_pixel_prior, tmp_path, guidance):
    """experiments.text2d: the guidance (and the denoiser it is built on) carry the prior's VP schedule, and the
    set-up's draws (LoRA, image generator) follow the contract on the prior's device."""
    from hydra import compose, initialize_config_dir

    from experiments.text2d import build_setup

    overrides = ["experiment=table4_shapes", f"prior.path={tiny_pixel_prior}",
                 f"prior.classifier={tiny_pixel_prior.parent / 'classifier'}", 'task.prompts=["a red circle"]',
                 "task.images_per_prompt=2", "task.solver_steps=2", f"task.eval.cache_dir={tmp_path}", "logger=none",
                 f"guidance={guidance}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    global_state = torch.get_rng_state()
    with DrawRecorder() as recorder:
        setup = build_setup(cfg)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert not contract_violations(recorder.draws, setup.prior.device, library_only=True)
    schedule = setup.prior.schedule
    assert setup.denoiser.noise_schedule is schedule and setup.guidance.noise_schedule is schedule
    assert schedule.sigma_max == pytest.approx(VPSchedule.stable_diffusion().sigma_max)
    if guidance.startswith("t2d_msd"):
        assert setup.guidance.sigmas[0] == pytest.approx(schedule.sigma_max, rel=1e-12)

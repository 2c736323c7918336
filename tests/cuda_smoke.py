"""GPU smoke test of the device contract (docs/design.md §7): the four guidances on CUDA with one CUDA generator, and
the packed rendering layout of text-to-3D (§10.2) through nerfacc's CUDA extension.

Run it on a machine with a GPU, from the repository root (about a minute, plus nerfacc's one-off JIT build of its
CUDA extension, which needs nvcc, on the first render case; nothing is downloaded):

    python -m tests.cuda_smoke                   # device cuda, priors in float16
    python -m tests.cuda_smoke --cases render    # only the render cases (seconds once nerfacc is built)
    python -m tests.cuda_smoke --device cpu      # the guidance cases on the CPU in float32 (checks the script itself)

It writes its log, atomically (``experiments.io``), to ``results/bench/cuda_smoke.log`` (a ``--device cpu`` run to
``results/bench/cuda_smoke.cpu.log``, so that it is never taken for the GPU log; ``--cases render`` or ``guidance`` to
``cuda_smoke.<cases>.log`` / ``cuda_smoke.<cases>.cpu.log``; ``--log PATH`` to choose) and exits non-zero if any
case fails.

Tiny random SD-style pipelines are built from configs in a temporary folder (``tests/tiny_sd.py``: a pixel and a
latent prior, and the ShapesWorld-shaped 32 px pixel prior with an untrained classifier), loaded on ``--device`` in
``--dtype``. One ``torch.Generator(device)`` serves every case. The cases:

* ``direct/<prior>/<guidance>``: on the pixel prior (``clip_sample``) and the latent prior (16² samples), ``sds``,
  ``vsd`` (ε̂_φ = the prior's LoRA), ``sdi`` (global grid, η = 0.3, level jitter, mirrored inversion scale) and
  ``msd`` with the samplers ``product_ode`` (default start at σ_max; truncated start ``start_factor`` = 3;
  η = 0.5), ``stable`` and ``tweedie``, CFG w = 4, one prompt per image (per-call conditioning). Each takes STEPS
  steps of ``½‖x − sg(y)‖²`` with Adam on an ``ImageGrid`` initialised from the generator, under
  ``tests.test_device_contract.DrawRecorder``: every draw by the library must name the generator and the device,
  both ``--device``; no draw by other code; the global CPU and CUDA RNG states unchanged.
  ``direct/<prior>/add_lora`` checks the LoRA's draw the same way (PEFT's own initialisation draws from the global
  CPU RNG under ``fork_rng`` and is overwritten: allowed, as long as the global states come back unchanged).
* ``loop/<guidance>``: the real run, ``experiments.run.run`` on a composed ``experiment=table4_shapes`` config
  (the tiny 32 px prior, ``device=<device>``, ``prior.dtype=<dtype>``, 2 prompts × 2 images, STEPS iterations,
  evaluation with a 2-step DDIM reference set) for ``t2d_sds``, ``t2d_vsd``, ``t2d_sdi``, ``t2d_msd`` (truncated
  start), ``t2d_msd`` with ``start_factor=null`` (start at σ_max), ``t2d_msd_stable`` and ``t2d_msd_tweedie``.
  Every library draw must name a generator, and draw on that generator's device (a draw that names no device is
  allowed only with a CPU generator: the CPU-side evaluation sets, e.g. ShapesWorld's true renders).

* ``render/<check>`` (CUDA only; skipped on the CPU, where ``tests/test_packed_rendering.py`` tests the parts that
  need no CUDA): the checks of ``tests/test_packed_rendering.py`` that its CUDA tests run. ``packed_sphere``: a
  constant-density sphere through the occupancy grid against ``1 − exp(−σ·chord)`` and the dense render, with and
  without jitter, and dA/dσ, d rgb/d colour in closed form; ``packed_views``: three views lit by their own lights
  against the dense render (and far from a render with the lights rolled), gradients; ``occupancy_grid``: a voxel
  grid's occupancy updated from a CUDA generator, a jittered packed render, the regularisers through ``padded()``,
  gradients in every channel, the device contract and the state dict. These run first.

Per case one line: ok/FAIL, seconds, peak CUDA memory (``torch.cuda.max_memory_allocated``, reset per case; "-" on
the CPU), whether every target (direct) or every logged target range and loss (loop) was finite, and the number of
recorded draws; below a failing line its violations or its exception.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import baselines  # noqa: E402,F401  (registers "sds", "vsd", "sdi")
from experiments.io import write_text  # noqa: E402
from msd.generators import ImageGrid  # noqa: E402
from msd.guidance import build_guidance, target_loss  # noqa: E402
from msd.paths import REPO_ROOT  # noqa: E402
from msd.priors import DiffusersPrior  # noqa: E402
from tests.test_device_contract import Draw, DrawRecorder, contract_violations  # noqa: E402
from tests.test_packed_rendering import check_occupancy_grid, check_packed_sphere, check_packed_views  # noqa: E402
from tests.tiny_sd import build_tiny_prior, build_tiny_shapes_prior  # noqa: E402

LOG = REPO_ROOT / "results" / "bench" / "cuda_smoke.log"
CPU_LOG = REPO_ROOT / "results" / "bench" / "cuda_smoke.cpu.log"
STEPS = 3
PROMPTS = ["the cat", "a dog"]
LOOP_PROMPTS = ["a red circle", "a blue square"]  # ShapesWorld captions (the loop scores prompt accuracy)
SCALE = 4.0
MSD = {"lambda0": 1.0, "lambda_min": 0.01, "total_steps": STEPS, "solver_steps": 4}
DIRECT_CASES: dict[str, tuple[str, dict]] = {
    "sds": ("sds", {"total_steps": STEPS}),
    "vsd_lora": ("vsd", {"total_steps": STEPS, "phi_steps": 1}),  # particle_model: the prior's LoRA
    "sdi": ("sdi", {"total_steps": STEPS, "timestep_mode": "linear", "inversion_grid": "global", "inversion_steps": 5,
                    "eta": 0.3, "level_jitter": True, "inversion_scale": 2.0 - SCALE}),
    "msd_product_ode": ("msd", MSD),
    "msd_product_ode_start": ("msd", {**MSD, "start_factor": 3.0}),
    "msd_product_ode_eta": ("msd", {**MSD, "solver": "euler", "eta": 0.5}),
    "msd_stable": ("msd", {**MSD, "sampler": "stable", "solver": "euler", "inversion_scale": 2.0 - SCALE}),
    "msd_tweedie": ("msd", {**MSD, "sampler": "tweedie", "solver_steps": 1}),
}
LOOP_CASES: dict[str, list[str]] = {
    "t2d_sds": ["guidance=t2d_sds"],
    "t2d_vsd": ["guidance=t2d_vsd"],
    "t2d_sdi": ["guidance=t2d_sdi"],
    "t2d_msd": ["guidance=t2d_msd", "guidance.lambda_min=0.1"],
    "t2d_msd_start_sigma_max": ["guidance=t2d_msd", "guidance.lambda_min=0.1", "guidance.start_factor=null"],
    "t2d_msd_stable": ["guidance=t2d_msd_stable", "guidance.lambda_min=0.1"],
    "t2d_msd_tweedie": ["guidance=t2d_msd_tweedie", "guidance.lambda_min=0.1"],
}

RENDER_CASES: dict[str, Callable[[torch.device], str]] = {
    "packed_sphere": check_packed_sphere,
    "packed_views": check_packed_views,
    "occupancy_grid": check_occupancy_grid,
}
CASE_GROUPS = ("all", "render", "guidance")


@dataclass
class Outcome:
    """What a case reports: all targets finite, contract violations, a short note."""

    finite: bool
    problems: list[str] = field(default_factory=list)
    note: str = ""


def rng_states(device: torch.device) -> list[torch.Tensor]:
    """The global RNG states a library call must leave alone: the CPU's and, on CUDA, every GPU's."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states += torch.cuda.get_rng_state_all()
    return states


def rng_moved(before: list[torch.Tensor], device: torch.device) -> list[str]:
    after = rng_states(device)
    moved = not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    return ["the global RNG state changed"] if moved else []


def loop_violations(draws: list[Draw]) -> list[str]:
    """The real loop's rule (evaluation sets are drawn on the CPU on purpose): a library draw names a generator and
    draws on its device; naming no device is allowed with a CPU generator only."""
    problems = []
    for d in draws:
        if not d.library:
            continue
        where = f"{d.op} at {d.caller}"
        if d.generator is None:
            problems.append(f"{where}: no generator (the global RNG)")
        elif d.device is None and d.generator.device.type != "cpu":
            problems.append(f"{where}: no device, with a generator on {d.generator.device}")
        elif d.device is not None and d.device.type != d.generator.device.type:
            problems.append(f"{where}: draws on {d.device} with a generator on {d.generator.device}")
    return problems


# --- the cases -----------------------------------------------------------------------------------------------

def add_lora_case(prior: DiffusersPrior, generator: torch.Generator) -> Outcome:
    before = rng_states(prior.device)
    with DrawRecorder() as recorder:
        parameters = prior.add_lora(rank=4, generator=generator)
    problems = contract_violations(recorder.draws, prior.device, library_only=True) + rng_moved(before, prior.device)
    finite = all(bool(torch.isfinite(p).all()) for p in parameters)
    if not all(p.device.type == prior.device.type for p in parameters):
        problems.append("LoRA parameters are not on the prior's device")
    library = sum(d.library for d in recorder.draws)
    return Outcome(finite, problems, f"{library} library draws, {len(recorder.draws) - library} by PEFT (global CPU "
                                     f"RNG, forked)")


def direct_case(prior: DiffusersPrior, name: str, kwargs: dict, generator: torch.Generator) -> Outcome:
    """STEPS steps of the one loss on an ImageGrid, every draw recorded."""
    kwargs = dict(kwargs)
    if name == "vsd":
        kwargs["particle_model"] = prior.lora_denoiser()
    guidance = build_guidance(name, denoiser=prior.denoiser(SCALE), **kwargs)
    if guidance.noise_schedule is not prior.schedule:
        return Outcome(False, ["the guidance's noise_schedule is not the prior's"])
    cond = prior.conditioning(PROMPTS)
    before = rng_states(prior.device)
    finite, sigmas = True, []
    with DrawRecorder() as recorder:
        image = ImageGrid(len(PROMPTS), *prior.sample_shape, init_std=0.5, generator=generator)
        optimizer = torch.optim.Adam(image.parameters(), lr=0.01)
        for step in range(STEPS):
            x = image()
            out = guidance(x.detach(), step, generator, cond)
            finite &= bool(torch.isfinite(out.target).all()) and out.target.device == x.device
            loss = target_loss(x, out.target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            finite &= math.isfinite(loss.item())
            sigmas.append(out.aux.get("sigma", out.aux.get("bandwidth", float("nan"))))
    problems = contract_violations(recorder.draws, prior.device) + rng_moved(before, prior.device)
    levels = ", ".join(f"{s:.3g}" for s in sigmas)
    return Outcome(finite, problems, f"{len(recorder.draws)} draws, sigma/lambda {levels}")


def loop_case(shapes_dir: Path, overrides: list[str], device: torch.device, dtype: str, work: Path) -> Outcome:
    from hydra import compose, initialize_config_dir

    from experiments.run import run

    run_dir = work / "run"
    tiny = ["experiment=table4_shapes", f"prior.path={shapes_dir}",
            f"prior.classifier={shapes_dir.parent / 'classifier'}", f"task.prompts={LOOP_PROMPTS!r}".replace("'", '"'),
            "task.images_per_prompt=2", f"task.steps={STEPS}",
            f"task.eval.every={STEPS}", "task.eval.reference_per_prompt=2", "task.eval.reference_steps=2",
            f"task.eval.cache_dir={work / 'cache'}", "task.solver_steps=2", "task.checkpoint_every=0", "logger=none",
            f"device={device}", f"prior.dtype={dtype}"]
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*tiny, *overrides])
    with DrawRecorder() as recorder:
        final = run(cfg, run_dir)
    rows = pd.read_csv(run_dir / "metrics.csv").iloc[1:]
    values = rows[["loss", "target_min", "target_max"]].to_numpy(dtype=float)
    finite = bool(len(rows) == STEPS and pd.notna(values).all() and (abs(values) < float("inf")).all())
    on_device = sum(d.library and d.device is not None and d.device.type == device.type for d in recorder.draws)
    return Outcome(finite, loop_violations(recorder.draws),
                   f"{int(final['iterations'])} iterations, {len(recorder.draws)} draws ({on_device} library draws on "
                   f"{device.type}), fid {final['fid']:.3g}")


# --- the driver ----------------------------------------------------------------------------------------------

def timed(name: str, case: Callable[[], Outcome], device: torch.device, lines: list[str]) -> bool:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    try:
        outcome, error = case(), None
    except Exception as exc:  # a failing case is reported, the others still run
        outcome, error = Outcome(False), exc
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:8.1f} MiB"
    else:
        peak = f"{'-':>12}"
    seconds = time.perf_counter() - tic
    ok = error is None and outcome.finite and not outcome.problems
    lines.append(f"{name:<40} {'ok' if ok else 'FAIL':<4} {seconds:7.2f} s  peak {peak}  "
                 f"finite={'yes' if outcome.finite else 'NO'}  {outcome.note}")
    lines.extend(f"    {problem}" for problem in outcome.problems)
    if error is not None:
        lines.extend("    " + line for line in "".join(traceback.format_exception(error)).rstrip().splitlines())
    return ok


def render_case(check: Callable[[torch.device], str], device: torch.device) -> Outcome:
    """One check of tests/test_packed_rendering.py: it raises on a failure and returns its measurements."""
    return Outcome(True, note=check(device))


def header(device: torch.device, dtype: str, cases: str = "all") -> list[str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return [f"# tests.cuda_smoke on {device} ({name}), priors in {dtype}; {time.strftime('%Y-%m-%d %H:%M:%S')}",
            f"# torch {torch.__version__}, python {platform.python_version()}, commit {commit}; "
            f"{STEPS} steps per case, CFG w = {SCALE:g}, one torch.Generator({device.type!r}); cases: {cases}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--dtype", default=None, help="prior dtype (default: float16 on cuda, float32 on cpu)")
    parser.add_argument("--cases", choices=CASE_GROUPS, default="all",
                        help="all (default), render (the packed rendering layout) or guidance (direct and loop)")
    parser.add_argument("--log", type=Path, default=None,
                        help=f"log file (default {LOG.relative_to(REPO_ROOT)}; --device cpu: "
                             f"{CPU_LOG.relative_to(REPO_ROOT)}; --cases render or guidance: "
                             f"cuda_smoke.<cases>[.cpu].log)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu to check the script on the CPU)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    log = args.log or (LOG if device.type == "cuda" else CPU_LOG)
    if args.log is None and args.cases != "all":
        log = log.with_name(log.name.replace("cuda_smoke.", f"cuda_smoke.{args.cases}.", 1))
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: more threads only spin-wait on a loaded machine
    lines = header(device, dtype, args.cases)
    print("\n".join(lines), flush=True)
    results: list[bool] = []

    def case(name: str, body: Callable[[], Outcome]) -> None:
        start = len(lines)
        results.append(timed(name, body, device, lines))
        print("\n".join(lines[start:]), flush=True)

    tic = time.perf_counter()
    if args.cases in ("all", "render"):
        if device.type == "cuda":
            for label, check in RENDER_CASES.items():
                case(f"render/{label}", lambda c=check: render_case(c, device))
        else:
            lines.append("# render/* skipped: the packed layout needs CUDA (tests/test_packed_rendering.py covers the "
                         "rest on the CPU)")
            print(lines[-1], flush=True)
    if args.cases in ("all", "guidance"):
        guidance_cases(device, dtype, case)
    failed = results.count(False)
    lines.append(f"# {len(results) - failed}/{len(results)} cases ok, {time.perf_counter() - tic:.1f} s in all"
                 + (f"; {failed} FAILED" if failed else ""))
    print(lines[-1], flush=True)
    write_text(log, "\n".join(lines) + "\n")
    print(f"log: {log}", flush=True)
    return 1 if failed else 0


def guidance_cases(device: torch.device, dtype: str, case: Callable[[str, Callable[[], Outcome]], None]) -> None:
    """The direct and loop cases (module docstring), on tiny priors built in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="cuda_smoke_") as tmp:
        root = Path(tmp)
        generator = torch.Generator(device).manual_seed(0)
        for kind in ("pixel", "latent"):
            # the pixel prior clips its clean estimates (clip_sample, as the ShapesWorld prior does)
            directory = build_tiny_prior(root / kind, latent=kind == "latent", sample_size=16,
                                         clip_sample=kind == "pixel")
            prior = DiffusersPrior.from_pretrained(directory, device=device, dtype=dtype)
            lora_prior = DiffusersPrior.from_pretrained(directory, device=device, dtype=dtype)
            case(f"direct/{kind}/add_lora", lambda p=lora_prior: add_lora_case(p, generator))
            for label, (name, kwargs) in DIRECT_CASES.items():
                model = lora_prior if name == "vsd" else prior
                case(f"direct/{kind}/{label}", lambda m=model, n=name, k=kwargs: direct_case(m, n, k, generator))
        shapes_dir, _ = build_tiny_shapes_prior(root / "shapes")
        for label, overrides in LOOP_CASES.items():
            case(f"loop/{label}", lambda o=overrides, w=root / label: loop_case(shapes_dir, o, device, dtype, w))


if __name__ == "__main__":
    sys.exit(main())

"""Where the time of a text-to-2D iteration goes on ShapesWorld (experiment=table4_shapes), and what makes the
UNet forward faster, measured in one run on this CPU.

``python -m eval.bench_text2d`` (also ``make bench``) writes, atomically:

* ``results/bench/text2d.csv`` — per method (sds, vsd, sdi, msd with the ``product_ode`` sampler, fresh and common
  start noise, the ``tweedie`` and the ``stable`` samplers; the guidances that ``experiments.text2d.build_setup``
  builds from the composed config ``experiment=table4_shapes guidance=t2d_<x>``, 12 prompts × 4 images, CFG w = 4)
  the wall time of one
  optimisation iteration (mean of ``--iters`` iterations after one warm-up iteration, which is excluded), split
  into ``unet_ms`` (inside ``prior.unet`` forwards, measured by forward pre/post hooks), ``guidance_overhead_ms``
  (the guidance call minus its UNet forwards: noise draws, solver arithmetic, CFG combination, DDIM inversion
  bookkeeping; for VSD also the LoRA's backward through the UNet and its Adam step, given on their own as
  ``lora_train_ms``), ``generator_ms`` (render + loss + backward + Adam on the image generators) and
  ``eval_ms_per_iter`` (one :class:`experiments.text2d.Scorer` call every ``task.eval.every`` iterations
  plus the final scoring, amortised over the 400-iteration protocol), the fraction of the iteration spent
  outside UNet forwards, and the projected minutes of a 400-iteration run. The UNet's achieved GFLOP/s
  (FLOPs of one forward by ``torch.utils.flop_counter.FlopCounterMode``, CPU flash attention included) sits
  beside this CPU's single-thread 2048² float32 matmul GFLOP/s, measured in the same run.
* ``results/bench/text2d_unet_ops.csv`` — where one shipped CFG call's time goes, by kind of operator (self CPU time
  of the aten ops under ``torch.profiler``, one call after a warm-up): convolutions, linear layers (addmm / mm /
  bmm), attention (SDPA), normalisations, activations and the rest (copies, adds, resizes); with each kind's FLOPs
  (``FlopCounterMode``) and GFLOP/s beside the matmul rate.
* ``results/bench/text2d_unet.csv`` — one CFG call of the prior (``prior.denoiser(4).condition(cond).eps``, both
  halves in one forward, batch 96) on 48 images per UNet variant: ms (minimum of ``--calls`` calls after a
  warm-up call, the variants interleaved call by call so that they share the machine's load), GFLOP/s,
  ``speedup`` against ``baseline`` (the layout the model loads with, called under ``torch.no_grad`` as the
  guidances do) and the max |Δε| against the baseline's output. ``shipped`` is what ``DiffusersPrior`` does
  now (channels_last on the CPU); the other variants are measured and not kept.

Single-threaded (``torch.set_num_threads(1)``); on a machine shared with other jobs the minimum of repeats is
the least disturbed time, the per-method numbers are means and carry that noise. The DDIM reference set the
Scorer needs is the cached one when present, else a 2-step stand-in (same size, so the same scoring cost).
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parent.parent
METHODS = {  # row name -> guidance preset and overrides
    "sds": ("t2d_sds", ()),
    "vsd": ("t2d_vsd", ()),
    "sdi": ("t2d_sdi", ()),
    "msd_product_ode": ("t2d_msd", ()),
    "msd_common": ("t2d_msd_common", ()),
    "msd_tweedie": ("t2d_msd_tweedie", ()),
    "msd_stable": ("t2d_msd_stable", ()),
}
STEPS = 400  # the paper's protocol


def compose(guidance: str, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import experiments  # noqa: F401  (registers the mirror_cfg resolver)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=["experiment=table4_shapes", f"guidance={guidance}", "logger=none",
                                                  "device=cpu", f"task.steps={STEPS}", *overrides])


def best_ms(fn, calls: int) -> float:
    fn()
    best = math.inf
    for _ in range(calls):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return 1e3 * best


def matmul_gflops(size: int = 2048, calls: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / best_ms(lambda: a @ b, calls) / 1e6


def count_flops(fn) -> dict[str, float]:
    """FLOPs of ``fn()`` by kind; CPU flash attention (not in the default registry) by the SDPA formula."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    counts = {str(op): float(n) for op, n in counter.get_flop_counts()["Global"].items()}
    kind = {"conv": 0.0, "linear": 0.0, "attention": 0.0}
    for op, n in counts.items():
        key = "conv" if "convolution" in op else "attention" if "attention" in op else "linear"
        kind[key] += n
    return {"total": sum(counts.values()), **kind}


class UNetTimer:
    """Wall time inside ``unet`` forwards (pre/post forward hooks) and the number of forwards."""

    def __init__(self, unet: torch.nn.Module):
        self.seconds, self.calls, self.samples, self._tic = 0.0, 0, 0, 0.0
        self.handles = [unet.register_forward_pre_hook(self._pre), unet.register_forward_hook(self._post)]

    def _pre(self, module, args):
        self._tic = time.perf_counter()

    def _post(self, module, args, output):
        self.seconds += time.perf_counter() - self._tic
        self.calls += 1
        self.samples += int(args[0].shape[0])

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# --- UNet variants ---------------------------------------------------------------------------------------------

@contextmanager
def layout(prior, memory_format):
    """The prior's UNet weights and inputs in ``memory_format`` for the duration (restored after)."""
    saved = prior.memory_format
    prior.memory_format = memory_format
    prior.unet.to(memory_format=memory_format)
    try:
        yield
    finally:
        prior.memory_format = saved
        prior.unet.to(memory_format=saved)


@contextmanager
def matmul_precision(value: str):
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


@contextmanager
def classic_attention(prior):
    """diffusers' ``AttnProcessor`` (baddbmm + softmax + bmm) instead of the default SDPA processor."""
    from diffusers.models.attention_processor import AttnProcessor

    saved = prior.unet.attn_processors
    prior.unet.set_attn_processor(AttnProcessor())
    try:
        yield
    finally:
        prior.unet.set_attn_processor(saved)


@contextmanager
def swapped_unet(prior, unet):
    """``unet`` (e.g. ``torch.compile(prior.unet)``) in place of the prior's UNet for the duration."""
    eager = prior.unet
    prior.unet = unet
    try:
        yield
    finally:
        prior.unet = eager


def cfg_call():
    """The prior and one CFG call of the protocol: ``prior.denoiser(w).condition(prompts).eps`` on the 48 images
    (both halves in one forward, batch 96) at log-uniform σ ∈ [0.02, 150]; (prior, call, number of images)."""
    from experiments.text2d import per_image_prompts
    from msd.priors import load_prior

    cfg = compose("t2d_sds")
    prior = load_prior("shapes", device="cpu")
    prompts = per_image_prompts(cfg.task)
    denoiser = prior.denoiser(float(cfg.guidance_scale)).condition(prior.conditioning(prompts))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(len(prompts), *prior.sample_shape, generator=generator) * 2
    sigma = torch.exp(torch.empty(len(prompts)).uniform_(math.log(0.02), math.log(150.0), generator=generator))
    return prior, lambda: denoiser.eps(x, sigma), len(prompts)


def unet_variants(calls: int, compile_unet: bool, matmul: float) -> pd.DataFrame:
    prior, call, images = cfg_call()
    contiguous, shipped = torch.contiguous_format, prior.memory_format
    variants = [
        ("baseline", "contiguous weights and input (as loaded), torch.no_grad", torch.no_grad, contiguous, None),
        ("grad_enabled", "contiguous, autograd on (frozen weights, input without grad)", nullcontext, contiguous, None),
        ("inference_mode", "contiguous, torch.inference_mode", torch.inference_mode, contiguous, None),
        ("channels_last", "channels_last weights and input, torch.no_grad", torch.no_grad, torch.channels_last, None),
        ("channels_last+matmul_precision_medium", "torch.set_float32_matmul_precision('medium')", torch.no_grad,
         torch.channels_last, lambda: matmul_precision("medium")),
        ("channels_last+classic_attention", "diffusers AttnProcessor (baddbmm/softmax/bmm) instead of SDPA",
         torch.no_grad, torch.channels_last, lambda: classic_attention(prior)),
        ("channels_last+bf16_autocast", "torch.autocast('cpu', dtype=torch.bfloat16) (this CPU has AVX512-BF16)",
         torch.no_grad, torch.channels_last, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        ("shipped", f"DiffusersPrior as it is now (memory_format={str(shipped).split('.')[-1]}), torch.no_grad",
         torch.no_grad, shipped, None),
    ]
    if compile_unet:
        variants.append(("channels_last+torch_compile", "torch.compile(unet) (inductor, default mode)",
                         torch.no_grad, torch.channels_last, None))
    with torch.no_grad(), layout(prior, contiguous):
        reference = call()
        flops = count_flops(call)
    if compile_unet:  # one compiled module for all rounds (its compilation is the first call's time)
        compiled_unet = torch.compile(prior.unet)
        variants[-1] = (*variants[-1][:4], lambda: swapped_unet(prior, compiled_unet))
    rows = {name: {"variant": name, "what": what, "ms_per_cfg_call": math.inf, "error": ""}
            for name, what, *_ in variants}
    for round_ in range(calls + 1):  # interleaved rounds: every variant sees the same machine load
        for name, what, grad_mode, memory_format, extra in variants:
            row = rows[name]
            if row["error"]:
                continue
            try:
                with layout(prior, memory_format), (extra() if extra else nullcontext()), grad_mode():
                    tic = time.perf_counter()
                    out = call()
                    seconds = time.perf_counter() - tic
            except Exception as error:  # noqa: BLE001 — a variant that does not run here is a result too
                row.update(ms_per_cfg_call=math.nan, max_abs_diff_eps=math.nan,
                           error=f"{type(error).__name__}: {error}"[:300])
                continue
            if round_ == 0:  # warm-up; pays any compilation
                row["first_call_s"] = round(seconds, 2)
                row["max_abs_diff_eps"] = float((out.float() - reference.float()).abs().max())
            else:
                row["ms_per_cfg_call"] = min(row["ms_per_cfg_call"], 1e3 * seconds)
    rows = list(rows.values())
    for row in rows:
        row["ms_per_cfg_call"] = round(row["ms_per_cfg_call"], 1)
        print(f"  unet variant {row['variant']}: {row['ms_per_cfg_call']} ms", flush=True)
    frame = pd.DataFrame(rows)
    base = float(frame.loc[frame.variant == "baseline", "ms_per_cfg_call"].iloc[0])
    frame["gflops_per_call"] = round(flops["total"] / 1e9, 3)
    frame["gflop_per_s"] = (flops["total"] / frame.ms_per_cfg_call / 1e6).round(1)
    frame["speedup"] = (base / frame.ms_per_cfg_call).round(3)
    frame["matmul_gflop_per_s"] = round(matmul, 1)
    frame["fraction_of_matmul"] = (frame.gflop_per_s / matmul).round(3)
    frame["flops_conv_linear_attention"] = "/".join(f"{flops[k] / 1e9:.2f}" for k in ("conv", "linear", "attention"))
    frame["images"], frame["unet_batch"] = images, 2 * images
    return frame


OP_KINDS = {  # aten op name fragment -> kind; the first match wins, unmatched ops are "other"
    "convolution": "conv", "addmm": "linear", "aten::mm": "linear", "bmm": "linear",
    "scaled_dot_product": "attention", "group_norm": "normalisation", "layer_norm": "normalisation",
    "silu": "activation", "gelu": "activation",
}


def unet_op_profile(matmul: float) -> pd.DataFrame:
    """Self CPU time of one shipped CFG call (48 images, batch 96) by operator kind, with the kinds' FLOPs."""
    from torch.profiler import ProfilerActivity, profile

    _, call, _ = cfg_call()
    with torch.no_grad():
        flops = count_flops(call)
        call()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            call()
    seconds: dict[str, float] = {}
    for event in profiler.key_averages():
        if not event.key.startswith("aten::"):
            continue
        kind = next((k for fragment, k in OP_KINDS.items() if fragment in event.key), "other")
        seconds[kind] = seconds.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    total = sum(seconds.values())
    rows = []
    for kind in ("conv", "linear", "attention", "normalisation", "activation", "other"):
        gflop = flops.get(kind, 0.0) / 1e9  # count_flops has conv, linear and attention
        ms = 1e3 * seconds.get(kind, 0.0)
        rows.append({"kind": kind, "ms": round(ms, 1), "fraction_of_call": round(ms / 1e3 / total, 3),
                     "gflop": round(gflop, 3), "gflop_per_s": round(gflop / (ms / 1e3), 1) if gflop and ms else 0.0,
                     "fraction_of_matmul": round(gflop / (ms / 1e3) / matmul, 3) if gflop and ms else 0.0})
    rows.append({"kind": "total", "ms": round(1e3 * total, 1), "fraction_of_call": 1.0,
                 "gflop": round(flops["total"] / 1e9, 3), "gflop_per_s": round(flops["total"] / 1e9 / total, 1),
                 "fraction_of_matmul": round(flops["total"] / 1e9 / total / matmul, 3)})
    frame = pd.DataFrame(rows)
    frame["matmul_gflop_per_s"] = round(matmul, 1)
    return frame


# --- per-method iteration breakdown ----------------------------------------------------------------------------

def scorer_for(cfg, setup):
    """The run's Scorer; a 2-step DDIM reference set of the same size in a temporary cache when the real one
    is not cached (scoring cost depends on the set's size, not its quality)."""
    from experiments.text2d import Scorer, reference_cache_path

    cfg.task.eval.cache_dir = str(REPO / cfg.task.eval.cache_dir) if not Path(cfg.task.eval.cache_dir).is_absolute() \
        else cfg.task.eval.cache_dir
    if not reference_cache_path(cfg, setup.prior).is_file():
        cfg.task.eval.reference_steps = 2
        cfg.task.eval.cache_dir = tempfile.mkdtemp(prefix="bench_text2d_")
    return Scorer(cfg, setup)


def method_row(name: str, iters: int, scorer_cache: dict, flops_per_sample: float, matmul: float) -> dict:
    from experiments.text2d import build_setup
    from msd.guidance import target_loss

    preset, overrides = METHODS[name]
    cfg = compose(preset, *overrides)
    setup = build_setup(cfg)
    prior, guidance = setup.prior, setup.guidance
    params = [p for p in setup.generator.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=float(cfg.task.optimizer.lr), betas=tuple(cfg.task.optimizer.betas))
    generator = torch.Generator(prior.device).manual_seed(int(cfg.seed) + 1)
    image_space = cfg.task.generator.space == "image"
    timer = UNetTimer(prior.unet)
    lora = {"seconds": 0.0, "unet": 0.0}
    if hasattr(guidance, "train_particle_model") and guidance.particle_model is not None:
        train = guidance.train_particle_model

        def timed_train(*args, **kwargs):
            tic, unet_before = time.perf_counter(), timer.seconds
            try:
                return train(*args, **kwargs)
            finally:
                lora["seconds"] += time.perf_counter() - tic
                lora["unet"] += timer.seconds - unet_before

        guidance.train_particle_model = timed_train
    totals = dict.fromkeys(("iter", "guidance", "unet", "calls", "samples", "lora", "lora_unet", "nfe"), 0.0)
    for step in range(iters + 1):
        samples_before = timer.samples
        unet_before, calls_before = timer.seconds, timer.calls
        lora_before, lora_unet_before = lora["seconds"], lora["unet"]
        tic = time.perf_counter()
        x = setup.generator()
        x = prior.encode(x) if image_space else x
        g_tic = time.perf_counter()
        out = guidance(x, step, generator, setup.cond)
        g_sec = time.perf_counter() - g_tic
        loss = target_loss(x, out.target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        it_sec = time.perf_counter() - tic
        if step == 0:
            continue  # warm-up (first-call allocations, LoRA optimizer state)
        totals["iter"] += it_sec
        totals["guidance"] += g_sec
        totals["unet"] += timer.seconds - unet_before
        totals["calls"] += timer.calls - calls_before
        totals["samples"] += timer.samples - samples_before
        totals["lora"] += lora["seconds"] - lora_before
        totals["lora_unet"] += lora["unet"] - lora_unet_before
        totals["nfe"] += float(out.aux.get("nfe", 0.0))
    timer.remove()
    mean = {k: v / iters for k, v in totals.items()}
    if "scorer" not in scorer_cache:
        scorer = scorer_for(cfg, setup)
        with torch.no_grad():
            images = setup.generator().clamp(-1, 1).float().cpu()
        scorer_cache["scorer"] = scorer
        scorer_cache["eval_ms"] = best_ms(lambda: scorer(images), 2)
        scorer_cache["final_ms"] = best_ms(lambda: scorer(images, final=True), 1)
    every = int(cfg.task.eval.every)
    eval_ms = (scorer_cache["eval_ms"] * (STEPS // every) + scorer_cache["final_ms"]) / STEPS
    ms = {k: 1e3 * mean[k] for k in ("iter", "guidance", "unet", "lora", "lora_unet")}
    overhead = ms["guidance"] - ms["unet"]
    generator_ms = ms["iter"] - ms["guidance"]
    per_forward = ms["unet"] / mean["calls"] if mean["calls"] else math.nan
    gflops = flops_per_sample * mean["samples"] / ms["unet"] / 1e6 if ms["unet"] else math.nan
    return {
        "method": name, "guidance": preset, "overrides": " ".join(overrides), "images": len(setup.prompts),
        "iters_timed": iters, "ms_per_iter": round(ms["iter"], 1), "unet_ms": round(ms["unet"], 1),
        "guidance_overhead_ms": round(overhead, 1), "lora_train_ms": round(ms["lora"], 1),
        "lora_train_outside_unet_fwd_ms": round(ms["lora"] - ms["lora_unet"], 1),
        "generator_ms": round(generator_ms, 1), "eval_ms_per_iter": round(eval_ms, 1),
        "unet_forwards_per_iter": mean["calls"], "unet_evals_per_image_per_iter": mean["nfe"],
        "ms_per_unet_forward": round(per_forward, 1),
        "guidance_overhead_frac": round(overhead / ms["iter"], 3),
        "outside_unet_frac": round(1 - ms["unet"] / ms["iter"], 3),
        "unet_gflop_per_s": round(gflops, 1), "matmul_gflop_per_s": round(matmul, 1),
        "unet_fraction_of_matmul": round(gflops / matmul, 3),
        "eval_every": every, "scorer_ms": round(scorer_cache["eval_ms"], 1),
        "final_scorer_ms": round(scorer_cache["final_ms"], 1),
        "protocol_minutes_400": round((ms["iter"] + eval_ms) * STEPS / 6e4, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=2, help="timed iterations per method (after one warm-up)")
    parser.add_argument("--calls", type=int, default=5, help="timed CFG calls per UNet variant (minimum taken)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (~1-2 min)")
    parser.add_argument("--out", default="results/bench/text2d.csv")
    parser.add_argument("--unet-out", default="results/bench/text2d_unet.csv")
    parser.add_argument("--ops-out", default="results/bench/text2d_unet_ops.csv")
    args = parser.parse_args()
    from experiments.io import write_csv

    torch.set_num_threads(1)
    start = time.perf_counter()
    matmul = matmul_gflops()
    print(f"matmul 2048^2 float32, 1 thread: {matmul:.1f} GFLOP/s", flush=True)
    ops = unet_op_profile(matmul)
    write_csv(args.ops_out, ops)
    print(ops.to_string(index=False), flush=True)
    variants = unet_variants(args.calls, not args.no_compile, matmul)
    write_csv(args.unet_out, variants)
    flops_per_sample = float(variants.gflops_per_call.iloc[0]) * 1e9 / int(variants.unet_batch.iloc[0])
    rows, scorer_cache = [], {}
    for name in args.methods.split(","):
        print(f"  method {name} ...", flush=True)
        try:
            rows.append(method_row(name, args.iters, scorer_cache, flops_per_sample, matmul))
        except Exception as error:  # noqa: BLE001 — recorded, the other methods still run
            rows.append({"method": name, "error": f"{type(error).__name__}: {error}"[:300]})
            print(f"    failed: {rows[-1]['error']}", flush=True)
        write_csv(args.out, pd.DataFrame(rows))  # what is done so far
    frame = pd.DataFrame(rows)
    frame["matmul_gflop_per_s_at_end"] = round(matmul_gflops(), 1)  # the machine's load may have changed
    write_csv(args.out, frame)
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.max_colwidth", 40):
        print(variants.drop(columns=["what"]).to_string(index=False))
        print(frame.to_string(index=False))
    print(f"wrote {args.unet_out}, {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

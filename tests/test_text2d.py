"""The text-to-2D driver end to end on a tiny random pixel prior (ShapesWorld metrics, committed classifier),
and the fail-fast path of the Stable Diffusion preset on a machine without its weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from experiments.run import run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPTS = '["a red circle","a blue square"]'


@pytest.fixture
def tiny_pixel_prior(tiny_shapes_prior):
    """A tiny random 32 px pixel prior beside an untrained ShapesWorld classifier (the plumbing, not the numbers;
    built once per session in tests/conftest.py)."""
    return tiny_shapes_prior[0]


def compose_config(prior: Path, cache: Path, *overrides: str):
    tiny = ["experiment=table4_shapes", f"prior.path={prior}", f"prior.classifier={prior.parent / 'classifier'}",
            f"task.prompts={PROMPTS}", "task.images_per_prompt=2",
            "task.steps=3", "task.eval.every=2", "task.eval.reference_per_prompt=3", "task.eval.reference_steps=2",
            f"task.eval.cache_dir={cache}", "logger=none", "task.solver_steps=2"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[*tiny, *overrides])


@pytest.mark.parametrize("guidance,evals_per_iter", [
    # SDI on the official global grid of 10 steps cut at t = 0.98, 0.66, 0.34: 10, 7 and 4 inversion steps
    ("t2d_sds", 2.0), ("t2d_sdi", 2.0 * (10 + 7 + 4) / 3 + 2.0), ("t2d_vsd", 2.0 + 1 + 1), ("t2d_msd", None),
    ("t2d_msd_ode", None)])
def test_text2d_run_writes_fid_curve_images_and_final(tiny_pixel_prior, tmp_path, guidance, evals_per_iter):
    lowest = ["guidance.lambda_min=0.1"] if guidance.startswith("t2d_msd") else []  # all 3 steps above λ_min
    cfg = compose_config(tiny_pixel_prior, tmp_path / "cache", f"guidance={guidance}", *lowest)
    final = run(cfg, tmp_path / "run")
    rows = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(rows.iteration) == [0, 1, 2, 3]  # one row per iteration: loss and aux scalars
    assert np.isnan(rows.loss.iloc[0]) and (rows.loss.iloc[1:] >= 0).all()
    assert {"grad_norm", "target_min", "target_max", "nfe"} <= set(rows.columns)
    assert (rows.target_min.iloc[1:] <= rows.target_max.iloc[1:]).all()
    assert final["loss"] == rows.loss.iloc[-1]
    curve = rows[rows.fid.notna()]  # the evaluations: first, every eval.every, last
    assert list(curve.iteration) == [0, 2, 3]
    assert {"fid", "fid_true", "prompt_accuracy", "unet_evals"} <= set(curve.columns)
    assert np.isfinite(curve.fid).all() and (curve.fid >= 0).all() and curve.prompt_accuracy.between(0, 1).all()
    assert curve.unet_evals.iloc[0] == 0 and curve.unet_evals.is_monotonic_increasing
    if evals_per_iter is not None:  # per image per iteration, as the guidances report it (CFG w = 4: 2 per call)
        assert curve.unet_evals.iloc[-1] == pytest.approx(3 * evals_per_iter)
    assert final["iterations"] == 3 and final["unet_evals_per_iter"] == pytest.approx(curve.unet_evals.iloc[-1] / 3)
    assert final["mode_distance"] >= 0 and final["images"] == 4
    with np.load(tmp_path / "run" / "images.npz") as arrays:
        assert arrays["images"].shape == (4, 3, 32, 32) and np.abs(arrays["images"]).max() <= 1
        assert list(arrays["prompts"]) == ["a red circle"] * 2 + ["a blue square"] * 2
    assert json.loads((tmp_path / "run" / "final.json").read_text())["fid"] == final["fid"]
    assert (tmp_path / "run" / "images.png").stat().st_size > 0


def test_reference_set_is_cached_and_shared(tiny_pixel_prior, tmp_path):
    run(compose_config(tiny_pixel_prior, tmp_path / "cache", "guidance=t2d_ddim", "guidance.solver_steps=2"),
        tmp_path / "ddim")
    (cached,) = (tmp_path / "cache").glob("ddim_reference_*.npz")
    stamp = cached.stat().st_mtime_ns
    final = run(compose_config(tiny_pixel_prior, tmp_path / "cache", "guidance=t2d_sds"), tmp_path / "sds")
    assert cached.stat().st_mtime_ns == stamp and np.isfinite(final["fid"])
    with np.load(cached) as arrays:
        assert arrays["images"].shape == (6, 3, 32, 32)


def test_same_seed_same_images(tiny_pixel_prior, tmp_path):
    for name in ("a", "b"):
        run(compose_config(tiny_pixel_prior, tmp_path / "cache", "guidance=t2d_sds"), tmp_path / name)
    with np.load(tmp_path / "a" / "images.npz") as a, np.load(tmp_path / "b" / "images.npz") as b:
        assert np.array_equal(a["images"], b["images"])


def test_bad_text2d_config_fails_before_writing(tiny_pixel_prior, tmp_path):
    with pytest.raises(ValueError, match="task.generator.name"):
        run(compose_config(tiny_pixel_prior, tmp_path, "guidance=t2d_sds", "task.generator.name=nerf"), tmp_path / "r")
    with pytest.raises(ValueError, match="guidance.lora_rank"):
        run(compose_config(tiny_pixel_prior, tmp_path, "guidance=t2d_sds", "+guidance.lora_rank=4"), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def assert_preset_fails_without_weights(tmp_path: Path, experiment: str, guidance: str) -> None:
    """``experiment=<experiment>`` (a Stable Diffusion 2.1 preset) on a machine without the weights: the CLI stops
    before writing the run, saying how to download them."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty_cache"), "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", "experiments.run", f"experiment={experiment}", f"guidance={guidance}",
                             "device=cpu", f"hydra.run.dir={tmp_path / 'run'}"], check=False, cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "stabilityai/stable-diffusion-2-1-base" in result.stderr and "hf download" in result.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.slow  # a CLI process (the Hugging Face cache location is read at import)
def test_sd21_preset_without_weights_fails_at_once(tmp_path):
    assert_preset_fails_without_weights(tmp_path, "table4", "t2d_msd")

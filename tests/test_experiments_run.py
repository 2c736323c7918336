"""End-to-end toy runs (tiny): the run directory, bitwise reproducibility, loggers, the Hydra CLI and multirun."""
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
TINY = ["task.grid_size=8", "task.steps=3", "task.solver_steps=4", "task.eval.n_reference=2000",
        "task.figure.resolution=16", "task.progress_bar=false", "task.save_every=2", "logger=none"]
RUN_FILES = ("config.yaml", "particles.npz", "metrics.csv", "final.json", "scatter.png")
FINAL_KEYS = {"method", "denoiser", "guidance_scale", "guide", "nll", "in_hdr", "nll_median", "steps", "seconds"}


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[*TINY, *overrides])


@pytest.mark.parametrize("overrides", [
    ["guidance=ddim"], ["guidance=sds"], ["guidance=vsd"], ["guidance=sdi", "guidance.inversion_steps=2"],
    ["guidance=msd"], ["guidance=msd", "guidance.sampler=exact"], ["guidance=msd", "guidance.sampler=stable"],
    ["guidance=msd_ode"], ["guidance=msd_tweedie"],
    ["guidance=msd", "guidance_scale=4"],
    ["guidance=sds", "denoiser=learned", "guide=autoguidance", "guidance_scale=3"],
    ["guidance=msd", "denoiser=learned", "guidance_scale=4"],
])
def test_tiny_run_writes_the_run_directory(tmp_path, overrides):
    cfg = compose_config(*overrides)
    final = run(cfg, tmp_path)
    for name in RUN_FILES:
        assert (tmp_path / name).is_file(), name
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "wandb").exists()
    assert json.loads((tmp_path / "final.json").read_text()) == final
    assert FINAL_KEYS <= set(final)
    labels = {"exact": "msd_exact", "stable": "msd_stable", "ode": "msd_ode", "tweedie": "msd_tweedie"}
    assert final["method"] == labels.get(cfg.guidance.get("sampler"), cfg.guidance.name)
    assert np.isfinite(final["nll"]) and 0.0 <= final["in_hdr"] <= 1.0
    assert final["guide"] == ("none" if cfg.guidance_scale == 1 else cfg.guide)
    with np.load(tmp_path / "particles.npz") as saved:
        assert saved["particles"].shape == (64, 2)
        assert saved["trajectory"].shape[1:] == (64, 2) and saved["trajectory_steps"][0] == 0
        np.testing.assert_array_equal(saved["trajectory"][-1], saved["particles"])
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert {"step", "nll", "in_hdr"} <= set(metrics.columns) and metrics["step"].iloc[-1] == final["steps"]
    if cfg.guidance.name != "ddim":
        assert final["steps"] == 3 and {"loss", "grad_norm", "nfe"} <= set(metrics.columns)


@pytest.mark.parametrize("overrides,seed_matters", [
    # the eq. 12 "sampler" forgets its initial noise (damped by exp(−σ_max²/2λ²) ≈ 0), tweedie and the SDI
    # preset are deterministic (D(x, λ); linear t anneal, η = 0): the seed changes nothing for them. The default
    # product_ode sampler is a sampler: the seed matters.
    (["guidance=msd_ode"], False), (["guidance=msd_tweedie"], False), (["guidance=sdi"], False),
    (["guidance=msd"], True), (["guidance=msd", "guidance.sampler=exact"], True), (["guidance=vsd"], True),
    (["guidance=sds"], True),
])
def test_same_seed_is_bitwise_identical(tmp_path, overrides, seed_matters):
    def trajectory(seed: int, name: str) -> np.ndarray:
        run(compose_config(*overrides, f"seed={seed}"), tmp_path / name)
        with np.load(tmp_path / name / "particles.npz") as saved:
            return saved["trajectory"]

    first, again = trajectory(0, "a"), trajectory(0, "b")
    assert first.tobytes() == again.tobytes()
    assert np.array_equal(first, trajectory(1, "c")) != seed_matters


def test_msd_stops_when_the_bandwidth_falls_below_lambda_min(tmp_path):
    final = run(compose_config("guidance=msd", "task.steps=10", "guidance.lambda_min=0.15"), tmp_path)
    assert final["steps"] == 6  # λ(k) = √0.1 (1 − k/10) < 0.15 first at k = 6


def test_wandb_offline_writes_its_run_inside_the_run_dir(tmp_path, monkeypatch):
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(variable, raising=False)
    run(compose_config("guidance=sds", "logger=wandb", "logger.mode=offline"), tmp_path)
    (wandb_run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert len(list(wandb_run.glob("run-*.wandb"))) == 1
    assert list(wandb_run.glob("files/media/images/scatter_*.png"))
    assert list(wandb_run.glob("files/media/table/final_metrics_*.table.json"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # a CLI process
def test_cli_single_run(tmp_path):
    result = _cli("experiment=toy2d", "guidance=msd", "denoiser=learned", "guidance.lambda0=0.5", *TINY,
                  f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in (*RUN_FILES, ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "final.json").read_text())["denoiser"] == "learned"


@pytest.mark.slow  # a CLI process
def test_cli_multirun(tmp_path):
    result = _cli("-m", "guidance=ddim,sds", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    finals = sorted(tmp_path.glob("*/final.json"))
    assert [json.loads(p.read_text())["method"] for p in finals] == ["ddim", "sds"]
    assert all((p.parent / ".hydra" / "config.yaml").is_file() for p in finals)


@pytest.mark.slow  # a CLI process
def test_cli_bad_config_exits_with_the_field_name(tmp_path):
    result = _cli("guidance=msd", "guidance.lambda0=-1", *TINY, f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "guidance.lambda0 must be > 0" in result.stderr
    assert not (tmp_path / "final.json").exists()

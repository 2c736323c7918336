"""Preemption safety: a run killed mid-way (a real SIGKILL of the process) and started again with the same
command ends bitwise identical to an uninterrupted run; the guidance state survives a checkpoint; a run
directory refuses a different configuration; a finished run is not recomputed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import experiments.distill  # noqa: E402
from baselines import VSDGuidance  # noqa: E402
from experiments.checkpoint import CHECKPOINT_FILE, RunCheckpoint, clear_for_rerun  # noqa: E402
from experiments.run import run  # noqa: E402
from toy2d import ExactDenoiser, fractal_gmm  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOY = ["task.grid_size=8", "task.solver_steps=4", "task.eval.n_reference=2000", "task.figure.resolution=16",
       "task.progress_bar=false", "task.save_every=3", "task.metrics_every=4", "logger=none"]
TIMING_KEYS = {"seconds", "total_seconds", "ms_per_iter"}


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def assert_same_run(a: Path, b: Path, arrays: str) -> None:
    """Bitwise-equal arrays and metric rows; equal final metrics apart from wall-clock times."""
    with np.load(a / arrays) as left, np.load(b / arrays) as right:
        assert set(left) == set(right)
        for key in left:
            assert np.array_equal(left[key], right[key]), key
    pd.testing.assert_frame_equal(pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv"), check_exact=True)
    final_a, final_b = (json.loads((d / "final.json").read_text()) for d in (a, b))
    assert {k: v for k, v in final_a.items() if k not in TIMING_KEYS} == \
        {k: v for k, v in final_b.items() if k not in TIMING_KEYS}


@pytest.mark.slow  # three CLI processes of a 150-step run; test_toy_resume_in_process is the quick check
def test_toy_run_killed_and_rerun_is_bitwise_identical(tmp_path):
    """VSD carries state (ε̂_φ and its Adam) besides the particles, the optimiser and the generator."""
    overrides = ["guidance=vsd", "task.steps=150", "task.checkpoint_every=5", *TOY]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}

    def command(run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "experiments.run", *overrides, f"hydra.run.dir={run_dir}"]

    killed = tmp_path / "killed"
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        checkpoint = killed / CHECKPOINT_FILE
        deadline = time.monotonic() + 120
        while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert checkpoint.is_file() and not (killed / "final.json").exists(), (tmp_path / "stderr.txt").read_text()
    saved_step = torch.load(checkpoint, weights_only=True)["step"]
    assert 5 <= saved_step < 150 and saved_step % 5 == 0

    resumed = subprocess.run(command(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming vsd/exact/w=1 from step" in resumed.stdout
    assert not checkpoint.exists(), "a finished run removes its checkpoint"
    whole = subprocess.run(command(tmp_path / "whole"), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert_same_run(tmp_path / "whole", killed, "particles.npz")


class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, module, calls: int) -> None:
    """Make ``module.target_loss`` raise on call ``calls`` + 1 (a crash between two iterations)."""
    original, count = module.target_loss, {"n": 0}

    def failing(*args):
        count["n"] += 1
        if count["n"] > calls:
            raise Interrupt
        return original(*args)

    monkeypatch.setattr(module, "target_loss", failing)


def assert_resume_is_bitwise(monkeypatch, overrides: list[str], tmp_path: Path, crash_after: int, saved_step: int,
                             arrays: str) -> None:
    """A whole run of ``overrides`` against the same run crashed after ``crash_after`` updates (its last checkpoint at
    ``saved_step``) and started again: the same arrays, metric rows and final metrics."""
    run(compose_config(*overrides), tmp_path / "whole")
    with monkeypatch.context() as patch:
        interrupt_after(patch, experiments.distill, crash_after)
        with pytest.raises(Interrupt):
            run(compose_config(*overrides), tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=True)["step"] == saved_step
    run(compose_config(*overrides), tmp_path / "resumed")
    assert_same_run(tmp_path / "whole", tmp_path / "resumed", arrays)


@pytest.mark.parametrize("guidance,extra", [("msd", []), ("msd", ["guidance.start_noise=common"]),
                                             ("sdi", ["guidance.inversion_steps=2"])],
                         ids=["msd", "msd_common_noise", "sdi"])
def test_toy_resume_in_process(monkeypatch, tmp_path, guidance, extra):
    """MSD (bandwidth = schedule(step), early stop; with common start noise, the noise is guidance state) and SDI
    (annealed-free timesteps, inversion noise)."""
    overrides = [f"guidance={guidance}", "task.steps=12", "task.checkpoint_every=4", *TOY, *extra]
    assert_resume_is_bitwise(monkeypatch, overrides, tmp_path, crash_after=6, saved_step=4, arrays="particles.npz")


@pytest.fixture
def tiny_pixel_prior(tiny_shapes_prior):
    """The session's tiny random ShapesWorld pixel prior (tests/conftest.py); its classifier lies beside it."""
    return tiny_shapes_prior[0]


def text2d_overrides(prior: Path, cache: Path, guidance: str) -> list[str]:
    return ["experiment=table4_shapes", f"prior.path={prior}", f"prior.classifier={prior.parent / 'classifier'}",
            'task.prompts=["a red circle","a blue square"]', "task.images_per_prompt=2", "task.steps=3",
            "task.eval.every=2", "task.checkpoint_every=2", "task.eval.reference_per_prompt=3",
            "task.eval.reference_steps=2", f"task.eval.cache_dir={cache}", "logger=none", "task.solver_steps=2",
            f"guidance={guidance}"]


def test_text2d_vsd_resume_is_bitwise_identical(monkeypatch, tiny_pixel_prior, tmp_path):
    """VSD's LoRA ε̂_φ, its Adam state, the generator MLP, its Adam state, the RNG and the FID rows: 3 iterations,
    stopped after 2 (checkpoint and FID row at 2), resumed for the last one (and the final FID)."""
    overrides = text2d_overrides(tiny_pixel_prior, tmp_path / "cache", "t2d_vsd")
    assert_resume_is_bitwise(monkeypatch, overrides, tmp_path, crash_after=2, saved_step=2, arrays="images.npz")


def test_vsd_state_round_trip_continues_identically():
    """A fresh VSD guidance loaded from a state_dict gives the same targets as the original from then on."""
    denoiser = ExactDenoiser(fractal_gmm("A"))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    original = VSDGuidance(denoiser, phi_lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        original(x, step, generator)
    copy = VSDGuidance(denoiser, phi_lr=1e-2)
    copy.load_state_dict(original.state_dict())
    rng_state = generator.get_state()
    ahead = [original(x, step, generator).target for step in range(3, 5)]
    generator.set_state(rng_state)
    assert all(torch.equal(a, copy(x, step, generator).target) for a, step in zip(ahead, range(3, 5)))
    assert VSDGuidance(denoiser).state_dict() == {}


def test_stateless_guidance_rejects_foreign_state():
    from baselines import SDSGuidance

    with pytest.raises(ValueError, match="keeps no state"):
        SDSGuidance(ExactDenoiser(fractal_gmm("A"))).load_state_dict({"parameters": []})


def test_run_dir_refuses_another_config_and_finished_runs_are_not_recomputed(tmp_path):
    overrides = ["guidance=sds", "task.steps=3", *TOY]
    final = run(compose_config(*overrides), tmp_path)
    stamp = (tmp_path / "final.json").stat().st_mtime_ns
    again = run(compose_config(*overrides, "task.progress_bar=true", "task.checkpoint_every=1"), tmp_path)
    assert again == final and (tmp_path / "final.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"different configuration \(seed: 0 -> 1\)"):
        run(compose_config(*overrides, "seed=1"), tmp_path)
    assert (tmp_path / "final.json").stat().st_mtime_ns == stamp


def test_clear_for_rerun_keeps_only_a_same_config_checkpoint(tmp_path):
    cfg = compose_config("guidance=sds", *TOY)
    from omegaconf import OmegaConf

    resolved = OmegaConf.to_container(cfg, resolve=True)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    RunCheckpoint(tmp_path, 1).save(1, {"x": torch.zeros(1)})
    (tmp_path / "final.json").write_text("{}")
    clear_for_rerun(tmp_path, resolved, force=False)
    assert (tmp_path / CHECKPOINT_FILE).is_file() and not (tmp_path / "final.json").exists()
    clear_for_rerun(tmp_path, {**resolved, "seed": 7}, force=False)
    assert not (tmp_path / CHECKPOINT_FILE).exists()
    RunCheckpoint(tmp_path, 1).save(1, {"x": torch.zeros(1)})
    clear_for_rerun(tmp_path, resolved, force=True)
    assert not (tmp_path / CHECKPOINT_FILE).exists()


def test_checkpoint_interval_is_checked():
    with pytest.raises(ValueError, match="task.checkpoint_every must be >= 0"):
        RunCheckpoint(Path("."), -1)

"""The reproduce scripts' job runner: which runs are already done, and running the rest as subprocesses a
few at a time."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.checkpoint import CONFIG_FILE, FINAL_FILE, clear_for_rerun, same_run_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def composed_config(overrides: list[str]) -> dict:
    """The resolved config ``python -m experiments.run <overrides>`` would run."""
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)


def is_done(run_dir: Path, overrides: list[str]) -> bool:
    """A finished run whose config equals the one these overrides compose to now (logger aside)."""
    if not (run_dir / FINAL_FILE).is_file():
        return False
    return same_run_config(OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_FILE)), composed_config(overrides))


def prepare_rerun(run_dir: Path, overrides: list[str], force: bool) -> None:
    """Before a job is (re)started: a stale result is removed (it must not be aggregated if the rerun fails);
    an interrupted run of the same config keeps its checkpoint and resumes (``clear_for_rerun``)."""
    clear_for_rerun(run_dir, composed_config(overrides), force)


def run_processes(commands: list[list[str]], workers: int) -> None:
    """Run every command as its own process from the repository root, ``workers`` at a time, in order;
    raises ``RuntimeError`` listing the commands that failed once all have finished."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    pending, running, failed = list(commands), [], []
    while pending or running:
        while pending and len(running) < workers:
            command = pending.pop(0)
            print("+", " ".join(command[1:]), flush=True)
            running.append((subprocess.Popen(command, cwd=REPO_ROOT), command))
        time.sleep(0.2)
        for proc, command in list(running):
            if proc.poll() is not None:
                running.remove((proc, command))
                if proc.returncode != 0:
                    failed.append(" ".join(command[1:]))
    if failed:
        raise RuntimeError("runs failed:\n" + "\n".join(failed))

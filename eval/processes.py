"""The reproduce scripts' job runner: which runs are already done, and running the rest a few at a time,
as subprocesses or in long-lived worker processes."""
from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from experiments.checkpoint import CONFIG_FILE, FINAL_FILE, clear_for_rerun, same_run_config
from msd.paths import REPO_ROOT


def compose_run_config(overrides: list[str]) -> DictConfig:
    """The config ``python -m experiments.run <overrides>`` would run."""
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def composed_config(overrides: list[str]) -> dict:
    """:func:`compose_run_config`, resolved."""
    return OmegaConf.to_container(compose_run_config(overrides), resolve=True)


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


def run_missing(jobs: list[tuple[Path, list[str]]], force: bool, workers: int = 2) -> None:
    """Every ``(run_dir, overrides)`` that is not :func:`is_done` (all with ``force``), as
    ``python -m experiments.run <overrides> hydra.run.dir=<run_dir>`` processes, ``workers`` at a time, in order;
    an interrupted run resumes from its checkpoint (:func:`prepare_rerun`)."""
    commands = []
    for run_dir, overrides in jobs:
        if force or not is_done(run_dir, overrides):
            prepare_rerun(run_dir, overrides, force)
            commands.append([sys.executable, "-m", "experiments.run", *overrides, f"hydra.run.dir={run_dir}"])
    run_processes(commands, workers)


def _run_in_worker(overrides: list[str], run_dir: str) -> str | None:
    """One run, in-process (``experiments.run.run``); the traceback if it failed."""
    from experiments.run import run

    try:
        run(compose_run_config(overrides), Path(run_dir))
        return None
    except Exception:  # reported with the run's command once every run has finished
        return traceback.format_exc()


def run_in_workers(jobs: list[tuple[list[str], Path]], workers: int) -> None:
    """Run every ``(overrides, run_dir)`` like ``python -m experiments.run <overrides> hydra.run.dir=<run_dir>``,
    in ``workers`` long-lived processes (spawned: no state shared with this one), taken in order. A worker
    pays for its imports and the drivers' cached objects (e.g. the toy evaluator's reference samples) once,
    not once per run. Raises ``RuntimeError`` listing the failed runs once all have finished."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    commands = [" ".join(["-m experiments.run", *overrides, f"hydra.run.dir={run_dir}"]) for overrides, run_dir in jobs]
    failed = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = []
        for (overrides, run_dir), command in zip(jobs, commands):
            print("+", command, flush=True)
            futures.append(pool.submit(_run_in_worker, overrides, str(run_dir)))
        for future, command in zip(futures, commands):
            error = future.result()
            if error is not None:
                print(error, file=sys.stderr, flush=True)
                failed.append(command)
    if failed:
        raise RuntimeError("runs failed:\n" + "\n".join(failed))


"""Preemption-safe runs: a run saves everything its loop needs every ``task.checkpoint_every`` iterations to
``<run_dir>/checkpoint.pt`` (written beside it and renamed over it, so a kill never leaves a torn file), and
the same command in the same run directory continues from it. Resumed and uninterrupted runs are bitwise
identical: the checkpoint holds the optimised tensors, the optimiser state, the guidance state, the run's
``torch.Generator`` state and the metric rows so far, and the loop re-enters at the saved iteration.

A run directory belongs to one configuration: resuming (or re-running a finished run, which returns its
``final.json`` at once) under a configuration that differs in anything but the logger, the progress bar or
the checkpoint interval fails before touching the directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from experiments.io import atomic_open

CHECKPOINT_FILE = "checkpoint.pt"
FINAL_FILE = "final.json"
CONFIG_FILE = "config.yaml"
RUN_INDEPENDENT_KEYS = ("logger", "task.progress_bar", "task.checkpoint_every")
"""Config keys that may change between an interrupted run and its resumption."""


def _without_run_independent(config: dict) -> dict:
    config = json.loads(json.dumps(config))
    for dotted in RUN_INDEPENDENT_KEYS:
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return config


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def same_run_config(saved: dict, config: dict) -> bool:
    """Whether two resolved configs describe the same run (they may differ in ``RUN_INDEPENDENT_KEYS``)."""
    return _without_run_independent(saved) == _without_run_independent(config)


def clear_for_rerun(run_dir: Path, config: dict, force: bool) -> None:
    """Before a run of ``config`` is (re)started in ``run_dir`` by an orchestrator: drop a finished result or
    a checkpoint of a different configuration (or any, with ``force``); an interrupted run of the same
    configuration keeps its checkpoint and resumes."""
    run_dir = Path(run_dir)
    saved = run_dir / CONFIG_FILE
    same = saved.is_file() and same_run_config(OmegaConf.to_container(OmegaConf.load(saved), resolve=True), config)
    if force or not same:
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    (run_dir / FINAL_FILE).unlink(missing_ok=True)


def check_same_run(run_dir: Path, config: dict) -> None:
    """Fail if ``run_dir`` holds a checkpoint or a finished run of a different configuration."""
    run_dir = Path(run_dir)
    if not ((run_dir / CHECKPOINT_FILE).is_file() or (run_dir / FINAL_FILE).is_file()):
        return
    if not (run_dir / CONFIG_FILE).is_file():
        raise ValueError(f"{run_dir} holds run outputs but no {CONFIG_FILE}: use a new run directory")
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_FILE), resolve=True)
    if not same_run_config(saved, config):
        differences = _differences(_without_run_independent(saved), _without_run_independent(config))
        raise ValueError(f"run directory {run_dir} holds a run of a different configuration "
                         f"({'; '.join(differences[:5])}): use a new run directory (hydra.run.dir=...)")


def finished_metrics(run_dir: Path) -> dict | None:
    """The final metrics of a finished run in ``run_dir`` (its ``final.json``), else None."""
    path = Path(run_dir) / FINAL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class RunCheckpoint:
    """``save(step, state)`` every ``every`` iterations (0: never); ``load()`` the latest, or None."""

    def __init__(self, run_dir: Path, every: int):
        if int(every) < 0:
            raise ValueError(f"task.checkpoint_every must be >= 0 (0 = never), got {every!r}")
        self.path, self.every = Path(run_dir) / CHECKPOINT_FILE, int(every)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: dict) -> None:
        with atomic_open(self.path, "wb") as handle:
            torch.save({"step": int(step), **state}, handle)

    def load(self) -> dict | None:
        """The saved state (tensors, numbers, strings, lists and dicts only: loaded with ``weights_only``)."""
        if not self.path.is_file():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def remove(self) -> None:
        """Called once the run's final outputs are written."""
        self.path.unlink(missing_ok=True)

"""Preemption-safe runs: a run saves everything its loop needs every ``task.checkpoint_every`` iterations to
``<run_dir>/checkpoint.pt`` (written beside it, synced to disk and renamed over it, so a kill never leaves a torn
file), and the same command in the same run directory continues from it. The checkpoint before it is kept as
``checkpoint.prev.pt``: if ``checkpoint.pt`` cannot be read (cut short by a crash, a full disk or a bad copy), the
run says so and resumes from the previous one; if neither can be read, it stops naming the files to delete.
Resumed and uninterrupted runs are bitwise identical: the checkpoint holds the optimised tensors, the optimiser
state, the guidance state, the run's ``torch.Generator`` state and the metric rows so far, and the loop re-enters
at the saved iteration.

A run directory belongs to one configuration: resuming (or re-running a finished run, which returns its
``final.json`` at once) under a configuration that differs in anything but the logger, the progress bar or
the checkpoint interval fails before touching the directory.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"
"""The checkpoint before the latest, kept so that an unreadable ``checkpoint.pt`` costs one interval only."""
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
        RunCheckpoint(run_dir, 0).remove()
    (run_dir / FINAL_FILE).unlink(missing_ok=True)


def check_same_run(run_dir: Path, config: dict) -> None:
    """Fail if ``run_dir`` holds a checkpoint or a finished run of a different configuration."""
    run_dir = Path(run_dir)
    if not any((run_dir / name).is_file() for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE, FINAL_FILE)):
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


_UMASK = os.umask(0o022)
os.umask(_UMASK)


class CheckpointUnreadable(RuntimeError):
    """No checkpoint of a run directory that holds some can be read: the message says how to go on."""


def _why_unreadable(path: Path, error: Exception) -> str:
    """Why ``path`` could not be loaded, in words: empty, cut short (a torch checkpoint is a zip archive, whose
    directory is at its end), or else the first sentence of the loader's error."""
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return "empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        return f"truncated or corrupt: {size} bytes, not a complete zip archive"
    first = str(error).split(". ")[0].strip() or type(error).__name__
    return f"corrupt: {size} bytes, {first}"


class RunCheckpoint:
    """``save(step, state)`` every ``every`` iterations (0: never); ``load()`` the latest readable state, or None.

    ``path`` is ``<run_dir>/checkpoint.pt``; ``previous_path`` (``checkpoint.prev.pt``) the one saved before it."""

    def __init__(self, run_dir: Path, every: int):
        if int(every) < 0:
            raise ValueError(f"task.checkpoint_every must be >= 0 (0 = never), got {every!r}")
        self.path, self.every = Path(run_dir) / CHECKPOINT_FILE, int(every)
        self.previous_path = Path(run_dir) / PREVIOUS_CHECKPOINT_FILE
        # set by load() when checkpoint.pt could not be read: the next save must not rotate it over the good
        # checkpoint.prev.pt
        self._keep_previous = False

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: dict) -> None:
        """Write the new state to a temporary file beside ``checkpoint.pt`` and sync it to disk, rename
        ``checkpoint.pt`` to ``checkpoint.prev.pt``, then the new file to ``checkpoint.pt``. A kill or a crash at
        any point leaves a complete ``checkpoint.pt`` or ``checkpoint.prev.pt``, which ``load`` resumes from."""
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give it ordinary permissions
                torch.save({"step": int(step), **state}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            if self.path.is_file() and not self._keep_previous:
                os.replace(self.path, self.previous_path)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._keep_previous = False
        _sync_directory(directory)

    def load(self) -> dict | None:
        """The saved state (tensors, numbers, strings, lists and dicts only: loaded with ``weights_only``), or
        None if the run directory holds no checkpoint. An unreadable ``checkpoint.pt`` is reported and the
        previous checkpoint is loaded instead; if none can be read, :class:`CheckpointUnreadable` says what to
        delete."""
        failures = []
        for path in (self.path, self.previous_path):
            if not path.is_file():
                continue
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                is_run_checkpoint = isinstance(state, dict) and isinstance(state.get("step"), int)
                why = None if is_run_checkpoint else "not a run checkpoint (no step)"
            except Exception as error:  # noqa: BLE001 — torch raises RuntimeError, EOFError, OSError, UnpicklingError
                why = _why_unreadable(path, error)
            if why is not None:
                print(f"cannot read the checkpoint {path}: {why}", file=sys.stderr, flush=True)
                failures.append((path, why))
                continue
            if path == self.previous_path:
                self._keep_previous = bool(failures)
                reason = "cannot be read" if failures else "is missing (a save was interrupted)"
                print(f"{self.path.name} {reason}: resuming from the previous checkpoint {path} "
                      f"(step {state['step']})", file=sys.stderr, flush=True)
            return state
        if not failures:
            return None
        listed = "; ".join(f"{path} is {why}" for path, why in failures)
        present = " ".join(str(p) for p in (self.path, self.previous_path) if p.is_file())
        raise CheckpointUnreadable(
            f"no checkpoint in {self.path.parent} can be read: {listed}. To start this run over, delete "
            f"{'it' if len(failures) == 1 else 'them'} (rm {present}) and run the same command again; or keep "
            f"{'it' if len(failures) == 1 else 'them'} and run in a new run directory (hydra.run.dir=<new dir>; "
            f"hydra.sweep.dir=<new dir> for a sweep)")

    def remove(self) -> None:
        """Called once the run's final outputs are written: removes ``checkpoint.pt``, ``checkpoint.prev.pt`` and
        the temporary file of a save that was killed."""
        self.path.unlink(missing_ok=True)
        self.previous_path.unlink(missing_ok=True)
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def _sync_directory(directory: Path) -> None:
    """Make the renames durable (POSIX); a file system that cannot sync a directory is left as it is."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

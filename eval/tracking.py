"""W&B runs for what is not a Hydra run: the toy studies and the grid summary.

The same tracker as the experiment runs (``experiments.loggers.WandbLogger``): the run files go to
``<run_dir>/wandb`` and the mode comes from ``WANDB_MODE`` (``offline`` unless set; ``disabled`` logs
nothing, as in the tests). Upload an offline run later with ``wandb sync <run_dir>/wandb/offline-run-*``.
"""
from __future__ import annotations

import os
from pathlib import Path

from experiments.loggers import WANDB_MODES, NullLogger, RunLogger, WandbLogger

PROJECT = "msd-repro"


def study_logger(run_dir: Path, name: str, config: dict, group: str = "toy2d") -> RunLogger:
    """A W&B run named ``name`` in ``run_dir`` (NullLogger when ``WANDB_MODE=disabled``)."""
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode not in WANDB_MODES:
        raise ValueError(f"WANDB_MODE must be one of {WANDB_MODES}, got {mode!r}")
    if mode == "disabled":
        return NullLogger()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(Path(run_dir), mode, PROJECT, config, name, group=group, tags=["study"])


def records(frame) -> list[dict]:
    """A pandas frame as W&B table rows (plain Python scalars)."""
    return [{key: (value.item() if hasattr(value, "item") else value) for key, value in row.items()}
            for row in frame.to_dict(orient="records")]

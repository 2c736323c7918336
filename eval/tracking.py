"""W&B runs for what is not a Hydra run: the toy studies and the grid summaries.

The same tracker as the experiment runs (``experiments.loggers.WandbLogger``): the run files go to
``<run_dir>/wandb`` and the mode comes from ``WANDB_MODE`` (``offline`` unless set; ``disabled`` logs
nothing, as in the tests). Upload an offline run later with ``wandb sync <run_dir>/wandb/offline-run-*``.
A study run's group is the experiment it belongs to (``toy2d``, ``table4``), its job type the study
(``config["study"]``, one of :data:`STUDY_TASKS`) and its tags ``study``, ``task:<task>`` and, when the
config names them, ``denoiser:<name>`` / ``prior:<name>`` (what ``eval.dashboards`` selects study runs by).
"""
from __future__ import annotations

import os
from pathlib import Path

from experiments.loggers import WANDB_MODES, NullLogger, RunLogger, WandbLogger

PROJECT = "msd-repro"
STUDY_TASKS = {"toy2d_grid": "toy2d", "gradient_quality": "toy2d", "landscapes": "toy2d", "table4": "text2d",
               "text3d": "text3d"}
"""Study (the job type of its W&B run) -> the task whose runs it studies."""
STUDY_TAG = "study"


def study_tags(config: dict) -> list[str]:
    """``study``, ``task:<task>``, and ``denoiser:<name>`` / ``prior:<name>`` when ``config`` has them."""
    study = config.get("study")
    if study not in STUDY_TASKS:
        raise ValueError(f"config['study'] must be one of {tuple(STUDY_TASKS)}, got {study!r}")
    return [STUDY_TAG, f"task:{STUDY_TASKS[study]}",
            *(f"{key}:{config[key]}" for key in ("denoiser", "prior") if key in config)]


def study_logger(run_dir: Path, name: str, config: dict, group: str = "toy2d") -> RunLogger:
    """A W&B run named ``name`` in ``run_dir`` (NullLogger when ``WANDB_MODE=disabled``)."""
    tags = study_tags(config)
    mode = os.environ.get("WANDB_MODE", "offline")
    if mode not in WANDB_MODES:
        raise ValueError(f"WANDB_MODE must be one of {WANDB_MODES}, got {mode!r}")
    if mode == "disabled":
        return NullLogger()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(Path(run_dir), mode, PROJECT, config, name, group=group, job_type=config["study"],
                       tags=tags)


def records(frame) -> list[dict]:
    """A pandas frame as W&B table rows (plain Python scalars)."""
    return [{key: (value.item() if hasattr(value, "item") else value) for key, value in row.items()}
            for row in frame.to_dict(orient="records")]

"""Hydra entry point: ``python -m experiments.run [group=option ...] [key=value ...]`` (``-m`` for sweeps).

Builds and checks everything first (a bad config fails before the run writes anything), then writes
the resolved config (``config.yaml``, beside Hydra's ``.hydra/``), starts the logger and runs the task
(``task.name`` in the registry of ``experiments.tasks``) in the Hydra run directory. The same command in the same run directory resumes an interrupted run
from its checkpoint and returns a finished run's metrics at once (``experiments.checkpoint``).
"""
from __future__ import annotations

from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.checkpoint import CONFIG_FILE, RunCheckpoint, check_same_run, finished_metrics
from experiments.config_types import check_config_types
from experiments.io import write_text
from experiments.loggers import build_logger, check_logger_config
from experiments.tasks import task_class
from msd.checks import require


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """One run of ``cfg`` into ``run_dir``; returns the final metrics."""
    check_config_types(cfg)
    task_type = task_class(cfg.task.name)
    require(cfg.num_threads is None or cfg.num_threads >= 1, "num_threads", "null or >= 1", cfg.num_threads)
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    run_dir = Path(run_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    check_same_run(run_dir, resolved)
    finished = finished_metrics(run_dir)
    if finished is not None:
        print(f"{run_dir} already holds this finished run (final.json): nothing to do", flush=True)
        return finished
    task = task_type.build(cfg)
    check_logger_config(cfg.logger)
    checkpoint = RunCheckpoint(run_dir, cfg.task.checkpoint_every)
    write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(resolved))
    logger = build_logger(cfg.logger, run_dir, resolved, run_name=run_dir.name)
    try:
        final = task.run(run_dir, logger, checkpoint)
    finally:
        logger.finish()
    checkpoint.remove()
    return final


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    final = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    return final[task_class(cfg.task.name).objective]


if __name__ == "__main__":
    main()

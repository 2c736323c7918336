"""Experiment trackers behind one small interface: W&B (offline by default) or nothing.

Whatever the tracker, the run directory itself always holds the config, metrics.csv, final.json and
figures; the tracker is a view on the same numbers.
"""
from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Mapping

import PIL.Image

LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")


class RunLogger(ABC):
    @abstractmethod
    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Scalars at optimisation step ``step``."""

    @abstractmethod
    def log_figure(self, name: str, figure, step: int | None = None) -> None:
        """A matplotlib figure."""

    @abstractmethod
    def log_table(self, name: str, rows: list[dict]) -> None:
        """A table of rows sharing the same keys (e.g. the final metrics)."""

    def finish(self) -> None:
        """Flush and close."""


class NullLogger(RunLogger):
    """``logger=none``: logs nothing."""

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        pass

    def log_figure(self, name: str, figure, step: int | None = None) -> None:
        pass

    def log_table(self, name: str, rows: list[dict]) -> None:
        pass


class WandbLogger(RunLogger):
    """A W&B run writing ``<run_dir>/wandb/<mode>-run-*`` (offline: upload later with ``wandb sync``)."""

    def __init__(self, run_dir: Path, mode: str, project: str, config: dict, name: str,
                 entity: str | None = None, group: str | None = None, tags: list[str] | None = None):
        # W&B reads its cache / data / settings folders once per process: the first run of a process
        # (or the user's environment) decides them; the run files always go to <run_dir>/wandb.
        if mode != "disabled":
            wandb_root = Path(run_dir) / "wandb"
            for variable, folder in (("WANDB_DIR", Path(run_dir)), ("WANDB_CACHE_DIR", wandb_root / "cache"),
                                     ("WANDB_DATA_DIR", wandb_root / "data"),
                                     ("WANDB_CONFIG_DIR", wandb_root / "settings")):
                if variable not in os.environ:
                    folder.mkdir(parents=True, exist_ok=True)
                    os.environ[variable] = str(folder)
        import wandb

        self._wandb = wandb
        self.run = wandb.init(dir=str(run_dir), mode=mode, project=project, entity=entity, group=group,
                              tags=list(tags or []), name=name, config=config)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def log_figure(self, name: str, figure, step: int | None = None) -> None:
        buffer = io.BytesIO()  # rendered here: wandb.Image(figure) would need pyplot's global state
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        buffer.seek(0)
        self.run.log({name: self._wandb.Image(PIL.Image.open(buffer))}, step=step)

    def log_table(self, name: str, rows: list[dict]) -> None:
        columns = list(rows[0]) if rows else []
        table = self._wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
        self.run.log({name: table})

    def finish(self) -> None:
        self.run.finish()


def check_logger_config(logger_cfg) -> None:
    """Fail early on an unknown logger or W&B mode."""
    if logger_cfg.name not in LOGGERS:
        raise ValueError(f"logger.name must be one of {LOGGERS}, got {logger_cfg.name!r}")
    if logger_cfg.name == "wandb" and logger_cfg.mode not in WANDB_MODES:
        raise ValueError(f"logger.mode must be one of {WANDB_MODES}, got {logger_cfg.mode!r}")


def build_logger(logger_cfg, run_dir: Path, config: dict, run_name: str) -> RunLogger:
    """The tracker named by ``logger.name`` (``config``: the resolved run config, recorded with the run)."""
    check_logger_config(logger_cfg)
    if logger_cfg.name == "none":
        return NullLogger()
    return WandbLogger(run_dir, logger_cfg.mode, logger_cfg.project, config, run_name,
                       entity=logger_cfg.entity, group=logger_cfg.group, tags=list(logger_cfg.tags))

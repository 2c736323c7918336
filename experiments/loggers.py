"""Experiment trackers behind one small interface: W&B (offline by default) or nothing.

Whatever the tracker, the run directory itself always holds the config, metrics.csv, final.json and
figures; the tracker is a view on the same numbers.

Every W&B run carries the metadata the dashboards (``eval.dashboards``) select runs by: its group (the sweep
``sweep/<name>``, else the paper preset such as ``toy2d`` or ``table4_shapes``, else the task), its job type
(the method: ``ddim``, ``sds``, ``vsd``, ``sdi``, ``msd``, ``msd_tweedie``, ``msd_ode``, ``msd_stable``, ``msd_exact``) and ``key:value``
tags (``task:``, ``denoiser:`` or ``prior:``, ``guide:``, and ``sweep:`` in a sweep). conf/logger/wandb.yaml
spells them with the resolvers registered here. Besides scalars, figures and tables a run may log media files: an mp4
video (``log_video``, a turntable) and a 3-D object (``log_object3d``, a ``.glb`` mesh), which W&B copies into the
run's ``files/media/videos`` and ``files/media/object3D``. A run directory keeps its W&B run id in ``wandb/run_id``: the
same command in the same run directory (a resumed run) continues that W&B run.
"""
from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Mapping

import PIL.Image
from omegaconf import DictConfig, OmegaConf

LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")
RUN_ID_FILE = Path("wandb") / "run_id"
"""Where a run directory keeps its W&B run id (relative to the run directory)."""


def hydra_choice(group: str) -> str | None:
    """The option Hydra composed for config group ``group``; None when unset or outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def run_group(sweep: str | None, experiment: str | None, task: str) -> str:
    """``sweep/<sweep>`` in a sweep, else the paper preset ``experiment``, else the task name."""
    return f"sweep/{sweep}" if sweep else experiment or task


def method_of(guidance: DictConfig) -> str:
    """The method label of a guidance config (``experiments.builders.method_label``)."""
    from experiments.builders import method_label

    return method_label(guidance)


def model_tag(prior: str | None, denoiser: str) -> str:
    """``prior:<name>`` for a diffusers prior (text-to-2D), else ``denoiser:<name>`` (toy)."""
    return f"prior:{prior}" if prior else f"denoiser:{denoiser}"


def guide_label(guide: str, guidance_scale: float) -> str:
    """The guide in effect: ``none`` at guidance_scale 1 (the guide is then never evaluated)."""
    return "none" if float(guidance_scale) == 1.0 else guide


RESOLVERS = {"hydra_choice": hydra_choice, "run_group": run_group, "method_of": method_of,
             "model_tag": model_tag, "guide_label": guide_label}
"""The resolvers of conf/logger/wandb.yaml."""
for _name, _resolver in RESOLVERS.items():
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)


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

    def log_video(self, name: str, path: Path, step: int | None = None) -> None:
        """An mp4 file (``experiments.exports.write_mp4``, e.g. a turntable); by default not logged."""

    def log_object3d(self, name: str, path: Path, step: int | None = None) -> None:
        """A 3-D object file, ``.glb`` (``experiments.exports.write_mesh``); by default not logged."""

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


def stable_run_id(run_dir: Path) -> str:
    """The W&B run id of ``run_dir``: read from ``<run_dir>/wandb/run_id``, or made and stored there."""
    from wandb.sdk.lib.runid import generate_id

    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = generate_id()
    path.write_text(run_id + "\n")
    return run_id


class WandbLogger(RunLogger):
    """A W&B run writing ``<run_dir>/wandb/<mode>-run-*`` (offline: upload later with ``wandb sync``).

    Outside ``disabled`` mode the run id is :func:`stable_run_id`'s and the run is started with
    ``resume="allow"``: a second start in the same run directory continues the same W&B run (offline, each
    start writes its own ``offline-run-*`` folder; ``wandb sync`` uploads them in order into one run)."""

    def __init__(self, run_dir: Path, mode: str, project: str, config: dict, name: str, group: str,
                 job_type: str, tags: list[str], entity: str | None = None):
        # W&B reads its cache / data / settings folders once per process: the first run of a process
        # (or the user's environment) decides them; the run files always go to <run_dir>/wandb.
        run_id = None
        if mode != "disabled":
            wandb_root = Path(run_dir) / "wandb"
            for variable, folder in (("WANDB_DIR", Path(run_dir)), ("WANDB_CACHE_DIR", wandb_root / "cache"),
                                     ("WANDB_DATA_DIR", wandb_root / "data"),
                                     ("WANDB_CONFIG_DIR", wandb_root / "settings")):
                if variable not in os.environ:
                    folder.mkdir(parents=True, exist_ok=True)
                    os.environ[variable] = str(folder)
            run_id = stable_run_id(run_dir)
        import wandb

        self._wandb = wandb
        self.run = wandb.init(dir=str(run_dir), mode=mode, project=project, entity=entity, group=group,
                              job_type=job_type, tags=list(tags), name=name, config=config, id=run_id,
                              resume="allow" if run_id else None)

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

    def log_video(self, name: str, path: Path, step: int | None = None) -> None:
        # From the file: W&B copies it into the run's media/videos as it is (moviepy is needed only for arrays).
        self.run.log({name: self._wandb.Video(str(path), format="mp4")}, step=step)

    def log_object3d(self, name: str, path: Path, step: int | None = None) -> None:
        # From the file: W&B copies it into the run's media/object3D (the type from its suffix: glb, gltf, obj, ...).
        self.run.log({name: self._wandb.Object3D.from_file(str(path))}, step=step)

    def finish(self) -> None:
        self.run.finish()


def check_logger_config(logger_cfg) -> None:
    """Fail early on an unknown logger or W&B mode, or W&B run metadata that is not set."""
    if logger_cfg.name not in LOGGERS:
        raise ValueError(f"logger.name must be one of {LOGGERS}, got {logger_cfg.name!r}")
    if logger_cfg.name != "wandb":
        return
    if logger_cfg.mode not in WANDB_MODES:
        raise ValueError(f"logger.mode must be one of {WANDB_MODES}, got {logger_cfg.mode!r}")
    for field in ("group", "job_type"):
        if not logger_cfg[field]:
            raise ValueError(f"logger.{field} must be a non-empty string (the dashboards select runs by it), "
                             f"got {logger_cfg[field]!r}")


def run_tags(logger_cfg) -> list[str]:
    """``logger.tags``, plus ``sweep:<name>`` in a sweep."""
    return [*logger_cfg.tags, *([f"sweep:{logger_cfg.sweep}"] if logger_cfg.sweep else [])]


def build_logger(logger_cfg, run_dir: Path, config: dict, run_name: str) -> RunLogger:
    """The tracker named by ``logger.name`` (``config``: the resolved run config, recorded with the run)."""
    check_logger_config(logger_cfg)
    if logger_cfg.name == "none":
        return NullLogger()
    return WandbLogger(run_dir, logger_cfg.mode, logger_cfg.project, config, run_name, group=logger_cfg.group,
                       job_type=logger_cfg.job_type, tags=run_tags(logger_cfg), entity=logger_cfg.entity)

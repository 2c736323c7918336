"""W&B run metadata (group, job type, tags) of experiment and sweep runs, read back from the offline run files,
and resumed runs continuing the same W&B run."""
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import wandb  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from experiments.loggers import RUN_ID_FILE, WandbLogger, build_logger, run_tags  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WANDB_VARIABLES = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")
TOY_TINY = ["task.grid_size=4", "task.steps=2", "task.solver_steps=3", "task.eval.n_reference=2000",
            "task.figure.resolution=16", "task.progress_bar=false", "task.metrics_every=1"]


# --- reading offline runs --------------------------------------------------------------------------------------

@dataclass
class LoggedRun:
    """What an offline run recorded: its metadata, the keys it logged and its config."""

    run_id: str
    group: str
    job_type: str
    tags: tuple[str, ...]
    keys: set[str]
    config: dict


def wandb_records(path: Path):
    """The protobuf records of a ``run-<id>.wandb`` file (W&B's LevelDB-style log: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", path
    position, chunks = 7, []
    while position < len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            position += left
            continue
        chunks.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def read_offline_run(run_folder: Path) -> LoggedRun:
    """The metadata, logged keys (media and tables by their name) and config of one ``offline-run-*`` folder."""
    (path,) = run_folder.glob("run-*.wandb")
    run, keys, config = None, set(), {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in run.config.update})
        elif kind == "history":
            keys |= {(item.key or ".".join(item.nested_key)).split(".")[0] for item in record.history.item}
    assert run is not None, f"{path} has no run record"
    return LoggedRun(run.run_id, run.run_group, run.job_type, tuple(run.tags), keys - {"_step", "_runtime",
                                                                                          "_timestamp"}, config)


def offline_runs(root: Path) -> list[LoggedRun]:
    return [read_offline_run(folder) for folder in sorted(Path(root).rglob("offline-run-*"))]


def hydra_metadata(*overrides: str) -> tuple[str, str, list[str]]:
    """(group, job type, tags) of the run ``python -m experiments.run <overrides>`` would start (the Hydra app's
    config, its choices set as the app sets them)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=wandb", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        logger = OmegaConf.create(OmegaConf.to_container(cfg.logger, resolve=True))
    finally:
        HydraConfig.instance().cfg = None
    return logger.group, logger.job_type, run_tags(logger)


def cli(*args: str, cwd: Path = REPO) -> None:
    env = {key: value for key, value in os.environ.items() if key not in WANDB_VARIABLES}
    result = subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=cwd, capture_output=True,
                            text=True, timeout=300, env={**env, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture
def offline(monkeypatch):
    for variable in WANDB_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")


# --- tests -----------------------------------------------------------------------------------------------------

@pytest.mark.slow  # a CLI process with an offline W&B run
def test_experiment_run_metadata_from_the_hydra_app(tmp_path):
    cli("experiment=toy2d", "guidance=msd", "guidance.sampler=exact", *TOY_TINY, f"hydra.run.dir={tmp_path}")
    (run,) = offline_runs(tmp_path)
    assert (run.group, run.job_type) == ("toy2d", "msd_exact")
    assert run.tags == ("task:toy2d", "denoiser:exact", "guide:none")
    assert {"nll", "in_hdr", "loss", "scatter", "final_metrics"} <= run.keys
    assert run.config["logger"]["group"] == "toy2d" and (tmp_path / RUN_ID_FILE).read_text().strip() == run.run_id


@pytest.mark.slow  # a CLI multirun with two offline W&B runs
def test_sweep_runs_are_grouped_and_tagged_by_the_sweep(tmp_path):
    cli("sweep=toy2d_guidance", "guidance_scale=1,4", "guidance.lambda0=0.3", *TOY_TINY, f"hydra.sweep.dir={tmp_path}")
    runs = offline_runs(tmp_path)
    assert len(runs) == 2 and len({run.run_id for run in runs}) == 2
    assert {(run.group, run.job_type) for run in runs} == {("sweep/toy2d_guidance", "msd")}
    assert sorted(run.tags for run in runs) == [
        ("task:toy2d", "denoiser:exact", "guide:cfg", "sweep:toy2d_guidance"),
        ("task:toy2d", "denoiser:exact", "guide:none", "sweep:toy2d_guidance")]


@pytest.mark.parametrize("overrides,expected", [
    (["experiment=table4_shapes", "guidance=t2d_msd"], ("table4_shapes", "msd", ["task:text2d", "prior:shapes",
                                                                                         "guide:cfg"])),
    (["experiment=table4", "prior=sd15", "guidance=t2d_ddim"], ("table4", "ddim", ["task:text2d", "prior:sd15",
                                                                                   "guide:cfg"])),
    (["sweep=text2d_bandwidth"], ("sweep/text2d_bandwidth", "msd",
                                  ["task:text2d", "prior:shapes", "guide:cfg", "sweep:text2d_bandwidth"])),
    (["guidance=sds", "denoiser=learned", "guide=autoguidance", "guidance_scale=3"],
     ("toy2d", "sds", ["task:toy2d", "denoiser:learned", "guide:autoguidance"])),
])
def test_metadata_of_presets_and_sweeps(overrides, expected):
    assert hydra_metadata(*overrides) == expected


def test_composed_config_outside_hydra_falls_back_to_the_task():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=table4_shapes", "guidance=t2d_vsd", "logger=wandb"])
    logger = OmegaConf.to_container(cfg.logger, resolve=True)
    assert (logger["sweep"], logger["experiment"], logger["group"], logger["job_type"]) == (None, None, "text2d", "vsd")


def test_resumed_run_continues_the_same_wandb_run(tmp_path, offline):
    def start(step: int) -> str:
        logger = WandbLogger(tmp_path, "offline", "unit", {"a": 1}, "resume", group="toy2d", job_type="msd",
                             tags=["task:toy2d"])
        logger.log_scalars({"nll": 1.0 / step}, step=step)
        logger.finish()
        return logger.run.id

    first = start(1)
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == first
    assert start(2) == first
    wandb.teardown()  # the W&B service closes the run files (finish() may return before they are flushed)
    runs = offline_runs(tmp_path / "wandb")
    assert runs and {run.run_id for run in runs} == {first}


def test_disabled_mode_writes_nothing(tmp_path, monkeypatch):
    for variable in WANDB_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    logger = WandbLogger(tmp_path, "disabled", "unit", {}, "off", group="toy2d", job_type="msd", tags=[])
    logger.log_scalars({"nll": 1.0}, step=1)
    logger.finish()
    assert not list(tmp_path.iterdir())


def test_bad_logger_config_fails_naming_the_field(tmp_path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=wandb", "logger.mode=disabled", "logger.group="])
    with pytest.raises(ValueError, match="logger.group must be a non-empty string"):
        build_logger(cfg.logger, tmp_path, {}, "bad")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=wandb", "logger.mode=sometimes"])
    with pytest.raises(ValueError, match=r"logger.mode must be one of \('offline', 'online', 'disabled'\)"):
        build_logger(cfg.logger, tmp_path, {}, "bad")


def test_videos_and_3d_objects_are_logged_as_files(tmp_path, offline):
    """An mp4 of ``write_mp4`` and a ``.glb`` of ``write_mesh`` land in the offline run's media folders byte for byte
    (from the file: no moviepy), under the keys they were logged as."""
    import numpy as np
    import trimesh

    from experiments.exports import write_mesh, write_mp4
    from experiments.loggers import NullLogger

    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    video = write_mp4(tmp_path / "turntable.mp4", frames)
    _, glb = write_mesh(tmp_path / "mesh", trimesh.creation.box())
    NullLogger().log_video("turntable", video, step=1)  # the null tracker takes the same calls and does nothing
    NullLogger().log_object3d("mesh", glb, step=1)
    logger = WandbLogger(tmp_path, "offline", "unit", {}, "media", group="text3d_shapes", job_type="msd",
                         tags=["task:text3d"])
    logger.log_video("turntable", video, step=1)
    logger.log_object3d("mesh", glb, step=1)
    logger.finish()
    wandb.teardown()
    (run_folder,) = (tmp_path / "wandb").glob("offline-run-*")
    (logged_video,) = (run_folder / "files" / "media" / "videos").glob("turntable_*.mp4")
    (logged_glb,) = (run_folder / "files" / "media" / "object3D").glob("mesh_*.glb")
    assert video.stat().st_size > 0 and logged_video.read_bytes() == video.read_bytes()
    assert logged_glb.read_bytes() == glb.read_bytes()
    assert np.allclose(trimesh.load(logged_glb, force="mesh").bounds, trimesh.creation.box().bounds)
    assert {"turntable", "mesh"} <= read_offline_run(run_folder).keys

"""Faults a user meets, answered plainly: a config value of the wrong type names the field and the type it must
have (experiments.config_types), and an unreadable checkpoint names the file, falls back to the previous one or
says how to start over (experiments.checkpoint)."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments.checkpoint import (
    CHECKPOINT_FILE,
    PREVIOUS_CHECKPOINT_FILE,
    CheckpointUnreadable,
    RunCheckpoint,
    clear_for_rerun,
)
from experiments.config_types import check_config_types, config_type_errors, field_types
from experiments.run import run

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
TOY = ["task.grid_size=8", "task.solver_steps=4", "task.eval.n_reference=2000", "task.figure.resolution=16",
       "task.progress_bar=false", "task.save_every=3", "task.metrics_every=4", "logger=none"]
GUIDANCES = sorted(path.stem for path in (CONF / "guidance").glob("*.yaml"))
TOY_GUIDANCES = [name for name in GUIDANCES if not name.startswith("t2d_")]
TEXT2D_GUIDANCES = [name for name in GUIDANCES if name.startswith("t2d_")]
SWEEPS = sorted(path.stem for path in (CONF / "sweep").glob("*.yaml") if not path.stem.startswith("_"))


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# ---- a value of the wrong type ---------------------------------------------------------------------------------

WRONG = [
    (["task.steps=abc"], "task.steps must be an integer, got 'abc' (str)"),
    (["task.steps=1.5"], "task.steps must be an integer, got 1.5 (float)"),
    (["task.steps=null"], "task.steps must be an integer, got null"),
    (["task.optimizer.lr=fast"], "task.optimizer.lr must be a number, got 'fast' (str)"),
    (["task.progress_bar=1"], "task.progress_bar must be true or false, got 1 (int)"),
    (["guidance=msd", "guidance.lambda0=big"], "guidance.lambda0 must be a number, got 'big' (str)"),
    (["guidance=msd", "guidance.start_factor=x"], "guidance.start_factor must be a number or null, got 'x' (str)"),
    (["guidance=sdi", "guidance.inversion_steps=ten"], "guidance.inversion_steps must be an integer, got 'ten' (str)"),
    (["guidance=msd", "guidance.kernel_interval=0.5"],
     "guidance.kernel_interval must be a list or null, got 0.5 (float)"),
    (["task.optimizer.betas=[0.9,x]"], "task.optimizer.betas[1] must be a number, got 'x' (str)"),
    (["task.canvas.center=0.3"], "task.canvas.center must be a list, got 0.3 (float)"),
    (["experiment=table4_shapes", "guidance=t2d_msd", "task.prompts=[a red circle,7]"],
     "task.prompts[1] must be a string, got 7 (int)"),
    (["guidance_interval=[0.1,high]"], "guidance_interval[1] must be a number, got 'high' (str)"),
]


@pytest.mark.parametrize(("overrides", "message"), WRONG, ids=[" ".join(o) for o, _ in WRONG])
def test_wrong_type_names_the_field_and_the_type(overrides, message):
    with pytest.raises(ValueError) as error:
        check_config_types(compose_config(*overrides, "logger=none"))
    assert str(error.value) == message


def test_run_refuses_a_wrong_type_before_writing_anything(tmp_path):
    """``experiments.run.run`` checks first: the bare ``'>=' not supported ...`` TypeError is gone, and the run
    directory stays empty."""
    with pytest.raises(ValueError, match=re.escape("task.steps must be an integer, got 'abc' (str)")):
        run(compose_config("task.steps=abc", *TOY), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_every_wrong_field_is_named_at_once():
    errors = config_type_errors(compose_config("task.steps=abc", "seed=x", "guidance.lambda0=big", "logger=none"))
    assert sorted(errors) == ["guidance.lambda0 must be a number, got 'big' (str)",
                              "seed must be an integer, got 'x' (str)",
                              "task.steps must be an integer, got 'abc' (str)"]
    with pytest.raises(ValueError, match=r"^3 config values of the wrong type: "):
        check_config_types(compose_config("task.steps=abc", "seed=x", "guidance.lambda0=big", "logger=none"))


VALID = [
    ["task.optimizer.lr=1"],                              # an int where a float is expected
    ["guidance_scale=2", "guidance=sds", "guidance.t_min=0"],
    ["task.canvas.center=[0,1]", "task.optimizer.betas=[0,1]"],
    ["guidance=msd", "guidance.start_factor=null", "guidance.inversion_scale=null", "guidance.kernel_interval=null"],
    ["guidance=msd", "guidance.start_factor=3", "guidance.inversion_scale=1", "guidance.kernel_interval=[0,1.5]"],
    ["num_threads=null", "guidance_interval=null"],
    ["guidance_interval=[0.1,2]", "denoiser=learned", "guide=autoguidance"],
    ["logger=wandb", "logger.entity=me", "logger.entity=null"],
    ["experiment=table4_shapes", "guidance=t2d_vsd", "guidance.lora_alpha=8", "prior.path=/some/dir",
     "prior.dtype=float32", "task.eval.clip_path=null", "task.prompts=[]"],
    ["+task.not_in_any_file=abc"],                        # a key no file sets has no type to break
    # as eval.reproduce_toy2d and eval.reproduce_table4 --quick compose their runs
    ["experiment=toy2d", "task.dataset=spiral", "guidance=msd", "denoiser=learned", "guide=autoguidance",
     "guidance_scale=3", "seed=2"],
    ["experiment=table4_shapes", 'task.prompts=["a red circle","a green square"]', "task.images_per_prompt=2",
     "task.steps=60", "task.eval.every=10", "task.eval.reference_per_prompt=16", "task.solver_steps=8",
     "guidance=t2d_msd_stable", "seed=1", "device=cpu"],
]


@pytest.mark.parametrize("overrides", VALID, ids=[" ".join(o) for o in VALID])
def test_valid_values_pass(overrides):
    check_config_types(compose_config(*overrides))


@pytest.mark.parametrize("guidance", TOY_GUIDANCES)
@pytest.mark.parametrize("preset", [None, "toy2d"])
def test_every_toy_guidance_composes_and_passes(preset, guidance):
    for denoiser in ("exact", "learned"):
        overrides = [f"guidance={guidance}", f"denoiser={denoiser}"]
        check_config_types(compose_config(*overrides, *([f"experiment={preset}"] if preset else [])))


@pytest.mark.parametrize("guidance", TEXT2D_GUIDANCES)
@pytest.mark.parametrize("preset", [["experiment=table4_shapes"], ["experiment=table4"],
                                    ["experiment=table4", "prior=sd15"], ["task=text2d", "prior=shapes"]])
def test_every_text2d_preset_composes_and_passes(preset, guidance):
    check_config_types(compose_config(*preset, f"guidance={guidance}"))


TEXT3D_GUIDANCES = sorted(path.stem for path in (CONF / "guidance").glob("t3d_*.yaml"))


@pytest.mark.parametrize("guidance", TEXT3D_GUIDANCES)
@pytest.mark.parametrize("preset", [["experiment=text3d_shapes"], ["experiment=text3d_sd21"],
                                    ["task=text3d", "prior=shapes3d"]])
def test_every_text3d_preset_composes_and_passes(preset, guidance):
    check_config_types(compose_config(*preset, f"guidance={guidance}"))


def test_every_preset_is_covered():
    presets = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))
    assert presets == ["table4", "table4_shapes", "text3d_sd21", "text3d_shapes", "toy2d"], \
        "a new experiment preset: add it to the tests above"


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_job_composes_and_passes(sweep):
    """Each job of the sweep preset, as the SLURM dry run (eval.slurm_dry_run) expands it."""
    from eval.slurm_dry_run import sweep_jobs

    _, jobs, _ = sweep_jobs([f"sweep={sweep}"])
    assert jobs
    for job in jobs:
        check_config_types(compose_config(f"sweep={sweep}", *job))


def test_every_field_of_every_config_file_has_a_type():
    """A field every file leaves null (or sets by a resolver) needs an entry in config_types.DECLARED_TYPES."""
    untyped = sorted(name for name, entry in field_types().items() if not entry.kinds)
    assert untyped == [], f"add these to experiments.config_types.DECLARED_TYPES: {untyped}"


def test_types_come_from_the_files(tmp_path):
    """Union over a group's options, null where a file has null, ints accepted for floats, ${a.b} typed as a.b."""
    (tmp_path / "task").mkdir()
    (tmp_path / "config.yaml").write_text("defaults:\n  - task: a\n  - _self_\nseed: 0\n")
    (tmp_path / "task" / "a.yaml").write_text("steps: 3\nlr: 0.1\nmode: x\nalias: ${task.steps}\n")
    (tmp_path / "task" / "b.yaml").write_text("steps: 4\nlr: null\nmode: 2\nextra: [1, 2]\n")
    types = field_types(tmp_path)
    assert types["task.steps"].kinds == {"int"} and not types["task.steps"].nullable
    assert types["task.lr"].kinds == {"float"} and types["task.lr"].nullable
    assert types["task.mode"].kinds == {"str", "int"}
    assert types["task.alias"].kinds == {"int"}
    assert types["task.extra"].items == {"int"}
    bad = OmegaConf.create({"seed": 0, "task": {"steps": 3, "lr": 1, "mode": 2, "alias": "x", "extra": [1, 2.5]}})
    assert config_type_errors(bad, tmp_path) == ["task.alias must be an integer, got 'x' (str)",
                                                 "task.extra[1] must be an integer, got 2.5 (float)"]


# ---- an unreadable checkpoint ----------------------------------------------------------------------------------

def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def saved_twice(run_dir: Path) -> RunCheckpoint:
    checkpoint = RunCheckpoint(run_dir, 1)
    checkpoint.save(1, {"x": torch.ones(100)})
    checkpoint.save(2, {"x": torch.full((100,), 2.0)})
    return checkpoint


def test_save_keeps_the_previous_checkpoint(tmp_path):
    checkpoint = saved_twice(tmp_path)
    assert torch.load(checkpoint.path, weights_only=True)["step"] == 2
    assert torch.load(tmp_path / PREVIOUS_CHECKPOINT_FILE, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE])


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    truncate(saved_twice(tmp_path).path)
    checkpoint = RunCheckpoint(tmp_path, 1)
    state = checkpoint.load()
    assert state["step"] == 1 and torch.equal(state["x"], torch.ones(100))
    err = capsys.readouterr().err
    size = (tmp_path / CHECKPOINT_FILE).stat().st_size
    assert (f"cannot read the checkpoint {tmp_path / CHECKPOINT_FILE}: truncated or corrupt: {size} bytes, not a "
            "complete zip archive") in err
    assert (f"checkpoint.pt cannot be read: resuming from the previous checkpoint {tmp_path / PREVIOUS_CHECKPOINT_FILE}"
            " (step 1)") in err
    checkpoint.save(2, {"x": torch.zeros(1)})  # the unreadable file is replaced, the good previous one is kept
    assert torch.load(tmp_path / PREVIOUS_CHECKPOINT_FILE, weights_only=True)["step"] == 1
    assert RunCheckpoint(tmp_path, 1).load()["step"] == 2


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_no_readable_checkpoint_says_how_to_start_over(tmp_path, damage):
    checkpoint = saved_twice(tmp_path)
    for path in (checkpoint.path, tmp_path / PREVIOUS_CHECKPOINT_FILE):
        truncate(path) if damage == "truncated" else path.write_bytes(b"")
    with pytest.raises(CheckpointUnreadable) as error:
        RunCheckpoint(tmp_path, 1).load()
    message = str(error.value)
    assert str(checkpoint.path) in message and str(tmp_path / PREVIOUS_CHECKPOINT_FILE) in message
    assert f"delete them (rm {checkpoint.path} {tmp_path / PREVIOUS_CHECKPOINT_FILE})" in message
    assert "hydra.run.dir=<new dir>" in message
    assert f"{checkpoint.path} is " + ("empty (0 bytes)" if damage == "empty" else "truncated or corrupt: ") in message


def test_a_file_that_is_no_checkpoint_is_reported(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CheckpointUnreadable, match=re.escape(f"{tmp_path / CHECKPOINT_FILE} is not a run checkpoint")):
        RunCheckpoint(tmp_path, 1).load()


def test_a_complete_but_corrupt_archive_names_the_loader_error(tmp_path):
    """A file that is a whole zip archive but no torch checkpoint: the loader's own first sentence is the reason."""
    import zipfile

    with zipfile.ZipFile(tmp_path / CHECKPOINT_FILE, "w") as archive:
        archive.writestr("something/else.txt", "not a checkpoint")
    with pytest.raises(CheckpointUnreadable, match=re.escape(f"{tmp_path / CHECKPOINT_FILE} is corrupt: ")):
        RunCheckpoint(tmp_path, 1).load()


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    import experiments.checkpoint as module
    checkpoint = module.RunCheckpoint(sys.argv[1], 1)
    checkpoint.save(1, {"x": torch.ones(3)})
    checkpoint.save(2, {"x": torch.ones(3) * 2})
    where = sys.argv[2]
    if where == "writing":  # SIGKILL half-way through writing the new file
        def save(obj, handle):
            handle.write(b"PK" * 100)
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        module.torch.save = save
    else:  # SIGKILL after checkpoint.pt was moved to checkpoint.prev.pt, before the new file replaces it
        replace, calls = os.replace, []
        def killing_replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst)
        module.os.replace = killing_replace
    checkpoint.save(3, {"x": torch.ones(3) * 3})
    print("not killed")
""")


@pytest.mark.parametrize("where", ["writing", "renaming"])
def test_a_save_killed_midway_leaves_a_loadable_checkpoint(tmp_path, where, capsys):
    """A real SIGKILL of the saving process at the two points where a save can be cut."""
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path), where], check=False, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -9 and "not killed" not in result.stdout, result.stderr[-2000:]
    state = RunCheckpoint(tmp_path, 1).load()
    if where == "writing":
        assert state["step"] == 2 and capsys.readouterr().err == ""
    else:
        assert not (tmp_path / CHECKPOINT_FILE).exists()
        assert state["step"] == 2
        assert "checkpoint.pt is missing (a save was interrupted): resuming from the previous checkpoint" in \
            capsys.readouterr().err
    checkpoint = RunCheckpoint(tmp_path, 1)
    checkpoint.remove()  # also the killed save's temporary file
    assert list(tmp_path.iterdir()) == []


def test_clear_for_rerun_removes_the_previous_checkpoint_too(tmp_path):
    cfg = compose_config("guidance=sds", *TOY)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    saved_twice(tmp_path)
    clear_for_rerun(tmp_path, resolved, force=False)
    assert (tmp_path / CHECKPOINT_FILE).is_file() and (tmp_path / PREVIOUS_CHECKPOINT_FILE).is_file()
    clear_for_rerun(tmp_path, resolved, force=True)
    assert not (tmp_path / CHECKPOINT_FILE).exists() and not (tmp_path / PREVIOUS_CHECKPOINT_FILE).exists()


class Interrupt(Exception):
    pass


def stop_after_saving(patch, last_step: int) -> None:
    """Make the run stop (raise) right after its checkpoint of ``last_step`` is saved, as a kill would."""
    save = RunCheckpoint.save

    def save_then_stop(self, step, state):
        save(self, step, state)
        if step >= last_step:
            raise Interrupt

    patch.setattr(RunCheckpoint, "save", save_then_stop)


def test_a_run_resumes_from_the_previous_checkpoint_when_the_latest_is_truncated(monkeypatch, tmp_path, capsys):
    """End to end: a toy run stopped after its checkpoints at steps 4 and 8, its checkpoint.pt cut in half, is
    rerun: it resumes from step 4 and ends with the metrics of an uninterrupted run; with both files cut, it
    stops with the clear error and leaves them in place."""
    overrides = ["guidance=sds", "task.steps=12", "task.checkpoint_every=4", *TOY]
    whole = run(compose_config(*overrides), tmp_path / "whole")
    with monkeypatch.context() as patch:
        stop_after_saving(patch, 8)
        with pytest.raises(Interrupt):
            run(compose_config(*overrides), tmp_path / "cut")
    checkpoint = RunCheckpoint(tmp_path / "cut", 4)
    assert torch.load(checkpoint.path, weights_only=True)["step"] == 8
    assert torch.load(checkpoint.previous_path, weights_only=True)["step"] == 4
    truncate(checkpoint.path)
    capsys.readouterr()
    resumed = run(compose_config(*overrides), tmp_path / "cut")
    err = capsys.readouterr().err
    assert f"cannot read the checkpoint {checkpoint.path}: truncated or corrupt" in err
    assert f"resuming from the previous checkpoint {checkpoint.previous_path} (step 4)" in err
    timing = {"seconds", "total_seconds", "ms_per_iter"}
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
    assert not checkpoint.path.exists() and not checkpoint.previous_path.exists()

    with monkeypatch.context() as patch:
        stop_after_saving(patch, 8)
        with pytest.raises(Interrupt):
            run(compose_config(*overrides), tmp_path / "both")
    both = RunCheckpoint(tmp_path / "both", 4)
    truncate(both.path)
    truncate(both.previous_path)
    with pytest.raises(CheckpointUnreadable, match="To start this run over, delete them"):
        run(compose_config(*overrides), tmp_path / "both")
    assert both.path.is_file() and both.previous_path.is_file()

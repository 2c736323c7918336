"""The SLURM launcher config and the sweep presets compose, and the dry run's sbatch script carries every knob a
cluster user sets (no cluster: make test-slurm submits to a real one)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from eval.slurm_dry_run import CONF_DIR, dry_run, sweep_jobs

PRESET_JOBS = {"toy2d_bandwidth": 9, "toy2d_guidance": 12, "text2d_bandwidth": 9, "text2d_guidance": 9,
               "text3d_bandwidth": 6, "text3d_guidance": 9}
"""Each sweep preset and its number of runs (the product of its hydra.sweeper.params)."""

KNOBS = ["hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=240", "hydra.launcher.gpus_per_node=1",
         "hydra.launcher.gres=gpu:a100:1", "hydra.launcher.cpus_per_task=8", "hydra.launcher.mem_gb=32",
         "hydra.launcher.account=mylab", "hydra.launcher.qos=high", "hydra.launcher.array_parallelism=4",
         'hydra.launcher.setup=["module load cuda/12.1","export HF_HOME=/scratch/hf"]',
         "+hydra.launcher.additional_parameters.mail-type=END"]


def sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH ")]


def test_every_preset_is_listed():
    assert sorted(p.stem for p in (CONF_DIR / "sweep").glob("[!_]*.yaml")) == sorted(PRESET_JOBS)


@pytest.mark.parametrize("preset", sorted(PRESET_JOBS))
def test_dry_run_sbatch_carries_every_knob(preset, tmp_path):
    sweep_dir = tmp_path / "sweep"
    text = dry_run([f"sweep={preset}", "hydra/launcher=slurm", *KNOBS, f"hydra.sweep.dir={sweep_dir}"])
    n = PRESET_JOBS[preset]
    flags = sbatch_lines(text)
    for flag in ["--partition=gpu", "--time=240", "--gpus-per-node=1", "--gres=gpu:a100:1", "--cpus-per-task=8",
                 "--mem=32GB", "--account=mylab", "--qos=high", f"--array=0-{n - 1}%4", "--signal=USR2@120",
                 "--mail-type=END", "--job-name=run", f"--output={sweep_dir}/.submitit/%A_%a/%A_%a_0_log.out"]:
        assert f"#SBATCH {flag}" in flags
    lines = text.splitlines()
    setup = lines.index("# setup")
    srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert lines[setup + 1:setup + 3] == ["module load cuda/12.1", "export HF_HOME=/scratch/hf"] and setup < srun
    assert "-u -m submitit.core._submit" in lines[srun]
    tasks = [line for line in lines if re.match(r"# \d+: ", line)]
    assert [line.split(":")[0] for line in tasks] == [f"# {i}" for i in range(n)]
    assert all(f" -> {sweep_dir}/" in line for line in tasks)
    assert not sweep_dir.exists()  # a dry run writes nothing


@pytest.mark.parametrize("preset", sorted(PRESET_JOBS))
def test_preset_composes_its_task(preset):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"sweep={preset}"])
    if preset.startswith("toy2d"):
        assert (cfg.task.name, cfg.guidance.name, cfg.denoiser.name) == ("toy2d", "msd", "exact")
    elif preset.startswith("text2d"):
        assert (cfg.task.name, cfg.prior.name, cfg.guidance.name, cfg.guidance.sampler) == \
            ("text2d", "shapes", "msd", "product_ode")
        assert len(cfg.task.prompts) == 12
    else:
        assert (cfg.task.name, cfg.prior.name, cfg.guidance.name, cfg.guidance.sampler, cfg.guidance.lambda0) == \
            ("text3d", "shapes3d", "msd", "product_ode", 11.4)


def test_launcher_defaults():
    # hydra/launcher=slurm is implied; one run of the preset's grid is enough here
    launcher, _, _ = sweep_jobs(["sweep=toy2d_bandwidth", "guidance.lambda0=0.1", "guidance.lambda_min=0.01"])
    assert launcher["max_num_timeout"] == 3 and launcher["signal_delay_s"] == 120
    flags = sbatch_lines(dry_run(["sweep=toy2d_bandwidth"]))
    assert {"#SBATCH --time=60", "#SBATCH --cpus-per-task=1", "#SBATCH --mem=4GB", "#SBATCH --array=0-8%9"} <= set(flags)
    assert not any(flag.startswith(("#SBATCH --partition", "#SBATCH --account", "#SBATCH --qos", "#SBATCH --gres",
                                    "#SBATCH --gpus")) for flag in flags)


def test_run_dirs_are_deterministic_per_sweep_name():
    _, jobs, run_dirs = sweep_jobs(["sweep=toy2d_bandwidth", "guidance.lambda_min=0.03,0.01", "task.steps=20",
                                    "logger=none"])
    assert len(jobs) == 6 and len(set(run_dirs)) == 6
    assert Path("outputs/sweeps/toy2d_bandwidth/guidance.lambda0=0.1,guidance.lambda_min=0.01,task.steps=20") in run_dirs
    # the same runs in another order, or with another logger, land in the same directories
    _, _, again = sweep_jobs(["sweep=toy2d_bandwidth", "logger=wandb", "task.steps=20", "guidance.lambda_min=0.01,0.03"])
    assert sorted(again) == sorted(run_dirs)
    # a command-line value replaces the preset's axis, a new comma list adds one
    _, jobs, _ = sweep_jobs(["sweep=toy2d_bandwidth", "guidance.lambda0=0.1", "guidance_scale=1,2"])
    assert len(jobs) == 6 and all("guidance.lambda0=0.1" in job for job in jobs)


def test_cluster_user_swaps_in_stable_diffusion():
    _, jobs, run_dirs = sweep_jobs(["sweep=text2d_guidance", "experiment=table4",
                                    "task.eval.inception_path=/models/pt_inception.pt"])
    assert len(jobs) == 9
    assert all(d.parent == Path("outputs/sweeps/text2d_guidance") and "experiment=table4" in d.name for d in run_dirs)


def test_bad_launcher_input_fails_naming_the_field():
    with pytest.raises(ValueError, match="hydra/launcher must be slurm or submitit_slurm"):
        sweep_jobs(["sweep=toy2d_bandwidth", "hydra/launcher=basic"])
    with pytest.raises(ConfigCompositionException, match="hydra.launcher.partiton"):
        sweep_jobs(["sweep=toy2d_bandwidth", "hydra.launcher.partiton=gpu"])
    with pytest.raises(ConfigCompositionException, match="sweep"):
        sweep_jobs(["sweep=nonexistent"])


def test_dry_run_leaves_path_alone():
    path = os.environ["PATH"]
    dry_run(["sweep=toy2d_bandwidth"])
    assert os.environ["PATH"] == path

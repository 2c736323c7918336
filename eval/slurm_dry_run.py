"""Print what a SLURM sweep would submit, without a cluster and without writing anything.

``python -m eval.slurm_dry_run sweep=<preset> [hydra.launcher.<knob>=...] [overrides ...]`` takes the
arguments of ``python -m experiments.run`` (``hydra/launcher=slurm`` is added when no launcher is named)
and prints the sbatch script of the sweep's job array, then one comment line per array task: its overrides
and its run directory.

Jobs are expanded by Hydra's basic sweeper's own ``BasicSweeper.split_arguments`` (``hydra._internal``,
pinned by ``hydra-core==1.3.8``) from ``hydra.sweeper.params`` then the command line (a command-line value
of a swept key replaces the preset's), and each job's config is composed, so a typo fails here as it would
at submission. The launcher's keys take the path of hydra-submitit-launcher 1.2.0's
``BaseSubmititLauncher.launch``: ``submitit.AutoExecutor(cluster="slurm")`` and its ``update_parameters``
(submitit's renaming and checks). The script itself comes from ``submitit.slurm.slurm._make_sbatch_string``,
the function submitit's array submission calls: submitit has no public dry run, so this one private name is
pinned by the ``slurm`` extra (submitit==1.5.4) and exercised by tests/test_slurm_config.py.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from msd.checks import require

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
JOB_NAME = "run"
"""``hydra.job.name`` of ``python -m experiments.run`` (the launcher's default ``--job-name``)."""
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def _compose(overrides: list[str]) -> DictConfig:
    cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} (the sweep dir names the preset)
    return cfg


def sweep_jobs(overrides: list[str]) -> tuple[DictConfig, list[list[str]], list[Path]]:
    """The sweep's launcher config, each job's overrides (array task order) and each job's run directory."""
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    hydra_overrides = [o.input_line for o in parsed if o.is_hydra_override()]
    if not any(o.key_or_group == "hydra/launcher" for o in parsed):
        hydra_overrides.insert(0, "hydra/launcher=slurm")
    task_overrides = [o.input_line for o in parsed if not o.is_hydra_override()]
    fixed = [o.input_line for o in parsed if not o.is_hydra_override() and not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=JOB_NAME):
        master = _compose(hydra_overrides + fixed)
        launcher_choice = master.hydra.runtime.choices["hydra/launcher"]
        require(master.hydra.launcher.get("_target_") == SLURM_LAUNCHER, "hydra/launcher",
                "slurm or submitit_slurm (a SLURM launcher)", launcher_choice)
        launcher = OmegaConf.to_container(master.hydra.launcher, resolve=True)
        params = [f"{key}={value}" for key, value in (master.hydra.sweeper.params or {}).items()]
        [jobs] = BasicSweeper.split_arguments(parser.parse_overrides(params + task_overrides), None)
        run_dirs = []
        for job in jobs:
            cfg = _compose(hydra_overrides + job)
            run_dirs.append(Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir))
    return launcher, jobs, run_dirs


@contextmanager
def _srun_on_path() -> Iterator[None]:
    """submitit's SlurmExecutor refuses to be built without ``srun`` on PATH (``SlurmExecutor.__init__``).
    Off a cluster a stub stands in while the executor is built; nothing calls it."""
    if shutil.which("srun") is not None:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="msd-dry-run-") as stub_dir:
        stub = Path(stub_dir) / "srun"
        stub.write_text("#!/bin/sh\necho 'eval.slurm_dry_run: stub srun, not a SLURM cluster' >&2\nexit 1\n")
        stub.chmod(0o755)
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = stub_dir + os.pathsep + path
        try:
            yield
        finally:
            os.environ["PATH"] = path


def sbatch_script(launcher: dict, num_jobs: int) -> str:
    """The sbatch script hydra-submitit-launcher submits for a sweep of ``num_jobs`` runs (one job array)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.slurm import _make_sbatch_string

    require(num_jobs >= 1, "the sweep's number of jobs", ">= 1", num_jobs)
    params = {key: value for key, value in launcher.items() if key != "_target_"}
    folder, max_num_timeout = params.pop("submitit_folder"), params.pop("max_num_timeout")
    with _srun_on_path():
        executor = submitit.AutoExecutor(cluster="slurm", folder=folder, slurm_max_num_timeout=max_num_timeout)
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{key if key in generic else f"slurm_{key}": value for key, value in params.items()})
    # SlurmExecutor._submitit_command_str: the command every array task runs
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(executor.folder))])
    return _make_sbatch_string(command=command, folder=executor.folder, map_count=num_jobs, **executor.parameters)


def dry_run(overrides: list[str]) -> str:
    """The sbatch script of the sweep ``overrides`` describe, then ``# <task>: <overrides> -> <run dir>`` lines."""
    launcher, jobs, run_dirs = sweep_jobs(overrides)
    lines = [sbatch_script(launcher, len(jobs)).rstrip("\n"), "",
             f"# dry run: {len(jobs)} array task(s); task: overrides -> run directory"]
    lines += [f"# {task}: {' '.join(job)} -> {run_dir}" for task, (job, run_dir) in enumerate(zip(jobs, run_dirs))]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(dry_run(sys.argv[1:]))

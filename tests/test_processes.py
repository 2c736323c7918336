"""The reproduce scripts' worker pool: an in-worker run equals the CLI run of the same overrides, and a
failing run is reported by its command after the others finished."""
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from eval.processes import run_in_workers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = ["experiment=toy2d", "task.grid_size=6", "task.steps=4", "task.solver_steps=3", "task.eval.n_reference=2000",
        "task.figure.resolution=16", "task.progress_bar=false", "logger=none"]


@pytest.mark.slow  # a worker pool of two processes and a CLI process
def test_worker_runs_equal_cli_runs_and_failures_are_reported(tmp_path):
    jobs = [([*TINY, "guidance=msd"], tmp_path / "msd"), ([*TINY, "guidance=sds"], tmp_path / "sds"),
            ([*TINY, "guidance=sds", "guidance.weighting=bogus"], tmp_path / "bad")]
    with pytest.raises(RuntimeError, match=r"runs failed:\n-m experiments.run .*guidance.weighting=bogus"):
        run_in_workers(jobs, workers=2)
    cli = subprocess.run([sys.executable, "-m", "experiments.run", *TINY, "guidance=msd",
                          f"hydra.run.dir={tmp_path / 'cli'}"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    with np.load(tmp_path / "msd" / "particles.npz") as a, np.load(tmp_path / "cli" / "particles.npz") as b:
        assert np.array_equal(a["particles"], b["particles"]) and np.array_equal(a["trajectory"], b["trajectory"])
    assert json.loads((tmp_path / "sds" / "final.json").read_text())["method"] == "sds"
    assert not (tmp_path / "bad" / "final.json").exists()


def test_worker_count_is_checked():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        run_in_workers([], workers=0)

"""Sweep aggregation on a real (tiny) Hydra multirun of a sweep preset: one row per run with the swept keys
and the final metrics, heat maps, and a clear failure when runs are missing."""
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from eval.sweeps import DEFAULT_METRICS, sweep_table, write_sweep  # noqa: E402

pytestmark = pytest.mark.slow  # every test reads the sweep_dir fixture: a 4-run Hydra multirun in a CLI process

REPO = Path(__file__).resolve().parent.parent
TINY = ["task.grid_size=8", "task.steps=6", "task.solver_steps=4", "task.eval.n_reference=2000",
        "task.figure.resolution=16", "task.progress_bar=false", "logger=none"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """sweep=toy2d_bandwidth with its axes replaced on the command line: 2 lambda0 x 2 lambda_min."""
    root = tmp_path_factory.mktemp("sweep") / "toy"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "experiments.run", "sweep=toy2d_bandwidth",
                             "guidance.lambda0=0.1,1.0", "guidance.lambda_min=0.01,0.03", *TINY,
                             f"hydra.sweep.dir={root}"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


def test_table_has_one_row_per_run_with_swept_keys_and_final_metrics(sweep_dir, tmp_path):
    table = write_sweep(sweep_dir, "toy", tmp_path, expect=4, metrics=None)
    assert len(table) == 4
    assert sorted(zip(table["guidance.lambda0"], table["guidance.lambda_min"])) == \
        [(0.1, 0.01), (0.1, 0.03), (1.0, 0.01), (1.0, 0.03)]
    for _, row in table.iterrows():
        final = json.loads((sweep_dir / row["run_dir"] / "final.json").read_text())
        assert row["nll"] == final["nll"] and row["in_hdr"] == final["in_hdr"] and row["method"] == "msd"
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and row["mode_distance"] >= 0
    assert "task.grid_size" in table.attrs["config_columns"]  # set on the command line of every run
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "toy.csv"), table.reset_index(drop=True),
                                  check_dtype=False, check_exact=False)
    for metric in DEFAULT_METRICS["toy2d"]:
        assert (tmp_path / f"toy_{metric}.png").stat().st_size > 0


def test_missing_runs_and_bad_metrics_fail_before_writing(sweep_dir, tmp_path):
    with pytest.raises(RuntimeError, match="4 finished runs, expected 5"):
        sweep_table(sweep_dir, expect=5)
    with pytest.raises(ValueError, match="--metrics must name numeric columns"):
        write_sweep(sweep_dir, "toy", tmp_path, expect=4, metrics=["bogus"])
    with pytest.raises(ValueError, match="--x must be a column"):
        write_sweep(sweep_dir, "toy", tmp_path, expect=4, metrics=None, x="guidance.nope")
    assert not list(tmp_path.iterdir())


def test_an_unfinished_run_is_named(sweep_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy)
    unfinished = sorted(copy.glob("*/final.json"))[0]
    unfinished.unlink()
    with pytest.raises(RuntimeError, match=unfinished.parent.name.replace(".", r"\.")):
        sweep_table(copy, expect=4)
    assert len(sweep_table(copy)) == 3

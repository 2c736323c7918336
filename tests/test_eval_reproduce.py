"""The reproduce script (tiny grid through the Hydra app), its tables and figure, and the atomic writers."""
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from eval.figures import find_runs  # noqa: E402
from eval.io import write_text  # noqa: E402
from eval.reproduce_toy2d import settings  # noqa: E402
from eval.toy2d_figures import build_all  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = ["task.grid_size=6", "task.steps=2", "task.solver_steps=3", "task.eval.n_reference=2000",
        "task.figure.resolution=16", "task.progress_bar=false", "logger=none"]


def reproduce(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "eval.reproduce_toy2d", "--runs-dir", str(tmp / "runs"),
               "--results-dir", str(tmp / "results"), "--methods", "ddim,msd", "--denoisers", "learned", *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    return tmp, reproduce(tmp, *TINY)


def test_grid_settings_follow_edm2_scales():
    assert settings(["exact", "learned"]) == [
        ("exact", "cfg", 1.0), ("exact", "cfg", 4.0),
        ("learned", "cfg", 1.0), ("learned", "cfg", 4.0), ("learned", "autoguidance", 3.0)]


def test_reproduce_writes_tables_and_figure_from_run_dirs(grid):
    tmp, result = grid
    assert "total wall time" in result.stdout and result.stdout.count("+ -m experiments.run") == 6
    table = pd.read_csv(tmp / "results" / "metrics.csv")
    expected = {"method", "denoiser", "guide", "guidance_scale", "nll", "in_hdr", "nll_median", "steps", "seconds",
                "precision", "recall", "mmd", "mode_distance"}
    assert expected <= set(table.columns) and len(table) == 6
    assert table[["precision", "recall"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (table["mmd"] >= 0).all() and (table["mode_distance"] > 0).all()
    assert list(table["method"]) == ["ddim", "msd"] * 3
    assert list(zip(table["guide"], table["guidance_scale"]))[::2] == [("none", 1.0), ("cfg", 4.0),
                                                                       ("autoguidance", 3.0)]
    markdown = (tmp / "results" / "metrics.md").read_text()
    assert markdown.count("\n| ") == 7  # header + 6 rows
    assert "| precision | recall | mmd | mode_distance |" in markdown
    assert (tmp / "results" / "figure_grid.png").stat().st_size > 10_000
    runs = find_runs(tmp / "runs")
    assert len(runs) == 6 and all((r.path / "config.yaml").is_file() for r in runs)
    assert all((r.path / "mode_metrics.json").is_file() for r in runs)  # cached for the next aggregation
    built = build_all(tmp / "runs", tmp / "no_studies", tmp / "redrawn")
    assert built["figure_grid.png"] == tmp / "runs" and built["gradient_quality.png"] is None
    assert (tmp / "redrawn" / "figure_grid.png").stat().st_size > 10_000


def test_reproduce_reuses_finished_runs_with_the_same_config(grid):
    tmp, _ = grid
    cached = {p: p.stat().st_mtime_ns for p in (tmp / "runs").rglob("mode_metrics.json")}
    again = reproduce(tmp, *TINY)
    assert again.stdout.count("reusing finished runs") == 3 and "+ -m experiments.run" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp / "runs").rglob("mode_metrics.json")} == cached


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "table.md"
    write_text(target, "old\n")
    with pytest.raises(TypeError):
        write_text(target, 123)  # fails inside the temporary file
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["table.md"]

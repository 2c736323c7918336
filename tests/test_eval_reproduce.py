"""The reproduce script (tiny grid through the Hydra app), its tables and figure, and the atomic writers."""
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from eval.reproduce_toy2d import main, settings, write_results  # noqa: E402
from eval.toy2d_figures import RESULTS_DIR, RUNS_DIR, build_all, dataset_results_dir, dataset_runs_dir  # noqa: E402
from experiments.figures import find_runs  # noqa: E402
from experiments.io import write_text  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = ["task.grid_size=6", "task.steps=2", "task.solver_steps=3", "task.eval.n_reference=2000",
        "task.figure.resolution=16", "task.progress_bar=false", "logger=none"]


def reproduce(tmp: Path, *args: str, runs: str = "runs", results: str = "results", methods: str = "ddim,msd",
              denoisers: str = "learned") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "eval.reproduce_toy2d", "--runs-dir", str(tmp / runs),
               "--results-dir", str(tmp / results), "--methods", methods, "--denoisers", denoisers, *args]
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


@pytest.mark.slow  # the grid fixture: the script in a process of its own, 6 runs
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


@pytest.mark.slow  # the script again, in a process
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


# The spiral grid (--dataset spiral): no CFG rows; results of its own.
SPIRAL_TINY = ["task.grid_size=4", *TINY[1:]]
SPIRAL_METHODS = "ddim,sds,msd_exact"


@pytest.fixture(scope="module")
def spiral_grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spiral")
    result = reproduce(tmp, "--dataset", "spiral", *SPIRAL_TINY, runs="runs_spiral", results="results/spiral",
                       methods=SPIRAL_METHODS, denoisers="exact,learned")
    return tmp, result


def test_dataset_grid_settings_have_no_cfg_row():
    for dataset in ("spiral", "pinwheel"):
        assert settings(["exact", "learned"], dataset) == [
            ("exact", "cfg", 1.0), ("learned", "cfg", 1.0), ("learned", "autoguidance", 3.0)]
    assert settings(["exact", "learned"], "fractal") == settings(["exact", "learned"])


def test_dataset_grid_default_directories():
    assert dataset_runs_dir(RUNS_DIR, "fractal") == REPO / "outputs" / "toy2d_grid"
    assert dataset_runs_dir(RUNS_DIR, "spiral") == REPO / "outputs" / "toy2d_grid_spiral"
    assert dataset_results_dir(RESULTS_DIR, "fractal") == REPO / "results" / "toy2d"
    assert dataset_results_dir(RESULTS_DIR, "pinwheel") == REPO / "results" / "toy2d" / "pinwheel"


def test_bad_dataset_fails_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as error:
        main(["--dataset", "moons"])
    assert error.value.code == 2
    message = capsys.readouterr().err
    assert "--dataset" in message and "'moons'" in message
    assert all(name in message for name in ("fractal", "spiral", "pinwheel"))
    with pytest.raises(SystemExit):
        main(["--dataset", "spiral", "task.dataset=pinwheel"])
    assert "--dataset" in capsys.readouterr().err


@pytest.mark.slow  # the spiral_grid fixture: the script in a process of its own, 7 runs
def test_spiral_grid_tables_figure_and_runs(spiral_grid):
    tmp, result = spiral_grid
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ -m experiments.run")]
    assert len(commands) == 7 and all(" task.dataset=spiral " in c for c in commands)
    assert all(" guidance_scale=4 " not in c for c in commands)
    table = pd.read_csv(tmp / "results" / "spiral" / "metrics.csv")
    assert list(zip(table["method"], table["denoiser"], table["guide"], table["guidance_scale"])) == [
        ("ddim", "exact", "none", 1.0), ("sds", "exact", "none", 1.0), ("msd_exact", "exact", "none", 1.0),
        ("ddim", "learned", "none", 1.0), ("sds", "learned", "none", 1.0),
        ("ddim", "learned", "autoguidance", 3.0), ("sds", "learned", "autoguidance", 3.0)]
    assert "cfg" not in set(table["guide"])
    assert table[["precision", "recall"]].apply(lambda c: c.between(0, 1)).all().all()
    runs = find_runs(tmp / "runs_spiral")
    assert len(runs) == 7 and {r.config.task.dataset for r in runs} == {"spiral"}
    markdown = (tmp / "results" / "spiral" / "metrics.md").read_text()
    assert markdown.startswith("# Toy 2D, spiral: particles vs the exact spiral density")
    assert "nearest of the 64 modes of p ∗ G_λ" in markdown and "spiral_weak" in markdown
    assert "p_A" not in markdown and "class-A" not in markdown and "class-AB" not in markdown
    assert markdown.count("\n| ") == 8  # header + 7 rows
    assert (tmp / "results" / "spiral" / "figure_grid.png").stat().st_size > 10_000
    built = build_all(tmp / "runs", tmp / "no_studies", tmp / "redrawn")  # the fractal's runs dir is absent
    assert built["figure_grid.png"] is None and built["spiral/figure_grid.png"] == tmp / "runs_spiral"
    assert built["pinwheel/figure_grid.png"] is None
    assert (tmp / "redrawn" / "spiral" / "figure_grid.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match=r"--dataset pinwheel: the runs under .* are of task.dataset \['spiral'\]"):
        write_results(tmp / "runs_spiral", tmp / "elsewhere", "pinwheel")


def test_readme_links_the_generated_tables():
    """The reproduce scripts write their tables into results/ only; the README links each generated file (it shows
    a copy, updated by hand) and keeps no generated-block markers."""
    readme = (REPO / "README.md").read_text()
    for table in ("results/toy2d/metrics.md", "results/toy2d/spiral/metrics.md", "results/toy2d/pinwheel/metrics.md",
                  "results/table4/shapes/table4.md"):
        assert f"]({table})" in readme and (REPO / table).is_file(), table
    assert "-table:start -->" not in readme and "table4-shapes:start" not in readme

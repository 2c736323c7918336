"""``eval.reproduce_table4`` end to end on a tiny random pixel prior with an untrained ShapesWorld classifier (the
plumbing, not the numbers): the six runs, their reuse, the CSV / Markdown table / figures, the figure builder,
the README block, and the fail-fast exits of the Stable Diffusion protocol."""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from eval.io import replace_block  # noqa: E402
from eval.reproduce_table4 import GUIDANCES, main  # noqa: E402
from eval.table4_figures import build_all  # noqa: E402
from tests.tiny_sd import build_tiny_prior, build_tiny_shapes_prior  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
METHODS = ["ddim", "sds", "vsd", "sdi", "msd_stable", "msd_ode"]
FIGURES = {"fid_vs_iter.png", "fid_vs_compute.png", *(f"images_{m}.png" for m in METHODS)}


def reproduce(tmp: Path, *args: str) -> str:
    """The script in this process (its runs are subprocesses); returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["--runs-dir", str(tmp / "runs"), "--results-dir", str(tmp / "results"), *args])
    return printed.getvalue()


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """The whole table on a tiny prior: 2 prompts × 2 images, 2 iterations, 2-step samplers."""
    tmp = tmp_path_factory.mktemp("table4")
    prior, classifier = build_tiny_shapes_prior(tmp)
    tiny = [f"prior.path={prior}", f"prior.classifier={classifier}",
            'task.prompts=["a red circle","a blue square"]', "task.images_per_prompt=2", "task.steps=2",
            "task.eval.every=1", "task.eval.reference_per_prompt=2", "task.eval.reference_steps=2",
            "task.solver_steps=2", f"task.eval.cache_dir={tmp / 'cache'}", "logger=none"]
    return tmp, tiny, reproduce(tmp, "--prior", "shapes", *tiny)


def test_table_writes_curves_markdown_and_figures(table):
    tmp, _, printed = table
    assert printed.count("+ -m experiments.run") == 6 and "total wall time" in printed
    assert sorted(p.name for p in (tmp / "runs").iterdir()) == sorted(METHODS)  # no W&B summary when disabled
    curves = pd.read_csv(tmp / "results" / "fid_vs_iter.csv")
    assert {"method", "iteration", "unet_evals", "fid", "fid_true", "prompt_accuracy", "mode_distance",
            "ms_per_iter"} <= set(curves.columns)
    assert list(dict.fromkeys(curves.method)) == METHODS
    assert list(curves[curves.method == "sds"].iteration) == [0, 1, 2]
    assert list(curves[curves.method == "ddim"].iteration) == [50]  # one row at the sampler's steps
    assert (curves.fid >= 0).all() and curves.groupby("method").unet_evals.apply(
        lambda evals: evals.is_monotonic_increasing).all()
    markdown = (tmp / "results" / "table4.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0][2:] for row in rows[1:]] == METHODS  # header + one row per method
    assert "| method | FID vs DDIM | FID vs true renders | prompt accuracy | mode-alignment distance |" in markdown
    assert "2 prompts × 2 images per prompt; 2 Adam iterations" in markdown and "2 × 2 = 4 images" in markdown
    assert {p.name for p in (tmp / "results").glob("*.png")} == FIGURES
    assert all((tmp / "results" / name).stat().st_size > 1000 for name in FIGURES)


def test_finished_runs_are_reused(table):
    tmp, tiny, _ = table
    stamps = {m: (tmp / "runs" / m / "final.json").stat().st_mtime_ns for m in METHODS}
    again = reproduce(tmp, "--prior", "shapes", *tiny)
    assert "+ -m experiments.run" not in again and f"reusing finished runs {METHODS}" in again
    assert {m: (tmp / "runs" / m / "final.json").stat().st_mtime_ns for m in METHODS} == stamps


def test_figure_builder_redraws_from_run_dirs_alone(table):
    tmp, _, _ = table
    assert set(build_all(tmp / "runs", tmp / "redrawn")) == FIGURES
    assert all((tmp / "redrawn" / name).stat().st_size > 1000 for name in FIGURES)


def test_final_json_names_every_method(table):
    tmp, _, _ = table
    assert {json.loads((tmp / "runs" / m / "final.json").read_text())["method"] for m in METHODS} == set(GUIDANCES)


def test_sd21_without_weights_exits_at_once_and_writes_nothing(tmp_path):
    """In a subprocess: the Hugging Face cache location is read when huggingface_hub is imported."""
    command = [sys.executable, "-m", "eval.reproduce_table4", "--prior", "sd21", "--runs-dir", str(tmp_path / "runs"),
               "--results-dir", str(tmp_path / "results")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty_cache")}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert "stabilityai/stable-diffusion-2-1-base" in result.stderr and "hf download" in result.stderr
    assert "experiments.run" not in result.stdout and not (tmp_path / "runs").exists()
    assert not (tmp_path / "results").exists()


def test_inception_features_need_a_path(tmp_path, capsys):
    prior = build_tiny_prior(tmp_path / "latent_prior", latent=True)
    with pytest.raises(SystemExit) as exit_info:
        reproduce(tmp_path, "--prior", "sd21", f"prior.path={prior}")
    assert exit_info.value.code == 2 and "task.eval.inception_path" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_readme_block_is_replaced_between_markers(tmp_path):
    markers = ("<!-- a:start -->", "<!-- a:end -->")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{markers[0]}\nold\n{markers[1]}\noutro\n")
    replace_block(readme, markers, "new\n")
    assert readme.read_text() == f"intro\n{markers[0]}\nnew\n{markers[1]}\noutro\n"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="lacks the marker"):
        replace_block(readme, markers, "new\n")

"""``eval.reproduce_table4``'s multi-seed protocol: the aggregation over seeds on synthetic run directories (mean ±
std, where the seed-mean FID first reaches SDS's final FID, the per-iteration metrics.csv rows without evaluation
metrics left out of the curves), the protocol check, the run plan and its order, and the pipeline end to end on a
tiny random pixel prior with an untrained ShapesWorld classifier (the plumbing, not the numbers; its runs in this
process), plus the fail-fast exits of the Stable Diffusion protocol."""
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import eval.reproduce_table4 as table4  # noqa: E402
from eval.processes import compose_run_config  # noqa: E402
from eval.reproduce_table4 import (  # noqa: E402
    COST_ORDER,
    GUIDANCES,
    SEEDS,
    check_protocol,
    curves_table,
    main,
    parse_seeds,
    reaches_target,
    run_plan,
    write_results,
)
from eval.table4_figures import build_all, find_table4_runs, seed_curve  # noqa: E402
from experiments.builders import method_label  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# --- synthetic run directories ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_config():
    """The ShapesWorld protocol's resolved config (the synthetic runs' config.yaml, seed and guidance aside)."""
    return OmegaConf.to_container(compose_run_config(["experiment=table4_shapes", "guidance=t2d_sds", "logger=none"]),
                                  resolve=True)


def write_run(runs_dir: Path, config: dict, method: str, seed: int, fids: dict[int, float], evals_per_iter: float,
              every: int = 10, **config_changes) -> Path:
    """A finished run directory as experiments.text2d writes it: one metrics.csv row per iteration (loss,
    grad_norm), FID only on the evaluation rows ``fids`` {iteration: FID}; final.json from the last row."""
    config = json.loads(json.dumps(config))
    config["seed"] = seed
    config["guidance"] = {"name": method}
    for dotted, value in config_changes.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[leaf] = value
    run_dir = runs_dir / method / f"seed{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
    last = max(fids)
    rows = [{"iteration": i, "unet_evals": evals_per_iter * i, "loss": 1.0 / (i + 1) + seed, "grad_norm": 2.0 + seed,
             "fid": fids.get(i, np.nan), "fid_true": fids[i] * 2 if i in fids else np.nan,
             "prompt_accuracy": 0.5 if i in fids else np.nan} for i in range(last + 1)]
    if method == "ddim":  # one row at the sampler's steps
        rows = [{"iteration": last, "unet_evals": evals_per_iter * last, "fid": fids[last], "fid_true": 2 * fids[last],
                 "prompt_accuracy": 0.8}]
    pd.DataFrame(rows).to_csv(run_dir / "metrics.csv", index=False)
    final = {"method": method, "prior": "shapes", "guidance_scale": 4.0, "seed": seed, "fid": fids[last],
             "fid_true": 2 * fids[last], "prompt_accuracy": rows[-1]["prompt_accuracy"],
             "kid": fids[last] / 100, "kid_std": 7.0 + seed,  # KID and its std over subsets (made up)
             "unet_evals": evals_per_iter * last, "iterations": last, "unet_evals_per_iter": evals_per_iter,
             "ms_per_iter": 10.0 + seed, "seconds": 1.0, "images": 4, "total_seconds": 2.0}
    (run_dir / "final.json").write_text(json.dumps(final))
    np.savez(run_dir / "images.npz", images=np.zeros((4, 3, 8, 8), np.float32),
             prompts=np.array(["a red circle"] * 2 + ["a blue square"] * 2))
    return run_dir


SDS_FINAL = {0: 100.0, 1: 120.0, 2: 110.0}  # SDS's final FID per seed: mean 110
CURVES = {  # method → seed → {iteration: FID}
    "sds": {s: {0: 400.0, 10: 200.0 + s, 20: 150.0, 30: f} for s, f in SDS_FINAL.items()},
    "msd": {0: {0: 400.0, 10: 160.0, 20: 100.0, 30: 90.0}, 1: {0: 400.0, 10: 140.0, 20: 116.0, 30: 80.0}},
    "vsd": {0: {0: 400.0, 10: 300.0, 20: 250.0, 30: 200.0}},
    "ddim": {s: {50: 20.0 + 2 * s} for s in range(3)},
}
EVALS = {"sds": 2.0, "msd": 40.0, "vsd": 4.0, "ddim": 2.0}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, base_config):
    """The runs of CURVES and their results (written once): (runs dir, results dir)."""
    tmp = tmp_path_factory.mktemp("synthetic")
    for method, seeds in CURVES.items():
        for seed, fids in seeds.items():
            write_run(tmp / "runs", base_config, method, seed, fids, EVALS[method])
    write_results("shapes", tmp / "runs", tmp / "results")
    return tmp / "runs", tmp / "results"


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:])}


def test_table_is_mean_and_std_over_seeds(synthetic, tmp_path):
    runs_dir, results = synthetic
    rows = table_rows((results / "table4.md").read_text())
    assert list(rows) == ["ddim", "sds", "vsd", "msd"]  # the table's method order
    sds = list(SDS_FINAL.values())
    assert rows["sds"]["FID vs DDIM"] == f"{statistics.mean(sds):.2f} ± {statistics.stdev(sds):.2f}"
    assert rows["sds"]["FID vs true renders"] == f"{2 * statistics.mean(sds):.2f} ± {2 * statistics.stdev(sds):.2f}"
    assert rows["sds"]["ms / iter"] == f"{statistics.mean([10, 11, 12]):.1f} ± {statistics.stdev([10, 11, 12]):.1f}"
    assert rows["ddim"]["FID vs DDIM"] == f"{statistics.mean([20, 22, 24]):.2f} ± {statistics.stdev([20, 22, 24]):.2f}"
    kid = [f / 100 for f in sds]  # KID: ± its std over seeds; the subset-std column is the mean of the runs' std
    assert rows["sds"]["KID vs DDIM"] == f"{statistics.mean(kid):.4f} ± {statistics.stdev(kid):.4f}"
    assert rows["sds"]["KID std (subsets)"] == f"{statistics.mean([7.0, 8.0, 9.0]):.4f}"
    assert rows["vsd"]["FID vs DDIM"] == "200.00"  # one seed: no ±
    assert rows["sds"]["iterations"] == "30" and rows["sds"]["UNet evals / iter"] == "2.0"  # equal over seeds
    assert {m: rows[m]["seeds"] for m in rows} == {"ddim": "3", "sds": "3", "vsd": "1", "msd": "2"}
    figures = {p.name for p in results.glob("*.png")}
    assert figures == {"fid_vs_iter.png", "fid_vs_compute.png", "loss_vs_iter.png",
                       *(f"images_{m}.png" for m in CURVES)}
    assert set(build_all(runs_dir, tmp_path / "redrawn")) == figures


def test_iteration_reaching_sds_final_fid(synthetic):
    """SDS's final mean FID is 110; MSD's seed-mean curve is 400, 150, 108, 85: it reaches 110 at iteration 20
    (40 UNet evaluations per iteration → 800); VSD never does; SDS itself only at its last evaluation."""
    runs_dir, results = synthetic
    runs = find_table4_runs(runs_dir)
    msd = seed_curve([run for run in runs if run.method == "msd"], "fid")
    assert list(msd["mean"]) == [400.0, 150.0, 108.0, 85.0]
    assert reaches_target(msd, 110.0) == (20, 800.0)
    assert reaches_target(msd, 50.0) is None
    rows = table_rows((results / "table4.md").read_text())
    reach, evals = table4.REACH_HEADERS
    assert (rows["msd"][reach], rows["msd"][evals]) == ("20", "800")
    assert (rows["sds"][reach], rows["sds"][evals]) == ("30", "60")
    assert rows["vsd"][reach] == rows["vsd"][evals] == "not reached"
    assert rows["ddim"][reach] == "–"
    assert "SDS's final mean FID (110.00)" in (results / "table4.md").read_text()


def test_curves_keep_only_the_evaluation_rows(synthetic):
    runs_dir, results = synthetic
    runs = find_table4_runs(runs_dir)
    sds0 = next(run for run in runs if (run.method, run.seed) == ("sds", 0))
    assert len(sds0.metrics) == 31 and list(sds0.curve.iteration) == [0, 10, 20, 30]
    curves = pd.read_csv(results / "fid_vs_iter.csv")
    assert list(curves.columns[:3]) == ["method", "seed", "iteration"] and curves.fid.notna().all()
    assert len(curves) == sum(len(fids) for seeds in CURVES.values() for fids in seeds.values())
    assert list(curves[(curves.method == "msd") & (curves.seed == 1)].iteration) == [0, 10, 20, 30]
    loss = seed_curve([run for run in runs if run.method == "sds"], "loss", rows="all")
    assert len(loss) == 31 and loss["mean"].iloc[0] == pytest.approx(statistics.mean([1, 2, 3]))
    assert list(curves_table(runs).columns) == list(curves.columns)


def test_protocol_allows_different_seeds_but_nothing_else(tmp_path, base_config):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir, base_config, "sds", 0, {0: 9.0, 10: 5.0}, 2.0)
    write_run(runs_dir, base_config, "sds", 1, {0: 9.0, 10: 6.0}, 2.0)
    write_run(runs_dir, base_config, "msd", 0, {0: 9.0, 10: 4.0}, 2.0)
    assert check_protocol(find_table4_runs(runs_dir)).task.steps == base_config["task"]["steps"]
    write_run(runs_dir, base_config, "vsd", 0, {0: 9.0, 10: 5.0}, 2.0, **{"task.steps": 7})
    with pytest.raises(ValueError, match="differ in 'task'"):
        check_protocol(find_table4_runs(runs_dir))
    runs_dir = tmp_path / "runs2"
    write_run(runs_dir, base_config, "sds", 0, {0: 9.0, 10: 5.0}, 2.0)
    write_run(runs_dir, base_config, "sds", 1, {0: 9.0, 10: 5.0}, 2.0, **{"guidance.lambda0": 2.0})
    with pytest.raises(ValueError, match="differ in more than their seed"):
        check_protocol(find_table4_runs(runs_dir))


def test_run_directory_must_match_the_method_it_holds(tmp_path, base_config):
    run_dir = write_run(tmp_path / "runs", base_config, "msd", 0, {0: 9.0}, 2.0)
    final = json.loads((run_dir / "final.json").read_text())
    (run_dir / "final.json").write_text(json.dumps({**final, "method": "msd_stable"}))
    with pytest.raises(ValueError, match="did a preset's label change"):
        find_table4_runs(tmp_path / "runs")


# --- the seed plan and the order of the runs ---------------------------------------------------------------------

def test_seed_rule_and_overrides():
    assert set(SEEDS.values()) == {3} and list(SEEDS) == list(GUIDANCES)
    seeds = parse_seeds(["sdi=2", "msd=2"], SEEDS)
    assert seeds == {**SEEDS, "sdi": 2, "msd": 2}
    assert run_plan(parse_seeds(["vsd=0"], dict.fromkeys(GUIDANCES, 1))) == [(m, 0) for m in GUIDANCES if m != "vsd"]
    for bad in (["nope=2"], ["sds=x"], ["ddim=0"]):
        with pytest.raises(ValueError):
            parse_seeds(bad, SEEDS)
    with pytest.raises(SystemExit):
        main(["--seeds", "task.steps=3"])
    with pytest.raises(SystemExit):
        main(["seed=3"])


def test_reference_seed0_runs_first_alone_then_longest_first(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(table4, "is_done", lambda run_dir, overrides: run_dir.name == "seed2")
    monkeypatch.setattr(table4, "prepare_rerun", lambda run_dir, overrides, force: None)
    monkeypatch.setattr(table4, "run_processes", lambda commands, workers: calls.append((commands, workers)))
    ran = table4.run_table("shapes", tmp_path, ["task.steps=3"], False, 2, run_plan(SEEDS))
    assert len(ran) == 2 * len(GUIDANCES)  # seed 2 of every method is reused
    (first, one), (others, workers) = calls
    assert one == 1 and len(first) == 1 and workers == 2
    assert first[0][-3:] == ["task.steps=3", "seed=0", f"hydra.run.dir={tmp_path / 'ddim' / 'seed0'}"]
    assert "guidance=t2d_ddim" in first[0]
    order = [(Path(c[-1].split("=", 1)[1]).parent.name, c[-2]) for c in others]
    assert order == [(m, f"seed={s}") for m in COST_ORDER for s in (0, 1) if (m, s) != ("ddim", 0)]


def test_presets_are_labelled_as_their_rows():
    """Each row's preset runs under that row's label (final.json ``method``)."""
    for method, preset in GUIDANCES.items():
        assert method_label(compose_run_config(["experiment=table4_shapes", f"guidance={preset}"]).guidance) == method


# --- end to end on a tiny prior ------------------------------------------------------------------------------------

def run_in_process(commands: list[list[str]], workers: int) -> None:
    """``run_processes`` without the subprocesses: each ``python -m experiments.run <overrides> hydra.run.dir=<d>``
    in this process, in order (saves the imports; the subprocess runner is the one it always was)."""
    from experiments.run import run

    for command in commands:
        print("+", " ".join(command[1:]), flush=True)
        run(compose_run_config(command[3:-1]), Path(command[-1].split("=", 1)[1]))


def reproduce(tmp: Path, *args: str) -> str:
    """The script in this process; returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["--runs-dir", str(tmp / "runs"), "--results-dir", str(tmp / "results"), *args])
    return printed.getvalue()


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory, tiny_shapes_prior):
    """DDIM seed 0 and SDS seeds 0, 1 on a tiny prior: 2 prompts × 1 image, 3 iterations, FID every 2."""
    tmp = tmp_path_factory.mktemp("table4")
    prior, classifier = tiny_shapes_prior
    tiny = [f"prior.path={prior}", f"prior.classifier={classifier}", 'task.prompts=["a red circle","a blue square"]',
            "task.images_per_prompt=1", "task.steps=3", "task.eval.every=2", "task.eval.reference_per_prompt=2",
            "task.eval.reference_steps=2", "task.solver_steps=2", f"task.eval.cache_dir={tmp / 'cache'}",
            "task.eval.mode_distance=false", "logger=none"]
    seeds = ["--seeds", *(f"{m}=0" for m in GUIDANCES if m not in ("ddim", "sds")), "ddim=1", "sds=2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(table4, "run_processes", run_in_process)
        printed = reproduce(tmp, "--prior", "shapes", *tiny, *seeds)
        again = reproduce(tmp, "--prior", "shapes", *tiny, *seeds)
    return tmp, printed, again


@pytest.mark.slow  # the script end to end: 3 runs, twice (the second reuses them)
def test_tiny_table_end_to_end(tiny_table):
    tmp, printed, again = tiny_table
    assert printed.count("+ -m experiments.run") == 3 and "total wall time" in printed
    assert printed.index("hydra.run.dir=" + str(tmp / "runs" / "ddim" / "seed0")) < printed.index("guidance=t2d_sds")
    assert sorted(str(p.relative_to(tmp / "runs")) for p in (tmp / "runs").glob("*/seed*")) == [
        "ddim/seed0", "sds/seed0", "sds/seed1"]
    metrics = pd.read_csv(tmp / "runs" / "sds" / "seed1" / "metrics.csv")
    assert list(metrics.iteration) == [0, 1, 2, 3] and metrics.fid.isna().tolist() == [False, True, False, False]
    curves = pd.read_csv(tmp / "results" / "fid_vs_iter.csv")
    assert list(curves[curves.method == "sds"][["seed", "iteration"]].itertuples(index=False, name=None)) == [
        (0, 0), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    assert curves.fid.notna().all()
    rows = table_rows((tmp / "results" / "table4.md").read_text())
    assert list(rows) == ["ddim", "sds"] and rows["sds"]["seeds"] == "2" and " ± " in rows["sds"]["FID vs DDIM"]
    assert {p.name for p in (tmp / "results").glob("*.png")} == {
        "fid_vs_iter.png", "fid_vs_compute.png", "loss_vs_iter.png", "images_ddim.png", "images_sds.png"}
    assert "+ -m experiments.run" not in again and "reusing finished runs" in again  # reused, not rerun


@pytest.mark.slow  # a process of its own
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


def test_inception_features_need_a_path(tmp_path, capsys, tiny_prior_dirs):
    prior = tiny_prior_dirs["latent"]
    with pytest.raises(SystemExit) as exit_info:
        reproduce(tmp_path, "--prior", "sd21", f"prior.path={prior}")
    assert exit_info.value.code == 2 and "task.eval.inception_path" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_msd_remedy_variants_change_one_thing_each():
    """eval.msd_remedies: every MSD variant's composed config differs from the plain ``msd`` variant's in exactly the
    field it names (and its run label says which row it is), so the study compares one change at a time."""
    from eval.msd_remedies import VARIANTS, overrides_of

    def flat(cfg) -> dict:
        return pd.json_normalize(OmegaConf.to_container(cfg, resolve=True), sep=".").iloc[0].to_dict()

    plain = flat(compose_run_config(overrides_of("msd", 0)))
    changed = {"msd_common": {"guidance.start_noise"}, "msd_n4": {"guidance.num_samples"},
               "msd_interval": {"guidance_interval"}}
    for variant, fields in changed.items():
        config = flat(compose_run_config(overrides_of(variant, 0)))
        assert {key for key in plain if str(plain[key]) != str(config.get(key))} == fields, variant
    assert method_label(compose_run_config(overrides_of("msd_common", 0)).guidance) == "msd_common"
    assert set(VARIANTS) >= {"sds", "msd", *changed}

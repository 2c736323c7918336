"""Spiral and pinwheel (toy2d/datasets.py): golden facts, exact scores and product sampling, the registry, the
learned models, and toy runs with ``task.dataset=spiral|pinwheel`` end to end."""
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from eval.reproduce_toy2d import MODE_METRICS_FILE, mode_metrics  # noqa: E402
from eval.toy2d_figures import particles_grid  # noqa: E402
from experiments.figures import load_run  # noqa: E402
from experiments.run import run  # noqa: E402
from experiments.train_toy2d import MODELS, held_out_loss  # noqa: E402
from toy2d import DATASETS, MLPDenoiser, fractal_gmm, load_denoiser, pinwheel_gmm, spiral_gmm, toy_mixture  # noqa: E402
from toy2d.datasets import CENTER  # noqa: E402
from toy2d.denoisers import MODEL_NAMES  # noqa: E402
from toy2d.metrics import MODE_BANDWIDTH, ToyEvaluator, class_modes, find_modes  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"
TINY = ["task.grid_size=4", "task.steps=3", "task.solver_steps=3", "task.eval.n_reference=2000",
        "task.figure.resolution=16", "task.progress_bar=false", "logger=none"]
MIXTURES = {"spiral": spiral_gmm, "pinwheel": pinwheel_gmm}

# Golden facts, measured once (200,000 exact samples, seed 0; the closed-form moments agree to < 0.001):
# component count, chains() of the compiled kernel, mean and std per axis, modes of p ∗ G_λ at λ = 0.01.
GOLDEN = {
    "spiral": dict(components=512, chains=(64, 8), mean=(0.300, 0.300), std=(0.466, 0.477), modes=64),
    "pinwheel": dict(components=240, chains=(240, 1), mean=(0.300, 0.300), std=(0.332, 0.332), modes=5),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*TINY, *overrides])


def test_registry():
    assert DATASETS == ("fractal", "spiral", "pinwheel")
    assert toy_mixture("fractal", "A") is fractal_gmm("A") and toy_mixture("fractal", "AB") is fractal_gmm("AB")
    assert toy_mixture("spiral", "all") is spiral_gmm() is spiral_gmm("all")
    assert toy_mixture("pinwheel", "all") is pinwheel_gmm()
    with pytest.raises(ValueError, match=r"dataset must be one of \('fractal', 'spiral', 'pinwheel'\), got 'moons'"):
        toy_mixture("moons", "all")
    with pytest.raises(ValueError, match=r"classes of the spiral mixture must be one of \('all',\), got 'A'"):
        toy_mixture("spiral", "A")
    with pytest.raises(ValueError, match=r"classes of the fractal mixture must be one of \(.A., .B., .AB.\)"):
        toy_mixture("fractal", "all")


@pytest.mark.parametrize("dataset", ["spiral", "pinwheel"])
def test_golden_facts(dataset):
    """Counts, float64 storage, weights, 200k-sample moments (tolerance 0.005, ~5 Monte-Carlo standard
    errors of the mean and far below any change of the construction) and the reach inside the canvas."""
    mix, golden = MIXTURES[dataset](), GOLDEN[dataset]
    assert len(mix) == golden["components"] and mix.chains() == golden["chains"]
    assert mix.weights.dtype == mix.means.dtype == mix.covs.dtype == torch.float64
    assert abs(float(mix.weights.sum()) - 1.0) < 1e-12 and bool((mix.weights > 0).all())
    x = mix.sample(200_000, generator=_gen(0)).double()
    torch.testing.assert_close(x.mean(0), torch.tensor(golden["mean"], dtype=torch.float64), atol=0.005, rtol=0)
    torch.testing.assert_close(x.std(0), torch.tensor(golden["std"], dtype=torch.float64), atol=0.005, rtol=0)
    # well inside the default canvas (centre (0.3, 0.3), half-size 1.2)
    assert float((mix.means.double() - torch.tensor(CENTER)).norm(dim=1).max()) < 0.91
    assert float((x - torch.tensor(CENTER)).abs().max()) < 1.0


def test_spiral_has_one_mode_per_chord():
    """At λ = 0.01 the spiral has 64 modes, one at the middle of each of its 2 × 32 chords: within a chord the
    8 components (spacing = their along-chord std) merge into one bump, across a join the gap of 3 stds is a
    dip (toy2d/datasets.py). Measured: 64 for every λ in {0.003, 0.005, 0.01, 0.02, 0.03, 0.05}."""
    mix = spiral_gmm()
    modes = find_modes(mix, MODE_BANDWIDTH)
    assert len(modes) == GOLDEN["spiral"]["modes"]
    mids = mix.means.double().view(64, 8, 2).mean(1)
    dist = torch.cdist(modes, mids)
    assert float(dist.min(1).values.max()) < 1e-4  # measured 1.7e-6
    assert len(set(dist.argmin(1).tolist())) == 64
    assert len(find_modes(mix, 0.03)) == 64


def test_pinwheel_has_one_mode_per_blade():
    """Each blade is one smooth unimodal ridge, so 5 modes at λ = 0.01 (and at every λ in [0.003, 0.05],
    measured), at the same distance from the centre (0.445) and 72° apart (the blades are rotated copies)."""
    modes = class_modes("A", MODE_BANDWIDTH, "pinwheel") - torch.tensor(CENTER)
    assert len(modes) == GOLDEN["pinwheel"]["modes"]
    radius = modes.norm(dim=1)
    assert abs(float(radius.mean()) - 0.445) < 0.005 and float(radius.max() - radius.min()) < 1e-6
    angles = torch.sort(torch.atan2(modes[:, 1], modes[:, 0]) % (2 * math.pi)).values
    gaps = torch.diff(torch.cat((angles, angles[:1] + 2 * math.pi)))
    torch.testing.assert_close(gaps, torch.full((5,), 2 * math.pi / 5, dtype=torch.float64), atol=1e-6, rtol=0)


def _probe_points(mix, sigma: float) -> torch.Tensor:
    """Exact samples of p_σ and points spread over the canvas, float64."""
    canvas = torch.rand(64, 2, generator=_gen(3), dtype=torch.float64) * 2.4 - 0.9
    return torch.cat((mix.sample(64, sigma, generator=_gen(2)).double(), canvas))


@pytest.mark.parametrize("dataset", ["spiral", "pinwheel"])
@pytest.mark.parametrize("sigma", [0.01, 0.3])
def test_score_matches_finite_difference_of_log_prob(dataset, sigma):
    """Central differences of the (compiled, float64) log p_σ with step h = 1e-4 σ: truncation error
    ~ h² ∂³log p ~ 1e-8 relative, rounding ~ 1e-12 / h; the score agrees to 1e-5 of its scale."""
    mix = MIXTURES[dataset]()
    x = _probe_points(mix, sigma)
    h = 1e-4 * sigma
    fd = torch.stack([(mix.log_prob(x + h * e, sigma) - mix.log_prob(x - h * e, sigma)) / (2 * h)
                      for e in torch.eye(2, dtype=torch.float64)], dim=1)
    score = mix.score(x, sigma)
    scale = score.norm(dim=1, keepdim=True).clamp_min(1.0)
    assert float(((score - fd) / scale).abs().max()) < 1e-5
    assert bool(torch.isfinite(score).all())


@pytest.mark.parametrize("dataset", ["spiral", "pinwheel"])
@pytest.mark.parametrize("bandwidth", [0.05, 0.3])
def test_product_mean_matches_product_samples(dataset, bandwidth):
    """Mean of 20,000 exact samples of ṗ(y|c) ∝ p(y) N(y; c, λ²I) vs ``product_mean`` (within 5 standard errors,
    the product's std being ≤ λ per axis), and the identity ``product_mean − c = λ² ∇log p_λ(c)``."""
    mix = MIXTURES[dataset]()
    centers = torch.cat((mix.sample(6, generator=_gen(4)).double(),
                         torch.tensor([[0.3, 0.3], [1.2, -0.5]], dtype=torch.float64)))
    n = 20_000
    samples = mix.product_sample(centers, bandwidth, generator=_gen(5), n_per_center=n)
    assert samples.shape == (n, len(centers), 2)
    mean = mix.product_mean(centers, bandwidth)
    err = (samples.mean(0) - mean).abs()
    assert float((err / (samples.std(0) / math.sqrt(n) + 1e-12)).max()) < 5.0
    torch.testing.assert_close(mean - centers, bandwidth**2 * mix.score(centers, bandwidth), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name", ["spiral", "spiral_weak", "pinwheel", "pinwheel_weak"])
def test_learned_models_beat_the_untrained_model(name):
    """The committed models' held-out score-matching loss (as ``experiments.train_toy2d`` prints it, and as
    stored in the checkpoint's metadata) against the untrained model's (the Gaussian N(0, σ_data² + σ²)):
    main models below 0.1× (measured: spiral 0.022 vs 0.46, pinwheel 0.004 vs 0.50), the weak guides below
    0.6× (0.22 and 0.041)."""
    assert name in MODEL_NAMES
    spec = MODELS[name]
    net = load_denoiser(name)
    loss = held_out_loss(net, spec["classes"], spec["dataset"])
    init = held_out_loss(MLPDenoiser(**net.config), spec["classes"], spec["dataset"])
    assert loss < (0.1 if not name.endswith("_weak") else 0.6) * init, (loss, init)
    meta = torch.load(Path(__file__).resolve().parent.parent / "toy2d" / "weights" / f"{name}.pt",
                      weights_only=True)["meta"]
    assert meta["dataset"] == spec["dataset"] and abs(meta["held_out_loss"] - loss) < 1e-6
    if not name.endswith("_weak"):
        assert loss < 0.5 * held_out_loss(load_denoiser(f"{name}_weak"), "all", spec["dataset"])


@pytest.mark.parametrize("dataset", ["spiral", "pinwheel"])
@pytest.mark.parametrize("overrides", [
    ["guidance=msd", "denoiser=exact"],
    ["guidance=sds", "denoiser=learned"],
    ["guidance=msd", "denoiser=learned", "guide=autoguidance", "guidance_scale=3"],
])
def test_tiny_run_on_the_dataset(tmp_path, dataset, overrides):
    cfg = compose_config(f"task.dataset={dataset}", *overrides)
    final = run(cfg, tmp_path)
    assert (tmp_path / "scatter.png").is_file() and json.loads((tmp_path / "final.json").read_text()) == final
    assert np.isfinite(final["nll"]) and 0.0 <= final["in_hdr"] <= 1.0 and final["steps"] == 3
    # scored against the dataset's exact mixture (same reference samples as the run's evaluator)
    reference = ToyEvaluator(toy_mixture(dataset, "all"), 2000, 0, 0.95)
    assert final["hdr_level"] == reference.hdr_level and final["reference_nll"] == reference.entropy
    with np.load(tmp_path / "particles.npz") as saved:
        assert saved["particles"].shape == (16, 2)


def test_mode_metrics_and_figure_of_a_spiral_run(tmp_path):
    run(compose_config("task.dataset=spiral", "guidance=ddim", "task.grid_size=8"), tmp_path)
    record = load_run(tmp_path)
    metrics = mode_metrics(record)
    assert metrics["modes"] == 64 and 0.0 <= metrics["precision"] <= 1.0
    cached = json.loads((tmp_path / MODE_METRICS_FILE).read_text())
    assert cached["dataset"] == "spiral" and cached["metrics"] == metrics
    assert mode_metrics(record) == metrics  # from the cache
    assert particles_grid([record]) is not None


BAD_CONFIGS = [
    (["task.dataset=moons"], r"task\.dataset must be one of \('fractal', 'spiral', 'pinwheel'\), got 'moons'"),
    (["task.dataset=spiral", "guide=cfg", "guidance_scale=4"],
     r"guide must be 'autoguidance' \(or guidance_scale=1\) for task\.dataset=spiral.*got 'cfg'"),
    (["task.dataset=pinwheel", "denoiser=learned", "guide=cfg", "guidance_scale=4"],
     r"guide must be 'autoguidance' \(or guidance_scale=1\) for task\.dataset=pinwheel"),
    (["task.dataset=spiral", "task.target_class=B"], r"task\.target_class must be A \(its default\) for task\.dataset=spiral"),
    (["task.dataset=spiral", "guide=autoguidance", "guidance_scale=3"],
     r"guide='autoguidance' needs denoiser\.autoguidance_guide.*denoiser=learned for autoguidance\)"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS)
def test_bad_dataset_config_fails_at_start_naming_the_field(tmp_path, overrides, message):
    cfg = compose_config("guidance=sds", *overrides)
    with pytest.raises(ValueError, match=message):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()

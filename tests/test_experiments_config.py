"""Hydra configs compose for every guidance × denoiser × logger, and bad configs fail at start naming the field."""
import itertools
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from experiments.builders import build_toy2d, guidance_names  # noqa: E402
from experiments.run import run  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"
GUIDANCES = ("ddim", "sds", "vsd", "sdi", "msd")
DENOISERS = ("exact", "learned")
TINY = ["task.grid_size=4", "task.steps=2", "task.solver_steps=3", "task.eval.n_reference=2000",
        "task.figure.resolution=16", "task.progress_bar=false", "logger=none"]


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("guidance,denoiser,logger", list(itertools.product(GUIDANCES, DENOISERS, ("wandb", "none"))))
def test_every_combination_composes_and_resolves(guidance, denoiser, logger):
    cfg = compose_config(f"guidance={guidance}", f"denoiser={denoiser}", f"logger={logger}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["guidance"]["name"] == guidance and resolved["denoiser"]["name"] == denoiser
    assert resolved["task"]["grid_size"] >= 64 and resolved["task"]["optimizer"]["lr"] == 0.08
    if guidance in ("sds", "vsd", "sdi", "msd"):
        assert resolved["guidance"]["total_steps"] == resolved["task"]["steps"]


def test_paper_preset_with_cli_override():
    cfg = compose_config("experiment=toy2d", "guidance=msd", "denoiser=learned", "guidance.lambda0=0.5")
    assert cfg.guidance.lambda0 == 0.5 and cfg.guidance.schedule == "linear"
    assert cfg.task.steps == 150 and cfg.task.optimizer.name == "adam" and cfg.task.optimizer.lr == 0.08
    assert cfg.task.canvas.center == [0.3, 0.3] and cfg.task.canvas.half_size == 1.2
    assert (cfg.task.sigma_min, cfg.task.sigma_max, cfg.task.rho) == (0.002, 5.0, 7.0)
    assert abs(compose_config("guidance=msd").guidance.lambda0 - 0.1**0.5) < 1e-12


@pytest.mark.parametrize("guidance,denoiser,setting", list(itertools.product(
    GUIDANCES, DENOISERS, (("cfg", 1), ("cfg", 4), ("autoguidance", 3)))))
def test_every_combination_builds(guidance, denoiser, setting):
    guide, scale = setting
    overrides = [f"guidance={guidance}", f"denoiser={denoiser}", f"guide={guide}", f"guidance_scale={scale}", *TINY]
    cfg = compose_config(*overrides)
    if denoiser == "exact" and guide == "autoguidance":
        with pytest.raises(ValueError, match="denoiser.autoguidance_guide"):
            build_toy2d(cfg)
        return
    setup = build_toy2d(cfg)
    assert (setup.guidance is None) == (guidance == "ddim")
    assert setup.denoiser.evaluations_per_call == (1 if scale == 1 else 2)


BAD_CONFIGS = [
    (["guidance.name=nope"], r"guidance\.name must be one of \('msd', 'sdi', 'sds', 'vsd', 'ddim'\)"),
    (["guidance=msd", "guidance.lambda0=0"], r"guidance\.lambda0 must be > 0"),
    (["guidance=msd", "guidance.lambda0=-1"], r"guidance\.lambda0 must be > 0"),
    (["guidance=msd", "guidance.lambda0=0.1", "guidance.lambda_min=0.2"], r"guidance\.lambda_min must be in"),
    (["task.optimizer.lr=0"], r"task\.optimizer\.lr must be > 0"),
    (["task.optimizer.lr=-0.1"], r"task\.optimizer\.lr must be > 0"),
    (["task.optimizer.name=lbfgs"], r"task\.optimizer\.name must be one of \('adam', 'sgd'\)"),
    (["denoiser.name=oracle"], r"denoiser\.name must be one of \('exact', 'learned'\)"),
    (["guide=classifier", "guidance_scale=2"], r"guide must be one of \('cfg', 'autoguidance'\)"),
    (["guidance=sds", "+guidance.lambda0=1"], r"guidance=sds: .*lambda0"),
    (["guidance=ddim", "guidance.solver=rk4"], r"guidance\.solver must be one of"),
    (["task.grid_size=0"], r"task\.grid_size must be >= 1"),
    (["task.name=t2i"], r"task\.name must be one of \('text2d', 'text3d', 'toy2d'\)"),
    (["logger=wandb", "logger.mode=sometimes"], r"logger\.mode must be one of"),
    (["num_threads=0"], r"num_threads must be null or >= 1"),
    (["task.eval.hdr_mass=1.5"], r"task\.eval\.hdr_mass must be in \(0, 1\)"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS)
def test_bad_config_fails_at_start_naming_the_field(tmp_path, overrides, message):
    cfg = compose_config(*TINY, *overrides)
    with pytest.raises(ValueError, match=message):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_guidance_names_include_reference_sampler():
    assert set(guidance_names()) == set(GUIDANCES)

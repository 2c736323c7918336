"""The text-to-3D task (experiments/text3d.py) on the one loop: every guidance end to end on the committed
ShapesWorld-3D prior at tiny sizes (metrics, exports), per-step draws that depend on (seed, step) alone, the
conditioning (view prompts and cameras), resume bitwise exact, the Stable Diffusion path on a tiny latent pipeline
(render → resize → VAE encode → target → gradients on every field parameter), the fail-fast checks, and a CPU run
that never loads nerfacc's CUDA backend."""
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments.run import run
from experiments.text3d import Text3DTask, step_generator, thin_object_threshold, to_prior_space
from msd.guidance import target_loss
from msd.rendering import view_prompts
from tests.test_checkpoint import assert_resume_is_bitwise
from tests.test_rendering import no_nerfacc_cuda  # noqa: F401  (the fixture)
from tests.test_text2d import assert_preset_fails_without_weights

REPO = Path(__file__).resolve().parent.parent
PROBE = "a red cube with a blue front"


def tiny(cache: Path, *overrides: str) -> list[str]:
    """experiment=text3d_shapes at toy sizes: a 16³ grid, 2 cameras of 16 px (resized to the prior's 32), 16 samples."""
    return ["experiment=text3d_shapes", "logger=none", f"task.prompt='{PROBE}'", "task.steps=3", "task.batch_size=2",
            "task.render_sizes=[16]", "task.n_samples=16", "task.field.resolution=16", "task.eval.every=2",
            "task.eval.n_samples=16", "task.eval.reference_per_view=2", "task.eval.reference_steps=2",
            "task.eval.turntable_views=4", "task.eval.turntable_size=16", "task.checkpoint_every=2",
            "task.material.ambient_only_steps=1", f"task.eval.cache_dir={cache}", *overrides]


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("guidance,evals_per_iter", [
    ("t3d_sds", 2.0), ("t3d_vsd", 2.0 + 1 + 1), ("t3d_msd", None),
    # SDI (10, 7, 4 inversion steps at t = 0.98, 0.66, 0.34) and MSD's eq. 15 in make test-slow: ~14 s each
    pytest.param("t3d_sdi", 2.0 * (10 + 7 + 4) / 3 + 2.0, marks=pytest.mark.slow),
    pytest.param("t3d_msd_stable", None, marks=pytest.mark.slow)])
def test_text3d_run_writes_metrics_views_and_exports(tmp_path, guidance, evals_per_iter):
    lowest = ["guidance.lambda_min=0.1"] if guidance.startswith("t3d_msd") else []  # all 3 steps above λ_min
    final = run(compose_config(*tiny(tmp_path / "cache", f"guidance={guidance}", *lowest)), tmp_path / "run")
    rows = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(rows.iteration) == [0, 1, 2, 3]
    assert np.isnan(rows.loss.iloc[0]) and (rows.loss.iloc[1:] >= 0).all()
    assert (rows.regularisation.iloc[1:] == rows.reg_sparsity.iloc[1:]).all()  # the preset's one regulariser
    curve = rows[rows.silhouette_iou.notna()]
    assert list(curve.iteration) == [0, 2, 3]
    for key in ("shape_accuracy", "colour_accuracy", "prompt_accuracy", "view_accuracy", "silhouette_iou"):
        assert curve[key].between(0, 1).all(), key
    assert (curve.janus_count >= 0).all() and (curve.janus_count <= 8).all()  # a probe prompt: 8 views
    assert curve.unet_evals.iloc[0] == 0 and curve.unet_evals.is_monotonic_increasing
    if evals_per_iter is not None:
        assert curve.unet_evals.iloc[-1] == pytest.approx(3 * evals_per_iter)
    for key in ("volumetric_iou", "volumetric_iou_opaque"):
        assert 0 <= final[key] <= 1
    assert final["density_max"] > 0
    for key in ("fid_true", "kid_true", "fid_prior", "kid_prior"):
        assert math.isfinite(final[key])
    assert final["iterations"] == 3 and final["prompt"] == PROBE and final["ms_per_iter"] > 0
    with np.load(tmp_path / "run" / "views.npz") as arrays:
        assert arrays["images"].shape == (8, 3, 32, 32) and np.abs(arrays["images"]).max() <= 1
        assert arrays["reference_true"].shape == arrays["reference_prior"].shape == (16, 3, 32, 32)
        assert list(arrays["prompts"])[:2] == [f"{PROBE}, front view", f"{PROBE}, side view"]
    for name in ("turntable.mp4", "turntable.gif", "mesh.obj", "mesh.glb", "multiview.png", "field.pt"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "run" / "final.json").read_text())["silhouette_iou"] == final["silhouette_iou"]


def test_text3d_vsd_resume_is_bitwise_identical(monkeypatch, tmp_path):
    """The field, its Adam state, VSD's camera-conditioned LoRA and its Adam state, the loop's generator and the
    step's (seed, step) draws: 3 iterations, stopped after 2 (checkpoint at 2), resumed for the last one."""
    overrides = tiny(tmp_path / "cache", "guidance=t3d_vsd", "task.eval.exports=false")
    assert_resume_is_bitwise(monkeypatch, overrides, tmp_path, crash_after=2, saved_step=2, arrays="views.npz")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return Text3DTask.build(compose_config(*tiny(cache, "guidance=t3d_sds", "task.batch_size=4")))


def test_a_step_draws_from_seed_and_step_alone(task):
    """Cameras, jitter, shading and background of step k are a function of (seed, k): the same step renders the same
    x however often, another step or seed differs; the generator lives on the prior's device."""
    with torch.no_grad():
        task.step = 5
        first, cameras = task.render(), task.batch.cameras
        again, cameras_again = task.render(), task.batch.cameras
        task.step = 6
        other, other_cameras = task.render(), task.batch.cameras
    assert torch.equal(first, again) and torch.equal(cameras.camera_to_world, cameras_again.camera_to_world)
    assert not torch.equal(first, other) and not torch.equal(cameras.camera_to_world, other_cameras.camera_to_world)
    a, b = step_generator(0, 5, torch.device("cpu")), step_generator(1, 5, torch.device("cpu"))
    assert not torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    assert step_generator(0, 5, torch.device("cpu")).device.type == "cpu"


def test_conditioning_is_the_view_prompts_and_the_cameras(task):
    with torch.no_grad():
        task.step = 3
        x = task.render()
    cond = task.conditioning(3)
    cameras = task.batch.cameras
    prompts = view_prompts(PROBE, cameras.elevation_deg, cameras.azimuth_deg, task.setup.cameras)
    assert torch.equal(cond.embeddings, task.setup.prior.conditioning(prompts).embeddings)
    assert torch.equal(cond.camera, cameras.camera_to_world.reshape(4, 16))
    assert x.shape == (4, 3, 32, 32) and len(cond) == 4
    quarters = torch.div(cameras.azimuth_deg + 180.0, 90.0, rounding_mode="floor")
    assert sorted(quarters.tolist()) == [0.0, 1.0, 2.0, 3.0]  # stratified: one camera per quarter turn


def test_thin_object_threshold_makes_the_thinnest_object_half_opaque():
    tau = thin_object_threshold(0.15)
    assert 1 - math.exp(-tau * 0.3) == pytest.approx(0.5) and tau == pytest.approx(2.3105, abs=1e-4)


def test_to_prior_space_maps_and_resizes(task):
    prior = task.setup.prior
    rgb = torch.rand(2, 3, 32, 32)
    assert torch.equal(to_prior_space(prior, rgb), 2 * rgb - 1)  # a pixel prior at its own size: only the range
    constant = torch.full((1, 3, 16, 16), 0.25)
    assert torch.allclose(to_prior_space(prior, constant), torch.full((1, 3, 32, 32), -0.5))


def sd_overrides(prior: Path, *extra: str) -> list[str]:
    return ["task=text3d", "prior=sd21", f"prior.path={prior}", "logger=none", "device=cpu", "task.prompt='a hamburger'",
            "task.batch_size=2", "task.render_sizes=[8,16]", "task.resolution_milestones=[1]", "task.n_samples=8",
            "task.steps=2", "guidance_scale=7.5", "task.regularisers.orient=[0,10.0,1000.0,5000]",
            "task.material.ambient_only_steps=0", "task.material.diffuse_prob=1.0", "task.material.textureless_prob=0.0",
            *extra]


@pytest.mark.parametrize("field", ["voxel", "implicit"])
def test_sd_path_renders_resizes_encodes_and_reaches_every_field_parameter(tiny_prior_dirs, field):
    """A latent prior (tiny SD-style pipeline: 12×12×4 latents of 24 px images): renders of 8 px, then 16 px from the
    milestone, bilinearly resized to 24 px and VAE-encoded; SDS's target loss plus the orientation and sparsity
    regularisers reach every parameter of the field and of the environment-map background."""
    cfg = compose_config(*sd_overrides(tiny_prior_dirs["latent"], "guidance=t3d_sds", f"task.field.name={field}",
                                       "task.field.resolution=8", "task.background.name=environment"))
    task = Text3DTask.build(cfg)
    prior = task.setup.prior
    assert task.render_size(0) == 8 and task.render_size(1) == 16
    generator = torch.Generator().manual_seed(0)
    for step in range(2):
        x = task.render()
        assert x.shape == (2, *prior.sample_shape) and x.requires_grad
        assert task.batch.render.rgb.shape[1] == task.render_size(step) ** 2
        out = task.setup.guidance(x.detach(), step, generator, task.conditioning(step))
        penalty = task.regularisation(step)
        assert set(penalty.terms) == {"orient", "sparsity"} and torch.isfinite(penalty.total)
        parameters = task.parameters()
        for p in parameters:
            p.grad = None
        (target_loss(x, out.target) + penalty.total).backward()
        for p in parameters:
            assert p.grad is not None and p.grad.abs().sum() > 0, p.shape
        task.after_step(step + 1, step == 1)
    names = {n for n, _ in task.setup.field.named_parameters()} | {n for n, _ in task.setup.background.named_parameters()}
    assert len(parameters) == len(names)


def test_sd_run_without_a_world_writes_opacity_views_and_exports(tiny_prior_dirs, tmp_path):
    """A prior without a 3-D truth (SD): the run's one score is the mean opacity of the evaluation views; the
    multi-view figure, turntable and mesh are written all the same."""
    cfg = compose_config(*sd_overrides(tiny_prior_dirs["latent"], "guidance=t3d_sds", "task.field.resolution=8",
                                       "task.eval.n_samples=8", "task.eval.turntable_views=4",
                                       "task.eval.turntable_size=16", "task.eval.every=1"))
    final = run(cfg, tmp_path / "run")
    rows = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(rows.iteration) == [0, 1, 2] and rows.opacity.between(0, 1).all()
    assert final["opacity"] == rows.opacity.iloc[-1] and "silhouette_iou" not in final
    for name in ("turntable.mp4", "turntable.gif", "mesh.glb", "multiview.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    assert not (tmp_path / "run" / "views.npz").exists()


def test_vsd_lora_sees_the_camera_on_the_sd_path(tiny_prior_dirs):
    cfg = compose_config(*sd_overrides(tiny_prior_dirs["latent"], "guidance=t3d_vsd"))
    task = Text3DTask.build(cfg)
    assert task.setup.prior.camera_embedding is not None
    x = task.render()
    out = task.setup.guidance(x.detach(), 0, torch.Generator().manual_seed(0), task.conditioning(0))
    assert out.target.shape == x.shape and torch.isfinite(out.target).all()


def test_bad_text3d_config_fails_before_writing(tmp_path):
    cases = {"task.field.name": "task.field.name=nerf", "task.eval.views": "task.eval.views=4",
             "task.resolution_milestones": "task.render_sizes=[16,32]", "task.prompt": "task.prompt=''",
             "cameras.fovy_range_deg": "task.cameras.fovy_range_deg=[70.0,40.0]"}
    for field, override in cases.items():
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            run(compose_config(*tiny(tmp_path / "cache", "guidance=t3d_sds", override)), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_a_cpu_text3d_step_never_touches_nerfacc_cuda(no_nerfacc_cuda, task):  # noqa: F811
    x = task.render()
    penalty = task.regularisation(task.step)
    (x.square().sum() + penalty.total).backward()
    assert task.setup.field.grid.grad.abs().sum() > 0 and task.occupancy is None


@pytest.mark.slow  # a CLI process (the Hugging Face cache location is read at import)
def test_text3d_sd21_preset_without_weights_fails_at_once(tmp_path):
    assert_preset_fails_without_weights(tmp_path, "text3d_sd21", "t3d_msd")

"""The diffusers prior adapter on tiny random SD-style models built from configs (CPU, offline)."""
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from baselines import SDIGuidance, SDSGuidance, VSDGuidance
from msd.denoiser import GuidedDenoiser
from msd.guidance import build_guidance
from msd.mean_shift import MSDGuidance
from msd.priors import DiffusersPrior, PriorNotFoundError, load_prior, locate_prior, parse_dtype
from msd.schedules import VPSchedule
from msd.solvers import sample

PROMPTS = ["the cat", "a dog", "the dog"]


def view(prior, prompts, scale: float = 1.0, interval=None):
    """The prior's (CFG) denoiser bound to ``prompts``."""
    return prior.denoiser(scale, interval).condition(prior.conditioning(prompts))


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def prior_dirs(tiny_prior_dirs):
    """The session's tiny prior directories (tests/conftest.py): latent, latent_v, pixel (16 × 8)."""
    return tiny_prior_dirs


@pytest.fixture
def latent_prior(tiny_latent_prior):
    """The session's loaded tiny latent prior, shared read-only (tests that change a prior load their own)."""
    return tiny_latent_prior


def draw(prior, n, seed=0):
    return torch.randn(n, *prior.sample_shape, generator=seeded(seed))


@contextmanager
def count_calls(module):
    """Record the batch size of every forward of ``module`` inside the ``with`` block."""
    calls = []
    handle = module.register_forward_hook(lambda mod, args, kwargs, out: calls.append(args[0].shape[0]),
                                          with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def test_sizes_come_from_the_configs(prior_dirs, latent_prior):
    assert latent_prior.latent and latent_prior.sample_shape == (4, 12, 12)
    assert latent_prior.vae_scale_factor == 2 and latent_prior.image_size == (24, 24)
    pixel = DiffusersPrior.from_pretrained(prior_dirs["pixel"], device="cpu")
    assert not pixel.latent and pixel.sample_shape == (3, 16, 8) and pixel.image_size == (16, 8)
    assert latent_prior.dtype == torch.float32 and latent_prior.prediction_type == "epsilon"


def test_schedule_comes_from_the_scheduler_config(latent_prior):
    """The tiny models use SD's betas (scaled_linear 0.00085 → 0.012, T = 1000) in a DDIMScheduler config."""
    assert torch.equal(latent_prior.schedule.alphas_cumprod, VPSchedule.stable_diffusion().alphas_cumprod)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        VPSchedule.from_scheduler_config({"beta_schedule": "linear", "rescale_betas_zero_snr": True})


def test_weights_are_frozen(latent_prior):
    for module in (latent_prior.unet, latent_prior.text_encoder, latent_prior.vae):
        assert not module.training and not any(p.requires_grad for p in module.parameters())


def test_eps_is_the_unet_on_diffusers_noised_latents(prior_dirs, latent_prior):
    """At integer timesteps t: ε̂(x₀ + σ_t n, σ_t) = UNet(add_noise(x₀, n, t), t, text) (diffusers' own
    forward noising and text encoding), i.e. the VE→VP input scaling z = α x̂ and σ → t."""
    scheduler = DDPMScheduler.from_pretrained(prior_dirs["latent"], subfolder="scheduler")
    t = torch.tensor([37, 500, 981])
    sigma = latent_prior.schedule.sigma(t / 999).float()
    x0, noise = draw(latent_prior, 3, 1), draw(latent_prior, 3, 2)
    tokens = latent_prior.tokenizer(["the cat"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        text = latent_prior.text_encoder(tokens.input_ids).last_hidden_state.expand(3, -1, -1)
        expected = latent_prior.unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=text).sample
        got = view(latent_prior, "the cat").eps(x0 + sigma[:, None, None, None] * noise, sigma)
    assert torch.allclose(got, expected, atol=1e-5)


class OracleUNet(nn.Module):
    """Checks its inputs against diffusers' ``add_noise`` and answers with the exact ε or v of (x₀, n)."""

    def __init__(self, scheduler, x0, noise, t, prediction_type):
        super().__init__()
        self.scheduler, self.x0, self.noise, self.t, self.prediction_type = scheduler, x0, noise, t, prediction_type

    def forward(self, z, timestep, encoder_hidden_states):
        torch.testing.assert_close(timestep, self.t.float(), rtol=0, atol=1e-3)  # σ is float32
        torch.testing.assert_close(z, self.scheduler.add_noise(self.x0, self.noise, self.t), rtol=1e-5, atol=1e-5)
        if self.prediction_type == "epsilon":
            return SimpleNamespace(sample=self.noise)
        return SimpleNamespace(sample=self.scheduler.get_velocity(self.x0, self.noise, self.t))


@pytest.mark.parametrize("variant", ["latent", "latent_v"])
def test_prediction_types_give_eps_and_the_clean_estimate(prior_dirs, variant):
    prior = DiffusersPrior.from_pretrained(prior_dirs[variant], device="cpu")
    scheduler = DDPMScheduler.from_pretrained(prior_dirs[variant], subfolder="scheduler")
    t = torch.tensor([5, 250, 990])
    sigma = prior.schedule.sigma(t / 999).float()
    x0, noise = draw(prior, 3, 3), draw(prior, 3, 4)
    prior.unet = OracleUNet(scheduler, x0, noise, t, prior.prediction_type)
    model = view(prior, "the cat")
    x_hat = x0 + sigma[:, None, None, None] * noise
    assert torch.allclose(model.eps(x_hat, sigma), noise, atol=1e-4)
    assert torch.allclose(model.denoise(x_hat, sigma), x0, atol=1e-3)


@pytest.mark.parametrize("interval", [None, (0.5, 2.0)])
def test_cfg_equals_the_guided_denoiser_formula_in_one_forward(latent_prior, interval):
    x, sigma = draw(latent_prior, 3), torch.tensor([0.3, 1.0, 5.0])
    guided = view(latent_prior, PROMPTS, 7.5, interval=interval)
    reference = GuidedDenoiser(view(latent_prior, PROMPTS), view(latent_prior, ""), 7.5, interval)
    with torch.no_grad():
        with count_calls(latent_prior.unet) as calls:
            got = guided.eps(x, sigma)
        assert calls == [6]  # cond and uncond halves batched: one UNet forward on 2N samples
        expected = reference.eps(x, sigma)
    assert torch.allclose(got, expected, atol=1e-5)
    assert guided.evaluations_per_call == 2 and view(latent_prior, PROMPTS).evaluations_per_call == 1
    assert not torch.allclose(got, view(latent_prior, PROMPTS).eps(x, sigma), atol=1e-4)


def test_prompts_condition_their_own_samples(latent_prior):
    x, sigma = draw(latent_prior, 3), torch.tensor([0.5, 0.5, 0.5])
    with torch.no_grad():
        batched = view(latent_prior, PROMPTS).eps(x, sigma)
        for i, prompt in enumerate(PROMPTS):
            alone = view(latent_prior, prompt).eps(x[i:i + 1], sigma[i:i + 1])
            assert torch.allclose(batched[i:i + 1], alone, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-4)
    with pytest.raises(ValueError, match="prompts"):
        view(latent_prior, PROMPTS[:2]).eps(x, sigma)
    with pytest.raises(ValueError, match="prompts"):
        view(latent_prior, [])


def test_text_embeddings_are_cached(prior_dirs):
    prior = DiffusersPrior.from_pretrained(prior_dirs["latent"], device="cpu")
    with count_calls(prior.text_encoder) as calls:
        first = prior.text_embeddings(["the cat", "", "the cat"])
        second = prior.text_embeddings(["", "the cat"])
    assert calls == [2] and first.shape == (3, 77, 8)
    assert torch.equal(first[1], second[0]) and torch.equal(first[0], second[1])


def test_encode_decode(prior_dirs, latent_prior):
    images = (torch.rand(2, 3, 24, 24, generator=seeded(5)) * 2 - 1).requires_grad_(True)
    latents = latent_prior.encode(images)
    assert latents.shape == (2, *latent_prior.sample_shape)
    expected = latent_prior.vae.encode(images).latent_dist.mean * latent_prior.vae.config.scaling_factor
    assert torch.allclose(latents, expected)
    latents.sum().backward()
    assert images.grad.abs().sum() > 0
    assert latent_prior.decode(latents.detach()).shape == (2, 3, 24, 24)
    pixel = DiffusersPrior.from_pretrained(prior_dirs["pixel"], device="cpu")
    images = torch.rand(2, 3, 16, 8)
    assert torch.equal(pixel.encode(images), images) and torch.equal(pixel.decode(images), images)
    with pytest.raises(ValueError, match=r"images must be \[N, 3"):
        latent_prior.encode(torch.zeros(2, 4, 24, 24))


def test_sdi_without_inversion_equals_sds_with_sigma_weighting(latent_prior):
    denoiser = view(latent_prior, PROMPTS, 5.0)
    x = draw(latent_prior, 3, 6)
    settings = dict(noise_schedule=latent_prior.schedule, t_min=0.1, t_max=0.9)
    sds = SDSGuidance(denoiser, weighting="sigma", **settings)
    sdi = SDIGuidance(denoiser, inversion=False, **settings)
    assert torch.allclose(sds(x, 0, seeded(7)).target, sdi(x, 0, seeded(7)).target, atol=1e-5)


def test_vsd_lora_step_changes_only_adapter_weights(prior_dirs):
    prior = DiffusersPrior.from_pretrained(prior_dirs["latent"], device="cpu")
    x, sigma = draw(prior, 2, 8), torch.tensor([0.4, 2.0])
    with torch.no_grad():
        base_eps = view(prior, "the cat").eps(x, sigma)
    lora = prior.add_lora(rank=2, generator=seeded(0))
    assert lora and all(p.dtype == torch.float32 for p in lora)
    frozen = {name: p.detach().clone() for module in (prior.unet, prior.text_encoder, prior.vae)
              for name, p in module.named_parameters() if ".lora_" not in name}
    lora_before = [p.detach().clone() for p in lora]
    cond = prior.conditioning("the cat")
    particles = prior.lora_denoiser()
    assert {id(p) for p in particles.parameters()} == {id(p) for p in lora}

    vsd = VSDGuidance(prior.denoiser(), particle_model=particles, phi_lr=1e-2)
    first = vsd(x, 0, seeded(9), cond)
    assert torch.equal(first.target, x)  # B = 0: ε̂_φ starts equal to the prior, so the first gradient is 0
    after = {name: p for module in (prior.unet, prior.text_encoder, prior.vae)
             for name, p in module.named_parameters() if ".lora_" not in name}
    assert after.keys() == frozen.keys()
    assert all(torch.equal(after[name], value) and after[name].grad is None for name, value in frozen.items())
    assert any(not torch.equal(p, q) for p, q in zip(lora, lora_before))
    with torch.no_grad():  # views other than the LoRA one run with the adapter disabled
        assert torch.equal(view(prior, "the cat").eps(x, sigma), base_eps)
        assert not torch.allclose(particles.condition(cond).eps(x, sigma), base_eps, atol=1e-7)
    assert not torch.equal(vsd(x, 1, seeded(10), cond).target, x)


def test_lora_needs_add_lora_and_seeds_its_init(prior_dirs):
    a = DiffusersPrior.from_pretrained(prior_dirs["latent"], device="cpu")
    with pytest.raises(ValueError, match="add_lora"):
        a.lora_denoiser()
    b = DiffusersPrior.from_pretrained(prior_dirs["latent"], device="cpu")
    state = torch.random.get_rng_state()
    params_a, params_b = a.add_lora(rank=2, generator=seeded(3)), b.add_lora(rank=2, generator=seeded(3))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(params_a, params_b))
    with pytest.raises(ValueError, match="already has"):
        a.add_lora()


def test_msd_stable_solver_limits_on_the_tiny_pipeline(latent_prior):
    """λ → 0 returns x (zero gradient); λ → ∞ is plain DDIM sampling from the same noise."""
    denoiser = view(latent_prior, "the cat", 3.0)
    x = draw(latent_prior, 2, 11)
    settings = dict(sampler="stable", solver="euler", lambda_min=0.0, solver_steps=4,
                    noise_schedule=latent_prior.schedule)
    tiny = MSDGuidance(denoiser, lambda0=1e-4, **settings)
    assert torch.allclose(tiny(x, 0, seeded(12)).target, x, atol=1e-5)
    huge = MSDGuidance(denoiser, lambda0=1e4, **settings)
    sigmas = latent_prior.schedule.grid(4)
    with torch.no_grad():
        ddim = sample(denoiser, float(sigmas[0]) * draw(latent_prior, 2, 12), sigmas)
    assert torch.allclose(huge(x, 0, seeded(12)).target, ddim, atol=1e-4)


@pytest.mark.parametrize("name", ["sds", "sdi", "vsd", "msd"])
@pytest.mark.parametrize("variant", ["latent", "pixel"])
def test_every_guidance_runs_on_the_adapter(prior_dirs, name, variant):
    prior = DiffusersPrior.from_pretrained(prior_dirs[variant], device="cpu")
    settings = {"sdi": {"inversion_steps": 2}, "msd": {"solver_steps": 3}}.get(name, {})
    if name == "vsd":
        prior.add_lora(rank=2, generator=seeded(0))
        settings = {"particle_model": prior.lora_denoiser()}
    guidance = build_guidance(name, denoiser=prior.denoiser(7.5), **settings)
    assert guidance.noise_schedule is prior.schedule  # the prior's own VP schedule, never a default
    x, cond = draw(prior, 2, 13), prior.conditioning(PROMPTS[:2])
    target = guidance(x, 0, seeded(14), cond).target
    assert target.shape == x.shape and torch.isfinite(target).all()
    if name != "vsd":  # VSD's ε̂_φ has trained in between
        assert torch.equal(target, guidance(x, 0, seeded(14), cond).target)


@pytest.mark.parametrize("name, settings", [
    ("sds", {}), ("sdi", {"inversion_steps": 2, "inversion_grid": "global", "timestep_mode": "linear"}),
    ("msd", {"solver_steps": 3, "start_factor": 3.0}),
    ("msd", {"sampler": "stable", "solver": "euler", "solver_steps": 3, "inversion_scale": -1.0}),
    ("msd", {"sampler": "tweedie"})], ids=["sds", "sdi", "msd", "msd_stable", "msd_tweedie"])
def test_one_guidance_serves_changing_prompts(latent_prior, name, settings):
    """A guidance on the unbound prior, given each step's prompts with the call, returns exactly the targets of a
    guidance built on the prior bound to those prompts (per-sample prompts, N > 1 samples per estimate too)."""
    free = build_guidance(name, denoiser=latent_prior.denoiser(4.0), **settings)
    x = draw(latent_prior, 3, 21)
    for step, prompts in enumerate([PROMPTS, PROMPTS[::-1], ["the cat"] * 3]):
        bound = build_guidance(name, denoiser=view(latent_prior, prompts, 4.0), **settings)
        got = free(x, step, seeded(22), latent_prior.conditioning(prompts)).target
        assert torch.equal(got, bound(x, step, seeded(22)).target)
    with pytest.raises(ValueError, match="no conditioning"):
        free(x, 0, seeded(22))


def test_msd_with_several_samples_per_estimate_takes_per_image_prompts(latent_prior):
    """N = 2 product samples of 3 images with 3 prompts are the samples of the 6 rows [x; x] with the prompts
    repeated (same noise: both draw it for 6 rows at once)."""
    settings = {"solver_steps": 3, "start_factor": 3.0, "lambda0": 0.5}
    x, lam = draw(latent_prior, 3, 23), 0.5
    several = build_guidance("msd", denoiser=latent_prior.denoiser(4.0), num_samples=2, **settings)
    one = build_guidance("msd", denoiser=latent_prior.denoiser(4.0), **settings)
    with torch.no_grad():
        got = several.product_samples(x, lam, seeded(24), latent_prior.conditioning(PROMPTS))
        rows = one.product_samples(x.repeat(2, 1, 1, 1), lam, seeded(24), latent_prior.conditioning(PROMPTS * 2))
    assert got.shape == (2, *x.shape)
    assert torch.allclose(got.reshape(6, *x.shape[1:]), rows[0], atol=1e-5)


def test_load_prior_from_a_path_and_from_the_hf_cache(prior_dirs, tmp_path, monkeypatch):
    assert load_prior("sd21", path=prior_dirs["pixel"], device="cpu").sample_shape == (3, 16, 8)
    snapshot = tmp_path / "models--someone--tiny-sd" / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(prior_dirs["latent"], target_is_directory=True)
    (tmp_path / "models--someone--tiny-sd" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-sd" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    assert locate_prior("sd15", path="someone/tiny-sd") == snapshot
    assert load_prior("sd15", path="someone/tiny-sd", device="cpu").image_size == (24, 24)


@pytest.mark.parametrize("name,command", [
    ("sd21", "hf download stabilityai/stable-diffusion-2-1-base"),
    ("sd15", "hf download stable-diffusion-v1-5/stable-diffusion-v1-5"),
])
def test_missing_model_fails_fast_with_the_download_command(name, command, tmp_path, monkeypatch):
    """It fails before loading anything: no model is read (nor downloaded) on the way to the error."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))

    def no_loading(*args, **kwargs):
        raise AssertionError("load_prior must fail before loading a model")

    monkeypatch.setattr(DiffusersPrior, "from_pretrained", no_loading)
    with pytest.raises(PriorNotFoundError) as error:
        load_prior(name)
    assert isinstance(error.value, FileNotFoundError)
    message = str(error.value)
    assert command in message and "prior.path=" in message and "HF_HUB_CACHE" in message
    with pytest.raises(PriorNotFoundError, match="--local-dir /nowhere/sd"):
        load_prior(name, path="/nowhere/sd")


def test_missing_shapes_prior_and_incomplete_directories(prior_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr("msd.priors.REPO_ROOT", tmp_path)
    with pytest.raises(PriorNotFoundError, match="shapes/prior"):
        load_prior("shapes")
    (tmp_path / "shapes" / "prior" / "unet").mkdir(parents=True)
    with pytest.raises(PriorNotFoundError, match=r"lacks the subfolder\(s\) \['text_encoder', 'tokenizer'"):
        load_prior("shapes")


def test_bad_settings_name_the_field(prior_dirs):
    with pytest.raises(ValueError, match=r"prior.name must be one of \('sd21', 'sd15', 'shapes', 'shapes3d'\)"):
        load_prior("sdxl")
    with pytest.raises(ValueError, match="prior.dtype"):
        load_prior("sd21", path=prior_dirs["pixel"], dtype="float64")
    assert parse_dtype(None, torch.device("cuda")) == torch.float16
    assert parse_dtype(None, torch.device("cpu")) == torch.float32

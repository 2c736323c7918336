"""VSD's camera-conditioned LoRA (ProlificDreamer/threestudio text-to-3D): ``Conditioning.camera`` and
``DiffusersPrior.add_lora(camera_dim=...)`` on the tiny random priors (CPU, offline; docs/design.md §4.2)."""
import math

import pytest
import torch

from baselines import VSDGuidance
from msd.denoiser import Conditioning
from msd.priors import CFGDenoiser, DiffusersPrior, LoRADenoiser, PromptDenoiser
from msd.rendering import look_at, spherical_to_cartesian

CAMERA_DIM = 16
PROMPTS = ["the cat", "a dog", "the dog"]


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def camera_prior(directory, seed=0, camera_dim=CAMERA_DIM) -> DiffusersPrior:
    """A fresh copy of the prior with a rank-2 LoRA (camera-conditioned unless ``camera_dim`` is None)."""
    prior = DiffusersPrior.from_pretrained(directory, device="cpu")
    prior.add_lora(rank=2, generator=seeded(seed), camera_dim=camera_dim)
    return prior


def cameras(azimuths_deg, elevation_deg=15.0, distance=1.5) -> torch.Tensor:
    """Flattened camera_to_world [B, 16] of cameras on an orbit looking at the origin (the threestudio input)."""
    azimuth = torch.deg2rad(torch.as_tensor(azimuths_deg, dtype=torch.float32))
    elevation = torch.full_like(azimuth, math.radians(elevation_deg))
    positions = spherical_to_cartesian(elevation, azimuth, torch.full_like(azimuth, distance))
    up = torch.tensor([0.0, 0.0, 1.0]).expand_as(positions)
    return look_at(positions, torch.zeros_like(positions), up).flatten(1)


def perturb_camera_embedding(prior, seed=1, scale=0.3):
    """Give E_φ's zero last layer random weights, so that the camera changes ε̂_φ."""
    generator = seeded(seed)
    with torch.no_grad():
        for parameter in prior.camera_embedding.linear_2.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


def draw(prior, n, seed=0):
    return torch.randn(n, *prior.sample_shape, generator=seeded(seed))


@pytest.fixture(scope="module")
def latent_dir(tiny_prior_dirs):
    return tiny_prior_dirs["latent"]


# --- Conditioning.camera ---------------------------------------------------------------------------------------

def test_conditioning_carries_cameras_through_repeat_and_rows():
    shared_text, text = torch.randn(1, 4, 8), torch.randn(3, 4, 8)
    shared_camera, camera = torch.randn(1, CAMERA_DIM), torch.randn(3, CAMERA_DIM)
    index = torch.tensor([2, 0])

    plain = Conditioning(text)  # camera None: unchanged behaviour
    assert plain.camera is None and len(plain) == 3 and plain.repeat(2).camera is None
    assert torch.equal(plain.repeat(2).embeddings, text.repeat(2, 1, 1))
    assert plain.rows(index).camera is None and torch.equal(plain.rows(index).embeddings, text[index])
    assert Conditioning(shared_text).repeat(5).embeddings is shared_text

    one_prompt_many_views = Conditioning(shared_text, camera)
    assert len(one_prompt_many_views) == 3
    tiled = one_prompt_many_views.repeat(2)
    assert tiled.embeddings is shared_text and torch.equal(tiled.camera, camera.repeat(2, 1)) and len(tiled) == 6
    picked = one_prompt_many_views.rows(index)
    assert picked.embeddings is shared_text and torch.equal(picked.camera, camera[index])
    assert torch.equal(one_prompt_many_views.rows(slice(1, 3)).camera, camera[1:3])

    many_prompts_one_view = Conditioning(text, shared_camera)
    tiled = many_prompts_one_view.repeat(2)
    assert torch.equal(tiled.embeddings, text.repeat(2, 1, 1)) and tiled.camera is shared_camera
    picked = many_prompts_one_view.rows(index)
    assert torch.equal(picked.embeddings, text[index]) and picked.camera is shared_camera

    per_row = Conditioning(text, camera)
    assert torch.equal(per_row.repeat(3).camera, camera.repeat(3, 1))
    assert torch.equal(per_row.rows(index).camera, camera[index])
    shared = Conditioning(shared_text, shared_camera)
    assert len(shared) == 1 and shared.repeat(4) is shared and shared.rows(index) is shared


@pytest.mark.parametrize("camera", [torch.randn(16), torch.randn(3, 4, 4), torch.randn(2, 16),
                                    torch.zeros(3, 16, dtype=torch.long), [[0.0] * 16]],
                         ids=["1d", "3d", "rows", "integer", "list"])
def test_conditioning_rejects_bad_cameras(camera):
    with pytest.raises(ValueError, match="Conditioning.camera"):
        Conditioning(torch.randn(3, 4, 8), camera)


# --- the camera-conditioned LoRA -------------------------------------------------------------------------------

def test_add_lora_camera_embedding_draws_from_its_generator(latent_dir):
    global_state = torch.random.get_rng_state()
    a, b = camera_prior(latent_dir, seed=3), camera_prior(latent_dir, seed=3)
    assert torch.equal(torch.random.get_rng_state(), global_state)  # no draw from the global RNG
    params_a, params_b = a.lora_parameters(), b.lora_parameters()
    assert len(params_a) == len(params_b) and all(torch.equal(p, q) for p, q in zip(params_a, params_b))

    embedding = a.camera_embedding
    width = a.unet.time_embedding.linear_2.out_features
    assert (embedding.linear_1.in_features, embedding.linear_1.out_features) == (CAMERA_DIM, width)
    assert embedding.linear_2.out_features == width
    assert params_a[-4:] == list(embedding.parameters())  # part of the LoRA's parameters, after the adapter's
    assert all(p.dtype == torch.float32 and p.device == a.device and p.requires_grad for p in embedding.parameters())
    first = torch.cat([embedding.linear_1.weight.flatten(), embedding.linear_1.bias])
    assert first.abs().max() <= 1 / math.sqrt(CAMERA_DIM) and first.std() > 0.1 / math.sqrt(CAMERA_DIM)
    assert not embedding.linear_2.weight.any() and not embedding.linear_2.bias.any()

    plain = camera_prior(latent_dir, seed=3, camera_dim=None)  # E_φ is drawn after A: the LoRA is the same
    assert all(torch.equal(p, q) for p, q in zip(plain.lora_parameters(), params_a, strict=False))
    assert len(plain.lora_parameters()) == len(params_a) - 4 and plain.camera_embedding is None
    other = camera_prior(latent_dir, seed=4)
    assert not torch.equal(other.camera_embedding.linear_1.weight, embedding.linear_1.weight)
    with pytest.raises(ValueError, match="camera_dim"):
        camera_prior(latent_dir, camera_dim=0)


def test_at_init_the_camera_lora_is_the_prior_bitwise(latent_dir, tiny_latent_prior):
    prior = camera_prior(latent_dir)
    x, sigma = draw(prior, 3, 1), torch.tensor([0.1, 1.0, 8.0])
    embeddings = prior.conditioning(PROMPTS).embeddings
    with torch.no_grad():
        reference = tiny_latent_prior.denoiser().condition(Conditioning(embeddings)).eps(x, sigma)
        for camera in (torch.randn(3, CAMERA_DIM, generator=seeded(2)), cameras([0.0]), cameras([0, 120, -120])):
            particles = prior.lora_denoiser().condition(Conditioning(embeddings, camera))
            assert torch.equal(particles.camera, camera)
            assert torch.equal(particles.eps(x, sigma), reference)


def test_the_camera_reaches_only_the_lora_view(latent_dir):
    prior = camera_prior(latent_dir)
    perturb_camera_embedding(prior)
    x, sigma = draw(prior, 2, 3), torch.tensor([0.5, 2.0])
    embeddings = prior.conditioning(PROMPTS[:2]).embeddings
    front, back = cameras([0.0, 0.0]), cameras([180.0, 180.0])
    particles = prior.lora_denoiser()
    with torch.no_grad():
        eps_front = particles.condition(Conditioning(embeddings, front)).eps(x, sigma)
        eps_back = particles.condition(Conditioning(embeddings, back)).eps(x, sigma)
        eps_none = particles.condition(Conditioning(embeddings)).eps(x, sigma)
        assert torch.equal(eps_front, particles.condition(Conditioning(embeddings, front)).eps(x, sigma))
        for a, b in ((eps_front, eps_back), (eps_front, eps_none), (eps_back, eps_none)):
            assert (a - b).abs().amax() > 1e-4
        # per-row cameras act row by row; a shared camera is that camera on every row
        mixed = particles.condition(Conditioning(embeddings, torch.cat([front[:1], back[:1]]))).eps(x, sigma)
        assert torch.allclose(mixed[0], eps_front[0], atol=1e-6) and torch.allclose(mixed[1], eps_back[1], atol=1e-6)
        assert torch.allclose(particles.condition(Conditioning(embeddings, front[:1])).eps(x, sigma), eps_front,
                              atol=1e-6)
        # the frozen prior's views (prompt and CFG) ignore the camera
        for scale in (1.0, 3.0):
            prior_view = prior.denoiser(scale)
            plain = prior_view.condition(Conditioning(embeddings)).eps(x, sigma)
            assert torch.equal(prior_view.condition(Conditioning(embeddings, front)).eps(x, sigma), plain)
            assert torch.equal(prior_view.condition(Conditioning(embeddings, back)).eps(x, sigma), plain)


def test_the_camera_term_is_diffusers_class_embedding(latent_dir):
    """emb = time_embedding(t) + E_φ(camera): the same UNet with E_φ as its own ``class_embedding``
    (class_embed_type None, threestudio's construction) and ``class_labels=camera`` gives the same output."""
    prior = camera_prior(latent_dir)
    perturb_camera_embedding(prior)
    with torch.no_grad():
        for parameter in prior.lora_parameters()[:-4]:  # a non-trivial LoRA too
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=seeded(5)))
    assert prior.unet.config.class_embed_type is None and prior.unet.class_embedding is None
    x, sigma = draw(prior, 3, 4), torch.tensor([0.2, 1.0, 5.0])
    embeddings = prior.conditioning(PROMPTS).embeddings
    z = x / torch.sqrt(1 + sigma**2)[:, None, None, None]
    timestep = prior.schedule.timestep(sigma)
    for camera in (cameras([0, 90, 200]), cameras([45.0])):
        with torch.no_grad():
            ours = prior.eps(x, sigma, embeddings, adapters=True, camera=camera)
            prior._set_adapters(True)
            prior.unet.class_embedding = prior.camera_embedding
            try:
                reference = prior.unet(z.contiguous(memory_format=prior.memory_format), timestep,
                                       encoder_hidden_states=embeddings,
                                       class_labels=camera.expand(3, -1)).sample
            finally:
                prior.unet.class_embedding = None
                prior._set_adapters(False)
            without = prior.eps(x, sigma, embeddings, adapters=True)
        assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)
        assert (ours - without).abs().amax() > 1e-3  # ...and the camera term is not negligible here


def test_a_cfg_pair_of_lora_views_stacks_the_cameras(latent_dir):
    prior = camera_prior(latent_dir)
    perturb_camera_embedding(prior)
    x, sigma = draw(prior, 2, 6), torch.tensor([0.7, 3.0])
    conditional = prior.conditioning(PROMPTS[:2]).embeddings
    empty = prior.conditioning("").embeddings
    camera, null_camera = cameras([30.0, -60.0]), torch.zeros(1, CAMERA_DIM)
    main = LoRADenoiser(prior, conditional, camera=camera)
    guide = LoRADenoiser(prior, empty, unconditional=True, camera=null_camera)
    with torch.no_grad():
        batched = CFGDenoiser(main, guide, 4.0).eps(x, sigma)  # one UNet forward on [x; x]
        eps_main, eps_guide = main.eps(x, sigma), guide.eps(x, sigma)
    assert torch.allclose(batched, eps_guide + 4.0 * (eps_main - eps_guide), atol=1e-5)
    with pytest.raises(ValueError, match="camera"):
        CFGDenoiser(main, LoRADenoiser(prior, empty, unconditional=True), 4.0).eps(x, sigma)


def test_the_camera_never_leaks_into_the_next_call(latent_dir):
    prior = camera_prior(latent_dir)
    perturb_camera_embedding(prior)
    x, sigma = draw(prior, 2, 7), torch.tensor([0.3, 1.5])
    cond = prior.conditioning(PROMPTS[:2])
    particles = prior.lora_denoiser()
    with torch.no_grad():
        fresh = particles.condition(cond).eps(x, sigma)
        fresh_prior = prior.denoiser(3.0).condition(cond).eps(x, sigma)
        with_camera = particles.condition(Conditioning(cond.embeddings, cameras([10.0, 100.0]))).eps(x, sigma)
        assert not torch.equal(with_camera, fresh)
        assert torch.equal(particles.condition(cond).eps(x, sigma), fresh)
        assert torch.equal(prior.denoiser(3.0).condition(cond).eps(x, sigma), fresh_prior)

        calls = []

        def fail(camera):
            calls.append(camera.shape)
            raise RuntimeError("boom")

        embedding = prior.camera_embedding
        embedding.forward = fail  # a forward that fails half-way still clears the call's camera
        with pytest.raises(RuntimeError, match="boom"):
            particles.condition(Conditioning(cond.embeddings, cameras([0.0]))).eps(x, sigma)
        del embedding.forward
        assert calls == [(1, CAMERA_DIM)] and prior._call_camera is None
        assert torch.equal(particles.condition(cond).eps(x, sigma), fresh)


def test_camera_errors_are_clear(latent_dir, tiny_latent_prior):
    x, sigma = draw(tiny_latent_prior, 2, 8), torch.tensor([0.5, 1.0])
    embeddings = tiny_latent_prior.conditioning(PROMPTS[:2]).embeddings
    camera = cameras([0.0, 90.0])
    plain_lora = camera_prior(latent_dir, camera_dim=None)
    with pytest.raises(ValueError, match="camera: this prior's LoRA has no camera embedding"):
        plain_lora.lora_denoiser().condition(Conditioning(embeddings, camera)).eps(x, sigma)
    plain_lora.lora_denoiser().condition(Conditioning(embeddings)).eps(x, sigma)  # no camera: fine

    prior = camera_prior(latent_dir)
    with pytest.raises(ValueError, match="camera: only the LoRA view"):
        prior.eps(x, sigma, embeddings, adapters=False, camera=camera)
    with pytest.raises(ValueError, match="camera: only the LoRA view"):
        PromptDenoiser(prior, embeddings, camera=camera)
    with pytest.raises(ValueError, match=r"camera must be \[1 or 2, 16\]"):
        prior.eps(x, sigma, embeddings, adapters=True, camera=torch.zeros(2, 12))
    with pytest.raises(ValueError, match=r"camera must be \[1 or 2, 16\]"):
        prior.lora_denoiser().condition(Conditioning(embeddings[:1], cameras([0, 90, 180]))).eps(x, sigma)
    assert prior._call_camera is None


# --- VSD: training and checkpoints -----------------------------------------------------------------------------

def test_vsd_trains_the_camera_embedding(latent_dir):
    prior = camera_prior(latent_dir)
    embedding = prior.camera_embedding
    x = draw(prior, 2, 9)
    cond = Conditioning(prior.conditioning("the cat").embeddings, cameras([0.0, 180.0]))
    vsd = VSDGuidance(prior.denoiser(), particle_model=prior.lora_denoiser(), phi_lr=1e-2, phi_steps=1)
    assert {id(p) for p in embedding.parameters()} <= {id(p) for p in vsd._phi_parameters()}
    before = [p.detach().clone() for p in embedding.parameters()]
    first = vsd(x, 0, seeded(10), cond)
    assert torch.equal(first.target, x)  # ε̂_φ starts as the prior, camera term included
    # one step: the loss reaches E_φ; its first layer's gradient is zero until the last layer is not
    grads = {name: p.grad for name, p in embedding.named_parameters()}
    assert grads["linear_2.weight"].abs().amax() > 0 and grads["linear_2.bias"].abs().amax() > 0
    assert not grads["linear_1.weight"].any()
    vsd.train_particle_model(x, seeded(11), cond)  # a second step moves the first layer too
    assert embedding.linear_1.weight.grad.abs().amax() > 0
    assert all(not torch.equal(p, q) for p, q in zip(embedding.parameters(), before))

    # without a camera in the conditioning the embedding takes no part (no gradient, unchanged by Adam)
    unused = camera_prior(latent_dir)
    vsd = VSDGuidance(unused.denoiser(), particle_model=unused.lora_denoiser(), phi_lr=1e-2, phi_steps=2)
    vsd(x, 0, seeded(10), unused.conditioning("the cat"))
    assert all(p.grad is None for p in unused.camera_embedding.parameters())
    assert not unused.camera_embedding.linear_2.weight.any()


def test_vsd_resume_restores_the_camera_embedding_bitwise(latent_dir):
    runs = []
    for seed in (0, 7):  # the resumed run starts from a different LoRA/E_φ init: the checkpoint must overwrite it
        prior = camera_prior(latent_dir, seed=seed)
        cond = Conditioning(prior.conditioning("a dog").embeddings, cameras([20.0, -150.0]))
        runs.append((prior, cond, VSDGuidance(prior.denoiser(2.0), particle_model=prior.lora_denoiser(),
                                              phi_lr=1e-2, phi_steps=2)))
    (prior_a, cond, vsd_a), (prior_b, _, vsd_b) = runs
    x = draw(prior_a, 2, 12)
    for step in range(2):
        vsd_a(x, step, seeded(13 + step), cond)
    state = vsd_a.state_dict()
    assert len(state["parameters"]) == len(prior_a.lora_parameters())
    assert all(torch.equal(saved, p) for saved, p in zip(state["parameters"][-4:],
                                                         prior_a.camera_embedding.parameters()))
    vsd_b.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(prior_a.lora_parameters(), prior_b.lora_parameters(), strict=True))
    out_a, out_b = vsd_a(x, 2, seeded(20), cond), vsd_b(x, 2, seeded(20), cond)
    assert torch.equal(out_a.target, out_b.target) and out_a.aux["phi_loss"] == out_b.aux["phi_loss"]
    assert all(torch.equal(p, q) for p, q in zip(prior_a.lora_parameters(), prior_b.lora_parameters(), strict=True))

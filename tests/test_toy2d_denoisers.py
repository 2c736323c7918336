"""Toy denoisers: the exact mixture denoiser, the energy MLP, its training and the committed weights."""
import pytest
import torch

import toy2d.denoisers as denoisers
from msd.denoiser import Denoiser
from toy2d import ExactDenoiser, GaussianMixture, MLPDenoiser, fractal_gmm, load_denoiser
from toy2d.denoisers import score_matching_loss, train_mlp_denoiser


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_exact_denoiser_of_one_gaussian_is_the_closed_form():
    """p = N(μ, s²I): ε̂(x, σ) = σ (x − μ)/(s² + σ²) and Tweedie's D(x, σ) = μ + (x − μ) s²/(s² + σ²); on the fractal
    mixture ε̂ is exactly 0 at σ = 0."""
    mean, var = torch.tensor([0.3, -0.2], dtype=torch.float64), 0.16
    den = ExactDenoiser(GaussianMixture(torch.ones(1, dtype=torch.float64), mean[None],
                                        var * torch.eye(2, dtype=torch.float64)[None]))
    assert isinstance(den, Denoiser)
    sigma = torch.exp(torch.linspace(-5.0, 1.0, 64, dtype=torch.float64))
    x = mean + (var + sigma[:, None] ** 2).sqrt() * torch.randn(64, 2, generator=_gen(), dtype=torch.float64)
    shrink = (var + sigma[:, None] ** 2)
    torch.testing.assert_close(den.eps(x, sigma), sigma[:, None] * (x - mean) / shrink, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(den.denoise(x, sigma), mean + (x - mean) * var / shrink, rtol=1e-9, atol=1e-12)
    fractal = ExactDenoiser(fractal_gmm("A"))
    x = fractal_gmm("A").sample(64, generator=_gen(1))
    assert torch.equal(fractal.eps(x, torch.zeros(64)), torch.zeros(64, 2))


@pytest.mark.parametrize("sigma", [0.0, 0.01, 0.5, 3.0, "per_sample"])
def test_mlp_at_init_is_the_gaussian(sigma):
    net = MLPDenoiser(hidden=16, layers=2).eval()
    x = 2.0 * torch.randn(128, 2, generator=_gen())
    if sigma == "per_sample":
        sigma = torch.exp(torch.linspace(-9.0, 2.0, 128))
    sig = torch.as_tensor(sigma).expand(128)
    with torch.no_grad():
        score, eps = net.score(x, sigma), net.eps(x, sig)
    torch.testing.assert_close(score, -x / (0.25 + sig[:, None] ** 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eps, sig[:, None] * x / (0.25 + sig[:, None] ** 2), rtol=1e-6, atol=1e-6)
    assert not score.requires_grad and torch.isfinite(score).all()


def test_mlp_score_is_gradient_and_trainable():
    net = MLPDenoiser(hidden=16, layers=2, seed=3)
    with torch.no_grad():
        net.gain.fill_(0.7)
    x, sigma = torch.randn(32, 2, generator=_gen()), torch.full((32,), 0.2)
    xg = x.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(net.log_prob(xg, sigma).sum(), xg)
    torch.testing.assert_close(net.eval().score(x, sigma), reference)
    assert torch.equal(net.eps(x, torch.zeros(32)), torch.zeros(32, 2))
    net.train().score(x, sigma).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_training_is_deterministic_and_learns():
    mix = fractal_gmm("A")
    kwargs = dict(hidden=16, layers=2, iterations=4, batch=64, seed=5)
    a, b = train_mlp_denoiser(mix, **kwargs), train_mlp_denoiser(mix, **kwargs)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    c = train_mlp_denoiser(mix, **{**kwargs, "seed": 6})
    assert not torch.equal(a.gain, c.gain)

    losses = []
    trained = train_mlp_denoiser(mix, hidden=16, layers=2, iterations=60, batch=256, seed=0,
                                 on_step=lambda i, loss: losses.append(loss))
    assert len(losses) == 60
    sigma = torch.exp(-2.3 + 1.5 * torch.randn(4096, generator=_gen(7)))
    x = mix.sample(4096, sigma, generator=_gen(8))
    assert score_matching_loss(trained, mix, x, sigma) < 0.8 * score_matching_loss(MLPDenoiser(16, 2), mix, x, sigma)


@pytest.mark.parametrize("name, classes, ratio", [("A", "A", 0.1), ("AB", "AB", 1.0), ("A_weak", "A", 1.0)])
def test_committed_weights_beat_init(name, classes, ratio):
    """At σ ∈ {0.05, 0.2, 1.0} the trained score is closer to the exact one than the untrained Gaussian's.

    The main model by a factor 10; the guides are deliberately weak (EDM2: 4 × 32, 512 iterations) and the
    two-class mixture is nearly Gaussian at σ = 1, so for them strict improvement is the property.
    """
    net = load_denoiser(name)
    assert isinstance(net, MLPDenoiser) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    mix = fractal_gmm(classes)
    init = MLPDenoiser(**net.config).eval()
    for sigma in (0.05, 0.2, 1.0):
        sig = torch.full((4096,), sigma)
        x = mix.sample(4096, sig, generator=_gen(9))
        trained_loss = score_matching_loss(net, mix, x, sig)
        init_loss = score_matching_loss(init, mix, x, sig)
        assert trained_loss < ratio * init_loss, (sigma, trained_loss, init_loss)


def test_main_model_beats_weak_guide():
    mix = fractal_gmm("A")
    sigma = torch.exp(-2.3 + 1.5 * torch.randn(8192, generator=_gen(10)))
    x = mix.sample(8192, sigma, generator=_gen(11))
    main, weak = (score_matching_loss(load_denoiser(name), mix, x, sigma) for name in ("A", "A_weak"))
    assert main < weak


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="A_weak"):
        load_denoiser("B")
    monkeypatch.setattr(denoisers, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="make toy2d-weights"):
        load_denoiser("A")

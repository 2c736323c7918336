"""Image generators: shapes, seeded determinism, gradients, independence of the B images."""
import pytest
import torch

from msd.generators import FourierImageMLP, ImageGrid


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def small_mlp(seed=0, **kwargs):
    settings = dict(batch=3, channels=4, height=6, width=10, hidden=16, layers=2, num_frequencies=8,
                    output="none", generator=seeded(seed))
    return FourierImageMLP(**{**settings, **kwargs})


@pytest.mark.parametrize("build", [
    lambda seed: ImageGrid(3, 4, 6, 10, generator=seeded(seed)),
    lambda seed: small_mlp(seed),
])
def test_shape_determinism_and_gradients(build):
    a, b, c = build(0), build(0), build(1)
    image = a()
    assert image.shape == (3, 4, 6, 10)
    assert torch.equal(image, b())
    assert not torch.equal(image, c())
    image.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.parameters())


def test_image_grid_initialisation():
    assert torch.equal(ImageGrid(2, 3, 4, 4, init_std=0.0)(), torch.zeros(2, 3, 4, 4))
    grid = ImageGrid(2, 4, 64, 64, init_std=0.5, generator=seeded(3))().detach()
    assert abs(float(grid.std()) - 0.5) < 0.02 and abs(float(grid.mean())) < 0.02


@pytest.mark.parametrize("output,lo,hi", [("tanh", -1.0, 1.0), ("sigmoid", 0.0, 1.0)])
def test_fourier_output_range(output, lo, hi):
    image = small_mlp(output=output, frequency_std=3.0)().detach()
    assert float(image.min()) >= lo and float(image.max()) <= hi
    assert float(image.std()) > 1e-3  # not collapsed to a constant


def test_fourier_images_are_independent_networks():
    """∂(image i)/∂(parameters of network j) = 0 for i ≠ j (the leading dim of every parameter is b)."""
    mlp = small_mlp()
    for i in range(3):
        mlp.zero_grad()
        mlp()[i].sum().backward()
        for parameter in mlp.parameters():
            others = torch.cat([parameter.grad[:i], parameter.grad[i + 1:]])
            assert torch.all(others == 0) and parameter.grad[i].abs().sum() > 0


@pytest.mark.parametrize("kwargs,field", [
    ({"batch": 0}, "generator.batch"), ({"height": 0}, "generator.height"),
    ({"output": "relu"}, "generator.output"), ({"num_frequencies": 0}, "generator.num_frequencies"),
    ({"frequency_std": 0.0}, "generator.frequency_std"), ({"layers": 0}, "generator.hidden/layers"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        small_mlp(**kwargs)
    if field in ("generator.batch", "generator.height"):
        with pytest.raises(ValueError, match=field):
            ImageGrid(**{"batch": 1, "channels": 3, "height": 4, "width": 4, **kwargs})

"""Image generators g(ψ) for text-to-2D: ``forward()`` renders B independent images [B, C, H, W].

* :class:`ImageGrid` — the raw sample as parameters (pixels or VAE latents).
* :class:`FourierImageMLP` — a coordinate MLP per image ("2D NeRF", the paper's parameterisation):
  pixel centres p ∈ [−1, 1]² → random Fourier features → ReLU MLP → C channels, with the B networks
  evaluated at once by batched matmuls.

Initialisation is drawn from a ``torch.Generator`` (never the global RNG), on the generator's device, where the
module's parameters are created: same seed, same images.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from msd.checks import require

OUTPUT_RANGES = ("tanh", "sigmoid", "none")


def _device_of(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _check_shape(batch: int, channels: int, height: int, width: int) -> None:
    for field, value in (("batch", batch), ("channels", channels), ("height", height), ("width", width)):
        require(isinstance(value, int) and value >= 1, f"generator.{field}", "an integer >= 1", value)


class ImageGrid(nn.Module):
    """ψ = the image itself: a [B, C, H, W] parameter initialised i.i.d. N(0, init_std²)
    (``init_std = 0``: all zeros, i.e. mid-grey pixels in [−1, 1]; 1 suits SD latents)."""

    def __init__(self, batch: int, channels: int, height: int, width: int, init_std: float = 1.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        _check_shape(batch, channels, height, width)
        require(init_std >= 0, "generator.init_std", ">= 0", init_std)
        device = _device_of(generator)
        self.image = nn.Parameter(init_std * torch.randn(batch, channels, height, width, generator=generator,
                                                         device=device))

    def forward(self) -> Tensor:
        return self.image


class FourierImageMLP(nn.Module):
    """B independent coordinate MLPs ``f_b(γ_b(p))`` rendered on an H×W grid of pixel centres.

    Features ``γ_b(p) = [sin 2π F_b p, cos 2π F_b p]`` with fixed frequencies ``F_b ~ N(0, frequency_std²)``
    [num_frequencies, 2] per network (Tancik et al. 2020); ``layers`` ReLU layers of width ``hidden``,
    then a linear head to C channels mapped by ``output``: ``tanh`` → (−1, 1) (pixels), ``sigmoid`` →
    (0, 1), ``none`` → unbounded (latents). Weights and biases ~ U(±1/√fan_in) (PyTorch's Linear default).
    """

    def __init__(self, batch: int, channels: int, height: int, width: int, hidden: int = 128, layers: int = 3,
                 num_frequencies: int = 64, frequency_std: float = 10.0, output: str = "tanh",
                 generator: torch.Generator | None = None):
        super().__init__()
        _check_shape(batch, channels, height, width)
        require(hidden >= 1 and layers >= 1, "generator.hidden/layers", "integers >= 1", (hidden, layers))
        require(num_frequencies >= 1, "generator.num_frequencies", ">= 1", num_frequencies)
        require(frequency_std > 0, "generator.frequency_std", "> 0", frequency_std)
        require(output in OUTPUT_RANGES, "generator.output", f"one of {OUTPUT_RANGES}", output)
        self.shape, self.output = (channels, height, width), output
        device = _device_of(generator)
        ys = (torch.arange(height, device=device) + 0.5) / height * 2 - 1
        xs = (torch.arange(width, device=device) + 0.5) / width * 2 - 1
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)
        self.register_buffer("coords", grid)  # [H·W, 2] as (y, x)
        self.register_buffer("frequencies", frequency_std * torch.randn(batch, num_frequencies, 2,
                                                                       generator=generator, device=device))
        widths = [2 * num_frequencies] + [hidden] * layers + [channels]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            weight = torch.rand(batch, fan_in, fan_out, generator=generator, device=device)
            bias = torch.rand(batch, 1, fan_out, generator=generator, device=device)
            self.weights.append(nn.Parameter(bound * (2 * weight - 1)))
            self.biases.append(nn.Parameter(bound * (2 * bias - 1)))

    def forward(self) -> Tensor:
        phase = 2 * math.pi * torch.einsum("pk,bfk->bpf", self.coords, self.frequencies)  # [B, H·W, F]
        h = torch.cat([phase.sin(), phase.cos()], dim=-1)
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(bias, h, weight)
            if i < len(self.weights) - 1:
                h = torch.relu(h)
        if self.output == "tanh":
            h = torch.tanh(h)
        elif self.output == "sigmoid":
            h = torch.sigmoid(h)
        channels, height, width = self.shape
        return h.transpose(1, 2).reshape(-1, channels, height, width)

"""ShapesWorld metrics on images [B, 3, R, R] in [-1, 1] (library functions, no file I/O).

* :func:`prompt_accuracy` — does the image show its prompt's shape *and* colour, per the classifier?
* :func:`mode_alignment_distance` — how far is the image from the nearest clean world render of its
  prompt (one mode of the prompt's distribution)? A crisp, well-placed shape scores ≈ 0, a blurry
  average of modes scores high.
"""
from __future__ import annotations

import torch
from torch import Tensor

from shapes.world import COLOURS, SIZE_RANGE, SOFTNESS, as_prompt_ids, render, split_prompt_ids


@torch.no_grad()
def prompt_accuracy(classifier, images: Tensor, prompt_ids: Tensor, batch: int = 512) -> float:
    """Fraction of images whose predicted (shape, colour) both match their prompt's.

    ``classifier(images)`` must return (shape logits [B, 3], colour logits [B, 4]) (see
    :class:`shapes.models.ShapesClassifier`); ``prompt_ids`` [B] index :data:`shapes.world.PROMPTS`.
    """
    prompt_ids = as_prompt_ids(prompt_ids)
    if images.ndim != 4 or images.shape[0] != prompt_ids.shape[0]:
        raise ValueError(f"images must be [B, 3, H, W] with B = len(prompt_ids) = {prompt_ids.shape[0]}, "
                         f"got {tuple(images.shape)}")
    correct = 0
    for chunk, ids in zip(images.split(batch), prompt_ids.split(batch)):
        shape_logits, colour_logits = classifier(chunk)
        predicted = shape_logits.argmax(1) * len(COLOURS) + colour_logits.argmax(1)
        correct += int((predicted == ids).sum())
    return correct / prompt_ids.shape[0]


def _rms(images: Tensor, renders: Tensor) -> Tensor:
    """Per-image RMS difference over channels and pixels: √(mean (a − b)²), [B]."""
    return (images - renders).pow(2).flatten(1).mean(1).sqrt()


def _clamp_to_world(centre: Tensor, size: Tensor, size_range: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """Project (centre, size) onto the world's support: r ∈ size_range, c ∈ [r, 1 − r]²."""
    size = size.clamp(*size_range)
    return torch.maximum(torch.minimum(centre, 1.0 - size.unsqueeze(1)), size.unsqueeze(1)), size


def mode_alignment_distance(images: Tensor, prompt_ids: Tensor, size_range: tuple[float, float] = SIZE_RANGE,
                            grid_positions: int = 13, grid_sizes: int = 8, refine_steps: int = 50,
                            refine_lr: float = 0.01, softness: float = SOFTNESS) -> Tensor:
    """Per-image RMS pixel distance [B] (pixel units of the [-1, 1] range) to the nearest clean render.

    d(x) = min over (c, r) in the world's support (r ∈ size_range, c ∈ [r, 1 − r]²) of
    √(mean over channels and pixels of (x − render(shape, colour, c, r))²), with shape and colour fixed
    by the prompt. Search: (1) a coarse grid of ``grid_sizes`` sizes (linearly spaced over size_range) ×
    ``grid_positions``² centres (linearly spaced over [r, 1 − r] per axis); (2) from the best grid point,
    ``refine_steps`` Adam steps on (c, r) through the differentiable renderer, learning rate decayed
    linearly from ``refine_lr`` (canvas units) to 0, projected back onto the support after each step.
    Returns the smaller of the grid and refined distances (so refinement never worsens it).
    """
    prompt_ids = as_prompt_ids(prompt_ids)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be [B, 3, R, R], got {tuple(images.shape)}")
    if images.shape[0] != prompt_ids.shape[0]:
        raise ValueError(f"need one prompt id per image: {images.shape[0]} images, {prompt_ids.shape[0]} ids")
    if grid_positions < 1 or grid_sizes < 1 or refine_steps < 0:
        raise ValueError(f"need grid_positions >= 1, grid_sizes >= 1, refine_steps >= 0; got "
                         f"{grid_positions}, {grid_sizes}, {refine_steps}")
    images = images.detach().float()
    resolution = images.shape[-1]
    shape, colour = split_prompt_ids(prompt_ids)

    # (1) coarse grid, shared by all images of a prompt
    sizes = torch.linspace(size_range[0], size_range[1], grid_sizes)
    fractions = torch.linspace(0.0, 1.0, grid_positions)
    grid_size = sizes.repeat_interleave(grid_positions**2)
    fx, fy = torch.meshgrid(fractions, fractions, indexing="xy")
    fractions_xy = torch.stack([fx.reshape(-1), fy.reshape(-1)], 1).repeat(grid_sizes, 1)
    grid_centre = grid_size.unsqueeze(1) + (1.0 - 2.0 * grid_size.unsqueeze(1)) * fractions_xy
    centre, size = torch.empty(len(images), 2), torch.empty(len(images))
    grid_distance = torch.empty(len(images))
    for k in prompt_ids.unique():
        members = (prompt_ids == k).nonzero().squeeze(1)
        n = len(grid_size)
        candidates = render(shape[members[0]].expand(n), colour[members[0]].expand(n), grid_centre, grid_size,
                            resolution, softness).flatten(1)
        rms = torch.cdist(images[members].flatten(1), candidates).div(candidates.shape[1] ** 0.5)
        best_rms, best = rms.min(1)
        centre[members], size[members], grid_distance[members] = grid_centre[best], grid_size[best], best_rms

    if refine_steps == 0:
        return grid_distance
    # (2) gradient refinement of every image's (centre, size) at once
    centre, size = centre.clone().requires_grad_(True), size.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([centre, size], lr=refine_lr)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / refine_steps)
    for _ in range(refine_steps):
        loss = _rms(images, render(shape, colour, centre, size, resolution, softness)).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
        with torch.no_grad():
            projected_centre, projected_size = _clamp_to_world(centre, size, size_range)
            centre.copy_(projected_centre)
            size.copy_(projected_size)
    with torch.no_grad():
        refined = _rms(images, render(shape, colour, centre, size, resolution, softness))
    return torch.minimum(grid_distance, refined)

"""ShapesWorld-3D metrics from the classifier's readings of multi-view renders (library functions, no file I/O).

Predictions are class ids of :class:`shapes.models3d.ShapesClassifier3D`'s heads (:meth:`Logits3D.argmax`), laid
out ``[B, V]``: object b seen from view v.

* :func:`multiview_prompt_accuracy` — the fraction of objects whose shape *and* colour are read right from every
  view (one wrong view fails the object);
* :func:`view_accuracy` — the fraction of renders whose view (:data:`msd.rendering.VIEWS`) is read right;
* :func:`janus_count` — per object, the views that show its front colour where the true object cannot show its
  front face (:func:`front_hidden`).

Why the Janus count does not count every non-front view: a true probe cube ("a red cube with a blue front") shows
its front face, the +x face, from every camera with x > r, which includes the side views with |azimuth| < 90°
(threestudio's "side" is 45° < |azimuth| < 135°). Counting those would call the truth Janus. A front colour seen
from a camera with x ≤ r (every back view, the side views past 90°, for any size r ≥ 0 the cameras with x ≤ 0)
cannot come from the true object: a second face painted like the front.
"""
from __future__ import annotations

import torch
from torch import Tensor

from shapes.models3d import Logits3D


@torch.no_grad()
def classify(classifier, images: Tensor, batch: int = 512) -> Logits3D:
    """Predicted class ids of every head for images [..., 3, H, W] in [−1, 1]: each field shaped like the leading
    dimensions (e.g. [B, V] for B objects × V views)."""
    if images.ndim < 4 or images.shape[-3] != 3:
        raise ValueError(f"images must be [..., 3, H, W] in [-1, 1], got {tuple(images.shape)}")
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    parts = [classifier(chunk).argmax() for chunk in flat.split(batch)]
    return Logits3D(*(torch.cat(head).reshape(lead) for head in zip(*parts)))


def _check_views(predicted: Tensor, truth: Tensor, name: str) -> None:
    if predicted.ndim != 2 or truth.shape != predicted.shape[:1]:
        raise ValueError(f"{name}: predictions must be [B, V] with one truth per object [B], got "
                         f"{tuple(predicted.shape)} and {tuple(truth.shape)}")


def multiview_prompt_accuracy(shape_pred: Tensor, colour_pred: Tensor, shape: Tensor, colour: Tensor) -> float:
    """Fraction of the B objects whose predicted shape and colour [B, V] equal their prompt's (shape, colour [B])
    in all V views."""
    _check_views(shape_pred, shape, "shape")
    _check_views(colour_pred, colour, "colour")
    right = (shape_pred == shape.unsqueeze(1)) & (colour_pred == colour.unsqueeze(1))
    return right.all(1).float().mean().item()


def view_accuracy(view_pred: Tensor, view: Tensor) -> float:
    """Fraction of renders whose predicted view index equals the camera's (:func:`msd.rendering.view_indices`); any
    equal shapes."""
    if view_pred.shape != view.shape:
        raise ValueError(f"view predictions {tuple(view_pred.shape)} and views {tuple(view.shape)} differ in shape")
    return (view_pred == view).float().mean().item()


def front_hidden(camera_positions: Tensor, size: Tensor | float = 0.0, tolerance: float = 1e-6) -> Tensor:
    """Whether the front face (the plane x = r of a probe cube of size r, facing azimuth 0) is invisible from each
    camera: its x ≤ r (+ tolerance, so that a camera at azimuth ±90° counts as hidden despite cos's rounding).
    camera_positions [..., 3]; size broadcast against [...]. ``size=0`` (the default) marks only the cameras that
    hide the front of a probe of every size."""
    return camera_positions[..., 0] <= torch.as_tensor(size, dtype=camera_positions.dtype,
                                                       device=camera_positions.device) + tolerance


def janus_count(front_pred: Tensor, front_colour: Tensor, hidden: Tensor) -> Tensor:
    """Per object [B] (long), the views where the front-colour head reads the probe's front colour although the
    true object hides its front face there.

    front_pred [B, V]: front-head class ids (0 none, 1 + c colour c, :data:`shapes.models3d.FRONT_CLASSES`);
    front_colour [B]: each probe's front colour id; hidden [B, V] bool (:func:`front_hidden` of the cameras)."""
    _check_views(front_pred, front_colour, "front")
    if hidden.shape != front_pred.shape:
        raise ValueError(f"hidden must be [B, V] = {tuple(front_pred.shape)}, got {tuple(hidden.shape)}")
    return ((front_pred == front_colour.unsqueeze(1) + 1) & hidden.bool()).sum(1)

"""The toy 2D world: exact Gaussian mixtures, the fractal two-class mixture, spiral and pinwheel, and their denoisers.

Public API: :func:`fractal_gmm` (the Karras et al. 2024 tree mixture), :func:`spiral_gmm` and
:func:`pinwheel_gmm` (the other two toy datasets), :func:`toy_mixture` (the registry), :class:`GaussianMixture`
(exact heat-diffused density, score, sampling and product-with-kernel sampling),
:class:`ExactDenoiser`, :class:`MLPDenoiser` (both carry the toy's noise levels
``TOY_SCHEDULE``) and :func:`load_denoiser` (committed learned models).
"""
from toy2d.datasets import DATASETS, pinwheel_gmm, spiral_gmm, toy_mixture
from toy2d.denoisers import TOY_SCHEDULE, ExactDenoiser, MLPDenoiser, load_denoiser, train_mlp_denoiser
from toy2d.fractal import fractal_gmm
from toy2d.gmm import GaussianMixture

__all__ = ["DATASETS", "TOY_SCHEDULE", "ExactDenoiser", "GaussianMixture", "MLPDenoiser", "fractal_gmm", "load_denoiser",
           "pinwheel_gmm", "spiral_gmm", "toy_mixture", "train_mlp_denoiser"]

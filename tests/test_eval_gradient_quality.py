"""Gradient-quality metrics against the exact mean-shift vector, and the gradient_quality CSV."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from eval.gradient_quality import (
    COLUMNS,
    UniformSquareDenoiser,
    exact_mean_shift,
    figure,
    query_set,
    run_study,
    score_pool,
)
from eval.toy2d_figures import build_all
from experiments.io import save_figure, write_csv
from toy2d import fractal_gmm


def test_exact_sampler_converges_to_mean_shift():
    """Mean of N exact product samples → λ²∇log p*_λ: cosine → 1, NMSE → 0, unbiased, NMSE ≈ var/N."""
    mixture = fractal_gmm("A")
    x, _ = query_set(mixture, 32, 32, seed=1)
    lam = math.sqrt(0.1)
    m = exact_mean_shift(mixture, x, lam)
    # product mean − x is the same vector (closed form two ways)
    assert torch.allclose(mixture.product_mean(x.double(), lam) - x.double(), m.double(), atol=1e-5)
    draws = mixture.product_sample(x, lam, generator=torch.Generator().manual_seed(0), n_per_center=512) - x
    one, many = score_pool(draws, m, 1), score_pool(draws, m, 512)
    assert many["cos_median"] > 0.99 and many["nmse"] < 0.01
    assert one["nmse"] > 20 * many["nmse"]
    assert one["bias_nmse"] < 0.01
    assert abs(one["nmse"] - one["var_nmse"]) < 0.1 * one["nmse"]


def test_uniform_square_eps_matches_autograd():
    den = UniformSquareDenoiser()
    z = torch.tensor([[0.3, 0.3], [1.4, -0.8], [-2.5, 0.0], [4.0, 3.0]], dtype=torch.float64)
    for s in (0.05, 0.5, 3.0):
        zz = z.clone().requires_grad_(True)
        lo, hi = den.lo, den.hi
        normal = torch.distributions.Normal(0.0, 1.0)
        logq = torch.log(normal.cdf((hi - zz) / s) - normal.cdf((lo - zz) / s)).sum()
        (grad,) = torch.autograd.grad(logq, zz)
        finite = torch.isfinite(grad).all(dim=1)
        eps = den.eps(z, torch.full((4,), s, dtype=torch.float64))
        assert torch.isfinite(eps).all()
        assert torch.allclose(eps[finite], -s * grad[finite], rtol=1e-6, atol=1e-9)


def test_gradient_quality_csv_and_figure(tmp_path):
    frame = run_study(n_samples=8, n_canvas=8, msd_pool=2, cheap_pool=4, sdi_pool=2, lambdas=(0.1,),
                      solver_steps=(2, 4), denoisers=("learned",))
    assert list(frame.columns) == COLUMNS
    assert set(frame.method) == {"msd_product_ode", "msd_tweedie", "msd_ode", "msd_stable", "sds", "sdi", "vsd"}
    assert set(frame.queries) == {"all", "samples", "canvas"}
    ode = frame[(frame.method == "msd_ode") & (frame.num_samples == 1)]
    assert sorted(ode.nfe.unique()) == [2, 4]
    assert np.allclose(ode.var_nmse, 0.0)  # the ODE sampler is deterministic at λ = 0.1 (README)
    product = frame[(frame.method == "msd_product_ode") & (frame.num_samples == 1)]
    assert (product.var_nmse > 0.01).all()  # the product PF-ODE is a sampler: its draws vary
    tweedie = frame[frame.method == "msd_tweedie"]
    assert set(tweedie.nfe) == {1} and set(tweedie.num_samples) == {1}
    write_csv(tmp_path / "gradient_quality.csv", frame)
    assert list(pd.read_csv(tmp_path / "gradient_quality.csv").columns) == COLUMNS
    save_figure(tmp_path / "gradient_quality.png", figure(frame), dpi=40)
    assert (tmp_path / "gradient_quality.png").stat().st_size > 0
    write_csv(tmp_path / "studies" / "gradient_quality" / "gradient_quality.csv", frame)
    built = build_all(tmp_path / "no_runs", tmp_path / "studies", tmp_path / "results")
    assert built["gradient_quality.png"] == tmp_path / "studies" / "gradient_quality"
    assert (tmp_path / "results" / "gradient_quality.png").stat().st_size > 0

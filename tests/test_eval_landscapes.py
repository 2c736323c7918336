"""Least-squares (Poisson) integration of a field into a landscape, minima, and the landscapes CSV."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from eval.landscapes import (
    COLUMNS,
    SURFACES_FILE,
    figure,
    grid_points,
    grid_tensor,
    integrate_field,
    load_data,
    local_minima,
    run_landscapes,
    save_data,
)
from eval.toy2d_figures import build_all
from experiments.io import save_figure, write_csv
from toy2d import fractal_gmm


def test_exact_mean_shift_field_integrates_to_smoothed_log_density():
    """λ² ∇log p*_λ is a gradient: residual ≈ 0 and the potential is λ² log p*_λ up to a constant."""
    lam, n = math.sqrt(0.1), 48
    mixture = fractal_gmm("A")
    xs, ys, h = grid_points(n)
    x = grid_tensor(xs, ys).double()
    field = (lam**2 * mixture.score(x, lam)).numpy()
    phi, ratio = integrate_field(field[:, 0].reshape(n, n), field[:, 1].reshape(n, n), h)
    ref = lam**2 * mixture.log_prob(x, lam).numpy().reshape(n, n)
    ref = ref - ref.mean()
    assert ratio < 1e-2
    assert np.sqrt(((phi - ref) ** 2).mean()) / ref.std() < 1e-2


def test_curl_fields_are_not_integrable():
    xs, ys, h = grid_points(32)
    gx, gy = np.meshgrid(xs, ys, indexing="xy")
    cx, cy = 0.5 * (xs[0] + xs[-1]), 0.5 * (ys[0] + ys[-1])
    assert integrate_field(-(gy - cy), gx - cx, h)[1] > 0.9  # rotation (−y, x) about the centre
    # divergence-free and tangential to the boundary: orthogonal to every discrete gradient
    size = xs[-1] - xs[0]
    u, v = (gx - xs[0]) / size, (gy - ys[0]) / size
    sx = np.pi / size * np.sin(np.pi * u) * np.cos(np.pi * v)
    sy = -np.pi / size * np.cos(np.pi * u) * np.sin(np.pi * v)
    assert integrate_field(sx, sy, h)[1] > 0.99
    # and a smooth gradient is recovered
    phi, ratio = integrate_field(np.cos(gx) * np.exp(gy), np.sin(gx) * np.exp(gy), h)
    ref = np.sin(gx) * np.exp(gy)
    assert ratio < 1e-2
    assert np.abs(phi - (ref - ref.mean())).max() < 1e-2 * ref.std()


def test_local_minima_interior_8_neighbourhood():
    values = np.ones((6, 6))
    values[2, 3] = 0.0
    values[0, 0] = -1.0  # border: ignored
    assert local_minima(values).tolist() == [[2, 3]]


def test_landscapes_csv_and_figure(tmp_path):
    torch.manual_seed(0)
    frame, data = run_landscapes(n=12, lambdas=(0.1,), denoiser_name="learned",
                                 repeats={"sds": 2, "vsd": 2, "sdi": 1, "msd_product_ode": 2})
    assert list(frame.columns) == COLUMNS
    assert set(frame.method) == {"exact_field", "sds", "sdi", "vsd", "msd_product_ode", "msd_tweedie", "msd_ode"}
    assert frame.loc[frame.method == "exact_field", "residual_ratio"].iloc[0] < 0.05
    assert frame.residual_ratio.between(0, 1).all() and frame.corr_exact.between(-1, 1).all()
    write_csv(tmp_path / "landscapes.csv", frame)
    assert list(pd.read_csv(tmp_path / "landscapes.csv").columns) == COLUMNS
    save_figure(tmp_path / "landscape_learned.png", figure(data, frame), dpi=40)
    assert (tmp_path / "landscape_learned.png").stat().st_size > 0
    # the raw surfaces round-trip exactly, and the figure builder redraws from the study directory alone
    study = tmp_path / "studies" / "landscapes_learned"
    save_data(study / SURFACES_FILE, data)
    write_csv(study / "landscapes.csv", frame)
    loaded = load_data(study / SURFACES_FILE)
    assert loaded["denoiser"] == "learned" and list(loaded["per_lambda"]) == list(data["per_lambda"])
    for lam, entry in data["per_lambda"].items():
        assert np.array_equal(loaded["per_lambda"][lam]["modes"], entry["modes"])
        assert loaded["per_lambda"][lam]["surfaces"].keys() == entry["surfaces"].keys()
        for name, surface in entry["surfaces"].items():
            assert np.array_equal(loaded["per_lambda"][lam]["surfaces"][name], surface)
    built = build_all(tmp_path / "no_runs", tmp_path / "studies", tmp_path / "results")
    assert built["landscape_learned.png"] == study and built["figure_grid.png"] is None
    assert built["landscape_exact.png"] is None and built["gradient_quality.png"] is None
    assert (tmp_path / "results" / "landscape_learned.png").stat().st_size > 0

"""Piecewise Chebyshev interpolation of a smooth 2D field on an adaptive quadtree of tiles.

A box ``[lo, hi]`` is cut into ``tiles × tiles`` equal tiles. On each tile every channel ``f_c`` of the
field is sampled at the ``n × n`` tensor Chebyshev points of the first kind, ``u_j = cos(π (j + ½) / n)``
(mapped from [−1, 1] to the tile), and represented by its degree-(n−1) tensor Chebyshev series

    f_c(u, v) ≈ Σ_{k,m < n} a_{kmc} T_k(u) T_m(v),     a = D F Dᵀ,   D_{kj} = (2 − δ_{k0})/n · cos(π k (j + ½)/n)

(the discrete Chebyshev transform, exact for polynomials of that degree). A tile is *accepted* when every
coefficient of total degree k + m ≥ n − 2 is at most ``tol`` times the channel group's largest value on
the tile (the usual a-posteriori estimate of the truncation error of a rapidly converging Chebyshev
series; ``groups`` say which channels share a scale). A rejected tile is split into 2 × 2 children, down
to ``max_depth`` levels; points on tiles still rejected, and points outside the box, are reported as
unresolved so that the caller evaluates them exactly.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from toy2d.kernels import chebyshev_rows


def chebyshev_points(n: int) -> Tensor:
    """The n Chebyshev points of the first kind on [−1, 1] (float64, descending)."""
    return torch.cos(math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n)


def chebyshev_transform(n: int) -> Tensor:
    """[n, n] matrix D mapping values at :func:`chebyshev_points` to Chebyshev coefficients."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None]
    matrix = (2.0 / n) * torch.cos(math.pi * k * (j + 0.5) / n)
    matrix[0] *= 0.5
    return matrix


class TileInterpolant:
    """An adaptive piecewise Chebyshev interpolant of ``field`` (module docstring).

    Args:
        field: maps points [M, 2] (float64) to values [M, C].
        lo, hi: [2] corners of the box.
        tiles: tiles per axis at the top level.
        order: Chebyshev points per axis and tile (degree ``order − 1``).
        tol: acceptance threshold of the tail coefficients, relative to the tile's largest value.
        groups: channel index groups sharing one scale (default: each channel on its own); a group's
            scale is the largest Euclidean norm of its channels on the tile (at least ``floors[g]``).
        floors: per-group lower bounds of that scale.
        max_depth: levels of 2 × 2 refinement of rejected tiles.
    """

    def __init__(self, field: Callable[[Tensor], Tensor], lo: Tensor, hi: Tensor, tiles: int, order: int = 12,
                 tol: float = 1e-6, groups: Sequence[Sequence[int]] | None = None,
                 floors: Sequence[float] | None = None, max_depth: int = 2):
        if tiles < 1 or order < 3 or max_depth < 0 or not tol > 0:
            raise ValueError(f"need tiles >= 1, order >= 3, max_depth >= 0, tol > 0; got {tiles}, {order}, "
                             f"{max_depth}, {tol}")
        self.lo, self.hi = lo.double(), hi.double()
        self.tiles, self.order, self.tol = int(tiles), int(order), float(tol)
        self._groups, self._floors = groups, floors
        self._transform = chebyshev_transform(order)
        degree = torch.arange(order)
        self._tail = (degree[:, None] + degree[None]) >= order - 2
        # per level: (cells per axis, [cells²] coefficient row or −1, [rows, C, n, n] coefficients)
        self.levels: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.nodes_evaluated = 0
        todo = torch.arange(self.tiles**2)
        for depth in range(max_depth + 1):
            cells = self.tiles * 2**depth
            coefficients, accepted = self._fit(field, cells, todo)
            index = torch.full((cells * cells,), -1, dtype=torch.long)
            index[todo[accepted]] = torch.arange(int(accepted.sum()))
            self.levels.append((cells, index.numpy(), coefficients[accepted].permute(0, 3, 1, 2).contiguous().numpy()))
            rejected = todo[~accepted]
            if depth == max_depth or rejected.numel() == 0:
                break
            row, col = rejected // cells, rejected % cells
            todo = torch.cat([(2 * row + dr) * (2 * cells) + (2 * col + dc) for dr in (0, 1) for dc in (0, 1)])
            todo = torch.sort(todo).values

    def _fit(self, field: Callable[[Tensor], Tensor], cells: int, which: Tensor) -> tuple[Tensor, Tensor]:
        """Coefficients [len(which), n, n, C] of the tiles ``which`` (row-major cell ids) and their acceptance."""
        n = self.order
        size = (self.hi - self.lo) / cells
        offsets = (chebyshev_points(n) + 1) / 2  # in [0, 1] of a tile
        row, col = (which // cells).double(), (which % cells).double()
        px = self.lo[0] + (row[:, None] + offsets) * size[0]  # [T, n]
        py = self.lo[1] + (col[:, None] + offsets) * size[1]
        points = torch.stack(torch.broadcast_tensors(px[:, :, None], py[:, None, :]), dim=-1)  # [T, n, n, 2]
        values = field(points.reshape(-1, 2)).reshape(len(which), n, n, -1)
        self.nodes_evaluated += points.shape[0] * n * n
        coefficients = torch.einsum("kj,tjlc,ml->tkmc", self._transform, values, self._transform)
        self.channels = values.shape[-1]
        groups = self._groups or [[c] for c in range(self.channels)]
        floors = self._floors or [0.0] * len(groups)
        accepted = torch.ones(len(which), dtype=torch.bool)
        for group, floor in zip(groups, floors):
            scale = values[..., list(group)].norm(dim=-1).amax(dim=(1, 2)).clamp_min(floor)
            tail = coefficients[:, self._tail][..., list(group)].abs().amax(dim=(1, 2))
            accepted &= torch.isfinite(tail) & (tail <= self.tol * scale)
        return coefficients, accepted

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Interpolated values [N, C] at points x [N, 2] (float64) and the [N] mask of resolved points
        (unresolved rows hold zeros). The series are summed by the compiled kernel
        :func:`toy2d.kernels.chebyshev_rows`, coarsest level first, rows sorted by finest cell."""
        rel = ((x.double() - self.lo) / (self.hi - self.lo)).contiguous().numpy()  # in [0, 1) inside the box
        out = np.zeros((x.shape[0], self.channels))
        inside = ((rel >= 0) & (rel < 1)).all(axis=1)  # False for NaN too
        resolved = ~inside
        finest = self.levels[-1][0]
        cell = np.clip(np.nan_to_num(rel) * finest, 0, finest - 1).astype(np.int64)
        visit = np.argsort(cell[:, 0] * finest + cell[:, 1], kind="stable")  # rows of a tile together
        for cells, index, coefficients in self.levels:
            if coefficients.shape[0]:
                chebyshev_rows(rel, visit, cells, index, coefficients, out, resolved)
        return torch.from_numpy(out), torch.from_numpy(resolved & inside)

"""Blend windows: 1.0 inside a tile, ramping down only across the sides it shares.

A window is separable: the outer product of a row profile and a column profile. Each profile is
1 except over the ``n`` overlapping pixels of a side, where pixel ``i`` (0 at the tile edge)
gets ``f((i + 0.5) / n)`` for a ramp ``f`` with ``f(1) = 1`` and ``f > 0`` on ``(0, 1)``.
Windows are not a partition of unity by themselves: :func:`normalized_windows` divides each by
their sum over the grid, once per grid, so blending is a weighted add with no division.
"""

from __future__ import annotations

import math

import torch

from tileup.choices import BLENDS
from tileup.tiler.geometry import Overlap, TileGrid

GAUSSIAN_SIGMA = 0.4  # in units of the overlap width


def ramp(n: int, kind: str) -> torch.Tensor:
    """``n`` float64 weights rising from near 0 at the tile edge (index 0) toward 1, all > 0.

    With ``t = (i + 0.5) / n``: "linear" is ``t``, "cosine" is ``(1 - cos(pi t)) / 2`` (so two
    opposite linear or cosine ramps sum to exactly 1), "gaussian" is
    ``exp(-((1 - t) / 0.4)^2 / 2)``.
    """
    if kind not in BLENDS:
        raise ValueError(f"unknown blend kind {kind!r}; expected one of {BLENDS}")
    if n < 0:
        raise ValueError(f"ramp length must be non-negative, got {n}")
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / max(n, 1)
    if kind == "linear":
        return t
    if kind == "cosine":
        return 0.5 - 0.5 * torch.cos(math.pi * t)
    return torch.exp(-0.5 * ((1.0 - t) / GAUSSIAN_SIGMA) ** 2)


def _profile(length: int, before: int, after: int, kind: str) -> torch.Tensor:
    """1 everywhere, times a ramp over the first ``before`` and the last ``after`` entries."""
    if before > length or after > length:
        raise ValueError(f"overlaps {before}/{after} exceed the tile size {length}")
    profile = torch.ones(length, dtype=torch.float64)
    profile[:before] *= ramp(before, kind)
    profile[length - after :] *= ramp(after, kind).flip(0)
    return profile


def blend_window(
    height: int,
    width: int,
    overlap: Overlap,
    kind: str = "gaussian",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A ``[height, width]`` window, strictly positive, 1.0 except across overlapping sides."""
    rows = _profile(height, overlap.top, overlap.bottom, kind)
    cols = _profile(width, overlap.left, overlap.right, kind)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    rows, cols = rows.to(device=device, dtype=work), cols.to(device=device, dtype=work)
    return torch.outer(rows, cols).to(dtype)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision used for sums and normalisation: float64 stays, anything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalized_windows(
    grid: TileGrid,
    kind: str = "gaussian",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, ...]:
    """Per tile (by ``tile.index``) its blend window divided by the sum of all windows there.

    The windows of all tiles sum to 1 at every canvas pixel (up to rounding), so blending is
    ``canvas[..., box] += values * window`` with no division. Computed once per grid, on the
    host (the same IEEE operations as on a device), then copied to ``device`` without waiting.
    """
    work = work_dtype(dtype)
    cache: dict[tuple[int, int, Overlap], torch.Tensor] = {}
    windows = []
    for tile in grid.tiles:
        key = (tile.box.height, tile.box.width, tile.overlap)
        if key not in cache:
            cache[key] = blend_window(*key, kind, dtype=work)
        windows.append(cache[key])
    total = torch.zeros(grid.height, grid.width, dtype=work)
    for tile, window in zip(grid.tiles, windows, strict=True):
        rows, cols = tile.box.slices
        total[rows, cols] += window
    return tuple(
        (window / total[tile.box.slices]).to(dtype).to(device, non_blocking=True)
        for tile, window in zip(grid.tiles, windows, strict=True)
    )

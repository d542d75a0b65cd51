"""Weighted blending of overlapping tiles into one canvas.

Per-tile work touches only the tile's box (views of the canvas, in-place adds); nothing per tile
is proportional to the canvas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tileup.seams.windows import blend_window
from tileup.tiler.geometry import Box, Overlap, TileGrid


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision used for sums and normalisation: float64 stays, anything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class WeightedAccumulator:
    """Sums ``values * weight`` and ``weight`` over tiles; :meth:`result` is their ratio.

    ``shape`` is ``(..., H, W)``, e.g. ``(N, C, H, W)`` or ``(C, H, W)``; weights are ``[H, W]``.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if len(shape) < 2:
            raise ValueError(f"shape must end with (H, W), got {shape}")
        self.shape = tuple(shape)
        self.canvas = Box(0, 0, shape[-2], shape[-1])
        self._sum = torch.zeros(shape, device=device, dtype=dtype)
        self._weight = torch.zeros(shape[-2:], device=device, dtype=dtype)

    def add(self, box: Box, values: torch.Tensor, weight: torch.Tensor) -> None:
        """Add ``values * weight`` (``values [..., h, w]``, ``weight [h, w]``) into ``box``."""
        if not self.canvas.contains(box):
            raise ValueError(f"{box} is not inside the canvas {self.canvas}")
        size = (box.height, box.width)
        if tuple(values.shape[-2:]) != size or tuple(weight.shape) != size:
            raise ValueError(
                f"values {tuple(values.shape)} and weight {tuple(weight.shape)} "
                f"do not match the box size {size}"
            )
        rows, cols = box.slices
        self._sum[..., rows, cols].addcmul_(values, weight)
        self._weight[rows, cols].add_(weight)

    @property
    def weight_sum(self) -> torch.Tensor:
        """The ``[H, W]`` sum of all weights added so far (a view, do not modify)."""
        return self._weight

    def result(self) -> torch.Tensor:
        """The weighted mean per pixel; ValueError when a pixel has no weight (not covered)."""
        uncovered = int((self._weight <= 0).sum())
        if uncovered:
            raise ValueError(f"{uncovered} canvas pixels have no weight (not covered by a tile)")
        return self._sum / self._weight


def normalized_windows(
    grid: TileGrid,
    kind: str = "gaussian",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, ...]:
    """Per tile (by ``tile.index``) its blend window divided by the sum of all windows there.

    The windows of all tiles sum to 1 at every canvas pixel (up to rounding), so blending is
    ``canvas[..., box] += values * window`` with no division. Computed once per grid.
    """
    work = _work_dtype(dtype)
    cache: dict[tuple[int, int, Overlap], torch.Tensor] = {}
    windows = []
    for tile in grid.tiles:
        key = (tile.box.height, tile.box.width, tile.overlap)
        if key not in cache:
            cache[key] = blend_window(*key, kind, device=device, dtype=work)
        windows.append(cache[key])
    total = torch.zeros(grid.height, grid.width, device=device, dtype=work)
    for tile, window in zip(grid.tiles, windows, strict=True):
        rows, cols = tile.box.slices
        total[rows, cols] += window
    return tuple(
        (window / total[tile.box.slices]).to(dtype)
        for tile, window in zip(grid.tiles, windows, strict=True)
    )


def merge_tiles(
    grid: TileGrid, tiles: Sequence[torch.Tensor], kind: str = "gaussian"
) -> torch.Tensor:
    """Blend ``tiles`` (``[..., h, w]``, indexed by ``tile.index``) into a ``[..., H, W]`` canvas.

    The result has the tiles' dtype and device; sums are done in at least float32.
    """
    if len(tiles) != len(grid):
        raise ValueError(f"got {len(tiles)} tiles for a grid of {len(grid)}")
    first = tiles[0]
    work = _work_dtype(first.dtype)
    windows = normalized_windows(grid, kind, device=first.device, dtype=work)
    out = torch.zeros((*first.shape[:-2], grid.height, grid.width), device=first.device, dtype=work)
    for tile, values, window in zip(grid.tiles, tiles, windows, strict=True):
        size = (tile.box.height, tile.box.width)
        if tuple(values.shape[-2:]) != size:
            raise ValueError(f"tile {tile.index} has shape {tuple(values.shape)}, expected {size}")
        rows, cols = tile.box.slices
        out[..., rows, cols].addcmul_(values.to(work), window)
    return out.to(first.dtype)


def split_tiles(canvas: torch.Tensor, grid: TileGrid) -> list[torch.Tensor]:
    """Views ``canvas[..., box]`` of a ``[..., H, W]`` canvas, indexed by ``tile.index``."""
    if tuple(canvas.shape[-2:]) != (grid.height, grid.width):
        raise ValueError(
            f"canvas {tuple(canvas.shape)} does not match the grid {grid.height}x{grid.width}"
        )
    return [canvas[(..., *tile.box.slices)] for tile in grid.tiles]

"""Test oracle: a plain weighted accumulator and tile split/merge over a grid.

The engine blends with :func:`tileup.seams.windows.normalized_windows` inside the fused
denoiser; these straightforward versions check the windows and the seam metric against it.

Per-tile work touches only the tile's box (views of the canvas, in-place adds); nothing per tile
is proportional to the canvas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tileup.modes.regions import Layout, Region, region_mask, seam_fix_passes
from tileup.seams.windows import normalized_windows, work_dtype
from tileup.tiler.geometry import Box, TileGrid


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


def merge_tiles(
    grid: TileGrid, tiles: Sequence[torch.Tensor], kind: str = "gaussian"
) -> torch.Tensor:
    """Blend ``tiles`` (``[..., h, w]``, indexed by ``tile.index``) into a ``[..., H, W]`` canvas.

    The result has the tiles' dtype and device; sums are done in at least float32.
    """
    if len(tiles) != len(grid):
        raise ValueError(f"got {len(tiles)} tiles for a grid of {len(grid)}")
    first = tiles[0]
    work = work_dtype(first.dtype)
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


# -- seam-fix regions and masks by name (the engine builds them from Region recipes) ------


def seam_fix_regions(
    layout: Layout,
    mode: str,
    width: int,
    *,
    order: str = "linear",
    canvas: tuple[int, int] | None = None,
    tile: int | tuple[int, int] | None = None,
) -> tuple[Region, ...]:
    """Every region of :func:`seam_fix_passes`, pass after pass."""
    passes = seam_fix_passes(layout, mode, width, order=order, canvas=canvas, tile=tile)
    return tuple(r for p in passes for r in p.regions)


def band_mask(height: int, width: int, line: int, seam_width: int, axis: str) -> torch.Tensor:
    """Band-pass mask of a ``height × width`` box: a tent across the seam at ``line`` (box
    coordinates) along ``axis`` ("y": horizontal seam, "x": vertical), reach ``seam_width / 2``."""
    return _tent_mask(height, width, line, seam_width // 2, axis)


def half_tile_mask(height: int, width: int, line: int, axis: str) -> torch.Tensor:
    """Half-tile mask of a tile-sized box: a tent across the seam at ``line`` (box coordinates)
    along ``axis``, reaching 0 half the box away."""
    return _tent_mask(height, width, line, (height if axis == "y" else width) // 2, axis)


def radial_mask(height: int, width: int, line_y: int, line_x: int) -> torch.Tensor:
    """Intersection mask of a tile-sized box: 1 around the corner ``(line_y, line_x)`` (box
    coordinates), 0 from half the box away (an ellipse for non-square boxes)."""
    box = Box(0, 0, height, width)
    region = Region(box, box, line_y, line_x, height // 2, width // 2)
    return region_mask(region)


def _tent_mask(height: int, width: int, line: int, reach: int, axis: str) -> torch.Tensor:
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    box = Box(0, 0, height, width)
    if axis == "y":
        return region_mask(Region(box, box, line_y=line, reach_y=reach))
    return region_mask(Region(box, box, line_x=line, reach_x=reach))

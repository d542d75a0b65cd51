"""Regions and masks of the per-tile redraw and its seam-fix passes, as pure geometry.

A :class:`Region` is a pixel box to redraw and the recipe of its mask (float in [0, 1], box-sized:
how much of each pixel may change). Every mask is ``max(0, 1 - ‖u‖) · [p ∈ support]`` where,
for each axis with a line ``c`` (a seam between pixels ``c - 1`` and ``c``) and a reach ``h``,
``u = (|p + 0.5 - c| - 0.5) / (h - 1)``, and ``u = 0`` along axes without a line. So:

- no line: 1 on the support (a redraw tile: its own cell between the seams);
- one line: a tent across the seam, exactly 1 on the two pixels beside it, falling linearly to
  exactly 0 on the ``h``-th pixel from it (band: ``h = width / 2``; half tile: ``h = tile / 2``);
- two lines: a cone on the corner, 1 on the four pixels around it, 0 at the reach (radial).

Seam-fix passes (Ultimate SD Upscale's "seams fix", described, not copied), each seam taken from
the tile grid (``TileGrid.inner_seams``), horizontal seams first:

- ``band``: on every seam a strip ``width`` wide across the canvas, cut into one piece per tile
  row/column (so no region exceeds a tile), tent mask;
- ``half-tile``: on every seam tile-sized regions centred on it, one per tile row/column, tent
  mask with reach half a tile;
- ``half-tile+intersections``: the half-tile passes, then a tile-sized region centred on every
  inner corner with the radial mask.

Along a seam each piece's mask is limited to one tile's cell (between the seams across it), so
pieces partition the seam; the box is the tile's full extent along the seam (uniform sizes batch
together). Regions are listed in ``order``: "linear" (seam by seam, pieces in reading order) or
"chess" (pieces with ``seam + piece`` even first, then odd; each linear).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tileup.choices import ORDERS, SEAM_FIX_MODES
from tileup.tiler.geometry import Box, TileGrid

Layout = TileGrid | tuple[Sequence[int], Sequence[int]]
"""A pixel-unit tile grid, or the seams ``(ys, xs)`` alone (then ``canvas`` and ``tile``)."""


@dataclass(frozen=True)
class Region:
    """A box to redraw (canvas pixels) and its mask recipe (see the module docstring).

    ``support`` lies inside ``box``; ``line_y``/``line_x`` are canvas coordinates of the seam
    lines (None: no line along that axis) and ``reach_y``/``reach_x`` (>= 2 where a line is)
    the distance at which the mask reaches 0. ``key`` says what the region is: ``(row, col)``
    of a tile, ``(seam, piece)`` of a seam piece, ``(seam_y, seam_x)`` of a corner.
    """

    box: Box
    support: Box
    line_y: int | None = None
    line_x: int | None = None
    reach_y: int = 0
    reach_x: int = 0
    key: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if not self.box.contains(self.support) or self.support.area == 0:
            raise ValueError(f"support {self.support} must be a non-empty part of {self.box}")
        for line, reach in ((self.line_y, self.reach_y), (self.line_x, self.reach_x)):
            if line is not None and reach < 2:
                raise ValueError(f"a mask line needs a reach of at least 2, got {reach}")


@dataclass(frozen=True)
class SeamPass:
    """One seam-fix pass: its name and its regions in processing order."""

    name: str
    regions: tuple[Region, ...]


# -- geometry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Axis:
    """One axis of the layout: its length, tile size, seams, the cells between the seams
    and, per cell, the start of the tile holding it."""

    length: int
    tile: int
    seams: tuple[int, ...]
    cells: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]


def _axis(length: int, tile: int, seams: Sequence[int], starts: Sequence[int] | None) -> _Axis:
    seams = tuple(seams)
    if any(not 0 < s < length for s in seams) or list(seams) != sorted(set(seams)):
        raise ValueError(f"seams {seams} must increase strictly inside (0, {length})")
    bounds = (0, *seams, length)
    cells = tuple(itertools.pairwise(bounds))
    size = min(tile, length)
    if any(b - a > size for a, b in cells):
        raise ValueError(f"seams {seams} leave a cell wider than the tile {size}")
    if starts is None:  # the tile centred on each cell, kept inside the canvas
        starts = tuple(min(max(a - (size - (b - a)) // 2, 0), length - size) for a, b in cells)
    return _Axis(length, size, seams, cells, tuple(starts))


def _axes(
    layout: Layout, canvas: tuple[int, int] | None, tile: int | tuple[int, int] | None
) -> tuple[_Axis, _Axis]:
    if isinstance(layout, TileGrid):
        ys, xs = layout.inner_seams()
        tops = [layout.tiles[r * layout.cols].box.top for r in range(layout.rows)]
        lefts = [layout.tiles[c].box.left for c in range(layout.cols)]
        return (
            _axis(layout.height, layout.tile_height, ys, tops),
            _axis(layout.width, layout.tile_width, xs, lefts),
        )
    if canvas is None or tile is None:
        raise ValueError("seams alone need the canvas (height, width) and the tile size")
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    seams_y, seams_x = layout
    return _axis(canvas[0], th, seams_y, None), _axis(canvas[1], tw, seams_x, None)


def _ordered(regions: list[Region], order: str) -> tuple[Region, ...]:
    """``regions`` (built in linear order, ``key`` = (i, j)) in ``order``."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; expected one of {ORDERS}")
    if order == "linear":
        return tuple(regions)
    even = [r for r in regions if sum(r.key) % 2 == 0]
    return tuple(even + [r for r in regions if sum(r.key) % 2 == 1])


def _centred(line: int, size: int, length: int) -> tuple[int, int]:
    """(start, size) of a ``size`` span centred on ``line``, shifted inside ``[0, length)``."""
    size = min(size, length)
    return min(max(line - size // 2, 0), length - size), size


def tile_regions(grid: TileGrid) -> tuple[Region, ...]:
    """The redraw regions of a pixel-unit grid, in the grid's order (linear or chess).

    Each is the tile's box with a flat mask on its cell between the inner seams, so the masks
    partition the canvas (tiles snapped inward overlap; each pixel is redrawn by one tile).
    """
    rows, cols = _axes(grid, None, None)
    out = []
    for tile in grid:
        (top, bottom), (left, right) = rows.cells[tile.row], cols.cells[tile.col]
        support = Box(top, left, bottom - top, right - left)
        out.append(Region(tile.box, support, key=(tile.row, tile.col)))
    return tuple(out)


def _seam_pieces(
    across: _Axis, along: _Axis, half: int, horizontal: bool, order: str
) -> tuple[Region, ...]:
    """Regions on every seam of ``across``: ``2·half`` wide, one per cell of ``along``."""
    regions = []
    for i, line in enumerate(across.seams):
        start, size = _centred(line, 2 * half, across.length)
        for j, ((a, b), tile_start) in enumerate(zip(along.cells, along.starts, strict=True)):
            if horizontal:
                box = Box(start, tile_start, size, along.tile)
                support = Box(start, a, size, b - a)
                regions.append(Region(box, support, line_y=line, reach_y=half, key=(i, j)))
            else:
                box = Box(tile_start, start, along.tile, size)
                support = Box(a, start, b - a, size)
                regions.append(Region(box, support, line_x=line, reach_x=half, key=(i, j)))
    return _ordered(regions, order)


def _corners(rows: _Axis, cols: _Axis, order: str) -> tuple[Region, ...]:
    regions = []
    for i, y in enumerate(rows.seams):
        top, height = _centred(y, rows.tile, rows.length)
        for j, x in enumerate(cols.seams):
            left, width = _centred(x, cols.tile, cols.length)
            box = Box(top, left, height, width)
            regions.append(
                Region(
                    box,
                    box,
                    line_y=y,
                    line_x=x,
                    reach_y=rows.tile // 2,
                    reach_x=cols.tile // 2,
                    key=(i, j),
                )
            )
    return _ordered(regions, order)


def seam_fix_passes(
    layout: Layout,
    mode: str,
    width: int,
    *,
    order: str = "linear",
    canvas: tuple[int, int] | None = None,
    tile: int | tuple[int, int] | None = None,
) -> tuple[SeamPass, ...]:
    """The seam-fix passes of ``mode`` over ``layout`` (pixels), in the order they run.

    band: "band-rows" (horizontal seams), "band-cols"; half-tile: "half-tile-rows",
    "half-tile-cols"; half-tile+intersections adds "intersections". Passes without regions
    (no seams along that axis) are left out; "none" gives no pass. ``width`` (band only) must
    be even, at least 4 and at most the tile across the seams (an axis without seams, e.g. a
    canvas narrower than the tile, does not limit it).
    """
    if mode not in SEAM_FIX_MODES:
        raise ValueError(f"unknown seam-fix mode {mode!r}; expected one of {SEAM_FIX_MODES}")
    if mode == "none":
        return ()
    rows, cols = _axes(layout, canvas, tile)
    passes: list[SeamPass] = []
    if mode == "band":
        # the band lies across the seams: it must fit the tile along the axes that have seams
        limit = min((axis.tile for axis in (rows, cols) if axis.seams), default=width)
        if width % 2 or width < 4 or width > limit:
            raise ValueError(f"band width {width} must be even, in [4, {limit}] (the tile)")
        passes += [
            SeamPass("band-rows", _seam_pieces(rows, cols, width // 2, True, order)),
            SeamPass("band-cols", _seam_pieces(cols, rows, width // 2, False, order)),
        ]
    else:
        passes += [
            SeamPass("half-tile-rows", _seam_pieces(rows, cols, rows.tile // 2, True, order)),
            SeamPass("half-tile-cols", _seam_pieces(cols, rows, cols.tile // 2, False, order)),
        ]
        if mode == "half-tile+intersections":
            passes.append(SeamPass("intersections", _corners(rows, cols, order)))
    return tuple(p for p in passes if p.regions)


# -- masks -----------------------------------------------------------------------------------


def _distance(n: int, start: int, line: int | None, reach: int) -> torch.Tensor:
    """``u`` of the module docstring for pixels ``start .. start + n - 1`` (float64)."""
    if line is None:
        return torch.zeros(n, dtype=torch.float64)
    p = torch.arange(start, start + n, dtype=torch.float64)
    return ((p + 0.5 - line).abs() - 0.5) / (reach - 1)


def region_mask(
    region: Region, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The ``[box.height, box.width]`` mask of ``region`` (see the module docstring)."""
    box, s = region.box, region.support
    uy = _distance(box.height, box.top, region.line_y, region.reach_y)
    ux = _distance(box.width, box.left, region.line_x, region.reach_x)
    mask = (1.0 - torch.sqrt(uy[:, None] ** 2 + ux[None, :] ** 2)).clamp(min=0.0)
    keep = torch.zeros_like(mask)
    keep[s.top - box.top : s.bottom - box.top, s.left - box.left : s.right - box.left] = 1.0
    # cast on the host, then an asynchronous copy: no wait for the device's queued work
    return (mask * keep).to(dtype=dtype).to(device=device, non_blocking=True)


def blur_radius(sigma: float) -> int:
    """Pixels a Gaussian of ``sigma`` reaches: ``int(2.5·sigma + 0.5)`` (A1111's mask blur)."""
    return int(2.5 * sigma + 0.5) if sigma > 0 else 0


def blur_mask(
    mask: torch.Tensor, sigma: float, replicate: tuple[bool, bool, bool, bool] = (False,) * 4
) -> torch.Tensor:
    """Separable Gaussian blur of an ``[H, W]`` mask (standard deviation ``sigma`` pixels,
    kernel radius :func:`blur_radius`), values outside taken as 0 — or as the nearest edge value
    on the sides flagged in ``replicate`` (top, bottom, left, right: the canvas border, beyond
    which the mask goes on). Same device and dtype; ``sigma`` 0 returns the mask unchanged.
    A mask zero beyond ``r`` pixels of the non-replicated sides stays zero beyond them."""
    radius = blur_radius(sigma)
    if radius == 0:
        return mask
    x = torch.arange(-radius, radius + 1, device=mask.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(mask.dtype)
    top, bottom, left, right = replicate
    h = mask[None, None]
    h = _pad(h, (0, 0, radius, radius), (False, False, top, bottom))
    h = _pad(h, (radius, radius, 0, 0), (left, right, False, False))
    h = F.conv2d(h, kernel.view(1, 1, -1, 1))
    h = F.conv2d(h, kernel.view(1, 1, 1, -1))
    return h[0, 0]


def _pad(x: torch.Tensor, pads: tuple[int, int, int, int], rep: tuple[bool, ...]) -> torch.Tensor:
    """Pad (left, right, top, bottom) with zeros, or by replication where ``rep`` says so."""
    out = F.pad(x, pads)
    left, right, top, bottom = pads
    h, w = x.shape[-2:]
    if rep[0] and left:
        out[..., top : top + h, :left] = x[..., :, :1]
    if rep[1] and right:
        out[..., top : top + h, left + w :] = x[..., :, -1:]
    if rep[2] and top:
        out[..., :top, left : left + w] = x[..., :1, :]
    if rep[3] and bottom:
        out[..., top + h :, left : left + w] = x[..., -1:, :]
    return out


def crop_box(box: Box, padding: int, canvas: Box, factor: int) -> Box:
    """The crop a region is redrawn in: ``box`` grown by ``padding`` on every side and rounded
    outward to multiples of ``factor``; where that crosses the edge of ``canvas`` (at the origin,
    sides multiples of ``factor``) it is shifted inward, keeping its size (more context, and
    regions of one size keep one crop size, so they batch together), and it is clipped only
    along an axis where the canvas is smaller."""
    if padding < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    if not canvas.contains(box):
        raise ValueError(f"{box} lies outside the canvas {canvas}")
    top = (box.top - padding) // factor * factor
    left = (box.left - padding) // factor * factor
    height = min(math.ceil((box.bottom + padding) / factor) * factor - top, canvas.height)
    width = min(math.ceil((box.right + padding) / factor) * factor - left, canvas.width)
    top = min(max(top, canvas.top), canvas.bottom - height)
    left = min(max(left, canvas.left), canvas.right - width)
    return Box(top, left, height, width)


def context_crop(box: Box, padding: int, mask_blur: float, canvas: Box, factor: int) -> Box:
    """The crop a region is redrawn in: :func:`crop_box` with ``padding``, or the reach of the
    ``mask_blur`` when that is larger, so that the blurred paste mask always fits the crop."""
    return crop_box(box, max(padding, blur_radius(mask_blur)), canvas, factor)


def crop_masks(
    region: Region,
    crop: Box,
    canvas: Box,
    mask_blur: float,
    factor: int,
    *,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(paste, free)`` of ``region`` redrawn in ``crop``.

    ``paste`` ``[crop.height, crop.width]`` float32: the region mask placed in the crop (0
    elsewhere) blurred by ``mask_blur`` (edges on the canvas border replicated), the weight of
    the redrawn pixels when pasted back; 0 outside the crop by construction. ``free``
    ``[crop.height / f, crop.width / f]`` bool: latent cells where the region mask is positive
    anywhere (what sampling may change; the rest is locked to the original).
    """
    if not crop.contains(region.box):
        raise ValueError(f"crop {crop} must contain the region {region.box}")
    mask = torch.zeros(crop.height, crop.width, device=device, dtype=torch.float32)
    inner = region.box.shifted(-crop.top, -crop.left)
    mask[inner.slices] = region_mask(region, device=device)
    edges = (
        crop.top == canvas.top,
        crop.bottom == canvas.bottom,
        crop.left == canvas.left,
        crop.right == canvas.right,
    )
    paste = blur_mask(mask, mask_blur, edges)
    free = F.max_pool2d(mask[None, None], factor)[0, 0] > 0
    return paste, free

"""Tile geometry as plain data: boxes, per-side overlaps, tiles and tile grids.

Every coordinate is an integer in some unit (pixels, or latent cells); ``scaled`` converts
between units and refuses any result that is not an integer. Boxes are half-open:
``Box(top, left, height, width)`` covers rows ``top .. top + height - 1``.

Grids follow the blended-tiling convention: the first tile starts at 0, the last one is snapped
inward so that it ends exactly at the canvas edge, and the interior starts are spread evenly, so
every tile has the full tile size whenever the canvas is at least one tile.

One rule spreads points along an axis (:func:`even_steps`): it places the starts of overlapping
fixed-size tiles (:func:`axis_starts`, :func:`plan_grid`) and the edges of non-overlapping
near-equal parts (:func:`split_box`, the cores of exact tiled SR inference).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

from tileup.choices import ORDERS


def _scale(value: int, f: float | Fraction, what: str) -> int:
    """``value * f`` as an int; ValueError when that is not an integer."""
    exact = value * _factor(f)
    if exact.denominator != 1:
        raise ValueError(f"{what} {value} scaled by {f} is {float(exact)}, not an integer")
    return int(exact)


def _factor(f: float | Fraction) -> Fraction:
    """A positive scale factor as an exact fraction (floats like 1/8 or 1/3 are read exactly)."""
    frac = Fraction(f).limit_denominator(1_000_000) if isinstance(f, float) else Fraction(f)
    if frac <= 0:
        raise ValueError(f"scale factor must be positive, got {f}")
    return frac


@dataclass(frozen=True)
class Box:
    """A half-open rectangle ``[top, top + height) x [left, left + width)``."""

    top: int
    left: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for name in ("top", "left", "height", "width"):
            object.__setattr__(self, name, operator.index(getattr(self, name)))
        if self.height < 0 or self.width < 0:
            raise ValueError(f"box size must be non-negative, got {self.height}x{self.width}")

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width

    @property
    def area(self) -> int:
        return self.height * self.width

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` for ``array[..., rows, cols]``; ValueError for negative origins."""
        if self.top < 0 or self.left < 0:
            raise ValueError(f"cannot index with a box at a negative position: {self}")
        return slice(self.top, self.bottom), slice(self.left, self.right)

    def scaled(self, f: float | Fraction) -> Box:
        """All four numbers times ``f``; ValueError if any result is not an integer."""
        return Box(
            _scale(self.top, f, "top"),
            _scale(self.left, f, "left"),
            _scale(self.height, f, "height"),
            _scale(self.width, f, "width"),
        )

    def shifted(self, dy: int, dx: int) -> Box:
        return Box(self.top + dy, self.left + dx, self.height, self.width)

    def intersect(self, other: Box) -> Box | None:
        """The common part, or None when it is empty."""
        top, left = max(self.top, other.top), max(self.left, other.left)
        bottom, right = min(self.bottom, other.bottom), min(self.right, other.right)
        if bottom <= top or right <= left:
            return None
        return Box(top, left, bottom - top, right - left)

    def expanded(self, margin: int, within: Box | None = None) -> Box:
        """Grown by ``margin >= 0`` on every side, then clipped to ``within`` when given."""
        if margin < 0:
            raise ValueError(f"margin must be non-negative, got {margin}")
        grown = Box(
            self.top - margin, self.left - margin, self.height + 2 * margin, self.width + 2 * margin
        )
        if within is None:
            return grown
        clipped = grown.intersect(within)
        if clipped is None:
            raise ValueError(f"{self} expanded by {margin} does not intersect {within}")
        return clipped

    def contains(self, other: Box) -> bool:
        """Whether ``other`` lies entirely inside this box."""
        return (
            self.top <= other.top
            and self.left <= other.left
            and other.bottom <= self.bottom
            and other.right <= self.right
        )


@dataclass(frozen=True)
class Overlap:
    """Pixels of a tile shared with its neighbour on each side (0: canvas border)."""

    top: int = 0
    left: int = 0
    bottom: int = 0
    right: int = 0

    def __post_init__(self) -> None:
        for name in ("top", "left", "bottom", "right"):
            value = operator.index(getattr(self, name))
            if value < 0:
                raise ValueError(f"overlap {name} must be non-negative, got {value}")
            object.__setattr__(self, name, value)

    def scaled(self, f: float | Fraction) -> Overlap:
        """All four numbers times ``f``; ValueError if any result is not an integer."""
        return Overlap(
            _scale(self.top, f, "overlap top"),
            _scale(self.left, f, "overlap left"),
            _scale(self.bottom, f, "overlap bottom"),
            _scale(self.right, f, "overlap right"),
        )


@dataclass(frozen=True)
class Tile:
    """One tile of a grid: ``index == row * cols + col``, its box and its per-side overlap."""

    index: int
    row: int
    col: int
    box: Box
    overlap: Overlap

    def scaled(self, f: float | Fraction) -> Tile:
        return Tile(self.index, self.row, self.col, self.box.scaled(f), self.overlap.scaled(f))


@dataclass(frozen=True)
class TileGrid:
    """Tiles covering a ``height x width`` canvas.

    ``tiles`` is indexed by ``Tile.index`` (row-major); iterating the grid yields the tiles in
    processing ``order``. ``tile_height``/``tile_width`` are the actual tile sizes (clipped to
    the canvas when it is smaller than the requested tile). Every coordinate is a multiple of
    ``align``.
    """

    height: int
    width: int
    tile_height: int
    tile_width: int
    rows: int
    cols: int
    tiles: tuple[Tile, ...]
    order: str
    align: int = 1

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"unknown tile order {self.order!r}; expected one of {ORDERS}")
        if len(self.tiles) != self.rows * self.cols:
            raise ValueError(f"{len(self.tiles)} tiles for a {self.rows}x{self.cols} grid")
        if any(t.index != i for i, t in enumerate(self.tiles)):
            raise ValueError("tiles must be stored by index")

    @property
    def canvas(self) -> Box:
        return Box(0, 0, self.height, self.width)

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[Tile]:
        if self.order == "chess":
            return itertools.chain(*chess_groups(self))
        return iter(self.tiles)

    def scaled(self, f: float | Fraction) -> TileGrid:
        """The same grid in another unit (``1/8``: pixels to latent cells); refuses fractions."""
        align = self.align * _factor(f)
        return TileGrid(
            height=_scale(self.height, f, "canvas height"),
            width=_scale(self.width, f, "canvas width"),
            tile_height=_scale(self.tile_height, f, "tile height"),
            tile_width=_scale(self.tile_width, f, "tile width"),
            rows=self.rows,
            cols=self.cols,
            tiles=tuple(t.scaled(f) for t in self.tiles),
            order=self.order,
            align=int(align) if align.denominator == 1 else 1,
        )

    def inner_seams(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(ys, xs)`` of the interior seams.

        The seam between rows ``r`` and ``r + 1`` is the midpoint of their overlap
        ``[top(r + 1), bottom(r))``, rounded down to a multiple of ``align`` (never before
        ``top(r + 1)``); a seam at ``y`` separates pixel rows ``y - 1`` and ``y``. Columns alike.
        """
        tops = [self.tiles[r * self.cols].box.top for r in range(self.rows)]
        lefts = [self.tiles[c].box.left for c in range(self.cols)]
        ys = _seams(tops, self.tile_height, self.align)
        return ys, _seams(lefts, self.tile_width, self.align)


def _seams(starts: list[int], tile: int, align: int) -> tuple[int, ...]:
    mids = ((nxt + prev + tile) // 2 for prev, nxt in itertools.pairwise(starts))
    return tuple(m - m % align for m in mids)


def chess_groups(grid: TileGrid) -> tuple[tuple[Tile, ...], tuple[Tile, ...]]:
    """The two chessboard colours: tiles with ``row + col`` even, then odd; each row-major."""
    even = tuple(t for t in grid.tiles if (t.row + t.col) % 2 == 0)
    odd = tuple(t for t in grid.tiles if (t.row + t.col) % 2 == 1)
    return even, odd


def _check_axis(name: str, length: int, tile: int, overlap: int, align: int) -> None:
    if align < 1:
        raise ValueError(f"alignment must be at least 1, got {align}")
    if tile <= 0:
        raise ValueError(f"tile size must be positive, got {tile}")
    if tile % align:
        raise ValueError(f"tile size {tile} is not a multiple of {align}")
    if overlap < 0:
        raise ValueError(f"overlap must be non-negative, got {overlap}")
    if overlap >= tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    if tile - overlap < align:
        raise ValueError(
            f"overlap {overlap} leaves a stride of {tile - overlap}, "
            f"less than the alignment {align}"
        )
    if length <= 0:
        raise ValueError(f"{name} must be positive, got {length}")
    if length % align:
        raise ValueError(f"{name} {length} is not a multiple of {align}")


def even_steps(total: int, max_step: int) -> tuple[int, ...]:
    """The fewest integer points from 0 to ``total`` whose steps are at most ``max_step``.

    Returns ``(p0, ..., pn)`` with ``p0 == 0``, ``pn == total``, ``n == ceil(total / max_step)``
    and ``pi`` the nearest integer to ``i * total / n`` (halves round up), so every step is the
    floor or the ceiling of ``total / n``. ``total == 0`` gives ``(0,)``. ``total >= 0`` and
    ``max_step >= 1``, else ValueError.
    """
    if total < 0 or max_step < 1:
        raise ValueError(f"need total >= 0 and max_step >= 1, got {total}, {max_step}")
    steps = -(-total // max_step)
    if steps == 0:
        return (0,)
    return tuple((2 * i * total + steps) // (2 * steps) for i in range(steps + 1))


def axis_starts(length: int, tile: int, overlap: int, align: int = 1) -> tuple[int, ...]:
    """Start positions of fixed-size, overlapping tiles along one axis.

    ``length <= tile`` gives ``(0,)`` (the caller clips the tile to ``length``). Otherwise the
    fewest tiles whose consecutive starts differ by at most ``tile - overlap`` (rounded down to
    a multiple of ``align``): the first at 0, the last at ``length - tile``, the others evenly
    spread (:func:`even_steps` in units of ``align``). Starts are strictly increasing, aligned,
    and consecutive tiles share at least ``overlap`` pixels. ``length`` and ``tile`` must be
    multiples of ``align``.
    """
    _check_axis("length", length, tile, overlap, align)
    if length <= tile:
        return (0,)
    span = (length - tile) // align  # in units of align, >= 1
    stride = (tile - overlap) // align  # the largest allowed step, >= 1
    return tuple(align * p for p in even_steps(span, stride))


def split_box(box: Box, max_size: int) -> tuple[Box, ...]:
    """``box`` cut into the fewest near-equal boxes of at most ``max_size`` x ``max_size``.

    The parts partition ``box`` (no overlap, no gap), row-major; along each axis their edges are
    :func:`even_steps`, so sizes differ by at most one. An empty box gives no parts.
    """
    if max_size < 1:
        raise ValueError(f"max_size must be positive, got {max_size}")
    if box.area == 0:
        return ()
    ys = even_steps(box.height, max_size)
    xs = even_steps(box.width, max_size)
    return tuple(
        Box(box.top + top, box.left + left, bottom - top, right - left)
        for top, bottom in itertools.pairwise(ys)
        for left, right in itertools.pairwise(xs)
    )


def plan_grid(
    height: int,
    width: int,
    tile: int | tuple[int, int],
    overlap: int,
    *,
    align: int = 1,
    order: str = "linear",
) -> TileGrid:
    """Overlapping tiles covering a ``height x width`` canvas (see :func:`axis_starts`).

    ``tile`` is one size or ``(tile_height, tile_width)``. Along an axis where the canvas is
    smaller than the tile there is one tile of the canvas size. ``Tile.overlap`` holds the
    pixels actually shared with each neighbour (larger than ``overlap`` next to a snapped edge
    tile). Tiles are indexed row-major; ``order`` ("linear" or "chess") sets iteration order.
    """
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    if order not in ORDERS:
        raise ValueError(f"unknown tile order {order!r}; expected one of {ORDERS}")
    _check_axis("canvas height", height, tile_h, overlap, align)
    _check_axis("canvas width", width, tile_w, overlap, align)
    tops = axis_starts(height, tile_h, overlap, align)
    lefts = axis_starts(width, tile_w, overlap, align)
    th, tw = min(tile_h, height), min(tile_w, width)
    tiles = []
    for r, top in enumerate(tops):
        above = tops[r - 1] + th - top if r > 0 else 0
        below = top + th - tops[r + 1] if r + 1 < len(tops) else 0
        for c, left in enumerate(lefts):
            before = lefts[c - 1] + tw - left if c > 0 else 0
            after = left + tw - lefts[c + 1] if c + 1 < len(lefts) else 0
            tiles.append(
                Tile(
                    index=r * len(lefts) + c,
                    row=r,
                    col=c,
                    box=Box(top, left, th, tw),
                    overlap=Overlap(top=above, left=before, bottom=below, right=after),
                )
            )
    return TileGrid(
        height=height,
        width=width,
        tile_height=th,
        tile_width=tw,
        rows=len(tops),
        cols=len(lefts),
        tiles=tuple(tiles),
        order=order,
        align=align,
    )

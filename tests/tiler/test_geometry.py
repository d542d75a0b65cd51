"""Tile geometry: properties over random axes, boxes and grids, exact tables, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tileup.tiler import (
    Box,
    Overlap,
    Tile,
    TileGrid,
    axis_starts,
    chess_groups,
    even_steps,
    plan_grid,
    split_box,
)


@st.composite
def axis_cases(draw: st.DrawFn, max_units: int = 600) -> tuple[int, int, int, int]:
    """(length, tile, overlap, align) with length and tile multiples of align."""
    align = draw(st.sampled_from([1, 8]))
    tile = align * draw(st.integers(1, 80))
    overlap = draw(st.integers(0, tile - align))
    length = align * draw(st.integers(1, max_units))
    return length, tile, overlap, align


@st.composite
def grid_cases(draw: st.DrawFn) -> tuple[int, int, tuple[int, int], int, int]:
    """(height, width, (tile_h, tile_w), overlap, align) with at most a few hundred tiles."""
    align = draw(st.sampled_from([1, 8]))
    tile_h = align * draw(st.integers(max(1, 16 // align), 96 // align))
    tile_w = align * draw(st.integers(max(1, 16 // align), 96 // align))
    overlap = draw(st.integers(0, (min(tile_h, tile_w) - align) // 2))
    height = align * draw(st.integers(1, 400 // align))
    width = align * draw(st.integers(1, 400 // align))
    return height, width, (tile_h, tile_w), overlap, align


# -- even_steps: the one rule that spreads points along an axis ------------------------------


@given(st.integers(0, 5000), st.integers(1, 700))
@settings(max_examples=300, deadline=None)
def test_even_steps_properties(total: int, max_step: int) -> None:
    points = even_steps(total, max_step)
    assert points == even_steps(total, max_step)  # deterministic
    assert points[0] == 0 and points[-1] == total
    steps = [b - a for a, b in itertools.pairwise(points)]
    assert len(steps) == -(-total // max_step)  # the fewest steps of at most max_step
    assert all(1 <= s <= max_step for s in steps)
    assert not steps or max(steps) - min(steps) <= 1  # evenly spread


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((100, 40), (0, 33, 67, 100)),
        ((7, 7), (0, 7)),
        ((6, 2), (0, 2, 4, 6)),
        ((5, 2), (0, 2, 3, 5)),  # halves round up: 5/3 -> 2, 10/3 -> 3
        ((0, 4), (0,)),
        ((3, 100), (0, 3)),
    ],
)
def test_even_steps_table(args: tuple[int, int], expected: tuple[int, ...]) -> None:
    assert even_steps(*args) == expected


@pytest.mark.parametrize("args", [(-1, 4), (10, 0)])
def test_even_steps_errors(args: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="need total >= 0 and max_step >= 1"):
        even_steps(*args)


# -- split_box ------------------------------------------------------------------------------


@given(
    st.integers(-50, 50),
    st.integers(-50, 50),
    st.integers(0, 150),
    st.integers(0, 150),
    st.integers(1, 80),
)
@settings(max_examples=200, deadline=None)
def test_split_box_partitions(top: int, left: int, height: int, width: int, size: int) -> None:
    box = Box(top, left, height, width)
    parts = split_box(box, size)
    assert parts == split_box(box, size)
    if box.area == 0:
        assert parts == ()
        return
    rows, cols = -(-height // size), -(-width // size)
    assert len(parts) == rows * cols  # the fewest parts of at most size x size
    assert all(box.contains(p) and 0 < p.height <= size and 0 < p.width <= size for p in parts)
    seen = np.zeros((height, width), int)
    for p in parts:
        seen[p.shifted(-top, -left).slices] += 1
    assert (seen == 1).all()  # each pixel in exactly one part
    assert max(p.height for p in parts) - min(p.height for p in parts) <= 1  # near-equal
    assert max(p.width for p in parts) - min(p.width for p in parts) <= 1
    assert list(parts) == sorted(parts, key=lambda p: (p.top, p.left))  # row-major


def test_split_box_layout() -> None:
    assert split_box(Box(10, 20, 100, 7), 40) == (
        Box(10, 20, 33, 7),
        Box(43, 20, 34, 7),
        Box(77, 20, 33, 7),
    )
    assert split_box(Box(0, 0, 50, 70), 35) == (
        Box(0, 0, 25, 35),
        Box(0, 35, 25, 35),
        Box(25, 0, 25, 35),
        Box(25, 35, 25, 35),
    )
    assert split_box(Box(0, 0, 50, 70), 70) == (Box(0, 0, 50, 70),)
    assert split_box(Box(0, 0, 0, 9), 4) == ()
    with pytest.raises(ValueError, match="max_size must be positive"):
        split_box(Box(0, 0, 4, 4), 0)


# -- axis_starts ----------------------------------------------------------------------------


@given(axis_cases())
@settings(max_examples=300, deadline=None)
def test_axis_starts_properties(case: tuple[int, int, int, int]) -> None:
    length, tile, overlap, align = case
    starts = axis_starts(length, tile, overlap, align)
    assert starts == axis_starts(length, tile, overlap, align)  # deterministic
    assert starts[0] == 0
    assert all(s % align == 0 for s in starts)
    assert all(a < b for a, b in itertools.pairwise(starts))
    if length <= tile:
        assert starts == (0,)
        return
    assert starts[-1] == length - tile  # last tile snapped inward: full size, ends at the edge
    assert all(a + tile - b >= overlap for a, b in itertools.pairwise(starts))
    # minimal: one tile fewer cannot cover the span with the allowed aligned stride
    stride = (tile - overlap) // align * align
    assert (len(starts) - 2) * stride < length - tile


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((1024, 512, 64, 8), (0, 256, 512)),
        ((2048, 512, 64, 8), (0, 384, 768, 1152, 1536)),
        ((4096, 512, 64, 8), (0, 448, 896, 1344, 1792, 2240, 2688, 3136, 3584)),
        ((1000, 512, 64, 8), (0, 248, 488)),
        ((1536, 512, 64, 8), (0, 344, 680, 1024)),
        ((1024, 256, 32, 8), (0, 192, 384, 576, 768)),
        ((1024, 512, 0, 8), (0, 512)),
        ((1030, 512, 64, 1), (0, 259, 518)),
        ((512, 512, 64, 8), (0,)),
        ((300, 512, 64, 1), (0,)),
    ],
)
def test_axis_starts_table(args: tuple[int, int, int, int], expected: tuple[int, ...]) -> None:
    assert axis_starts(*args) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1024, 500, 64, 8), "tile size 500 is not a multiple of 8"),
        ((1024, 512, 512, 8), "overlap 512 must be smaller than the tile 512"),
        ((1024, 512, 508, 8), "less than the alignment 8"),
        ((1020, 512, 64, 8), "length 1020 is not a multiple of 8"),
        ((0, 512, 64, 8), "must be positive"),
        ((1024, 0, 0, 1), "must be positive"),
        ((1024, 512, -1, 1), "non-negative"),
    ],
)
def test_axis_starts_errors(args: tuple[int, int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        axis_starts(*args)


# -- plan_grid ------------------------------------------------------------------------------


def _shared(a: Box, b: Box) -> int:
    common = a.intersect(b)
    return 0 if common is None else common.area


@given(grid_cases(), st.sampled_from(["linear", "chess"]))
@settings(max_examples=150, deadline=None)
def test_plan_grid_properties(case: tuple[int, int, tuple[int, int], int, int], order: str) -> None:
    height, width, tile, overlap, align = case
    grid = plan_grid(height, width, tile, overlap, align=align, order=order)
    assert grid == plan_grid(height, width, tile, overlap, align=align, order=order)
    assert (grid.tile_height, grid.tile_width) == (min(tile[0], height), min(tile[1], width))
    assert len(grid) == grid.rows * grid.cols
    assert sorted(t.index for t in grid) == list(range(len(grid)))  # iteration is a permutation
    coverage = [[0] * width for _ in range(height)]
    for t in grid.tiles:
        assert t.index == t.row * grid.cols + t.col
        assert grid.canvas.contains(t.box)
        assert (t.box.height, t.box.width) == (grid.tile_height, grid.tile_width)
        assert t.box.top % align == 0 and t.box.left % align == 0
        for y in range(t.box.top, t.box.bottom):
            row = coverage[y]
            for x in range(t.box.left, t.box.right):
                row[x] = 1
        # Tile.overlap is the true shared extent with the direct neighbour on each side
        up = grid.tiles[t.index - grid.cols] if t.row > 0 else None
        down = grid.tiles[t.index + grid.cols] if t.row + 1 < grid.rows else None
        left = grid.tiles[t.index - 1] if t.col > 0 else None
        right = grid.tiles[t.index + 1] if t.col + 1 < grid.cols else None
        assert t.overlap.top == (_shared(t.box, up.box) // t.box.width if up else 0)
        assert t.overlap.bottom == (_shared(t.box, down.box) // t.box.width if down else 0)
        assert t.overlap.left == (_shared(t.box, left.box) // t.box.height if left else 0)
        assert t.overlap.right == (_shared(t.box, right.box) // t.box.height if right else 0)
        for neighbour_overlap, present in [
            (t.overlap.top, up),
            (t.overlap.bottom, down),
            (t.overlap.left, left),
            (t.overlap.right, right),
        ]:
            assert present is None or neighbour_overlap >= overlap
    assert all(all(row) for row in coverage)
    ys, xs = grid.inner_seams()
    assert len(ys) == grid.rows - 1 and len(xs) == grid.cols - 1
    for r, y in enumerate(ys):
        upper, lower = grid.tiles[r * grid.cols].box, grid.tiles[(r + 1) * grid.cols].box
        assert y % align == 0 and lower.top <= y <= upper.bottom
    for c, x in enumerate(xs):
        a, b = grid.tiles[c].box, grid.tiles[c + 1].box
        assert x % align == 0 and b.left <= x <= a.right


def test_plan_grid_exact_layout() -> None:
    grid = plan_grid(1024, 2048, 512, 64, align=8)
    assert (grid.rows, grid.cols) == (3, 5)
    assert [t.box.top for t in grid.tiles[:: grid.cols]] == [0, 256, 512]
    assert [t.box.left for t in grid.tiles[: grid.cols]] == [0, 384, 768, 1152, 1536]
    assert grid.tiles[0].overlap == Overlap(top=0, left=0, bottom=256, right=128)
    assert grid.tiles[7] == Tile(
        index=7,
        row=1,
        col=2,
        box=Box(256, 768, 512, 512),
        overlap=Overlap(top=256, left=128, bottom=256, right=128),
    )
    assert grid.inner_seams() == ((384, 640), (448, 832, 1216, 1600))


def test_plan_grid_small_canvas_clips_tile() -> None:
    grid = plan_grid(300, 1024, 512, 64)
    assert (grid.rows, grid.cols, grid.tile_height, grid.tile_width) == (1, 3, 300, 512)
    assert [t.box for t in grid.tiles] == [
        Box(0, 0, 300, 512),
        Box(0, 256, 300, 512),
        Box(0, 512, 300, 512),
    ]
    single = plan_grid(200, 120, (512, 256), 32, align=8)
    assert len(single) == 1 and single.tiles[0].box == Box(0, 0, 200, 120)
    assert single.tiles[0].overlap == Overlap()
    assert single.inner_seams() == ((), ())


def test_chess_order_3x3() -> None:
    grid = plan_grid(1280, 1280, 512, 128, align=8, order="chess")
    assert (grid.rows, grid.cols) == (3, 3)
    assert [t.index for t in grid] == [0, 2, 4, 6, 8, 1, 3, 5, 7]
    even, odd = chess_groups(grid)
    assert [t.index for t in even] == [0, 2, 4, 6, 8]
    assert [t.index for t in odd] == [1, 3, 5, 7]
    linear = plan_grid(1280, 1280, 512, 128, align=8)
    assert [t.index for t in linear] == list(range(9))
    assert linear.tiles == grid.tiles


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile": 500, "align": 8}, "tile size 500 is not a multiple of 8"),
        ({"tile": (512, 500), "align": 8}, "tile size 500 is not a multiple of 8"),
        ({"overlap": 512}, "overlap 512 must be smaller than the tile 512"),
        ({"overlap": 600}, "overlap 600 must be smaller than the tile 512"),
        ({"order": "spiral"}, "unknown tile order 'spiral'"),
        ({"height": 1001, "align": 8}, "canvas height 1001 is not a multiple of 8"),
        ({"width": 0}, "canvas width must be positive"),
    ],
)
def test_plan_grid_errors(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"height": 1024, "width": 1024, "tile": 512, "overlap": 64}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        plan_grid(**args)  # type: ignore[arg-type]


# -- Box, Overlap, scaling ------------------------------------------------------------------


def test_box_basics() -> None:
    box = Box(8, 16, 32, 64)
    assert (box.bottom, box.right, box.area) == (40, 80, 2048)
    assert box.slices == (slice(8, 40), slice(16, 80))
    assert box.shifted(-8, 4) == Box(0, 20, 32, 64)
    assert box.intersect(Box(0, 0, 10, 20)) == Box(8, 16, 2, 4)
    assert box.intersect(Box(40, 0, 10, 100)) is None  # touching is not overlapping
    assert box.expanded(4) == Box(4, 12, 40, 72)
    assert box.expanded(16, within=Box(0, 0, 100, 90)) == Box(0, 0, 56, 90)
    assert box.contains(Box(8, 16, 32, 64)) and not box.contains(Box(8, 16, 33, 64))
    with pytest.raises(ValueError, match="non-negative"):
        Box(0, 0, -1, 4)
    with pytest.raises(ValueError, match="negative position"):
        Box(-1, 0, 4, 4).slices  # noqa: B018
    with pytest.raises(ValueError, match="does not intersect"):
        Box(0, 0, 4, 4).expanded(1, within=Box(10, 10, 4, 4))


def test_box_scaled() -> None:
    assert Box(64, 128, 512, 256).scaled(1 / 8) == Box(8, 16, 64, 32)
    assert Box(8, 16, 64, 32).scaled(8) == Box(64, 128, 512, 256)
    assert Box(3, 6, 9, 12).scaled(1 / 3) == Box(1, 2, 3, 4)
    with pytest.raises(ValueError, match="not an integer"):
        Box(4, 0, 8, 8).scaled(1 / 8)
    with pytest.raises(ValueError, match="positive"):
        Box(0, 0, 8, 8).scaled(0)
    assert Overlap(8, 0, 16, 64).scaled(0.125) == Overlap(1, 0, 2, 8)
    with pytest.raises(ValueError, match="not an integer"):
        Overlap(top=12).scaled(1 / 8)


def test_grid_scaled_round_trip() -> None:
    pixels = plan_grid(1024, 1536, 512, 64, align=8, order="chess")
    latent = pixels.scaled(1 / 8)
    assert (latent.height, latent.width, latent.tile_height, latent.tile_width) == (
        128,
        192,
        64,
        64,
    )
    assert latent.align == 1 and latent.order == "chess"
    assert [t.box for t in latent.tiles] == [t.box.scaled(1 / 8) for t in pixels.tiles]
    assert [t.overlap for t in latent.tiles] == [t.overlap.scaled(1 / 8) for t in pixels.tiles]
    assert [t.index for t in latent] == [t.index for t in pixels]
    assert latent == plan_grid(128, 192, 64, 8, order="chess")
    back = latent.scaled(8)
    assert back.tiles == pixels.tiles and back.align == 8
    with pytest.raises(ValueError, match="not an integer"):
        plan_grid(1000, 1000, 512, 64, align=8).scaled(1 / 16)


def test_grid_validates_itself() -> None:
    grid = plan_grid(64, 64, 32, 8)
    with pytest.raises(ValueError, match="tiles for a"):
        TileGrid(64, 64, 32, 32, 2, 2, grid.tiles, "linear")
    with pytest.raises(ValueError, match="unknown tile order"):
        TileGrid(64, 64, 32, 32, grid.rows, grid.cols, grid.tiles, "random")

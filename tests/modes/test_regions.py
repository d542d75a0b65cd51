"""Seam-fix geometry and masks: exact region tables, mask properties, crops, validation."""

from __future__ import annotations

import pytest
import torch
from oracles import band_mask, half_tile_mask, radial_mask, seam_fix_regions

from tileup.choices import SEAM_FIX_MODES
from tileup.modes.regions import (
    Region,
    blur_mask,
    blur_radius,
    context_crop,
    crop_box,
    crop_masks,
    region_mask,
    seam_fix_passes,
    tile_regions,
)
from tileup.tiler import Box, plan_grid

# 3 columns × 2 rows of 64 px tiles, no overlap: seams at y = 64 and x = 64, 128
GRID = plan_grid(128, 192, 64, 0, align=8)


def _table(regions) -> list[tuple]:
    return [(r.box.top, r.box.left, r.box.height, r.box.width, r.key) for r in regions]


def test_grid_seams() -> None:
    assert GRID.inner_seams() == ((64,), (64, 128))


def test_band_regions_exact() -> None:
    passes = seam_fix_passes(GRID, "band", 32)
    assert [p.name for p in passes] == ["band-rows", "band-cols"]
    rows, cols = passes
    assert _table(rows.regions) == [
        (48, 0, 32, 64, (0, 0)),
        (48, 64, 32, 64, (0, 1)),
        (48, 128, 32, 64, (0, 2)),
    ]
    assert _table(cols.regions) == [
        (0, 48, 64, 32, (0, 0)),
        (64, 48, 64, 32, (0, 1)),
        (0, 112, 64, 32, (1, 0)),
        (64, 112, 64, 32, (1, 1)),
    ]
    for r in rows.regions:
        assert (r.line_y, r.reach_y, r.line_x) == (64, 16, None) and r.support == r.box
    for r in cols.regions:
        assert r.line_x in (64, 128) and r.reach_x == 16 and r.line_y is None
    # the strips cover every seam over the whole canvas, pieces never larger than a tile
    assert sum(r.box.width for r in rows.regions) == 192
    assert sum(r.box.height for r in cols.regions) == 2 * 128


def test_half_tile_and_intersection_regions_exact() -> None:
    passes = seam_fix_passes(GRID, "half-tile+intersections", 64)
    assert [p.name for p in passes] == ["half-tile-rows", "half-tile-cols", "intersections"]
    rows, cols, corners = passes
    assert _table(rows.regions) == [
        (32, 0, 64, 64, (0, 0)),
        (32, 64, 64, 64, (0, 1)),
        (32, 128, 64, 64, (0, 2)),
    ]
    assert _table(cols.regions) == [
        (0, 32, 64, 64, (0, 0)),
        (64, 32, 64, 64, (0, 1)),
        (0, 96, 64, 64, (1, 0)),
        (64, 96, 64, 64, (1, 1)),
    ]
    assert _table(corners.regions) == [(32, 32, 64, 64, (0, 0)), (32, 96, 64, 64, (0, 1))]
    assert [(r.line_y, r.line_x, r.reach_y, r.reach_x) for r in corners.regions] == [
        (64, 64, 32, 32),
        (64, 128, 32, 32),
    ]
    assert seam_fix_passes(GRID, "half-tile", 64) == passes[:2]
    assert seam_fix_passes(GRID, "none", 64) == ()
    flat = seam_fix_regions(GRID, "half-tile+intersections", 64)
    assert flat == rows.regions + cols.regions + corners.regions


def test_seams_alone_give_the_same_regions_as_the_grid() -> None:
    seams = GRID.inner_seams()
    for mode in SEAM_FIX_MODES:
        assert seam_fix_regions(seams, mode, 32, canvas=(128, 192), tile=64) == seam_fix_regions(
            GRID, mode, 32
        )
    with pytest.raises(ValueError, match="canvas"):
        seam_fix_regions(seams, "band", 32)


def test_chess_order_of_seam_pieces() -> None:
    rows = seam_fix_passes(GRID, "half-tile", 64, order="chess")[1]
    assert [r.key for r in rows.regions] == [(0, 0), (1, 1), (0, 1), (1, 0)]


def test_snapped_grid_tiles_and_pieces_partition_the_canvas() -> None:
    grid = plan_grid(160, 160, 64, 0, align=8)  # starts 0, 48, 96: tiles overlap by 16
    assert grid.inner_seams() == ((56, 104), (56, 104))
    tiles = tile_regions(grid)
    assert [(r.support.top, r.support.height) for r in tiles[::3]] == [(0, 56), (56, 48), (104, 56)]
    coverage = torch.zeros(160, 160)
    for r in tiles:
        assert r.box.height == r.box.width == 64 and r.box.contains(r.support)
        coverage[r.support.slices] += 1
    assert bool((coverage == 1).all())
    # half-tile pieces along a seam: full tiles along it, masks only on the tile's cell
    cols = seam_fix_passes(grid, "half-tile", 64)[1].regions
    assert [(r.box.top, r.support.top, r.support.height) for r in cols[:3]] == [
        (0, 0, 56),
        (48, 56, 48),
        (96, 104, 56),
    ]
    assert all(r.box.left == 24 and r.box.width == 64 for r in cols[:3])


def test_tile_regions_follow_the_grid_order() -> None:
    linear = tile_regions(GRID)
    chess = tile_regions(plan_grid(128, 192, 64, 0, align=8, order="chess"))
    assert [r.key for r in linear] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [r.key for r in chess] == [(0, 0), (0, 2), (1, 1), (0, 1), (1, 0), (1, 2)]
    assert all(r.support == r.box for r in linear)


# -- masks -----------------------------------------------------------------------------------


def test_band_mask_is_a_tent_on_the_seam() -> None:
    mask = band_mask(8, 3, 4, 8, "y")
    expected = torch.tensor([0, 1 / 3, 2 / 3, 1, 1, 2 / 3, 1 / 3, 0])
    torch.testing.assert_close(mask[:, 0], expected)
    assert bool((mask == mask[:, :1]).all())  # constant along the seam
    wide = band_mask(64, 64, 32, 64, "x")
    assert float(wide[0, 31]) == float(wide[0, 32]) == 1.0  # peak 1 on both sides of the seam
    assert float(wide[0, 0]) == float(wide[0, 63]) == 0.0  # 0 at the strip edges
    assert bool((wide[0, 1:32] > wide[0, :31]).all())  # rising linearly toward the seam
    torch.testing.assert_close(wide[0, 1:32] - wide[0, :31], torch.full((31,), 1 / 31))


def test_half_tile_mask() -> None:
    mask = half_tile_mask(64, 64, 32, "y")
    assert float(mask[31, 5]) == float(mask[32, 5]) == 1.0
    assert float(mask[0].max()) == float(mask[63].max()) == 0.0
    torch.testing.assert_close(mask, band_mask(64, 64, 32, 64, "y"))
    torch.testing.assert_close(half_tile_mask(64, 64, 32, "x"), mask.T)


def test_radial_mask() -> None:
    mask = radial_mask(64, 64, 32, 32)
    assert [float(mask[y, x]) for y, x in ((31, 31), (31, 32), (32, 31), (32, 32))] == [1.0] * 4
    for edge in (mask[0], mask[63], mask[:, 0], mask[:, 63]):
        assert float(edge.max()) == 0.0
    torch.testing.assert_close(mask, mask.flip(0))
    torch.testing.assert_close(mask, mask.T)
    # along the axes it is the half-tile tent; toward the box corner it falls faster
    torch.testing.assert_close(mask[31], half_tile_mask(64, 64, 32, "x")[0])
    assert float(mask[10, 10]) < float(mask[31, 10])
    small = radial_mask(8, 8, 4, 4)
    assert float(small[3, 1]) == pytest.approx(1 / 3)
    assert float(small[2, 2]) == pytest.approx(1 - 2**0.5 / 3)  # u = 1/3 along both axes


def test_region_mask_keeps_to_the_support() -> None:
    box, support = Box(0, 0, 16, 24), Box(0, 8, 16, 8)
    flat = region_mask(Region(box, support))
    assert float(flat.sum()) == 16 * 8 and float(flat[:, 8:16].min()) == 1.0
    with pytest.raises(ValueError, match="support"):
        Region(box, Box(0, 20, 16, 8))
    with pytest.raises(ValueError, match="reach"):
        Region(box, box, line_y=8, reach_y=1)


def test_blur_width_and_border_replication() -> None:
    assert [blur_radius(s) for s in (0, 1, 4, 8)] == [0, 3, 10, 20]
    mask = torch.zeros(40, 40)
    mask[15:25, 15:25] = 1
    blurred = blur_mask(mask, 4)
    r = blur_radius(4)
    rows = torch.nonzero(blurred.sum(1) > 0)[:, 0]
    assert (int(rows.min()), int(rows.max())) == (15 - r, 24 + r)  # reaches exactly r pixels out
    assert float(blurred.max()) < 1.0 and float(blurred.sum()) == pytest.approx(100, rel=1e-5)
    assert blur_mask(mask, 0) is mask
    # beyond the canvas border the mask goes on: a full mask stays 1 at the border
    full = torch.ones(12, 12)
    border = blur_mask(full, 2, (True, True, True, True))
    torch.testing.assert_close(border, full)
    open_sides = blur_mask(full, 2)
    assert 0.5 < float(open_sides[0, 6]) < 0.65  # half the kernel, plus its centre tap


def test_crop_box_shifts_inward_and_rounds_outward() -> None:
    canvas = Box(0, 0, 128, 192)
    assert crop_box(Box(32, 64, 64, 64), 32, canvas, 8) == Box(0, 32, 128, 128)
    assert crop_box(Box(36, 60, 20, 20), 6, canvas, 8) == Box(24, 48, 40, 40)  # rounded out
    assert crop_box(Box(32, 64, 64, 64), 0, canvas, 8) == Box(32, 64, 64, 64)
    # at the canvas edge the crop keeps its size (shifted in), clipped only to a smaller canvas
    assert crop_box(Box(0, 0, 64, 64), 32, canvas, 8) == Box(0, 0, 128, 128)
    assert crop_box(Box(0, 128, 64, 64), 16, canvas, 8) == Box(0, 96, 96, 96)
    big = Box(0, 0, 256, 256)
    sizes = {
        (c.height, c.width)
        for c in (crop_box(r.box, 32, big, 8) for r in tile_regions(plan_grid(256, 256, 64, 0)))
    }
    assert sizes == {(128, 128)}  # every tile of a grid: one crop size
    assert crop_box(Box(192, 192, 64, 64), 32, big, 8) == Box(128, 128, 128, 128)
    with pytest.raises(ValueError, match="non-negative"):
        crop_box(Box(0, 0, 64, 64), -1, canvas, 8)
    with pytest.raises(ValueError, match="outside"):
        crop_box(Box(96, 0, 64, 64), 8, canvas, 8)


def test_crop_masks() -> None:
    canvas = Box(0, 0, 256, 192)
    region = tile_regions(plan_grid(256, 192, 64, 0, align=8))[4]  # row 1, col 1
    assert region.box == Box(64, 64, 64, 64)
    crop = crop_box(region.box, 32, canvas, 8)
    assert crop == Box(32, 32, 128, 128)
    paste, free = crop_masks(region, crop, canvas, 8, 8)
    assert paste.shape == (128, 128) and free.shape == (16, 16)
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:12, 4:12] = True
    assert torch.equal(free, expected)
    # blur_radius(8) = 20: the paste reaches exactly 20 px beyond the box, then stops
    assert float(paste[32 - 20 - 1].max()) == 0.0 and float(paste[32 - 20].max()) > 0.0
    assert float(paste[:, : 32 - 20].max()) == 0.0 and float(paste[96 + 20 :].max()) == 0.0
    assert float(paste[64, 64]) == pytest.approx(1.0, abs=1e-6)
    # a tile on the canvas border keeps full weight up to the border
    corner = tile_regions(plan_grid(256, 192, 64, 0, align=8))[11]  # row 3, col 2
    crop = crop_box(corner.box, 32, canvas, 8)
    assert crop == Box(128, 64, 128, 128)
    paste, _ = crop_masks(corner, crop, canvas, 8, 8)
    assert float(paste[-1, -1]) == pytest.approx(1.0) and float(paste[-1, 0]) == 0.0


@pytest.mark.parametrize("padding", [0, 8, 16, 32])
def test_context_crop_holds_the_whole_blurred_mask(padding: int) -> None:
    """The crop grows to the blur's reach when --padding is smaller (A1111 crops around the
    blurred mask): the paste weight falls to 0 inside the crop, never cut off at its edge."""
    canvas = Box(0, 0, 256, 256)
    region = tile_regions(plan_grid(256, 256, 64, 0, align=8))[5]  # row 1, col 1: inner
    crop = context_crop(region.box, padding, 8, canvas, 8)
    reach = max(padding, blur_radius(8))  # 20 px
    assert crop == crop_box(region.box, reach, canvas, 8)
    assert crop.top <= region.box.top - reach and crop.bottom >= region.box.bottom + reach
    paste, _ = crop_masks(region, crop, canvas, 8, 8)
    edges = torch.cat([paste[0], paste[-1], paste[:, 0], paste[:, -1]])
    assert float(edges.max()) == 0.0
    whole = torch.zeros(256, 256)
    whole[region.box.slices] = 1.0
    assert float(paste.sum()) == pytest.approx(float(blur_mask(whole, 8).sum()), rel=1e-5)
    assert context_crop(region.box, 32, 0, canvas, 8) == crop_box(region.box, 32, canvas, 8)


# -- bad values ----------------------------------------------------------------------------


def test_geometry_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="seam-fix mode"):
        seam_fix_passes(GRID, "diagonal", 64)
    with pytest.raises(ValueError, match="band width"):
        seam_fix_passes(GRID, "band", 128)


def test_band_on_a_canvas_narrower_than_the_band() -> None:
    """40 px high, 200 px wide: vertical seams only; the band fits the tile across them, so the
    low canvas does not limit it (it used to be refused with a wrong message)."""
    grid = plan_grid(40, 200, 64, 0, align=8)
    assert grid.inner_seams()[0] == () and grid.tile_height == 40
    (cols,) = seam_fix_passes(grid, "band", 64)
    assert cols.name == "band-cols" and len(cols.regions) == len(grid.inner_seams()[1])
    assert all(r.box.height == 40 and r.box.width == 64 for r in cols.regions)
    tall = plan_grid(200, 40, 64, 0, align=8)  # horizontal seams only, tile 64 across them
    with pytest.raises(ValueError, match=r"band width 72 must be even, in \[4, 64\]"):
        seam_fix_passes(tall, "band", 72)
    with pytest.raises(ValueError, match="order"):
        seam_fix_passes(GRID, "band", 32, order="random")

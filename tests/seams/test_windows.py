"""Blend windows, their normalisation (checked against the accumulator oracle), seam metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import WeightedAccumulator, merge_tiles, split_tiles

from tileup.choices import BLENDS as BLEND_KINDS
from tileup.seams.metrics import boundary_ratio, seam_ratio
from tileup.seams.windows import blend_window, normalized_windows, ramp
from tileup.tiler import Box, Overlap, TileGrid, plan_grid

GRIDS = {
    "exact": plan_grid(96, 160, 32, 8),  # strides divide evenly
    "snapped": plan_grid(100, 130, (48, 40), 12),  # edge tiles snapped inward
    "aligned": plan_grid(1000, 744, 512, 64, align=8),
    "dense": plan_grid(60, 44, 16, 13),  # overlaps larger than half a tile
    "small": plan_grid(20, 36, 64, 8),  # canvas smaller than one tile
    "strip": plan_grid(24, 200, 64, 16),  # one row
}


# -- windows --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BLEND_KINDS)
def test_ramp_shape(kind: str) -> None:
    for n in (1, 2, 7, 64):
        r = ramp(n, kind)
        assert r.shape == (n,)
        assert bool((r > 0).all()) and bool((r <= 1).all())
        assert bool((r[1:] > r[:-1]).all())  # rises toward the inner end
    assert ramp(0, kind).shape == (0,)
    assert float(ramp(64, kind)[-1]) > 0.95
    assert float(ramp(64, kind)[0]) < 0.1


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_opposite_ramps_sum_to_one(kind: str) -> None:
    r = ramp(24, kind)
    torch.testing.assert_close(r + r.flip(0), torch.ones(24, dtype=torch.float64))


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="gaussian"):
        ramp(4, "hann")
    with pytest.raises(ValueError, match="unknown blend kind"):
        blend_window(4, 4, Overlap(), "box")


@pytest.mark.parametrize("kind", BLEND_KINDS)
def test_window_ramps_only_on_shared_sides(kind: str) -> None:
    corner = blend_window(32, 40, Overlap(bottom=8, right=12), kind)
    assert corner.shape == (32, 40) and corner.dtype == torch.float32
    assert bool((corner > 0).all())
    assert bool((corner[:24, :28] == 1).all())  # outer sides and interior: exactly 1
    assert bool((corner[0, :28] == 1).all()) and bool((corner[:24, 0] == 1).all())
    assert bool((corner[24:, :28] < 1).all()) and bool((corner[:24, 28:] < 1).all())
    # separable: each corner-region value is the product of its row and column ramps
    torch.testing.assert_close(corner[-1, -1], corner[-1, 0] * corner[0, -1])
    middle = blend_window(16, 16, Overlap(4, 4, 4, 4), kind, dtype=torch.float64)
    assert bool((middle[4:12, 4:12] == 1).all())
    assert torch.equal(middle, middle.flip(0)) and torch.equal(middle, middle.T)
    alone = blend_window(8, 8, Overlap(), kind)
    assert torch.equal(alone, torch.ones(8, 8))


def test_window_with_overlaps_wider_than_half_the_tile() -> None:
    w = blend_window(16, 16, Overlap(13, 13, 13, 13), "cosine")
    assert bool((w > 0).all()) and float(w.max()) < 1
    with pytest.raises(ValueError, match="exceed the tile size"):
        blend_window(8, 8, Overlap(top=9))


# -- merging --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BLEND_KINDS)
@pytest.mark.parametrize("name", list(GRIDS))
def test_ones_merge_to_one(kind: str, name: str) -> None:
    grid = GRIDS[name]
    tiles = [torch.ones(3, t.box.height, t.box.width) for t in grid.tiles]
    merged = merge_tiles(grid, tiles, kind)
    assert merged.shape == (3, grid.height, grid.width)
    assert float((merged - 1).abs().max()) < 1e-6


@pytest.mark.parametrize("kind", BLEND_KINDS)
@pytest.mark.parametrize("name", list(GRIDS))
def test_normalized_windows_sum_to_one(kind: str, name: str) -> None:
    grid = GRIDS[name]
    windows = normalized_windows(grid, kind)
    assert len(windows) == len(grid)
    total = torch.zeros(grid.height, grid.width)
    for tile, window in zip(grid.tiles, windows, strict=True):
        assert window.shape == (tile.box.height, tile.box.width)
        assert bool((window > 0).all())
        total[tile.box.slices] += window
    assert float((total - 1).abs().max()) < 1e-6


@pytest.mark.parametrize("kind", BLEND_KINDS)
@pytest.mark.parametrize("name", list(GRIDS))
def test_split_then_merge_is_identity(kind: str, name: str) -> None:
    grid = GRIDS[name]
    canvas = torch.rand(1, 2, grid.height, grid.width, generator=torch.Generator().manual_seed(0))
    tiles = split_tiles(canvas, grid)
    assert [tuple(t.shape[-2:]) for t in tiles] == [(t.box.height, t.box.width) for t in grid.tiles]
    storage = canvas.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == storage for t in tiles)  # views, not copies
    torch.testing.assert_close(merge_tiles(grid, tiles, kind), canvas, atol=1e-6, rtol=0)


def test_merge_keeps_dtype_and_checks_shapes() -> None:
    grid = GRIDS["snapped"]
    canvas = torch.rand(3, grid.height, grid.width, dtype=torch.float64)
    merged = merge_tiles(grid, split_tiles(canvas, grid))
    assert merged.dtype == torch.float64
    torch.testing.assert_close(merged, canvas, atol=1e-12, rtol=0)
    half = merge_tiles(grid, [t.to(torch.bfloat16) for t in split_tiles(canvas, grid)])
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="tiles for a grid"):
        merge_tiles(grid, split_tiles(canvas, grid)[:-1])
    with pytest.raises(ValueError, match="does not match the grid"):
        split_tiles(canvas[..., :-1], grid)


def test_accumulator_matches_merge() -> None:
    grid = GRIDS["aligned"]
    canvas = torch.rand(1, 3, grid.height, grid.width, generator=torch.Generator().manual_seed(1))
    acc = WeightedAccumulator(tuple(canvas.shape))
    for tile, values in zip(grid.tiles, split_tiles(canvas, grid), strict=True):
        acc.add(tile.box, values, blend_window(tile.box.height, tile.box.width, tile.overlap))
    torch.testing.assert_close(acc.result(), canvas, atol=1e-6, rtol=0)
    assert acc.weight_sum.shape == (grid.height, grid.width)


def test_accumulator_rejects_uncovered_and_bad_shapes() -> None:
    acc = WeightedAccumulator((3, 16, 16))
    acc.add(Box(0, 0, 16, 8), torch.ones(3, 16, 8), torch.ones(16, 8))
    with pytest.raises(ValueError, match="128 canvas pixels have no weight"):
        acc.result()
    with pytest.raises(ValueError, match="not inside the canvas"):
        acc.add(Box(8, 8, 16, 16), torch.ones(3, 16, 16), torch.ones(16, 16))
    with pytest.raises(ValueError, match="do not match the box size"):
        acc.add(Box(0, 8, 16, 8), torch.ones(3, 16, 8), torch.ones(8, 16))
    acc.add(Box(0, 8, 16, 8), 2 * torch.ones(3, 16, 8), torch.ones(16, 8))
    result = acc.result()
    assert torch.equal(result[:, :, :8], torch.ones(3, 16, 8))
    assert torch.equal(result[:, :, 8:], torch.full((3, 16, 8), 2.0))


# -- seam metric ----------------------------------------------------------------------------


def _smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """HWC float32: gradients and a slow wave in [0, 1], plus faint noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.stack(
        [
            0.3 + 0.4 * yy / height + 0.2 * xx / width,
            0.5 + 0.1 * np.sin(xx / 97 + yy / 131),
            0.2 + 0.5 * xx / width,
        ],
        axis=-1,
    )
    return (image + np.random.default_rng(seed).normal(0, 0.01, image.shape)).astype(np.float32)


def _paste(grid: TileGrid, tiles: list[torch.Tensor]) -> torch.Tensor:
    """Naive paste: every pixel from the one tile whose seam-delimited cell holds it."""
    ys, xs = grid.inner_seams()
    by, bx = [0, *ys, grid.height], [0, *xs, grid.width]
    out = torch.empty(*tiles[0].shape[:-2], grid.height, grid.width, dtype=tiles[0].dtype)
    for t in grid.tiles:
        (y0, y1), (x0, x1) = by[t.row : t.row + 2], bx[t.col : t.col + 2]
        out[..., y0:y1, x0:x1] = tiles[t.index][
            ..., y0 - t.box.top : y1 - t.box.top, x0 - t.box.left : x1 - t.box.left
        ]
    return out


SEAM_GRID = plan_grid(256, 384, 96, 16)  # 3 x 5 tiles


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seam_ratio_is_one_without_seams(seed: int) -> None:
    image = _smooth_image(SEAM_GRID.height, SEAM_GRID.width, seed)
    assert abs(seam_ratio(image, SEAM_GRID) - 1) < 0.05
    chw = torch.from_numpy(image).permute(2, 0, 1)
    assert seam_ratio(chw, SEAM_GRID) == pytest.approx(seam_ratio(image, SEAM_GRID))
    assert seam_ratio(chw[None], SEAM_GRID) == pytest.approx(seam_ratio(image, SEAM_GRID))


def test_seam_ratio_sees_pasted_offsets_and_blending_hides_them() -> None:
    grid = SEAM_GRID
    canvas = torch.from_numpy(_smooth_image(grid.height, grid.width, 0)).permute(2, 0, 1)
    order = torch.randperm(len(grid), generator=torch.Generator().manual_seed(0))
    offsets = torch.linspace(-0.1, 0.1, len(grid))[order]
    tiles = [t + float(o) for t, o in zip(split_tiles(canvas, grid), offsets, strict=True)]
    assert seam_ratio(_paste(grid, tiles), grid) > 1.5
    image = (_paste(grid, tiles).permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    assert seam_ratio(image, grid) > 1.5  # uint8 HWC works too
    for kind in BLEND_KINDS:
        assert seam_ratio(merge_tiles(grid, tiles, kind), grid) < 1.2


def test_boundary_ratio_lines() -> None:
    image = torch.zeros(1, 40, 60)
    image[:, 20:, :] = 1.0  # one horizontal step between rows 19 and 20
    assert boundary_ratio(image, [20], []) == float("inf")
    assert boundary_ratio(image, [10], []) == 1.0  # flat everywhere measured
    image += torch.arange(60.0) * 0.01  # a constant horizontal slope
    assert boundary_ratio(image, [], [30]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no seams"):
        boundary_ratio(image, [], [])
    with pytest.raises(ValueError, match="must lie in"):
        boundary_ratio(image, [40], [])


def test_seam_ratio_errors() -> None:
    single = plan_grid(64, 64, 64, 8)
    with pytest.raises(ValueError, match="no inner seams"):
        seam_ratio(np.zeros((64, 64, 3), np.float32), single)
    with pytest.raises(ValueError, match="does not match the grid"):
        seam_ratio(np.zeros((64, 65, 3), np.float32), plan_grid(64, 64, 32, 8))

"""Pure tile geometry: boxes, overlaps, tiles, grids and their processing order."""

from __future__ import annotations

from tileup.tiler.geometry import (
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

__all__ = [
    "Box",
    "Overlap",
    "Tile",
    "TileGrid",
    "axis_starts",
    "chess_groups",
    "even_steps",
    "plan_grid",
    "split_box",
]

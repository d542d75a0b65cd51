"""Pure tile geometry: boxes, overlaps, tiles, grids and their processing order."""

from __future__ import annotations

from tileup.tiler.geometry import (
    ORDERS,
    Box,
    Overlap,
    Tile,
    TileGrid,
    axis_starts,
    chess_groups,
    plan_grid,
)

__all__ = [
    "ORDERS",
    "Box",
    "Overlap",
    "Tile",
    "TileGrid",
    "axis_starts",
    "chess_groups",
    "plan_grid",
]

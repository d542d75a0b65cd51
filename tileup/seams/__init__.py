"""Blend windows, the weighted accumulator and seam metrics."""

from __future__ import annotations

from tileup.seams.accumulator import (
    WeightedAccumulator,
    merge_tiles,
    normalized_windows,
    split_tiles,
)
from tileup.seams.metrics import boundary_ratio, seam_ratio
from tileup.seams.windows import BLEND_KINDS, blend_window, ramp

__all__ = [
    "BLEND_KINDS",
    "WeightedAccumulator",
    "blend_window",
    "boundary_ratio",
    "merge_tiles",
    "normalized_windows",
    "ramp",
    "seam_ratio",
    "split_tiles",
]

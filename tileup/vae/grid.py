"""The tile grid of the exact tiled VAE: uniform cores over a latent canvas, each owning a
region; the owned regions partition the canvas (see :mod:`tileup.vae.engine`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from tileup.tiler import axis_starts

__all__ = ["VaeGrid", "VaeTile", "owned_region", "vae_grid"]


@dataclass(frozen=True)
class VaeTile:
    """A tile in latent px: its core ``[top, top + tile_h) × [left, left + tile_w)`` and its owned
    region (inside the core; the owned regions of all tiles partition the canvas)."""

    top: int
    left: int
    own_top: int
    own_left: int
    own_height: int
    own_width: int


@dataclass(frozen=True)
class VaeGrid:
    """Uniform-size tiles over a ``height × width`` latent canvas."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    tiles: tuple[VaeTile, ...]


def vae_grid(height: int, width: int, tile: int) -> VaeGrid:
    """Fewest ``min(tile, side)``-sized cores covering the canvas, evenly spread, snapped in."""
    th, tw = min(tile, height), min(tile, width)

    def axis(length: int, size: int) -> list[tuple[int, int]]:
        starts = axis_starts(length, size, 0)
        return list(zip(starts, [*starts[1:], length], strict=True))

    tiles = tuple(
        VaeTile(top, left, top, left, bottom - top, right - left)
        for (top, bottom), (left, right) in itertools.product(axis(height, th), axis(width, tw))
    )
    return VaeGrid(height, width, th, tw, tiles)


def owned_region(t: VaeTile, scale: int) -> tuple[int, int, int, int]:
    """Owned region of ``t`` relative to its core, at ``scale``: (y0, y1, x0, x1)."""
    y0, x0 = (t.own_top - t.top) * scale, (t.own_left - t.left) * scale
    return y0, y0 + t.own_height * scale, x0, x0 + t.own_width * scale

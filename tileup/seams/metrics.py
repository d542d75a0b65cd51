"""Seam visibility: how much sharper an image changes on tile boundaries than between them.

A line at ``y`` (horizontal) is the boundary between pixel rows ``y - 1`` and ``y``; its
gradient magnitude is ``|I[y] - I[y - 1]|`` averaged over the line's pixels and channels.
Vertical lines at ``x`` alike, with columns.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from tileup.tiler.geometry import TileGrid


def _as_chw(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """numpy ``(H, W)``/``(H, W, C)`` or torch ``(H, W)``/``(C, H, W)``/``(N, C, H, W)``."""
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise ValueError(f"numpy images must be (H, W) or (H, W, C), got {image.shape}")
        array = np.ascontiguousarray(image)
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
        return tensor if tensor.ndim == 2 else tensor.movedim(-1, 0)
    if image.ndim not in (2, 3, 4):
        raise ValueError(f"tensors must be (H, W), (C, H, W) or (N, C, H, W), got {image.shape}")
    return image


def _line_gradient(image: torch.Tensor, lines: Sequence[int], dim: int) -> float:
    """Mean ``|I[line] - I[line - 1]|`` along dimension ``dim`` over all ``lines``."""
    index = torch.as_tensor(list(lines), dtype=torch.long, device=image.device)
    after = image.index_select(dim, index).double()
    before = image.index_select(dim, index - 1).double()
    return float((after - before).abs().mean())


def _midlines(seams: Sequence[int], length: int) -> list[int]:
    """Midpoints between consecutive boundaries among ``0, *seams, length``."""
    bounds = [0, *sorted(set(seams)), length]
    mids = {(a + b) // 2 for a, b in itertools.pairwise(bounds)}
    return sorted(m for m in mids - set(seams) if 1 <= m < length)


def boundary_ratio(
    image: torch.Tensor | np.ndarray, seams_y: Sequence[int], seams_x: Sequence[int]
) -> float:
    """Gradient on the seam lines over the gradient on the midlines between them.

    Reference lines along each axis are the midpoints between consecutive seams and between the
    canvas edges and the outer seams (``(a + b) // 2``, dropping any that coincide with a seam or
    the edge). For each axis with seams, the mean gradient across its seam lines and across its
    reference lines are taken; the ratio is ``sum(seam means) / sum(reference means)``, so
    horizontal lines are only compared with horizontal ones. 1.0 means no visible seam. A flat
    reference gives 1.0 if the seams are flat too, else ``inf``. See :func:`seam_ratio` for
    the image layouts.
    """
    chw = _as_chw(image)
    height, width = chw.shape[-2:]
    seam_sum = ref_sum = 0.0
    used = False
    for seams, length, dim in ((seams_y, height, -2), (seams_x, width, -1)):
        if not seams:
            continue
        if any(not 1 <= s < length for s in seams):
            raise ValueError(f"seams {tuple(seams)} must lie in [1, {length})")
        refs = _midlines(seams, length)
        if not refs:
            raise ValueError(f"no reference lines between seams {tuple(seams)} in {length}")
        seam_sum += _line_gradient(chw, seams, chw.ndim + dim)
        ref_sum += _line_gradient(chw, refs, chw.ndim + dim)
        used = True
    if not used:
        raise ValueError("no seams to measure")
    if ref_sum == 0.0:
        return 1.0 if seam_sum == 0.0 else float("inf")
    return seam_sum / ref_sum


def seam_ratio(image: torch.Tensor | np.ndarray, grid: TileGrid) -> float:
    """Seam visibility of ``image`` tiled by ``grid`` (in the image's pixel units).

    Images are numpy ``(H, W)`` or ``(H, W, C)`` (any real dtype, e.g. HWC float or uint8), or
    torch ``(H, W)``, ``(C, H, W)`` or ``(N, C, H, W)``; ``H, W`` must equal the grid's canvas.
    Seam lines are ``grid.inner_seams()``; reference lines and the ratio are as in
    :func:`boundary_ratio`. About 1.0 means no visible seam. ValueError if the grid has no
    inner seams.
    """
    chw = _as_chw(image)
    if tuple(chw.shape[-2:]) != (grid.height, grid.width):
        raise ValueError(
            f"image {tuple(image.shape)} does not match the grid {grid.height}x{grid.width}"
        )
    seams_y, seams_x = grid.inner_seams()
    if not seams_y and not seams_x:
        raise ValueError("the grid has a single tile: no inner seams to measure")
    return boundary_ratio(chw, seams_y, seams_x)

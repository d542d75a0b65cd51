"""Latent interpolation: the latent upscale modes of A1111 hires fix and ComfyUI.

All functions take and return NCHW float tensors; the target is (height, width) in latent cells.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tileup.choices import LATENT_MODES


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between vectors along dim 1 (channels), magnitudes lerped.

    ``t`` broadcasts against ``a``/``b`` with size 1 on dim 1. Falls back to lerp where the
    vectors are (anti)parallel or zero.
    """
    eps = 1e-6
    a_norm: torch.Tensor = a.norm(dim=1, keepdim=True)  # Tensor.norm is untyped in torch
    b_norm: torch.Tensor = b.norm(dim=1, keepdim=True)
    a_unit = a / a_norm.clamp_min(eps)
    b_unit = b / b_norm.clamp_min(eps)
    dot = (a_unit * b_unit).sum(dim=1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    safe = sin_omega.abs() > eps
    sin_safe = torch.where(safe, sin_omega, torch.ones_like(sin_omega))
    direction = (torch.sin((1 - t) * omega) * a_unit + torch.sin(t * omega) * b_unit) / sin_safe
    direction = torch.where(safe, direction, (1 - t) * a_unit + t * b_unit)
    magnitude = (1 - t) * a_norm + t * b_norm
    return direction * magnitude


def _bislerp_axis(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Resize ``x`` along spatial ``dim`` (2 or 3) by slerping neighbouring latent vectors."""
    length = x.shape[dim]
    if length == size:
        return x
    # sample positions with half-pixel centres, like bilinear with align_corners=False
    pos = (torch.arange(size, dtype=torch.float64) + 0.5) * (length / size) - 0.5
    pos = pos.clamp(0, length - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=length - 1)
    frac = (pos - lo).to(x.dtype)
    a = x.index_select(dim, lo.to(x.device))
    b = x.index_select(dim, hi.to(x.device))
    shape = [1, 1, 1, 1]
    shape[dim] = size
    return slerp(a, b, frac.to(x.device).view(shape))


def bislerp(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bislerp: slerp between neighbouring latent vectors, first along rows then columns."""
    return _bislerp_axis(_bislerp_axis(x, height, 2), width, 3)


def interpolate_latents(x: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """Resize NCHW latents to height×width with one of ``LATENT_MODES``."""
    if mode not in LATENT_MODES:
        raise ValueError(f"unknown latent mode {mode!r}; known: {', '.join(LATENT_MODES)}")
    if mode == "bislerp":
        return bislerp(x, height, width)
    size = (height, width)
    if mode in ("nearest", "nearest-exact", "area"):
        return F.interpolate(x, size=size, mode=mode)
    antialias = mode.endswith("-antialiased")
    base = mode.removesuffix("-antialiased")
    return F.interpolate(x, size=size, mode=base, align_corners=False, antialias=antialias)


def centre_crop(
    rgb: np.ndarray | None,
    latents: torch.Tensor | None,
    size: tuple[int, int],
    crop: tuple[int, int],
    factor: int,
) -> tuple[np.ndarray | None, torch.Tensor | None]:
    """The centre ``crop`` (H, W) of an upscale of ``size`` (H, W): pixels (H×W×C) and/or
    latents (…×h×w, ``factor`` pixels a cell), cut as A1111 truncates its hires latents: half
    the excess latent cells above/left (rounded down), the rest below/right; the pixels at the
    same latent-grid offsets."""
    if crop[0] > size[0] or crop[1] > size[1]:
        raise ValueError(f"crop {crop} is larger than the upscale {size}")
    f = factor
    top, left = ((size[0] - crop[0]) // f // 2) * f, ((size[1] - crop[1]) // f // 2) * f
    if rgb is not None:
        rgb = np.ascontiguousarray(rgb[top : top + crop[0], left : left + crop[1]])
    if latents is not None:
        rows, cols = -(-crop[0] // f), -(-crop[1] // f)
        latents = latents[..., top // f : top // f + rows, left // f : left // f + cols]
    return rgb, latents

"""Bit-exact moves of channels-last activations in 16-byte elements.

The exact tiled VAE copies every stage's crops out of its canvases and its results back in
(:mod:`tileup.vae.engine`), and the decoder doubles activations by nearest upsampling. On a
channels-last (C-stride 1) half-precision tensor those are strided copies that PyTorch runs
element by element, two bytes at a time: in the 4096² decode's trace on an H200 (2026-11-30)
the copies took 224 ms and the nearest upsampling 45 ms of 1.18 s of kernels, at ~1.2 and
~0.4 TB/s. Seen as 16-byte elements (8 bf16 channels each; 8-byte ones when C·size is not a
multiple of 16) the same copies move the same bytes in an eighth of the elements, each a
vector load. Nothing is computed, so the results are bit for bit PyTorch's; tensors that do
not have the layout (C-stride not 1, unaligned offsets) take PyTorch's copy.
"""

from __future__ import annotations

import torch

__all__ = ["copy_", "upsample_nearest2x"]

_WIDE = (torch.complex128, torch.int64)
"""Element types a channels-last run of channels is seen as, widest first (16 and 8 bytes)."""


def _wide(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` (…×C×H×W, C-stride 1) as …×H×W×(C·size/w) elements of ``dtype`` (w bytes), or
    None when its strides or offset do not allow that view."""
    if t.dim() < 3 or t.stride(-3) != 1:
        return None
    try:
        return t.movedim(-3, -1).view(dtype)
    except RuntimeError:  # a stride, the size or the offset is not a multiple of w
        return None


def copy_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` for tensors of one shape, dtype and device; channels-last ones (C-stride
    1, channels of ``dst.dim() - 3``) are copied in wide elements. Returns ``dst``."""
    if dst.shape == src.shape and dst.dtype == src.dtype and dst.device == src.device:
        for wide in _WIDE:
            d, s = _wide(dst, wide), _wide(src, wide)
            if d is not None and s is not None:
                d.copy_(s)
                return dst
    return dst.copy_(src)


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2.0, mode="nearest")`` of a B×C×H×W ``x``: channels-last
    (each pixel's channels copied whole into its 2×2 block, in wide elements) when ``x`` is,
    else PyTorch's."""
    batch, _, height, width = x.shape
    for wide in _WIDE:
        v = _wide(x, wide)
        if v is None:
            continue
        k = v.shape[-1]
        out = torch.empty(batch, height, 2, width, 2, k, dtype=wide, device=x.device)
        out.copy_(v[:, :, None, :, None, :].expand(batch, height, 2, width, 2, k))
        hwc = out.view(batch, 2 * height, 2 * width, k).view(x.dtype)
        return hwc.permute(0, 3, 1, 2)
    return torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")

"""Per-channel float32 mean and M2 of a batch of tiles, read once, in one Triton kernel.

The exact tiled VAE keeps, for every tile of a stage whose output feeds a GroupNorm, each
channel's mean and M2 (sum of squared deviations) over the tile's owned pixels
(:func:`tileup.vae.engine._owned_stats`). PyTorch does that as a float32 copy of the batch and
``var_mean`` over a channels-last tensor's outer dimensions. Here one program reads a block of
pixels × channels in place, whatever the layout, and keeps the block's mean and M2 (two passes
over its registers, float32); the blocks are merged with Chan's formula. The values are
PyTorch's up to float32 rounding. On an H200 (``bench/vae/profile_vae.py``, 2026-11-30), for
4×128×512² bf16: 0.33 ms against PyTorch's 0.65 ms; the tiled VAE's 4096² decode went
1.42 → 1.38 s.

Used on CUDA GPUs from compute capability 8.0 with Triton installed (elsewhere, with
``TILEUP_VAE_STATS=torch``, or when the kernel fails to build: PyTorch's); tested on the CPU
through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tileup.vae import softmax

__all__ = ["BLOCKS_PER_PROGRAM", "channel_stats", "enabled", "group_affine"]

_BLOCK_PIXELS = 64
BLOCKS_PER_PROGRAM = 1
"""Blocks of ``_BLOCK_PIXELS`` a program reads and merges (measured on an H200 at 1: 0.33 ms
for 4×128×512²; ``profile_vae.py --parts micro`` times 1 to 16 as ``stats_kernel_xN``)."""
_FAILED: set[int] = set()
"""CUDA devices where the kernel could not be built or launched (PyTorch's there)."""


def enabled(x: torch.Tensor) -> bool:
    """Whether :func:`channel_stats` runs the kernel for ``x``
    (:func:`tileup.vae.softmax.kernel_runs` with ``TILEUP_VAE_STATS``)."""
    return softmax.kernel_runs(x, "TILEUP_VAE_STATS", _FAILED)


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]  # triton is untyped
    def block_stats(  # type: ignore[no-untyped-def]
        x_ptr,
        mean_ptr,
        m2_ptr,
        pixels,
        width,
        channels,
        stride_b,
        stride_c,
        stride_h,
        stride_w,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCKS: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        group = tl.program_id(1)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        n = tl.zeros([BLOCK_C], dtype=tl.float32)  # pixels merged so far (the same per lane)
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(BLOCKS):  # BLOCKS blocks of BLOCK_P pixels, merged (Chan)
            first = (group * BLOCKS + i) * BLOCK_P
            p = first + tl.arange(0, BLOCK_P)
            inside = (p < pixels)[:, None] & (c < channels)[None, :]
            h, w = (p // width).to(tl.int64), (p % width).to(tl.int64)
            offsets = b * stride_b + (h * stride_h + w * stride_w)[:, None]
            offsets += c.to(tl.int64)[None, :] * stride_c
            x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            n_block = tl.maximum(tl.minimum(pixels - first, BLOCK_P), 0).to(tl.float32)
            mean_block = tl.sum(x, axis=0) / tl.maximum(n_block, 1.0)
            deviation = tl.where(inside, x - mean_block[None, :], 0.0)
            m2_block = tl.sum(deviation * deviation, axis=0)
            total = n + n_block
            share = n_block / tl.maximum(total, 1.0)  # 0 for a block past the end
            delta = mean_block - mean
            mean += delta * share
            m2 += m2_block + delta * delta * n * share
            n = total
        out = (b * tl.num_programs(1) + group) * channels + c
        tl.store(mean_ptr + out, mean, mask=c < channels)
        tl.store(m2_ptr + out, m2, mask=c < channels)

    return block_stats


def channel_stats(
    x: torch.Tensor, blocks_per_program: int = BLOCKS_PER_PROGRAM
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 mean and M2 over H×W of each sample's channels of a B×C×H×W ``x`` (any strides):
    two B×C tensors on ``x``'s device. One kernel when :func:`enabled`, each program merging
    ``blocks_per_program`` blocks of pixels itself (fewer partial results for PyTorch to
    merge), else PyTorch's ``var_mean`` of a float32 copy."""
    if x.dim() != 4:
        raise ValueError("x must be B×C×H×W")
    batch, channels, height, width = x.shape
    pixels = height * width
    if not enabled(x) or not x.numel():
        var, mean = torch.var_mean(x.float(), dim=(2, 3), correction=0)
        return mean, var * pixels
    span = _BLOCK_PIXELS * blocks_per_program
    blocks = -(-pixels // span)
    block_c = min(128, 1 << max(0, channels - 1).bit_length())
    means = torch.empty(batch, blocks, channels, device=x.device)
    m2s = torch.empty_like(means)

    def run() -> None:
        _kernel()[(batch, blocks, -(-channels // block_c))](
            x,
            means,
            m2s,
            pixels,
            width,
            channels,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            x.stride(3),
            BLOCK_P=_BLOCK_PIXELS,
            BLOCK_C=block_c,
            BLOCKS=blocks_per_program,
            num_warps=4,
        )

    if not softmax.launched(run, x, _FAILED, "VAE statistics"):
        return channel_stats(x)
    return _merged(means, m2s, pixels, span)


def _merged(
    means: torch.Tensor, m2s: torch.Tensor, pixels: int, span: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Programs' (B×programs×C) means and M2s of ``span`` pixels each (the last one holds the
    rest) merged into B×C mean and M2 (Chan et al.'s parallel formula)."""
    counts = torch.full((means.shape[1], 1), float(span), device=means.device)
    counts[-1] = pixels - (means.shape[1] - 1) * span
    mean = (means * counts).sum(1) / pixels
    m2 = m2s.sum(1) + (counts * (means - mean[:, None]) ** 2).sum(1)
    return mean, m2


def group_affine(
    mean: torch.Tensor,
    m2: torch.Tensor,
    count: torch.Tensor,
    groups: int,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A GroupNorm of ``groups`` (``eps``; ``weight`` and ``bias`` when affine) as a per-channel
    affine ``x·a + b``: two C-long tensors in ``mean``'s dtype, from the channel means and M2s
    of parts of an image (parts × C) and each part's pixel count (parts), merged per group with
    Chan's formula."""
    per = mean.shape[1] // groups
    mean = mean.view(-1, groups, per)
    m2 = m2.view(-1, groups, per)
    n = count.view(-1, 1, 1)
    total = n.sum() * per
    g_mean = (n * mean).sum((0, 2)) / total
    g_var = (m2 + n * (mean - g_mean[None, :, None]) ** 2).sum((0, 2)) / total
    rstd = (g_var + eps).rsqrt().repeat_interleave(per)
    a, b = rstd, -g_mean.repeat_interleave(per) * rstd
    if weight is not None and bias is not None:
        w, shift = weight.to(mean.dtype), bias.to(mean.dtype)
        a, b = a * w, b * w + shift
    return a, b

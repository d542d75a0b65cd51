"""GroupNorm in one Triton kernel, for an eager UNet whose activations are channels-last.

PyTorch's GroupNorm kernel takes NCHW: on a channels-last activation it copies to NCHW first
and returns NCHW, so an eager UNet with channels-last weights paid a layout conversion around
every norm and was slower than NCHW (diffusion 11.1 s against 10.1 s on the reference job,
H200, 2026-11-29), while in NCHW cuDNN converts every conv's input to NHWC and back (10.7 ms
of a 64-sample call's 178 ms at 64², ``bench/diffusion/profile_unet.py``, 2026-11-30).
:class:`KernelGroupNorm` normalises in place of either layout: one program per (sample,
group) reads the group's pixels in blocks, merges their float32 mean and M2 (Chan's formula),
then reads them again (from the L2 cache for most groups) and writes ``(x − mean)·rstd·w + b``
in the input's dtype and memory format. Values: PyTorch's GroupNorm up to float32 rounding.

Measured on an H200 (bf16, 2026-12-01, ``bench/diffusion/eager_layouts.py``,
bench/diffusion/results/eager-layouts-*.json): a 54×320×64² norm 0.43 ms channels-last
against PyTorch's 0.80 (0.35 NCHW); the eager fused call (27 tiles at 64², graphed) 148.3 ms
NCHW, 167.0 channels-last with PyTorch's norm, 139.2 channels-last with this one (−6 %); the
redraw's calls (1–4 crops at 72²) −10 to −18 %; SDXL's call (25 tiles at 128²) +1.6 %. So an
eager SD 1.x/2.x UNet takes it by default and SDXL does not (:func:`wanted`,
``TILEUP_UNET_LAYOUT``): the reference job 11.44 → 10.92 s, the linear redraw 16.13 →
14.36 s. Runs on CUDA GPUs from compute capability 8.0 with Triton (elsewhere, or when the
kernel fails to build: PyTorch's, and :func:`wanted` keeps the UNet NCHW); tested on the CPU
through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tileup.settings import SettingsError
from tileup.vae import softmax

__all__ = ["KernelGroupNorm", "group_norm", "wanted"]

_BLOCK_P = 64
"""Pixels a program reads at a time (times the group's channels, padded to a power of two)."""
_FAILED: set[int] = set()
"""CUDA devices where the kernel could not be built or launched (PyTorch's there)."""


LAYOUTS = ("auto", "nchw", "channels_last_kernel_norm")
"""Values of ``TILEUP_UNET_LAYOUT`` (unset: ``auto``)."""


def wanted(unet: nn.Module, device: torch.device) -> bool:
    """Whether the eager ``unet`` on ``device`` runs channels-last with :class:`KernelGroupNorm`:
    only where the kernel runs (a CUDA GPU of compute capability 8.0 with Triton, not turned off
    by ``TILEUP_GROUP_NORM=torch``); then as ``TILEUP_UNET_LAYOUT`` says: ``nchw`` never,
    ``channels_last_kernel_norm`` always, ``auto`` (the default) for a UNet without added
    embeddings (SD 1.x/2.x; SDXL's call was 1.6 % slower with it, see the module docstring).
    :class:`~tileup.settings.SettingsError` (one line for the user) for another value."""
    layout = os.environ.get("TILEUP_UNET_LAYOUT", "auto")
    if layout not in LAYOUTS:
        raise SettingsError(
            f"TILEUP_UNET_LAYOUT must be one of {', '.join(LAYOUTS)}, not {layout!r}"
        )
    if layout == "nchw" or not softmax.kernel_runs_on(device, "TILEUP_GROUP_NORM", _FAILED):
        return False
    if layout == "channels_last_kernel_norm":
        return True
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) is None


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def group_norm_kernel(
        x_ptr,
        out_ptr,
        weight_ptr,
        bias_ptr,
        pixels,
        per_group,
        groups,
        eps,
        stride_b,
        stride_c,
        stride_p,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b, g = (pid // groups).to(tl.int64), pid % groups
        c = g * per_group + tl.arange(0, BLOCK_C)
        lanes = tl.arange(0, BLOCK_C) < per_group
        base = b * stride_b + c.to(tl.int64)[None, :] * stride_c
        n = 0.0
        mean = 0.0
        m2 = 0.0
        for first in range(0, pixels, BLOCK_P):
            p = first + tl.arange(0, BLOCK_P)
            inside = (p < pixels)[:, None] & lanes[None, :]
            offsets = base + p.to(tl.int64)[:, None] * stride_p
            x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            n_block = (tl.minimum(pixels - first, BLOCK_P) * per_group).to(tl.float32)
            mean_block = tl.sum(tl.sum(x, axis=1), axis=0) / n_block
            deviation = tl.where(inside, x - mean_block, 0.0)
            m2_block = tl.sum(tl.sum(deviation * deviation, axis=1), axis=0)
            total = n + n_block
            delta = mean_block - mean
            mean += delta * (n_block / total)
            m2 += m2_block + delta * delta * n * (n_block / total)
            n = total
        rstd = 1.0 / tl.sqrt(m2 / n + eps)
        w = tl.load(weight_ptr + c, mask=lanes, other=0.0).to(tl.float32)
        shift = tl.load(bias_ptr + c, mask=lanes, other=0.0).to(tl.float32)
        scale = w * rstd
        shift = shift - mean * scale
        for first in range(0, pixels, BLOCK_P):
            p = first + tl.arange(0, BLOCK_P)
            inside = (p < pixels)[:, None] & lanes[None, :]
            offsets = base + p.to(tl.int64)[:, None] * stride_p
            x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            y = x * scale[None, :] + shift[None, :]
            tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=inside)

    return group_norm_kernel


def _pixel_stride(x: torch.Tensor) -> int | None:
    """The stride between neighbouring pixels of a B×C×H×W ``x`` whose pixels are evenly
    spaced (NCHW, channels-last), else None."""
    _, _, height, width = x.shape
    if height > 1 and width > 1 and x.stride(2) != width * x.stride(3):
        return None
    return x.stride(3) if width > 1 else x.stride(2)


def group_norm(
    x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``F.group_norm(x, groups, weight, bias, eps)`` for a B×C×H×W ``x``: one kernel where it
    runs (see the module docstring), the output in ``x``'s memory format; PyTorch's elsewhere."""
    stride_p = _pixel_stride(x) if x.dim() == 4 else None
    if stride_p is None or not softmax.kernel_runs(x, "TILEUP_GROUP_NORM", _FAILED):
        return F.group_norm(x, groups, weight, bias, eps)
    batch, channels, height, width = x.shape
    per = channels // groups
    out = torch.empty_like(x)

    def run() -> None:
        _kernel()[(batch * groups,)](
            x,
            out,
            weight,
            bias,
            height * width,
            per,
            groups,
            eps,
            x.stride(0),
            x.stride(1),
            stride_p,
            BLOCK_P=_BLOCK_P,
            BLOCK_C=max(2, 1 << (per - 1).bit_length()),
            num_warps=4,
        )

    if not softmax.launched(run, x, _FAILED, "UNet group norm"):
        return F.group_norm(x, groups, weight, bias, eps)
    return out


class KernelGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` through :func:`group_norm` when affine on 4-d input (PyTorch's
    otherwise); swapped in with :func:`tileup.channel_norm.swap_group_norms`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not self.affine:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

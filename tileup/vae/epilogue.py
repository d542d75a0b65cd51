"""A convolution's bias, and a resnet's skip sum, added in one Triton pass over its result.

PyTorch runs a cuDNN convolution with bias as the convolution, then ``out.add_(bias)``; a VAE
resnet then adds its skip input in a new tensor (``skip + out``). On a channels-last result
the broadcast bias add is PyTorch's element-by-element kernel: in the 4096² decode's trace on
an H200 (2026-11-30) the bias adds took 96 ms and the skip sums 31 ms of 1.18 s of kernels.
Here one program per block of a result row (channels-last: a row is W·C contiguous values)
adds the bias, rounds to the result's dtype, adds the skip (its rows contiguous too: a crop of a
channels-last batch) and rounds again, in place: PyTorch's two roundings, so the values are
PyTorch's bit for bit.

Used on CUDA GPUs from compute capability 8.0 with Triton installed (elsewhere, with
``TILEUP_VAE_EPILOGUE=torch``, or when the kernel fails to build: PyTorch's ops); tested on the
CPU through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tileup.vae import softmax

__all__ = ["conv2d", "enabled"]

_BLOCK = 2048
"""Values of a result row per program."""
_FAILED: set[int] = set()
"""CUDA devices where the kernel could not be built or launched (PyTorch's ops there)."""


def enabled(x: torch.Tensor) -> bool:
    """Whether :func:`conv2d` adds bias and skip with the kernel for an input ``x``
    (:func:`tileup.vae.softmax.kernel_runs` with ``TILEUP_VAE_EPILOGUE``)."""
    return softmax.kernel_runs(x, "TILEUP_VAE_EPILOGUE", _FAILED)


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]  # triton is untyped
    def bias_skip(  # type: ignore[no-untyped-def]
        out_ptr,
        bias_ptr,
        skip_ptr,
        row_length,
        channels,
        height,
        skip_stride_b,
        skip_stride_h,
        HAS_SKIP: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # b·H + y
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = i < row_length
        at = out_ptr + row * row_length + i
        x = tl.load(at, mask=inside, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + i % channels, mask=inside, other=0.0).to(tl.float32)
        y = (x + bias).to(out_ptr.dtype.element_ty)
        if HAS_SKIP:
            skip_row = (row // height) * skip_stride_b + (row % height) * skip_stride_h
            s = tl.load(skip_ptr + skip_row + i, mask=inside, other=0.0).to(tl.float32)
            y = (s + y.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(at, y, mask=inside)

    return bias_skip


def _rows_contiguous(t: torch.Tensor) -> bool:
    """Whether each B×C×H×W row (W pixels × C channels) of ``t`` lies contiguous in memory."""
    channels, width = t.shape[1], t.shape[3]
    return (t.stride(1) == 1 or channels == 1) and (t.stride(3) == channels or width == 1)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, 0, dilation, groups)``, then ``skip + out`` when a
    ``skip`` of the output's shape is given: the bias and the skip in one kernel over a
    channels-last result when :func:`enabled`, as PyTorch's ops otherwise (same values)."""
    if bias is None or not enabled(x):
        out = F.conv2d(x, weight, bias, stride, 0, dilation, groups)
        return out if skip is None else skip + out
    out = F.conv2d(x, weight, None, stride, 0, dilation, groups)
    if skip is not None and (skip.shape != out.shape or skip.dtype != out.dtype):
        raise ValueError(f"skip {tuple(skip.shape)} does not match the output {tuple(out.shape)}")
    batch, channels, height, width = out.shape
    fits = out.is_contiguous(memory_format=torch.channels_last)
    if not fits or (skip is not None and not _rows_contiguous(skip)) or not out.numel():
        out.add_(bias.reshape(1, -1, 1, 1))
        return out if skip is None else skip + out
    row = width * channels

    def run() -> None:
        _kernel()[(batch * height, -(-row // _BLOCK))](
            out,
            bias,
            out if skip is None else skip,
            row,
            channels,
            height,
            0 if skip is None else skip.stride(0),
            0 if skip is None else skip.stride(2),
            HAS_SKIP=skip is not None,
            BLOCK=_BLOCK,
            num_warps=8,
        )

    if not softmax.launched(run, x, _FAILED, "VAE bias"):
        out.add_(bias.reshape(1, -1, 1, 1))
        return out if skip is None else skip + out
    return out

"""One step of an online row softmax over a block of float32 scores, in one Triton kernel.

The chunked attention of the tiled VAE (:func:`tileup.vae.attention.attention_chunks`) walks
the keys in blocks: for a chunk of queries and a block of keys it computes float32 scores
(n queries × b keys), turns them into probabilities with :func:`softmax_block` and adds their
product with the block's values to a float32 output, which the block's rescale factor first
brings to the new row maximum (FlashAttention's algorithm, with the two products left to
cuBLAS). The output is divided by the row sums at the end.

Per row, :func:`softmax_block` updates a running maximum and sum (float32, in place) and
writes ``exp(x − max)`` rounded to the probabilities' dtype: one program per row reads the
block for its maximum and again (from on-chip memory or the L2 cache, a block row being at
most 64 KiB) for the exponentials, so each score costs 4 bytes read and 2 written in device
memory, where a softmax over whole rows (1 MiB of float32 each at 4096² px) read every score
twice from it. The values are PyTorch's softmax up to the float32 rounding of the
exponentials and sums (the probabilities are then rounded to 8 or 11 bits of mantissa, as in
PyTorch's fused attention kernels).

Used on CUDA GPUs from compute capability 8.0 with Triton installed (elsewhere, with
``TILEUP_VAE_SOFTMAX=torch``, or when the kernel fails to build: PyTorch's ops); tested on the
CPU through Triton's interpreter (``TRITON_INTERPRET=1``). Measured on an H200 (4096² px, bf16,
2026-11-30): the attention in 0.357 s with it, 0.787 s with PyTorch's ops.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from tileup.devices import on_device

__all__ = ["enabled", "softmax_block"]

_BLOCK = 2048
"""Scores per lane step of a row longer than :data:`_ONE_LOAD`: 8 KiB of float32."""

_ONE_LOAD = 16384
"""Longest block row that a program holds whole (one read of its scores)."""


def enabled(scores: torch.Tensor) -> bool:
    """Whether :func:`softmax_block` runs the kernel for ``scores`` (:func:`kernel_runs` with
    ``TILEUP_VAE_SOFTMAX``)."""
    return kernel_runs(scores, "TILEUP_VAE_SOFTMAX", _FAILED)


def kernel_runs(x: torch.Tensor, switch: str, failed: set[int]) -> bool:
    """Whether a Triton kernel of the tiled VAE runs on ``x``: on a CUDA GPU of compute
    capability 8.0 or later (native bf16) with Triton installed, unless the environment
    variable ``switch`` is ``torch`` or the kernel failed on that GPU before (``failed``: device
    indices); on the CPU under Triton's interpreter."""
    return kernel_runs_on(x.device, switch, failed)


def kernel_runs_on(device: torch.device, switch: str, failed: set[int]) -> bool:
    """:func:`kernel_runs` for a tensor on ``device``."""
    if os.environ.get(switch, "triton") == "torch" or not _triton_installed():
        return False
    if device.type == "cuda":
        if device_index(device) in failed:
            return False
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return os.environ.get("TRITON_INTERPRET") == "1" and device.type == "cpu"


_FAILED: set[int] = set()
"""CUDA devices where the kernel could not be built or launched (PyTorch's softmax there)."""


def device_index(device: torch.device) -> int:
    """A CUDA device's index (the current one for a bare ``cuda``)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]  # triton is untyped
    def softmax_block(  # type: ignore[no-untyped-def]
        x_ptr,
        p_ptr,
        max_ptr,
        sum_ptr,
        rescale_ptr,
        n_cols,
        stride_x,
        stride_p,
        BLOCK: tl.constexpr,
        ONE_LOAD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        p_row = p_ptr + row * stride_p
        lanes = tl.arange(0, BLOCK)
        old_max = tl.load(max_ptr + row)
        if ONE_LOAD:
            x = tl.load(x_row + lanes, mask=lanes < n_cols, other=float("-inf"))
            new_max = tl.maximum(old_max, tl.max(x, 0))
            p = tl.exp(x - new_max)
            total = tl.sum(p, 0)
            tl.store(p_row + lanes, p.to(p_ptr.dtype.element_ty), mask=lanes < n_cols)
        else:
            m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + lanes
                m = tl.maximum(m, tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")))
            new_max = tl.maximum(old_max, tl.max(m, 0))
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + lanes
                x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf"))
                p = tl.exp(x - new_max)
                acc += p
                tl.store(p_row + cols, p.to(p_ptr.dtype.element_ty), mask=cols < n_cols)
            total = tl.sum(acc, 0)
        rescale = tl.exp(old_max - new_max)  # 0 for a row's first block (old max −inf)
        tl.store(sum_ptr + row, tl.load(sum_ptr + row) * rescale + total)
        tl.store(max_ptr + row, new_max)
        tl.store(rescale_ptr + row, rescale)

    return softmax_block


def softmax_block(
    scores: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of an online row softmax: ``(probs, rescale)`` for the 2-D float32 ``scores``
    (contiguous rows, finite), with the rows' running maximum and sum (float32, one per row;
    −inf and 0 before the first block) updated in place.

    ``new_max = max(row_max, max(scores))``; ``probs = exp(scores − new_max)`` in ``dtype``;
    ``rescale = exp(row_max − new_max)`` (float32, 0 for a first block);
    ``row_sum ← row_sum · rescale + Σ exp(scores − new_max)`` (the float32 exponentials).
    Across blocks, ``Σ_blocks probs · V`` accumulated with each block's ``rescale`` and divided
    by the final ``row_sum`` is the softmax attention. One kernel when :func:`enabled`;
    PyTorch's ops otherwise, which overwrite ``scores``."""
    rows = scores.shape[0]
    if scores.dim() != 2 or scores.dtype != torch.float32 or scores.stride(1) != 1:
        raise ValueError("scores must be a 2-D float32 tensor with contiguous rows")
    if any(t.shape != (rows,) or t.dtype != torch.float32 for t in (row_max, row_sum)):
        raise ValueError("row_max and row_sum must be float32 with one value per row")
    if not enabled(scores):
        new_max = torch.maximum(row_max, scores.amax(1))
        rescale = torch.exp(row_max - new_max)
        probs = scores.sub_(new_max[:, None]).exp_()
        row_sum.mul_(rescale).add_(probs.sum(1))
        row_max.copy_(new_max)
        return probs.to(dtype), rescale
    probs = torch.empty(scores.shape, dtype=dtype, device=scores.device)
    rescale = torch.empty_like(row_max)
    cols = scores.shape[1]
    one_load = cols <= _ONE_LOAD
    block = _next_power_of_two(cols) if one_load else _BLOCK

    def run() -> None:
        _kernel()[(rows,)](
            scores,
            probs,
            row_max,
            row_sum,
            rescale,
            cols,
            scores.stride(0),
            probs.stride(0),
            BLOCK=block,
            ONE_LOAD=one_load,
            num_warps=max(1, min(16, block // 1024)),
        )

    if rows and cols and not launched(run, scores, _FAILED, "VAE softmax"):
        return softmax_block(scores, row_max, row_sum, dtype)
    return probs, rescale


def _next_power_of_two(n: int) -> int:
    """The smallest power of two ≥ ``n`` (≥ 1)."""
    return 1 << max(0, n - 1).bit_length()


def launched(run: Callable[[], None], x: torch.Tensor, failed: set[int], what: str) -> bool:
    """``run()`` (a Triton kernel launch) on ``x``'s device and stream; whether it ran. On CUDA
    a failure to build or launch (other than out of memory, raised) is warned about ("``what``
    kernel unavailable", ``what`` such as "VAE softmax") and recorded in ``failed``
    (:func:`kernel_runs` then says no on that device: PyTorch's ops from now on) and nothing
    was written; on the CPU (Triton's interpreter) it is raised."""
    try:
        with on_device(x.device):  # Triton launches on the current device's stream
            run()
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        if x.device.type != "cuda":
            raise
        failed.add(device_index(x.device))
        warnings.warn(
            f"{what} kernel unavailable ({type(exc).__name__}); using PyTorch's", stacklevel=3
        )
        return False
    return True

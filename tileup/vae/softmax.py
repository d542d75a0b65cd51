"""Row softmax of float32 scores written straight in half precision, in one Triton kernel.

The chunked attention of the tiled VAE (:func:`tileup.vae.attention.attention_chunks`) turns a
chunk of float32 scores (n queries × N keys, N = 262 144 at 4096² px) into probabilities in the
input dtype for the second matrix product. PyTorch does that in two kernels: an in-place
float32 softmax (its rows are too long for on-chip memory, so it reads them for the maximum,
for the sum and again to write them: ~16 bytes a score) and a cast (6 bytes more). Here one
program per row keeps a running maximum and sum per lane (an online softmax, float32), then
reads the row once more and writes ``exp(x − max) / sum`` rounded to the output dtype: 10 bytes
a score. The values are PyTorch's up to the float32 rounding of the exponentials and the sum
(then rounded to 8 or 11 bits of mantissa).

Used on CUDA GPUs from compute capability 8.0 with Triton installed (elsewhere, with
``TILEUP_VAE_SOFTMAX=torch``, or when the kernel fails to build: PyTorch's two kernels); tested
on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``). Measured on an H200 (4096²
px, 262 144 tokens, bf16): the chunked attention in 0.436 s (323 TFLOP/s) against 0.596 s with
PyTorch's softmax and cast; the tiled VAE's 4096² encode 1.03 s and decode 1.43 s, from 1.20 s
and 1.63 s (``bench/vae/profile_vae.py``, 2026-11-30).
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

__all__ = ["enabled", "softmax_rows"]

_BLOCK = 2048
"""Scores per lane step: 8 KiB of float32 per program and iteration."""


def enabled(scores: torch.Tensor) -> bool:
    """Whether :func:`softmax_rows` runs the kernel for ``scores`` (:func:`kernel_runs` with
    ``TILEUP_VAE_SOFTMAX``)."""
    return kernel_runs(scores, "TILEUP_VAE_SOFTMAX", _FAILED)


def kernel_runs(x: torch.Tensor, switch: str, failed: set[int]) -> bool:
    """Whether a Triton kernel of the tiled VAE runs on ``x``: on a CUDA GPU of compute
    capability 8.0 or later (native bf16) with Triton installed, unless the environment
    variable ``switch`` is ``torch`` or the kernel failed on that GPU before (``failed``: device
    indices); on the CPU under Triton's interpreter."""
    if os.environ.get(switch, "triton") == "torch" or not _triton_installed():
        return False
    if x.device.type == "cuda":
        if device_index(x.device) in failed:
            return False
        return torch.cuda.get_device_capability(x.device) >= (8, 0)
    return os.environ.get("TRITON_INTERPRET") == "1" and x.device.type == "cpu"


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
    def softmax(x_ptr, y_ptr, n_cols, stride_x, stride_y, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        y_row = y_ptr + row * stride_y
        lanes = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + lanes
            x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf"))
            m_new = tl.maximum(m, x)
            seen = m_new > float("-inf")  # a lane past the row's end has seen nothing yet
            rescale = tl.where(seen, tl.exp(m - m_new), 0.0)
            total = total * rescale + tl.where(seen, tl.exp(x - m_new), 0.0)
            m = m_new
        row_max = tl.max(m, 0)
        row_sum = tl.sum(tl.where(m > float("-inf"), total * tl.exp(m - row_max), 0.0), 0)
        for start in range(0, n_cols, BLOCK):
            cols = start + lanes
            x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf"))
            y = tl.exp(x - row_max) / row_sum
            tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_cols)

    return softmax


def softmax_rows(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``torch.softmax(scores, dim=-1).to(dtype)`` of a 2-D float32 ``scores`` with contiguous
    rows, as a new tensor: one kernel when :func:`enabled`, PyTorch's softmax (in place over
    ``scores``) and a cast otherwise. The scores must be finite."""
    if scores.dim() != 2 or scores.dtype != torch.float32 or scores.stride(1) != 1:
        raise ValueError("scores must be a 2-D float32 tensor with contiguous rows")
    if not enabled(scores):
        torch.softmax(scores, dim=-1, out=scores)
        return scores.to(dtype)
    out = torch.empty(scores.shape, dtype=dtype, device=scores.device)
    rows, cols = scores.shape

    def run() -> None:
        _kernel()[(rows,)](
            scores, out, cols, scores.stride(0), out.stride(0), BLOCK=_BLOCK, num_warps=8
        )

    if rows and cols and not launched(run, scores, _FAILED, "softmax"):
        return softmax_rows(scores, dtype)
    return out


def launched(run: Callable[[], None], x: torch.Tensor, failed: set[int], what: str) -> bool:
    """``run()`` (a Triton kernel launch) on ``x``'s device and stream; whether it ran. On CUDA
    a failure to build or launch (other than out of memory, raised) is warned about ("VAE
    ``what`` kernel unavailable") and recorded in ``failed`` (:func:`kernel_runs` then says no
    on that device: PyTorch's ops from now on) and nothing was written; on the CPU (Triton's
    interpreter) it is raised."""
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
            f"VAE {what} kernel unavailable ({type(exc).__name__}); using PyTorch's", stacklevel=3
        )
        return False
    return True

"""Exact softmax attention for the VAE's single wide head (d = 512) in one Triton kernel.

FlashAttention's algorithm: each program takes a block of queries, walks the keys block by
block with an online softmax (running row maximum and sum, float32) and accumulates P·V in
float32; the probabilities are rounded to the inputs' dtype before the second product, as in
PyTorch's fused kernels. The scores never leave the chip, where the chunked two-GEMM
attention (:func:`tileup.vae.attention.chunked_attention`) writes and reads ~16 bytes a score
(float32 scores, the softmax's two passes, the half-precision probabilities) and reads K and V
once per chunk of queries: at 8192² px (1M tokens) that memory traffic, not the 2.25 PFLOP,
sets its time.

Opt-in (``TILEUP_VAE_ATTENTION=fused``): slower than the chunked GEMMs. Measured on an H200
(4096² px, 262 144 tokens, bf16, Triton 3.6, 2026-12-01, bench/vae/results/
profile_h200_fused_attention.json): 0.72 s at its best block sizes (64 queries, 64 keys,
8 warps, 1 stage; 195 TFLOP/s) against 0.37 s for the chunked GEMMs; larger blocks do not fit
in shared memory (a 64×512 block of queries alone takes 64 KiB) and a 64×512 float32
accumulator fills the registers. An 8192² decode on an emulated 8 GiB card took 22.97 s with
it against 16.21 s. The block sizes can be set with
``TILEUP_FLASH_CONFIG=BLOCK_M,BLOCK_N,WARPS,STAGES``. Tested on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

from tileup.devices import on_device

__all__ = ["FlashConfig", "enabled", "flash_attention", "supported"]


@dataclass(frozen=True)
class FlashConfig:
    """Queries and keys per block, warps per program and software-pipelining stages."""

    block_m: int = 64
    block_n: int = 32
    warps: int = 8
    stages: int = 2

    @classmethod
    def from_env(cls) -> FlashConfig:
        """``TILEUP_FLASH_CONFIG`` (four integers, comma-separated) or the defaults."""
        text = os.environ.get("TILEUP_FLASH_CONFIG", "")
        if not text:
            return cls()
        try:
            return cls(*(int(x) for x in text.split(",")))
        except (TypeError, ValueError):
            raise ValueError(f"TILEUP_FLASH_CONFIG must be four integers, got {text!r}") from None


def enabled() -> bool:
    """Whether the tiled VAE uses this kernel on CUDA (``TILEUP_VAE_ATTENTION=fused``)."""
    return os.environ.get("TILEUP_VAE_ATTENTION", "gemm") == "fused"


def supported(q: torch.Tensor) -> bool:
    """Whether the kernel takes queries like ``q`` (n×d): on CUDA, or on the CPU under Triton's
    interpreter; d a power of two from 16 to 512; a floating dtype."""
    d = q.shape[-1]
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not (q.is_cuda or (interpreted and q.device.type == "cpu")):
        return False
    return 16 <= d <= 512 and d & (d - 1) == 0 and q.dtype.is_floating_point


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]  # triton is untyped
    def forward(  # type: ignore[no-untyped-def]
        q_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        n_q,
        n_k,
        qk_scale,
        stride_q,
        stride_k,
        stride_v,
        stride_o,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        rows = offs_m[:, None] < n_q
        q = tl.load(q_ptr + offs_m[:, None] * stride_q + offs_d[None, :], mask=rows, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for start_n in range(0, n_k, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            keys = offs_n[:, None] < n_k
            k = tl.load(k_ptr + offs_n[:, None] * stride_k + offs_d[None, :], mask=keys, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # float32 scores, in log2 units
            s = tl.where(offs_n[None, :] < n_k, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + offs_n[:, None] * stride_v + offs_d[None, :], mask=keys, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        out = o_ptr + offs_m[:, None] * stride_o + offs_d[None, :]
        tl.store(out, acc.to(o_ptr.dtype.element_ty), mask=rows)

    return forward


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None = None,
    config: FlashConfig | None = None,
) -> torch.Tensor:
    """``softmax(q·kᵀ/√d)·v`` for one head: ``q`` n×d, ``k`` and ``v`` N×d (rows contiguous),
    :func:`supported`. ``out`` (n×d, rows contiguous) may be ``q`` itself: each program reads
    its block of queries before it writes the same rows."""
    import triton

    if not supported(q):
        raise ValueError(f"fused attention does not take {q.dtype} queries of width {q.shape[-1]}")
    n, d = q.shape
    if k.shape != v.shape or k.shape[1] != d or any(t.stride(1) != 1 for t in (q, k, v)):
        raise ValueError("q, k and v must be n×d, N×d and N×d with contiguous rows")
    out = torch.empty_like(q) if out is None else out
    if out.shape != q.shape or out.stride(1) != 1:
        raise ValueError("out must be n×d with contiguous rows")
    cfg = config or FlashConfig.from_env()
    log2e = 1.4426950408889634
    grid = (triton.cdiv(n, cfg.block_m),)
    with on_device(q.device):  # Triton launches on the current device's stream
        _kernel()[grid](
            q,
            k,
            v,
            out,
            n,
            k.shape[0],
            d**-0.5 * log2e,
            q.stride(0),
            k.stride(0),
            v.stride(0),
            out.stride(0),
            D=d,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            num_warps=cfg.warps,
            num_stages=cfg.stages,
        )
    return out

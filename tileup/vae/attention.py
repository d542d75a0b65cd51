"""Exact global softmax attention for the VAE's mid block: two matrix products per chunk of
queries, float32 scores, a one-kernel softmax between them.

The tiled VAE (:mod:`tileup.vae.tiled`) projects every token of the latent-resolution canvas
to Q, K and V, then calls :func:`sdpa` once for the whole canvas: 262 144 tokens at 4096² px,
one head of 512. Measured on an H200 (bf16, 2026-11-30): 0.436 s (323 TFLOP/s) against 1.33 s
for PyTorch's memory-efficient kernel (no flash or cuDNN kernel takes that head size).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from tileup.vae import flash
from tileup.vae.softmax import softmax_rows

__all__ = ["SCORES_BUDGET", "attention_chunks", "chunked_attention", "float32_scores", "sdpa"]

SCORES_BUDGET = 1 << 29
"""Most elements of one chunk of attention scores (queries × keys): 3 GiB with the
probabilities in half precision. Every chunk reads all of K and V again (1 GiB each at 8192²
px), so larger chunks read less (at 8192² px, 128-query chunks made the attention ~4× its
FLOP time)."""


def float32_scores(q: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
    """``q @ kt`` (n×d by d×N) in float32: accumulated and stored in float32 from half inputs on
    CUDA (no float32 copies of the inputs), computed in float32 elsewhere."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(q, kt, out_dtype=torch.float32)
    return torch.mm(q.float(), kt.float())


def sdpa(
    jobs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], over_queries: bool = False
) -> list[torch.Tensor]:
    """Exact global softmax attention (1×heads×N×d) of each (q, k, v): :func:`chunked_attention`
    on accelerators, the jobs' chunks issued in turn (a job per device: every device gets work
    at once), PyTorch's blockwise kernel on the CPU (as fast there, without chunks of scores).
    ``over_queries``: on accelerators each output is written over its queries (no buffer of
    its own; a chunk's queries are read before its output is written)."""
    if all(q.device.type == "cpu" for q, _, _ in jobs):
        return [F.scaled_dot_product_attention(q, k, v) for q, k, v in jobs]
    outs = [q if over_queries else torch.empty_like(q) for q, _, _ in jobs]
    runs = [attention_chunks(*job, out) for job, out in zip(jobs, outs, strict=True)]
    while runs:
        runs = [run for run in runs if next(run, None) is not None]
    return outs


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: int = SCORES_BUDGET
) -> torch.Tensor:
    """Exact global softmax attention (1×heads×N×d) as two matrix products per chunk of queries.

    Per chunk: float32 scores (queries pre-scaled by d^-½ in float32, rounded once), a float32
    softmax written in the input dtype (:mod:`tileup.vae.softmax`: one pass of 10 bytes a score
    on CUDA), those probabilities times V (float32 accumulation) — the
    precision of PyTorch's fused attention kernels, at GEMM speed: the VAE's head size (512) is
    too large for the flash and cuDNN kernels and the memory-efficient kernel runs it at ~14 %
    of an H200's peak (bench/vae/results/profile_h200_4096_gemm_attention.json). A chunk's
    scores take at most ``budget`` elements (6 bytes each with the probabilities) and, on CUDA,
    at most ~85 % of the free memory; out of memory halves the chunk.
    """
    out = torch.empty_like(q)
    for _ in attention_chunks(q, k, v, out, budget):
        pass
    return out


def attention_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    budget: int = SCORES_BUDGET,
) -> Iterator[bool]:
    """:func:`chunked_attention` into ``out``, yielding (True) after each chunk is issued; with
    ``TILEUP_VAE_ATTENTION=fused`` one fused kernel per head instead (:mod:`tileup.vae.flash`)."""
    _, heads, tokens, dim = q.shape
    if flash.enabled() and flash.supported(q):
        for head in range(heads):
            flash.flash_attention(q[0, head], k[0, head], v[0, head], out=out[0, head])
            yield True
        return
    if q.is_cuda:  # 6 bytes a score in ~85 % of what is free (the device's and the cache's)
        free = torch.cuda.mem_get_info(q.device)[0] + torch.cuda.memory_reserved(q.device)
        budget = min(budget, (free - torch.cuda.memory_allocated(q.device)) // 7)
    chunk = max(1, min(tokens, budget // k.shape[2]))
    scale = dim**-0.5
    for head in range(heads):
        kt, vh = k[0, head].transpose(0, 1), v[0, head]
        s = 0
        while s < tokens:
            try:
                qs = (q[0, head, s : s + chunk].float() * scale).to(q.dtype)
                scores = float32_scores(qs, kt)
                probs = softmax_rows(scores, v.dtype)
                torch.mm(probs, vh, out=out[0, head, s : s + chunk])
            except torch.OutOfMemoryError:
                if chunk == 1:
                    raise
                qs = scores = probs = torch.empty(0)
                chunk //= 2
                torch.cuda.empty_cache()
                continue
            del qs, scores, probs
            s += chunk
            yield True

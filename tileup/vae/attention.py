"""Exact global softmax attention for the VAE's mid block: per chunk of queries and block of
keys, two matrix products with float32 scores and a one-kernel online softmax between them.

The tiled VAE (:mod:`tileup.vae.tiled`) projects every token of the latent-resolution canvas
to Q, K and V, then calls :func:`sdpa` once for the whole canvas: 262 144 tokens at 4096² px,
one head of 512. Measured on an H200 (bf16, 2026-11-30, bench/vae/results/
profile_h200_key_blocks.json): 0.357 s (394 TFLOP/s) with keys in blocks of 16 384, against
0.429 s walking whole rows of scores and 1.33 s for PyTorch's memory-efficient kernel (no
flash or cuDNN kernel takes that head size); at 8192² px (1 048 576 tokens) 5.67 s (397
TFLOP/s).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from tileup.vae import flash, knobs
from tileup.vae.softmax import softmax_block

__all__ = [
    "KEY_BLOCK",
    "SCORES_BUDGET",
    "SCORE_BYTES",
    "attention_chunks",
    "chunked_attention",
    "float32_scores",
    "key_block",
    "sdpa",
]

SCORE_BYTES = 6
"""Device bytes a score takes in a chunk: float32, and its probability in half precision."""

SCORES_BUDGET = 1 << 27
"""Most elements of one chunk of attention scores (queries × keys): 768 MiB with the
probabilities in half precision (8192 queries over a block of keys). Every chunk of queries
reads all of K and V again (1 GiB each at 8192² px), so smaller chunks read more; with blocks of
keys that costs little (4096² px, blocks of 8192 keys: 0.376 s at 2^26, 0.366 s at 2^28), while
larger chunks took up to ~85 % of the free memory and raised the job's peak (an 8192² job on an
8 GiB card peaked at 7.6 GiB in its attention, at 2^29)."""

KEY_BLOCK = 16384
"""Keys per block: a block row of float32 scores (64 KiB) stays on chip for the softmax's second
read, and a chunk of queries no longer needs room for scores over every key (262 144 at
4096² px, 1 048 576 at 8192²)."""


def key_block() -> int:
    """Keys per block: ``TILEUP_VAE_KEY_BLOCK`` (for benchmarks) or :data:`KEY_BLOCK`."""
    return knobs.positive_int("TILEUP_VAE_KEY_BLOCK", KEY_BLOCK)


def float32_scores(q: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
    """``q @ kt`` (n×d by d×N) in float32: accumulated and stored in float32 from half inputs on
    CUDA (no float32 copies of the inputs), computed in float32 elsewhere."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(q, kt, out_dtype=torch.float32)
    return torch.mm(q.float(), kt.float())


def sdpa(
    jobs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    over_queries: bool = False,
    devices: Sequence[torch.device] | None = None,
    budget: int = SCORES_BUDGET,
) -> list[torch.Tensor]:
    """Exact global softmax attention (1×heads×N×d) of each (q, k, v): :func:`chunked_attention`
    on accelerators, the jobs' chunks issued in turn (a job per device: every device gets work
    at once), PyTorch's blockwise kernel on the CPU (as fast there, without chunks of scores).
    ``over_queries``: on accelerators each output is written over its queries (no buffer of
    its own; a chunk's queries are read before its output is written). ``devices``: where each
    job computes (default: where its queries are); its Q, K and V may wait on the host, copied
    in chunks and blocks (a memory plan's fallback). ``budget``: most scores a chunk (each
    :data:`SCORE_BYTES` bytes with its probability)."""
    places = list(devices) if devices is not None else [q.device for q, _, _ in jobs]
    if all(place.type == "cpu" for place in places):
        return [F.scaled_dot_product_attention(q, k, v) for q, k, v in jobs]
    outs = [q if over_queries else torch.empty_like(q) for q, _, _ in jobs]
    runs = [
        attention_chunks(*job, out, min(budget, SCORES_BUDGET), device=place)
        for job, out, place in zip(jobs, outs, places, strict=True)
    ]
    while runs:
        runs = [run for run in runs if next(run, None) is not None]
    return outs


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: int = SCORES_BUDGET
) -> torch.Tensor:
    """Exact global softmax attention (1×heads×N×d) as two matrix products per chunk of queries
    and block of keys (:func:`key_block` keys).

    Per chunk and block: float32 scores (queries pre-scaled by d^-½ in float32, rounded once),
    an online softmax step (:func:`tileup.vae.softmax.softmax_block`: running float32 row
    maximum and sum, probabilities ``exp(s − max)`` in the input dtype), those probabilities
    times the block's values added in float32 to the chunk's output after its rescale by the
    block's change of maximum; the output divided by the row sums at the end. The precision of
    PyTorch's fused attention kernels at GEMM speed: the VAE's head size (512) is too large for
    the flash and cuDNN kernels and the memory-efficient kernel runs it at ~14 % of an H200's
    peak (bench/vae/results/profile_h200_4096_gemm_attention.json). A chunk's scores take at
    most ``budget`` elements (6 bytes each with the probabilities) and, on CUDA, at most ~85 %
    of the free memory; out of memory halves the chunk.
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
    device: torch.device | None = None,
) -> Iterator[bool]:
    """:func:`chunked_attention` into ``out``, yielding (True) after each chunk of queries is
    issued; with ``TILEUP_VAE_ATTENTION=fused`` one fused kernel per head instead
    (:mod:`tileup.vae.flash`). ``out`` may be ``q`` (a chunk's queries are read before its
    output is written). Computed on ``device`` (default: ``q``'s); any of ``q``, ``k``, ``v``
    and ``out`` may be elsewhere (the host), copied a chunk of queries or a block of keys at a
    time."""
    _, heads, tokens, dim = q.shape
    device = device or q.device
    together = all(t.device == device for t in (q, k, v, out))
    if flash.enabled() and flash.supported(q) and together:
        for head in range(heads):
            flash.flash_attention(q[0, head], k[0, head], v[0, head], out=out[0, head])
            yield True
        return
    keys = k.shape[2]
    block = min(keys, key_block())
    if device.type == "cuda":  # 6 bytes a score in ~85 % of what is free (device and cache)
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
        budget = min(budget, (free - torch.cuda.memory_allocated(device)) // 7)
    chunk = max(1, min(tokens, budget // block))
    scale = dim**-0.5
    for head in range(heads):
        kt, vh = k[0, head].transpose(0, 1), v[0, head]
        s = 0
        while s < tokens:
            try:
                queries = q[0, head, s : s + chunk].to(device)
                out[0, head, s : s + chunk] = _attend(queries, kt, vh, block, scale)
            except torch.OutOfMemoryError:
                if chunk == 1:
                    raise
                queries = torch.empty(0)
                chunk //= 2
                torch.cuda.empty_cache()
                continue
            s += chunk
            yield True


def _attend(
    q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, block: int, scale: float
) -> torch.Tensor:
    """Softmax attention of the queries ``q`` (n×d) over the keys ``kt`` (d×N) and values ``v``
    (N×d), ``block`` keys at a time (each block copied to ``q``'s device if it is elsewhere);
    float32 (n×d)."""
    qs = (q.float() * scale).to(q.dtype)
    acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    row_max = torch.full((q.shape[0],), float("-inf"), device=q.device)
    row_sum = torch.zeros(q.shape[0], device=q.device)
    for start in range(0, kt.shape[1], block):
        scores = float32_scores(qs, kt[:, start : start + block].to(q.device))
        probs, rescale = softmax_block(scores, row_max, row_sum, v.dtype)
        del scores
        acc.mul_(rescale[:, None])
        _add_product(acc, probs, v[start : start + block].to(q.device))
    return acc.div_(row_sum[:, None])


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` float32: accumulated in float32 from half inputs in one
    cuBLAS call on CUDA, in float32 elsewhere."""
    if acc.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())

"""Host-to-device copies of the tiled VAE's crops on a side stream.

Under a memory plan's cap the tiled VAE keeps large canvases on the host and gathers each tile
batch's crops from them into pinned staging (:meth:`tileup.vae.engine.StagedEngine._gather`).
Copied to the GPU on the compute stream, those crops stall it: an 8192² decode on an 8 GiB card
moves ~70–90 GiB that way, ~1.5–1.8 s at the link's ~50 GB/s with the tensor cores idle.
:func:`upload` issues the copy on a side stream instead, which the compute stream then waits
for: the copy engine moves a batch's crops while the earlier batches, already queued, compute.
Measured on an H200 (2026-12-01, bench/vae/results/host_traffic_h200_8192_8gib.json) that
decode took 16.55 s against 17.80 s on the compute stream (a comparison muddied by fallbacks
from allocator fragmentation in the latter). ``TILEUP_VAE_SIDE_COPIES=off`` copies on the
compute stream (for benchmarks).
"""

from __future__ import annotations

import os

import torch

__all__ = ["enabled", "side_stream", "upload"]

_SIDE: dict[int, torch.cuda.Stream] = {}
"""Per CUDA device index, the stream its uploads run on."""
_DOWN: dict[int, torch.cuda.Stream] = {}
"""Per CUDA device index, the stream its downloads run on (:mod:`tileup.vae.dma`)."""


def enabled() -> bool:
    """Whether crops go to a GPU on a side stream (``TILEUP_VAE_SIDE_COPIES``, default on)."""
    return os.environ.get("TILEUP_VAE_SIDE_COPIES", "on") != "off"


def side_stream(device: torch.device, *, down: bool = False) -> torch.cuda.Stream:
    """The CUDA ``device``'s side stream for uploads (or, ``down``, for downloads: the link is
    full duplex), made on first use."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    streams = _DOWN if down else _SIDE
    if index not in streams:
        streams[index] = torch.cuda.Stream(index)  # type: ignore[no-untyped-call]  # torch
    return streams[index]


def upload(buf: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``buf`` (a host tensor, page-locked for a CUDA ``device``) on ``device`` in ``dtype``.

    On CUDA with :func:`enabled` and ``buf`` pinned: copied on the device's side stream, the
    current stream made to wait for it, and the result marked as used there (the allocator
    keeps its memory until that stream is done with it); ``buf`` may be reused once the copy
    has run (PyTorch's pinned allocator records it on the side stream). Otherwise
    ``buf.to(device, dtype)``, asynchronous when ``buf`` is pinned."""
    pinned = device.type == "cuda" and buf.is_pinned()
    if not pinned or not enabled():
        return buf.to(device, dtype, non_blocking=pinned)
    side, compute = side_stream(device), torch.cuda.current_stream(device)
    with torch.cuda.stream(side):
        out = buf.to(device, dtype, non_blocking=True)
    compute.wait_stream(side)
    out.record_stream(compute)
    return out

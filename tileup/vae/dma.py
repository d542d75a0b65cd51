"""Tile crops between pinned host canvases and a GPU on the copy engines, no host copies.

Under a memory plan's cap the tiled VAE keeps canvases that do not fit on the device on the
host. Gathered crop by crop into pinned staging by the host thread and pasted back by it
(:meth:`tileup.vae.engine.StagedEngine._gather`), an 8192² decode on an 8 GiB card moved ~70–90
GiB through the host thread's copies, which is why such canvases are mostly recomputed instead.
A channels-last canvas (C×H×W with channel stride 1) lies as H rows of W·C contiguous elements,
so a tile's crop is h rows of w·C elements at the canvas's row pitch: one
``cudaMemcpy2DAsync`` a crop, run by a copy engine straight from or into the canvas when the
canvas is page-locked. Uploads run on one side stream and downloads on another (the link is
full duplex); the compute stream waits for an upload, a download waits for the compute stream.

Opt-in, ``TILEUP_VAE_DMA=on``. Measured on an H200 (2026-12-01, bench/vae/results/
host_dma_h200_8192.json), an 8192² encode + decode under the print_8k plan's 2.065 GiB store
cap took 9.52 + 15.34 s with it against 10.21 + 16.10 s without (whole GPU, one call) and
9.71 + 16.12 against 10.39 + 16.17 s on an emulated 8 GiB card, once its pinned canvases
existed; pinning them the first time took 3.2 s for 9 GiB (14 s for the 39 GiB that chains of
one stage store), more than one picture gains. The capped VAE is bound by its recomputation,
not by the host thread's copies; storing more on the host (shorter chains) was slower even by
DMA (decode 18.3 s at chains of 1). Host canvases are pinned only while the pinned pool stays under
``TILEUP_VAE_PINNED_GIB`` (default: half the RAM).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence

import torch

from tileup.vae import transfer

__all__ = ["InFlight", "allowed", "download", "may_pin", "pinned_limit", "rows_layout", "upload"]

_COPY_DEFAULT = 4
"""``cudaMemcpyDefault``: the direction follows from the pointers (unified addressing)."""

Box = tuple[int, int, int, int]
"""Rows and columns ``(y0, y1, x0, x1)`` of a C×H×W tensor."""


@functools.cache
def _memcpy2d() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]  # private in typeshed
    """``cudaMemcpy2DAsync`` of the CUDA runtime PyTorch loaded (found among the process's
    mapped libraries), or None where there is none."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.init()  # type: ignore[no-untyped-call]  # unannotated in torch
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "libcudart.so" in ln.split()[-1]})
    except OSError:
        return None
    for path in paths:
        try:
            fn = ctypes.CDLL(path).cudaMemcpy2DAsync
        except (OSError, AttributeError):
            continue
        size = ctypes.c_size_t
        fn.argtypes = [ctypes.c_void_p, size, ctypes.c_void_p, size, size, size, ctypes.c_int]
        fn.argtypes += [ctypes.c_void_p]
        fn.restype = ctypes.c_int
        return fn
    return None


def allowed() -> bool:
    """Whether crops may move by DMA: ``TILEUP_VAE_DMA=on`` and a CUDA runtime was found."""
    return os.environ.get("TILEUP_VAE_DMA", "off") == "on" and _memcpy2d() is not None


def rows_layout(t: torch.Tensor) -> bool:
    """Whether a C×H×W ``t`` lies as rows of W·C contiguous elements (channel stride 1, column
    stride C; any row pitch)."""
    if t.dim() != 3:
        return False
    c, _, w = t.shape
    return (c == 1 or t.stride(0) == 1) and (w == 1 or t.stride(2) == c)


def pinned_limit() -> int:
    """Bytes of pinned host memory canvases may hold: ``TILEUP_VAE_PINNED_GIB`` or half the
    machine's RAM."""
    gib = os.environ.get("TILEUP_VAE_PINNED_GIB")
    if gib is not None:
        return int(float(gib) * 2**30)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def may_pin(nbytes: int) -> bool:
    """Whether a host canvas of ``nbytes`` may be page-locked: DMA is :func:`allowed` and PyTorch's
    pinned pool, with the block (a power of two), stays within :func:`pinned_limit`; cached
    blocks are given back first when only they stand in the way."""
    if not allowed():
        return False
    block, limit = 1 << max(0, nbytes - 1).bit_length(), pinned_limit()
    stats = torch.cuda.host_memory_stats()
    if stats.get("active_bytes.current", 0) + block > limit:
        return False
    if stats.get("allocated_bytes.current", 0) + block > limit:
        torch._C._host_emptyCache()
    return True


def _copy(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> None:
    """``dst`` ← ``src`` (C×h×w, one dtype, :func:`rows_layout`) on ``stream``."""
    c, h, w = src.shape
    if h == 0 or w == 0 or c == 0:
        return
    size = src.element_size()
    pitch_d, pitch_s = max(dst.stride(1), w * c) * size, max(src.stride(1), w * c) * size
    fn = _memcpy2d()
    assert fn is not None  # callers check allowed()
    rc = fn(
        dst.data_ptr(),
        pitch_d,
        src.data_ptr(),
        pitch_s,
        w * c * size,
        h,
        _COPY_DEFAULT,
        stream.cuda_stream,
    )
    if rc != 0:
        raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {rc}")


class InFlight:
    """Tensors that queued copies still read or write, held until those copies are done."""

    def __init__(self) -> None:
        self._held: list[tuple[torch.cuda.Event, tuple[torch.Tensor, ...]]] = []
        self.written: dict[int, torch.cuda.Event] = {}
        """Per canvas (its data pointer), when the downloads queued into it so far are done."""

    def hold(self, stream: torch.cuda.Stream, *tensors: torch.Tensor) -> torch.cuda.Event:
        """Keep ``tensors`` until the work queued on ``stream`` so far is done (the event
        returned)."""
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]  # unannotated in torch
        event.record(stream)
        self._held = [(e, t) for e, t in self._held if not e.query()]  # type: ignore[no-untyped-call]
        self._held.append((event, tensors))
        return event

    def drain(self) -> None:
        """Wait for every held copy and let go of its tensors."""
        for event, _ in self._held:
            event.synchronize()
        self._held.clear()
        self.written.clear()


def upload(
    canvas: torch.Tensor,
    boxes: Sequence[tuple[Box, Box]],
    shape: tuple[int, ...],
    device: torch.device,
    held: InFlight,
) -> torch.Tensor:
    """A new channels-last B×C×h×w batch on ``device``: for tile i of ``boxes`` = (canvas box,
    batch box) pairs, crop i's batch box copied from the canvas box of ``canvas`` (a pinned host
    C×H×W, :func:`rows_layout`), the rest uninitialised. Queued on the upload stream, after the
    downloads queued into ``canvas`` so far; the current stream waits for it."""
    side, compute = transfer.side_stream(device), torch.cuda.current_stream(device)
    written = held.written.get(canvas.data_ptr())
    if written is not None:
        side.wait_event(written)
    with torch.cuda.stream(side):  # allocated in the side stream's pool: no wait for compute
        out = torch.empty(
            shape, dtype=canvas.dtype, device=device, memory_format=torch.channels_last
        )
        for i, ((y0, y1, x0, x1), (v0, v1, u0, u1)) in enumerate(boxes):
            _copy(out[i, :, v0:v1, u0:u1], canvas[:, y0:y1, x0:x1], side)
    compute.wait_stream(side)
    out.record_stream(compute)
    held.hold(side, canvas)
    return out


def download(
    canvas: torch.Tensor,
    res: torch.Tensor,
    boxes: Sequence[tuple[Box, Box]],
    held: InFlight,
) -> None:
    """Paste, for tile i of ``boxes`` = (canvas box, batch box) pairs, the batch box of ``res``
    (a B×C×h×w batch on a GPU) into the canvas box of ``canvas`` (a pinned host C×H×W,
    :func:`rows_layout`), on the download stream after the work queued on the current stream."""
    device = res.device
    side = transfer.side_stream(device, down=True)
    compute = torch.cuda.current_stream(device)
    if not (res.dim() == 4 and rows_layout(res[0])):
        res = res.contiguous(memory_format=torch.channels_last)
    side.wait_stream(compute)
    with torch.cuda.stream(side):
        for i, ((y0, y1, x0, x1), (v0, v1, u0, u1)) in enumerate(boxes):
            _copy(canvas[:, y0:y1, x0:x1], res[i, :, v0:v1, u0:u1], side)
    res.record_stream(side)
    held.written[canvas.data_ptr()] = held.hold(side, canvas)

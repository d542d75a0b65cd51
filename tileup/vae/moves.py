"""How the staged engine's tiles move between canvases and the device: host staging, crops,
result pastes, and crops by DMA for pinned host canvases (:mod:`tileup.vae.dma`).

A mixin of :class:`tileup.vae.engine.StagedEngine`: it reads the engine's grid, devices, dtype,
layout and lanes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from tileup.vae import copies, dma, transfer
from tileup.vae.grid import VaeGrid, VaeTile, owned_region

if TYPE_CHECKING:
    from tileup.vae.engine import Lane

__all__ = ["CanvasMoves", "zero_outside"]

Pads = tuple[tuple[int, int, int, int], ...]
"""Per tile, the rows/cols of its crop outside the image: (top, bottom, left, right)."""


def zero_outside(h: torch.Tensor, pads: Pads) -> torch.Tensor:
    """Zero, in place, each crop of the batch ``h`` outside the image (the convs' zero padding);
    returns ``h``."""
    rows, cols = h.shape[-2:]
    for i, (top, bottom, left, right) in enumerate(pads):
        if top:
            h[i, :, :top] = 0
        if bottom:
            h[i, :, rows - bottom :] = 0
        if left:
            h[i, :, :, :left] = 0
        if right:
            h[i, :, :, cols - right :] = 0
    return h


class CanvasMoves:
    """Crops into tile batches and results back into canvases, for a staged engine."""

    grid: VaeGrid
    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    lanes: tuple[Lane, ...]
    held: dma.InFlight

    def _empty(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        pin: bool = False,
        channels_last: bool = False,
    ) -> torch.Tensor:
        """An uninitialised (B×)C×H×W tensor; ``pin``: page-locked on the host for a CUDA device
        (staging buffers; whole canvases only for crops by DMA, :mod:`tileup.vae.dma`: pinning
        gigabytes costs seconds); ``channels_last``: laid out (B×)H×W×C when the engine runs
        channels-last."""
        pinned = pin and device.type == "cpu" and self.device.type == "cuda"
        if not (channels_last and self.channels_last):
            return torch.empty(shape, dtype=dtype, device=device, pin_memory=pinned)
        order = (*range(len(shape) - 3), len(shape) - 2, len(shape) - 1, len(shape) - 3)
        data = torch.empty(
            tuple(shape[i] for i in order), dtype=dtype, device=device, pin_memory=pinned
        )
        return data.permute(*(order.index(i) for i in range(len(shape))))

    def _pads(
        self,
        tiles: Sequence[VaeTile],
        m: int,
        halo: tuple[int, int],
        size: tuple[int, int],
    ) -> tuple[tuple[int, int, int, int], ...]:
        """Per tile, the rows/cols of its crop (core + ``halo`` at scale ``m``) outside a canvas
        of ``size``: (top, bottom, left, right)."""
        lo, hi = halo
        ch, cw = self.grid.tile_h * m + lo + hi, self.grid.tile_w * m + lo + hi
        pads = []
        for t in tiles:
            y0, x0 = t.top * m - lo, t.left * m - lo
            pads.append(
                (
                    max(0, -y0),
                    max(0, y0 + ch - size[0]),
                    max(0, -x0),
                    max(0, x0 + cw - size[1]),
                )
            )
        return tuple(pads)

    def _gather(
        self,
        data: torch.Tensor,
        m: int,
        tiles: Sequence[VaeTile],
        halo: tuple[int, int],
        device: torch.device,
    ) -> tuple[torch.Tensor, tuple[tuple[int, int, int, int], ...]]:
        """Batched crops (B×C×(th·m + lo + hi)×(tw·m + lo + hi)) of a canvas's ``data`` (at
        scale ``m``) on ``device``, zero outside (from the host: :func:`transfer.upload`)."""
        lo, hi = halo
        channels, rows, cols = data.shape
        ch, cw = self.grid.tile_h * m + lo + hi, self.grid.tile_w * m + lo + hi
        if self._by_dma(data, device):
            pads = self._pads(tiles, m, halo, (rows, cols))
            boxes = []
            for t, (top, bottom, left, right) in zip(tiles, pads, strict=True):
                y, x = t.top * m - lo, t.left * m - lo
                core_box = (top, ch - bottom, left, cw - right)
                boxes.append(((y + top, y + ch - bottom, x + left, x + cw - right), core_box))
            buf = dma.upload(data, boxes, (len(tiles), channels, ch, cw), device, self.held)
            return zero_outside(buf, pads), pads
        buf = self._empty(
            (len(tiles), channels, ch, cw), data.dtype, data.device, pin=True, channels_last=True
        )
        pads = self._pads(tiles, m, halo, (rows, cols))
        for i, (t, (top, bottom, left, right)) in enumerate(zip(tiles, pads, strict=True)):
            y0, x0 = t.top * m - lo, t.left * m - lo
            inside = data[:, y0 + top : y0 + ch - bottom, x0 + left : x0 + cw - right]
            copies.copy_(buf[i, :, top : ch - bottom, left : cw - right], inside)
        zero_outside(buf, pads)
        return transfer.upload(buf, device, self.dtype), pads

    def _pins(self, nbytes: int) -> bool:
        """Whether a new host canvas of ``nbytes`` is page-locked, for crops by DMA (one
        device; :func:`dma.may_pin`)."""
        return self.device.type == "cuda" and len(self.lanes) == 1 and dma.may_pin(nbytes)

    def _by_dma(self, data: torch.Tensor, device: torch.device | None = None) -> bool:
        """Whether crops of a canvas's ``data`` move to or from ``device`` (the engine's) by DMA:
        a pinned host canvas in the compute dtype, laid out in rows of pixels."""
        return (
            (device is None or device == self.device)
            and data.device.type == "cpu"
            and data.dtype == self.dtype
            and dma.rows_layout(data)
            and data.is_pinned()
            and dma.allowed()
        )

    def _move(
        self, res: torch.Tensor, out: torch.Tensor, k: int, tiles: Sequence[VaeTile]
    ) -> tuple[torch.Tensor, torch.cuda.Event | None] | None:
        """Start moving a result batch of lane ``k`` into ``out`` (its copy of the output canvas):
        by DMA into a pinned host canvas (None: nothing left to paste), else :meth:`_to` (what
        :meth:`_scatter` pastes)."""
        if k or not self._by_dma(out) or res.device != self.device:
            return self._to(res, out)
        scale = out.shape[1] // self.grid.height
        boxes = []
        for t in tiles:
            y0, y1, x0, x1 = owned_region(t, scale)
            top, left = t.top * scale, t.left * scale
            boxes.append(((top + y0, top + y1, left + x0, left + x1), (y0, y1, x0, x1)))
        dma.download(out, res.to(out.dtype), boxes, self.held)
        return None

    def _to(
        self, res: torch.Tensor, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start moving a result batch to ``out``'s device/dtype; (tensor, event to wait on)."""
        res = res.to(out.dtype)
        if res.device == out.device:
            return res, None
        if out.device.type == "cpu" and res.device.type == "cuda":
            host = self._empty(
                tuple(res.shape),
                out.dtype,
                torch.device("cpu"),
                pin=True,
                channels_last=out.shape[0] > 1 and out.stride(0) == 1,
            )
            if res.stride() != host.stride():
                # relaid on the device first: a copy between devices and layouts would go
                # through pageable memory and a transpose on the host (seconds per canvas)
                res = copies.copy_(
                    torch.empty_strided(
                        host.shape, host.stride(), dtype=host.dtype, device=res.device
                    ),
                    res,
                )
            host.copy_(res, non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]  # unannotated in torch
            event.record(torch.cuda.current_stream(res.device))
            return host, event
        return res.to(out.device), None

    def _scatter(
        self,
        out: torch.Tensor,
        scale: int,
        res: torch.Tensor,
        event: torch.cuda.Event | None,
        tiles: Sequence[VaeTile],
    ) -> None:
        """Paste every tile's owned region of a result batch into ``out``."""
        if event is not None:
            event.synchronize()
        for i, t in enumerate(tiles):
            y0, y1, x0, x1 = owned_region(t, scale)
            top, left = t.top * scale, t.left * scale
            owned = out[:, top + y0 : top + y1, left + x0 : left + x1]
            copies.copy_(owned, res[i, :, y0:y1, x0:x1])

"""The staged engine of the exact tiled VAE: whole-image activations
("canvases") with per-tile channel statistics, and one stage run over every tile.

An activation lives as a full-size canvas (on the device while the plan allows, else on the
host); a stage crops every tile's core plus a halo from its input canvases, runs a function on
the device batch by batch, writes each tile's owned region to the output canvas and keeps the
channel mean and M2 of that region, from which the next GroupNorm takes exact whole-image
statistics (:meth:`StagedEngine.affine`). See :mod:`tileup.vae.tiled` for the network walk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

import torch
from torch import nn

from tileup.vae import attention, copies, dma, knobs
from tileup.vae.grid import VaeGrid, VaeTile, owned_region, vae_grid
from tileup.vae.moves import CanvasMoves, zero_outside
from tileup.vae.norms import NormAffines
from tileup.vae.stats import channel_stats, group_affine

__all__ = [
    "PRIMARY",
    "Canvas",
    "Lane",
    "NonFiniteError",
    "StageBatch",
    "StageFn",
    "StagedEngine",
    "VaeGrid",
    "VaeTile",
    "owned_region",
    "vae_grid",
]


class NonFiniteError(FloatingPointError):
    """The VAE produced NaN or inf (SD1.5/SDXL VAEs overflow in fp16): re-run in float32."""


_T = TypeVar("_T")


class Lane:
    """A device a stage's tile batches run on. A stage function passes every module and tensor
    it uses through the batch's lane: on the primary device they come back as they are; on
    another device a module comes back as its copy there (``modules`` maps each primary module
    to it) and a tensor is copied over."""

    def __init__(
        self, device: torch.device | None = None, modules: dict[int, nn.Module] | None = None
    ) -> None:
        self.device, self.modules = device, modules
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, obj: _T) -> _T:
        if self.device is None:
            return obj
        if isinstance(obj, torch.Tensor):
            if obj.device == self.device:
                return cast(_T, obj)
            # copied once (a copy between devices waits for both devices' queued work): the
            # tensors stage functions pass are per-channel affines, kept with their copies
            kept = self._copies.get(id(obj))
            if kept is None:
                kept = self._copies[id(obj)] = (obj, obj.to(self.device))
            return cast(_T, kept[1])
        copy = self.modules.get(id(obj)) if self.modules is not None else None
        if copy is None:
            raise RuntimeError(f"no copy of {type(obj).__name__} on {self.device}")
        return cast(_T, copy)  # the same module type, on another device

    @classmethod
    def of(cls, device: torch.device, primary: nn.Module, replica: nn.Module) -> Lane:
        """The lane of ``device`` whose modules are ``replica``'s, matched to ``primary``'s
        (the same architecture) in order."""
        pairs = zip(primary.modules(), replica.modules(), strict=True)
        return cls(device, {id(a): b for a, b in pairs})


PRIMARY = Lane()
"""The primary device's lane: everything as it is."""


@dataclass(frozen=True)
class StageBatch:
    """What a stage function needs to know about the tiles of one batch.

    ``pads``: per tile, the rows/cols of the input crop outside the image (top, bottom, left,
    right; input px). ``owned``: per tile, the owned region inside the output core
    (y0, y1, x0, x1; output px). ``cores``: per tile, the core's (top, left) in output px.
    """

    pads: tuple[tuple[int, int, int, int], ...]
    owned: tuple[tuple[int, int, int, int], ...]
    cores: tuple[tuple[int, int], ...]
    lane: Lane = PRIMARY
    """Where the batch runs: pass modules and device tensors through it (see :class:`Lane`)."""

    def inner(self, by: int) -> StageBatch:
        """The batch as seen by the output of an unpadded conv of halo ``by`` on its crops: the
        same tiles, each side's outside rows/cols ``by`` fewer."""
        pads = tuple(
            (max(0, t - by), max(0, b - by), max(0, lf - by), max(0, r - by))
            for t, b, lf, r in self.pads
        )
        return StageBatch(pads, self.owned, self.cores, self.lane)

    def zero_outside(self, h: torch.Tensor) -> torch.Tensor:
        """Zero, in place, the crop outside the image (the convs' zero padding); returns ``h``."""
        return zero_outside(h, self.pads)


StageFn = Callable[[list[torch.Tensor], StageBatch], "torch.Tensor | None"]


@dataclass
class Canvas:
    """A whole activation, ``data`` C×H×W at ``scale`` px per latent px, with per-tile channel
    statistics of it (on the compute device): ``mean``/``m2`` T×C, ``count`` T×1.

    A *recomputed* canvas has a ``recipe`` and no data (``data`` is an empty C×0×0 host tensor):
    every crop of it is computed again from its recipe's inputs when a stage needs it.

    With several lanes a canvas on the device has a full-size copy on every other lane's device
    (``parts``, by lane index; ``data`` is lane 0's); each copy holds the rows its lane's tiles
    own and the rows fetched from the others since (``valid``: per lane, a row range)."""

    data: torch.Tensor
    scale: int
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    count: torch.Tensor | None = None
    recipe: Recipe | None = None
    parts: dict[int, torch.Tensor] = field(default_factory=dict)
    valid: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Recipe:
    """How a recomputed canvas is made: the stage that made it (its inputs, all at ``scale``, its
    function and input halo) and the stages of recomputation behind it (``depth``)."""

    inputs: tuple[Canvas, ...]
    fn: StageFn
    halo: tuple[int, int]
    scale: int
    depth: int


MAX_CHAIN = 6
"""Most stages recomputed behind one canvas; a longer chain stores the canvas (on the host).
The 8192² decode on an 8 GiB card (H200, 2026-11-30, bench/vae/results/
profile_h200_8192_8gib_chains.json) took 19.4 / 19.1 / 18.7 / 25.8 / 22.0 / 23.4 s at chains
of 5 / 6 / 7 / 8 / 10 / 16 stages, and 34.5 s at 3 (in a print_8k job): longer chains
recompute more, shorter ones read canvases from the host once per later recomputation."""


def max_chain() -> int:
    """Most stages recomputed behind one canvas: ``TILEUP_VAE_MAX_CHAIN`` (for benchmarks) or
    :data:`MAX_CHAIN`."""
    return knobs.positive_int("TILEUP_VAE_MAX_CHAIN", MAX_CHAIN)


# --- the staged engine -------------------------------------------------------------------------


class StagedEngine(CanvasMoves):
    """Runs stages tile batch by tile batch; canvases live on ``store``, tiles on ``device``."""

    def __init__(
        self,
        grid: VaeGrid,
        device: torch.device,
        dtype: torch.dtype,
        store: torch.device,
        batch: int,
        *,
        store_cap: int | None = None,
        notes: list[str] | None = None,
        lanes: Sequence[Lane] = (),
        top_scale: int | None = None,
    ) -> None:
        self.grid, self.device, self.dtype, self.store = grid, device, dtype, store
        self.top_scale = top_scale
        """The finest scale the pass reaches (the image's: the VAE factor); on CUDA, coarser
        stages batch more tiles (:meth:`batch_at`). None: every stage takes :attr:`batch`."""
        self.lanes: tuple[Lane, ...] = (PRIMARY, *lanes)
        """The primary device, then the other devices with copies of the modules. Each lane
        takes a band of tile rows (:attr:`spans`) in every stage and keeps its own copy of the
        canvases stored on the device, fetching the rows beyond its band from their owners
        before a stage reads them (one thread issues every lane's batches in turn; the devices
        overlap because CUDA work is asynchronous). Statistics meet on ``device``."""
        rows = sorted({t.top for t in grid.tiles})
        cuts = [len(rows) * k // len(self.lanes) for k in range(len(self.lanes) + 1)]
        firsts = [next((i for i, t in enumerate(grid.tiles) if t.top >= r), 0) for r in rows]
        firsts.append(len(grid.tiles))
        self.spans = tuple((firsts[cuts[k]], firsts[cuts[k + 1]]) for k in range(len(self.lanes)))
        """Per lane, its tiles: ``grid.tiles[start:end]`` (whole tile rows, in order)."""
        self._bands = [
            (
                min((t.own_top for t in grid.tiles[start:end]), default=0),
                max((t.own_top + t.own_height for t in grid.tiles[start:end]), default=0),
            )
            for start, end in self.spans
        ]
        self.batch = batch
        self.acc = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        self.store_cap = store_cap if device.type == "cuda" else None
        self.lent = 0
        """Bytes of :attr:`store_cap` lent until :meth:`reclaim` (:meth:`lend`)."""
        self.notes = notes if notes is not None else []
        self.recompute: bool | None = None
        """Whether a resnet block recomputes its first conv inside its second stage instead of
        storing it (one canvas written and read less, one conv computed twice); None: when its
        input canvas waits on the host of a CUDA device (host traffic costs more than a conv)."""
        self.chain: bool | None = None
        """Whether a chainable stage whose output would wait on the host keeps no output at all
        (its statistics only) and is recomputed from its inputs, crop by crop, wherever a later
        stage reads it (up to :func:`max_chain` stages deep). None: on CUDA (a host round trip of
        a canvas costs more than recomputing several convs); True: every chainable stage."""
        self.attention_on_host = False
        """Whether the mid-block attention keeps its Q, K and V on the host from the start (a
        memory plan with no room for them; else each goes there only when it does not fit)."""
        self.scores_budget = attention.SCORES_BUDGET
        """Most scores a chunk of the mid-block attention (a plan's room for them)."""
        self.finite: list[torch.Tensor] = []
        """Device flags: whether each GroupNorm's statistics were finite (:meth:`affine`), read
        once at the end of a pass (:meth:`all_finite`) instead of one host wait a norm."""
        self.channels_last = device.type == "cuda"
        """On CUDA canvases and tile batches are laid out channels-last (H×W×C in memory): the
        convs run ~1.5× faster on tensor cores and crops copy as contiguous rows."""
        self.held = dma.InFlight()
        """Host canvases that queued crop copies (:mod:`tileup.vae.dma`) still read or write."""
        self.norms: NormAffines | None = None
        """GroupNorm affines this pass records (:meth:`affine`), or, once given, takes instead
        of whole-canvas statistics: then a stage whose output is not kept runs no pass at all
        (the estimated mode, :mod:`tileup.vae.norms`)."""

    @property
    def given_norms(self) -> bool:
        """Whether this pass takes given GroupNorm affines (:attr:`norms`) instead of statistics."""
        return self.norms is not None and self.norms.given

    def batch_at(self, scale: int) -> int:
        """Tiles per batch of a stage whose finest canvas is at ``scale``: on CUDA, :attr:`batch`
        × (top scale / scale)² / 4 when that is more. A tile at half the scale holds a quarter
        of the pixels, so while the channels grow at most 4× below the top scale (128 → 512 in
        the SD VAEs) such a batch takes no more memory than a top-scale one, and the coarse
        stages, whose kernels are small, launch a fraction of the kernels (4096² decode: 64
        tiles at latent scale in one batch instead of 16)."""
        if self.top_scale is None or self.device.type != "cuda" or scale >= self.top_scale:
            return self.batch
        return max(self.batch, self.batch * (self.top_scale // scale) ** 2 // 4)

    def _place(self, nbytes: int) -> torch.device:
        """Where a new canvas of ``nbytes`` lives: the store, or with a ``store_cap`` (bytes the
        device may hold in all) the device while it fits, else the host."""
        if self.store_cap is None:
            return self.store
        fits = torch.cuda.memory_allocated(self.device) + nbytes <= self.store_cap
        return self.device if fits else torch.device("cpu")

    def fits(self, nbytes: int) -> bool:
        """Whether a new canvas of ``nbytes`` would be placed on the device now."""
        return self._place(nbytes) == self.device

    def release(self, nbytes: int) -> None:
        """Let the device store take ``nbytes`` more from now on: working buffers of that size,
        budgeted beside the store (the mid-block attention's), are freed for good."""
        if self.store_cap is not None:
            self.store_cap += nbytes

    def lend(self, nbytes: int) -> None:
        """Let the device store take ``nbytes`` more until :meth:`reclaim`: the room of working
        buffers budgeted beside the store that are not made yet (the mid-block attention's)."""
        if self.store_cap is not None:
            self.store_cap += nbytes
            self.lent += nbytes

    def reclaim(self, live: Sequence[Canvas]) -> None:
        """Take back what :meth:`lend` lent: while the device holds more than the cap now
        allows, the stored canvases behind ``live`` (all a later stage reads) move to the host,
        largest first."""
        if self.store_cap is None or not self.lent:
            return
        self.store_cap, self.lent = self.store_cap - self.lent, 0
        for c in sorted(_stored(live), key=lambda c: c.data.nbytes, reverse=True):
            if torch.cuda.memory_allocated(self.device) <= self.store_cap:
                return
            if c.data.device.type != "cpu":
                self._to_host(c)
                self.notes.append("VAE store: an activation moved to the host for the attention")

    def _evict(self, canvases: Sequence[Canvas]) -> None:
        """Move canvases held on the device to the host and place every later one there: the
        plan's device store was too generous (an out-of-memory at one tile per batch)."""
        for c in canvases:
            self._to_host(c)
        self.store_cap = 0 if self.store_cap is not None else None
        if self.store.type != "cpu":
            self.store = torch.device("cpu")
        torch.cuda.empty_cache()

    def _to_host(self, c: Canvas) -> None:
        """Move a stored canvas to the host, each lane's own rows from its copy."""
        if c.data.device.type != "cpu":
            c.data = c.data.to("cpu")
        for k, (top, bottom) in enumerate(self.bands(c.scale)):
            if k in c.parts:
                c.data[:, top:bottom] = c.parts[k][:, top:bottom]
        c.parts.clear()

    def canvas(self, data: torch.Tensor, scale: int, *, signed: bool = False) -> Canvas:
        """Wrap a C×H×W tensor (copied to the store in the compute dtype). ``signed``: ``data``
        is in [0, 1] and the canvas holds ``data·2 − 1`` (computed in ``data``'s dtype as it is
        copied, on the device when it goes there: no full-size pass on the host)."""
        nbytes = data.numel() * torch.empty((), dtype=self.dtype).element_size()
        place = self._place(nbytes)
        out = self._empty(tuple(data.shape), self.dtype, place, channels_last=True)
        if data.device.type == "cpu" and place.type == "cuda":
            # bands of rows to the device as they lie, cast there (a copy that changes device,
            # dtype and layout at once goes through a transposing copy on the host)
            per_row = max(1, data[:, :1].numel() * data.element_size())
            rows = max(1, (64 << 20) // per_row)
            for top in range(0, data.shape[1], rows):
                band = data[:, top : top + rows].to(place, non_blocking=True)
                out[:, top : top + rows].copy_(band.mul_(2).sub_(1) if signed else band)
        else:
            out.copy_(data * 2 - 1 if signed else data)
        result = Canvas(out, scale)
        if self._banded(result):
            for k, lane in enumerate(self.lanes[1:], 1):
                result.parts[k] = out.to(lane.device)
            result.valid = dict.fromkeys(range(len(self.lanes)), (0, out.shape[1]))
        return result

    def _banded(self, c: Canvas) -> bool:
        """Whether a new canvas ``c`` gets a copy per lane (on the device, several lanes)."""
        return len(self.lanes) > 1 and c.data.device == self.device

    @staticmethod
    def _copy(c: Canvas, k: int) -> torch.Tensor:
        """Lane ``k``'s copy of a stored canvas (the one copy when it has no parts)."""
        return c.parts.get(k, c.data) if k else c.data

    def bands(self, scale: int) -> list[tuple[int, int]]:
        """Per lane, the canvas rows (at ``scale``) that its tiles own."""
        return [(top * scale, bottom * scale) for top, bottom in self._bands]

    def reach(self, k: int, scale: int, halo: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        """The canvas rows (at ``scale``) that lane ``k``'s crops of core + ``halo`` read."""
        start, end = self.spans[k]
        tiles = self.grid.tiles[start:end]
        if not tiles:
            return 0, 0
        top = min(t.top for t in tiles) * scale - halo[0]
        bottom = max(t.top for t in tiles) * scale + self.grid.tile_h * scale + halo[1]
        return max(0, top), min(self.grid.height * scale, bottom)

    def share_rows(
        self,
        copies: Sequence[torch.Tensor],
        k: int,
        rows: tuple[int, int],
        have: tuple[int, int],
        scale: int,
    ) -> tuple[int, int]:
        """Copy into ``copies[k]`` the ``rows`` (dimension 1, at ``scale``) it lacks (it holds
        ``have``) from the lanes that own them; returns the rows it holds now."""
        lo, hi = have
        bands = self.bands(scale)
        for a, b in ((rows[0], min(rows[1], lo)), (max(rows[0], hi), rows[1])):
            for j, (o0, o1) in enumerate(bands):
                s, e = max(a, o0), min(b, o1)
                if j != k and s < e:
                    copies[k][:, s:e].copy_(copies[j][:, s:e])
        return (min(lo, rows[0]), max(hi, rows[1])) if hi > lo else rows

    def stage(
        self,
        inputs: Sequence[Canvas],
        fn: StageFn,
        *,
        channels: int,
        scale: int,
        halo: tuple[int, int],
        out_dtype: torch.dtype | None = None,
        out_device: torch.device | None = None,
        keep: bool = True,
        chain: bool = False,
        out_channels_last: bool = False,
    ) -> Canvas:
        """Run ``fn`` over all tiles; returns the output canvas (C=``channels``, at ``scale``).

        Every input (all at one scale) is cropped to core + ``halo`` = (before, after) input px
        per axis; ``fn`` maps the batched crops to the batched output cores (B×C×th·s×tw·s) or
        returns None (side effects only; the returned canvas is then empty). ``keep=False``:
        only the output's statistics are kept (the returned canvas holds no data).
        ``chain``: ``fn`` also maps wider crops to proportionally wider outputs (convs, pointwise
        ops, nearest upsampling; it reads no ``owned``/``cores``), so the output may be a
        recomputed canvas (see :attr:`chain`). ``out_channels_last``: an ``out_device``
        canvas laid out H×W×C too (on a channels-last engine), e.g. an image its caller reads
        as H×W×3 without a transposing copy.
        """
        g, m_in = self.grid, inputs[0].scale
        if any(c.scale != m_in for c in inputs):
            raise ValueError("stage inputs must share one scale")
        shape = (channels, g.height * scale, g.width * scale)
        dtype = out_dtype or self.dtype
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        depth = 1 + max((c.recipe.depth for c in inputs if c.recipe is not None), default=0)
        chainable = chain and out_device is None and dtype == self.dtype and depth <= max_chain()
        recipe = None
        place = out_device or self._place(nbytes)
        if keep and chainable:
            wanted = self.chain
            if wanted is None:
                wanted = self.device.type == "cuda" and place.type == "cpu"
            if wanted:
                keep, recipe = False, Recipe(tuple(inputs), fn, halo, m_in, depth)
        if not keep and self.given_norms:
            # nothing reads its statistics: its crops are computed where they are read, if ever
            return Canvas(torch.empty((channels, 0, 0), dtype=dtype), scale, recipe=recipe)
        out = self._empty((channels, 0, 0), dtype, self.device)
        if keep:
            try:
                layout = out_device is None or out_channels_last
                pin = out_device is None and self._pins(nbytes)
                out = self._empty(shape, dtype, place, pin, channels_last=layout)
            except torch.OutOfMemoryError:  # the cap fit, the device's fragments did not
                if place.type != "cuda" or out_device is not None:
                    raise
                torch.cuda.empty_cache()
                self.notes.append("VAE out of memory: an activation recomputed or on the host")
                if chainable:
                    keep, recipe = False, Recipe(tuple(inputs), fn, halo, m_in, depth)
                else:
                    pin = self._pins(nbytes)
                    out = self._empty(shape, dtype, torch.device("cpu"), pin, channels_last=True)
        result = Canvas(out, scale)
        if keep and out_device is None and self._banded(result):
            for k, lane in enumerate(self.lanes[1:], 1):
                result.parts[k] = self._empty(
                    shape, dtype, lane.device or self.device, channels_last=True
                )
        stats: list[list[tuple[torch.Tensor, torch.Tensor, int]]] = [[] for _ in self.lanes]
        pending: dict[int, tuple[torch.Tensor, torch.cuda.Event | None, Sequence[VaeTile]]] = {}
        starts = [start for start, _ in self.spans]
        busy = [k for k, (start, end) in enumerate(self.spans) if start < end]
        for k in busy:  # the rows each lane reads, fetched before any batch is queued
            for c in inputs:
                self._fetch(c, halo, k)
        # the batch is sized by the finest scale it computes at: a recomputed input's chain
        # may reach finer canvases than the stage's own (an encoder's, through downsamplers)
        finest = max(scale, *(_finest(c) for c in inputs))
        turn = 0
        while busy:  # the lanes' batches in turn
            k = busy[turn % len(busy)]
            lane, end = self.lanes[k], self.spans[k][1]
            per_batch = self.batch_at(finest)
            tiles = g.tiles[starts[k] : min(starts[k] + per_batch, end)]
            owned = tuple(owned_region(t, scale) for t in tiles)
            cores = tuple((t.top * scale, t.left * scale) for t in tiles)
            try:
                crops: list[torch.Tensor] = []
                pads: tuple[tuple[int, int, int, int], ...] = ()
                for c in inputs:
                    crop, pads = self._crop(c, tiles, halo, k)
                    crops.append(crop)
                res = fn(crops, StageBatch(pads, owned, cores, lane))
                crops = []
                # statistics and the move to the store in the try too: their float32 copy and
                # relayout are as large as the batch
                # given norms: nothing reads the statistics
                batch_stats = [] if res is None or self.given_norms else _owned_stats(res, owned)
                moved = None
                if res is not None and keep:
                    moved = self._move(res, self._copy(result, k), k, tiles)
            except torch.OutOfMemoryError:
                crops, res, batch_stats, moved = [], None, [], None
                if per_batch > 1:
                    if per_batch > self.batch:  # coarse stages take the plain batch from now on
                        self.top_scale = None
                    else:
                        self.batch //= 2
                    torch.cuda.empty_cache()
                    per_batch = self.batch_at(finest)
                    self.notes.append(f"VAE out of memory: {per_batch} tiles per batch")
                    continue
                if not any(c.data.is_cuda for c in (*_stored(inputs), result)):
                    raise
                self._evict([*_stored(inputs), result])
                self.notes.append("VAE out of memory: activations moved to the host")
                continue
            starts[k] += len(tiles)
            stats[k] += batch_stats
            if starts[k] < end:
                turn += 1
            else:
                busy.remove(k)
            if moved is None:
                continue
            if k in pending:
                self._scatter(self._copy(result, k), scale, *pending[k])
            pending[k] = (*moved, tiles)
        for k, waiting in pending.items():
            self._scatter(self._copy(result, k), scale, *waiting)
        if recipe is not None:
            result.data, result.recipe = torch.empty((channels, 0, 0), dtype=dtype), recipe
        if result.parts:
            result.valid = dict(enumerate(self.bands(scale)))
        if any(stats):  # the lanes' tiles, lane by lane, are the grid's tiles in order
            per_lane = [list(zip(*one, strict=True)) for one in stats if one]
            result.mean, result.m2 = (
                torch.cat([torch.stack(one[i]).to(self.device) for one in per_lane]).to(self.acc)
                for i in (0, 1)
            )
            counts = [n for one in per_lane for n in one[2]]
            counts_here = torch.tensor(counts, dtype=self.acc)  # no host wait for the device
            result.count = counts_here.to(self.device, non_blocking=True)[:, None]
        return result

    def _crop(
        self, c: Canvas, tiles: Sequence[VaeTile], halo: tuple[int, int], k: int
    ) -> tuple[torch.Tensor, tuple[tuple[int, int, int, int], ...]]:
        """Batched crops of ``c`` (core + ``halo``) on lane ``k``'s device, zero outside the
        image, and their pads: gathered from a stored canvas, computed for a recomputed one."""
        lane = self.lanes[k]
        if c.recipe is None:  # its rows are there: fetched when the stage began
            return self._gather(self._copy(c, k), c.scale, tiles, halo, lane.device or self.device)
        r, m = c.recipe, c.scale
        crops: list[torch.Tensor] = []
        pads: tuple[tuple[int, int, int, int], ...] = ()
        margin, wider = _widened(r, m, halo)
        for inp in r.inputs:
            crop, pads = self._crop(inp, tiles, wider, k)
            crops.append(crop)
        res = r.fn(crops, StageBatch(pads, (), (), lane))
        if res is None:
            raise RuntimeError("a recomputed canvas needs a stage that returns its output")
        del crops
        lo, hi = (e * m // r.scale - h for e, h in zip(margin, halo, strict=True))
        rows, cols = res.shape[-2:]
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        res = res[:, :, lo : rows - hi, lo : cols - hi].to(self.dtype)
        if not res.is_contiguous(memory_format=layout):
            res = copies.copy_(torch.empty_like(res, memory_format=layout), res)
        out_pads = self._pads(tiles, m, halo, (self.grid.height * m, self.grid.width * m))
        return StageBatch(out_pads, (), ()).zero_outside(res), out_pads

    def _fetch(self, c: Canvas, halo: tuple[int, int], k: int) -> None:
        """Give lane ``k``'s copy of ``c`` (or of the stored canvases behind its recipe) the rows
        its crops of core + ``halo`` read, from the lanes that own them."""
        if c.recipe is not None:
            _, wider = _widened(c.recipe, c.scale, halo)
            for inp in c.recipe.inputs:
                self._fetch(inp, wider, k)
        elif c.parts:
            copies = [self._copy(c, j) for j in range(len(self.lanes))]
            reach = self.reach(k, c.scale, halo)
            c.valid[k] = self.share_rows(copies, k, reach, c.valid[k], c.scale)

    def all_finite(self, flags: Sequence[torch.Tensor] = ()) -> bool:
        """Whether every statistics flag since the last call and every one of ``flags`` (any
        lane's device) is true: one host wait; the statistics flags are cleared."""
        self.held.drain()
        pending = [f.to(self.device) for f in (*self.finite, *flags)]
        self.finite.clear()
        return not pending or bool(torch.stack(pending).all())

    def affine(self, c: Canvas, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """GroupNorm ``norm`` with whole-canvas statistics as a per-channel affine ``x·a + b``
        (recorded in :attr:`norms`; or the next of its given affines, without statistics).

        Returns float32 (1, C, 1, 1) tensors on the device; whether they are finite is kept in
        :attr:`finite` (no host wait).
        """
        if self.norms is not None and self.norms.given:  # (given_norms, narrowed for mypy)
            a, b = self.norms.take(norm)
        else:
            if c.mean is None or c.m2 is None or c.count is None:
                raise RuntimeError("canvas has no statistics")
            affine = (norm.weight, norm.bias) if norm.affine else ()
            a, b = group_affine(c.mean, c.m2, c.count, norm.num_groups, norm.eps, *affine)
            self.finite.append(torch.isfinite(a).all() & torch.isfinite(b).all())
            a, b = a.float().view(1, -1, 1, 1), b.float().view(1, -1, 1, 1)
            if self.norms is not None:
                self.norms.record(norm, a, b)
        for lane in self.lanes[1:]:  # copied now, while no lane has work queued
            lane(a), lane(b)
        return a, b


def _widened(r: Recipe, m: int, halo: tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, int]]:
    """For crops of core + ``halo`` of a recomputed canvas at scale ``m``: the output margin its
    recipe computes (an input margin e maps to e·m/r.scale: ×2 through an upsampler, ½ through
    a downsampler; trimmed after) and the halo of the crops of its inputs."""
    margin = tuple(-(-h * r.scale // m) for h in halo)
    return margin, (r.halo[0] + margin[0], r.halo[1] + margin[1])


def _finest(c: Canvas) -> int:
    """The finest scale a crop of ``c`` is computed at: its own, or its recipe's chain's."""
    if c.recipe is None:
        return c.scale
    return max(c.scale, c.recipe.scale, *(_finest(i) for i in c.recipe.inputs))


def _stored(canvases: Sequence[Canvas]) -> list[Canvas]:
    """The stored canvases among ``canvases`` and behind their recipes (each once)."""
    out: list[Canvas] = []
    for c in canvases:
        found = [c] if c.recipe is None else _stored(c.recipe.inputs)
        out += [f for f in found if not any(f is o for o in out)]
    return out


def _owned_stats(
    res: torch.Tensor, owned: Sequence[tuple[int, int, int, int]]
) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Per tile of a result batch, float32 channel mean, M2 and pixel count over its owned region
    (:func:`tileup.vae.stats.channel_stats`: one kernel reading the batch in place on CUDA).

    Tiles that own their whole core are reduced in one call (the common case: one kernel a
    batch instead of one a tile), the others one by one."""
    rows, cols = res.shape[-2:]
    whole = [i for i, o in enumerate(owned) if o == (0, rows, 0, cols)]
    stats: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    if whole:
        picked = res if len(whole) == len(owned) else res[whole]
        mean, m2 = channel_stats(picked)
        for j, i in enumerate(whole):
            stats[i] = (mean[j], m2[j], rows * cols)
    for i, (y0, y1, x0, x1) in enumerate(owned):
        if i not in stats:
            mean, m2 = channel_stats(res[i : i + 1, :, y0:y1, x0:x1])
            stats[i] = (mean[0], m2[0], (y1 - y0) * (x1 - x0))
    return [stats[i] for i in range(len(owned))]

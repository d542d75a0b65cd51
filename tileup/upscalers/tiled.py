"""Exact tiled inference of pixel SR models: each tile runs with context, only its centre is kept.

The image is partitioned into near-equal *core* boxes (:func:`tileup.tiler.split_box`). Each
core is run through the model together with ``margin`` input pixels of context on every side
(clipped at the image border) and only the scaled core is written to the output, so the result
equals an untiled run up to the model's effective receptive field. On out-of-memory a core is
split into parts of half its size and the run continues.
"""

from __future__ import annotations

import copy
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import spandrel
import torch
import torch.nn.functional as F

from tileup import peaks
from tileup.devices import start_pinned_copy
from tileup.tiler import Box, split_box
from tileup.upscalers.models import SRModel, Stages

MIN_TILE = 32
CPU_BUDGET_BYTES = 4 << 30
GPU_BUDGET_BYTES = 3 << 29  # 1.5 GiB of activations keeps a run under 2 GiB of VRAM
_PROBE_SIZE = 96


@dataclass
class RunReport:
    """What happened during tiled runs (mutable, filled in as cores complete)."""

    tiles: int = 0
    fallbacks: list[str] = field(default_factory=list)


def count_tiles(height: int, width: int, tile: int | None) -> int:
    """Number of cores an image is cut into (1 when untiled)."""
    return 1 if tile is None else len(split_box(Box(0, 0, height, width), tile))


def _pad_to_requirements(x: torch.Tensor, req: spandrel.SizeRequirements) -> torch.Tensor:
    """NCHW ``x`` padded at the bottom/right (outside every core) so the model accepts it."""
    h, w = x.shape[-2:]
    pad_w, pad_h = req.get_padding(w, h)
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


class _NonFinite(Exception):
    """Half-precision output held NaN or inf."""


@torch.inference_mode()
def _forward_core(model: SRModel, crop: torch.Tensor, core: Box, runtime: _Runtime) -> _CoreOutput:
    """Run one NCHW float32 CPU crop; the float32 output of ``core`` (crop coords) on its way to
    the CPU (:class:`_CoreOutput`: on CUDA the work is queued, not waited for).

    With stages, the trunk runs on the whole crop and the tail in chunks of at most
    ``runtime.tail_tile`` feature pixels, so the high-resolution activations stay small. The
    core's output is put together on the model's device and checked and brought back once.
    """
    s = model.scale
    x = _pad_to_requirements(crop, model.descriptor.size_requirements)
    x = x.to(device=runtime.device, dtype=runtime.dtype, non_blocking=True)
    stages = runtime.stages
    if stages is None:
        y = model.descriptor(x)[..., : core.bottom * s, : core.right * s]
        return _finished(y[..., core.top * s :, core.left * s :].float(), runtime)
    features = stages.trunk(x)
    out = torch.empty(1, 3, core.height * s, core.width * s, device=x.device)
    feature_box = Box(0, 0, features.shape[-2], features.shape[-1])
    for chunk in split_box(core, runtime.tail_tile):
        ctx = chunk.expanded(stages.tail_margin, within=feature_box)
        y = stages.tail(features[..., ctx.top : ctx.bottom, ctx.left : ctx.right])
        top, left = (chunk.top - ctx.top) * s, (chunk.left - ctx.left) * s
        y = y[..., top : top + chunk.height * s, left : left + chunk.width * s]
        t, c = (chunk.top - core.top) * s, (chunk.left - core.left) * s
        out[..., t : t + chunk.height * s, c : c + chunk.width * s] = y
    return _finished(out, runtime)


@dataclass(frozen=True, eq=False)
class _CoreOutput:
    """A core's float32 output clamped to [0, 1], on (or on its way to) the CPU, and whether it
    was finite (half precision only). :meth:`get` waits for it and raises :class:`_NonFinite`
    for NaN/inf."""

    host: torch.Tensor
    done: torch.cuda.Event | None = None
    finite: torch.Tensor | None = None
    """A one-element host flag (valid once ``done`` completes); None: not checked."""

    def get(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
        if self.finite is not None and not bool(self.finite):
            raise _NonFinite
        return self.host


def _finished(y: torch.Tensor, runtime: _Runtime) -> _CoreOutput:
    """A core's float32 output on its way to the CPU. On CUDA it is laid out H×W×3 there (as the
    run's output: each row goes in as one contiguous copy) and comes back through pinned memory
    (PyTorch's host allocator keeps the blocks for the next cores); nothing waits for it until
    :meth:`_CoreOutput.get`, so the next core can be queued first."""
    checks = runtime.dtype != torch.float32
    if y.device.type != "cuda":
        finite = torch.isfinite(y).all() if checks else None
        return _CoreOutput(y.clamp_(0, 1).cpu(), finite=finite)
    finite = torch.isfinite(y).all().to("cpu", non_blocking=True) if checks else None
    host, done = start_pinned_copy(y.clamp_(0, 1).contiguous(memory_format=torch.channels_last))
    return _CoreOutput(host, done, finite)


@dataclass(frozen=True)
class _Runtime:
    device: torch.device
    dtype: torch.dtype
    stages: Stages | None
    tail_tile: int


def _tail_tile(model: SRModel, dtype: torch.dtype, budget: int) -> int:
    """Feature pixels per tail chunk: ~4 activations of ``channels`` at output resolution."""
    stages = model.stages
    if stages is None:
        return 0
    per_pixel = 4 * stages.channels * model.scale**2 * torch.finfo(dtype).bits // 8
    return max(MIN_TILE, int(math.sqrt(budget / 4 / per_pixel)))


def auto_tile_size(
    model: SRModel, device: torch.device, dtype: torch.dtype, budget_bytes: int | None = None
) -> int:
    """The largest core side (input pixels) whose run fits the memory budget.

    On CUDA the bytes per input pixel are measured with a small probe run (of the trunk only,
    for models with stages, whose tail runs in bounded chunks) plus the core's float32 output,
    which is put together on the device; on the CPU a 4 GiB budget and a
    conservative estimate are used.
    """
    margin = model.context_margin
    stages = model.stages
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = budget_bytes or min(GPU_BUDGET_BYTES, int(free * 0.6))
        probe = torch.rand(1, 3, _PROBE_SIZE, _PROBE_SIZE, device=device, dtype=dtype)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        with torch.inference_mode(), peaks.window([device]) as probed:
            (stages.trunk if stages else model.descriptor)(probe)
        per_pixel = (probed.peak_allocated - base) / _PROBE_SIZE**2
        per_pixel += 3 * model.scale**2 * 5  # the core's float32 output and its finite mask
        if stages:
            budget = budget * 3 // 4  # the rest is the tail's
    else:
        budget = budget_bytes or CPU_BUDGET_BYTES
        per_pixel = 4 * 48 * (1 if stages else model.scale**2) + 4096
    side = int(math.sqrt(budget / max(per_pixel, 1.0))) - 2 * margin
    return max(MIN_TILE, side)


def run_tiled(
    model: SRModel,
    image: torch.Tensor,
    *,
    device: torch.device,
    dtype: torch.dtype,
    tile: int | None,
    report: RunReport,
    on_tile: Callable[[int], None] | None = None,
    budget_bytes: int | None = None,
    on_core: Callable[[Box, Box], None] | None = None,
    replicas: Sequence[tuple[SRModel, torch.device]] = (),
    trunk: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Upscale a 1×3×H×W float32 CPU image in [0, 1]; returns 1×3×sH×sW float32 on the CPU,
    laid out H×W×3 in memory (channels-last).

    ``tile`` is the largest core side in input pixels (None: whole image in one piece). On
    out-of-memory the failing core is split in four and later cores are limited to the new size;
    half-precision output with NaN/inf is recomputed in float32. ``on_tile(n)`` is called with
    the number of cores completed (and with a negative count when a split adds cores).
    ``on_core(core, canvas)`` sees each core (input pixels) just before it runs.
    ``replicas``: copies of ``model`` on other devices; each device then takes the next core
    from one shared queue in its own thread (a core's output does not depend on which device
    ran it; the callbacks are called under one lock). The first error stops every device.
    ``trunk``: run by ``model``'s worker instead of its stages' trunk (the same computation,
    compiled: :func:`tileup.upscalers.pixel.compiled_trunk`); the float32 fallback and the
    replicas run their own.
    """
    _, _, height, width = image.shape
    scale = model.scale
    budget = budget_bytes or (GPU_BUDGET_BYTES if device.type == "cuda" else CPU_BUDGET_BYTES)
    stages = model.stages
    if stages is not None and trunk is not None:
        stages = replace(stages, trunk=trunk)
    runtime = _Runtime(device, dtype, stages, _tail_tile(model, dtype, budget))
    canvas = Box(0, 0, height, width)
    run = _SharedRun(
        image=image,
        # laid out H×W×3 (the caller's image layout: no transposing copy of the whole output)
        output=torch.empty(1, height * scale, width * scale, 3).permute(0, 3, 1, 2),
        canvas=canvas,
        queue=deque(split_box(canvas, tile or max(height, width))),
        limit=tile or max(height, width),
        tail_tile=runtime.tail_tile,
        report=report,
        on_tile=on_tile,
        on_core=on_core,
    )
    workers = [(model, runtime)]  # each replica with its own trunk and tail
    workers += [(m, replace(runtime, device=d, stages=m.stages)) for m, d in replicas]
    if len(workers) == 1:
        _work(run, model, runtime)
        return run.output
    with ThreadPoolExecutor(len(workers), thread_name_prefix="tileup-sr") as pool:
        futures = [pool.submit(_work, run, m, r) for m, r in workers]
    errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return run.output


@dataclass
class _SharedRun:
    """One tiled run's queue of cores and its state, shared by the devices' threads."""

    image: torch.Tensor
    output: torch.Tensor
    canvas: Box
    queue: deque[Box]
    limit: int
    tail_tile: int
    report: RunReport
    on_tile: Callable[[int], None] | None
    on_core: Callable[[Box, Box], None] | None
    lock: threading.Lock = field(default_factory=threading.Lock)
    failed: bool = False


@dataclass(frozen=True, eq=False)
class _Launched:
    """A core whose run is queued: its box (canvas pixels), its input crop and the core within
    it, and its output on the way."""

    core: Box
    crop: torch.Tensor
    local: Box
    output: _CoreOutput


def _work(run: _SharedRun, model: SRModel, runtime: _Runtime) -> None:
    """Run cores from the shared queue on one device until it is empty (or another failed).

    Two cores are in flight: the next core is queued on the device before the last one's output
    is waited for and pasted, so the device does not wait for the host's paste and the next
    crop's upload between cores (0.11 s of idle GPU in the 4096² jobs' SR stage on an H200,
    ``bench/results/traces``)."""
    exact: list[SRModel] = []  # a float32 copy, made at the first non-finite core
    pending: _Launched | None = None
    try:
        while True:
            core, runtime = _next_core(run, runtime)
            launched = None
            if core is not None:
                try:
                    launched = _launch(run, model, core, runtime)
                except Exception as exc:
                    if not _is_out_of_memory(exc) or run.limit <= MIN_TILE:
                        raise
                    if pending is not None:  # queued before: it lands first
                        _land(run, model, pending, runtime, exact)
                        pending = None
                    _shrink(run, model, core, runtime)
                    continue
            if pending is not None:
                _land(run, model, pending, runtime, exact)
            pending = launched
            if pending is None:
                return
    except BaseException:
        run.failed = True
        raise


def _next_core(run: _SharedRun, runtime: _Runtime) -> tuple[Box | None, _Runtime]:
    """The next core from the shared queue (None when it is empty or another device failed),
    split first when it is over the run's limit, told to ``on_core``; and ``runtime`` with the
    run's current tail tile."""
    with run.lock:
        while not run.failed and run.queue:
            core = run.queue.popleft()
            if max(core.height, core.width) > run.limit:
                parts = split_box(core, run.limit)
                run.queue.extendleft(reversed(parts))
                _notify(run.on_tile, -(len(parts) - 1))
                continue
            if run.on_core is not None:
                run.on_core(core, run.canvas)
            return core, replace(runtime, tail_tile=run.tail_tile)
    return None, runtime


def _launch(run: _SharedRun, model: SRModel, core: Box, runtime: _Runtime) -> _Launched:
    """Queue ``core`` (canvas pixels) with its context on the device."""
    region = core.expanded(model.context_margin, within=run.canvas)
    crop = run.image[..., region.top : region.bottom, region.left : region.right]
    local = core.shifted(-region.top, -region.left)
    return _Launched(core, crop, local, _forward_core(model, crop, local, runtime))


def _land(
    run: _SharedRun, model: SRModel, done: _Launched, runtime: _Runtime, exact: list[SRModel]
) -> None:
    """Wait for a launched core's output (run again by a float32 copy of the model when half
    precision gave NaN/inf), paste it into the run's output and count it."""
    try:
        result = done.output.get()
    except _NonFinite:
        with run.lock:
            run.report.fallbacks.append(
                f"{model.name}: non-finite output in {runtime.dtype}; tile in fp32"
            )
        if not exact:
            exact.append(_float32_copy(model))
        fp32 = replace(runtime, dtype=torch.float32, stages=exact[0].stages)
        result = _forward_core(exact[0], done.crop, done.local, fp32).get()
    scale, core = model.scale, done.core
    rows = slice(core.top * scale, core.bottom * scale)
    cols = slice(core.left * scale, core.right * scale)
    run.output[..., rows, cols] = result  # cores are disjoint: no lock needed
    with run.lock:
        run.report.tiles += 1
        _notify(run.on_tile, 1)


def _shrink(run: _SharedRun, model: SRModel, core: Box, runtime: _Runtime) -> None:
    """After an out-of-memory error on ``core``: free the cache, halve the run's core and tail
    limits (noted) and put the core back at the front of the queue."""
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
    with run.lock:
        run.limit = min(run.limit, max(MIN_TILE, max(core.height, core.width) // 2))
        run.tail_tile = max(MIN_TILE, min(run.tail_tile, runtime.tail_tile // 2))
        run.report.fallbacks.append(f"{model.name}: out of memory; tile reduced to {run.limit}px")
        run.queue.appendleft(core)


def _float32_copy(model: SRModel) -> SRModel:
    """A copy of ``model`` with float32 weights on the same device and layout."""
    exact = copy.deepcopy(model)
    exact.descriptor.to(dtype=torch.float32)
    return exact


def _notify(on_tile: Callable[[int], None] | None, count: int) -> None:
    if on_tile is not None and count:
        on_tile(count)

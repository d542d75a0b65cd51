"""How a job reports itself: progress units, the stages' clock, and an observer's hooks.

:class:`Progress` counts units (SR tiles, model evaluations) for a bar; :class:`Observer` is a
UI's richer view of one picture's job (stages, tiles, previews, cancel); :class:`Hooks` turns
the stages' callbacks into an observer's calls, in output pixels.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tileup.tiler import Box

if TYPE_CHECKING:
    import torch

    from tileup.tiler import Tile


class Progress(Protocol):
    """Receives tile counts: ``add_total`` when work is planned, ``advance`` when done."""

    def add_total(self, count: int) -> None: ...

    def advance(self, count: int) -> None: ...


class Observer(Protocol):
    """Watches one picture's job (``Upscaler.__call__(image, observer=...)``), for a UI.

    Every method may raise :class:`~tileup.errors.Cancelled` to stop the job where it is: the
    call raises it and returns nothing. Calls come from the job's threads (several at once
    with several devices): an observer must be thread-safe.

    - ``stage(name)``: a stage begins: ``pixel_upscale``, ``vae_encode``, ``diffusion``,
      ``vae_decode``, ``redraw``, ``seam_fix``, ``color_fix``, ``alpha`` (and ``first_pass``,
      the sampling from noise of :meth:`Upscaler.txt2img`);
    - ``add_total(count)`` / ``advance(count)``: progress units as :class:`Progress` gets them
      (those of :meth:`Upscaler.planned_tiles`): ``advance`` comes after every SR tile and
      every model evaluation, so at least once per sampling step;
    - ``tiles(boxes)``: the boxes worked on now, in output pixels (an SR core, a UNet batch of
      fused tiles, a batch of redraw or seam-fix regions); also once per UNet batch;
    - ``preview(image, latent)``: the canvas as it stands: latents 1×C×h×w (``latent``, after
      every model evaluation of fused sampling, cropped to the output) or RGB 3×H×W in [0, 1]
      (after each batch of redraw regions); read only, on the job's device.
    """

    def stage(self, name: str) -> None: ...

    def add_total(self, count: int) -> None: ...

    def advance(self, count: int) -> None: ...

    def tiles(self, boxes: Sequence[Box]) -> None: ...

    def preview(self, image: torch.Tensor, latent: bool) -> None: ...


class NoProgress:
    """Progress that goes nowhere."""

    def add_total(self, count: int) -> None:
        pass

    def advance(self, count: int) -> None:
        pass


class LockedProgress:
    """A progress shared by threads: each call made under one lock."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.lock = threading.Lock()

    def add_total(self, count: int) -> None:
        with self.lock:
            self.progress.add_total(count)

    def advance(self, count: int) -> None:
        with self.lock:
            self.progress.advance(count)


class CompileTime:
    """Wall seconds this process has spent compiling with ``torch.compile`` (any thread; time
    when several compilations overlap counts once). Fed by the compiler's start/end callbacks
    (:mod:`tileup.sampling.compiled` installs them), read by the stage clocks. Process-wide:
    where engines on several GPUs run jobs side by side (a folder), a job's stages also leave
    out the time another job spent compiling meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0.0
        self._since: float | None = None

    def started(self) -> None:
        with self._lock:
            if self._since is None:
                self._since = time.perf_counter()

    def ended(self) -> None:
        with self._lock:
            if self._since is not None:
                self._total += time.perf_counter() - self._since
                self._since = None

    def seconds(self) -> float:
        with self._lock:
            running = 0.0 if self._since is None else time.perf_counter() - self._since
            return self._total + running


COMPILING = CompileTime()


def work_clock() -> float:
    """``time.perf_counter()`` that stands still while ``torch.compile`` compiles: stage times
    leave out the one-time compilation, which a job reports apart (``compile``)."""
    return time.perf_counter() - COMPILING.seconds()


@dataclass
class StageClock:
    """Seconds per stage of one job (by :func:`work_clock`), each stage also told to the
    observer, if any; ``seconds["compile"]`` is the compilation the job paid for, when any."""

    seconds: dict[str, float] = field(default_factory=dict)
    observer: Observer | None = None
    settle: Callable[[], None] | None = None
    """Waits for the devices' queued work (the pipeline's CUDA devices): called as each stage
    ends, so a stage's time holds its own device work, not the next stage's first wait."""
    devices: Sequence[torch.device] = ()
    """Devices whose peak memory each stage records (CUDA ones; see :mod:`tileup.peaks`)."""
    peak_bytes: dict[str, int] = field(default_factory=dict)
    """Peak bytes allocated per stage, the largest over :attr:`devices` (only with CUDA ones)."""
    _compiled_before: float = field(default_factory=COMPILING.seconds, repr=False)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        from tileup import peaks

        if self.observer is not None:
            self.observer.stage(name)
        start = work_clock()
        with peaks.window(self.devices) as opened:
            try:
                yield
            finally:
                if self.settle is not None:
                    self.settle()
                self.add(name, work_clock() - start)
        self.add(name, 0.0, opened.peak_allocated)

    def add(self, name: str, seconds: float, peak_bytes: int = 0) -> None:
        """``seconds`` of work (measured by :func:`work_clock`) to stage ``name``, and the peak
        bytes allocated while it ran (0: not measured, off CUDA), the larger one kept."""
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 4)
        if peak_bytes:
            self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), peak_bytes)
        compiled = COMPILING.seconds() - self._compiled_before
        if compiled > 0:
            self.seconds["compile"] = round(compiled, 4)


@dataclass(frozen=True, eq=False)
class Hooks:
    """The stage functions' optional callbacks that feed an :class:`Observer` (all None without
    one, so a job without an observer runs exactly as before); boxes go out in output pixels.
    ``factor`` is the VAE scale factor (latent cells → pixels); ``target`` the output (H, W)."""

    observer: Observer
    target: tuple[int, int]
    factor: int = 8

    def on_tile(self, count: int) -> None:
        if count > 0:
            self.observer.advance(count)
        else:
            self.observer.add_total(-count)

    def on_core(self, core: Box, canvas: Box) -> None:
        """An SR core of a pass over ``canvas``: scaled to the output."""
        (h, w), sy, sx = self.target, self.target[0] / canvas.height, self.target[1] / canvas.width
        top, left = round(core.top * sy), round(core.left * sx)
        bottom, right = min(h, round(core.bottom * sy)), min(w, round(core.right * sx))
        self.observer.tiles([Box(top, left, bottom - top, right - left)])

    def on_fused_batch(self, tiles: list[Tile]) -> None:
        self.observer.tiles([self._clip(t.box.scaled(self.factor)) for t in tiles])

    def on_latents(self, latents: torch.Tensor) -> None:
        f, (h, w) = self.factor, self.target
        self.observer.preview(latents[..., : -(-h // f), : -(-w // f)], True)

    def on_regions(self, name: str, boxes: tuple[Box, ...]) -> None:
        self.observer.stage("redraw" if name == "redraw" else "seam_fix")
        self.observer.tiles([self._clip(b) for b in boxes])

    def on_pasted(self, canvas: torch.Tensor) -> None:
        self.observer.preview(canvas[:, : self.target[0], : self.target[1]], False)

    def _clip(self, box: Box) -> Box:
        """``box`` (canvas pixels; the canvas is the output padded at the bottom/right)
        cut to the output."""
        return box.intersect(Box(0, 0, *self.target)) or Box(box.top, box.left, 0, 0)

"""Peak device memory over windows (a job, each of its stages) that nest and survive resets.

PyTorch keeps one peak per CUDA device, and resetting it (to measure a stage, or a probe's own
peak) loses the peak so far for everyone else. Here opening a window resets the peak only after
folding each device's peak so far into every window already open, so every window reports the
peak while it was open, whatever opened inside it. Windows are process-wide (a window opened
by one thread folds the peaks into the windows of all), guarded by one lock.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

_LOCK = threading.Lock()
_OPEN: list[PeakWindow] = []


def _read(index: int) -> tuple[int, int]:
    """CUDA device ``index``'s peak bytes allocated and reserved since its last reset."""
    return torch.cuda.max_memory_allocated(index), torch.cuda.max_memory_reserved(index)


def _reset(index: int) -> None:
    torch.cuda.reset_peak_memory_stats(index)


@dataclass(eq=False)
class PeakWindow:
    """Peak bytes allocated and reserved per CUDA device index while the window was open (read
    them once it is closed; a window over no CUDA device reports 0)."""

    allocated: dict[int, int] = field(default_factory=dict)
    reserved: dict[int, int] = field(default_factory=dict)

    @property
    def peak_allocated(self) -> int:
        """The largest peak allocated over the window's devices."""
        return max(self.allocated.values(), default=0)

    @property
    def peak_reserved(self) -> int:
        """The largest peak reserved over the window's devices."""
        return max(self.reserved.values(), default=0)

    def so_far(self) -> tuple[int, int]:
        """The largest peaks allocated and reserved over the window's devices until now (a
        window still open reads the devices again); over no CUDA device, the process's peak
        resident memory and 0."""
        if not self.allocated:
            return process_peak(), 0
        allocated, reserved = 0, 0
        for index in self.allocated:
            now = _read(index)
            allocated = max(allocated, self.allocated[index], now[0])
            reserved = max(reserved, self.reserved[index], now[1])
        return allocated, reserved

    def _fold(self, index: int) -> None:
        if index in self.allocated:
            allocated, reserved = _read(index)
            self.allocated[index] = max(self.allocated[index], allocated)
            self.reserved[index] = max(self.reserved[index], reserved)


def process_peak() -> int:
    """This process's peak resident memory in bytes (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cuda_indices(devices: Iterable[torch.device]) -> tuple[int, ...]:
    """The CUDA device indices among ``devices`` (``cuda`` alone is the current device)."""
    found = {
        torch.cuda.current_device() if d.index is None else d.index
        for d in devices
        if d.type == "cuda"
    }
    return tuple(sorted(found))


def _restart(index: int) -> None:
    """Reset CUDA device ``index``'s peak statistics, its peak so far folded into every open
    window first."""
    for window in _OPEN:
        window._fold(index)
    _reset(index)


@contextmanager
def window(devices: Iterable[torch.device]) -> Iterator[PeakWindow]:
    """A window over the CUDA devices among ``devices`` from now until the block ends: each
    device's peak restarts from what is allocated now (open windows keep their peak so far)."""
    indices = cuda_indices(devices)
    opened = PeakWindow()
    with _LOCK:
        for index in indices:
            _restart(index)
            opened.allocated[index], opened.reserved[index] = _read(index)
        _OPEN.append(opened)
    try:
        yield opened
    finally:
        with _LOCK:
            for index in indices:
                opened._fold(index)
            _OPEN.remove(opened)

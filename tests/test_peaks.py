"""Peak windows that nest and survive resets (tileup.peaks), and the per-stage peaks a job
reports. CUDA's counters are replaced by a bookkeeping device here (no GPU in CI); the same
behaviour runs on real CUDA in tests/gpu/test_cuda_pixel.py."""

from __future__ import annotations

import pytest
import torch

from tileup import peaks
from tileup.progress import StageClock

MIB = 1 << 20


class Counters:
    """One device's allocated bytes and PyTorch-style peaks (reset → the current value)."""

    def __init__(self) -> None:
        self.now = {0: 100 * MIB, 1: 10 * MIB}
        self.peak = dict(self.now)
        self.resets = 0

    def allocate(self, index: int, size: int) -> None:
        self.now[index] += size
        self.peak[index] = max(self.peak[index], self.now[index])

    def read(self, index: int) -> tuple[int, int]:
        return self.peak[index], 2 * self.peak[index]

    def reset(self, index: int) -> None:
        self.resets += 1
        self.peak[index] = self.now[index]


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch) -> Counters:
    counters = Counters()
    monkeypatch.setattr(peaks, "_read", counters.read)
    monkeypatch.setattr(peaks, "_reset", counters.reset)
    return counters


CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


def test_a_window_starts_from_what_is_allocated_now(device: Counters) -> None:
    device.allocate(0, 50 * MIB)
    device.allocate(0, -50 * MIB)  # a peak of 150 MiB before the window
    with peaks.window([CUDA0]) as opened:
        device.allocate(0, 20 * MIB)
        device.allocate(0, -20 * MIB)
    assert opened.peak_allocated == 120 * MIB
    assert opened.peak_reserved == 240 * MIB


def test_an_outer_window_keeps_its_peak_through_the_resets_of_inner_windows(
    device: Counters,
) -> None:
    with peaks.window([CUDA0]) as outer:
        device.allocate(0, 300 * MIB)
        device.allocate(0, -300 * MIB)  # 400 MiB, then reset by the inner window
        with peaks.window([CUDA0]) as inner:
            device.allocate(0, 30 * MIB)
            with peaks.window([CUDA0]) as probe:  # a probe measuring its own peak
                device.allocate(0, -30 * MIB)
        assert inner.peak_allocated == 130 * MIB and probe.peak_allocated == 130 * MIB
        assert outer.so_far()[0] == 400 * MIB
        device.allocate(0, 5 * MIB)
    assert outer.peak_allocated == 400 * MIB
    assert device.resets == 3  # each window opening
    assert peaks._OPEN == []


def test_windows_watch_only_their_devices_and_report_the_largest(device: Counters) -> None:
    with peaks.window([CUDA0, CUDA1, torch.device("cpu")]) as both:
        with peaks.window([CUDA1]) as second:
            device.allocate(1, 500 * MIB)
        device.allocate(0, 50 * MIB)
    assert second.allocated == {1: 510 * MIB}
    assert both.allocated == {0: 150 * MIB, 1: 510 * MIB}
    assert both.peak_allocated == 510 * MIB


def test_a_window_over_no_cuda_device_reports_nothing(device: Counters) -> None:
    with peaks.window([torch.device("cpu")]) as opened:
        device.allocate(0, MIB)
    assert opened.allocated == {} and opened.peak_allocated == 0 and device.resets == 0


def test_a_window_closes_when_its_block_raises(device: Counters) -> None:
    with pytest.raises(RuntimeError), peaks.window([CUDA0]) as opened:
        device.allocate(0, 7 * MIB)
        raise RuntimeError("out of memory")
    assert opened.peak_allocated == 107 * MIB and peaks._OPEN == []


def test_stage_clock_records_each_stages_peak(device: Counters) -> None:
    clock = StageClock(devices=(CUDA0,))
    with peaks.window([CUDA0]) as job:
        with clock.stage("vae_encode"):
            device.allocate(0, 64 * MIB)
            device.allocate(0, -64 * MIB)
        with clock.stage("diffusion"):
            device.allocate(0, 8 * MIB)
        with clock.stage("diffusion"):  # a stage met twice keeps its larger peak
            device.allocate(0, -8 * MIB)
    assert clock.peak_bytes == {"vae_encode": 164 * MIB, "diffusion": 108 * MIB}
    assert job.peak_allocated == 164 * MIB
    assert set(clock.seconds) == {"vae_encode", "diffusion"}


def test_stage_clock_without_cuda_records_no_peaks(device: Counters) -> None:
    clock = StageClock(devices=(torch.device("cpu"),))
    with clock.stage("pixel_upscale"):
        device.allocate(0, MIB)
    assert clock.peak_bytes == {} and "pixel_upscale" in clock.seconds


def test_passes_timed_elsewhere_add_their_seconds_and_the_larger_peak() -> None:
    clock = StageClock()
    clock.add("redraw", 1.25, 300 * MIB)
    clock.add("redraw", 0.5, 200 * MIB)  # a second pass of the same stage
    clock.add("seam_fix", 0.25)  # not measured (off CUDA)
    assert clock.seconds == {"redraw": 1.75, "seam_fix": 0.25}
    assert clock.peak_bytes == {"redraw": 300 * MIB}


def test_a_window_over_no_cuda_device_reads_the_process_peak() -> None:
    with peaks.window([torch.device("cpu")]) as opened:
        data = bytearray(64 * MIB)
    allocated, reserved = opened.so_far()
    assert allocated >= len(data) and reserved == 0

"""The pixel stage's CUDA path, on a real GPU (skipped without one; run on the GPU machine).

On CUDA a core's output is put together on the device from its tail chunks, checked for NaN/inf
and brought back once through pinned memory.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tileup.upscalers.models import load_sr_model
from tileup.upscalers.tiled import RunReport, run_tiled

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def x4plus(shared_models):
    return load_sr_model(shared_models / "RealESRGAN_x4plus.safetensors")


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.random((1, 3, 104, 88), dtype=np.float32))


@pytest.fixture(autouse=True)
def _no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_cores_put_together_on_the_device_equal_the_cpu_run(x4plus, image) -> None:
    """float32, four cores each of several tail chunks: the CUDA run equals the CPU run (up to
    float32 kernel rounding) and returns an ordinary (pageable) CPU tensor."""
    on_gpu = copy.deepcopy(x4plus)
    on_gpu.place(CUDA, torch.float32)
    report = RunReport()
    got = run_tiled(on_gpu, image, device=CUDA, dtype=torch.float32, tile=56, report=report)
    want = run_tiled(
        x4plus, image, device=torch.device("cpu"), dtype=torch.float32, tile=56, report=RunReport()
    )
    assert report.tiles == 4 and not report.fallbacks
    assert got.device.type == "cpu" and not got.is_pinned()
    assert got.permute(0, 2, 3, 1).is_contiguous()  # cores came back H×W×3, rows in place
    assert got.shape == want.shape == (1, 3, 416, 352)
    assert (got - want).abs().max().item() <= 1e-3


def test_half_overflow_in_one_core_falls_back_to_float32(x4plus, image) -> None:
    """An activation that overflows fp16 (inf − inf = NaN in the device-side core, finite in
    float32): every core is run again by a float32 copy of the model (one note a core), the
    output is finite and the model keeps its fp16 weights."""
    model = copy.deepcopy(x4plus)
    model.descriptor.model.model[-1].register_forward_hook(lambda m, i, o: o * 1e9 - o * 1e9)
    model.place(CUDA, torch.float16)
    report = RunReport()
    out = run_tiled(model, image, device=CUDA, dtype=torch.float16, tile=56, report=report)
    assert len(report.fallbacks) == 4 and "non-finite" in report.fallbacks[0]
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert next(model.descriptor.model.parameters()).dtype == torch.float16


def test_a_redraw_canvas_comes_back_through_pinned_memory() -> None:
    """The redraw's CUDA canvas (3×H×W, any float dtype) comes back as the same H×W×3 float32
    values; the copy is pinned (its numpy array keeps the block alive)."""
    from tileup.devices import to_pinned_host
    from tileup.modes.redraw import _to_rgb

    gen = torch.Generator("cuda").manual_seed(0)
    canvas = torch.rand(3, 40, 56, device=CUDA, generator=gen)
    host = to_pinned_host(canvas)
    assert host.is_pinned() and torch.equal(host, canvas.cpu())
    channels_last = canvas[None].contiguous(memory_format=torch.channels_last)
    host = to_pinned_host(channels_last)  # copied in its layout
    assert host.stride() == channels_last.stride() and torch.equal(host, canvas[None].cpu())
    rgb = _to_rgb(canvas.half())
    assert rgb.shape == (40, 56, 3) and rgb.dtype == np.float32
    np.testing.assert_array_equal(rgb, canvas.half().float().permute(1, 2, 0).cpu().numpy())


def test_peak_windows_keep_what_the_sr_probe_resets(x4plus) -> None:
    """The SR tile probe restarts CUDA's peak to measure its own; a window around it (a job,
    a stage) still reports the larger peak from before, and the probe still measures."""
    from tileup import peaks
    from tileup.upscalers.tiled import MIN_TILE, auto_tile_size

    on_gpu = copy.deepcopy(x4plus)
    on_gpu.place(CUDA, torch.float16)
    torch.cuda.synchronize()
    with peaks.window([CUDA]) as outer:
        base = torch.cuda.memory_allocated()
        ballast = torch.empty(512 << 20, dtype=torch.uint8, device=CUDA)
        del ballast
        with peaks.window([CUDA]) as inner:
            tile = auto_tile_size(on_gpu, CUDA, torch.float16)
    assert outer.peak_allocated >= base + (512 << 20)
    assert base < inner.peak_allocated < base + (512 << 20)  # the probe's run, not the ballast
    assert tile > MIN_TILE and peaks._OPEN == []

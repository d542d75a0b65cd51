"""The fused attention kernel (tileup.vae.flash), the online softmax blocks the chunked
attention uses on CUDA (tileup.vae.softmax) and the GroupNorm statistics kernel
(tileup.vae.stats) on the CPU, through Triton's interpreter.

Exactness against float64 softmax attention at sizes that leave partial query and key blocks;
written over its queries; the tiled VAE's attention routes to it only when asked. The kernel
runs in a process of its own (``flash_interpreted.py``: the interpreter must be on before
triton is first imported). Its speed and its bf16 behaviour are measured on the GPU
(tests/gpu, bench/vae/profile_vae.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from interpreter import run_interpreted

from tileup.vae import flash

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    unset = (
        "TILEUP_VAE_ATTENTION",
        "TILEUP_VAE_SOFTMAX",
        "TILEUP_VAE_STATS",
        "TILEUP_VAE_EPILOGUE",
    )
    return run_interpreted(HERE / "flash_interpreted.py", unset)


@pytest.mark.parametrize(("n", "keys", "d"), [(70, 45, 32), (1, 200, 64), (64, 96, 512)])
def test_fused_attention_is_exact_in_float32(interpreted, n: int, keys: int, d: int) -> None:
    got = interpreted[f"float32_{n}_{keys}_{d}"]
    assert got["shape"] == [n, d] and got["dtype"] == "torch.float32"
    # float32 rounding of scores up to ~±15, as PyTorch's float32 product-softmax-product
    # (measured: 1.5e-5 against its 8.8e-6 at d = 512)
    assert got["error"] <= 2 * got["torch_error"] + 1e-6


def test_fused_attention_in_half_precision_is_as_close_as_pytorchs(interpreted) -> None:
    got = interpreted["half"]
    assert got["dtype"] == "torch.float16"
    assert got["error"] <= 1.5 * got["torch_error"]


def test_fused_attention_may_write_over_its_queries(interpreted) -> None:
    assert interpreted["over_queries"] == {"same_storage": True, "equal": True}


def test_the_tiled_vae_uses_it_only_when_asked(interpreted) -> None:
    got = interpreted["routing"]
    assert got["calls_by_default"] == 0  # the default: chunks of two matrix products
    assert got["calls_when_asked"] == 1  # one kernel for the one head, whatever the budget
    assert got["fused_vs_chunked"] < 1e-5 and got["error"] < 1e-5


def test_what_it_takes_and_its_settings(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not flash.supported(torch.zeros(4, 64))  # the CPU needs the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert flash.supported(torch.zeros(4, 64)) and flash.supported(torch.zeros(4, 512))
    for width in (48, 1024, 8):
        assert not flash.supported(torch.zeros(4, width))
    assert not flash.supported(torch.zeros(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="width 48"):
        flash.flash_attention(*(torch.zeros(4, 48) for _ in range(3)))
    with pytest.raises(ValueError, match="contiguous rows"):
        flash.flash_attention(torch.zeros(4, 64), torch.zeros(64, 5).T, torch.zeros(5, 64))
    assert flash.FlashConfig.from_env() == flash.FlashConfig()
    monkeypatch.setenv("TILEUP_FLASH_CONFIG", "128,64,8,3")
    assert flash.FlashConfig.from_env() == flash.FlashConfig(128, 64, 8, 3)
    monkeypatch.setenv("TILEUP_FLASH_CONFIG", "128,x")
    with pytest.raises(ValueError, match="four integers"):
        flash.FlashConfig.from_env()
    assert not flash.enabled()
    monkeypatch.setenv("TILEUP_VAE_ATTENTION", "fused")
    assert flash.enabled()


@pytest.mark.parametrize("case", ["5x5000", "3x100", "2x9000_lane_steps", "1x4096"])
@pytest.mark.parametrize("how", ["kernel", "torch"])
def test_the_online_softmax_blocks_give_pytorchs_softmax(interpreted, case: str, how: str) -> None:
    exact = interpreted["softmax"][f"{case}_float32_{how}"]
    assert exact["dtype"] == "torch.float32" and exact["error"] < 1e-6
    assert exact["max_error"] == 0 and exact["first_rescale"] == 0
    half = interpreted["softmax"][f"{case}_bfloat16_{how}"]
    assert half["dtype"] == "torch.bfloat16" and half["probs_at_most_one"]
    # within one bf16 step (2^-8 below 1) of PyTorch's softmax then cast (the interpreter
    # truncates where the GPU rounds to nearest)
    assert half["error"] <= half["torch_error"] + 2**-8


def test_the_online_softmax_refuses_what_it_cannot_take(monkeypatch) -> None:
    from tileup.vae import softmax

    state = (torch.full((2,), float("-inf")), torch.zeros(2))
    with pytest.raises(ValueError, match="float32"):
        softmax.softmax_block(torch.zeros(2, 3, dtype=torch.float16), *state, torch.float16)
    with pytest.raises(ValueError, match="one value per row"):
        softmax.softmax_block(torch.zeros(2, 3), torch.zeros(3), torch.zeros(2), torch.float16)
    scores = torch.randn(2, 7)
    assert not softmax.enabled(scores)  # the CPU needs the interpreter: PyTorch's then
    probs, rescale = softmax.softmax_block(scores.clone(), *state, torch.float16)
    expected = torch.softmax(scores, dim=-1)
    assert probs.dtype == torch.float16 and torch.equal(rescale, torch.zeros(2))
    assert torch.allclose(probs.float() / state[1][:, None], expected, rtol=2e-3)
    assert torch.equal(state[0], scores.amax(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert softmax.enabled(scores)  # the interpreter runs it on the CPU
    monkeypatch.setattr(softmax, "_triton_installed", lambda: False)
    assert not softmax.enabled(scores)  # no Triton (e.g. Windows): PyTorch's
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TILEUP_VAE_SOFTMAX", "torch")
    assert not softmax.enabled(scores)


@pytest.mark.parametrize(
    "case",
    [
        "bf16_channels_last_offset",
        "float32_nchw",
        "bf16_130_channels",
        "bf16_channels_last_offset_window",
        "float32_nchw_window",
        "bf16_130_channels_window",
    ],
)
def test_the_statistics_kernel_is_float32_exact_in_any_layout(interpreted, case: str) -> None:
    """Channel mean and M2 against float64 (channels-last and NCHW, a mean 13 standard
    deviations from zero, 130 channels, 630 pixels, a window of a larger tensor; one block of
    pixels a program and three merged in it): within a few float32 steps, as close as
    PyTorch's float32 ``var_mean``."""
    sizes = {
        "bf16_channels_last_offset": (2, 64),
        "float32_nchw": (3, 3),
        "bf16_130_channels": (1, 130),
    }
    batch, channels = sizes[case.removesuffix("_window")]
    for key in (case, f"{case}_x3"):  # one block a program, and three merged in the program
        got = interpreted["stats"][key]
        assert got["shape"] == [batch, channels, batch, channels]
        assert got["dtype"] == "torch.float32"
        assert got["mean_error"] <= max(2 * got["torch_mean_error"], 1e-5)
        assert got["m2_relative_error"] <= max(2 * got["torch_m2_relative_error"], 1e-5)


def test_the_tiled_vae_takes_its_statistics_from_the_kernel(interpreted) -> None:
    """Every statistics batch of a tiled encode went through the kernel (and none with
    ``TILEUP_VAE_STATS=torch``); the latents equal PyTorch's statistics' up to float32
    rounding."""
    got = interpreted["stats"]["encode"]
    assert got["kernel_calls"] >= 10 and got["torch_calls"] == 0
    assert got["difference"] <= 1e-5 * max(1.0, got["scale"])


def test_the_statistics_kernel_is_left_aside_where_it_cannot_run(monkeypatch) -> None:
    from tileup.vae import softmax, stats

    x = torch.randn(2, 5, 3, 4)
    assert not stats.enabled(x)  # the CPU needs the interpreter: PyTorch's then
    mean, m2 = stats.channel_stats(x)
    var, expected = torch.var_mean(x, dim=(2, 3), correction=0)
    assert torch.equal(mean, expected) and torch.equal(m2, var * 12)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert stats.enabled(x)
    monkeypatch.setattr(softmax, "_triton_installed", lambda: False)
    assert not stats.enabled(x)
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TILEUP_VAE_STATS", "torch")
    assert not stats.enabled(x)
    with pytest.raises(ValueError, match="B×C×H×W"):
        stats.channel_stats(torch.zeros(3, 4, 5))


@pytest.mark.parametrize("case", ["128_skip", "128", "3"])
def test_the_conv_epilogue_is_pytorchs_bias_add_and_skip_sum(interpreted, case: str) -> None:
    """Bias (and skip window) added in one pass over a channels-last convolution result: the
    bytes of PyTorch's ``add_`` and ``skip + out`` in float32 and float16 (rows of 2560 values,
    longer than a block; 3 channels); in bf16 within one bf16 step, as the interpreter truncates
    where the GPU rounds to nearest (tests/gpu compares the GPU's bytes)."""
    for dtype in ("float32", "float16"):
        got = interpreted["epilogue"][f"{dtype}_{case}"]
        assert got["equal"] and got["channels_last"], got
    got = interpreted["epilogue"][f"bfloat16_{case}"]
    assert got["error"] <= 2 * 2**-7 * max(1.0, got["scale"])  # two roundings


def test_the_tiled_vae_adds_its_conv_biases_in_the_kernel(interpreted) -> None:
    """Every bias of a tiled decode went through the kernel (none with
    ``TILEUP_VAE_EPILOGUE=torch``) and the image equals PyTorch's ops' up to float32 rounding
    (on the CPU, PyTorch's convolution adds its bias inside)."""
    got = interpreted["epilogue"]["decode"]
    assert got["kernel_calls"] >= 8 and got["torch_calls"] == 0
    assert got["difference"] <= 1e-5


def test_the_conv_epilogue_is_left_aside_where_it_cannot_run(monkeypatch) -> None:
    from tileup.vae import epilogue, softmax

    x = torch.randn(1, 4, 6, 7).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, 4, 3, 3), torch.randn(8)
    skip = torch.randn(1, 8, 4, 5)
    assert not epilogue.enabled(x)  # the CPU needs the interpreter: PyTorch's then
    got = epilogue.conv2d(x, w, b, (1, 1), (1, 1), 1, skip)
    assert torch.equal(got, skip + torch.nn.functional.conv2d(x, w, b))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert epilogue.enabled(x)
    with pytest.raises(ValueError, match="does not match"):
        epilogue.conv2d(x, w, b, (1, 1), (1, 1), 1, skip[:, :, :3])
    monkeypatch.setattr(softmax, "_triton_installed", lambda: False)
    assert not epilogue.enabled(x)
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TILEUP_VAE_EPILOGUE", "torch")
    assert not epilogue.enabled(x)


def test_a_kernel_that_cannot_launch_is_left_to_pytorch_on_that_gpu(monkeypatch) -> None:
    """The softmax, statistics and bias kernels' one launch guard: on a CUDA device a kernel
    that cannot build or launch is warned about and recorded (PyTorch's ops there from then on);
    out of memory, and any failure under the CPU's interpreter, are raised."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from tileup.vae import softmax

    monkeypatch.setattr(softmax, "on_device", lambda device: nullcontext())  # no GPU here

    def broken() -> None:
        raise RuntimeError("no kernel image for this GPU")

    failed: set[int] = set()
    gpu = SimpleNamespace(device=torch.device("cuda", 1))
    with pytest.warns(UserWarning, match=r"VAE bias kernel unavailable \(RuntimeError\)"):
        assert not softmax.launched(broken, gpu, failed, "VAE bias")  # type: ignore[arg-type]
    assert failed == {1}
    ran: list[int] = []
    assert softmax.launched(lambda: ran.append(1), gpu, failed, "bias")  # type: ignore[arg-type]
    assert ran == [1]

    def out_of_memory() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        softmax.launched(out_of_memory, gpu, set(), "bias")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="no kernel image"):
        softmax.launched(broken, torch.zeros(2), set(), "bias")

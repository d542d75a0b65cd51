"""The one-kernel GroupNorm for an eager channels-last UNet (tileup.group_norm_kernel): values
on the CPU through Triton's interpreter, in a process of its own (``group_norm_interpreted.py``);
the kernel built for Hopper without a GPU; which UNets take it (TILEUP_UNET_LAYOUT)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from interpreter import run_interpreted
from torch import nn

from tileup import group_norm_kernel
from tileup.modes.model import LoadOptions, wants_channels_last
from tileup.settings import SettingsError

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    return run_interpreted(HERE / "group_norm_interpreted.py", ("TILEUP_GROUP_NORM",))


def test_values_are_pytorchs_up_to_float32_rounding_in_either_layout(interpreted) -> None:
    cases = {k: v for k, v in interpreted.items() if "/" in k}
    assert len(cases) == 8
    for name, got in cases.items():
        assert got["layout_kept"], name
        assert got["error"] <= 4 * got["torch_error"] + 2e-6, (name, got)


def test_half_precision_is_as_close_as_pytorchs(interpreted) -> None:
    got = interpreted["bf16"]
    assert got["dtype"] == "torch.bfloat16"
    # one rounding to bf16, as PyTorch's (half a unit in the last place); the interpreter
    # rounds toward zero (the GPU to the nearest), so up to one unit here
    assert got["torch_ulps"] <= 0.5 + 1e-3 and got["ulps"] <= 1 + 1e-3, got


def test_the_swapped_module_runs_it(interpreted) -> None:
    assert interpreted["module"]["class"] == "KernelGroupNorm"
    assert interpreted["module"]["error"] < 1e-5


def _unet(addition_embed_type: str | None) -> nn.Module:
    """A stand-in UNet: only its config's ``addition_embed_type`` matters here."""
    unet = nn.Module()
    unet.config = SimpleNamespace(addition_embed_type=addition_embed_type)  # type: ignore[assignment]
    return unet


def test_layout_choice_and_pytorchs_without_a_kernel(monkeypatch) -> None:
    eager = LoadOptions(vae=None, prediction="epsilon", prompt="", negative_prompt="")
    sd, sdxl, cpu = _unet(None), _unet("text_time"), torch.device("cpu")
    monkeypatch.delenv("TILEUP_UNET_LAYOUT", raising=False)
    monkeypatch.delenv("TILEUP_GROUP_NORM", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not group_norm_kernel.wanted(sd, cpu)  # no kernel runs here: PyTorch's layout
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernel runs (interpreted): as on a GPU
    assert group_norm_kernel.wanted(sd, cpu) and not group_norm_kernel.wanted(sdxl, cpu)
    assert not wants_channels_last(sd, cpu, eager)  # the weights' layout: CUDA only
    monkeypatch.setenv("TILEUP_UNET_LAYOUT", "channels_last_kernel_norm")
    assert group_norm_kernel.wanted(sdxl, cpu)
    monkeypatch.setenv("TILEUP_GROUP_NORM", "torch")  # the kernel turned off: never
    assert not group_norm_kernel.wanted(sdxl, cpu)
    monkeypatch.delenv("TILEUP_GROUP_NORM")
    monkeypatch.setenv("TILEUP_UNET_LAYOUT", "nchw")
    assert not group_norm_kernel.wanted(sd, cpu)
    monkeypatch.setenv("TILEUP_UNET_LAYOUT", "channels-last")
    with pytest.raises(SettingsError, match="TILEUP_UNET_LAYOUT must be one of auto, nchw"):
        group_norm_kernel.wanted(sd, cpu)
    monkeypatch.delenv("TILEUP_UNET_LAYOUT")
    monkeypatch.delenv("TRITON_INTERPRET")
    x = torch.randn(2, 8, 3, 3)  # the CPU without the interpreter: PyTorch's, same values
    w, b = torch.randn(8), torch.randn(8)
    got = group_norm_kernel.group_norm(x, 2, w, b, 1e-5)
    assert torch.equal(got, torch.nn.functional.group_norm(x, 2, w, b, 1e-5))

"""The one-kernel GroupNorm for an eager channels-last UNet (tileup.group_norm_kernel): values
on the CPU through Triton's interpreter, in a process of its own (``group_norm_interpreted.py``);
the kernel built for Hopper without a GPU; the UNet wiring behind its switch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from interpreter import run_interpreted

from tileup import group_norm_kernel
from tileup.modes.model import LoadOptions, wants_channels_last

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


def test_off_by_default_and_pytorchs_without_a_kernel(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("TILEUP_UNET_LAYOUT", raising=False)
    cuda = torch.device("cuda")
    eager = LoadOptions(vae=None, prediction="epsilon", prompt="", negative_prompt="")
    assert not group_norm_kernel.wanted() and not wants_channels_last(cuda, eager)
    monkeypatch.setenv("TILEUP_UNET_LAYOUT", "channels_last_kernel_norm")
    assert group_norm_kernel.wanted() and wants_channels_last(cuda, eager)
    assert not wants_channels_last(torch.device("cpu"), eager)
    x = torch.randn(2, 8, 3, 3)  # the CPU without the interpreter: PyTorch's, same values
    w, b = torch.randn(8), torch.randn(8)
    got = group_norm_kernel.group_norm(x, 2, w, b, 1e-5)
    assert torch.equal(got, torch.nn.functional.group_norm(x, 2, w, b, 1e-5))

"""The one-kernel GroupNorm (tileup.group_norm_kernel) on a real GPU (skipped without one):
bf16 values within PyTorch's rounding in both layouts, the layout kept, and an eager
channels-last UNet with it within bf16 rounding of the NCHW UNet; which UNets take it by
default."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from sd_fixtures import make_tiny_components

from tileup import channel_norm, group_norm_kernel, upsample_conv
from tileup.modes.model import LoadOptions, _runnable, wants_channels_last

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(("channels", "side"), [(320, 64), (640, 32), (1280, 8), (96, 13)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bf16_values_are_pytorchs_up_to_rounding(channels: int, side: int, layout: str) -> None:
    gen = torch.Generator(device="cuda").manual_seed(channels + side)
    x = torch.randn(6, channels, side, side, device="cuda", generator=gen) * 2 + 1
    x = x.bfloat16()
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(channels, device="cuda", generator=gen).bfloat16()
    b = torch.randn(channels, device="cuda", generator=gen).bfloat16()
    got = group_norm_kernel.group_norm(x, 32, w, b, 1e-5)
    want = F.group_norm(x.double(), 32, w.double(), b.double(), 1e-5)
    torch_error = (F.group_norm(x, 32, w, b, 1e-5).double() - want).abs().max().item()
    assert got.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert (got.double() - want).abs().max().item() <= 1.01 * torch_error + 1e-5


@torch.inference_mode()
def test_an_eager_channels_last_unet_with_it_stays_within_rounding() -> None:
    unet = make_tiny_components("sd1", seed=0)["unet"].to("cuda", torch.bfloat16).eval()
    fast = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    channel_norm.swap_group_norms(fast, group_norm_kernel.KernelGroupNorm)
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4, 4, 16, 24, device="cuda", generator=gen).bfloat16()
    context = torch.randn(4, 77, 32, device="cuda", generator=gen).bfloat16()
    want = unet(x, 500, encoder_hidden_states=context)[0].float()
    got = fast(x, 500, encoder_hidden_states=context)[0].float()
    gap = (got - want).abs()
    assert gap.mean() < 0.02 and gap.max() < 0.25, (gap.mean(), gap.max())


@pytest.mark.parametrize(("family", "takes_it"), [("sd1", True), ("sdxl", False)])
def test_the_eager_default_gives_sd1_the_kernel_and_channels_last(
    family: str, takes_it: bool, monkeypatch
) -> None:
    """TILEUP_UNET_LAYOUT unset: SD 1.x eager on the GPU runs channels-last with the kernel
    (faster, bench/diffusion/RESULTS.md), SDXL keeps NCHW and PyTorch's GroupNorm."""
    monkeypatch.delenv("TILEUP_UNET_LAYOUT", raising=False)
    monkeypatch.delenv("TILEUP_GROUP_NORM", raising=False)
    unet = make_tiny_components(family, seed=0)["unet"].to("cuda", torch.bfloat16).eval()
    load = LoadOptions(vae=None, prediction="epsilon", prompt="", negative_prompt="")
    assert wants_channels_last(unet, torch.device("cuda"), load) == takes_it
    runnable = _runnable(unet, compiled=False, dynamic_batch=False, graphed=False)
    kinds = {type(m) for m in runnable.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert kinds == ({group_norm_kernel.KernelGroupNorm} if takes_it else {torch.nn.GroupNorm})
    ups = {type(m).__name__ for m in runnable.modules() if "Upsample2D" in type(m).__name__}
    assert ups == {"PhaseUpsample2D"}  # on CUDA, every family's upsamplers fold


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """fp32 convs and matmuls without TF32 for the test; the settings restored after it."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("compiled", [False, True])
def test_phase_upsamplers_leave_the_unets_output_to_rounding(
    compiled: bool, no_tf32, monkeypatch
) -> None:
    """The UNet with its upsamplers as phase convs, eager or compiled by inductor (the
    default; compiled as ``--compile`` builds it, so with per-channel GroupNorms and the
    guidance pair's shared prefix too), against diffusers' plain eager UNet (fp32, no TF32)."""
    monkeypatch.delenv("TILEUP_PHASE_UPSAMPLE", raising=False)
    traced: list[int] = []
    interleaved = upsample_conv._interleaved

    def spy(*args: Any) -> torch.Tensor:
        traced.append(1)
        return interleaved(*args)

    monkeypatch.setattr(upsample_conv, "_interleaved", spy)
    unet = make_tiny_components("sd1", seed=0)["unet"].to("cuda").eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    sample = torch.randn(2, 4, 64, 64, device="cuda", generator=gen)  # 16² at the upsampler
    text = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", generator=gen)
    with torch.inference_mode():
        expected = unet(sample, 500, encoder_hidden_states=text).sample
        if compiled:
            torch._dynamo.reset()
            runnable = _runnable(unet, compiled=True, dynamic_batch=False, graphed=False)
            got = runnable(sample, 500, encoder_hidden_states=text).sample
        else:
            assert upsample_conv.swap_upsamplers(unet) > 0
            got = unet(sample, 500, encoder_hidden_states=text).sample
    ups = {type(m).__name__ for m in unet.modules() if "Upsample2D" in type(m).__name__}
    assert ups == {"PhaseUpsample2D"}
    assert len(traced) == (2 if compiled else 0)  # the 16² and 32² upsamplers, traced once
    scale = expected.abs().max().item()
    assert not torch.equal(got, expected)  # the phase form ran (16² and 32² upsamplers)
    assert (got - expected).abs().max().item() <= 1e-5 * scale

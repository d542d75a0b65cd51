"""The UNet's GPU form (fused QKV, channels-last when compiled with a dynamic batch) computes
the same function."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from sd_fixtures import make_tiny_components
from torch import nn

from tileup.modes.model import LoadOptions, _fast_layout, wants_channels_last


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_layout_keeps_the_unet_function(channels_last: bool) -> None:
    unet = make_tiny_components("sd1", seed=0)["unet"]
    fast = copy.deepcopy(unet)
    _fast_layout(fast, channels_last=channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert fast.conv_in.weight.is_contiguous(memory_format=layout)
    attention = fast.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attention.fused_projections  # one QKV GEMM
    cross = fast.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert attention.to_q is attention.to_k is cross.to_k is None  # no second copy kept
    assert cross.to_q is not None  # the cross-attention's query still runs alone
    params = sum(p.numel() for p in unet.parameters())
    assert sum(p.numel() for p in fast.parameters()) == params  # the same weights, regrouped
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, 32, generator=gen)
    with torch.inference_mode():
        want = unet(x, 10, encoder_hidden_states=context).sample
        got = fast(x, 10, encoder_hidden_states=context).sample
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert float(want.abs().mean()) > 0.01


def test_channels_last_for_the_dynamic_batch_compiled_unet_on_cuda(monkeypatch) -> None:
    """Inductor picks the layout itself for static shapes; eager, the UNet is channels-last
    only with the one-kernel GroupNorm (tests/test_group_norm_kernel.py, tests/gpu)."""
    monkeypatch.setenv("TILEUP_UNET_LAYOUT", "nchw")  # eager: decided without asking the GPU
    base = LoadOptions(vae=None, prediction="epsilon", prompt="", negative_prompt="")
    cuda, cpu, unet = torch.device("cuda"), torch.device("cpu"), nn.Module()
    redraw = replace(base, compile=True, dynamic_batch=True)
    assert wants_channels_last(unet, cuda, redraw)
    assert not wants_channels_last(unet, cpu, redraw)
    assert not wants_channels_last(unet, cuda, replace(base, compile=True))  # fused: static
    assert not wants_channels_last(unet, cuda, replace(base, dynamic_batch=True))  # eager

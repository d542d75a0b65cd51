"""Runs tileup.group_norm_kernel through Triton's interpreter and prints what
tests/test_group_norm_kernel.py asserts, as JSON. A process of its own: the interpreter must be
on before triton is first imported."""

from __future__ import annotations

import json
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch
import torch.nn.functional as F

from tileup import channel_norm, group_norm_kernel


def main() -> None:
    out: dict[str, object] = {}
    gen = torch.Generator().manual_seed(0)
    # odd sizes: partial pixel blocks, groups of 1, 5 and 10 channels, a 1-pixel-wide image
    for b, c, h, w, g in [
        (2, 20, 9, 11, 4),
        (3, 40, 4, 4, 4),
        (1, 32, 1, 70, 32),
        (2, 10, 70, 1, 1),
    ]:
        for layout in ("nchw", "channels_last"):
            x = torch.randn(b, c, h, w, generator=gen) * 3 + 2  # off-centre: tests the M2 merge
            if layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            weight, bias = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
            got = group_norm_kernel.group_norm(x, g, weight, bias, 1e-5)
            want = F.group_norm(x.double(), g, weight.double(), bias.double(), 1e-5)
            kept = got.is_contiguous(memory_format=torch.channels_last) == (layout != "nchw")
            out[f"{b}x{c}x{h}x{w}/{g}/{layout}"] = {
                "error": (got.double() - want).abs().max().item(),
                "torch_error": (F.group_norm(x, g, weight, bias, 1e-5).double() - want)
                .abs()
                .max()
                .item(),
                "layout_kept": bool(kept),
            }
    x = (torch.randn(2, 32, 6, 6, generator=gen) * 2 + 4).bfloat16()
    x = x.to(memory_format=torch.channels_last)
    weight, bias = (
        torch.randn(32, generator=gen).bfloat16(),
        torch.randn(32, generator=gen).bfloat16(),
    )
    got = group_norm_kernel.group_norm(x, 8, weight, bias, 1e-6)
    want = F.group_norm(x.double(), 8, weight.double(), bias.double(), 1e-6)
    torch_bf16 = F.group_norm(x, 8, weight, bias, 1e-6)
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))) - 7)  # bf16's
    out["bf16"] = {
        "dtype": str(got.dtype),
        "ulps": ((got.double() - want).abs() / ulp).max().item(),
        "torch_ulps": ((torch_bf16.double() - want).abs() / ulp).max().item(),
    }
    layer = torch.nn.GroupNorm(4, 20)
    channel_norm.swap_group_norms(layer, group_norm_kernel.KernelGroupNorm)
    x = torch.randn(2, 20, 5, 5, generator=gen).to(memory_format=torch.channels_last)
    out["module"] = {
        "class": type(layer).__name__,
        "error": (layer(x) - F.group_norm(x, 4, layer.weight, layer.bias, layer.eps))
        .abs()
        .max()
        .item(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

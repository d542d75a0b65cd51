"""The eager SD 1.5 UNet (tileup's default, replayed from CUDA graphs) in NCHW against
channels-last, with PyTorch's GroupNorm and with the one-kernel GroupNorm of
:mod:`tileup.group_norm_kernel`, at the fused job's call: 27 tiles at 64² with the guidance
pair sharing its first layers (54 samples). Also each GroupNorm shape of that call alone.

Prints and writes (``--out``) ms per call, the job's UNet seconds (60 calls) and each variant's
largest difference from NCHW with PyTorch's GroupNorm (bf16 rounding); per GroupNorm shape, ms
for PyTorch's and the kernel in each layout and the kernel's error against float64.

    python bench/diffusion/eager_layouts.py --out /tmp/eager_layouts.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: tileup and bench from this checkout
    sys.path.insert(1, str(ROOT))

VARIANTS = {
    "nchw": (False, False),
    "channels_last": (True, False),
    "channels_last_kernel_norm": (True, True),
    "nchw_kernel_norm": (False, True),
}
"""Variant: (channels-last weights, the one-kernel GroupNorm)."""
NORMS = [(320, 64), (640, 32), (1280, 16), (1280, 8)]
"""The UNet's GroupNorm inputs (channels, side) at 64² (32 groups each)."""
CALLS = 60


def main() -> None:
    import torch
    import torch.nn.functional as F

    from bench.diffusion.profile_unet import random_unet
    from bench.diffusion.redraw_unet import gpu_header, median_ms
    from tileup import channel_norm, group_norm_kernel
    from tileup.sampling import shared_prefix
    from tileup.sampling.graphs import GraphedUNet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=27)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result: dict[str, Any] = {**gpu_header(), "tiles": args.tiles, "variants": {}, "norms": {}}
    gen = torch.Generator(device="cuda").manual_seed(0)
    samples = 2 * args.tiles
    for channels, side in NORMS:
        x = torch.randn(samples, channels, side, side, device="cuda", generator=gen) * 2 + 1
        x = x.bfloat16()
        w = torch.randn(channels, device="cuda", generator=gen).bfloat16()
        b = torch.randn(channels, device="cuda", generator=gen).bfloat16()
        entry: dict[str, Any] = {}
        for layout in ("nchw", "channels_last"):
            xl = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x
            want = F.group_norm(xl.double(), 32, w.double(), b.double(), 1e-5)
            runs = {
                "torch": lambda t=xl, w=w, b=b: F.group_norm(t, 32, w, b, 1e-5),
                "kernel": lambda t=xl, w=w, b=b: group_norm_kernel.group_norm(t, 32, w, b, 1e-5),
            }
            for name, run in runs.items():
                got = run()
                entry[f"{layout}_{name}_ms"] = round(median_ms(run, args.repeats), 4)
                entry[f"{layout}_{name}_max_error"] = (got.double() - want).abs().max().item()
        result["norms"][f"{channels}x{side}x{side}"] = entry
        print("norm", channels, side, json.dumps(entry), flush=True)
    x = torch.randn(args.tiles, 4, 64, 64, device="cuda", generator=gen).bfloat16()
    context = torch.randn(samples, 77, 768, device="cuda", generator=gen).bfloat16()
    timestep = torch.tensor(500.0, device="cuda")
    first: torch.Tensor | None = None
    for name, (channels_last, kernel_norm) in VARIANTS.items():
        unet = random_unet(channels_last=channels_last)
        assert shared_prefix.install(unet)
        if kernel_norm:
            channel_norm.swap_group_norms(unet, group_norm_kernel.KernelGroupNorm)
        graphed = GraphedUNet(unet)
        with torch.inference_mode():

            def call(g: Any = graphed) -> Any:
                return g(x, timestep, encoder_hidden_states=context)[0]

            for _ in range(3):  # eager, capture, replay
                out = call()
            ms = median_ms(call, args.repeats)
        out = out.float()
        first = out if first is None else first
        entry = {
            "ms_per_call": round(ms, 3),
            "job_unet_seconds": round(CALLS * ms / 1e3, 3),
            "max_diff_from_nchw": (out - first).abs().max().item(),
            "mean_diff_from_nchw": (out - first).abs().mean().item(),
        }
        result["variants"][name] = entry
        print(name, json.dumps(entry), flush=True)
        graphed.release()
        del unet, graphed
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

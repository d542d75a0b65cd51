"""The compiled crop VAE (a redraw wave's plain VAE passes) in variants of its GroupNorms.

On the full-size SD VAE (random weights, bf16), one crop of ``--crop``² px at a time, as
``--compile`` runs redraw crops: for each variant the compilation seconds, ms per crop of the
encode and the decode, their kernels by kind (``profile_unet.kernel_ms``) and the largest
difference from the first variant's output. Variants: ``inductor`` (what tileup runs),
``chunked`` (:class:`ChunkedGroupNorm` below: the statistics as 8 row bands' means and
variances per group, Chan-merged, so the reductions get 8× the programs), ``looped``
(inductor's persistent reductions off), ``channels`` (:class:`tileup.channel_norm.
ChannelGroupNorm`: per-channel statistics merged per group). Measured on an H200 (2026-11-30,
``results/crop_variants_h200.json``): inductor 5.83 / 11.13 ms per crop (encode / decode),
chunked 6.59 / 11.67, looped 6.00 / 11.51; in a later call (72cee96,
``results/crop_variants_channels_h200.json``) inductor 5.81 / 11.30 against channels 4.65 /
8.80, so tileup's compiled crop VAE takes ``channels``. (A fifth form, the tiled VAE's
statistics kernel and batch-norm affine as one custom op inductor calls but cannot fuse into,
made the whole compiled redraw 2.6 s slower at 8a3dc17 and was dropped: ``bench/vae/README.md``.)

    python bench/vae/crop_variants.py --out bench/vae/results/crop_variants_h200.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CHUNKS = 8
"""Bands of rows per group's statistics (fewer when the height does not divide)."""


def row_chunks(height: int, most: int = CHUNKS) -> int:
    """The most bands up to ``most`` that split ``height`` rows evenly."""
    return next(k for k in range(most, 0, -1) if height % k == 0)


class ChunkedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (affine) whose statistics are merged from row bands (module docstring);
    input N×C×H×W in any memory layout, output in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not self.affine:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        b, c, h, w = x.shape
        g, k = self.num_groups, row_chunks(h)
        xf = x.float()
        var, mean = torch.var_mean(
            xf.view(b, g, c // g, k, h // k, w), dim=(2, 4, 5), correction=0, keepdim=True
        )  # b×g×1×k×1×1: each band's mean and variance
        group_mean = mean.mean(dim=3, keepdim=True)
        group_var = (var + (mean - group_mean) ** 2).mean(dim=3, keepdim=True)  # equal bands
        rstd = torch.rsqrt(group_var + self.eps)
        y = ((xf.view(b, g, c // g, k, h // k, w) - group_mean) * rstd).view(b, c, h, w)
        y = y * self.weight.float()[:, None, None] + self.bias.float()[:, None, None]
        return y.to(x.dtype)


def main() -> None:
    from diffusers import AutoencoderKL

    from bench.diffusion.profile_unet import kernel_ms
    from bench.vae.measure_tiled_vae import SD_VAE
    from bench.vae.profile_vae import seconds
    from tileup.channel_norm import ChannelGroupNorm, with_group_norms
    from tileup.progress import COMPILING
    from tileup.sampling.compiled import compile_module
    from tileup.vae.runner import _Decode, _Encode

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=576)
    parser.add_argument("--variants", default="inductor,chunked,looped,channels")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE).to("cuda", torch.bfloat16).eval()
    x = torch.rand(4, 3, args.crop, args.crop, device="cuda", dtype=torch.bfloat16) * 2 - 1
    z = torch.randn(4, 4, args.crop // 8, args.crop // 8, device="cuda", dtype=torch.bfloat16)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "crop": args.crop,
        "variants": {},
    }
    first: dict[str, torch.Tensor] = {}
    for variant in args.variants.split(","):
        torch._dynamo.reset()
        kinds = {"chunked": ChunkedGroupNorm, "channels": ChannelGroupNorm}
        model = with_group_norms(vae, kinds[variant]) if variant in kinds else vae
        patch = {"triton.persistent_reductions": variant != "looped"}
        entry: dict[str, Any] = {}
        with torch.inference_mode(), torch._inductor.config.patch(patch):
            for name, kind, data in (("encode", _Encode, x), ("decode", _Decode, z)):
                compiled = compile_module(kind(model), dynamic_batch=False)
                before = COMPILING.seconds()
                out = compiled(data[:1]).float()
                torch.cuda.synchronize()
                entry[f"{name}_compile_seconds"] = round(COMPILING.seconds() - before, 1)
                per_crop = seconds(lambda c=compiled, d=data: [c(t[None]) for t in d]) / 4
                entry[f"{name}_ms_per_crop"] = round(per_crop * 1e3, 3)
                entry[f"{name}_kernels_ms"] = kernel_ms(lambda c=compiled, d=data: c(d[:1]))
                reference = first.setdefault(name, out)
                entry[f"{name}_max_diff"] = (out - reference).abs().max().item()
        result["variants"][variant] = entry
        print(variant, json.dumps(entry), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

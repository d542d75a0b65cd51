"""The compiled crop VAE (a redraw wave's plain VAE passes) in variants of its GroupNorms.

On the full-size SD VAE (random weights, bf16), one crop of ``--crop``² px at a time, as
``--compile`` runs redraw crops: for each variant the compilation seconds, ms per crop of the
encode and the decode, their kernels by kind (``profile_vae.kernel_ms``) and the largest
difference from the first variant's output. Variants: ``inductor`` (what tileup ran before),
``chunked`` (:mod:`tileup.vae.chunked_norm`), ``looped`` (inductor's persistent reductions off).

    python bench/vae/crop_variants.py --out bench/vae/results/crop_variants_h200.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def main() -> None:
    from diffusers import AutoencoderKL

    from bench.vae.measure_tiled_vae import SD_VAE
    from bench.vae.profile_vae import kernel_ms, seconds
    from tileup.progress import COMPILING
    from tileup.sampling.compiled import compile_module
    from tileup.vae.chunked_norm import with_chunked_norms
    from tileup.vae.runner import _Decode, _Encode

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=576)
    parser.add_argument("--variants", default="inductor,chunked,looped")
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
        model = with_chunked_norms(vae) if variant == "chunked" else vae
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

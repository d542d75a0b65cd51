"""Measure the context margin each SR model needs for tiled == untiled (max abs diff, fp32).

    python bench/pixel/margin_sweep.py MODEL.safetensors... --size 384 --tile 96
Prints one JSON line per (model, margin).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import tileup.upscalers.models as models
from bench.pixel.bench_pixel import _input
from tileup.upscalers.tiled import RunReport, run_tiled


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--tile", type=int, default=96)
    parser.add_argument("--margins", default="8,16,24,32,40,48,56,64,80,96")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    image = _input(args.size)
    for path in args.models:
        model = models.load_sr_model(path)
        model.descriptor.to(device)
        ref = run_tiled(
            model, image, device=device, dtype=torch.float32, tile=None, report=RunReport()
        )
        for margin in (int(m) for m in args.margins.split(",")):
            models._CONTEXT_MARGIN[model.architecture] = margin
            out = run_tiled(
                model, image, device=device, dtype=torch.float32, tile=args.tile, report=RunReport()
            )
            diff = (out - ref).abs()
            print(
                json.dumps(
                    {
                        "model": Path(path).name,
                        "arch": model.architecture,
                        "margin": margin,
                        "max_diff_255": diff.max().item() * 255,
                        "mean_diff_255": diff.mean().item() * 255,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()

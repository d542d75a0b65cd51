"""Measure: does batching the redraw's independent tiles change the output?

Runs the same redraw job (chess order) with the tile batch chosen from free memory and with
``--tile-batch 1`` (every tile alone, in order) and compares the 8-bit outputs: the largest
difference and the share of values that differ. Batched tiles read and write disjoint crops, so
any difference is float rounding inside kernels that depend on the batch size.

    python bench/diffusion/redraw_batching.py --checkpoint /tmp/sd15 --dtype bf16 fp32
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import cv2
import numpy as np
import torch
from skimage import data

from tileup import Upscaler, UpscaleSettings
from tileup.imageio import read_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    photo = cv2.resize(data.astronaut(), (args.size, args.size), interpolation=cv2.INTER_AREA)
    rows = []
    for dtype in args.dtype:
        outputs, batches = [], []
        for tile_batch in (None, 1):
            settings = UpscaleSettings(
                checkpoint=args.checkpoint,
                scale=args.scale,
                steps=20,
                denoise=0.3,
                seed=1,
                prompt="a photo",
                mode="redraw",
                order="chess",
                dtype=dtype,
                tile_batch=tile_batch,
            )
            result = Upscaler(settings)(read_image(photo, max_pixels=settings.max_pixels))
            outputs.append(np.asarray(result.image).astype(int))
            passes = result.stats.passes[0]
            batches.append(passes["regions"] / passes["batches"])
        diff = np.abs(outputs[0] - outputs[1])
        row = {
            "dtype": dtype,
            "output": list(outputs[0].shape[1::-1]),
            "mean_tiles_per_batch": [round(b, 2) for b in batches],
            "max_diff_8bit": int(diff.max()),
            "share_of_values_differing": float((diff > 0).mean()),
            "share_differing_by_more_than_1": float((diff > 1).mean()),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result = {
        "benchmark": "redraw: batched independent tiles vs one by one",
        "weights": "random (full-size SD1.5 architecture)",
        "device": device,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "runs": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "redraw-batching.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

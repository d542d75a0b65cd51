"""Benchmark: the whole tileup job (pixel upscale + fused tiled re-diffusion) on a full-size
SD1.5 (or SDXL) architecture with random weights (weights do not change speed or memory).

Runs each configuration twice in one process (the first warms up kernels) and reports the
second: seconds per stage, tiles, tile-steps, tile batch and peak device memory. Writes
``results-<family>-<device>.json`` and prints a markdown table.

    python bench/diffusion/make_random_checkpoint.py sd15 /tmp/sd15
    python bench/diffusion/bench_fused.py --checkpoint /tmp/sd15 --size 1024 --runs 2:auto 4:auto
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from skimage import data

from tileup import Upscaler, UpscaleSettings
from tileup.imageio import read_image


def _photo(size: int) -> np.ndarray:
    return cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)


def run(settings: UpscaleSettings, size: int) -> dict[str, Any]:
    picture = read_image(_photo(size), max_pixels=settings.max_pixels)
    engine = Upscaler(settings)
    result = engine(picture)  # warm-up
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    result = engine(picture)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    wall = time.perf_counter() - start
    stats = result.stats.as_dict()
    stats["wall_seconds"] = round(wall, 3)
    assert engine.rediffuser is not None
    stats["tile_batch"] = engine.rediffuser.tile_batch(
        engine.rediffuser.grid(*engine.rediffuser.canvas_size(*result.picture.rgb.shape[:2]))
    )
    stats["dtype"] = str(engine.rediffuser.dtype)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--family", default="sd15")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--scale", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--tile-batch", type=int, nargs="+", default=[0, 1], help="0 = auto")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    rows = []
    for scale in args.scale:
        for batch in args.tile_batch:
            settings = UpscaleSettings(
                checkpoint=args.checkpoint,
                scale=scale,
                steps=args.steps,
                denoise=0.3,
                seed=1,
                tile=args.tile,
                tile_batch=batch or None,
                prompt="a photo",
            )
            row = run(settings, args.size)
            row.update({"scale": scale, "requested_tile_batch": batch or "auto"})
            rows.append(row)
            print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result = {
        "benchmark": "fused re-diffusion, whole job",
        "family": args.family,
        "weights": "random (full-size architecture from tileup's shipped configs)",
        "input": f"{args.size}x{args.size}",
        "steps": args.steps,
        "denoise": 0.3,
        "tile": args.tile,
        "device": device,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "runs": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "cuda" if torch.cuda.is_available() else "cpu"
    (out / f"results-{args.family}-{slug}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"### {result['family']} ({result['weights']}), {result['input']} input, "
        f"{result['steps']} steps, denoise {result['denoise']}, tile {result['tile']}, "
        f"{result['device']}, torch {result['torch']}, {result['date']}",
        "",
        "| output | tile batch | tiles | tile-steps | pixel s | encode s | diffusion s | "
        "decode s | total s | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        s = r["seconds"]
        lines.append(
            f"| {r['output_size'][0]}x{r['output_size'][1]} | {r['tile_batch']} "
            f"({r['requested_tile_batch']}) | {r['tiles']} | {r['tile_steps']} | "
            f"{s.get('pixel_upscale', 0):.2f} | {s.get('vae_encode', 0):.2f} | "
            f"{s.get('diffusion', 0):.2f} | {s.get('vae_decode', 0):.2f} | "
            f"{r['wall_seconds']:.2f} | "
            f"{r['peak_memory_bytes'] / 2**30:.2f} GiB |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

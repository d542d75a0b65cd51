"""Benchmark: the whole tileup job (pixel upscale + tiled re-diffusion, fused or redraw, with or
without a seam fix) on a full-size SD1.5 (or SDXL) architecture with random weights (weights do
not change speed or memory).

Each configuration gets one engine (models loaded once), a warm-up job on a small picture that
gives a 1024² output (the same tile and crop shapes), then the measured job: seconds per stage,
tiles, tile-steps, passes, tile batch and peak device memory. Writes
``results-<family>-<device>[-<tag>].json`` and prints a markdown table.

    python bench/diffusion/make_random_checkpoint.py sd15 /tmp/sd15
    python bench/diffusion/bench_job.py --checkpoint /tmp/sd15 --size 1024 --scale 2 4
    python bench/diffusion/bench_job.py --checkpoint /tmp/sd15 --mode redraw --order chess \
        --seam-fix none half-tile+intersections --tag redraw
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
    warm_size = max(64, round(1024 / settings.scale))
    engine(read_image(_photo(warm_size), max_pixels=settings.max_pixels))  # warm-up
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    result = engine(picture)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    wall = time.perf_counter() - start
    stats = result.stats.as_dict()
    stats["wall_seconds"] = round(wall, 3)
    model = engine.model
    assert model is not None
    if settings.mode == "fused":
        from tileup.modes.fused import fused_grid
        from tileup.options import fused_options

        h, w = model.canvas_size(*result.picture.rgb.shape[:2])
        grid = fused_grid(model.factor, h, w, fused_options(settings))
        stats["tile_batch"] = model.tile_batch(
            grid.tile_height, grid.tile_width, len(grid), settings.tile_batch
        )
    else:
        stats["tile_batch"] = max(p["regions"] / p["batches"] for p in stats["passes"][:1])
    stats["dtype"] = str(model.dtype)
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
    parser.add_argument("--mode", nargs="+", default=["fused"], choices=["fused", "redraw"])
    parser.add_argument("--order", default="linear", choices=["linear", "chess"])
    parser.add_argument("--seam-fix", nargs="+", default=["none"])
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    rows = []
    configs = [
        (mode, seam_fix, scale, batch)
        for mode in args.mode
        for seam_fix in args.seam_fix
        for scale in args.scale
        for batch in args.tile_batch
    ]
    for mode, seam_fix, scale, batch in configs:
        settings = UpscaleSettings(
            checkpoint=args.checkpoint,
            scale=scale,
            steps=args.steps,
            denoise=0.3,
            seed=1,
            tile=args.tile,
            tile_batch=batch or None,
            prompt="a photo",
            mode=mode,
            order=args.order,
            seam_fix=seam_fix,
        )
        row = run(settings, args.size)
        row.update(
            {
                "scale": scale,
                "requested_tile_batch": batch or "auto",
                "mode": mode,
                "order": args.order if mode == "redraw" else None,
                "seam_fix": seam_fix,
            }
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result = {
        "benchmark": "re-diffusion, whole job",
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
    tag = f"-{args.tag}" if args.tag else ""
    (out / f"results-{args.family}-{slug}{tag}.json").write_text(
        json.dumps(result, indent=2) + "\n"
    )
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"### {result['family']} ({result['weights']}), {result['input']} input, "
        f"{result['steps']} steps, denoise {result['denoise']}, tile {result['tile']}, "
        f"{result['device']}, torch {result['torch']}, {result['date']}",
        "",
        "| output | mode | seam fix | tile batch | tiles | tile-steps | seam-fix jobs | pixel s "
        "| encode s | diffusion s | decode s | redraw s | seam fix s | total s | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        s = r["seconds"]
        mode = r.get("mode", "fused") + (f" ({r['order']})" if r.get("order") else "")
        lines.append(
            f"| {r['output_size'][0]}x{r['output_size'][1]} | {mode} | {r.get('seam_fix', 'none')} "
            f"| {r['tile_batch']:g} ({r['requested_tile_batch']}) | {r['tiles']} "
            f"| {r['tile_steps']} | {r.get('seam_fix_jobs', 0)} "
            f"| {s.get('pixel_upscale', 0):.2f} | {s.get('vae_encode', 0):.2f} "
            f"| {s.get('diffusion', 0):.2f} | {s.get('vae_decode', 0):.2f} "
            f"| {s.get('redraw', 0):.2f} | {s.get('seam_fix', 0):.2f} "
            f"| {r['wall_seconds']:.2f} | {r['peak_memory_bytes'] / 2**30:.2f} GiB |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

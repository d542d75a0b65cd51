"""Benchmark: tiled vs untiled spandrel inference of an SR model on the same input, in one run.

Each configuration runs in a fresh subprocess so that peak memory (CUDA allocator peak, or the
process's peak RSS on CPU) belongs to it alone. Writes ``results-<device>.json`` and appends a
markdown table to ``RESULTS.md`` in ``--out``.

    python bench/pixel/bench_pixel.py --model RealESRGAN_x4plus.safetensors --size 1024
    python bench/pixel/bench_pixel.py --model ... --device cpu --size 256 --tile 128
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tileup.upscalers.models import load_sr_model
from tileup.upscalers.tiled import RunReport, auto_tile_size, run_tiled

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _input(size: int) -> torch.Tensor:
    """A real photo (skimage astronaut), resized to size×size, as 1×3×H×W float32."""
    import cv2
    from skimage import data

    photo = cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(photo.astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Time one configuration in this process; returns its measurements."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = load_sr_model(args.model)
    model.descriptor.to(device=device, dtype=dtype)
    image = _input(args.size)
    tile: int | None
    if args.mode == "untiled":
        tile = None
    elif args.tile:
        tile = args.tile
    else:
        tile = auto_tile_size(model, device, dtype)
    times, report, out = [], RunReport(), None
    for i in range(args.repeats + 1):  # first run warms up cuDNN and the allocator
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            if i == 1:
                torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        report = RunReport()
        if args.mode == "untiled":  # plain spandrel inference, the whole image in one piece
            with torch.inference_mode():
                x = image.to(device=device, dtype=dtype)
                out = model.descriptor(x).float().clamp_(0, 1).cpu()
            report.tiles = 1
        else:
            out = run_tiled(model, image, device=device, dtype=dtype, tile=tile, report=report)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0 or args.repeats == 0:
            times.append(time.perf_counter() - start)
    assert out is not None
    if args.save:
        torch.save(out, args.save)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
    else:
        peak = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "mode": args.mode,
        "tile": tile,
        "tiles": report.tiles,
        "margin": model.context_margin,
        "seconds_median": statistics.median(times),
        "seconds_all": times,
        "peak_memory_bytes": peak,
        "peak_reserved_bytes": reserved,
        "fallbacks": report.fallbacks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES))
    parser.add_argument("--size", type=int, default=1024, help="input side in pixels")
    parser.add_argument("--tile", type=int, default=None, help="force the tiled run's core size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--mode", choices=["tiled", "untiled"], help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    if args.mode:  # child process
        print(json.dumps(run_one(args)))
        return

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, outputs = [], {}
    for mode in ("untiled", "tiled"):
        save = out_dir / f".{mode}.pt"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--save", str(save)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["failed"]
            rows.append({"mode": mode, "error": tail[0]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        outputs[mode] = torch.load(save)
        save.unlink()
    if len(outputs) == 2:
        diff = (outputs["tiled"] - outputs["untiled"]).abs().max().item()
        rows[-1]["max_abs_diff_vs_untiled"] = diff
        rows[-1]["max_abs_diff_vs_untiled_255"] = diff * 255
    device_name = (
        torch.cuda.get_device_name(torch.device(args.device))
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()} CPU"
    )
    result = {
        "benchmark": "pixel",
        "model": Path(args.model).name,
        "input": f"{args.size}x{args.size}",
        "scale": 4,
        "device": device_name,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "threads": torch.get_num_threads(),
        "runs": rows,
    }
    slug = "cuda" if args.device.startswith("cuda") else "cpu"
    (out_dir / f"results-{slug}-{args.size}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    """A short table of one result set."""
    lines = [
        f"### {result['model']}, {result['input']} → ×{result['scale']}, {result['device']}, "
        f"{result['dtype']}, torch {result['torch']}, {result['date']}",
        "",
        "| run | tile (input px) | tiles | median s | peak memory | max diff vs untiled |",
        "|---|---|---|---|---|---|",
    ]
    base = next(
        (r for r in result["runs"] if r.get("mode") == "untiled" and "error" not in r), None
    )
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | — | — | failed: {r['error']} | — | — |")
            continue
        ratio = f" ({r['seconds_median'] / base['seconds_median']:.2f}×)" if base else ""
        diff = r.get("max_abs_diff_vs_untiled_255")
        lines.append(
            f"| {r['mode']} | {r['tile'] or 'whole'} | {r['tiles']} | "
            f"{r['seconds_median']:.3f}{ratio} | {r['peak_memory_bytes'] / 2**30:.2f} GiB | "
            f"{'—' if diff is None else f'{diff:.2f}/255'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

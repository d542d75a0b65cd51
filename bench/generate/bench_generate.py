"""txt2img with hires fix to 4K on the GPU: seconds per pass and peak device memory, on the full
SD 1.5 architecture with random weights (weights do not change speed or memory).

    python bench/generate/bench_generate.py --checkpoint /tmp/sd15 [--vram 8] [--out DIR]

Jobs: 512² first pass (20 steps, Euler a, CFG 7), then hires fix ×8 → 4096² with the "Latent"
upscaler (no VAE round trip) and with a pixel upscale (lanczos), denoise 0.5, 20 steps, fused
tiles of 512/64. Each job runs once to warm up and once measured, in this process. Writes
``generate.json`` and ``generate.md`` (the device, the date, the numbers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from tileup.txt2img import GenerateSettings, Generator

JOBS = {
    "latent_x8": {"hr_upscaler": "Latent", "hr_scale": 8.0},
    "lanczos_x8": {"hr_upscaler": "lanczos", "hr_scale": 8.0},
    "no_hires": {"hires_fix": False},
}


def _ballast(vram_gib: float | None) -> torch.Tensor | None:
    """Leave ``vram_gib`` GiB free on the device (a card of that size), or None."""
    if vram_gib is None:
        return None
    free, _ = torch.cuda.mem_get_info()
    extra = free - int(vram_gib * 2**30)
    return torch.empty(max(extra, 0), dtype=torch.uint8, device="cuda")


def run(checkpoint: str, job: str, vram: float | None, ballast_bytes: int) -> dict:
    settings = GenerateSettings.from_mapping(
        {
            "prompt": "a castle on a hill, (detailed:1.2)",
            "checkpoint": checkpoint,
            "seed": 1,
            "steps": 20,
            "denoise": 0.5,
            "dtype": "bf16",
            **JOBS[job],
        }
    )
    generator = Generator(settings)
    generator.generate_one(1)  # warm-up: kernels, allocator, cuDNN choices
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    image = generator.generate_one(2)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "job": job,
        "vram_gib": vram,
        "seconds": round(seconds, 2),
        "first_pass_seconds": image.first_pass.stats.seconds,
        "second_pass_seconds": image.final.stats.seconds,
        "output_size": list(image.final.stats.output_size),
        "peak_allocated_gib": round((torch.cuda.max_memory_allocated() - ballast_bytes) / 2**30, 2),
        "memory_plan": image.final.stats.memory_plan,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--vram", type=float, default=None, help="emulate a card of this size")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    ballast = _ballast(args.vram)
    held = 0 if ballast is None else ballast.numel()
    records = [run(args.checkpoint, job, args.vram, held) for job in args.jobs.split(",")]
    del ballast
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "generate.json"
    old = json.loads(path.read_text()) if path.is_file() else {"records": []}
    old["records"] = [
        r
        for r in old["records"]
        if (r["job"], r["vram_gib"]) not in {(job, args.vram) for job in args.jobs.split(",")}
    ]  # re-measured
    result = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "records": old["records"] + records,
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Generate with hires fix ({result['date']}, {result['device']})",
        "",
        "SD 1.5 architecture, random weights, bf16; 512² first pass, 20 steps Euler a, CFG 7;"
        " hires ×8 to 4096², denoise 0.5, 20 steps, fused tiles 512/64. One warm-up run, then"
        " one measured.",
        "",
        "| job | card | seconds | first pass | second pass (stages) | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["records"]:
        card = "whole GPU" if r["vram_gib"] is None else f"{r['vram_gib']:g} GiB"
        first = sum(r["first_pass_seconds"].values())
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["second_pass_seconds"].items() if v)
        lines.append(
            f"| {r['job']} | {card} | {r['seconds']} | {first:.1f} | {stages} |"
            f" {r['peak_allocated_gib']} |"
        )
    (args.out / "generate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Benchmark: CPU precision of the re-diffusion job — fp32, bf16 weights, bf16 autocast.

Variants (one engine each, models loaded once):

- ``fp32``: ``dtype="fp32"`` (today's CPU default).
- ``bf16``: ``dtype="bf16"``: UNet, text encoders and the VAE runner's copy in bf16.
- ``autocast``: the fp32 engine with its UNet wrapped so that its forward runs under
  ``torch.autocast("cpu", dtype=torch.bfloat16)`` (fp32 weights, VAE in fp32).
- ``autocast-all``: the fp32 engine with the whole job (UNet and VAE) under that autocast.

Every variant runs the measured job ``--repeats`` times: the first run is checked against the
later ones for identical bytes (determinism); the timing is that of the last run. With
``--warm-size`` a small job (64² → 256² by default) runs first as a warm-up. Each output
(float32 H×W×3) is compared with the fp32 one: max / mean absolute difference in 1/255, share
of pixels off by more than 2/255, finiteness. ``--ops`` first times the UNet's main kernels
(3×3 conv, linear, attention, GroupNorm) in fp32 and bf16. Writes
``results/cpu-<date>[-<tag>].json`` and prints a markdown table.

    python bench/diffusion/make_random_checkpoint.py sd15 /tmp/sd15
    python bench/cpu/bench_cpu.py --checkpoint /tmp/sd15 --ops --size 16 --steps 1 \
        --variants fp32 autocast bf16 autocast-all --repeats 2 --warm-size 0 --tag tiny
    python bench/cpu/bench_cpu.py --checkpoint /tmp/sd15 --size 256 --steps 1 \
        --variants fp32 --repeats 1 --tag job
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from skimage import data
from torch import nn

from tileup import Upscaler, UpscaleSettings
from tileup.imageio import read_image

VARIANTS = ("fp32", "bf16", "autocast", "autocast-all")


class AutocastUNet(nn.Module):
    """Runs ``unet``'s forward under CPU bf16 autocast; ``parameters()`` are the fp32 ones, so
    tileup keeps feeding it fp32 latents and reads back (autocast's bf16) predictions."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.inner = unet

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(*args, **kwargs)


def _photo(size: int) -> np.ndarray:
    return cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)


def _cpu_model() -> dict[str, Any]:
    """CPU model name and the precision-relevant flags from lscpu."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")
    return {
        "model": fields.get("Model name", platform.processor()).strip(),
        "cpus": int(fields.get("CPU(s)", "0").strip() or 0),
        "flags": {f: f in flags for f in wanted},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


@torch.inference_mode()
def time_ops() -> dict[str, dict[str, float]]:
    """Seconds per call of the SD 1.5 UNet's main kernels at its 64² level (batch 2 = CFG)."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 320, 64, 64), torch.randn(320, 320, 3, 3)
    a, lw = torch.randn(2 * 4096, 320), torch.randn(1280, 320)
    q = torch.randn(2, 8, 4096, 40)
    result: dict[str, dict[str, float]] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        xx, ww, aa, ll, qq = (t.to(dtype) for t in (x, w, a, lw, q))
        ops: dict[str, Callable[[], Any]] = {
            "conv3x3_320ch_64sq": lambda xx=xx, ww=ww: F.conv2d(xx, ww, padding=1),
            "linear_8192x320x1280": lambda aa=aa, ll=ll: F.linear(aa, ll),
            "sdpa_8heads_4096tok": lambda qq=qq: F.scaled_dot_product_attention(qq, qq, qq),
            "group_norm_320ch_64sq": lambda xx=xx: F.group_norm(xx, 32),
        }
        result[name] = {k: round(_timed(f, 1), 4) for k, f in ops.items()}
        print(name, result[name], flush=True)
    return result


def _engine(variant: str, args: argparse.Namespace) -> Upscaler:
    settings = UpscaleSettings(
        checkpoint=args.checkpoint,
        device="cpu",
        dtype="bf16" if variant == "bf16" else "fp32",
        upscaler=args.upscaler,
        scale=args.scale,
        steps=args.steps,
        denoise=args.denoise,
        tile=args.tile,
        overlap=args.overlap,
        mode="fused",
        seed=args.seed,
        cfg=args.cfg,
        sampler=args.sampler,
    )
    engine = Upscaler(settings)
    if variant == "autocast":
        assert engine.model is not None
        engine.model.unet = AutocastUNet(engine.model.unet)  # type: ignore[assignment]
    return engine


@contextlib.contextmanager
def _job_context(variant: str) -> Iterator[None]:
    if variant == "autocast-all":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def _diff(rgb: np.ndarray, ref: np.ndarray | None) -> dict[str, Any]:
    out: dict[str, Any] = {"finite": bool(np.isfinite(rgb).all())}
    if ref is None:
        return out
    d = np.abs(rgb.astype(np.float64) - ref.astype(np.float64)) * 255
    out["max_abs_255"] = round(float(d.max()), 3)
    out["mean_abs_255"] = round(float(d.mean()), 4)
    out["share_over_2_255"] = round(float((d.max(axis=-1) > 2).mean()), 5)
    return out


def run_variant(variant: str, args: argparse.Namespace) -> tuple[dict[str, Any], np.ndarray]:
    """Build the engine, warm up, run the measured job ``repeats`` times; (record, last rgb)."""
    max_pixels = 16384**2
    start = time.perf_counter()
    engine = _engine(variant, args)
    record: dict[str, Any] = {"load_seconds": round(time.perf_counter() - start, 2)}
    with _job_context(variant):
        if args.warm_size:
            start = time.perf_counter()
            engine(read_image(_photo(args.warm_size), max_pixels=max_pixels))
            record["warmup_seconds"] = round(time.perf_counter() - start, 2)
        picture = read_image(_photo(args.size), max_pixels=max_pixels)
        runs, digests, first = [], [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = engine(picture)
            wall = time.perf_counter() - start
            rgb = np.ascontiguousarray(result.picture.rgb, dtype=np.float32)
            first = rgb if first is None else first
            digests.append(hashlib.sha256(rgb.tobytes()).hexdigest()[:16])
            stats = result.stats.as_dict()
            runs.append(
                {
                    "wall_seconds": round(wall, 2),
                    "seconds": stats["seconds"],
                    "fallbacks": stats["fallbacks"],
                }
            )
            print(variant, runs[-1], flush=True)
    assert first is not None
    record.update(
        runs=runs,
        seconds=runs[-1]["seconds"],
        wall_seconds=runs[-1]["wall_seconds"],
        tiles=stats["tiles"],
        tile_steps=stats["tile_steps"],
        output_size=stats["output_size"],
        sha256_16=digests,
        deterministic=len(set(digests)) == 1 if len(digests) > 1 else None,
        first_vs_last_max_abs_255=round(float(np.abs(first - rgb).max()) * 255, 3),
    )
    return record, rgb


def _table(variants: dict[str, dict[str, Any]]) -> str:
    stages = sorted({k for v in variants.values() for k in v["seconds"]})
    head = ["variant", *stages, "wall", "max|Δ|·255", "mean|Δ|·255", ">2/255", "finite", "det."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in variants.items():
        d = v["diff_vs_fp32"]
        cells = [name, *(f"{v['seconds'].get(s, 0):.1f}" for s in stages), f"{v['wall_seconds']}"]
        cells += [
            str(d.get("max_abs_255", "—")),
            str(d.get("mean_abs_255", "—")),
            str(d.get("share_over_2_255", "—")),
            str(d["finite"]),
            str(v["deterministic"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--variants", nargs="+", default=["fp32", "autocast", "bf16"])
    parser.add_argument("--size", type=int, default=256, help="input side (square photo)")
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--denoise", type=float, default=0.3)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--upscaler", default="lanczos")
    parser.add_argument("--repeats", type=int, default=2, help="measured runs (≥2: determinism)")
    parser.add_argument("--warm-size", type=int, default=64, help="warm-up input side; 0: none")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ops", action="store_true", help="time fp32/bf16 kernels first")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    torch.set_num_threads(args.threads)

    today = datetime.date.today().isoformat()
    report: dict[str, Any] = {
        "date": today,
        "device": _cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "job": {
            k: getattr(args, k)
            for k in (
                "size",
                "scale",
                "steps",
                "denoise",
                "tile",
                "overlap",
                "seed",
                "cfg",
                "sampler",
                "upscaler",
                "repeats",
                "warm_size",
            )
        }
        | {"mode": "fused", "checkpoint": "SD1.5 architecture, random weights"},
    }
    if args.ops:
        report["ops_seconds"] = time_ops()
    ref: np.ndarray | None = None
    variants: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        record, rgb = run_variant(variant, args)
        if variant == "fp32":
            ref = rgb
        record["diff_vs_fp32"] = _diff(rgb, ref)
        variants[variant] = record
        report["variants"] = variants
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        suffix = f"-{args.tag}" if args.tag else ""
        path = out / f"cpu-{today}{suffix}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")  # after every variant
    print(path)
    print(_table(variants))


if __name__ == "__main__":
    main()

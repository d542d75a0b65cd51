"""Where two GPUs idle during the fused diffusion stage: a profiled run of ``sample_fused`` alone.

Loads a checkpoint folder (``bench/gpu.py prepare`` writes random SD 1.5 ones) on every GPU
(``--device``), samples a 1×4×512×512 canvas (``--latent``; the 4096² reference job's latents:
81 tiles, 20 steps of Euler a at denoise 0.3, CFG 7) once to warm up, times it with the replicas set
aside (one GPU) and with them, then profiles one more run with every lane and writes the
chrome trace (gzipped) plus a summary: each device's busy time and its gaps over 1 ms, with
the host's CPU ops running meanwhile.

    python bench/diffusion/lane_trace.py --checkpoint /tmp/tileup-bench/sd15 --out /tmp/lanes
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tileup import Upscaler, UpscaleSettings
    from tileup.modes.fused import sample_fused
    from tileup.modes.model import DiffusionReport
    from tileup.options import fused_options

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--device", default="cuda:0,cuda:1")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--latent", type=int, default=512, help="canvas side in latent px")
    args = parser.parse_args()
    settings = UpscaleSettings(
        checkpoint=args.checkpoint, upscaler="lanczos", scale=4, steps=args.steps, denoise=0.3,
        cfg=7.0, sampler="Euler a", prompt="a photo", seed=1, tile=512, overlap=64,
        device=args.device,
    )  # fmt: skip
    engine = Upscaler(settings)
    model = engine.model
    assert model is not None
    side = args.latent
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))

    def run() -> float:
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)
        start = time.perf_counter()
        sample_fused(
            model, latents, seed=1, denoise=0.3, options=fused_options(settings),
            report=DiffusionReport(seed=1),
        )  # fmt: skip
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)
        return time.perf_counter() - start

    result: dict[str, Any] = {"devices": args.device, "steps": args.steps}
    run()
    replicas = model.replicas
    model.replicas = ()
    run()
    result["one_gpu_seconds"] = round(run(), 3)
    model.replicas = replicas
    result["lanes_seconds"] = round(run(), 3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result["profiled_seconds"] = round(run(), 3)
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "lanes_trace.json"
    prof.export_chrome_trace(str(raw))
    with raw.open("rb") as src, gzip.open(args.out / "lanes_trace.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    result.update(_gaps(prof))
    (args.out / "lanes_summary.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "gaps"}, indent=1))


def _gaps(prof: Any) -> dict[str, Any]:
    """Per device: busy seconds (union of kernel and copy intervals), the span, and the gaps
    over 1 ms, each with the host ops that started during it (most frequent first)."""
    import torch

    device_events: dict[int, list[tuple[float, float]]] = {}
    host: list[tuple[float, str]] = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            start = e.time_range.start
            device_events.setdefault(e.device_index, []).append((start, e.time_range.end))
        elif e.name.startswith("aten::") or "cuda" in e.name.lower():
            host.append((e.time_range.start, e.name))
    out: dict[str, Any] = {"busy_seconds": {}, "span_seconds": {}, "gaps": {}}
    for device, spans in sorted(device_events.items()):
        spans.sort()
        merged: list[list[float]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        out["busy_seconds"][device] = round(sum(e - s for s, e in merged) / 1e6, 3)
        out["span_seconds"][device] = round((merged[-1][1] - merged[0][0]) / 1e6, 3)
        gaps = []
        for (_, end), (start, _) in itertools.pairwise(merged):
            if start - end > 1000:
                names: dict[str, int] = {}
                for t, name in host:
                    if end <= t < start:
                        names[name] = names.get(name, 0) + 1
                top = sorted(names.items(), key=lambda kv: -kv[1])[:6]
                gaps.append({"at_ms": round((end - merged[0][0]) / 1e3, 1),
                             "ms": round((start - end) / 1e3, 1), "host_ops": top})  # fmt: skip
        out["gaps"][device] = gaps
        out[f"gap_total_seconds_{device}"] = round(sum(g["ms"] for g in gaps) / 1e3, 3)
    return out


if __name__ == "__main__":
    main()

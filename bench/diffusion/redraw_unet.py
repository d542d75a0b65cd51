"""The redraw's UNet calls compiled with a dynamic batch against one static compilation per
batch, each replayed from CUDA graphs as the job runs them.

A linear redraw of the reference job (64 crops of 576², 72² latents) runs 22 waves of 1 to 4
crops, 2 to 8 samples with CFG: 4 waves each of 1, 2 and 3 crops and 10 of 4, 20 UNet calls a
wave. ``--compile`` compiles the UNet once with its batch dynamic (channels-last weights, as
the job does since 0a2fa8c); the alternative is one static compilation per batch size. This
prints and writes (``--out``) ms per call for each batch and mode, the compilation seconds
and the UNet seconds of the job's 440 calls either way.

    python bench/diffusion/redraw_unet.py --out /tmp/redraw_unet.json [--batches 2,4,6,8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

WAVES = {2: 4, 4: 4, 6: 4, 8: 10}
"""Waves of the reference job's linear redraw per UNet batch (samples, CFG doubled)."""

STEPS = 20


def gpu_header() -> dict[str, Any]:
    """What every UNet benchmark's JSON opens with: the GPU, torch's version, the date."""
    import torch

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def median_ms(call: Any, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls of ``call``, each waited for on the GPU."""
    import torch

    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    import torch

    from bench.diffusion.profile_unet import random_unet
    from tileup.sampling.compiled import compile_module
    from tileup.sampling.graphs import GraphedUNet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="2,4,6,8")
    parser.add_argument("--side", type=int, default=72, help="latent side (576² crops: 72)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--modes", default="dynamic,static")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    device = torch.device("cuda")
    unet = random_unet(channels_last=True)
    timestep = torch.tensor(500.0)

    def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = torch.randn(batch, 4, args.side, args.side, device=device, dtype=torch.bfloat16)
        context = torch.randn(batch, 77, 768, device=device, dtype=torch.bfloat16)
        return sample, context

    def ms_per_call(module: Any, batch: int) -> float:
        sample, context = inputs(batch)
        with torch.inference_mode():
            for _ in range(3):  # compile, capture, replay
                module(sample, timestep, encoder_hidden_states=context)
            return median_ms(
                lambda: module(sample, timestep, encoder_hidden_states=context), args.repeats
            )

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "latent": args.side,
        "waves": WAVES,
        "modes": {},
    }
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        start = time.perf_counter()
        per_batch: dict[int, float] = {}
        if mode == "dynamic":
            graphed = GraphedUNet(compile_module(unet, dynamic_batch=True))
            for b in batches:
                per_batch[b] = ms_per_call(graphed, b)
            graphed.release()
        else:  # dynamic=False: every new batch compiles statically (never a dynamic kernel)
            graphed = GraphedUNet(torch.compile(unet, dynamic=False))
            for b in batches:
                per_batch[b] = ms_per_call(graphed, b)
            graphed.release()
        entry = {
            "ms_per_call": {str(b): round(v, 3) for b, v in per_batch.items()},
            "wall_seconds_with_compilation": round(time.perf_counter() - start, 1),
            "job_unet_seconds": round(
                sum(STEPS * WAVES.get(b, 0) * v for b, v in per_batch.items()) / 1e3, 3
            ),
        }
        result["modes"][mode] = entry
        print(mode, json.dumps(entry), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

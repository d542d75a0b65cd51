"""The compiled SD 1.5 UNet with inductor's GroupNorm against per-channel statistics
(:class:`tileup.channel_norm.ChannelGroupNorm`), at the reference jobs' shapes, each call
replayed from CUDA graphs as the jobs run it.

``fused``: 54 samples at 64² (27 tiles of 512², CFG doubled), compiled statically with NCHW
weights (inductor picks channels-last itself); the fused job makes 60 such calls. ``redraw``:
2, 4, 6 and 8 samples at 72² (576² crops), compiled once with the batch dynamic and
channels-last weights; the linear redraw makes 440 calls (``redraw_unet.WAVES``). Prints and
writes (``--out``) ms per call, the job's UNet seconds, the compilation seconds and the largest
difference of each variant's output from inductor's GroupNorm.

    python bench/diffusion/unet_norms.py --out /tmp/unet_norms.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: tileup and bench from this checkout
    sys.path.insert(1, str(ROOT))

CASES = {
    "fused": (64, {54: 60}, False),
    "fused_batches": (64, {54: 60, 82: 40, 162: 20}, False),
    "redraw": (72, None, True),
}
"""Case: latent side, {samples: calls in the job} (None: the redraw's waves), dynamic batch.
``fused_batches``: the reference job's 81 tiles in 3, 2 (41 + 40, timed as 41) or 1 call a
step, each shape compiled statically."""


def main() -> None:
    import torch

    from bench.diffusion.profile_unet import random_unet
    from bench.diffusion.redraw_unet import STEPS, WAVES, gpu_header, median_ms
    from tileup.channel_norm import with_group_norms
    from tileup.sampling.compiled import compile_module
    from tileup.sampling.graphs import GraphedUNet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="fused,redraw")
    parser.add_argument("--variants", default="inductor,channels")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    timestep = torch.tensor(500.0)
    result: dict[str, Any] = {**gpu_header(), "cases": {}}
    for case in args.cases.split(","):
        side, calls, dynamic = CASES[case]
        calls = calls or {samples: STEPS * waves for samples, waves in WAVES.items()}
        unet = random_unet(channels_last=dynamic)
        gen = torch.Generator(device="cuda").manual_seed(0)
        inputs = {
            b: (
                torch.randn(b, 4, side, side, device="cuda", generator=gen).bfloat16(),
                torch.randn(b, 77, 768, device="cuda", generator=gen).bfloat16(),
            )
            for b in calls
        }
        first: dict[int, torch.Tensor] = {}
        entries: dict[str, Any] = {}
        for variant in args.variants.split(","):
            torch._dynamo.reset()
            model = with_group_norms(unet) if variant == "channels" else unet
            graphed = GraphedUNet(compile_module(model, dynamic_batch=dynamic))
            start = time.perf_counter()
            per_call: dict[int, float] = {}
            diff = 0.0
            with torch.inference_mode():
                for b, (sample, context) in inputs.items():
                    for _ in range(3):  # compile, capture, replay
                        out = graphed(sample, timestep, encoder_hidden_states=context)[0]
                    reference = first.setdefault(b, out.float().clone())
                    diff = max(diff, (out.float() - reference).abs().max().item())
                    per_call[b] = median_ms(
                        lambda g=graphed, x=sample, c=context: g(
                            x, timestep, encoder_hidden_states=c
                        ),
                        args.repeats,
                    )
            graphed.release()
            entries[variant] = {
                "ms_per_call": {str(b): round(v, 3) for b, v in per_call.items()},
                "job_unet_seconds": round(sum(calls[b] * v for b, v in per_call.items()) / 1e3, 3),
                "seconds_per_batch": {
                    str(b): round(calls[b] * v / 1e3, 3) for b, v in per_call.items()
                },
                "wall_seconds_with_compilation": round(time.perf_counter() - start, 1),
                "max_diff_from_first": diff,
            }
            print(case, variant, json.dumps(entries[variant]), flush=True)
        result["cases"][case] = {"latent": side, "calls": calls, "variants": entries}
        del unet
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

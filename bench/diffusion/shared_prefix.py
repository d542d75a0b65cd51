"""Guidance pairs sharing the SD 1.5 UNet's first layers (:mod:`tileup.sampling.shared_prefix`)
against the plain call on the doubled batch, at the reference jobs' shapes, each call replayed
from CUDA graphs as the jobs run it.

``fused``: 27 tiles at 64² (54 samples with CFG), the fused job's 60 calls; ``redraw``: 1 to 4
crops at 72² (2 to 8 samples), the linear redraw's waves (``redraw_unet.WAVES``), batch
dynamic and channels-last weights as redraw compiles them. ``eager`` and ``compiled`` (inductor)
UNets; each variant's output against the plain one's (kernel rounding). Prints and writes
(``--out``) ms per call and the job's UNet seconds.

    python bench/diffusion/shared_prefix.py --out /tmp/shared_prefix.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: tileup and bench from this checkout
    sys.path.insert(1, str(ROOT))

CASES = {"fused": (64, {27: 60}, False), "redraw": (72, None, True)}
"""Case: latent side, {latents a call (half the samples): calls in the job} (None: the redraw's
waves), dynamic batch."""


def main() -> None:
    import torch

    from bench.diffusion.profile_unet import random_unet
    from bench.diffusion.redraw_unet import STEPS, WAVES, gpu_header, median_ms
    from tileup.sampling import shared_prefix
    from tileup.sampling.compiled import compile_module
    from tileup.sampling.graphs import GraphedUNet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="fused")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    timestep = torch.tensor(500.0, device="cuda")
    result: dict[str, Any] = {**gpu_header(), "cases": {}}
    for case in args.cases.split(","):
        side, calls, dynamic = CASES[case]
        calls = calls or {samples // 2: STEPS * waves for samples, waves in WAVES.items()}
        plain = random_unet(channels_last=dynamic)
        paired = copy.deepcopy(plain)
        assert shared_prefix.install(paired)
        gen = torch.Generator(device="cuda").manual_seed(0)
        inputs = {
            k: (
                torch.randn(k, 4, side, side, device="cuda", generator=gen).bfloat16(),
                torch.randn(2 * k, 77, 768, device="cuda", generator=gen).bfloat16(),
            )
            for k in calls
        }
        entries: dict[str, Any] = {}
        for mode in args.modes.split(","):
            outputs: dict[str, dict[int, torch.Tensor]] = {}
            for variant, unet in (("plain", plain), ("paired", paired)):
                torch._dynamo.reset()
                module = compile_module(unet, dynamic_batch=dynamic) if mode == "compiled" else unet
                graphed = GraphedUNet(module)
                start = time.perf_counter()
                per_call: dict[int, float] = {}
                with torch.inference_mode():
                    for k, (x, context) in inputs.items():
                        sample = torch.cat([x, x]) if variant == "plain" else x

                        def call(g: Any = graphed, s: Any = sample, c: Any = context) -> Any:
                            return g(s, timestep, encoder_hidden_states=c)[0]

                        for _ in range(3):  # (compile,) capture, replay
                            out = call()
                        outputs.setdefault(variant, {})[k] = out.float().clone()
                        per_call[k] = median_ms(call, args.repeats)
                graphed.release()
                entry = {
                    "ms_per_call": {str(k): round(v, 3) for k, v in per_call.items()},
                    "job_unet_seconds": round(
                        sum(calls[k] * v for k, v in per_call.items()) / 1e3, 3
                    ),
                    "wall_seconds_with_compilation": round(time.perf_counter() - start, 1),
                }
                if variant == "paired":
                    gaps = [(outputs["paired"][k] - outputs["plain"][k]).abs() for k in inputs]
                    entry["max_diff_from_plain"] = max(g.max().item() for g in gaps)
                    entry["mean_diff_from_plain"] = max(g.mean().item() for g in gaps)
                entries[f"{mode}_{variant}"] = entry
                print(case, mode, variant, json.dumps(entry), flush=True)
        result["cases"][case] = {"latent": side, "calls": calls, "variants": entries}
        del plain, paired
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

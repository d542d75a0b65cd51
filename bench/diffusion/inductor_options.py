"""The compiled fused UNet call under inductor's options (and cuDNN's algorithm search).

The fused job's call exactly as ``--compile`` runs it (:func:`tileup.modes.model._runnable`:
the guidance pair sharing its first layers, per-channel GroupNorms, compiled statically,
replayed from CUDA graphs): 27 tiles at 64² with 54 text states, the job's 60 calls. Each
variant compiles anew under its ``torch._inductor.config`` patch (and tileup settings:
``plain_upsample``); its output is compared with
the default's (kernel rounding). Writes ``--out`` after every variant (a call cut short at its
time limit keeps what ran).

    python bench/diffusion/inductor_options.py --out /tmp/inductor_options.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: tileup and bench from this checkout
    sys.path.insert(1, str(ROOT))

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "cudnn_benchmark": {},  # torch.backends.cudnn.benchmark on (no inductor option)
    "conv_1x1_as_mm": {"conv_1x1_as_mm": True},
    "freezing": {"freezing": True},
    "coordinate_descent": {"coordinate_descent_tuning": True},
    "diffusion_blog": {  # PyTorch's "accelerating generative AI: diffusion" settings
        "conv_1x1_as_mm": True,
        "coordinate_descent_tuning": True,
        "coordinate_descent_check_all_directions": True,
        "epilogue_fusion": False,
    },
    "max_autotune_gemm": {"max_autotune_gemm": True},
    "max_autotune": {"max_autotune": True},
    "plain_upsample": {},  # tileup's upsamplers as diffusers' (no inductor option)
}
ENVIRONMENT: dict[str, dict[str, str]] = {"plain_upsample": {"TILEUP_PHASE_UPSAMPLE": "off"}}
"""tileup settings a variant runs under, besides inductor's options."""
TILES, SIDE, CALLS = 27, 64, 60


def main() -> None:
    import torch

    from bench.diffusion.profile_unet import random_unet
    from bench.diffusion.redraw_unet import gpu_header, median_ms
    from tileup.modes.model import _runnable

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    base = random_unet()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(TILES, 4, SIDE, SIDE, device="cuda", generator=gen).bfloat16()
    context = torch.randn(2 * TILES, 77, 768, device="cuda", generator=gen).bfloat16()
    timestep = torch.tensor(500.0, device="cuda")
    result: dict[str, Any] = {
        **gpu_header(),
        "case": {"tiles": TILES, "latent": SIDE, "calls_in_job": CALLS},
        "variants": {},
    }
    reference: torch.Tensor | None = None
    for name in args.variants.split(","):
        torch._dynamo.reset()
        with mock.patch.dict(os.environ, ENVIRONMENT.get(name, {})):  # read by the swaps alone
            unet = _runnable(copy.deepcopy(base), compiled=True, dynamic_batch=False, graphed=True)
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = name == "cudnn_benchmark"
        start = time.perf_counter()
        entry: dict[str, Any] = {"options": VARIANTS[name], "tileup": ENVIRONMENT.get(name, {})}
        try:
            with torch.inference_mode(), torch._inductor.config.patch(VARIANTS[name]):

                def call(u: Any = unet) -> Any:
                    return u(x, timestep, encoder_hidden_states=context)[0]

                for _ in range(3):  # compile, capture, replay
                    out = call()
                torch.cuda.synchronize()
                entry["compile_and_capture_seconds"] = round(time.perf_counter() - start, 1)
                ms = median_ms(call, args.repeats)
            entry["ms_per_call"] = round(ms, 3)
            entry["job_unet_seconds"] = round(CALLS * ms / 1e3, 3)
            if reference is None:
                reference = out.float().clone()
            else:
                gap = (out.float() - reference).abs()
                entry["max_diff_from_default"] = gap.max().item()
                entry["mean_diff_from_default"] = gap.mean().item()
        except Exception as error:  # a variant that does not build is a result too
            entry["error"] = f"{type(error).__name__}: {error}"[:500]
        finally:
            torch.backends.cudnn.benchmark = benchmark
            with contextlib.suppress(Exception):
                unet.release()  # type: ignore[attr-defined]
            torch.cuda.empty_cache()
        result["variants"][name] = entry
        print(name, json.dumps(entry), flush=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Where a capped tiled VAE decode waits on the host: the host thread's seconds in the engine's
crops of host canvases, its copies of results to the host and its pastes there, against the
decode's wall time, with the bytes each moved.

A decode of random latents (no encode first; after ``--warmups`` untimed ones) on an emulated
card with the store capped as a memory plan caps it; the engine's ``_gather`` (crops with halo
out of a canvas), ``_to`` (a result batch started to the host) and ``_scatter`` (owned regions
pasted into a canvas, after waiting for the batch's copy) are timed around their calls on the
host thread. The GPU queue runs behind it, so host seconds that reach the wall time are time
the GPU starved.

    python bench/vae/host_traffic.py --size 8192 --emulate-gib 8 --store-limit-gib 2.065 \\
        --out /tmp/host_traffic.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: tileup and bench from this checkout
    sys.path.insert(1, str(ROOT))


def main() -> None:
    import torch

    from tileup.vae import engine, tiled

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--emulate-gib", type=float, default=0)
    parser.add_argument("--store-limit-gib", type=float, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmups", type=int, default=1, help="untimed decodes first")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from diffusers import AutoencoderKL

    from bench.vae.measure_tiled_vae import SD_VAE

    held = 0  # bytes of the ballast (held for the whole run)
    if args.emulate_gib:
        from bench.gpu import take_ballast

        ballast = take_ballast(args.emulate_gib)
        held = 0 if ballast.tensor is None else ballast.tensor.numel()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE).to(args.device, dtype).eval()
    tally: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "s": 0.0, "bytes": 0})

    def timed(name: str, method: Any, canvas: int, moved: Any) -> Any:
        """``method`` timed, keyed by where its argument ``canvas`` lies; ``moved(args,
        result)``: the tensor whose bytes it moved."""

        def wrapper(self: Any, *a: Any) -> Any:
            start = time.perf_counter()
            out = method(self, *a)
            key = f"{name}:{a[canvas].device.type}"
            tally[key]["calls"] += 1
            tally[key]["s"] += time.perf_counter() - start
            tally[key]["bytes"] += _bytes(moved(a, out))
            return out

        return wrapper

    cls = engine.StagedEngine
    cls._gather = timed("gather", cls._gather, 0, lambda a, out: out[0])  # type: ignore[method-assign]
    cls._to = timed("to", cls._to, 1, lambda a, out: a[0])  # type: ignore[method-assign]
    cls._scatter = timed("scatter", cls._scatter, 0, lambda a, out: a[2])  # type: ignore[method-assign]
    side = args.size // 8
    latents = torch.randn(1, 4, side, side, device=args.device)
    limit = None if args.store_limit_gib is None else int(args.store_limit_gib * 2**30)
    notes: list[str] = []
    kw: dict[str, Any] = {"dtype": dtype, "batch": args.batch, "store": args.device}
    kw |= {"store_limit": limit, "notes": notes}
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "size": args.size,
        "emulate_gib": args.emulate_gib,
        "store_limit_gib": args.store_limit_gib,
        "batch": args.batch,
        "environment": {k: v for k, v in sorted(os.environ.items()) if k in _KNOBS},
    }
    with torch.inference_mode():
        for _ in range(args.warmups):  # kernels built and tuned, allocator warm
            tiled.tiled_decode(vae, latents, **kw)
        tally.clear()
        notes.clear()
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        tiled.tiled_decode(vae, latents, **kw)
        if args.device == "cuda":
            torch.cuda.synchronize()
        result["decode_s"] = round(time.perf_counter() - start, 3)
        if args.device == "cuda":  # above the ballast
            peak = (torch.cuda.max_memory_allocated() - held) / 2**30
            result["peak_allocated_gib"] = round(peak, 3)
    result["host_thread"] = {
        k: {"calls": int(v["calls"]), "s": round(v["s"], 3), "gib": round(v["bytes"] / 2**30, 2)}
        for k, v in sorted(tally.items())
    }
    result["notes"] = notes
    text = json.dumps(result, indent=1)
    print(text)
    args.out.write_text(text + "\n")


_KNOBS = (
    "PYTORCH_CUDA_ALLOC_CONF",
    "TILEUP_VAE_ATTENTION",
    "TILEUP_VAE_MAX_CHAIN",
    "TILEUP_VAE_SIDE_COPIES",
    "TILEUP_FLASH_CONFIG",
)
"""Environment variables that change the decode, recorded with its result."""


def _bytes(t: Any) -> int:
    """Bytes of a tensor argument (0 for anything else)."""
    return int(t.numel() * t.element_size()) if hasattr(t, "element_size") else 0


if __name__ == "__main__":
    main()

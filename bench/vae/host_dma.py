"""The tiled VAE under a memory plan's cap: crops by DMA from pinned host canvases against the
host thread's copies, at several recompute chain lengths, in one process.

An encode and a decode of a ``--size``² picture (SD VAE, random weights, bf16) on an emulated
card, the device store capped as the print_8k plan caps it; one untimed warm-up first (the
pinned pool and cuDNN's choices then exist, as for every picture of a folder after the first).
Per run: seconds, the attention's seconds, the peak allocated, the engine's notes and how much
pinned memory the run newly allocated (and the seconds that took). Prints JSON; ``--out``
writes it too.

    python3 bench/vae/host_dma.py --size 8192 --emulate-gib 8 --store-limit-gib 2.065 \\
        --runs dma=off:chain=6,dma=on:chain=6,dma=on:chain=3,dma=on:chain=2 --out x.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from typing import Any

import torch

from tileup.vae import attention as vae_attention
from tileup.vae import estimated, tiled

ENV = {"dma": "TILEUP_VAE_DMA", "chain": "TILEUP_VAE_MAX_CHAIN"}
"""Run keys and the settings they set; ``store=G`` caps the device store at G GiB instead of
``--store-limit-gib`` (``store=none``: no cap); ``stats=estimated`` runs the estimated mode
(:mod:`tileup.vae.estimated`, A1111's Fast Encoder/Decoder) instead of the exact one."""


def one_run(vae: Any, image: torch.Tensor, settings: dict[str, str], kw: dict[str, Any]) -> dict:
    """Time an encode and a decode under ``settings`` (keys of :data:`ENV`)."""
    kw = dict(kw)
    encode, decode = tiled.tiled_encode, tiled.tiled_decode
    for key, value in settings.items():
        if key == "store":
            kw["store_limit"] = None if value == "none" else int(float(value) * 2**30)
        elif key == "stats":
            if value not in ("exact", "estimated"):
                raise SystemExit(f"stats must be exact or estimated, got {value!r}")
            if value == "estimated":
                encode, decode = estimated.estimated_encode, estimated.estimated_decode
        else:
            os.environ[ENV[key]] = value
    attention_s = {"encode": 0.0, "decode": 0.0}
    phase = "encode"
    original = vae_attention.sdpa

    def sdpa(jobs: Any, **skw: Any) -> Any:
        torch.cuda.synchronize()
        start = time.perf_counter()
        res = original(jobs, **skw)
        torch.cuda.synchronize()
        attention_s[phase] += time.perf_counter() - start
        return res

    notes: list[str] = []
    before, device_before = torch.cuda.host_memory_stats(), torch.cuda.memory_stats()
    torch.cuda.reset_peak_memory_stats()
    vae_attention.sdpa = sdpa
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        z = encode(vae, image, notes=notes, **kw)
        torch.cuda.synchronize()
        encode_s = time.perf_counter() - start
        phase = "decode"
        start = time.perf_counter()
        decode(vae, z.to("cuda"), notes=notes, **kw)
        torch.cuda.synchronize()
        decode_s = time.perf_counter() - start
    finally:
        vae_attention.sdpa = original
    after, device_after = torch.cuda.host_memory_stats(), torch.cuda.memory_stats()
    allocator = {
        key: device_after.get(key, 0) - device_before.get(key, 0)
        for key in ("num_alloc_retries", "num_sync_all_streams", "num_device_alloc")
    }

    def grew(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    return {
        "settings": settings,
        "encode_s": round(encode_s, 3),
        "decode_s": round(decode_s, 3),
        "encode_attention_s": round(attention_s["encode"], 3),
        "decode_attention_s": round(attention_s["decode"], 3),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "pinned_gib": round(after.get("allocated_bytes.current", 0) / 2**30, 2),
        "pinned_new_gib": round(grew("allocated_bytes.allocated") / 2**30, 2),
        "pinned_alloc_s": round(grew("host_alloc_time.total") / 1e6, 3),
        "allocator": allocator,
        "notes": sorted(set(notes)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--emulate-gib", type=float, default=8.0)
    parser.add_argument("--store-limit-gib", type=float, default=2.065)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--runs", default="dma=off:chain=6,dma=on:chain=6")
    parser.add_argument("--warmup", default="dma=on:chain=6")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from diffusers import AutoencoderKL

    from bench.gpu import take_ballast
    from bench.vae.measure_tiled_vae import SD_VAE

    def parse(spec: str) -> dict[str, str]:
        return dict(kv.split("=", 1) for kv in spec.split(":"))

    torch.manual_seed(0)
    ballast = take_ballast(args.emulate_gib) if args.emulate_gib else None  # noqa: F841
    vae = AutoencoderKL(**SD_VAE).to("cuda", torch.bfloat16).eval()
    image = torch.rand(1, 3, args.size, args.size, device="cuda") * 2 - 1
    limit = int(args.store_limit_gib * 2**30) if args.store_limit_gib else None
    kw = {"dtype": torch.bfloat16, "batch": args.batch, "store": "device", "store_limit": limit}
    result: dict[str, Any] = {
        "what": __doc__.splitlines()[0],
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": os.environ.get("TILEUP_COMMIT", "?"),
        "size": args.size,
        "emulate_gib": args.emulate_gib,
        "store_limit_gib": args.store_limit_gib,
        "batch": args.batch,
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "runs": [],
    }
    with torch.inference_mode():
        result["warmup"] = one_run(vae, image, parse(args.warmup), kw)
        print(json.dumps(result["warmup"]), flush=True)
        for spec in args.runs.split(","):
            run = one_run(vae, image, parse(spec), kw)
            print(json.dumps(run), flush=True)
            result["runs"].append(run)
            if args.out:  # what ran so far survives a kill at the call's limit
                with open(args.out, "w") as fh:
                    fh.write(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

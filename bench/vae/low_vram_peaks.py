"""Peak device memory of the tiled VAE under the smallest plan (``--low-vram``: no device
store, one tile a batch), encode and decode apart, with the store's borrowing of the
attention's room on or off and the attention's chunk of scores at its own cap or at a plan's.

    python3 bench/vae/low_vram_peaks.py --size 4096 --out $OUT/low_vram_peaks.json

Random SD VAE weights in bf16 (memory does not depend on the values); one GPU.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from tileup.vae import engine, tiled

GIB = 1 << 30


def measure(vae: Any, size: int, lend: bool, scores: int | None) -> dict[str, Any]:
    """Seconds and peak GiB above the start of one encode and one decode."""
    original = engine.StagedEngine.lend
    if not lend:
        engine.StagedEngine.lend = lambda self, nbytes: None  # type: ignore[method-assign]
    kw: dict[str, Any] = {"dtype": torch.bfloat16, "batch": 1, "store": "device"}
    kw |= {"store_limit": 0, "scores_limit": scores, "notes": []}
    image = torch.rand(1, 3, size, size, device="cuda") * 2 - 1
    out: dict[str, Any] = {"lend": lend, "scores_limit_mib": scores and scores >> 20}
    try:
        z = None
        for name in ("encode", "decode"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            if z is None:
                z = tiled.tiled_encode(vae, image, tile=512, **kw)
            else:
                tiled.tiled_decode(vae, z, tile=64, **kw)
            torch.cuda.synchronize()
            out[f"{name}_s"] = round(time.perf_counter() - start, 3)
            out[f"{name}_peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / GIB, 3)
    finally:
        engine.StagedEngine.lend = original  # type: ignore[method-assign]
    out["notes"] = sorted(set(kw["notes"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from diffusers import AutoencoderKL

    from bench.vae.measure_tiled_vae import SD_VAE
    from bench.vae.profile_vae import emit

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE).to("cuda", torch.bfloat16).eval()
    weights = torch.cuda.memory_allocated() / GIB
    # 528 MiB: about a plan's room for the scores with one 512 px VAE tile (504 MiB)
    runs = [
        measure(vae, args.size, lend, scores)
        for lend, scores in ((True, None), (False, None), (True, 528 << 20), (False, 528 << 20))
    ]
    result = {"device": torch.cuda.get_device_name(), "size": args.size, "vae_gib": weights}
    result["runs"] = runs
    emit(result, args.out)


if __name__ == "__main__":
    main()

"""The SD 1.5 UNet's self-attention at the fused job's shapes: each SDPA backend at the native
head size, and with every head zero-padded to a wider one (exact: zero columns add nothing to
Q·Kᵀ, and the output's extra columns are dropped).

A fused 4096² call runs 54 samples (27 tiles of 64² latents, CFG doubled), 8 heads, at the
levels 64² (head 40, 5 layers), 32² (head 80, 5 layers), 16² (head 160, 5 layers) and 8²
(head 160, the mid-block). Q, K and V are laid out as diffusers makes them: a (B, N, heads·d)
projection viewed as (B, heads, N, d). ``padded`` variants take Q, K and V from a projection
already ``heads × pad`` wide (what zero rows in ``to_q``/``to_k``/``to_v`` give), so no copy
is timed; ``pad-copy`` times ``F.pad`` of the native tensors too. Prints and writes (``--out``)
ms per call and TFLOP/s counted at the native head size.

    python bench/diffusion/unet_attention.py --out /tmp/unet_attention.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

LEVELS = {"64": (4096, 40, 5), "32": (1024, 80, 5), "16": (256, 160, 5), "8": (64, 160, 1)}
"""Level: (tokens, head size, self-attention layers in one UNet call)."""
HEADS = 8
BATCH = 54
CALLS = 60
"""The fused reference job's UNet calls (3 a step, 20 steps)."""


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def heads(batch: int, tokens: int, width: int, gen: Any) -> Any:
    import torch

    flat = torch.randn(batch, tokens, HEADS * width, device="cuda", generator=gen)
    return flat.to(torch.bfloat16).view(batch, tokens, HEADS, width).transpose(1, 2)


def attend(q: Any, k: Any, v: Any, scale: float, backend: Any, size: int, pad: int) -> Any:
    """SDPA under ``backend`` (None: PyTorch's choice), the heads first padded to ``pad``."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    if pad:
        q, k, v = (F.pad(t, (0, pad - size)) for t in (q, k, v))
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)[..., :size]
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)[..., :size]


def widened(native: Any, width: int, gen: Any) -> Any:
    """``native`` with zero columns appended to each head, as a wider projection writes it."""
    batch, _, tokens, size = native.shape
    wide = heads(batch, tokens, width, gen).zero_()
    wide[..., :size] = native
    return wide


def main() -> None:
    import torch
    from torch.nn.attention import SDPBackend

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="64,32,16,8")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    backends = {
        "default": None,
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    gen = torch.Generator(device="cuda").manual_seed(0)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "batch": BATCH,
        "heads": HEADS,
        "levels": {},
    }
    for level in args.levels.split(","):
        tokens, size, layers = LEVELS[level]
        flops = 4 * BATCH * HEADS * tokens * tokens * size
        q, k, v = (heads(BATCH, tokens, size, gen) for _ in range(3))
        scale = 1 / math.sqrt(size)
        reference = attend(q, k, v, scale, None, size, 0).float()
        rows: dict[str, Any] = {}
        wider = [w for w in (48, 64, 96, 128, 192, 256) if w > size][:2]
        cases = [(name, backend, size, 0) for name, backend in backends.items()]
        for width in wider:
            cases += [(name, backend, width, 0) for name, backend in backends.items()]
            cases.append(("pad-copy", None, width, width))
        for name, backend, width, pad in cases:
            key = f"{name}@{width}"
            if pad or width == size:
                tensors = (q, k, v)
            else:
                tensors = tuple(widened(t, width, gen) for t in (q, k, v))
            call = partial(attend, *tensors, scale, backend, size, pad)
            try:
                out = call()
                ms = median_ms(call, args.repeats)
            except RuntimeError as error:
                rows[key] = {"error": str(error).splitlines()[0][:160]}
                print(level, key, rows[key], flush=True)
                continue
            rows[key] = {
                "ms": round(ms, 3),
                "tflops": round(flops / ms / 1e9, 1),
                "job_seconds": round(ms * layers * CALLS / 1000, 3),
                "max_diff": (out.float() - reference).abs().max().item(),
            }
            print(level, key, rows[key], flush=True)
            del tensors, out, call
        result["levels"][level] = {"tokens": tokens, "head": size, "layers": layers, **rows}
        del q, k, v, reference
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

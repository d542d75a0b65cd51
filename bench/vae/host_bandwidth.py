"""Host-side bandwidths that bound the tiled VAE's CPU store: strided crop copies into pinned
memory, pinned/pageable host<->device copies. Prints JSON (GB/s)."""

from __future__ import annotations

import json
import time

import torch


def rate(fn, nbytes: int, reps: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return nbytes * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    canvas = torch.randn(256, 2048, 2048).to(torch.bfloat16)
    buf = torch.empty(4, 256, 514, 514, dtype=torch.bfloat16, pin_memory=True)

    def gather() -> None:
        for i in range(4):
            buf[i] = canvas[:, 500 * i : 500 * i + 514, 100:614]

    n = 1 << 30
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(n, dtype=torch.uint8)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {
        "threads": torch.get_num_threads(),
        "cpu_strided_crop_copy": rate(gather, buf.numel() * 2),
        "cpu_contiguous_copy": rate(lambda: pageable.copy_(pinned), n),
        "h2d_pinned": rate(lambda: dev.copy_(pinned, non_blocking=True), n),
        "d2h_pinned": rate(lambda: pinned.copy_(dev, non_blocking=True), n),
        "h2d_pageable": rate(lambda: dev.copy_(pageable), n),
        "d2h_pageable": rate(lambda: pageable.copy_(dev), n),
    }
    t = time.perf_counter()
    big = torch.empty(4 << 30, dtype=torch.uint8, pin_memory=True)
    out["pin_alloc_4GiB_s"] = time.perf_counter() - t
    del big
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()

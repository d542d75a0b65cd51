"""Where the SD 1.5 UNet's time goes on a GPU: one forward per batch shape, timed eager, from
CUDA graphs, compiled and compiled + graphs, under each SDPA attention backend, with the
kernels of one eager forward grouped by kind (GEMM/conv, attention, norm, elementwise, copy).

Random full-size weights from tileup's config (speed does not depend on the values), bf16,
the fused QKV projections tileup uses on CUDA. ``--shapes`` lists ``batch x latent side``:
``64x64`` is the fused reference job's UNet call (32 tiles of 512², CFG doubled), ``8x72`` a
redraw wave (4 crops of 576², CFG doubled). Writes ``--out`` (JSON) and prints it.

    python bench/diffusion/profile_unet.py --out /tmp/unet.json [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

KINDS = (
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa", "softmax")),
    ("norm", ("group_norm", "groupnorm", "layer_norm", "layernorm", "norm_")),
    ("gemm_conv", ("gemm", "xmma", "cutlass", "nvjet", "conv", "implicit", "sm90", "sm80")),
    ("copy", ("copy", "memcpy", "memset", "cat")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "triton")),
)


def kind_of(kernel: str) -> str:
    """The kind of a CUDA kernel, from its name (first matching group wins)."""
    name = kernel.lower()
    for kind, needles in KINDS:
        if any(n in name for n in needles):
            return kind
    return "other"


def kernel_ms(fn: Callable[[], object], top: int = 12, width: int = 100) -> dict[str, Any]:
    """One call of ``fn`` under torch.profiler: CUDA milliseconds in all, by kernel kind
    (:func:`kind_of`) and of the ``top`` kernels (names cut to ``width``)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if event.device_type.name != "CUDA" or not us:
            continue
        by_kind[kind_of(event.key)] += us / 1e3
        kernels[event.key[:width]] += us / 1e3
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {
        "total": round(sum(by_kind.values()), 3),
        "by_kind": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": {k: round(v, 3) for k, v in ranked},
    }


def random_unet(*, channels_last: bool = False, family: str = "sd15") -> Any:
    """The full-size UNet of ``family`` ("sd15" or "sdxl") from tileup's config with random
    weights (seed 0) on the GPU, bf16, eval, with the fused QKV projections tileup uses on
    CUDA."""
    import torch
    from diffusers import UNet2DConditionModel

    from bench.diffusion.make_random_checkpoint import _config
    from tileup.modes.model import _fast_layout

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(_config(family, "unet"))
    unet.to(dtype=torch.bfloat16).eval().requires_grad_(False)
    _fast_layout(unet)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet


def profile_shape(
    unet: Any,
    batch: int,
    side: int,
    *,
    backends: dict[str, Any],
    seconds: Any,
    compile: bool,
    channels_last: bool = False,
) -> dict[str, Any]:
    """One UNet call shape: timings per backend and mode, attention shapes, kernel kinds."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from tileup.sampling.graphs import GraphedUNet

    device = torch.device("cuda")
    sample = torch.randn(batch, 4, side, side, device=device, dtype=torch.bfloat16)
    if channels_last:
        sample = sample.contiguous(memory_format=torch.channels_last)
    context = torch.randn(batch, 77, 768, device=device, dtype=torch.bfloat16)
    timestep = torch.tensor(500.0, device=device)
    entry: dict[str, Any] = {
        "batch": batch, "latent": side, "channels_last": channels_last, "seconds": {}
    }  # fmt: skip

    def forward(module: Any = unet) -> Any:
        with torch.inference_mode():
            return module(sample, timestep, encoder_hidden_states=context)

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(sample, timestep, encoder_hidden_states=context)
    entry["tflop"] = counter.get_total_flops() / 1e12
    shapes: list[tuple[int, ...]] = []
    original = F.scaled_dot_product_attention

    def recording(q: Any, k: Any, v: Any, *a: Any, **kw: Any) -> Any:
        shapes.append((*q.shape, k.shape[-2]))
        return original(q, k, v, *a, **kw)

    F.scaled_dot_product_attention = recording  # type: ignore[assignment]
    try:
        forward()
    finally:
        F.scaled_dot_product_attention = original  # type: ignore[assignment]
    for name, context_manager in backends.items():
        try:
            with context_manager():
                entry["seconds"][f"eager_{name}"] = seconds(forward)
        except Exception as exc:  # a backend that refuses the shape
            entry["seconds"][f"eager_{name}"] = f"error: {type(exc).__name__}: {exc}"[:200]
    graphed = GraphedUNet(unet)
    entry["seconds"]["graphs"] = seconds(lambda: forward(graphed))
    entry["graph_captures"] = graphed.captures
    graphed.release()
    attention: dict[str, dict[str, Any]] = {}
    for b, h, lq, d, lk in sorted(set(shapes)):
        q = torch.randn(b, h, lq, d, device=device, dtype=torch.bfloat16)
        kv = torch.randn(b, h, lk, d, device=device, dtype=torch.bfloat16)
        flop = 4 * b * h * lq * lk * d
        row: dict[str, Any] = {"calls": shapes.count((b, h, lq, d, lk))}
        for name, context_manager in backends.items():
            try:
                with context_manager():
                    s = seconds(lambda q=q, kv=kv: F.scaled_dot_product_attention(q, kv, kv))
                row[name] = {"ms": s * 1e3, "tflops": flop / s / 1e12}
            except Exception as exc:
                row[name] = f"error: {type(exc).__name__}"
        attention[f"b{b} h{h} q{lq} k{lk} d{d}"] = row
    entry["attention"] = attention
    kernels = kernel_ms(forward, top=25, width=120)
    entry["kernel_ms_by_kind"], entry["top_kernels_ms"] = kernels["by_kind"], kernels["top"]
    if compile:
        compiled = torch.compile(unet, dynamic=False)
        start = time.perf_counter()
        forward(compiled)
        torch.cuda.synchronize()
        entry["compile_seconds"] = time.perf_counter() - start
        entry["seconds"]["compiled"] = seconds(lambda: forward(compiled))
        both = GraphedUNet(compiled)
        entry["seconds"]["compiled_graphs"] = seconds(lambda: forward(both))
        entry["compiled_graph_captures"] = both.captures
        both.release()
    eager = entry["seconds"]["eager_default"]
    entry["tflops"] = {
        k: entry["tflop"] / v for k, v in entry["seconds"].items() if isinstance(v, float)
    }
    entry["eager_tflops"] = entry["tflop"] / eager
    return entry


def main() -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="64x64,8x72")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also compiled (minutes, cold)")
    parser.add_argument("--channels-last", action="store_true", help="weights and inputs NHWC")
    parser.add_argument("--backends", default="default,flash,cudnn,efficient")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    unet = random_unet(channels_last=args.channels_last)
    backends: dict[str, Callable[[], AbstractContextManager[Any]]] = {
        "default": nullcontext,
        "flash": lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]),
        "cudnn": lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION]),
        "efficient": lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]),
    }
    backends = {k: v for k, v in backends.items() if k in args.backends.split(",")}
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "shapes": [],
    }

    def seconds(call: Callable[[], Any]) -> float:
        call()
        call()
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    for spec in args.shapes.split(","):
        batch, side = (int(v) for v in spec.split("x"))
        entry = profile_shape(
            unet, batch, side, backends=backends, seconds=seconds, compile=args.compile,
            channels_last=args.channels_last,
        )  # fmt: skip
        results["shapes"].append(entry)
        print(json.dumps(entry, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Where the exact tiled VAE spends its time on a GPU, and what its parts could cost.

On the full-size SD VAE architecture (random weights, bf16), prints one JSON object with

- ``attention``: the mid-block global attention at the latent size of a ``--size`` image
  (1 head, d = 512), per implementation: PyTorch SDPA restricted to each backend, and
  :func:`tileup.vae.attention.sdpa` (what the tiled VAE calls; ``tileup_torch_softmax``: with
  PyTorch's ops instead of :mod:`tileup.vae.softmax`; ``tileup_keys_B_budget_2^b``: blocks of
  B keys, at most 2^b scores a chunk — B = all tokens walks whole rows, as before 2026-11-30's
  session 16; ``tileup_budget_2^b``: the default key block, at most 2^b scores a chunk), and
  the fused Triton kernel (:mod:`tileup.vae.flash`) at several block sizes; seconds and
  TFLOP/s;
- ``conv``: one 3×3 conv (128 → 128 channels, a batch of 4 tiles of 514² px) in NCHW and in
  channels-last, and the norm-activation pre-op (float32 and fused) on the same batch;
- ``stages``: the tiled encode and decode of a ``--size`` image with the store on ``--store``,
  seconds per stage kind (each stage synchronised; a separate, slower run than the total);
- ``total``: the same encode and decode unsynchronised (median of ``--repeats``);
- ``lanes``: the same with every other GPU's VAE copy taking a band of tile rows;
- ``crops``: a redraw wave's plain VAE passes on ``--crop``² px crops, eager (batched and one by
  one) and compiled one by one (what ``--compile`` runs).

    python bench/vae/profile_vae.py --size 4096 --out bench/vae/results/profile_h200.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tileup.vae import attention as vae_attention
from tileup.vae import engine as vae_engine
from tileup.vae import flash, tiled
from tileup.vae import stats as vae_stats

DEVICE = "cuda"
"""Where the parts run (a CPU smoke test of ``crops`` sets ``"cpu"``)."""


def seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median seconds of ``fn`` on the GPU after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


FLASH_CONFIGS = [
    flash.FlashConfig(64, 32, 8, 2),
    flash.FlashConfig(64, 32, 8, 3),
    flash.FlashConfig(64, 64, 8, 1),
    flash.FlashConfig(64, 64, 8, 2),
    flash.FlashConfig(64, 16, 8, 3),
    flash.FlashConfig(128, 32, 8, 2),
    flash.FlashConfig(128, 16, 8, 2),
    flash.FlashConfig(128, 32, 16, 2),
    flash.FlashConfig(64, 32, 4, 2),
    flash.FlashConfig(64, 16, 4, 3),
    flash.FlashConfig(32, 64, 4, 2),
]
"""Block sizes of the fused attention kernel timed by ``--parts attention``."""


def gemm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """Softmax attention as two GEMMs per ``chunk`` queries (scores in the input dtype, softmax
    accumulated in float32)."""
    out = torch.empty_like(q)
    kt = k.transpose(-1, -2) * q.shape[-1] ** -0.5
    for s in range(0, q.shape[2], chunk):
        scores = torch.matmul(q[:, :, s : s + chunk], kt)
        torch.matmul(torch.softmax(scores, dim=-1), v, out=out[:, :, s : s + chunk])
    return out


def _with_env(fn: Callable[[], object], name: str, value: str) -> Callable[[], object]:
    """``fn`` run with the environment variable ``name`` set to ``value``."""

    def run() -> object:
        os.environ[name] = value
        try:
            return fn()
        finally:
            del os.environ[name]

    return run


def attention(
    tokens: int, dim: int, dtype: torch.dtype, only: list[str] | None = None
) -> dict[str, Any]:
    """Seconds and TFLOP/s of global single-head attention over ``tokens`` tokens (``only``:
    these runs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, 1, tokens, dim, device="cuda", dtype=dtype) for _ in range(3))
    flops = 4 * tokens * tokens * dim
    out: dict[str, Any] = {"tokens": tokens, "dim": dim, "tflop": flops / 1e12}

    def backend(b: SDPBackend) -> Callable[[], object]:
        def run() -> object:
            with sdpa_kernel([b]):
                res = torch.empty_like(q)
                for s in range(0, tokens, 1 << 16):
                    res[:, :, s : s + (1 << 16)] = F.scaled_dot_product_attention(
                        q[:, :, s : s + (1 << 16)], k, v
                    )
                return res

        return run

    runs: dict[str, Callable[[], object]] = {
        "efficient": backend(SDPBackend.EFFICIENT_ATTENTION),
        "cudnn": backend(SDPBackend.CUDNN_ATTENTION),
        "flash": backend(SDPBackend.FLASH_ATTENTION),
        "tileup": lambda: vae_attention.sdpa([(q, k, v)]),
        "tileup_torch_softmax": _with_env(
            lambda: vae_attention.sdpa([(q, k, v)]), "TILEUP_VAE_SOFTMAX", "torch"
        ),
        "gemm_bf16_scores_8192": lambda: gemm_attention(q, k, v, 8192),
    }
    for budget in (25, 26, 27, 28, 29):  # chunks of queries (default SCORES_BUDGET)
        runs[f"tileup_budget_2^{budget}"] = functools.partial(
            vae_attention.chunked_attention, q, k, v, 1 << budget
        )
    for keys in (4096, 8192, 32768, 65536, tokens):  # blocks of keys (default KEY_BLOCK)
        for budget in (26, 28):
            runs[f"tileup_keys_{keys}_budget_2^{budget}"] = _with_env(
                functools.partial(vae_attention.chunked_attention, q, k, v, 1 << budget),
                "TILEUP_VAE_KEY_BLOCK",
                str(keys),
            )
    for cfg in FLASH_CONFIGS:  # tileup.vae.flash, one fused kernel (TILEUP_VAE_ATTENTION=fused)
        name = "fused_" + "_".join(str(x) for x in dataclasses.astuple(cfg))
        runs[name] = functools.partial(flash.flash_attention, q[0, 0], k[0, 0], v[0, 0], config=cfg)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        ref = F.scaled_dot_product_attention(q[:, :, :4096], k, v).float()
    mine = vae_attention.sdpa([(q[:, :, :4096].contiguous(), k, v)])[0].float()
    out["tileup_vs_efficient_max_abs"] = (mine - ref).abs().max().item()
    try:
        fused = flash.flash_attention(q[0, 0, :4096].contiguous(), k[0, 0], v[0, 0]).float()
        out["fused_vs_efficient_max_abs"] = (fused - ref[0, 0]).abs().max().item()
    except Exception as exc:  # the kernel may not compile for this GPU's limits
        out["fused_vs_efficient_max_abs"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    for name, fn in runs.items():
        if only and name not in only:
            continue
        try:
            s = seconds(fn, 2)
            out[name] = {"seconds": s, "tflops": flops / s / 1e12}
        except Exception as exc:  # a backend may refuse this shape
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        torch.cuda.empty_cache()
    return out


def conv(dtype: torch.dtype) -> dict[str, Any]:
    """A 3×3 conv (128 → 128, and the VAE's narrow ends 128 → 3 and 3 → 128) and the
    norm-activation pre-op on a batch of 4 full-resolution tiles."""
    x = torch.randn(4, 128, 514, 514, device="cuda", dtype=dtype)
    layer = torch.nn.Conv2d(128, 128, 3).to("cuda", dtype)
    flops = 2 * 9 * 128 * 128 * 4 * 512 * 512
    a = torch.randn(1, 128, 1, 1, device="cuda")
    b = torch.randn(1, 128, 1, 1, device="cuda")
    act = torch.nn.SiLU()
    xl = x.contiguous(memory_format=torch.channels_last)
    ll = torch.nn.Conv2d(128, 128, 3).to("cuda", dtype).to(memory_format=torch.channels_last)
    narrow = torch.nn.Conv2d(128, 3, 3).to("cuda", dtype).to(memory_format=torch.channels_last)
    wide = torch.nn.Conv2d(3, 128, 3).to("cuda", dtype).to(memory_format=torch.channels_last)
    image = torch.randn(4, 3, 514, 514, device="cuda", dtype=dtype)
    image = image.contiguous(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True
    bench_nchw = seconds(lambda: layer(x))
    bench_cl = seconds(lambda: ll(xl))
    torch.backends.cudnn.benchmark = False
    res = {
        "conv_nchw_cudnn_benchmark": bench_nchw,
        "conv_channels_last_cudnn_benchmark": bench_cl,
        "conv_nchw": seconds(lambda: layer(x)),
        "conv_channels_last": seconds(lambda: ll(xl)),
        # the decoder's last conv (128 → 3) and the encoder's first (3 → 128) on the same tiles
        "conv_out_channels_last": seconds(lambda: narrow(xl)),
        "conv_in_channels_last": seconds(lambda: wide(image)),
        "norm_act_float32": seconds(lambda: tiled._norm_act(x, a, b, act, dtype)),
        "norm_act_channels_last": seconds(lambda: tiled._norm_act(xl, a, b, act, dtype)),
    }
    out: dict[str, Any] = {k: {"seconds": v} for k, v in res.items()}
    for k in [k for k in res if k.startswith("conv_nchw") or k.startswith("conv_channels")]:
        out[k]["tflops"] = flops / res[k] / 1e12
    return out


def micro(dtype: torch.dtype) -> dict[str, float]:
    """Seconds of candidate per-batch ops on 4 channels-last full-resolution tiles."""
    x = torch.randn(4, 128, 512, 512, device="cuda", dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    a = torch.rand(1, 128, 1, 1, device="cuda") + 0.5
    b = torch.randn(1, 128, 1, 1, device="cuda")
    ones, zeros = torch.ones(128, device="cuda"), torch.zeros(128, device="cuda")

    def per_tile() -> object:
        return [torch.var_mean(x[i].float(), dim=(1, 2), correction=0) for i in range(4)]

    def batch_norm() -> object:
        return F.batch_norm(x, zeros, ones, a.flatten(), b.flatten(), False, 0.0, 1e-30)

    def addcmul() -> object:
        h = torch.empty_like(x)
        return torch.addcmul(b, x, a, out=h)

    return {
        "var_mean_per_tile_float": seconds(per_tile),
        "var_mean_batch_float": seconds(lambda: torch.var_mean(x.float(), dim=(2, 3))),
        "var_mean_batch_flat": seconds(
            lambda: torch.var_mean(x.float().permute(0, 2, 3, 1).flatten(1, 2), dim=1)
        ),
        "stats_kernel": seconds(lambda: vae_stats.channel_stats(x)),
        **{
            f"stats_kernel_x{n}": seconds(lambda n=n: vae_stats.channel_stats(x, n))
            for n in (1, 2, 4, 8, 16)
        },
        "float_copy": seconds(lambda: x.float()),
        "norm_addcmul_out": seconds(addcmul),
        "norm_batch_norm": seconds(batch_norm),
        "batch_norm_max_diff": (batch_norm() - addcmul()).abs().max().item(),  # type: ignore[operator]
        "silu_inplace": seconds(lambda: F.silu(x.clone(), inplace=True)),
        "clone": seconds(lambda: x.clone()),
    }


def stage_kind(fn: Callable[..., object]) -> str:
    """A stage function's kind from its name (``first``, ``second``, ``up``, ``project`` …)."""
    return getattr(fn, "__qualname__", "?").split(".<locals>.")[-1].replace("<lambda>", "conv_in")


def stages(
    vae: Any, size: int, dtype: torch.dtype, store: str, limit: int | None = None, batch: int = 4
) -> dict[str, Any]:
    """Synchronised seconds per stage kind of a tiled encode and decode (``limit``: the
    engine's ``store_limit``, as a memory plan gives it), with their totals and notes."""
    timings: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    original_stage, original_sdpa = vae_engine.StagedEngine.stage, vae_attention.sdpa

    def stage(self: Any, inputs: Any, fn: Any, **kw: Any) -> Any:
        torch.cuda.synchronize()
        start = time.perf_counter()
        res = original_stage(self, inputs, fn, **kw)
        torch.cuda.synchronize()
        key = f"{phase}:{stage_kind(fn)}@{kw['scale']}"
        timings[key] += time.perf_counter() - start
        counts[key] += 1
        return res

    def sdpa(jobs: Any, **kw: Any) -> list[torch.Tensor]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        res = original_sdpa(jobs, **kw)
        torch.cuda.synchronize()
        timings[f"{phase}:sdpa"] += time.perf_counter() - start
        return res

    image = torch.rand(1, 3, size, size, device="cuda") * 2 - 1
    notes: list[str] = []
    kw: dict[str, Any] = {
        "device": "cuda",
        "dtype": dtype,
        "batch": batch,
        "store": store,
        "store_limit": limit,
        "notes": notes,
    }
    vae_engine.StagedEngine.stage, vae_attention.sdpa = stage, sdpa  # type: ignore[method-assign]
    torch.cuda.reset_peak_memory_stats()
    try:
        phase = "encode"
        start = time.perf_counter()
        z = tiled.tiled_encode(vae, image, **kw)
        timings["encode:total"] = time.perf_counter() - start
        phase = "decode"
        start = time.perf_counter()
        tiled.tiled_decode(vae, z, **kw)
        timings["decode:total"] = time.perf_counter() - start
    finally:
        vae_engine.StagedEngine.stage, vae_attention.sdpa = original_stage, original_sdpa
    out: dict[str, Any] = {
        k: {"seconds": round(v, 4), "stages": counts.get(k, 0)} for k, v in timings.items()
    }
    out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out["notes"] = notes
    return out


def trace(vae: Any, size: int, dtype: torch.dtype, store: str, limit: int | None) -> dict[str, Any]:
    """torch.profiler over one tiled encode and one decode: the top CUDA kernels and CPU ops."""
    from torch.profiler import ProfilerActivity, profile

    image = torch.rand(1, 3, size, size, device="cuda") * 2 - 1
    kw: dict[str, Any] = {"dtype": dtype, "batch": 4, "store": store, "store_limit": limit}
    z = tiled.tiled_encode(vae, image, **kw)
    torch.cuda.reset_peak_memory_stats()
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    out: dict[str, Any] = {}
    for name, run in (
        ("encode", lambda: tiled.tiled_encode(vae, image, **kw)),
        ("decode", lambda: tiled.tiled_decode(vae, z, **kw)),
    ):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        table = prof.key_averages()
        out[name] = {
            "seconds_profiled": wall,
            "kernels": kernel_totals(table),
            "cuda": prof.key_averages().table(sort_by="cuda_time_total", row_limit=22),
            "cpu": table.table(sort_by="self_cpu_time_total", row_limit=15),
        }
    out["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries
    out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


KERNEL_KINDS = (
    ("host<->device", ("Memcpy HtoD", "Memcpy DtoH")),
    ("device copy", ("Memcpy DtoD", "copy_kernel", "CopyKernel", "Memset")),
    ("softmax", ("softmax", "SoftMax")),
    ("gemm/conv", ("nvjet", "xmma", "gemm", "cutlass", "conv", "implicit", "cudnn", "sm90_")),
    ("triton", ("triton",)),
    ("elementwise", ("elementwise", "vectorized", "reduce", "Reduce")),
)
"""Kernel kinds of a trace's totals: the first kind one of whose substrings a kernel name holds."""


def kernel_totals(table: Any) -> dict[str, Any]:
    """Device seconds per kernel kind (:data:`KERNEL_KINDS`, else ``other``) and the 30 costliest
    kernels of a profiler's ``key_averages()``; only kernel rows count (no ``aten::`` ops or
    runtime calls, whose device time repeats their kernels')."""
    kinds: dict[str, float] = collections.defaultdict(float)
    rows: list[tuple[float, int, str]] = []
    for e in table:
        name, dev = e.key, e.self_device_time_total / 1e6
        if dev <= 0 or e.self_cpu_time_total > 0 or name.startswith(("aten::", "cu", "Command")):
            continue
        kind = next((k for k, subs in KERNEL_KINDS if any(s in name for s in subs)), "other")
        kinds[kind] += dev
        rows.append((dev, e.count, name[:160]))
    rows.sort(reverse=True)
    return {
        "by_kind_s": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "total_s": round(sum(kinds.values()), 4),
        "top": [{"s": round(d, 4), "calls": n, "name": k} for d, n, k in rows[:30]],
    }


def totals(
    vae: Any, size: int, dtype: torch.dtype, repeats: int, lanes: list[Any], batch: int = 4
) -> dict[str, Any]:
    """Seconds of a whole tiled encode and decode (store on the device, ``batch`` tiles a batch
    at the top scale; a job on a whole H200 plans 8), ``lanes`` as given."""
    image = torch.rand(1, 3, size, size, device="cuda") * 2 - 1
    kw: dict[str, Any] = {"dtype": dtype, "batch": batch, "store": "device", "lanes": lanes}
    z = tiled.tiled_encode(vae, image, **kw)

    def synced(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            out = fn()
            for i in range(torch.cuda.device_count()):
                torch.cuda.synchronize(i)
            return out

        return run

    return {
        "encode": seconds(synced(lambda: tiled.tiled_encode(vae, image, **kw)), repeats),
        "decode": seconds(synced(lambda: tiled.tiled_decode(vae, z, **kw)), repeats),
    }


def crops(vae: Any, size: int, dtype: torch.dtype) -> dict[str, Any]:
    """A redraw wave's VAE passes (the plain VAE on 4 crops of ``size``² px, what
    :meth:`tileup.vae.runner.VaeRunner.encode_crops`/``decode_crops`` run): seconds per crop,
    eager in one batch of 4 and one by one, and compiled one by one (its compilation apart)."""
    from tileup.progress import COMPILING
    from tileup.sampling.compiled import compile_module
    from tileup.vae.runner import _Decode, _Encode

    x = torch.rand(4, 3, size, size, device=DEVICE, dtype=dtype) * 2 - 1
    z = torch.randn(4, 4, size // 8, size // 8, device=DEVICE, dtype=dtype)
    out: dict[str, Any] = {"crop": size, "crops": 4}
    for name, kind, data in (("encode", _Encode, x), ("decode", _Decode, z)):
        eager = kind(vae)
        out[f"{name}_eager_batch4"] = seconds(lambda e=eager, d=data: e(d)) / 4
        one_by_one = seconds(lambda e=eager, d=data: [e(t[None]) for t in d])
        out[f"{name}_eager_one_by_one"] = one_by_one / 4
        before = COMPILING.seconds()
        compiled = compile_module(kind(vae), dynamic_batch=False)
        compiled(data[:1])
        torch.cuda.synchronize()
        out[f"{name}_compile_seconds"] = COMPILING.seconds() - before
        out[f"{name}_compiled_one_by_one"] = (
            seconds(lambda c=compiled, d=data: [c(t[None]) for t in d]) / 4
        )
        if DEVICE == "cuda":
            from bench.diffusion.profile_unet import kernel_ms

            out[f"{name}_compiled_kernels_ms"] = kernel_ms(lambda c=compiled, d=data: c(d[:1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--store", default="device", help="stages/trace: device, cpu or auto")
    parser.add_argument("--emulate-gib", type=float, default=0, help="a card of G GiB (ballast)")
    parser.add_argument(
        "--store-limit-gib", type=float, default=None, help="stages/trace: store_limit"
    )
    parser.add_argument("--batch", type=int, default=4, help="stages, total: tiles per batch")
    parser.add_argument("--cold", action="store_true", help="stages: no warm-up run")
    parser.add_argument("--parts", default="attention,conv,stages,total")
    parser.add_argument("--attention-runs", default="", help="attention: only these runs")
    parser.add_argument("--crop", type=int, default=576, help="crops: px (a redraw crop)")
    args = parser.parse_args()
    from diffusers import AutoencoderKL

    from bench.vae.measure_tiled_vae import SD_VAE

    dtype = torch.bfloat16
    torch.manual_seed(0)
    if args.emulate_gib:
        from bench.gpu import take_ballast

        ballast = take_ballast(args.emulate_gib)  # noqa: F841 - held for the whole run
    vae = AutoencoderKL(**SD_VAE).to("cuda", dtype).eval()
    parts = args.parts.split(",")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "size": args.size,
        "dtype": "bf16",
        "store": args.store,
    }
    with torch.inference_mode():
        if "attention" in parts:
            only = args.attention_runs.split(",") if args.attention_runs else None
            result["attention"] = attention((args.size // 8) ** 2, 512, dtype, only)
        if "conv" in parts:
            result["conv"] = conv(dtype)
        limit = None if args.store_limit_gib is None else int(args.store_limit_gib * 2**30)
        if "stages" in parts:
            if not args.cold:
                stages(vae, args.size, dtype, args.store, limit, args.batch)  # warm-up
            result["stages"] = stages(vae, args.size, dtype, args.store, limit, args.batch)
        if "crops" in parts:
            result["crops"] = crops(vae, args.crop, dtype)
        if "micro" in parts:
            result["micro"] = micro(dtype)
        if "trace" in parts:
            result["trace"] = trace(vae, args.size, dtype, args.store, limit)
        if "total" in parts:
            result["total"] = totals(vae, args.size, dtype, args.repeats, [], args.batch)
        if "lanes" in parts:  # every GPU but the first takes a band of tile rows
            import copy

            lanes = [
                (copy.deepcopy(vae).to(f"cuda:{i}"), torch.device("cuda", i))
                for i in range(1, torch.cuda.device_count())
            ]
            result["lanes"] = totals(vae, args.size, dtype, args.repeats, lanes, args.batch)
            result["lanes"]["devices"] = 1 + len(lanes)
    emit(result, args.out)


def emit(result: dict[str, Any], out: str | None) -> None:
    """Print ``result`` as JSON and, with ``out``, write it there too."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()

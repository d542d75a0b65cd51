"""GPU benchmark of the whole tileup job, its variants, card sizes and the naive baseline.

One command on the GPU machine measures, with the models loaded and warmed up, each job of the
issue: seconds per stage and in total, FLOPs (``torch.utils.flop_counter``), TFLOP/s and the
share of the H200's 790 TFLOP/s bf16 peak, peak allocated and reserved device memory, and a
hash of the output. Weights are random (full-size SD 1.5 / SDXL architectures built from
tileup's shipped configs by ``bench/diffusion/make_random_checkpoint.py``): weights do not
change speed or memory. The pixel model is the real RealESRGAN_x4plus.

Jobs (SD 1.5, 1024² astronaut → 4096², RealESRGAN_x4plus, 20 steps of Euler a at denoise 0.3,
CFG 7, prompt "a photo", seed 1, bf16, eager):

| job | what | card |
|---|---|---|
| reference | fused, tile 512 / overlap 64 | whole GPU |
| reference_low_vram | the same, default settings | 4 GiB |
| redraw | redraw, linear, tile 512 / padding 32 / mask blur 8 | whole GPU |
| sdxl | SDXL, fused, tile 1024 / overlap 128 | whole GPU |
| sdxl_low_vram | the same | 8 GiB |
| print_8k | the reference job from 2048² to 8192² | 8 GiB |
| two_gpus | the reference job on ``cuda:0,cuda:1`` | two whole GPUs |
| two_gpus_redraw | the redraw job on ``cuda:0,cuda:1`` | two whole GPUs |
| reference_compiled | the reference job with ``--compile`` (warm-up: the job itself, so the
  compilation is in ``warmup_seconds``; ``compile_seconds`` is its share) | whole GPU |
| redraw_compiled | the redraw job with ``--compile`` (warm-up: the job itself) | whole GPU |
| low_vram | the reference job with ``--low-vram`` | whole GPU |
| print_8k_estimated | print_8k with ``--vae-stats estimated`` (opt-in; the goal is for the
  default, exact mode) | 8 GiB |
| card_8gib_estimated | the reference job with ``--vae-stats estimated``: print_8k_estimated's 4K
  counterpart | 8 GiB |
| print_8k_6gib, print_8k_estimated_6gib | print_8k and print_8k_estimated on a smaller card,
  whose peak stays under the 4K job's on 8 GiB | 6 GiB |
| naive | diffusers' img2img per 512² tile (fused grid), one at a time, pasted | whole GPU |

``vram_sweep``: the reference (fused) and redraw jobs on cards of 4, 6, 8, 12 and 24 GiB and the
whole GPU, each with its output's largest difference (in 1/255) from the whole-GPU output of the
same mode (budgets may change only the kernels' float rounding).

A card of G GiB is emulated in its own process: before the engine is built, a ballast tensor of
(free − G GiB) is allocated, so that ``torch.cuda.mem_get_info`` and the caching allocator see
only G GiB; the ballast is subtracted from the reported peaks. Every measured process loads the
models once, runs a warm-up job with the same tile shapes (a 2×2-tile output for fused, 3×3 for
redraw, one tile for naive), resets the peak statistics and runs the measured job once. Peaks
are those of the busiest device.

FLOPs are counted once per job kind (reference, redraw, sdxl, print_8k, naive; they do not
depend on the budget) by ``FlopCounterMode`` around one more, untimed, run of the whole job in
the process of the kind's owner job (for print_8k after the ballast is freed and the engine is
rebuilt, so the count runs on the whole GPU). The naive baseline is counted exactly as the
pixel stage once plus one tile's pipeline call times the number of tiles (every tile has the
same shape and steps). Entries that share a kind take its count; TFLOP/s = FLOPs / seconds.

Results: ``bench/results/gpu.json`` (``device``, ``date``, ``commit``, one object per job,
``vram_sweep``, ``flops`` per kind) and ``bench/results/gpu.md``; every ``run`` merges into the
existing file, so several calls fill one file. Outputs (uint8 ``.npy``) stay under ``--work``.

Here, once (the GPU machine has no ``../shared`` and no diffusers/spandrel)::

    mkdir -p .carry && cp ../shared/models/RealESRGAN_x4plus.safetensors .carry/
    ls .whl   # diffusers, spandrel, torchsde, trampoline wheels (see bench/README.md)

On the GPU machine (device tool, ``carry: [".whl", ".carry"]``), one call per line of the split
in bench/README.md, e.g.::

    T=$(($(date +%s)+570)); python3 -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
    python3 bench/gpu.py prepare --out /tmp/tileup-bench [--sdxl]
    python3 bench/gpu.py run --work /tmp/tileup-bench \
      --sr-model .carry/RealESRGAN_x4plus.safetensors \
      --jobs reference,reference_low_vram,two_gpus --sweep 0,4,6,8,12,24 --sweep-modes fused \
      --deadline $T --mirror $OUT --commit COMMIT

and copy ``gpu.json``/``gpu.md`` from the returned files into ``bench/results/`` before the
next call (they travel with the working tree and the next run merges into them).
``--missing`` runs only what the file lacks (or what an earlier call ran out of time for).

On a CPU (the whole flow at toy sizes, tiny random checkpoints from tests/sd_fixtures.py, no
ballast without CUDA)::

    python bench/gpu.py prepare --smoke --out /tmp/tileup-smoke
    python bench/gpu.py run --smoke --work /tmp/tileup-smoke --results /tmp/tileup-smoke/gpu.json \
        --jobs all --sweep 4,6,8,12,24,0
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: tileup and bench from this checkout
    sys.path.insert(1, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "gpu.json"
PEAK_TFLOPS = 790.0
"""bf16 dense peak of an H200 (an 8192³ bf16 matmul measures 769-798 TFLOP/s there)."""
GIB = 1 << 30
RESULT_PREFIX = "@@tileup-gpu-bench "
WHOLE = 0  # --emulate-gib 0: no ballast, the whole GPU
SR_CANDIDATES = (
    ROOT / ".carry" / "RealESRGAN_x4plus.safetensors",
    ROOT.parent / "shared" / "models" / "RealESRGAN_x4plus.safetensors",
)
PROMPT = "a photo"
SEED = 1
DENOISE = 0.3
CFG = 7.0
SAMPLER = "Euler a"


@dataclass(frozen=True)
class Kind:
    """One job shape: model family, mode, input size and tiles (full size and --smoke size)."""

    family: str  # folder under --work: "sd15" or "sdxl"
    mode: str  # "fused", "redraw" or "naive"
    size: int
    tile: int
    overlap: int
    smoke_size: int = 32
    smoke_tile: int = 64
    smoke_overlap: int = 16
    estimate_s: float = 30.0  # whole-GPU seconds of the measured job, for scheduling only

    def shape(self, smoke: bool) -> tuple[int, int, int]:
        """(input size, tile, overlap)."""
        if smoke:
            return self.smoke_size, self.smoke_tile, self.smoke_overlap
        return self.size, self.tile, self.overlap


KINDS = {
    "sd15_fused": Kind("sd15", "fused", 1024, 512, 64, estimate_s=20),
    "sd15_redraw": Kind("sd15", "redraw", 1024, 512, 0, estimate_s=25),
    "sdxl_fused": Kind("sdxl", "fused", 1024, 1024, 128, estimate_s=45),
    "print_8k": Kind("sd15", "fused", 2048, 512, 64, smoke_size=64, estimate_s=70),
    "naive": Kind("sd15", "naive", 1024, 512, 64, estimate_s=90),
}


@dataclass(frozen=True)
class Job:
    """A named job of the issue: a kind on a card (``gib``: 0 = whole GPU) and device(s)."""

    kind: str
    gib: float
    devices: int = 1
    description: str = ""
    variant: str = ""
    """"" (default settings), "compiled" (--compile), "low_vram" (--low-vram) or
    "estimated_vae" (--vae-stats estimated)."""


JOBS = {
    "reference": Job("sd15_fused", WHOLE, description="SD 1.5 fused, whole GPU"),
    "reference_low_vram": Job("sd15_fused", 4, description="SD 1.5 fused, 4 GiB card"),
    "redraw": Job("sd15_redraw", WHOLE, description="SD 1.5 redraw linear, whole GPU"),
    "sdxl": Job("sdxl_fused", WHOLE, description="SDXL fused, whole GPU"),
    "sdxl_low_vram": Job("sdxl_fused", 8, description="SDXL fused, 8 GiB card"),
    "print_8k": Job("print_8k", 8, description="SD 1.5 fused 2048² → 8192², 8 GiB card"),
    "two_gpus": Job("sd15_fused", WHOLE, devices=2, description="SD 1.5 fused, cuda:0,cuda:1"),
    "two_gpus_redraw": Job(
        "sd15_redraw", WHOLE, devices=2, description="SD 1.5 redraw linear, cuda:0,cuda:1"
    ),
    "reference_compiled": Job(
        "sd15_fused", WHOLE, description="SD 1.5 fused, whole GPU, --compile", variant="compiled"
    ),
    "redraw_compiled": Job(
        "sd15_redraw",
        WHOLE,
        description="SD 1.5 redraw linear, whole GPU, --compile",
        variant="compiled",
    ),
    "low_vram": Job(
        "sd15_fused", WHOLE, description="SD 1.5 fused, --low-vram", variant="low_vram"
    ),
    "naive": Job("naive", WHOLE, description="diffusers img2img per 512² tile, whole GPU"),
    "print_8k_estimated": Job(
        "print_8k",
        8,
        description="SD 1.5 fused 2048² → 8192², 8 GiB card, --vae-stats estimated",
        variant="estimated_vae",
    ),
    "print_8k_6gib": Job(
        "print_8k",
        6,
        description="SD 1.5 fused 2048² → 8192², 6 GiB card: a peak below the 4K job's",
    ),
    "print_8k_estimated_6gib": Job(
        "print_8k",
        6,
        description="SD 1.5 fused 2048² → 8192², 6 GiB card, --vae-stats estimated",
        variant="estimated_vae",
    ),
    "card_8gib_estimated": Job(
        "sd15_fused",
        8,
        description="SD 1.5 fused, 8 GiB card, --vae-stats estimated",
        variant="estimated_vae",
    ),
}
FLOP_OWNERS = {"sd15_fused": "reference", "sd15_redraw": "redraw", "sdxl_fused": "sdxl"}
FLOP_OWNERS |= {"print_8k": "print_8k", "naive": "naive"}
SWEEP_JOBS = {"fused": "reference", "redraw": "redraw"}
BASELINES = {
    "reference_low_vram": "reference",
    "sdxl_low_vram": "sdxl",
    "two_gpus": "reference",
    "two_gpus_redraw": "redraw",
    "reference_compiled": "reference",
    "redraw_compiled": "redraw",
    "low_vram": "reference",
    "print_8k_estimated": "print_8k",
    "card_8gib_estimated": "reference",
    "print_8k_6gib": "print_8k",
    "print_8k_estimated_6gib": "print_8k_estimated",
}


def _card(gib: float, devices: int = 1) -> str:
    whole = "whole GPU" if devices == 1 else f"{devices} whole GPUs"
    return whole if gib == WHOLE else f"{gib:g} GiB"


def _device_name(devices: int, cuda: bool) -> str:
    """The --device of a job; several GPUs are asked for as such, also where there are none."""
    if devices > 1:
        return ",".join(f"cuda:{i}" for i in range(devices))
    return "cuda" if cuda else "cpu"


def _photo(size: int) -> np.ndarray:
    from bench.diffusion.bench_job import _photo as photo  # skimage's astronaut, resized

    return photo(size)


def _error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# -- prepare ---------------------------------------------------------------------------------


def _write_folder(target: Path, make: Any) -> None:
    """Build a checkpoint folder next to ``target`` and move it in place when complete."""
    if (target / "model_index.json").exists():
        print(f"{target}: already there", file=sys.stderr)
        return
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    make(partial)
    partial.rename(target)
    print(f"{target}: written in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def prepare(out: Path, *, sdxl: bool, smoke: bool) -> None:
    """Write the random-weight checkpoint folders ``out/sd15`` (and ``out/sdxl``)."""
    out.mkdir(parents=True, exist_ok=True)
    families = ["sd15", "sdxl"] if sdxl or smoke else ["sd15"]
    for family in families:
        if smoke:
            sys.path.insert(0, str(ROOT / "tests"))
            from sd_fixtures import make_tiny_components, save_diffusers_folder

            tiny = "sd1" if family == "sd15" else "sdxl"

            def make(folder: Path, tiny: str = tiny) -> None:
                save_diffusers_folder(make_tiny_components(tiny, seed=0), folder, tiny)

        else:

            def make(folder: Path, family: str = family) -> None:
                import torch

                from bench.diffusion.make_random_checkpoint import main as make_checkpoint

                if torch.cuda.is_available():  # random init on the GPU: seconds, not a minute
                    try:
                        with torch.device("cuda"):
                            make_checkpoint(family, str(folder))
                        return
                    except Exception as exc:
                        print(f"GPU init failed ({_error(exc)}); on the CPU", file=sys.stderr)
                        shutil.rmtree(folder, ignore_errors=True)
                make_checkpoint(family, str(folder))

        _write_folder(out / family, make)


# -- one measured process --------------------------------------------------------------------


@dataclass
class Ballast:
    """Device memory held so that only ``gib`` GiB stay free (a smaller card)."""

    tensor: Any
    allocated: int
    reserved: int
    info: dict[str, Any]


def take_ballast(gib: float) -> Ballast:
    """Allocate (free − gib GiB) on the current CUDA device (nothing for the whole GPU, 0)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    info: dict[str, Any] = {"requested_gib": gib, "free_before_gib": round(free / GIB, 3)}
    info["total_gib"] = round(total / GIB, 3)
    if gib == WHOLE:
        return Ballast(None, 0, 0, info)
    want = int(gib * GIB)
    if want > free:
        raise RuntimeError(f"cannot emulate a {gib:g} GiB card: only {free / GIB:.2f} GiB free")
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    # large blocks are rounded up to 2 MiB: ask for that much less so the block fits
    tensor = torch.empty(max(free - want - (2 << 20), 1), dtype=torch.uint8, device="cuda")
    ballast = Ballast(
        tensor,
        torch.cuda.memory_allocated() - allocated,
        torch.cuda.memory_reserved() - reserved,
        info,
    )
    info["ballast_gib"] = round(ballast.reserved / GIB, 3)
    info["free_after_gib"] = round(torch.cuda.mem_get_info()[0] / GIB, 3)
    return ballast


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def _measured() -> AbstractContextManager[Any]:
    """A :mod:`tileup.peaks` window over every CUDA device: the measured run's peaks, whatever
    the job resets inside (its stages, the SR probe)."""
    import torch

    from tileup import peaks

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return peaks.window([torch.device("cuda", i) for i in range(count)])


def _peaks(
    devices: int, window: Any, ballast: Ballast | None, cpu_peak: int | None
) -> dict[str, Any]:
    """Peak allocated / reserved GiB of the busiest device in the closed ``window``, the
    ballast taken off."""
    import torch

    if not torch.cuda.is_available():
        return {
            "peak_allocated_gib": None if cpu_peak is None else round(cpu_peak / GIB, 3),
            "peak_reserved_gib": None,
            "peak_note": "CPU: the process's peak resident memory",
        }
    held = (ballast.allocated, ballast.reserved) if ballast else (0, 0)
    alloc = [window.allocated[i] for i in range(devices)]
    reserved = [window.reserved[i] for i in range(devices)]
    alloc[0] -= held[0]
    reserved[0] -= held[1]
    out: dict[str, Any] = {
        "peak_allocated_gib": round(max(alloc) / GIB, 3),
        "peak_reserved_gib": round(max(reserved) / GIB, 3),
        # cudaMalloc failures the allocator survived by freeing its cache (each one a sync)
        "alloc_retries": sum(
            torch.cuda.memory_stats(i).get("num_alloc_retries", 0) for i in range(devices)
        ),
    }
    if devices > 1:
        out["peak_allocated_gib_per_device"] = [round(a / GIB, 3) for a in alloc]
    return out


def _as_uint8(rgb: np.ndarray) -> np.ndarray:
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _digest(image: np.ndarray) -> str:
    h = hashlib.sha256(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()[:16]


def output_path(work: Path, kind: str, gib: float, devices: int, variant: str = "") -> Path:
    gpus = f"-{devices}gpu" if devices > 1 else ""
    more = f"-{variant}" if variant else ""
    return work / "outputs" / f"{kind}-{_card(gib).replace(' ', '')}{gpus}{more}.npy"


def _mm_flops(a_shape: Any, b_shape: Any, *_: Any, **__: Any) -> int:
    """2·m·k·n for an m×k by k×n product, whatever else the overload takes (``out_dtype``)."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _addmm_flops(_self_shape: Any, a_shape: Any, b_shape: Any, *_: Any, **__: Any) -> int:
    """:func:`_mm_flops` of ``addmm``'s product (the addition is not counted, as PyTorch's)."""
    return _mm_flops(a_shape, b_shape)


def flop_formulas() -> dict[Any, Any]:
    """``mm`` and ``addmm`` formulas for every overload: PyTorch 2.11's ``addmm`` formula fails
    on the ``out_dtype`` overload the tiled VAE's attention calls (``TypeError: addmm_flop() got
    multiple values for argument 'out_shape'``)."""
    import torch

    return {torch.ops.aten.mm: _mm_flops, torch.ops.aten.addmm: _addmm_flops}


def _count_flops(fn: Any) -> tuple[int, dict[str, int], float]:
    """FLOPs of ``fn()`` (total, per top-level module) and the seconds the count took."""
    from torch.utils.flop_counter import FlopCounterMode

    start = time.perf_counter()
    with FlopCounterMode(display=False, depth=1, custom_mapping=flop_formulas()) as counter:
        fn()
    _sync()
    total = int(counter.get_total_flops())
    by_module = {
        name: int(sum(ops.values()))
        for name, ops in counter.get_flop_counts().items()
        if name != "Global" and "." not in name
    }
    by_module["outside any top-level module"] = total - sum(by_module.values())
    return total, by_module, time.perf_counter() - start


@dataclass(frozen=True)
class OneArgs:
    job: str
    gib: float
    work: Path
    sr_model: str
    steps: int
    flops: bool
    smoke: bool
    trace: Path | None = None
    full_warmup: bool = False


def _engine_settings(
    o: OneArgs, kind: Kind, device: str, checkpoint: str | None, job: Job | None = None
) -> Any:
    from tileup import UpscaleSettings

    _, tile, overlap = kind.shape(o.smoke)
    mode = "fused" if kind.mode == "naive" else kind.mode
    extra: dict[str, Any] = {"overlap": overlap} if mode == "fused" else {"order": "linear"}
    if checkpoint is None:
        return UpscaleSettings(upscaler=o.sr_model, scale=4, device=device)
    return UpscaleSettings(
        checkpoint=checkpoint,
        upscaler=o.sr_model,
        scale=4,
        steps=o.steps,
        denoise=DENOISE,
        cfg=CFG,
        sampler=SAMPLER,
        prompt=PROMPT,
        seed=SEED,
        tile=tile,
        mode=mode,
        device=device,
        compile=job is not None and job.variant == "compiled",
        low_vram=job is not None and job.variant == "low_vram",
        vae_stats="estimated" if job is not None and job.variant == "estimated_vae" else "exact",
        **extra,
    )


def _warm_size(kind: Kind, smoke: bool) -> int:
    """Input size of the warm-up job: an output of 2×2 tiles (fused; so every tile and VAE
    shape occurs), 3×3 (redraw: inner crops too) or one tile (naive: one pipeline call)."""
    size, tile, _ = kind.shape(smoke)
    tiles = {"redraw": 3, "naive": 1}.get(kind.mode, 2)
    return min(size, tiles * tile // 4)


def _engine_job(o: OneArgs, kind: Kind, job: Job, rec: dict[str, Any]) -> np.ndarray:
    import torch

    from tileup import Upscaler
    from tileup.imageio import read_image

    cuda = torch.cuda.is_available()
    device = _device_name(job.devices, cuda)
    rec["device_setting"] = device
    rec["environment"] = {k: v for k, v in os.environ.items() if k.startswith("TILEUP_")}
    settings = _engine_settings(o, kind, device, str(o.work / kind.family), job)
    ballast = take_ballast(o.gib) if cuda and job.devices == 1 else None
    rec["emulation"] = ballast.info if ballast else ({} if cuda else {"skipped": "no CUDA"})
    start = time.perf_counter()
    engine = Upscaler(settings)
    rec["load_seconds"] = round(time.perf_counter() - start, 3)
    size = kind.shape(o.smoke)[0]
    picture = read_image(_photo(size), max_pixels=settings.max_pixels)
    # compiled: the warm-up is the job itself (its UNet batch shapes are compiled then)
    whole = job.variant == "compiled" or o.full_warmup
    warm_size = kind.shape(o.smoke)[0] if whole else _warm_size(kind, o.smoke)
    rec["warmup"] = "the job itself" if whole else f"a {warm_size}² picture"
    warm = read_image(_photo(warm_size), max_pixels=settings.max_pixels)
    start = time.perf_counter()
    warmed = engine(warm)
    _sync()
    rec["warmup_seconds"] = round(time.perf_counter() - start, 3)
    if "compile" in warmed.stats.seconds:  # --compile's one-time cost, reported apart
        rec["compile_seconds"] = warmed.stats.seconds["compile"]
    with _measured() as window:
        start = time.perf_counter()
        result = engine(picture)
        _sync()
        rec["seconds"] = round(time.perf_counter() - start, 3)
    stats = result.stats.as_dict()
    rec["stages"] = stats["seconds"]
    rec.update(_peaks(job.devices, window, ballast, stats["peak_memory_bytes"]))
    held = ballast.allocated if ballast else 0
    rec["stage_peak_gib"] = {
        k: round((v - held) / GIB, 3) for k, v in stats["stage_peak_bytes"].items()
    }
    for key in ("tiles", "tile_steps", "steps_per_tile", "pixel_tiles", "memory_plan"):
        rec[key] = stats.get(key)
    rec["fallbacks"] = stats["fallbacks"]
    rec["passes"] = stats["passes"]
    rec["output_size"] = stats["output_size"]
    rec["input_size"] = stats["input_size"]
    image = _as_uint8(result.picture.rgb)
    del result
    if o.trace is not None:
        rec["trace"] = _trace(lambda: engine(picture), o.trace, f"{o.job}-{_card(o.gib)}")
    if o.flops:
        if ballast is not None and ballast.tensor is not None:  # count on the whole GPU
            del engine
            ballast.tensor = None
            gc.collect()
            torch.cuda.empty_cache()
            engine = Upscaler(settings)
            rec["flops_card"] = "whole GPU (ballast freed, engine rebuilt)"
        try:
            flops, by_module, seconds = _count_flops(lambda: engine(picture))
        except Exception as exc:  # the measurement stands; only the count is missing
            traceback.print_exc()
            rec["flops_error"] = _error(exc)
            return image
        rec["flops"], rec["flops_by_module"] = flops, by_module
        rec["flops_seconds"] = round(seconds, 3)
        rec["flops_method"] = "FlopCounterMode around one untimed run of the whole job"
    return image


def _trace(fn: Callable[[], object], folder: Path, name: str) -> str:
    """One more untimed run under ``torch.profiler``: the top CUDA kernels and CPU ops (and
    each device's busy time) written to ``folder/trace-NAME.txt``; returns that path."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    )
    with profile(activities=activities) as prof:
        fn()
        _sync()
    table = prof.key_averages()
    busy: dict[int, float] = {}
    spans: dict[int, list[tuple[float, float, str]]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            seconds = getattr(event, "device_time", 0.0) / 1e6
            busy[event.device_index] = busy.get(event.device_index, 0.0) + seconds
            window = event.time_range
            spans.setdefault(event.device_index, []).append(
                (window.start / 1e6, window.end / 1e6, event.name)
            )
    start = time.perf_counter()
    sites = _sync_sites(fn) if torch.cuda.is_available() else "no CUDA: no syncs to find"
    text = "\n\n".join(
        [
            f"device busy seconds (sum of kernel and copy times): {busy}",
            idle_gaps(spans),
            table.table(sort_by="cuda_time_total" if busy else "cpu_time_total", row_limit=30),
            table.table(sort_by="self_cpu_time_total", row_limit=20),
            f"host syncs (one more run, {time.perf_counter() - start:.1f} s under"
            f" torch.cuda.set_sync_debug_mode('warn')), by call site:\n{sites}",
        ]
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"trace-{name.replace(' ', '_')}.txt"
    path.write_text(text + "\n")
    return str(path)


def idle_gaps(spans: dict[int, list[tuple[float, float, str]]], top: int = 15) -> str:
    """Each device's idle time between its first and last kernel or copy (``spans``: start and
    end seconds and name of each), and its ``top`` longest gaps with the names on either side
    and when they began (seconds from the device's first event)."""
    lines = []
    for device, events in sorted(spans.items()):
        events.sort()
        first, reach, last = events[0][0], events[0][1], events[0][2]
        gaps: list[tuple[float, float, str, str]] = []
        for start, end, name in events[1:]:
            if start > reach:
                gaps.append((start - reach, reach - first, last[:60], name[:60]))
            if end > reach:
                reach, last = end, name
        idle = sum(g[0] for g in gaps)
        lines.append(
            f"device {device}: {reach - first:.3f} s from first to last event, idle {idle:.3f} s"
            f" in {len(gaps)} gaps ({sum(g[0] for g in gaps if g[0] >= 1e-3):.3f} s in gaps"
            " of 1 ms or more); the longest:"
        )
        for gap, at, before, after in sorted(gaps, reverse=True)[:top]:
            lines.append(f"  {gap * 1e3:8.2f} ms at {at:7.3f} s  after {before}  before {after}")
    return "\n".join(lines) or "no device events"


def _sync_sites(fn: Callable[[], object], frames: int = 4) -> str:
    """Run ``fn`` with CUDA sync warnings on; the host syncs counted by their innermost
    ``frames`` Python frames inside tileup or diffusers, most frequent first."""
    import warnings
    from collections import Counter

    import torch

    counts: Counter[str] = Counter()

    def record(message: Any, category: Any, *_: Any, **__: Any) -> None:
        if "synchroniz" not in str(message):  # other warnings (numpy's, diffusers') are not syncs
            return
        stack = [
            f"{Path(f.filename).name}:{f.lineno} {f.name}"
            for f in traceback.extract_stack()[:-1]
            if "/tileup/" in f.filename or "/diffusers/" in f.filename
        ]
        counts[" < ".join(reversed(stack[-frames:])) or str(message)[:80]] += 1

    shown = warnings.showwarning
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            fn()
            _sync()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = shown
    return "\n".join(f"{n:6d}  {site}" for site, n in counts.most_common(40)) or "none"


def img2img_steps(steps: int, denoise: float) -> int:
    """``num_inference_steps`` that makes diffusers' img2img run exactly ``steps`` steps: it
    runs ``int(n * strength)`` of them (``int(20 / 0.3) = 66`` would run 19; 67 runs 20)."""
    n = max(steps, int(steps / denoise))
    while int(n * denoise) < steps:
        n += 1
    return n


def _naive_job(o: OneArgs, kind: Kind, job: Job, rec: dict[str, Any]) -> np.ndarray:
    """What a user would write: SR upscale, then img2img on each tile, one at a time."""
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline

    from tileup import Upscaler
    from tileup.imageio import read_image
    from tileup.tiler import plan_grid

    cuda = torch.cuda.is_available()
    device = _device_name(1, cuda)
    dtype = torch.bfloat16 if cuda else torch.float32
    os.environ.pop("TILEUP_CHECKPOINT", None)  # the pixel engine must not re-diffuse
    settings = _engine_settings(o, kind, device, None)
    ballast = take_ballast(o.gib) if cuda else None
    rec["emulation"] = ballast.info if ballast else {"skipped": "no CUDA"}
    size, tile, overlap = kind.shape(o.smoke)
    start = time.perf_counter()
    pixel = Upscaler(settings)
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        str(o.work / kind.family),
        torch_dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
    ).to(device)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rec["load_seconds"] = round(time.perf_counter() - start, 3)
    n_steps = img2img_steps(o.steps, DENOISE)
    calls: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))

    def one_tile(crop: np.ndarray, generator: torch.Generator) -> np.ndarray:
        out = pipe(
            PROMPT,
            image=crop[None],
            strength=DENOISE,
            num_inference_steps=n_steps,
            guidance_scale=CFG,
            generator=generator,
            output_type="np",
        ).images[0]
        return np.asarray(out, dtype=np.float32)

    def run(picture: Any) -> tuple[np.ndarray, dict[str, float], int]:
        start = time.perf_counter()
        big = pixel(picture).picture.rgb
        _sync()
        upscaled = time.perf_counter()
        canvas = big.copy()
        grid = plan_grid(big.shape[0], big.shape[1], tile, overlap)
        generator = torch.Generator(device).manual_seed(SEED)
        for t in grid.tiles:
            rows, cols = t.box.slices
            canvas[rows, cols] = one_tile(big[rows, cols], generator)
        _sync()
        end = time.perf_counter()
        return (
            canvas,
            {"pixel_upscale": upscaled - start, "img2img_tiles": end - upscaled},
            len(grid),
        )

    settings_max = settings.max_pixels
    picture = read_image(_photo(size), max_pixels=settings_max)
    start = time.perf_counter()
    run(read_image(_photo(_warm_size(kind, o.smoke)), max_pixels=settings_max))
    rec["warmup_seconds"] = round(time.perf_counter() - start, 3)
    calls.clear()
    with _measured() as window:
        start = time.perf_counter()
        canvas, stages, tiles = run(picture)
        rec["seconds"] = round(time.perf_counter() - start, 3)
    rec["stages"] = {k: round(v, 4) for k, v in stages.items()}
    cpu_peak = None
    if not cuda:
        import resource

        cpu_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rec.update(_peaks(1, window, ballast, cpu_peak))
    rec["tiles"], rec["unet_calls"] = tiles, len(calls)
    rec["tile_steps"] = len(calls)
    rec["steps_per_tile"] = len(calls) / tiles
    rec["unet_batch"] = max(calls) if calls else None
    rec["num_inference_steps"] = n_steps
    rec["input_size"] = [size, size]
    rec["output_size"] = [canvas.shape[1], canvas.shape[0]]
    if len(calls) != tiles * o.steps:
        raise RuntimeError(f"{len(calls)} UNet calls for {tiles} tiles × {o.steps} steps")
    image = _as_uint8(canvas)
    if o.flops:
        pixel_flops, by_pixel, s1 = _count_flops(lambda: pixel(picture))
        crop = canvas[:tile, :tile]  # any tile: the count does not depend on the pixels
        generator = torch.Generator(device).manual_seed(SEED)
        tile_flops, by_tile, s2 = _count_flops(lambda: one_tile(crop, generator))
        rec["flops"] = pixel_flops + tiles * tile_flops
        by_module = dict(by_pixel)
        for name, count in by_tile.items():
            by_module[name] = by_module.get(name, 0) + count * tiles
        rec["flops_by_module"] = by_module
        rec["flops_seconds"] = round(s1 + s2, 3)
        rec["flops_method"] = (
            "FlopCounterMode: the pixel stage once + one tile's pipeline call × tiles "
            "(every tile has the same shape and steps)"
        )
    return image


def one(o: OneArgs) -> dict[str, Any]:
    """Run one job (``o.job`` on a card of ``o.gib`` GiB) in this process; its JSON record."""
    import torch

    job = JOBS[o.job]
    kind = KINDS[job.kind]
    rec: dict[str, Any] = {
        "job": o.job,
        "kind": job.kind,
        "mode": kind.mode,
        "card": _card(o.gib, job.devices),
        "gib": o.gib,
        "devices": job.devices,
        "smoke": o.smoke,
        "steps": o.steps,
        "date": _now(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        "host": platform.node(),  # the same job varies by ~7 % between hosts of one kind
        "error": None,
    }
    try:
        import diffusers

        rec["diffusers"] = diffusers.__version__
        if torch.cuda.is_available() and not o.smoke:
            try:  # never the job's error
                rec["calibration"] = calibrate()
            except Exception as exc:
                rec["calibration"] = {"error": _error(exc)}
        if job.devices > torch.cuda.device_count() and torch.cuda.is_available():
            rec["note"] = f"{torch.cuda.device_count()} CUDA device(s) on this machine"
        path = output_path(o.work, job.kind, o.gib, job.devices, job.variant)
        path.unlink(missing_ok=True)  # never compare with an output of an earlier run
        run = _naive_job if kind.mode == "naive" else _engine_job
        image = run(o, kind, job, rec)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, image)
        rec["output_sha256"] = _digest(image)
    except Exception as exc:  # a failed job is a result: record it and go on
        traceback.print_exc()
        rec["error"] = _error(exc)
    return rec


def calibrate() -> dict[str, float]:
    """What this host and GPU do on three fixed loads, measured before the job (~1 s), so that
    entries from different hosts can be told apart (one job and commit measured 10.26 and 11.01
    s on two H200 hosts): bf16 GEMM TFLOP/s (8192³), microseconds per launch of a one-element
    kernel as the host queues them, and seconds of a fixed pure-Python loop."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(40):
        a @ a
    torch.cuda.synchronize()
    gemm = 40 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12
    one = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5000):
        one.add_(1)
    launch = (time.perf_counter() - start) / 5000 * 1e6
    torch.cuda.synchronize()
    start = time.perf_counter()
    total = 0
    for i in range(2_000_000):
        total += i & 7
    python = time.perf_counter() - start
    del a, one
    torch.cuda.empty_cache()
    return {
        "gemm_tflops": round(gemm, 1),
        "launch_us": round(launch, 2),
        "python_loop_s": round(python, 3),
    }


# -- run: processes, merge, write --------------------------------------------------------------


@dataclass
class Process:
    """One measured process: a job on a card; which job and sweep entries it fills."""

    job: str  # the job the child runs (its kind and devices)
    gib: float
    jobs: list[str]
    sweep_mode: str | None = None
    flops: bool = False

    @property
    def spec(self) -> Job:
        return JOBS[self.job]

    @property
    def key(self) -> tuple[str, float, int, str]:
        return (self.spec.kind, self.gib, self.spec.devices, self.spec.variant)


def plan(jobs: list[str], sweep: list[float], modes: list[str]) -> list[Process]:
    """The unique processes the jobs and sweep entries need, whole-GPU baselines first. A sweep
    entry that is a job's run (the whole GPU: reference / redraw; fused at 4 GiB:
    reference_low_vram) fills that job's entry too, asked for or not: one measurement, one
    figure."""
    procs: dict[tuple[str, float, int, str], Process] = {}
    for name in jobs:
        spec = JOBS[name]
        key = (spec.kind, spec.gib, spec.devices, spec.variant)
        procs.setdefault(key, Process(name, spec.gib, [])).jobs.append(name)
    for mode in modes:
        job = SWEEP_JOBS[mode]
        for gib in sweep:
            spec = JOBS[job]
            proc = procs.setdefault((spec.kind, gib, 1, ""), Process(job, gib, []))
            proc.sweep_mode = mode
            proc.jobs.extend(
                name
                for name, other in JOBS.items()
                if (other.kind, other.gib, other.devices, other.variant) == proc.key
                and name not in proc.jobs
            )
    kinds = list(KINDS)
    return sorted(
        procs.values(), key=lambda p: (p.gib != WHOLE, kinds.index(p.spec.kind), p.key[2], p.gib)
    )


def estimate(proc: Process, smoke: bool) -> float:
    """Rough seconds of a process (start and load, warm-up, job, FLOP count): scheduling only.
    Small cards are slower (models parked or streamed, the VAE store on the host)."""
    if smoke:
        return 0.0
    base = KINDS[proc.spec.kind].estimate_s
    g = proc.gib
    slow = 1 if g == WHOLE else 1.2 if g >= 24 else 1.8 if g >= 12 else 2.5 if g >= 6 else 3
    count = 0 if not proc.flops else 5 if proc.spec.kind == "naive" else base
    compiled = base + 120 if proc.spec.variant == "compiled" else 0  # job as warm-up + compile
    return 20 + base * (slow + 0.2) + count + compiled


def launch(proc: Process, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """Run ``one`` in a child process; its record (or an error record)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "one", "--job", proc.job]
    cmd += ["--emulate-gib", f"{proc.gib:g}", "--work", str(args.work)]
    cmd += ["--sr-model", args.sr_model, "--steps", str(args.steps)]
    cmd += ["--flops"] if proc.flops else []
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--trace", str(args.trace)] if args.trace else []
    cmd += ["--full-warmup"] if args.full_warmup else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    child = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    tail: deque[str] = deque(maxlen=15)
    lines: list[str] = []

    def echo() -> None:  # the child's log goes on to ours; its last lines name a crash
        assert child.stderr is not None
        for line in child.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip())

    def collect() -> None:
        assert child.stdout is not None
        lines.extend(child.stdout)

    readers = [threading.Thread(target=f, daemon=True) for f in (echo, collect)]
    for reader in readers:
        reader.start()
    try:
        child.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        timed_out = True
    for reader in readers:
        reader.join(timeout=10)
    stdout = "".join(lines)
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return dict(json.loads(line[len(RESULT_PREFIX) :]))
    rec: dict[str, Any] = {"job": proc.job, "kind": proc.spec.kind, "gib": proc.gib}
    rec |= {"card": _card(proc.gib, proc.spec.devices), "date": _now(), "seconds": None}
    if timed_out and timeout < args.timeout:  # the call's deadline: --missing runs it again
        rec["error"] = f"not finished: the call's deadline stopped it after {timeout:.0f} s"
    elif timed_out:  # its own limit: a result
        rec["error"] = f"timeout: stopped after {timeout:.0f} s (--timeout)"
    else:
        last = next((x for x in reversed(tail) if x.strip()), "")
        rec["error"] = f"process exited with {child.returncode}: {last}"[:500]
    return rec


# fmt: off
JOB_FIELDS = (
    "job", "description", "kind", "mode", "card", "device", "host", "device_setting", "seconds",
    "stages",
    "flops", "tflops", "share_of_peak", "peak_allocated_gib", "peak_reserved_gib",
    "peak_allocated_gib_per_device", "stage_peak_gib", "peak_note", "tiles", "tile_steps",
    "steps_per_tile",
    "pixel_tiles", "unet_calls", "unet_batch", "num_inference_steps", "passes", "memory_plan",
    "fallbacks", "input_size", "output_size", "output_sha256", "max_abs_diff_255",
    "differing_fraction", "compared_with", "emulation", "load_seconds", "warmup", "warmup_seconds",
    "compile_seconds", "steps", "smoke", "environment", "calibration", "note", "error",
    "flops_error", "date",
    "commit", "torch", "diffusers",
)
SWEEP_FIELDS = (
    "vram_gib", "mode", "whole_gpu", "seconds", "stages", "tflops", "share_of_peak",
    "peak_allocated_gib", "peak_reserved_gib", "stage_peak_gib", "memory_plan", "fallbacks",
    "output_sha256",
    "max_abs_diff_255", "differing_fraction", "compared_with", "emulation", "environment",
    "host", "calibration", "error", "date", "commit",
)
# fmt: on


def _pick(rec: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {k: rec.get(k) for k in fields if k in rec}


def _signature(args: argparse.Namespace) -> str:
    """What a FLOP count depends on besides the job kind (a count made otherwise is redone)."""
    return f"{Path(args.sr_model).name}, {args.steps} steps" + (", smoke" if args.smoke else "")


def merge(
    data: dict[str, Any], proc: Process, rec: dict[str, Any], commit: str, args: argparse.Namespace
) -> None:
    """Put a process's record into the job entries and the sweep entry it fills."""
    rec["commit"] = commit
    if rec.get("flops") is not None:
        data.setdefault("flops", {})[proc.spec.kind] = {
            "flops": rec["flops"],
            "by_top_level_module": rec.get("flops_by_module"),
            "method": rec.get("flops_method"),
            "card": rec.get("flops_card", rec.get("card")),
            "count_seconds": rec.get("flops_seconds"),
            "signature": _signature(args),
            "commit": commit,
            "date": rec.get("date"),
        }
    for name in proc.jobs:
        entry = _pick(rec, JOB_FIELDS)
        entry["job"], entry["description"] = name, JOBS[name].description
        data[name] = {k: entry.get(k) for k in JOB_FIELDS if k in entry}
    if proc.sweep_mode is not None:
        entry = _pick(rec, SWEEP_FIELDS)
        entry["mode"] = proc.sweep_mode
        entry["whole_gpu"] = proc.gib == WHOLE
        free = (rec.get("emulation") or {}).get("free_before_gib")
        entry["vram_gib"] = free if proc.gib == WHOLE else proc.gib
        sweep = [
            e
            for e in data.get("vram_sweep", [])
            if not (e.get("mode") == proc.sweep_mode and _sweep_gib(e) == proc.gib)
        ]
        sweep.append({k: entry.get(k) for k in SWEEP_FIELDS if k in entry})
        data["vram_sweep"] = sweep


def _sweep_gib(entry: dict[str, Any]) -> float:
    return WHOLE if entry.get("whole_gpu") else float(entry["vram_gib"])


def _diff(path: Path, base: Path) -> tuple[int, float, str] | None:
    if not (path.exists() and base.exists()):
        return None
    a, b = np.load(path), np.load(base)
    if a.shape != b.shape:
        return None
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), round(float((d > 0).mean()), 6), _digest(b)


def compare(data: dict[str, Any], work: Path) -> None:
    """Fill the output differences from the whole-GPU output of the same mode (low-VRAM jobs
    against their whole-GPU job, sweep entries against the whole-GPU entry of their mode)."""
    for name, base in BASELINES.items():
        entry = data.get(name)
        if not entry or entry.get("error") or not data.get(base):
            continue
        job, ref = JOBS[name], JOBS[base]
        got = _diff(
            output_path(work, job.kind, job.gib, job.devices, job.variant),
            output_path(work, ref.kind, ref.gib, ref.devices, ref.variant),
        )
        if got:
            entry["max_abs_diff_255"], entry["differing_fraction"], sha = got
            entry["compared_with"] = f"{base} (output {sha})"
    for entry in data.get("vram_sweep", []):
        if entry.get("error") or entry.get("whole_gpu"):
            continue
        kind = JOBS[SWEEP_JOBS[entry["mode"]]].kind
        got = _diff(
            output_path(work, kind, _sweep_gib(entry), 1), output_path(work, kind, WHOLE, 1)
        )
        if got:
            entry["max_abs_diff_255"], entry["differing_fraction"], sha = got
            entry["compared_with"] = f"whole GPU, {entry['mode']} (output {sha})"


def derive(data: dict[str, Any]) -> None:
    """TFLOP/s and share of peak from each kind's FLOP count and each entry's seconds; the
    two-GPU entry keeps the one-GPU reference of its own commit (``one_gpu_reference``, while
    both entries share one), so that a later reference alone does not pair other code."""
    one, two = data.get("reference"), data.get("two_gpus")
    if _ran(one) and _ran(two) and one.get("commit") == two.get("commit"):
        two["one_gpu_reference"] = {k: one[k] for k in ("seconds", "commit")}
    flops = data.get("flops", {})
    entries = [
        (data[name], JOBS[name].devices) for name in JOBS if isinstance(data.get(name), dict)
    ]
    for e in data.get("vram_sweep", []):
        e["kind"] = JOBS[SWEEP_JOBS[e["mode"]]].kind
        entries.append((e, 1))
    for e, devices in entries:
        count = (flops.get(e.get("kind")) or {}).get("flops")
        seconds = e.get("seconds")
        ok = count is not None and seconds and not e.get("error")
        if "vram_gib" not in e:
            e["flops"] = count if ok else None
        e["tflops"] = round(count / seconds / 1e12, 2) if ok else None
        # the share of the peak of every GPU the job ran on
        e["share_of_peak"] = round(e["tflops"] / PEAK_TFLOPS / devices, 4) if ok else None
    for e in data.get("vram_sweep", []):
        e.pop("kind", None)


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "–"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _short(text: str | None, n: int = 90) -> str:
    if not text:
        return ""
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


STAGE_NAMES = {
    "pixel_upscale": "pixel",
    "vae_encode": "enc",
    "diffusion": "diff",
    "vae_decode": "dec",
    "redraw": "redraw",
    "seam_fix": "seam",
    "img2img_tiles": "img2img",
}


def _stages(stages: dict[str, float] | None) -> str:
    if not stages:
        return "–"
    return " · ".join(f"{STAGE_NAMES.get(k, k)} {v:.2f}" for k, v in stages.items() if v >= 0.005)


def _at(e: dict[str, Any]) -> str:
    """An entry's seconds with its commit: the figures of a goal may come from other builds."""
    return f"{e['seconds']:.2f} s ({e.get('commit', '?')})"


def _ran(e: Any) -> bool:
    return isinstance(e, dict) and not e.get("error") and e.get("seconds") is not None


def _print_8k_text(data: dict[str, Any], card_4k: dict[str, Any]) -> str:
    """The 8192² goal's figures: print_8k (default, exact statistics: the one the goal judges)
    against the 4K job on the same 8 GiB card, then the same print on a 6 GiB card (a peak below
    the 4K job's) and with ``--vae-stats estimated`` (opt-in), that also against the 4K job
    estimated."""

    def against(name: str, base: dict[str, Any]) -> str:
        e = data[name]
        return f"{_at(e)} = {e['seconds'] / base['seconds']:.2f}× at {e['peak_allocated_gib']} GiB"

    parts = [f"4K on 8 GiB {_at(card_4k)} at {card_4k['peak_allocated_gib']} GiB"]
    same = data.get("card_8gib_estimated")
    for name, label in (
        ("print_8k", "print_8k"),
        ("print_8k_6gib", "on a 6 GiB card"),
        ("print_8k_estimated", "--vae-stats estimated (opt-in)"),
        ("print_8k_estimated_6gib", "estimated on a 6 GiB card"),
    ):
        if _ran(data.get(name)):
            text = f"{label} {against(name, card_4k)}"
            if "estimated" in name and _ran(same):  # the same setting on both sides
                ratio = data[name]["seconds"] / same["seconds"]
                text += f" ({ratio:.2f}× the 4K job estimated, {_at(same)} at "
                text += f"{same['peak_allocated_gib']} GiB)"
            parts.append(text)
    return "; ".join(parts)


def goals(data: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Issue 11's goals against the entries: (goal, figures with their commits, met); met is
    None where an entry is missing. Ratios pair the entries as they are (see their commits)."""
    rows: list[tuple[str, str, bool | None]] = []

    def limit(goal: str, names: Sequence[str], most: float) -> None:
        found = [(n, data[n]) for n in names if _ran(data.get(n))]
        figures = ", ".join(f"{n} {_at(e)}" for n, e in found) or "not measured"
        met = any(e["seconds"] <= most for _, e in found) if found else None
        rows.append((goal, figures, met))

    limit("whole GPU ≤ 7.5 s", ("reference", "reference_compiled"), 7.5)
    naive = data.get("naive")
    found = [(n, data[n]) for n in ("reference", "reference_compiled") if _ran(data.get(n))]
    if _ran(naive) and found:
        text = ", ".join(f"{n} {naive['seconds'] / e['seconds']:.2f}×" for n, e in found)
        met = max(naive["seconds"] / e["seconds"] for _, e in found) >= 8
        rows.append(("≥ 8× the naive baseline", f"naive {_at(naive)}: {text}", met))
    else:
        rows.append(("≥ 8× the naive baseline", "not measured", None))
    limit("redraw linear ≤ 10 s", ("redraw", "redraw_compiled"), 10.0)
    sweep = [e for e in data.get("vram_sweep", []) if not e.get("whole_gpu")]
    over = [e for e in sweep if not _ran(e) or e["peak_allocated_gib"] > e["vram_gib"]]
    cards = f"{len(sweep)} card runs, {len(over)} failed or over budget"
    rows.append(("every card 4–24 GiB, both modes, peak under budget", cards, not over))
    whole = {e["mode"]: e for e in data.get("vram_sweep", []) if e.get("whole_gpu") and _ran(e)}
    for gib, most in ((8, 1.3), (4, 2.0)):
        texts, oks = [], []
        for e in sweep:
            base = whole.get(e["mode"])
            if e["vram_gib"] == gib and _ran(e) and base is not None:
                ratio = e["seconds"] / base["seconds"]
                texts.append(f"{e['mode']} {_at(e)} / {_at(base)} = {ratio:.2f}×")
                oks.append(ratio <= most)
        met = all(oks) if oks else None
        rows.append((f"{gib} GiB ≤ {most:g}× whole GPU", "; ".join(texts) or "not measured", met))
    low = data.get("low_vram")
    if _ran(low):
        peak = low["peak_allocated_gib"]
        rows.append(("--low-vram ≤ 2.5 GiB", f"{peak:.2f} GiB ({low.get('commit')})", peak <= 2.5))
    sdxl = data.get("sdxl_low_vram")
    if isinstance(sdxl, dict):
        text = f"{_at(sdxl)}, {sdxl.get('peak_allocated_gib')} GiB" if _ran(sdxl) else "failed"
        rows.append(("SDXL 4K on an 8 GiB card", text, _ran(sdxl)))
    card_4k = next(
        (e for e in sweep if e["mode"] == "fused" and e["vram_gib"] == 8 and _ran(e)), None
    )
    print_8k = data.get("print_8k")
    if _ran(print_8k) and card_4k is not None:
        met = print_8k["seconds"] / card_4k["seconds"] <= 4.4
        goal = "8192² at the 4K job's peak, ≤ 4.4× its time"
        rows.append((goal, _print_8k_text(data, card_4k), met))
    one, two = data.get("reference"), data.get("two_gpus")
    if _ran(one) and _ran(two):
        one = two.get("one_gpu_reference", one)  # the same build's (derive)
        ratio = one["seconds"] / two["seconds"]
        text = f"reference {_at(one)} / two_gpus {_at(two)} = {ratio:.2f}×"
        rows.append(("two GPUs ≥ 1.8× one", text, ratio >= 1.8))
    return rows


def markdown(data: dict[str, Any]) -> str:
    """The summary tables of gpu.json."""
    setup = data.get("setup", {})
    smoke = "--smoke" in str(setup.get("weights"))
    lines = [
        "# tileup on the GPU: the reference job, its variants, card sizes and the naive baseline",
        "",
        f"Device: {data.get('device')} · date: {data.get('date')} · commit: {data.get('commit')}"
        f" · torch {data.get('torch')} · diffusers {data.get('diffusers')}",
        "",
        *(["**--smoke: toy sizes, tiny models; checks the flow, measures nothing.**", ""] * smoke),
        f"SD 1.5 (SDXL where named) with {setup.get('weights', 'random weights')}, 1024² "
        f"astronaut → 4096² (print_8k: 2048² → 8192²), {setup.get('upscaler')}, "
        f"{setup.get('steps')} steps of {SAMPLER} at denoise {DENOISE}, CFG {CFG:g}, bf16, eager. "
        "Models loaded and warmed up; one measured run. Cards emulated by a ballast tensor (each "
        "in its own process). TFLOP/s from `torch.utils.flop_counter` counts (per job kind); "
        f"share of the {PEAK_TFLOPS:g} TFLOP/s bf16 peak of each GPU the job ran on. Raw "
        "numbers: `gpu.json`; how: `bench/gpu.py`.",
        "",
        "| job | card | total s | stages (s) | TFLOP | TFLOP/s | share of peak | "
        "peak alloc GiB | peak reserved GiB | tiles | diff vs whole GPU (/255) | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in JOBS:
        e = data.get(name)
        if not isinstance(e, dict):
            continue
        tflop = None if e.get("flops") is None else e["flops"] / 1e12
        share = None if e.get("share_of_peak") is None else f"{100 * e['share_of_peak']:.1f} %"
        lines.append(
            f"| {name} | {e.get('card')} | {_fmt(e.get('seconds'))} | {_stages(e.get('stages'))} "
            f"| {_fmt(tflop, '.1f')} | {_fmt(e.get('tflops'), '.1f')} | {_fmt(share)} "
            f"| {_fmt(e.get('peak_allocated_gib'))} | {_fmt(e.get('peak_reserved_gib'))} "
            f"| {_fmt(e.get('tiles'), 'd')} | {_fmt(e.get('max_abs_diff_255'), 'd')} "
            f"| {_short(e.get('error'))} |"
        )
    sweep = sorted(
        data.get("vram_sweep", []),
        key=lambda e: (e["mode"], e.get("whole_gpu", False), e.get("vram_gib") or 0),
    )
    if sweep:
        lines += [
            "",
            "## Card sizes (SD 1.5, 1024² → 4096²)",
            "",
            "| card | mode | seconds | stages (s) | TFLOP/s | peak alloc GiB | "
            "peak reserved GiB | max diff vs whole GPU (/255) | values differing | error |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in sweep:
            card = (
                f"whole GPU ({_fmt(e.get('vram_gib'), '.0f')} GiB free)"
                if e.get("whole_gpu")
                else f"{e['vram_gib']:g} GiB"
            )
            frac = e.get("differing_fraction")
            lines.append(
                f"| {card} | {e['mode']} | {_fmt(e.get('seconds'))} | {_stages(e.get('stages'))} "
                f"| {_fmt(e.get('tflops'), '.1f')} | {_fmt(e.get('peak_allocated_gib'))} "
                f"| {_fmt(e.get('peak_reserved_gib'))} | {_fmt(e.get('max_abs_diff_255'), 'd')} "
                f"| {'–' if frac is None else f'{100 * frac:.3f} %'} | {_short(e.get('error'))} |"
            )
    lines += _stage_peak_lines(data, sweep)
    lines += ["", "## Goals (issue 11; computed from the entries above)", ""]
    lines += ["| goal | figures (commit) | met |", "|---|---|---|"]
    marks = {True: "yes", False: "no", None: "–"}
    lines += [f"| {goal} | {text} | {marks[met]} |" for goal, text, met in goals(data)]
    flops = data.get("flops", {})
    if flops:
        lines += ["", "FLOPs per job kind (`FlopCounterMode`):", ""]
        for kind, f in flops.items():
            lines.append(f"- {kind}: {f['flops'] / 1e12:.1f} TFLOP — {f.get('method')}")
    notes = data.get("notes", [])
    if notes:
        lines += ["", "Notes (written by hand into `gpu.json`'s `notes`):", ""]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _stage_peak_lines(data: dict[str, Any], sweep: list[dict[str, Any]]) -> list[str]:
    """A table of each entry's peak allocated per stage (entries that recorded them)."""
    rows = [(name, data[name].get("card"), data[name]) for name in JOBS if name in data]
    for e in sweep:
        card = "whole GPU" if e.get("whole_gpu") else f"{e.get('vram_gib'):g} GiB"
        rows.append((f"sweep, {e['mode']}", card, e))
    rows = [row for row in rows if isinstance(row[2], dict) and row[2].get("stage_peak_gib")]
    if not rows:
        return []
    lines = ["", "## Peak allocated per stage (GiB, ballast taken off)", ""]
    lines += ["| entry | card | commit | stages |", "|---|---|---|---|"]
    for name, card, e in rows:
        peaks = " · ".join(
            f"{STAGE_NAMES.get(k, k)} {v:.2f}" for k, v in e["stage_peak_gib"].items()
        )
        lines.append(f"| {name} | {card} | {e.get('commit')} | {peaks} |")
    return lines


def _git_commit(override: str | None) -> str:
    if override:
        return override
    if os.environ.get("TILEUP_BENCH_COMMIT"):
        return os.environ["TILEUP_BENCH_COMMIT"]
    try:
        git = ["git", "--no-optional-locks", "-C", str(ROOT)]
        head = subprocess.run(
            [*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write(data: dict[str, Any], path: Path, mirror: Path | None) -> None:
    """gpu.json (canonical order) and gpu.md, atomically; copies into ``mirror``."""
    head = ("device", "date", "commit", "torch", "diffusers", "peak_tflops_bf16", "setup")
    ordered = {k: data[k] for k in head if k in data}
    ordered |= {name: data[name] for name in JOBS if name in data}
    ordered |= {k: v for k, v in data.items() if k not in ordered}
    path.parent.mkdir(parents=True, exist_ok=True)
    md = path.with_suffix(".md")
    for target, text in ((path, json.dumps(ordered, indent=2) + "\n"), (md, markdown(data))):
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
        if mirror is not None:
            mirror.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(target, mirror / target.name)


def _missing(data: dict[str, Any], proc: Process) -> bool:
    """Whether an entry this process fills is absent or was stopped by an earlier deadline."""

    def absent(e: dict[str, Any] | None) -> bool:
        return not e or (e.get("error") or "").startswith("not finished")

    if any(absent(data.get(name)) for name in proc.jobs):
        return True
    if proc.sweep_mode is None:
        return False
    found = [
        e
        for e in data.get("vram_sweep", [])
        if e.get("mode") == proc.sweep_mode and _sweep_gib(e) == proc.gib
    ]
    return absent(found[0] if found else None)


def run(args: argparse.Namespace) -> None:
    """Measure the asked jobs and sweep entries, each in its own process; merge and write."""
    deadline = args.deadline or (time.time() + args.budget if args.budget else float("inf"))
    results = Path(args.results)
    data: dict[str, Any] = json.loads(results.read_text()) if results.exists() else {}
    commit = _git_commit(args.commit)
    jobs = list(JOBS) if args.jobs == "all" else [j for j in args.jobs.split(",") if j]
    for name in jobs:
        if name not in JOBS:
            raise SystemExit(f"unknown job {name!r}; expected some of {', '.join(JOBS)}")
    sweep = [float(g) for g in args.sweep.split(",") if g] if args.sweep else []
    modes = [m for m in args.sweep_modes.split(",") if m] if sweep else []
    procs = plan(jobs, sweep, modes)
    if not procs:
        raise SystemExit("nothing to run: name --jobs and/or --sweep")
    if args.missing:
        needed = [p for p in procs if _missing(data, p)]
        # a sweep entry is compared with the whole-GPU output of its mode made on this machine
        kinds = {p.spec.kind for p in needed if p.sweep_mode and p.gib != WHOLE}
        procs = [
            p
            for p in procs
            if p in needed
            or (
                p.gib == WHOLE
                and p.spec.kind in kinds
                and not output_path(args.work, *p.key).exists()
            )
        ]
    signature = _signature(args)
    known = {k for k, v in data.get("flops", {}).items() if v.get("signature") == signature}
    for p in procs:
        owner = FLOP_OWNERS[p.spec.kind]
        p.flops = (
            args.flops and owner in p.jobs and (args.recount_flops or p.spec.kind not in known)
        )
    data |= {"peak_tflops_bf16": PEAK_TFLOPS}
    data["setup"] = {
        "photo": "skimage.data.astronaut() resized (cv2 INTER_AREA)",
        "upscaler": Path(args.sr_model).name,
        "steps": args.steps,
        "denoise": DENOISE,
        "cfg": CFG,
        "sampler": SAMPLER,
        "prompt": PROMPT,
        "seed": SEED,
        "weights": "random, full-size architectures from tileup's configs"
        if not args.smoke
        else "tiny random checkpoints (tests/sd_fixtures.py): --smoke",
        "emulation": "ballast tensor of (free − G GiB) before the engine is built; peaks "
        "exclude it",
    }
    print(f"{len(procs)} process(es): " + ", ".join(f"{p.job}@{_card(p.gib)}" for p in procs))
    if args.dry_run:
        for p in procs:
            print(
                f"  {p.job} @ {_card(p.gib, p.spec.devices)}: jobs {p.jobs}, sweep "
                f"{p.sweep_mode}, flops {p.flops}, ~{estimate(p, args.smoke):.0f} s"
            )
        return
    ran = 0
    for p in procs:
        left = deadline - time.time()
        need = estimate(p, args.smoke)
        if ran and left < need:
            print(f"skip {p.job} @ {_card(p.gib)}: needs ~{need:.0f} s, {left:.0f} s left")
            continue
        if left < (5 if args.smoke else 30):  # not even a model load would fit
            print(f"skip {p.job} @ {_card(p.gib)}: {left:.0f} s left")
            continue
        timeout = min(args.timeout, left)
        print(f"== {p.job} @ {_card(p.gib, p.spec.devices)} (flops: {p.flops})", flush=True)
        rec = launch(p, args, timeout)
        ran += 1
        merge(data, p, rec, commit, args)
        if not rec.get("smoke") and rec.get("device"):
            data["device"] = rec["device"]
        elif rec.get("device"):
            data["device"] = f"{rec['device']} (--smoke)"
        data |= {"date": _now(), "commit": commit}
        data |= {k: rec[k] for k in ("torch", "diffusers") if rec.get(k)}
        compare(data, args.work)
        derive(data)
        write(data, results, args.mirror)
        summary = {k: rec.get(k) for k in ("seconds", "peak_allocated_gib", "error")}
        print(f"   {json.dumps(summary)}", flush=True)
    missing = [f"{p.job}@{_card(p.gib)}" for p in plan(jobs, sweep, modes) if _missing(data, p)]
    derive(data)
    write(data, results, args.mirror)
    print(f"wrote {results} and {results.with_suffix('.md')}")
    if missing:
        print("still missing (run again with --missing): " + ", ".join(missing))


# -- command line ------------------------------------------------------------------------------


def _default_sr() -> str:
    return next((str(p) for p in SR_CANDIDATES if p.exists()), "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="write the random-weight checkpoint folders")
    p.add_argument("--out", type=Path, default=Path("/tmp/tileup-bench"))
    p.add_argument("--sdxl", action="store_true", help="also the SDXL folder (~10 GB)")
    p.add_argument("--smoke", action="store_true", help="tiny checkpoints, CPU-sized")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--work", type=Path, default=Path("/tmp/tileup-bench"))
        p.add_argument("--sr-model", default=None, help="RealESRGAN_x4plus file")
        p.add_argument("--steps", type=int, default=None, help="default 20 (2 with --smoke)")
        p.add_argument("--smoke", action="store_true", help="toy sizes, tiny checkpoints")

    r = sub.add_parser("run", help="measure jobs and card sizes; merge into --results")
    common(r)
    r.add_argument("--jobs", default="", help=f"all, or some of {','.join(JOBS)}")
    r.add_argument("--sweep", default="", help="card sizes in GiB, 0 = whole GPU: 4,6,8,12,24,0")
    r.add_argument("--sweep-modes", default="fused,redraw")
    r.add_argument("--results", default=str(RESULTS))
    r.add_argument("--mirror", type=Path, default=None, help="also copy the results here")
    r.add_argument("--timeout", type=float, default=540, help="seconds per process")
    r.add_argument("--budget", type=float, default=0, help="seconds for the run (0: no limit)")
    r.add_argument("--deadline", type=float, default=None, help="epoch seconds (over --budget)")
    r.add_argument("--missing", action="store_true", help="only entries the file lacks")
    r.add_argument("--no-flops", dest="flops", action="store_false")
    r.add_argument("--recount-flops", action="store_true", help="even when the file has them")
    r.add_argument("--commit", default=None, help="commit to record (default: git, if any)")
    r.add_argument("--dry-run", action="store_true", help="print the processes; run nothing")
    r.add_argument(
        "--trace", type=Path, default=None, help="also profile one more run per process into DIR"
    )

    r.add_argument(
        "--full-warmup",
        action="store_true",
        help="warm up with the job itself (the UNet's CUDA graphs captured for its shapes, as "
        "from the second picture of a folder) instead of a small picture",
    )

    o = sub.add_parser("one", help="(internal) one job in this process; prints its record")
    common(o)
    o.add_argument("--job", required=True, choices=list(JOBS))
    o.add_argument("--emulate-gib", type=float, default=None, help="card size; 0 = whole GPU")
    o.add_argument("--trace", type=Path, default=None)
    o.add_argument("--flops", action="store_true")
    o.add_argument("--full-warmup", action="store_true")

    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.out, sdxl=args.sdxl, smoke=args.smoke)
        return
    if args.steps is None:
        args.steps = 2 if args.smoke else 20
    args.sr_model_given = args.sr_model is not None
    args.sr_model = args.sr_model or _default_sr()
    if args.smoke and not args.sr_model_given:
        args.sr_model = "default"  # the built-in x4 model: the smoke run is about the flow
    if not args.sr_model:
        parser.error("--sr-model: RealESRGAN_x4plus.safetensors not found; pass its path")
    if args.command == "run":
        run(args)
        return
    gib = JOBS[args.job].gib if args.emulate_gib is None else args.emulate_gib
    record = one(
        OneArgs(
            args.job,
            gib,
            args.work,
            args.sr_model,
            args.steps,
            args.flops,
            args.smoke,
            args.trace,
            args.full_warmup,
        )
    )
    print(RESULT_PREFIX + json.dumps(record, default=str), flush=True)


if __name__ == "__main__":
    main()

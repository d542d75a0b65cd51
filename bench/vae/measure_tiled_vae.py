"""Measure tileup's tiled VAE against untiled diffusers and diffusers' own (blended) tiling.

Full-size SD1.5/SDXL VAE architecture (AutoencoderKL, block_out_channels (128, 256, 512, 512),
layers_per_block 2, 4 latent channels, 32 norm groups) with seeded random weights, on a real
photo (skimage's astronaut resized to --size). Prints one JSON object: per mode (untiled, tiled,
diffusers_tiling) the seconds (median of --repeats after a warm-up run on CUDA), peak CUDA memory,
and max / mean abs difference and worst per-tile mean drift against untiled (in half precision
also against an fp32 untiled run with the same weights). TF32 is off unless --tf32.

    python bench/vae/measure_tiled_vae.py --size 256 --tile 128                     # CPU, fp32
    python bench/vae/measure_tiled_vae.py --device cuda --dtype fp16 --size 2048 --batch 4
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tileup.vae.tiled import tiled_decode, tiled_encode

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)


def photo(size: int) -> torch.Tensor:
    """skimage's astronaut resized to size×size, 1×3×H×W float32 in [-1, 1]."""
    import cv2
    from skimage import data

    img = cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(img.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None].contiguous()


def timed(
    fn: Callable[[], torch.Tensor], device: torch.device, repeats: int
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Run ``fn`` (a warm-up first on CUDA); (output, {seconds, peak memory} or {error})."""
    runs = repeats + (1 if device.type == "cuda" else 0)
    times, out = [], None
    try:
        for i in range(runs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if device.type != "cuda" or i > 0:
                times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError as exc:
        return None, {"error": f"out of memory: {str(exc).splitlines()[0]}"}
    info: dict[str, Any] = {"seconds": statistics.median(times), "seconds_all": times}
    if device.type == "cuda":
        info["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return out, info


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def compare(out: torch.Tensor, ref: torch.Tensor, block: int) -> dict[str, float]:
    """Max / mean abs difference and the worst per-block (tile-sized) mean difference."""
    d = (out.float() - ref.float())[0]
    c, h, w = d.shape
    hb, wb = max(1, h // block), max(1, w // block)
    blocks = d[:, : hb * block, : wb * block].reshape(c, hb, block, wb, block).mean((2, 4))
    return {
        "max_abs_diff": d.abs().max().item(),
        "mean_abs_diff": d.abs().mean().item(),
        "max_tile_mean_drift": blocks.abs().max().item(),
    }


def main() -> None:
    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--size", type=int, default=256, help="image side in px")
    parser.add_argument("--tile", type=int, default=128, help="tile in image px (decode: /8)")
    parser.add_argument("--batch", type=int, default=1, help="tiles per forward call")
    parser.add_argument("--store", default="cpu", help="where activations wait: cpu or device")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-untiled", action="store_true")
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 convs/matmuls")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    store = device if args.store == "device" else torch.device(args.store)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**SD_VAE).eval().to(device, dtype)
    # fp32 ground truth with the same (rounded) weights, for runs in half precision
    ref_vae = copy.deepcopy(vae).float() if dtype != torch.float32 else None
    f = 2 ** (len(SD_VAE["block_out_channels"]) - 1)
    image = photo(args.size)
    kw = dict(device=device, dtype=dtype, batch=args.batch, store=store)
    result: dict[str, Any] = {
        "benchmark": "tiled_vae",
        "architecture": "SD1.5/SDXL AutoencoderKL, random weights",
        "image": f"astronaut {args.size}x{args.size}",
        "tile_px": args.tile,
        "device": device_name(device),
        "dtype": args.dtype,
        "batch": args.batch,
        "store": str(store),
        "torch": torch.__version__,
        "tf32": args.tf32,
    }

    def untiled_encode() -> torch.Tensor:
        with torch.inference_mode():
            return vae.encode(image.to(device, dtype)).latent_dist.mean.float().cpu()

    def untiled_decode(z: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return vae.decode(z.to(device, dtype)).sample.float().clamp(-1, 1).cpu()

    def reference(what: str, z: torch.Tensor | None = None) -> torch.Tensor:
        assert ref_vae is not None
        with torch.inference_mode():
            if what == "encode":
                return ref_vae.encode(image.to(device)).latent_dist.mean.cpu()
            assert z is not None
            return ref_vae.decode(z.to(device).float()).sample.clamp(-1, 1).cpu()

    def diffusers_tiled(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = args.tile, args.tile // f
        try:
            return fn()
        finally:
            vae.disable_tiling()

    latents = torch.empty(0)  # set by the encode pass: the photo's own latents
    for what in ("encode", "decode"):
        runs: dict[str, Any] = {}
        if what == "encode":
            modes = {
                "untiled": untiled_encode,
                "tiled": lambda: tiled_encode(vae, image, tile=args.tile, **kw),
                "diffusers_tiling": lambda: diffusers_tiled(untiled_encode),
            }
            block = args.tile // f
        else:
            z = latents
            modes = {
                "untiled": lambda: untiled_decode(z),  # noqa: B023 (run inside this iteration)
                "tiled": lambda: tiled_decode(vae, z, tile=args.tile // f, **kw),  # noqa: B023
                "diffusers_tiling": lambda: diffusers_tiled(lambda: untiled_decode(z)),  # noqa: B023
            }
            block = args.tile
        outs: dict[str, torch.Tensor] = {}
        for mode, fn in modes.items():
            if (mode == "untiled" and args.skip_untiled) or (
                mode == "diffusers_tiling" and args.skip_diffusers
            ):
                continue
            out, info = timed(fn, device, args.repeats)
            runs[mode] = info
            if out is not None:
                outs[mode] = out
        ref = outs.get("untiled")
        if ref is not None:
            runs["untiled"]["output_std"] = ref.std().item()
            for mode in ("tiled", "diffusers_tiling"):
                if mode in outs:
                    runs[mode].update(compare(outs[mode], ref, block))
        if ref_vae is not None and ref is not None:  # errors against fp32 ground truth
            truth = reference(what, latents if what == "decode" else None)
            for mode, out in outs.items():
                stats = compare(out, truth, block)
                runs[mode].update({f"{k}_vs_fp32": v for k, v in stats.items()})
        if what == "encode":  # decode the photo's own latents (tiled encoder's if untiled is off)
            latents = outs.get("untiled", outs["tiled"])
        result[what] = runs
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""The eager UNet (replayed from CUDA graphs) in NCHW against channels-last, with PyTorch's
GroupNorm and with the one-kernel GroupNorm of :mod:`tileup.group_norm_kernel`, at the calls
of three jobs (``--cases``): ``fused`` (27 tiles at 64², the guidance pair sharing its first
layers), ``redraw`` (1 to 4 crops at 72², paired) and ``sdxl`` (25 tiles at 128², 50
samples). ``--norms``: also each GroupNorm shape of the fused call alone.

Prints and writes (``--out``, after every variant) ms per call, the job's UNet seconds and each
variant's largest difference from the first variant (bf16 rounding); per GroupNorm shape, ms
for PyTorch's and the kernel in each layout and the kernel's error against float64.

    python bench/diffusion/eager_layouts.py --out /tmp/eager_layouts.json --cases fused,redraw
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: tileup and bench from this checkout
    sys.path.insert(1, str(ROOT))

from bench.diffusion.redraw_unet import STEPS, WAVES, gpu_header, median_ms  # noqa: E402

VARIANTS = {
    "nchw": (False, False, False),
    "channels_last": (True, False, False),
    "channels_last_kernel_norm": (True, True, False),
    "nchw_kernel_norm": (False, True, False),
    "channels_last_kernel_norm_phase_up": (True, True, True),
    "nchw_phase_up": (False, False, True),
}
"""Variant: (channels-last weights, the one-kernel GroupNorm, upsamplers as phase convs
(:mod:`tileup.upsample_conv`))."""
NORMS = [(320, 64), (640, 32), (1280, 16), (1280, 8)]
"""The UNet's GroupNorm inputs (channels, side) at 64² (32 groups each)."""


@dataclass(frozen=True)
class Case:
    """One job's UNet calls: the family, the latent side, {latents a call: calls in the job},
    whether the guidance pair shares its first layers (k latents, 2k text states)."""

    family: str
    side: int
    calls: dict[int, int]
    paired: bool


CASES = {
    "fused": Case("sd15", 64, {27: 60}, True),  # the reference job: 81 tiles, 3 calls a step
    "redraw": Case("sd15", 72, {k: STEPS * WAVES[2 * k] for k in (1, 2, 3, 4)}, True),
    "sdxl": Case("sdxl", 128, {25: 20}, False),  # 25 tiles of 1024², one call a step
}


def _norms(samples: int, repeats: int) -> dict[str, Any]:
    """Each GroupNorm shape of the fused call alone: PyTorch's and the kernel, both layouts."""
    import torch
    import torch.nn.functional as F

    from tileup import group_norm_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    result: dict[str, Any] = {}
    for channels, side in NORMS:
        x = torch.randn(samples, channels, side, side, device="cuda", generator=gen) * 2 + 1
        x = x.bfloat16()
        w = torch.randn(channels, device="cuda", generator=gen).bfloat16()
        b = torch.randn(channels, device="cuda", generator=gen).bfloat16()
        entry: dict[str, Any] = {}
        for layout in ("nchw", "channels_last"):
            xl = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x
            want = F.group_norm(xl.double(), 32, w.double(), b.double(), 1e-5)
            runs = {
                "torch": lambda t=xl, w=w, b=b: F.group_norm(t, 32, w, b, 1e-5),
                "kernel": lambda t=xl, w=w, b=b: group_norm_kernel.group_norm(t, 32, w, b, 1e-5),
            }
            for name, run in runs.items():
                got = run()
                entry[f"{layout}_{name}_ms"] = round(median_ms(run, repeats), 4)
                entry[f"{layout}_{name}_max_error"] = (got.double() - want).abs().max().item()
        result[f"{channels}x{side}x{side}"] = entry
        print("norm", channels, side, json.dumps(entry), flush=True)
    return result


def _inputs(case: Case, latents: int) -> dict[str, Any]:
    """A call's arguments: ``latents`` latents (doubled unless the pair shares), 2× text."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(latents)
    samples = 2 * latents
    rows = latents if case.paired else samples
    width = 2048 if case.family == "sdxl" else 768

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=gen).bfloat16()

    args: dict[str, Any] = {
        "sample": randn(rows, 4, case.side, case.side),
        "encoder_hidden_states": randn(samples, 77, width),
    }
    if case.family == "sdxl":
        args["added_cond_kwargs"] = {
            "text_embeds": randn(samples, 1280),
            "time_ids": randn(samples, 6),
        }
    return args


def _variant(
    case: Case, channels_last: bool, kernel_norm: bool, phase_up: bool, repeats: int
) -> tuple[dict[int, float], dict[int, Any]]:
    """ms a call and the output at each of the case's call sizes, one UNet in one layout."""
    import torch

    from bench.diffusion.profile_unet import random_unet
    from tileup import channel_norm, group_norm_kernel, upsample_conv
    from tileup.sampling import shared_prefix
    from tileup.sampling.graphs import GraphedUNet

    unet = random_unet(channels_last=channels_last, family=case.family)
    assert shared_prefix.install(unet) == case.paired
    if kernel_norm:
        channel_norm.swap_group_norms(unet, group_norm_kernel.KernelGroupNorm)
    if phase_up:
        assert upsample_conv.swap_upsamplers(unet) > 0
    graphed = GraphedUNet(unet)
    timestep = torch.tensor(500.0, device="cuda")
    ms: dict[int, float] = {}
    outputs: dict[int, Any] = {}
    with torch.inference_mode():
        for latents in case.calls:
            args = _inputs(case, latents)

            def call(g: Any = graphed, a: dict[str, Any] = args) -> Any:
                return g(timestep=timestep, **a)[0]

            for _ in range(3):  # eager, capture, replay
                out = call()
            ms[latents] = median_ms(call, repeats)
            outputs[latents] = out.float()
    graphed.release()
    del unet, graphed
    torch.cuda.empty_cache()
    return ms, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="fused")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--norms", action="store_true", help="also each GroupNorm shape alone")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result: dict[str, Any] = {**gpu_header(), "cases": {}}
    if args.norms:
        result["norms"] = _norms(2 * 27, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for case_name in args.cases.split(","):
        case = CASES[case_name]
        entries: dict[str, Any] = {}
        first: dict[int, Any] | None = None
        for name in args.variants.split(","):
            ms, outputs = _variant(case, *VARIANTS[name], args.repeats)
            first = outputs if first is None else first
            gaps = [(outputs[k] - first[k]).abs() for k in outputs]
            entries[name] = {
                "ms_per_call": {str(k): round(v, 3) for k, v in ms.items()},
                "job_unet_seconds": round(sum(case.calls[k] * v for k, v in ms.items()) / 1e3, 3),
                "max_diff_from_first": max(g.max().item() for g in gaps),
                "mean_diff_from_first": max(g.mean().item() for g in gaps),
            }
            print(case_name, name, json.dumps(entries[name]), flush=True)
            result["cases"][case_name] = {**asdict(case), "variants": entries}
            args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""FLOPs the guidance pair's shared first layers save in the SD 1.5 jobs, counted on the meta
device (shapes only; no GPU, seconds on a CPU).

The whole-job FLOP counts in ``bench/results/gpu.json`` (``flops``: ``FlopCounterMode`` around
one run of each job on the GPU, 2026-11-29) predate :mod:`tileup.sampling.shared_prefix`
(2026-12-01): since then each SD 1.5 UNet call computes its first resnet and first
self-attention once per uncond/cond pair. This counts one call plain (2k samples) and paired
(k latents, 2k text states) at each of the jobs' call sizes — the fused job's 60 calls of 27
tiles at 64², the linear redraw's 440 calls of 1 to 4 crops at 72² — and prints and writes
(``--out``) what each job no longer computes. ``--apply FILE`` also takes it off the counts of
that gpu.json (``flops_counted`` keeps the count, ``method`` says how) and rewrites its tables.

    python bench/diffusion/prefix_flops.py --out bench/diffusion/results/prefix-flops.json \
        [--apply bench/results/gpu.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: tileup and bench from this checkout
    sys.path.insert(1, str(ROOT))

from bench.diffusion.redraw_unet import STEPS, WAVES  # noqa: E402

JOBS = {
    "sd15_fused": (64, {27: 60}),
    "sd15_redraw": (72, {k: STEPS * WAVES[2 * k] for k in (1, 2, 3, 4)}),
}
"""gpu.json's job kind: (latent side, {latents a call: calls in the job})."""


def count_calls() -> dict[str, Any]:
    """Plain and paired FLOPs of one call at each size, and each job's saving."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from bench.diffusion.make_random_checkpoint import _config
    from tileup.sampling import shared_prefix

    with torch.device("meta"):
        plain = UNet2DConditionModel.from_config(_config("sd15", "unet")).eval()
    paired = copy.deepcopy(plain)
    assert shared_prefix.install(paired)

    def flops(unet: Any, rows: int, samples: int, side: int) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            unet(
                torch.empty(rows, 4, side, side, device="meta"),
                torch.tensor(500.0, device="meta"),
                encoder_hidden_states=torch.empty(samples, 77, 768, device="meta"),
            )
        return int(counter.get_total_flops())

    result: dict[str, Any] = {}
    for kind, (side, calls) in JOBS.items():
        per_call = {}
        for k in calls:
            plain_flops = flops(plain, 2 * k, 2 * k, side)
            paired_flops = flops(paired, k, 2 * k, side)
            per_call[str(k)] = {"plain": plain_flops, "paired": paired_flops}
        saved = sum(
            n * (per_call[str(k)]["plain"] - per_call[str(k)]["paired"]) for k, n in calls.items()
        )
        result[kind] = {"latent": side, "calls": calls, "per_call": per_call, "job_saving": saved}
        print(kind, f"saves {saved / 1e12:.1f} TFLOP a job", flush=True)
    return result


def apply(savings: dict[str, Any], path: Path, date: str) -> None:
    """Take each job kind's saving off ``path``'s counts (once) and rewrite its tables."""
    from bench import gpu

    data = json.loads(path.read_text())
    for kind, saving in savings.items():
        entry = data["flops"][kind]
        counted = entry.setdefault("flops_counted", entry["flops"])
        entry["flops"] = counted - saving["job_saving"]
        entry["method"] = (
            f"{entry['method']} ({entry['date'][:10]}), less the UNet FLOPs the guidance pairs' "
            f"shared first layers no longer compute (tileup.sampling.shared_prefix), counted "
            f"on the meta device by bench/diffusion/prefix_flops.py ({date[:10]})"
        )
    gpu.derive(data)
    gpu.write(data, path, None)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--apply", type=Path, help="a gpu.json whose counts to correct")
    args = parser.parse_args()
    date = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    savings = count_calls()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"date": date, "torch": torch.__version__, "device": "meta", "jobs": savings}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.apply:
        apply(savings, args.apply, date)


if __name__ == "__main__":
    main()

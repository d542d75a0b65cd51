"""Nearest ×2 + 3×3 conv, plain against the four-phase 2×2 conv (:mod:`tileup.upsample_conv`),
at the upsamplers' shapes in the jobs: the SD 1.5 UNet's fused call (54 samples at 64²), SDXL's
(50 samples at 128²) and the tiled VAE decoder's crop batches at 8192² (with their one-pixel
halo, unpadded). bf16, channels-last, as the GPU jobs run them.

Prints and writes (``--out``) ms per call of each form and each form's largest difference from
float32 (the plain form in float32 on the same bf16 inputs and weights).

    python bench/diffusion/phase_upsample.py --out /tmp/phase_upsample.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: tileup and bench from this checkout
    sys.path.insert(1, str(ROOT))

from bench.diffusion.redraw_unet import gpu_header, median_ms  # noqa: E402

SHAPES = {
    "sd15_up0_8": (54, 1280, 8, 8, 1),
    "sd15_up1_16": (54, 1280, 16, 16, 1),
    "sd15_up2_32": (54, 640, 32, 32, 1),
    "sdxl_up0_32": (50, 1280, 32, 32, 1),
    "sdxl_up1_64": (50, 640, 64, 64, 1),
    "vae_up_at_2": (64, 512, 66, 66, 0),
    "vae_up_at_4": (16, 512, 130, 130, 0),
    "vae_up_at_8": (4, 256, 258, 258, 0),
}
"""Name: (batch, channels, height, width, padding: 1 the UNet's, 0 the VAE's halo'd crops)."""


def main() -> None:
    import torch
    import torch.nn.functional as F

    from tileup.upsample_conv import phase_conv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = False
    result: dict[str, Any] = {**gpu_header(), "shapes": {}}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (batch, channels, height, width, padding) in SHAPES.items():
        x = torch.randn(batch, channels, height, width, device="cuda", generator=gen)
        x = x.bfloat16().contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1).cuda().bfloat16()
        conv = conv.to(memory_format=torch.channels_last)
        w, b = conv.weight, conv.bias

        def plain(x: Any = x, w: Any = w, b: Any = b, padding: int = padding) -> Any:
            up = F.interpolate(x, scale_factor=2.0, mode="nearest")
            out = F.conv2d(up, w, b, padding=padding)
            return out if padding else out[:, :, 1:-1, 1:-1]

        def phased(x: Any = x, w: Any = w, b: Any = b, padding: int = padding) -> Any:
            return phase_conv(x, w, b, padding=padding)

        with torch.inference_mode():
            truth = plain(x.float(), w.float(), b.float())
            entry: dict[str, Any] = {"shape": [batch, channels, height, width]}
            for form, fn in (("plain", plain), ("phase", phased)):
                out = fn()
                entry[f"{form}_ms"] = round(median_ms(fn, args.repeats), 4)
                entry[f"{form}_max_diff"] = (out.float() - truth).abs().max().item()
            entry["speedup"] = round(entry["plain_ms"] / entry["phase_ms"], 3)
        print(name, json.dumps(entry), flush=True)
        result["shapes"][name] = entry
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

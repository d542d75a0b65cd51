"""RealESRGAN_x4plus (fp16, channels-last, CUDA) eager against its trunk compiled
(:func:`tileup.upscalers.pixel.compiled_trunk`, what ``--compile`` runs): the trunk on one 592²
crop (a core of the 1024² reference input with its 80 px of context) and the whole
1024² → 4096² pixel stage (4 cores, tile 685); seconds, compilation and how far the outputs
are apart. Prints one JSON object (``compiled-trunk-h200.json`` holds two runs: cuDNN's
benchmark mode off, tileup's setting, and on, from ``sitecustomize``).

    python bench/pixel/compiled_trunk.py ../shared/models/RealESRGAN_x4plus.safetensors
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from skimage import data

from tileup.upscalers.models import load_sr_model
from tileup.upscalers.pixel import ModelRunner, compiled_trunk, upscale_pixels
from tileup.upscalers.resample import resample


def timed(fn: Callable[[], object], n: int = 7) -> float:
    """Median seconds of ``fn`` after two warm-up calls."""
    fn(), fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def main() -> None:
    out: dict[str, object] = {
        "benchmark": torch.backends.cudnn.benchmark,
        "device": torch.cuda.get_device_name(),
    }
    cuda = torch.device("cuda")
    model = load_sr_model(sys.argv[1])
    model.place(cuda, torch.float16)
    image = resample(data.astronaut().astype(np.float32) / 255, 1024, 1024, "lanczos")
    crop = np.ascontiguousarray(image[:592, :592].transpose(2, 0, 1))
    x = torch.from_numpy(crop)[None].to(cuda, torch.float16)
    stages = model.stages
    assert stages is not None
    out["trunk_eager_ms"] = 1000 * timed(lambda: stages.trunk(x))
    eager_features = stages.trunk(x).float()
    runner = ModelRunner(model, cuda, torch.float16, 685)
    out["pixel_eager_s"] = timed(lambda: upscale_pixels(image, (4096, 4096), runner=runner), 3)
    eager = upscale_pixels(image, (4096, 4096), runner=runner)
    trunk = compiled_trunk(model)
    assert trunk is not None
    start = time.perf_counter()
    features = trunk(x).float()
    torch.cuda.synchronize()
    out["trunk_compile_s"] = time.perf_counter() - start
    out["trunk_compiled_ms"] = 1000 * timed(lambda: trunk(x))
    gap = (features - eager_features).abs().max()
    out["trunk_max_diff"] = gap.item()
    out["trunk_rel_diff"] = (gap / eager_features.abs().max()).item()
    compiled = ModelRunner(model, cuda, torch.float16, 685, trunk=trunk)
    start = time.perf_counter()
    got = upscale_pixels(image, (4096, 4096), runner=compiled)
    out["pixel_compiled_first_s"] = time.perf_counter() - start
    out["pixel_compiled_s"] = timed(lambda: upscale_pixels(image, (4096, 4096), runner=compiled), 3)
    diff = np.abs(got - eager) * 255
    out["pixel_max_diff_255"] = float(diff.max())
    out["pixel_mean_diff_255"] = float(diff.mean())
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

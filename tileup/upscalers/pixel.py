"""Pixel upscaling to any target: chained SR model passes, then an exact resize."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tileup.devices import hwc_view
from tileup.tiler import Box
from tileup.upscalers.models import SRModel
from tileup.upscalers.resample import resample, resize_exact
from tileup.upscalers.tiled import RunReport, count_tiles, run_tiled


def compiled_trunk(model: SRModel) -> nn.Module | None:
    """``model``'s trunk compiled by ``torch.compile`` (None for a model without stages).

    The trunk is nearly all of an ESRGAN's work (RealESRGAN_x4plus on an 845² fp16 tile,
    channels-last, H200: 177 ms eager, 117 ms compiled) and its first call per core shape pays
    the compilation (~59 s on a cold cache, cached on disk; a second shape compiles once more
    with the size dynamic). The tail runs in small chunks of varying shapes and stays eager.
    """
    stages = model.stages
    if stages is None:
        return None
    from tileup.sampling.compiled import compile_module  # imports torch._dynamo

    return compile_module(stages.trunk, dynamic_batch=False)


@dataclass(frozen=True, eq=False)
class ModelRunner:
    """An SR model placed on a device, with the precision and core tile size to run it at;
    ``replicas``: runners of copies of the model on other devices that share its cores;
    ``trunk``: the model's trunk compiled (:func:`compiled_trunk`), run instead of the eager
    one when the runner has no replicas (one device: no compilation in concurrent threads)."""

    model: SRModel
    device: torch.device
    dtype: torch.dtype
    tile: int | None
    replicas: tuple[ModelRunner, ...] = ()
    trunk: nn.Module | None = None

    def run(
        self,
        image: np.ndarray,
        report: RunReport,
        on_tile: Callable[[int], None] | None,
        on_core: Callable[[Box, Box], None] | None = None,
    ) -> np.ndarray:
        """One model pass on an HxWx3 float32 image in [0, 1] (``on_core``: see run_tiled)."""
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
        y = run_tiled(
            self.model,
            x,
            device=self.device,
            dtype=self.dtype,
            tile=self.tile,
            report=report,
            on_tile=on_tile,
            on_core=on_core,
            replicas=[(r.model, r.device) for r in self.replicas],
            trunk=None if self.replicas else self.trunk,
        )
        return hwc_view(y[0]).numpy()


def model_passes(src: tuple[int, int], target: tuple[int, int], scale: int) -> int:
    """Fewest passes of a ``scale``× model that reach at least ``target`` (H, W) from ``src``."""
    if scale <= 1:
        return 0
    passes, (h, w) = 0, src
    while h < target[0] or w < target[1]:
        h, w, passes = h * scale, w * scale, passes + 1
    return passes


def count_pixel_tiles(
    src: tuple[int, int], target: tuple[int, int], runner: ModelRunner | None
) -> int:
    """Cores the pixel stage will run (0 for a resampler), for progress totals."""
    if runner is None:
        return 0
    total, (h, w) = 0, src
    for _ in range(model_passes(src, target, runner.model.scale)):
        total += count_tiles(h, w, runner.tile)
        h, w = h * runner.model.scale, w * runner.model.scale
    return total


def upscale_pixels(
    image: np.ndarray,
    target: tuple[int, int],
    *,
    runner: ModelRunner | None,
    resampler: str = "lanczos",
    report: RunReport | None = None,
    on_tile: Callable[[int], None] | None = None,
    on_core: Callable[[Box, Box], None] | None = None,
) -> np.ndarray:
    """Upscale an HxWxC float32 image in [0, 1] to exactly ``target`` (H, W).

    With a model: as many model passes as needed to reach the target, then an exact resize
    (area down, lanczos up). Without: one ``resampler`` resize. C may be 1 (grey, e.g. alpha),
    which a model sees as three equal channels. ``on_core(core, canvas)`` sees each model
    core before it runs, in the pass's input pixels.
    """
    report = report or RunReport()
    if runner is None:
        return resample(image, target[0], target[1], resampler)
    grey = image.shape[2] == 1
    current = np.repeat(image, 3, axis=2) if grey else image
    for _ in range(model_passes(image.shape[:2], target, runner.model.scale)):
        current = runner.run(current, report, on_tile, on_core)
    current = resize_exact(current, *target)
    return current.mean(axis=2, keepdims=True, dtype=np.float32) if grey else current

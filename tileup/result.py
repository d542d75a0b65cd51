"""What one job returns: the picture, its stats and its ``parameters`` text."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from tileup.imageio import Picture


@dataclass(frozen=True)
class Stats:
    """What one image's job did.

    ``tiles`` counts the re-diffusion tiles when re-diffusion runs, otherwise the pixel model's
    tiles; ``pixel_tiles`` always counts the pixel model's tiles (all passes, alpha included).
    ``passes`` lists the per-region passes (redraw, seam fix) with their counts and seconds;
    ``seam_fix_jobs`` and ``seam_fix_tile_steps`` sum the seam-fix regions and their steps.
    ``peak_memory_bytes``/``peak_reserved_bytes``: the device's peak allocated / reserved by the
    caching allocator (CUDA; on the CPU the process's peak RSS and 0); ``stage_peak_bytes``: the
    peak allocated during each stage (CUDA only; see tileup.peaks). ``memory_plan``: where
    models live, the tile batches and the VAE store the budget allowed (see tileup.memory).
    """

    tiles: int
    pixel_tiles: int
    tile_steps: int
    steps_per_tile: int
    seconds: dict[str, float]
    peak_memory_bytes: int
    fallbacks: tuple[str, ...]
    device: str
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    passes: tuple[dict[str, Any], ...] = ()
    seam_fix_jobs: int = 0
    seam_fix_tile_steps: int = 0
    peak_reserved_bytes: int = 0
    memory_plan: dict[str, Any] = dataclasses.field(default_factory=dict)
    stage_peak_bytes: dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (sizes as [width, height])."""
        data = dataclasses.asdict(self)
        data["fallbacks"] = list(self.fallbacks)
        data["input_size"] = list(self.input_size)
        data["output_size"] = list(self.output_size)
        data["passes"] = [dict(p) for p in self.passes]
        data["memory_plan"] = dict(self.memory_plan)
        data["stage_peak_bytes"] = dict(self.stage_peak_bytes)
        return data


@dataclass(frozen=True, eq=False)
class UpscaleResult:
    """The upscaled picture (float RGB in [0, 1], alpha, bit depth, ICC) and its stats."""

    picture: Picture
    stats: Stats
    parameters: str

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the result atomically with its ``parameters`` metadata, bit depth, alpha and
        ICC profile (format from the suffix); an existing file is kept unless ``overwrite``.
        Returns the path written."""
        from tileup.imageio import write_image

        p = self.picture
        return write_image(
            path,
            p.rgb,
            alpha=p.alpha,
            bit_depth=p.bit_depth,
            icc_profile=p.icc_profile,
            parameters=self.parameters,
            overwrite=overwrite,
            grey=p.is_grey,
        )

    @property
    def image(self) -> PIL.Image.Image:
        """An 8-bit PIL image: RGB, RGBA with alpha, or L / LA for a grey source."""
        from tileup.imageio.write import LUMA_WEIGHTS, quantise

        p = self.picture
        colour = (p.rgb @ LUMA_WEIGHTS)[..., None] if p.is_grey else p.rgb
        planes = [colour] + ([p.alpha[..., None]] if p.alpha is not None else [])
        pixels = np.empty((p.height, p.width, sum(x.shape[2] for x in planes)), np.uint8)
        quantise(np.concatenate(planes, axis=2), pixels)
        mode = ("L" if p.is_grey else "RGB") + ("A" if p.alpha is not None else "")
        return PIL.Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels, mode)

"""Re-diffusion of a pixel (or latent) canvas with a Stable Diffusion checkpoint, tiled and fused.

One :class:`Rediffuser` per job: it loads the checkpoint and encodes the prompts once; each call
encodes the canvas with the tiled VAE, noises it once with one seeded canvas-wide noise, samples
``steps`` steps (fixed step scheduling) with the fused tiled denoiser and decodes it tiled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging

from tileup.sampler.checkpoint import SDModel, load_checkpoint
from tileup.sampler.conditioning import Conditioning, encode_prompts
from tileup.sampler.denoiser import FusedDenoiser
from tileup.sampler.schedules import (
    StepPlan,
    make_scheduler,
    noise_latents,
    plan_steps,
    run_sampler,
)
from tileup.sampler.tiled_vae import NonFiniteError, tiled_decode, tiled_encode
from tileup.settings import SettingsError, UpscaleSettings
from tileup.tiler import TileGrid, plan_grid
from tileup.upscalers.latent import interpolate_latents

diffusers_logging.set_verbosity_error()  # no dtype-cast chatter on the user's terminal

# Bytes of UNet activations per tile sample at a 64×64 latent (SD1.5 measured ≈ 90 MB at batch
# 64 in bf16); scaled by area and doubled by CFG to size the tile batch from free memory.
_BYTES_PER_TILE_64 = 96 << 20
_MAX_TILE_BATCH = 32


@dataclass
class DiffusionReport:
    """Counts and fallbacks of one canvas's re-diffusion."""

    tiles: int = 0
    tile_steps: int = 0
    steps_per_tile: int = 0
    unet_evaluations: int = 0
    tile_batch: int = 0
    seed: int = 0
    fallbacks: list[str] = field(default_factory=list)


def diffusion_dtype(setting: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU; on CUDA bf16 where supported, else fp16; or what --dtype says."""
    if setting == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[setting]


class Rediffuser:
    """A loaded checkpoint, placed on a device, with the job's prompts encoded once."""

    def __init__(self, settings: UpscaleSettings, checkpoint: str, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self.dtype = diffusion_dtype(settings.dtype, device)
        self.model: SDModel = load_checkpoint(
            checkpoint, vae=settings.vae, prediction=settings.prediction
        )
        self._scheduler_and_plan()  # validates sampler, schedule and steps before any work
        self.factor = self.model.vae_scale_factor
        if settings.tile % self.factor or settings.overlap % self.factor:
            raise SettingsError(
                f"--tile and --overlap must be multiples of the VAE scale factor {self.factor}"
            )
        self.model.unet.to(device=device, dtype=self.dtype)
        # the VAE keeps fp32 weights on the device (a half copy is made per call), so the fp32
        # re-run after a half-precision overflow uses the full-precision weights
        self.vae_dtype = self.dtype
        self.model.vae.to(device=device)
        on_gpu = device.type == "cuda"
        self.vae_options = {"batch": 4 if on_gpu else 1, "store": "auto" if on_gpu else "cpu"}
        for encoder in self.model.text_encoders:
            encoder.to(device=device, dtype=self.dtype)
        self.conditioning: Conditioning = encode_prompts(
            self.model, settings.prompt, settings.negative_prompt, device=device, dtype=self.dtype
        )
        for encoder in self.model.text_encoders:  # no longer needed: free the device memory
            encoder.to("cpu")

    # -- planning ---------------------------------------------------------------------------

    def canvas_size(self, height: int, width: int) -> tuple[int, int]:
        """The pixel canvas actually diffused: the target rounded up to the VAE factor."""
        f = self.factor
        return math.ceil(height / f) * f, math.ceil(width / f) * f

    def grid(self, height: int, width: int) -> TileGrid:
        """The latent-unit tile grid over a pixel canvas of height×width (multiples of f)."""
        f = self.factor
        return plan_grid(
            height // f, width // f, self.settings.tile // f, self.settings.overlap // f
        )

    def _scheduler_and_plan(self) -> tuple[Any, StepPlan]:
        settings = self.settings
        scheduler = make_scheduler(
            settings.sampler,
            settings.scheduler,
            self.model.scheduler_config,
            prediction_type=self.model.prediction_type,
        )
        return scheduler, plan_steps(scheduler, settings.steps, settings.denoise)

    def planned_tile_steps(self, height: int, width: int) -> int:
        """Progress units (tile evaluations) a canvas will take."""
        h, w = self.canvas_size(height, width)
        return len(self.grid(h, w)) * self._scheduler_and_plan()[1].evaluations

    def tile_batch(self, grid: TileGrid) -> int:
        """--tile-batch, or as many tiles as fit in half the free device memory (max 32)."""
        if self.settings.tile_batch:
            return min(self.settings.tile_batch, len(grid))
        if self.device.type != "cuda":
            return min(4, len(grid))
        free, _ = torch.cuda.mem_get_info(self.device)
        area = grid.tile_height * grid.tile_width / 64**2
        per_tile = _BYTES_PER_TILE_64 * area * (2 if self.settings.cfg != 1 else 1)
        fits = max(1, int(free * 0.5 // per_tile))
        return min(len(grid), fits, _MAX_TILE_BATCH)

    # -- running ----------------------------------------------------------------------------

    def _vae(
        self, run: Callable[..., torch.Tensor], x: torch.Tensor, tile: int, fallbacks: list[str]
    ) -> torch.Tensor:
        """Run a tiled VAE pass; on NaN/inf in half precision, once more in fp32 (noted)."""
        try:
            return run(
                self.model.vae,
                x,
                tile=tile,
                device=self.device,
                dtype=self.vae_dtype,
                **self.vae_options,
            )
        except NonFiniteError:
            if self.vae_dtype == torch.float32:
                raise
            fallbacks.append(f"VAE produced NaN/inf in {self.vae_dtype}; re-ran it in fp32")
            self.vae_dtype = torch.float32
            return run(
                self.model.vae,
                x,
                tile=tile,
                device=self.device,
                dtype=torch.float32,
                **self.vae_options,
            )

    def encode(self, rgb: np.ndarray, fallbacks: list[str]) -> torch.Tensor:
        """HxWx3 float32 in [0, 1] (multiples of f) → scaled latents 1×C×h×w (CPU fp32)."""
        image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None] * 2 - 1
        latents = self._vae(tiled_encode, image, self.settings.vae_tile, fallbacks)
        return latents * self.model.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor, fallbacks: list[str]) -> np.ndarray:
        """Scaled latents → HxWx3 float32 in [0, 1]."""
        z = latents.float().cpu() / self.model.vae.config.scaling_factor
        tile = max(8, self.settings.vae_tile // self.factor)
        image = self._vae(tiled_decode, z, tile, fallbacks)
        return ((image[0].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1).astype(np.float32)

    def upscale_latents(
        self, rgb: np.ndarray, target: tuple[int, int], mode: str, fallbacks: list[str]
    ) -> torch.Tensor:
        """Encode the source and interpolate its latents to the canvas of ``target`` (H, W)."""
        f = self.factor
        h, w = rgb.shape[:2]
        src_canvas = (math.ceil(h / f) * f, math.ceil(w / f) * f)
        latents = self.encode(pad_to(rgb, src_canvas), fallbacks)
        canvas = self.canvas_size(*target)
        return interpolate_latents(latents, canvas[0] // f, canvas[1] // f, mode)

    def sample(
        self,
        latents: torch.Tensor,
        seed: int,
        report: DiffusionReport,
        *,
        on_tiles: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Noise scaled latents (1×C×h×w) once with a seeded canvas-wide noise and sample them.

        Runs exactly ``--steps`` steps (fixed step scheduling) through the fused tiled
        denoiser; returns the sampled latents on the device. ``--denoise 0`` returns the input.
        """
        settings = self.settings
        report.seed = seed
        grid = self.grid(latents.shape[-2] * self.factor, latents.shape[-1] * self.factor)
        report.tiles = len(grid)
        if settings.denoise == 0:
            return latents
        scheduler = make_scheduler(
            settings.sampler,
            settings.scheduler,
            self.model.scheduler_config,
            prediction_type=self.model.prediction_type,
        )
        plan = plan_steps(scheduler, settings.steps, settings.denoise)
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        latents = latents.to(self.device, torch.float32)
        start = noise_latents(scheduler, plan, latents, noise.to(self.device))
        denoiser = FusedDenoiser(
            unet=self.model.unet,
            grid=grid,
            conditioning=self.conditioning,
            cfg=settings.cfg,
            tile_batch=self.tile_batch(grid),
            blend=settings.blend,
            pixel_scale=self.factor,
        )
        report.tile_batch = denoiser.tile_batch

        def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = denoiser(x, t)
            if on_tiles is not None:
                on_tiles(len(grid))
            return out

        sampled = run_sampler(scheduler, plan, start, counted, generator=generator)
        report.unet_evaluations = denoiser.counter.calls
        report.steps_per_tile = plan.steps
        report.tile_steps = report.tiles * plan.steps
        return sampled


def pad_to(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pad an HxWxC image at the bottom/right to ``size`` by reflection (edge when too small)."""
    pad_h, pad_w = size[0] - rgb.shape[0], size[1] - rgb.shape[1]
    if pad_h == 0 and pad_w == 0:
        return rgb
    mode = "reflect" if pad_h < rgb.shape[0] and pad_w < rgb.shape[1] else "edge"
    return np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)

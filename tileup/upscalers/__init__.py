"""Pixel upscalers (spandrel SR models, resamplers) and the upscaler name registry."""

from __future__ import annotations

from tileup.upscalers.models import SRModel, UpscalerError, load_sr_model
from tileup.upscalers.pixel import ModelRunner, model_passes, upscale_pixels
from tileup.upscalers.registry import (
    LATENT_MODES,
    RESAMPLERS,
    UpscalerSpec,
    iter_model_files,
    models_dirs,
    resolve_upscaler,
)
from tileup.upscalers.resample import resample, resize_exact
from tileup.upscalers.tiled import RunReport, run_tiled

__all__ = [
    "LATENT_MODES",
    "RESAMPLERS",
    "ModelRunner",
    "RunReport",
    "SRModel",
    "UpscalerError",
    "UpscalerSpec",
    "iter_model_files",
    "load_sr_model",
    "model_passes",
    "models_dirs",
    "resample",
    "resize_exact",
    "resolve_upscaler",
    "run_tiled",
    "upscale_pixels",
]

"""tileup: seamless, low-memory tiled upscaling with SR models and Stable Diffusion re-diffusion."""

from __future__ import annotations

__version__ = "0.1.0"

from tileup.errors import TileupError
from tileup.pipeline import (
    FileOutcome,
    Stats,
    Upscaler,
    UpscaleResult,
    upscale,
    upscale_files,
)
from tileup.settings import SettingsError, UpscaleSettings

__all__ = [
    "FileOutcome",
    "SettingsError",
    "Stats",
    "TileupError",
    "UpscaleResult",
    "UpscaleSettings",
    "Upscaler",
    "__version__",
    "upscale",
    "upscale_files",
]

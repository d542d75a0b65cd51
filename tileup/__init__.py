"""tileup: seamless, low-memory tiled upscaling with SR models and Stable Diffusion re-diffusion."""

from __future__ import annotations

from tileup.batch import BatchError, FileOutcome, Outcomes, upscale_files
from tileup.errors import Cancelled, TileupError
from tileup.imageio import Picture
from tileup.pipeline import Observer, Upscaler, upscale
from tileup.result import Stats, UpscaleResult
from tileup.settings import SettingsError, UpscaleSettings
from tileup.version import __version__

__all__ = [
    "BatchError",
    "Cancelled",
    "FileOutcome",
    "Observer",
    "Outcomes",
    "Picture",
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

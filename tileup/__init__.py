"""tileup: seamless, low-memory tiled upscaling with SR models and Stable Diffusion re-diffusion.

The public names load on first use (PEP 562), so ``import tileup`` and the command line's
``--help`` do not pay for torch, spandrel and diffusers until an engine is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tileup.errors import Cancelled, TileupError
from tileup.version import __version__

if TYPE_CHECKING:
    from tileup.batch import BatchError, FileOutcome, Outcomes, upscale_files
    from tileup.imageio import Picture
    from tileup.pipeline import Upscaler, upscale
    from tileup.progress import Observer
    from tileup.result import Stats, UpscaleResult
    from tileup.settings import SettingsError, UpscaleSettings
    from tileup.txt2img import GenerateSettings, Generator, generate

_LAZY = {
    "BatchError": "tileup.batch",
    "FileOutcome": "tileup.batch",
    "Outcomes": "tileup.batch",
    "upscale_files": "tileup.batch",
    "GenerateSettings": "tileup.txt2img",
    "Generator": "tileup.txt2img",
    "generate": "tileup.txt2img",
    "Picture": "tileup.imageio",
    "Observer": "tileup.progress",
    "Upscaler": "tileup.pipeline",
    "upscale": "tileup.pipeline",
    "Stats": "tileup.result",
    "UpscaleResult": "tileup.result",
    "SettingsError": "tileup.settings",
    "UpscaleSettings": "tileup.settings",
}

__all__ = [
    "BatchError",
    "Cancelled",
    "FileOutcome",
    "GenerateSettings",
    "Generator",
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
    "generate",
    "upscale",
    "upscale_files",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tileup' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

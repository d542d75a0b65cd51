"""Upscaler names → what they mean: a resampler, a latent mode, or an SR model file.

Model files are looked up as ``NAME.{safetensors,pth,pt,ckpt}`` in every models folder
(``--models-dir``, then ``$TILEUP_MODELS``, ``:``-separated), directly and inside the
A1111 (``ESRGAN``, ``RealESRGAN``, ``SwinIR``, ``DAT``, ``HAT``) and ComfyUI
(``upscale_models``) sub-folders.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import ClassVar

from tileup.choices import LATENT_MODES, MODELS_ENV, RESAMPLERS
from tileup.upscalers.models import MODEL_SUFFIXES, UpscalerError

UPSCALER_SUBDIRS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT", "upscale_models")
LATENT_PREFIX = "latent"
DEFAULT_MODEL_NAME = "realesrgan-x4fast"


@dataclass(frozen=True)
class ModelUpscaler:
    """An SR model file (any architecture spandrel loads); upscales pixels."""

    name: str
    path: Path
    works_on_latents: ClassVar[bool] = False


@dataclass(frozen=True)
class Resampler:
    """A plain pixel resampler (``mode`` one of RESAMPLERS)."""

    name: str
    mode: str
    works_on_latents: ClassVar[bool] = False


@dataclass(frozen=True)
class LatentUpscaler:
    """Latent interpolation (``mode`` one of LATENT_MODES): needs a checkpoint to encode the
    source, and a denoise of about 0.5+ to remove the blur."""

    name: str
    mode: str
    works_on_latents: ClassVar[bool] = True


UpscalerChoice = ModelUpscaler | Resampler | LatentUpscaler
"""What an ``--upscaler`` value resolves to."""


def builtin_model_path() -> Path:
    """The SR model shipped inside the package (Real-ESRGAN general x4 v3 architecture)."""
    return Path(
        str(resources.files("tileup") / "data" / "models" / f"{DEFAULT_MODEL_NAME}.safetensors")
    )


def models_dirs(extra: Sequence[str | Path] = ()) -> tuple[Path, ...]:
    """Folders searched for models, in priority order, without duplicates."""
    env = [p for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p]
    seen: list[Path] = []
    for d in [*extra, *env]:
        path = Path(d).expanduser()
        if path not in seen:
            seen.append(path)
    return tuple(seen)


def iter_model_files(dirs: Iterable[Path]) -> Iterator[Path]:
    """Model files in the folders and their known sub-folders; the first of a name wins."""
    seen: set[str] = set()
    for root in dirs:
        for folder in (root, *(root / sub for sub in UPSCALER_SUBDIRS)):
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if (
                    path.is_file()
                    and path.suffix.lower() in MODEL_SUFFIXES
                    and path.stem not in seen
                ):
                    seen.add(path.stem)
                    yield path


def resolve_upscaler(name: str, extra_dirs: Sequence[str | Path] = ()) -> UpscalerChoice:
    """Resolve an ``--upscaler`` value; unknown names raise UpscalerError listing what exists."""
    key = name.strip()
    lowered = key.lower()
    if lowered == "default":
        return ModelUpscaler(DEFAULT_MODEL_NAME, builtin_model_path())
    if lowered in RESAMPLERS:
        return Resampler(lowered, lowered)
    if lowered == LATENT_PREFIX:
        return LatentUpscaler(lowered, "bilinear")
    if lowered.startswith(LATENT_PREFIX + "-"):
        mode = lowered[len(LATENT_PREFIX) + 1 :]
        if mode not in LATENT_MODES:
            known = ", ".join(f"{LATENT_PREFIX}-{m}" for m in LATENT_MODES)
            raise UpscalerError(f"unknown latent upscaler {key!r}; known: latent, {known}")
        return LatentUpscaler(lowered, mode)
    as_path = Path(key).expanduser()
    if as_path.suffix.lower() in MODEL_SUFFIXES or os.sep in key or as_path.is_file():
        if not as_path.is_file():
            raise UpscalerError(f"{key}: no such model file")
        return ModelUpscaler(as_path.stem, as_path)
    dirs = models_dirs(extra_dirs)
    found = list(iter_model_files(dirs))
    for path in found:
        if path.stem == key:
            return ModelUpscaler(key, path)
    for path in found:  # case-insensitive second chance, as Windows users expect
        if path.stem.lower() == lowered:
            return ModelUpscaler(path.stem, path)
    names = ["default", *RESAMPLERS, *(p.stem for p in found)]
    where = (
        ", ".join(str(d) for d in dirs)
        if dirs
        else f"no models folder (use --models-dir or ${MODELS_ENV})"
    )
    raise UpscalerError(
        f"unknown upscaler {key!r}; searched {where}; available: {', '.join(names)}"
    )

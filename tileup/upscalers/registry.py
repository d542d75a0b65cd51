"""Upscaler names → what they mean: a resampler, a latent mode, or an SR model file.

Model files are looked up as ``NAME.{safetensors,pth,pt,ckpt}`` in every models folder
(``--models-dir``, then ``$TILEUP_MODELS``, ``:``-separated), directly and inside the
A1111 (``ESRGAN``, ``RealESRGAN``, ``SwinIR``, ``DAT``, ``HAT``, ``ScuNET``) and ComfyUI
(``upscale_models``) sub-folders. A1111's and ComfyUI's names resolve too: "Latent (bicubic
antialiased)", "R-ESRGAN 4x+" (the file RealESRGAN_x4plus), "None", "nearest-exact", "bislerp".
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import ClassVar

from tileup.choices import LATENT_MODES, MODELS_ENV, RESAMPLERS
from tileup.errors import TileupError

MODEL_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
"""Suffixes of the SR model files looked up by name in the models folders."""


class UpscalerError(TileupError):
    """An upscaler could not be found or built; the message is one line naming it."""


UPSCALER_SUBDIRS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT", "ScuNET", "upscale_models")

A1111_LATENT_NAMES = {
    "latent (antialiased)": "bilinear-antialiased",
    "latent (bicubic)": "bicubic",
    "latent (bicubic antialiased)": "bicubic-antialiased",
    "latent (nearest)": "nearest",
    "latent (nearest-exact)": "nearest-exact",
}
"""A1111's hires-fix latent upscaler names (lower case) → latent modes; plain "Latent" is
bilinear."""

A1111_MODEL_FILES = {
    "r-esrgan 4x+": "RealESRGAN_x4plus",
    "r-esrgan 4x+ anime6b": "RealESRGAN_x4plus_anime_6B",
    "r-esrgan 2x+": "RealESRGAN_x2plus",
    "r-esrgan general 4xv3": "realesr-general-x4v3",
    "r-esrgan general wdn 4xv3": "realesr-general-wdn-x4v3",
    "r-esrgan animevideo": "realesr-animevideov3",
    "scunet gan": "scunet_color_real_gan",
    "scunet": "scunet_color_real_gan",
    "scunet psnr": "scunet_color_real_psnr",
}
"""A1111's upscaler names (lower case) → the file stem A1111 downloads them as."""

PIXEL_ALIASES = {"none": ("None", "lanczos"), "nearest-exact": ("nearest-exact", "nearest")}
"""A1111's "None" (a plain Lanczos resize) and ComfyUI's "nearest-exact" (pixel centres, what
PIL's nearest does)."""

LATENT_ONLY = ("bislerp",)
"""ComfyUI latent-upscale methods with no pixel counterpart: they name latent modes."""
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
    lowered = " ".join(key.lower().split())
    if lowered == "default":
        return ModelUpscaler(DEFAULT_MODEL_NAME, builtin_model_path())
    if lowered in RESAMPLERS:
        return Resampler(lowered, lowered)
    if lowered in PIXEL_ALIASES:
        return Resampler(*PIXEL_ALIASES[lowered])
    if lowered in A1111_LATENT_NAMES:
        return LatentUpscaler(key, A1111_LATENT_NAMES[lowered])
    if lowered in LATENT_ONLY:
        return LatentUpscaler(lowered, lowered)
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
    stem = A1111_MODEL_FILES.get(lowered)
    if stem is not None:
        for path in found:
            if path.stem.lower() == stem.lower():
                return ModelUpscaler(key, path)
        raise UpscalerError(
            f"upscaler {key!r} is A1111's name for the file {stem}.pth or {stem}.safetensors; "
            f"put it in a models folder (searched: {', '.join(map(str, dirs)) or 'none'})"
        )
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

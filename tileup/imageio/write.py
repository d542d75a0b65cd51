"""Write images atomically: a file appears complete or not at all, and is never replaced
unless asked.

The encoder writes a temporary file ``.NAME.tmp-*`` in the output folder, which is flushed to
disk and then moved into place; whatever happens (an encoder error, an exception raised by a
signal handler) the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tileup.imageio.encode import encode
from tileup.imageio.errors import ImageError, describe
from tileup.imageio.picture import icc_colour_space

WRITE_FORMATS: Mapping[str, str] = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
}
"""Output suffix (lower case) → format written by :func:`write_image`."""

_KEEPS_16_BITS = frozenset({"PNG", "TIFF"})
_KEEPS_ALPHA = frozenset({"PNG", "WEBP", "TIFF"})
_MAX_SIDE = {"JPEG": 65535, "WEBP": 16383}
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)
"""ITU-R BT.601 luma, as Pillow's ``convert("L")``: RGB → grey for grey outputs."""


def check_output(path: str | os.PathLike[str], *, overwrite: bool) -> str:
    """The format :func:`write_image` writes ``path`` in, once its suffix is known and the
    path is free: not a folder, and not an existing file unless ``overwrite``. The folder is not
    checked. Raises ImageError naming the file."""
    path = Path(path)
    fmt = WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(WRITE_FORMATS)
        shown = path.suffix or "(no suffix)"
        raise ImageError(f"{path}: unknown image format {shown}; use one of {known}")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder")
    if not overwrite and os.path.lexists(path):
        raise ImageError(f"{path}: already exists; pass --overwrite to replace it")
    return fmt


def write_image(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    bit_depth: int = 8,
    icc_profile: bytes | None = None,
    parameters: str | None = None,
    overwrite: bool = False,
    quality: int = 95,
    grey: bool = False,
) -> Path:
    """Write ``rgb`` (float HxWx3, clipped to [0, 1]) atomically to ``path``; returns the path.

    The format follows the suffix (see WRITE_FORMATS). ``bit_depth`` 16 is kept by PNG and TIFF,
    others write 8 bits. ``alpha`` (HxW) is kept by PNG, WebP and TIFF and dropped by JPEG and BMP.
    ``icc_profile`` (an RGB profile) is embedded in PNG, JPEG, WebP and TIFF. ``parameters`` goes
    into the PNG text chunk "parameters", the EXIF UserComment of JPEG/WebP (as A1111 writes it)
    or the TIFF ImageDescription; BMP has no metadata. ``quality`` applies to JPEG and WebP (WebP
    at 100 is lossless). ``grey`` writes one luma channel (BT.601; L, LA or 16-bit grey) where
    the format has grey (WebP has none: RGB with equal channels; 16-bit grey + alpha PNG: RGBA
    with equal channels) and no ICC profile. The folder must exist. An existing file is
    replaced only with ``overwrite``. Raises ImageError naming the file (ValueError for
    malformed arguments); nothing partial is ever left behind.
    """
    path = Path(path)
    fmt = check_output(path, overwrite=overwrite)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or not np.issubdtype(rgb.dtype, np.floating):
        raise ValueError(f"rgb must be float HxWx3, got {rgb.dtype} {rgb.shape}")
    if rgb.size == 0:
        raise ValueError(f"rgb has no pixels: shape {rgb.shape}")
    if alpha is not None and (
        alpha.shape != rgb.shape[:2] or not np.issubdtype(alpha.dtype, np.floating)
    ):
        raise ValueError(f"alpha must be float {rgb.shape[:2]}, got {alpha.dtype} {alpha.shape}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if icc_profile is not None and icc_colour_space(icc_profile) != b"RGB ":
        raise ValueError("icc_profile is not an RGB ICC profile")
    height, width = rgb.shape[:2]
    max_side = _MAX_SIDE.get(fmt)
    if max_side is not None and max(height, width) > max_side:
        raise ImageError(
            f"{path}: {width}x{height} is too large for {fmt} (at most {max_side} pixels a side); "
            "write .png or .tif instead"
        )
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ImageError(f"{path}: output folder {folder} {what}")

    bits = bit_depth if fmt in _KEEPS_16_BITS else 8
    keep_alpha = alpha is not None and fmt in _KEEPS_ALPHA
    colours = 1 if grey else 3
    pixels = np.empty((height, width, colours + keep_alpha), np.uint8 if bits == 8 else np.uint16)
    quantise((rgb @ LUMA_WEIGHTS)[..., None] if grey else rgb, pixels[..., :colours])
    if keep_alpha and alpha is not None:
        quantise(alpha, pixels[..., colours])
    if grey:
        icc_profile = None  # an RGB profile does not describe grey pixels
        if fmt == "WEBP" or (fmt == "PNG" and bits == 16 and keep_alpha):
            pixels = pixels[..., [0, 0, 0, 1][: 3 + keep_alpha]]

    try:
        fd, temp_name = tempfile.mkstemp(prefix=_temp_prefix(path), dir=folder)
    except OSError as exc:
        raise ImageError(f"{path}: cannot write to {folder} ({describe(exc)})") from exc
    temp = Path(temp_name)
    try:
        # Opened through the descriptor, named by its path (tifffile reads ``fh.name``).
        with open(temp, "wb", opener=lambda _name, _flags: fd) as fh:
            try:
                encode(fh, fmt, pixels, icc_profile, parameters, quality)
            except OSError:
                raise
            except Exception as exc:
                raise ImageError(f"{path}: cannot encode {fmt} ({describe(exc)})") from exc
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(temp, 0o666 & ~umask())
        _move_into_place(temp, path, overwrite)
        _fsync_folder(folder)
    except OSError as exc:
        raise ImageError(f"{path}: cannot write ({describe(exc)})") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    return path


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def remove_temp_files(path: str | os.PathLike[str]) -> int:
    """Remove the temporary files a writer of ``path`` killed without warning (SIGKILL, a lost
    machine) left beside it; returns how many. Only for a path no other process is writing."""
    path = Path(path)
    removed = 0
    for name in glob.glob(glob.escape(str(path.parent / _temp_prefix(path))) + "*"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
            removed += 1
    return removed


def quantise(values: np.ndarray, out: np.ndarray) -> None:
    """Fill integer ``out`` with round(clip(values, 0, 1) * max), block by block (low memory).

    Raises ValueError for NaN values.
    """
    scale = float(np.iinfo(out.dtype).max)
    rows = max(1, (1 << 22) // max(1, values[0].size))
    for top in range(0, values.shape[0], rows):
        block = np.clip(values[top : top + rows], 0.0, 1.0, dtype=np.float32)
        if not np.isfinite(block).all():
            raise ValueError("pixel values contain NaN")
        block *= scale
        np.rint(block, out=block)
        out[top : top + rows] = block


def _move_into_place(temp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temporary file to ``path``; never replaces a file unless ``overwrite``."""
    if overwrite:
        os.replace(temp, path)
        return
    try:
        os.link(temp, path)  # fails if ``path`` appeared meanwhile: no race
    except FileExistsError as exc:
        raise ImageError(f"{path}: already exists; pass --overwrite to replace it") from exc
    except OSError:  # a file system without hard links
        if os.path.lexists(path):
            raise ImageError(f"{path}: already exists; pass --overwrite to replace it") from None
        os.replace(temp, path)


def _fsync_folder(folder: Path) -> None:
    """Best effort: make the rename durable (not possible on every platform)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask, read without changing it where the platform allows."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

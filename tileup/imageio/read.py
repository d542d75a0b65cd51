"""Read images: files, PIL images and arrays → :class:`Picture`; headers without the pixels.

Every failure a user can cause (a bad path, a broken file, a limit) raises :class:`ImageError`
whose message is one line naming the file; library exceptions are chained, never leaked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from tileup.choices import DEFAULT_MAX_PIXELS
from tileup.imageio.decode import (
    ORIENTATION,
    is_16bit_colour,
    opencv_16bit,
    orient,
    pil_pixels,
    swaps_sides,
)
from tileup.imageio.errors import ImageError, describe
from tileup.imageio.picture import Picture, make_picture
from tileup.imageio.png import PNG_SIGNATURE, png_metadata

# Pillow formats never opened: EPS runs Ghostscript on the file's contents.
_UNSAFE_FORMATS = frozenset({"EPS"})
_SIGNATURES = {
    PNG_SIGNATURE: "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"II*\0": "TIFF",
    b"MM\0*": "TIFF",
    b"GIF8": "GIF",
    b"BM": "BMP",
}


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says: its size once EXIF orientation is applied (the size
    :func:`read_image` returns), whether it has alpha and Pillow's format name."""

    height: int
    width: int
    has_alpha: bool
    format: str | None


def read_image(
    src: str | os.PathLike[str] | Image.Image | np.ndarray, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Picture:
    """Decode a file, a PIL image or an array into a :class:`Picture`.

    EXIF orientation is applied first. Grey becomes three equal channels; palette, CMYK and other
    modes become RGB(A); 16-bit PNG/TIFF (grey, RGB, RGBA) keep 16 bits; float arrays must lie in
    [0, 1] (rounding slack clipped). Arrays may be HxW, HxWx1..4 (grey, grey+alpha, RGB, RGBA)
    of uint8, uint16 or float. Images with more than ``max_pixels`` pixels (default 16384²,
    as ``--max-pixels``) are refused before decoding. Raises ImageError naming the file.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if isinstance(src, np.ndarray):
        return _picture_from_array(src, max_pixels)
    if isinstance(src, Image.Image):
        check_pixels("input image", src.width, src.height, max_pixels)
        with pillow_limit_lifted():
            try:
                pixels, bit_depth = pil_pixels(src, "input image")
            except ImageError:
                raise
            except Exception as exc:
                raise ImageError(f"input image: cannot decode ({describe(exc)})") from exc
        return make_picture(
            pixels, bit_depth, src.info.get("icc_profile"), None, src.format, src.mode
        )

    path = Path(src)
    data = read_file(path)
    stream = io.BytesIO(data)
    with pillow_limit_lifted(), open_pil(path, stream) as img:
        check_pixels(str(path), img.width, img.height, max_pixels)
        mode, fmt, icc = img.mode, img.format, img.info.get("icc_profile")
        try:
            deep = opencv_16bit(data) if is_16bit_colour(img, data) else None
            if deep is None:
                pixels, bit_depth = pil_pixels(img, str(path))
            else:
                pixels, bit_depth = orient(deep, _header_orientation(img, stream)), 16
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(f"{path}: corrupt or truncated {fmt} file ({describe(exc)})") from exc
    picture = make_picture(pixels, bit_depth, icc, path, fmt, mode)
    return dataclasses.replace(picture, parameters=_parameters_or_none(path, data))


def _parameters_or_none(path: Path, data: bytes) -> str | None:
    """The file's A1111 parameters; None when it has none or they are unreadable (the pixels
    decoded: corrupt metadata is not a reason to refuse the image)."""
    from tileup.imageio.metadata import parameters_in  # metadata imports this module

    try:
        return parameters_in(path, data)
    except ImageError:
        return None


def read_header(src: str | os.PathLike[str]) -> ImageHeader:
    """The :class:`ImageHeader` of an image file, read from its header: no pixel is decoded,
    whatever size the file declares. Raises ImageError naming the file."""
    path = Path(src)
    with open_file(path) as fh, pillow_limit_lifted(), open_pil(path, fh) as img:
        try:
            orientation = _header_orientation(img, fh)
            has_alpha = "A" in img.getbands() or "transparency" in img.info
        except Exception as exc:
            raise ImageError(f"{path}: corrupt {img.format} header ({describe(exc)})") from exc
        width, height = img.size
    if swaps_sides(orientation):
        width, height = height, width
    return ImageHeader(height=height, width=width, has_alpha=has_alpha, format=img.format)


def _header_orientation(img: Image.Image, fh: BinaryIO) -> object:
    """The EXIF orientation of ``img`` opened from ``fh``, without decoding pixels (Pillow
    decodes a whole PNG to look for an eXIf chunk after the pixel data)."""
    if img.format != "PNG":
        return img.getexif().get(ORIENTATION, 1)
    fh.seek(len(PNG_SIGNATURE))
    _, payload = png_metadata(fh)
    if payload is None:
        return 1
    exif = Image.Exif()
    exif.load(payload)
    return exif.get(ORIENTATION, 1)


def check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    """ImageError naming ``name`` when ``width``×``height`` exceeds ``max_pixels`` or is empty."""
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels}; raise it with --max-pixels"
        )
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")


# -- files -----------------------------------------------------------------------------------


def open_file(path: Path) -> BinaryIO:
    """``path`` opened for reading; ImageError for a missing, unreadable or empty file or a
    folder."""
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image file")
    try:
        fh = path.open("rb")
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: no such file") from exc
    except PermissionError as exc:
        raise ImageError(f"{path}: permission denied") from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({describe(exc)})") from exc
    if os.fstat(fh.fileno()).st_size == 0:
        fh.close()
        raise ImageError(f"{path}: file is empty")
    return fh


def read_file(path: Path) -> bytes:
    """The bytes of ``path``; ImageError as :func:`open_file`."""
    with open_file(path) as fh:
        try:
            data = fh.read()
        except OSError as exc:
            raise ImageError(f"{path}: cannot read ({describe(exc)})") from exc
    if not data:
        raise ImageError(f"{path}: file is empty")
    return data


@contextlib.contextmanager
def open_pil(path: Path, stream: BinaryIO) -> Iterator[Image.Image]:
    """Open ``stream`` lazily with Pillow (header only); ImageError naming ``path`` if it is no
    image. Formats that run external programs (EPS) are never opened."""
    Image.init()
    formats = [f for f in Image.OPEN if f not in _UNSAFE_FORMATS]
    try:
        img = Image.open(stream, formats=formats)
    except UnidentifiedImageError as exc:
        stream.seek(0)
        kind = _kind_by_signature(stream.read(12))
        if kind is not None:
            raise ImageError(
                f"{path}: corrupt or truncated {kind} file (unreadable header)"
            ) from exc
        raise ImageError(f"{path}: not an image file (cannot identify image format)") from exc
    except Exception as exc:
        raise ImageError(f"{path}: corrupt image file ({describe(exc)})") from exc
    with img:
        yield img


def _kind_by_signature(head: bytes) -> str | None:
    """The format a file claims by its magic number, for messages about damaged files."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for magic, kind in _SIGNATURES.items() if head.startswith(magic)), None)


class _PillowLimit:
    """Lifts Pillow's own decompression-bomb limit while any read is running (our limit rules)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.saved: int | None = None

    @contextlib.contextmanager
    def lifted(self) -> Iterator[None]:
        with self.lock:
            if self.users == 0:
                self.saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
            self.users += 1
        try:
            yield
        finally:
            with self.lock:
                self.users -= 1
                if self.users == 0:
                    Image.MAX_IMAGE_PIXELS = self.saved


pillow_limit_lifted = _PillowLimit().lifted


# -- arrays ----------------------------------------------------------------------------------


FLOAT_SLACK = 1e-3
"""How far outside [0, 1] a float array may stray (rounding of a computation) to be clipped;
further is an error rather than a silent clip to white or black."""


def _picture_from_array(array: np.ndarray, max_pixels: int) -> Picture:
    name = "input array"
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or not 1 <= array.shape[2] <= 4:
        raise ImageError(f"{name}: shape {array.shape} is not HxW or HxWxC with C in 1..4")
    check_pixels(name, array.shape[1], array.shape[0], max_pixels)
    if array.dtype == np.uint8:
        bit_depth = 8
    elif array.dtype == np.uint16:
        bit_depth = 16
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"{name}: contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < -FLOAT_SLACK or high > 1 + FLOAT_SLACK:
            hint = " (divide 0-255 values by 255)" if high > 1.5 else ""
            raise ImageError(
                f"{name}: float values must lie in [0, 1], got {low:g} to {high:g}{hint}"
            )
        bit_depth = 16
    else:
        raise ImageError(f"{name}: dtype {array.dtype} is not uint8, uint16 or float")
    mode = ("L", "LA", "RGB", "RGBA")[array.shape[2] - 1]
    return make_picture(array, bit_depth, None, None, None, mode)

"""Pixels out of decoders: Pillow's modes and OpenCV's 16-bit colour → plain numpy arrays.

Arrays are HxW or HxWxC with C grey, grey+alpha, RGB or RGBA; dtype uint8, uint16 or float32.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

from tileup.imageio.errors import ImageError

ORIENTATION = 0x0112
"""The EXIF orientation tag."""
_TIFF_BITS_PER_SAMPLE = 258

_ORIENTATIONS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def is_16bit_colour(img: Image.Image, data: bytes) -> bool:
    """Whether the file (``data``, opened as ``img``) holds 16-bit colour that Pillow would
    reduce to 8 bits."""
    if img.format == "PNG":
        # IHDR: bit depth at byte 24, colour type at 25 (2 RGB, 4 grey+alpha, 6 RGBA).
        return len(data) > 25 and data[24] == 16 and data[25] in (2, 4, 6)
    if img.format == "TIFF" and img.mode in ("RGB", "RGBA", "RGBX", "LA"):
        bits = getattr(img, "tag_v2", {}).get(_TIFF_BITS_PER_SAMPLE)
        bits = bits if isinstance(bits, tuple) else (bits,)
        return 16 in bits
    return False


def opencv_16bit(data: bytes) -> np.ndarray | None:
    """Decode 16-bit PNG/TIFF colour with OpenCV as uint16 RGB(A); None if OpenCV cannot."""
    import cv2

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.dtype != np.uint16:
        return None  # Pillow decodes it instead (8 bits) or reports the corruption.
    if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        pixels = pixels[..., [2, 1, 0, 3][: pixels.shape[2]]]  # BGR(A) → RGB(A)
    return pixels


def orient(pixels: np.ndarray, orientation: object) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an HxW[xC] array exactly as ImageOps.exif_transpose;
    other values leave it as it is."""
    transform = _ORIENTATIONS.get(orientation) if isinstance(orientation, int) else None
    return pixels if transform is None else transform(pixels)


def swaps_sides(orientation: object) -> bool:
    """Whether an EXIF orientation turns the image by 90° (width and height swap)."""
    return orientation in (5, 6, 7, 8)


def pil_pixels(img: Image.Image, name: str) -> tuple[np.ndarray, int]:
    """Fully decode ``img`` (orientation applied) into an array and its bit depth (8 or 16).

    Raises ImageError naming ``name`` for a mode that has no RGB(A) conversion.
    """
    img.load()
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    has_key_colour = "transparency" in img.info
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img).astype(np.uint16), 16
    if mode == "I":
        return np.clip(np.asarray(img), 0, 65535).astype(np.uint16), 16
    if mode == "F":
        return np.asarray(img, dtype=np.float32), 16
    if mode in ("L", "LA", "RGB", "RGBA") and not (has_key_colour and mode in ("L", "RGB")):
        return np.asarray(img), 8
    if mode in ("1", "L") and not has_key_colour:
        target = "L"
    elif mode in ("L", "La"):
        target = "LA"
    elif mode in ("P", "RGB", "RGBa", "PA") and (has_key_colour or mode in ("RGBa", "PA")):
        target = "RGBA"
    elif mode in ("P", "RGBX", "CMYK", "YCbCr"):
        target = "RGB"
    else:
        target = "RGBA" if img.has_transparency_data else "RGB"
    try:
        converted = img.convert(target)
    except ValueError as exc:
        raise ImageError(f"{name}: unsupported colour mode {mode}") from exc
    return np.asarray(converted), 8

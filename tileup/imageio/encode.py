"""Encode integer pixels as one image format, with the ICC profile and ``parameters`` text.

16-bit PNG goes through OpenCV (Pillow cannot write 16-bit colour PNG) with the chunks added
after IHDR; TIFF through tifffile (16-bit colour, unassociated alpha, ImageDescription, ICC);
the rest through Pillow.
"""

from __future__ import annotations

import zlib
from typing import BinaryIO

import numpy as np
from PIL import Image, PngImagePlugin

from tileup.imageio.metadata import PARAMETERS_KEY, exif_with_comment
from tileup.imageio.png import png_add_chunks, png_text_chunk


def encode(
    fh: BinaryIO,
    fmt: str,
    pixels: np.ndarray,
    icc_profile: bytes | None,
    parameters: str | None,
    quality: int,
) -> None:
    """Encode uint8/uint16 HxWxC ``pixels`` (C: 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA) as
    ``fmt`` (a Pillow format name) into the seekable ``fh``. ``quality`` applies to JPEG and
    WebP (WebP at 100 is lossless)."""
    if fmt == "TIFF":
        _encode_tiff(fh, pixels, icc_profile, parameters)
    elif fmt == "PNG" and pixels.dtype == np.uint16:
        _encode_png16(fh, pixels, icc_profile, parameters)
    else:
        _encode_pillow(fh, fmt, pixels, icc_profile, parameters, quality)


def _encode_tiff(
    fh: BinaryIO, pixels: np.ndarray, icc_profile: bytes | None, description: str | None
) -> None:
    """Baseline TIFF, Deflate with horizontal predictor; ``description`` as UTF-8 bytes in
    ImageDescription (tifffile refuses non-ASCII str), ``icc_profile`` in tag 34675."""
    import tifffile

    channels = pixels.shape[2]
    tifffile.imwrite(
        fh,
        pixels[..., 0] if channels == 1 else pixels,
        photometric="rgb" if channels >= 3 else "minisblack",
        extrasamples=("unassalpha",) if channels in (2, 4) else None,
        compression="zlib",
        compressionargs={"level": 6},
        predictor=True,
        description=None if description is None else description.encode("utf-8"),
        iccprofile=icc_profile or None,
        metadata=None,  # no tifffile JSON in ImageDescription
        resolution=(72, 72),
        resolutionunit="inch",
        software="tileup",
    )


def _encode_png16(
    fh: BinaryIO, pixels: np.ndarray, icc_profile: bytes | None, parameters: str | None
) -> None:
    import cv2

    channels = pixels.shape[2]
    ok, encoded = cv2.imencode(
        ".png", pixels[..., 0] if channels == 1 else pixels[..., [2, 1, 0, 3][:channels]]
    )
    if not ok:
        raise ValueError("OpenCV could not encode the 16-bit PNG")
    chunks = []
    if icc_profile:
        chunks.append((b"iCCP", b"ICC Profile\0\0" + zlib.compress(icc_profile)))
    if parameters is not None:
        chunks.append(png_text_chunk(PARAMETERS_KEY, parameters))
    fh.write(png_add_chunks(encoded.tobytes(), chunks))


def _encode_pillow(
    fh: BinaryIO,
    fmt: str,
    pixels: np.ndarray,
    icc_profile: bytes | None,
    parameters: str | None,
    quality: int,
) -> None:
    img = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    options: dict[str, object] = {}
    if icc_profile and fmt != "BMP":
        options["icc_profile"] = icc_profile
    if fmt == "PNG":
        if parameters is not None:
            info = PngImagePlugin.PngInfo()
            info.add_text(PARAMETERS_KEY, parameters)
            options["pnginfo"] = info
    elif fmt in ("JPEG", "WEBP"):
        options["quality"] = quality
        if fmt == "JPEG":
            options["subsampling"] = 0  # 4:4:4: upscaled detail survives in the chroma too
        else:
            options["lossless"] = quality == 100
            options["exact"] = True  # keep the colour of fully transparent pixels
        if parameters is not None:
            options["exif"] = exif_with_comment(parameters)
    img.save(fh, format=fmt, **options)

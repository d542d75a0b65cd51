"""Read and write images: colour modes, 16 bits, alpha, EXIF orientation, pixel limits, atomic
writes and A1111-style ``parameters`` metadata.

Contracts:

- Pixels travel as float32 in [0, 1]: colour as a C-contiguous HxWx3 array, alpha as HxW.
- Every failure a user can cause (a bad path, a broken file, a limit) raises :class:`ImageError`
  whose message is one line naming the file; library exceptions are chained, never leaked.
- Written files appear complete or not at all: the encoder writes a temporary file in the output
  folder, which is flushed to disk and then moved into place.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from tileup.errors import TileupError

__all__ = [
    "WRITE_FORMATS",
    "ImageError",
    "Picture",
    "read_image",
    "read_parameters",
    "write_image",
]

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

PARAMETERS_KEY = "parameters"
_KEEPS_16_BITS = frozenset({"PNG", "TIFF"})
_KEEPS_ALPHA = frozenset({"PNG", "WEBP", "TIFF"})
_MAX_SIDE = {"JPEG": 65535, "WEBP": 16383}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286
_IMAGE_DESCRIPTION = 270
_ORIENTATION = 0x0112
_TIFF_BITS_PER_SAMPLE = 258
_MAX_TEXT_BYTES = 1 << 24
# Pillow formats never opened: EPS runs Ghostscript on the file's contents.
_UNSAFE_FORMATS = frozenset({"EPS"})


class ImageError(TileupError):
    """An image cannot be read or written; ``str(error)`` is one line naming the file."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", message).strip())


@dataclass(frozen=True, eq=False)
class Picture:
    """A decoded image.

    ``rgb`` is float32 HxWx3 in [0, 1], C-contiguous; ``alpha`` float32 HxW in [0, 1] or None
    (other float arrays are converted on construction; wrong shapes raise ValueError).
    ``bit_depth`` (8 or 16) is the precision of the source; ``icc_profile`` is an RGB ICC profile
    or None (profiles of other colour spaces are dropped, as the pixels are RGB); ``source`` the
    file read (None for arrays and PIL images); ``source_format`` Pillow's format name;
    ``mode`` the source's Pillow mode (for arrays: L, LA, RGB or RGBA).
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int
    icc_profile: bytes | None = None
    source: Path | None = None
    source_format: str | None = None
    mode: str = "RGB"

    def __post_init__(self) -> None:
        rgb, alpha = self.rgb, self.alpha
        if rgb.ndim != 3 or rgb.shape[2] != 3 or not np.issubdtype(rgb.dtype, np.floating):
            raise ValueError(f"Picture.rgb must be float HxWx3, got {rgb.dtype} {rgb.shape}")
        if alpha is not None and (
            alpha.shape != rgb.shape[:2] or not np.issubdtype(alpha.dtype, np.floating)
        ):
            raise ValueError(
                f"Picture.alpha must be float {rgb.shape[:2]}, got {alpha.dtype} {alpha.shape}"
            )
        if self.bit_depth not in (8, 16):
            raise ValueError(f"Picture.bit_depth must be 8 or 16, got {self.bit_depth}")
        # Same values as float32, C-contiguous (no copy when they already are).
        object.__setattr__(self, "rgb", np.ascontiguousarray(rgb, dtype=np.float32))
        if alpha is not None:
            object.__setattr__(self, "alpha", np.ascontiguousarray(alpha, dtype=np.float32))

    @property
    def height(self) -> int:
        """Rows of pixels."""
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        """Columns of pixels."""
        return int(self.rgb.shape[1])


# -- reading ---------------------------------------------------------------------------------


def read_image(
    src: str | os.PathLike[str] | Image.Image | np.ndarray, *, max_pixels: int
) -> Picture:
    """Decode a file, a PIL image or an array into a :class:`Picture`.

    EXIF orientation is applied first. Grey becomes three equal channels; palette, CMYK and other
    modes become RGB(A); 16-bit PNG/TIFF (grey, RGB, RGBA) keep 16 bits; float images are clipped
    to [0, 1]. Arrays may be HxW, HxWx1..4 (grey, grey+alpha, RGB, RGBA) of uint8, uint16 or float
    (assumed in [0, 1]). Images with more than ``max_pixels`` pixels are refused before decoding.
    Raises ImageError naming the file.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if isinstance(src, np.ndarray):
        return _picture_from_array(src, max_pixels)
    if isinstance(src, Image.Image):
        _check_pixels("input image", src.width, src.height, max_pixels)
        with _pillow_limit_lifted():
            try:
                pixels, bit_depth = _pil_pixels(src, "input image")
            except ImageError:
                raise
            except Exception as exc:
                raise ImageError(f"input image: cannot decode ({_describe(exc)})") from exc
        return _make_picture(
            pixels, bit_depth, src.info.get("icc_profile"), None, src.format, src.mode
        )

    path = Path(src)
    data = _read_file(path)
    with _pillow_limit_lifted(), _open_pil(path, data) as img:
        _check_pixels(str(path), img.width, img.height, max_pixels)
        mode, fmt, icc = img.mode, img.format, img.info.get("icc_profile")
        try:
            pixels = _opencv_16bit(data) if _is_16bit_colour(img, data) else None
            if pixels is None:
                pixels, bit_depth = _pil_pixels(img, str(path))
            else:
                pixels, bit_depth = _orient(pixels, img.getexif().get(_ORIENTATION, 1)), 16
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(f"{path}: corrupt or truncated {fmt} file ({_describe(exc)})") from exc
    return _make_picture(pixels, bit_depth, icc, path, fmt, mode)


def _read_file(path: Path) -> bytes:
    """The file's bytes; ImageError for a missing, unreadable, empty file or a folder."""
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image file")
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageError(f"{path}: no such file") from exc
    except PermissionError as exc:
        raise ImageError(f"{path}: permission denied") from exc
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({_describe(exc)})") from exc
    if not data:
        raise ImageError(f"{path}: file is empty")
    return data


@contextlib.contextmanager
def _open_pil(path: Path, data: bytes) -> Iterator[Image.Image]:
    """Open ``data`` lazily with Pillow (header only); ImageError if it is no image."""
    Image.init()
    formats = [f for f in Image.OPEN if f not in _UNSAFE_FORMATS]
    try:
        img = Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError as exc:
        kind = _kind_by_signature(data)
        if kind is not None:
            raise ImageError(
                f"{path}: corrupt or truncated {kind} file (unreadable header)"
            ) from exc
        raise ImageError(f"{path}: not an image file (cannot identify image format)") from exc
    except Exception as exc:
        raise ImageError(f"{path}: corrupt image file ({_describe(exc)})") from exc
    with img:
        yield img


_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"II*\0": "TIFF",
    b"MM\0*": "TIFF",
    b"GIF8": "GIF",
    b"BM": "BMP",
}


def _kind_by_signature(data: bytes) -> str | None:
    """The format a file claims by its magic number, for messages about damaged files."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for magic, kind in _SIGNATURES.items() if data.startswith(magic)), None)


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


_pillow_limit_lifted = _PillowLimit().lifted


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels}; raise it with --max-pixels"
        )
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has no pixels ({width}x{height})")


def _is_16bit_colour(img: Image.Image, data: bytes) -> bool:
    """Whether the file holds 16-bit colour that Pillow would reduce to 8 bits."""
    if img.format == "PNG":
        # IHDR: bit depth at byte 24, colour type at 25 (2 RGB, 4 grey+alpha, 6 RGBA).
        return len(data) > 25 and data[24] == 16 and data[25] in (2, 4, 6)
    if img.format == "TIFF" and img.mode in ("RGB", "RGBA", "RGBX", "LA"):
        bits = getattr(img, "tag_v2", {}).get(_TIFF_BITS_PER_SAMPLE)
        bits = bits if isinstance(bits, tuple) else (bits,)
        return 16 in bits
    return False


def _opencv_16bit(data: bytes) -> np.ndarray | None:
    """Decode 16-bit PNG/TIFF colour with OpenCV as uint16 RGB(A); None if OpenCV cannot."""
    import cv2

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.dtype != np.uint16:
        return None  # Pillow decodes it instead (8 bits) or reports the corruption.
    if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        pixels = pixels[..., [2, 1, 0, 3][: pixels.shape[2]]]  # BGR(A) → RGB(A)
    return pixels


def _orient(pixels: np.ndarray, orientation: object) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an HxW[xC] array exactly as ImageOps.exif_transpose."""
    transforms = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    transform = transforms.get(orientation) if isinstance(orientation, int) else None
    return pixels if transform is None else transform(pixels)


def _pil_pixels(img: Image.Image, name: str) -> tuple[np.ndarray, int]:
    """Fully decode ``img`` (orientation applied) into an HxW[xC] array and its bit depth.

    Channels are grey, grey+alpha, RGB or RGBA; dtype uint8, uint16 or float32.
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


def _picture_from_array(array: np.ndarray, max_pixels: int) -> Picture:
    name = "input array"
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or not 1 <= array.shape[2] <= 4:
        raise ImageError(f"{name}: shape {array.shape} is not HxW or HxWxC with C in 1..4")
    _check_pixels(name, array.shape[1], array.shape[0], max_pixels)
    if array.dtype == np.uint8:
        bit_depth = 8
    elif array.dtype == np.uint16:
        bit_depth = 16
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"{name}: contains NaN or infinite values")
        bit_depth = 16
    else:
        raise ImageError(f"{name}: dtype {array.dtype} is not uint8, uint16 or float")
    mode = ("L", "LA", "RGB", "RGBA")[array.shape[2] - 1]
    return _make_picture(array, bit_depth, None, None, None, mode)


def _make_picture(
    pixels: np.ndarray,
    bit_depth: int,
    icc_profile: bytes | None,
    source: Path | None,
    source_format: str | None,
    mode: str,
) -> Picture:
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    channels = pixels.shape[2]
    colour = pixels[..., :3] if channels >= 3 else pixels[..., :1]
    rgb = _unit_float(colour)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    alpha = _unit_float(pixels[..., channels - 1]) if channels in (2, 4) else None
    if icc_profile is not None and _icc_colour_space(icc_profile) != b"RGB ":
        icc_profile = None
    return Picture(
        rgb=np.ascontiguousarray(rgb),
        alpha=alpha,
        bit_depth=bit_depth,
        icc_profile=icc_profile or None,
        source=source,
        source_format=source_format,
        mode=mode,
    )


def _unit_float(values: np.ndarray) -> np.ndarray:
    """uint8/uint16 scaled to [0, 1], floats clipped to [0, 1]; always a new float32 array."""
    out = values.astype(np.float32)
    if values.dtype == np.uint8:
        out /= 255
    elif values.dtype == np.uint16:
        out /= 65535
    else:
        np.clip(out, 0.0, 1.0, out=out)
    return out


def _icc_colour_space(profile: bytes) -> bytes:
    """The data colour space signature of an ICC profile (b'RGB ', b'GRAY', b'CMYK', ...)."""
    return bytes(profile[16:20])


def _describe(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return text or type(exc).__name__


# -- writing ---------------------------------------------------------------------------------


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
) -> Path:
    """Write ``rgb`` (float HxWx3, clipped to [0, 1]) atomically to ``path``; returns the path.

    The format follows the suffix (see WRITE_FORMATS). ``bit_depth`` 16 is kept by PNG and TIFF,
    others write 8 bits. ``alpha`` (HxW) is kept by PNG, WebP and TIFF and dropped by JPEG and BMP.
    ``icc_profile`` (an RGB profile) is embedded in PNG, JPEG, WebP and TIFF. ``parameters`` goes
    into the PNG text chunk "parameters", the EXIF UserComment of JPEG/WebP (as A1111 writes it)
    or the TIFF ImageDescription; BMP has no metadata. ``quality`` applies to JPEG and WebP (WebP
    at 100 is lossless). An existing file is replaced only with ``overwrite``. Raises ImageError
    naming the file; nothing partial is ever left behind.
    """
    path = Path(path)
    fmt = WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(WRITE_FORMATS)
        shown = path.suffix or "(no suffix)"
        raise ImageError(f"{path}: unknown image format {shown}; use one of {known}")
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
    if icc_profile is not None and _icc_colour_space(icc_profile) != b"RGB ":
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
    if path.is_dir():
        raise ImageError(f"{path}: is a folder")
    if not overwrite and os.path.lexists(path):
        raise ImageError(f"{path}: already exists; pass --overwrite to replace it")

    bits = bit_depth if fmt in _KEEPS_16_BITS else 8
    keep_alpha = alpha is not None and fmt in _KEEPS_ALPHA
    pixels = np.empty((height, width, 4 if keep_alpha else 3), np.uint8 if bits == 8 else np.uint16)
    _quantise(rgb, pixels[..., :3])
    if keep_alpha and alpha is not None:
        _quantise(alpha, pixels[..., 3])

    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=folder)
    except OSError as exc:
        raise ImageError(f"{path}: cannot write to {folder} ({_describe(exc)})") from exc
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                _encode(fh, fmt, pixels, icc_profile, parameters, quality)
            except OSError:
                raise
            except Exception as exc:
                raise ImageError(f"{path}: cannot encode {fmt} ({_describe(exc)})") from exc
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(temp, 0o666 & ~_umask())
        _move_into_place(temp, path, overwrite)
        _fsync_folder(folder)
    except OSError as exc:
        raise ImageError(f"{path}: cannot write ({_describe(exc)})") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    return path


def _quantise(values: np.ndarray, out: np.ndarray) -> None:
    """Fill integer ``out`` with round(clip(values, 0, 1) * max), block by block (low memory)."""
    scale = float(np.iinfo(out.dtype).max)
    rows = max(1, (1 << 22) // max(1, values[0].size))
    for top in range(0, values.shape[0], rows):
        block = np.clip(values[top : top + rows], 0.0, 1.0, dtype=np.float32)
        if not np.isfinite(block).all():
            raise ValueError("pixel values contain NaN")
        block *= scale
        np.rint(block, out=block)
        out[top : top + rows] = block


def _encode(
    fh: BinaryIO,
    fmt: str,
    pixels: np.ndarray,
    icc_profile: bytes | None,
    parameters: str | None,
    quality: int,
) -> None:
    """Encode uint8/uint16 HxWx3 or HxWx4 ``pixels`` as ``fmt`` into ``fh``."""
    if fmt == "TIFF":
        _write_tiff(fh, pixels, icc_profile, parameters)
        return
    if fmt == "PNG" and pixels.dtype == np.uint16:
        import cv2

        ok, encoded = cv2.imencode(".png", pixels[..., [2, 1, 0, 3][: pixels.shape[2]]])
        if not ok:
            raise ValueError("OpenCV could not encode the 16-bit PNG")
        chunks = []
        if icc_profile:
            chunks.append((b"iCCP", b"ICC Profile\0\0" + zlib.compress(icc_profile)))
        if parameters is not None:
            chunks.append(_png_text_chunk(PARAMETERS_KEY, parameters))
        fh.write(_png_add_chunks(encoded.tobytes(), chunks))
        return
    img = Image.fromarray(pixels)
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
            options["exif"] = _exif_with_comment(parameters)
    img.save(fh, format=fmt, **options)


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


def _umask() -> int:
    """The process umask, read without changing it where the platform allows."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_tiff(
    fh: BinaryIO, pixels: np.ndarray, icc_profile: bytes | None, description: str | None
) -> None:
    """Write a baseline little-endian TIFF: RGB(A) of 8 or 16 bits, Deflate with predictor 2.

    ``description`` goes into ImageDescription (UTF-8), ``icc_profile`` into tag 34675. Pillow
    cannot write 16-bit colour TIFF and OpenCV writes no metadata, hence this small writer.
    """
    height, width, samples = pixels.shape
    bits = pixels.dtype.itemsize * 8
    data = pixels.astype(f"<u{pixels.dtype.itemsize}", copy=False)
    rows = max(1, min(height, (1 << 20) // (width * samples * pixels.dtype.itemsize)))
    start = fh.tell()
    fh.write(b"II*\0\0\0\0\0")
    offsets: list[int] = []
    counts: list[int] = []
    for top in range(0, height, rows):
        strip = data[top : top + rows]
        diff = strip.copy()
        diff[:, 1:] -= strip[:, :-1]  # horizontal differencing; unsigned wrap-around is intended
        blob = zlib.compress(diff.tobytes(), 6)
        offsets.append(fh.tell() - start)
        counts.append(len(blob))
        fh.write(blob + b"\0" * (len(blob) & 1))
    entries: list[tuple[int, int, int, bytes]] = [
        (256, 4, 1, struct.pack("<I", width)),
        (257, 4, 1, struct.pack("<I", height)),
        (258, 3, samples, struct.pack(f"<{samples}H", *[bits] * samples)),
        (259, 3, 1, struct.pack("<H", 8)),  # Adobe Deflate
        (262, 3, 1, struct.pack("<H", 2)),  # RGB
        (273, 4, len(offsets), struct.pack(f"<{len(offsets)}I", *offsets)),
        (277, 3, 1, struct.pack("<H", samples)),
        (278, 4, 1, struct.pack("<I", rows)),
        (279, 4, len(counts), struct.pack(f"<{len(counts)}I", *counts)),
        (282, 5, 1, struct.pack("<II", 72, 1)),
        (283, 5, 1, struct.pack("<II", 72, 1)),
        (284, 3, 1, struct.pack("<H", 1)),  # chunky
        (296, 3, 1, struct.pack("<H", 2)),  # inch
        (317, 3, 1, struct.pack("<H", 2)),  # horizontal predictor
        (339, 3, samples, struct.pack(f"<{samples}H", *[1] * samples)),  # unsigned integers
    ]
    if samples == 4:
        entries.append((338, 3, 1, struct.pack("<H", 2)))  # unassociated alpha
    if description is not None:
        text = description.encode("utf-8") + b"\0"
        entries.append((_IMAGE_DESCRIPTION, 2, len(text), text))
    if icc_profile:
        entries.append((34675, 7, len(icc_profile), icc_profile))
    entries.sort()
    ifd_offset = fh.tell() - start
    extra_offset = ifd_offset + 2 + 12 * len(entries) + 4
    table = bytearray(struct.pack("<H", len(entries)))
    extra = bytearray()
    for tag, kind, count, payload in entries:
        table += struct.pack("<HHI", tag, kind, count)
        if len(payload) <= 4:
            table += payload.ljust(4, b"\0")
        else:
            table += struct.pack("<I", extra_offset + len(extra))
            extra += payload + b"\0" * (len(payload) & 1)
    table += b"\0\0\0\0"  # no next IFD
    if extra_offset + len(extra) >= 1 << 32:
        raise ValueError("the image is too large for a TIFF file (4 GiB); write .png instead")
    fh.write(bytes(table) + bytes(extra))
    end = fh.tell()
    fh.seek(start + 4)
    fh.write(struct.pack("<I", ifd_offset))
    fh.seek(end)


# -- PNG chunks and EXIF ---------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_add_chunks(png: bytes, chunks: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Insert ``(type, data)`` chunks right after IHDR of a PNG file, with lengths and CRC32s."""
    if not png.startswith(_PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("not a PNG file starting with IHDR")
    end = 8 + 12 + struct.unpack(">I", png[8:12])[0]
    return png[:end] + b"".join(_png_chunk(kind, data) for kind, data in chunks) + png[end:]


def _png_text_chunk(key: str, text: str) -> tuple[bytes, bytes]:
    """A tEXt chunk when ``text`` is Latin-1 (as A1111 writes it), else an uncompressed iTXt."""
    keyword = key.encode("latin-1")
    try:
        return b"tEXt", keyword + b"\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        # keyword, NUL, compression flag 0, method 0, empty language tag and translated keyword
        return b"iTXt", keyword + b"\0\0\0\0\0" + text.encode("utf-8")


def _png_metadata(fh: BinaryIO) -> tuple[dict[str, str], bytes | None]:
    """Text chunks (tEXt, zTXt, iTXt; first of each key) and the eXIf payload of a PNG stream
    positioned after its signature. Pixel data is skipped, not read."""
    texts: dict[str, str] = {}
    exif: bytes | None = None
    while True:
        head = fh.read(8)
        if len(head) < 8:
            break
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND":
            break
        if kind not in (b"tEXt", b"zTXt", b"iTXt", b"eXIf") or length > _MAX_TEXT_BYTES:
            fh.seek(length + 4, io.SEEK_CUR)
            continue
        data = fh.read(length)
        fh.seek(4, io.SEEK_CUR)
        if kind == b"eXIf":
            exif = exif if exif is not None else data
            continue
        with contextlib.suppress(ValueError, IndexError, zlib.error):
            key, text = _png_text(kind, data)
            texts.setdefault(key, text)
    return texts, exif


def _png_text(kind: bytes, data: bytes) -> tuple[str, str]:
    keyword, _, rest = data.partition(b"\0")
    key = keyword.decode("latin-1")
    if kind == b"tEXt":
        return key, rest.decode("latin-1")
    if kind == b"zTXt":
        return key, _inflate(rest[1:]).decode("latin-1")
    compressed, rest = rest[0], rest[2:]
    _language, _, rest = rest.partition(b"\0")
    _translated, _, body = rest.partition(b"\0")
    return key, (_inflate(body) if compressed else body).decode("utf-8", errors="replace")


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, _MAX_TEXT_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError("text chunk too large")
    return out


def _exif_with_comment(text: str) -> bytes:
    """EXIF bytes holding ``text`` as UserComment, encoded like A1111 (piexif "unicode")."""
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
    return exif.tobytes()


def _decode_user_comment(raw: object) -> str | None:
    """Decode an EXIF UserComment: UNICODE (UTF-16, either byte order), ASCII, JIS or bare."""
    if isinstance(raw, str):
        return raw.rstrip("\0")
    if not isinstance(raw, bytes):
        return None
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\0":
        text = _decode_utf16(body)
    elif prefix == b"JIS\0\0\0\0\0":
        text = body.decode("shift_jis", errors="replace")
    elif prefix in (b"ASCII\0\0\0", b"\0" * 8):
        text = body.decode("utf-8", errors="replace")
    else:
        text = raw.decode("utf-8", errors="replace")
    return text.rstrip("\0")


def _decode_utf16(body: bytes) -> str:
    """UTF-16 by BOM, else by where the zero bytes of ASCII characters fall (BE: even offsets)."""
    if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
        return body.decode("utf-16", errors="replace")
    body = body[: len(body) & ~1]
    little = body[1::2].count(0) > body[0::2].count(0)
    return body.decode("utf-16-le" if little else "utf-16-be", errors="replace")


def read_parameters(path: str | os.PathLike[str]) -> str | None:
    """The generation parameters stored in an image file, or None.

    Looks at the PNG text chunk "parameters", then the EXIF UserComment (JPEG, WebP, PNG eXIf),
    then a TIFF's ImageDescription. Pixels are not decoded. Raises ImageError naming the file.
    """
    path = Path(path)
    data = _read_file(path)
    exif_payload: bytes | None = None
    if data.startswith(_PNG_SIGNATURE):
        stream = io.BytesIO(data)
        stream.seek(len(_PNG_SIGNATURE))
        texts, exif_payload = _png_metadata(stream)
        if PARAMETERS_KEY in texts:
            return texts[PARAMETERS_KEY]
    with _pillow_limit_lifted(), _open_pil(path, data) as img:
        try:
            if exif_payload is not None:
                exif = Image.Exif()
                exif.load(exif_payload)
            elif img.format == "PNG":
                return None
            else:
                exif = img.getexif()
            comment = _decode_user_comment(exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT))
            if comment is not None:
                return comment
            if img.format == "TIFF":
                return _tiff_text(getattr(img, "tag_v2", {}).get(_IMAGE_DESCRIPTION))
        except Exception as exc:
            raise ImageError(f"{path}: corrupt metadata ({_describe(exc)})") from exc
    return None


def _tiff_text(value: object) -> str | None:
    """A TIFF ASCII tag as text: Pillow decodes it as Latin-1; writers (we too) store UTF-8."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


# -- A1111 infotext --------------------------------------------------------------------------

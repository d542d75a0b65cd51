"""A1111-style ``parameters`` metadata: where each format keeps it, written and read back.

PNG keeps it in a text chunk named ``parameters``, JPEG and WebP in the EXIF UserComment (as
A1111 writes it with piexif), TIFF in ImageDescription (UTF-8). BMP has no metadata.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from tileup.imageio.errors import ImageError, describe
from tileup.imageio.png import PNG_SIGNATURE, png_metadata
from tileup.imageio.read import open_pil, pillow_limit_lifted, read_file

PARAMETERS_KEY = "parameters"
"""The PNG text chunk key A1111 writes its settings under."""
EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
IMAGE_DESCRIPTION = 270


def read_parameters(path: str | os.PathLike[str]) -> str | None:
    """The generation parameters stored in an image file, or None.

    Looks at the PNG text chunk "parameters", then the EXIF UserComment (JPEG, WebP, PNG eXIf),
    then a TIFF's ImageDescription. Pixels are not decoded. Raises ImageError naming the file.
    """
    path = Path(path)
    return parameters_in(path, read_file(path))


def parameters_in(path: Path, data: bytes) -> str | None:
    """:func:`read_parameters` of a file already read into ``data``."""
    exif_payload: bytes | None = None
    if data.startswith(PNG_SIGNATURE):
        stream = io.BytesIO(data)
        stream.seek(len(PNG_SIGNATURE))
        texts, exif_payload = png_metadata(stream)
        if PARAMETERS_KEY in texts:
            return texts[PARAMETERS_KEY]
    with pillow_limit_lifted(), open_pil(path, io.BytesIO(data)) as img:
        try:
            if exif_payload is not None:
                exif = Image.Exif()
                exif.load(exif_payload)
            elif img.format == "PNG":
                return None
            else:
                exif = img.getexif()
            comment = decode_user_comment(exif.get_ifd(EXIF_IFD).get(USER_COMMENT))
            if comment is not None:
                return comment
            if img.format == "TIFF":
                return _tiff_text(getattr(img, "tag_v2", {}).get(IMAGE_DESCRIPTION))
        except Exception as exc:
            raise ImageError(f"{path}: corrupt metadata ({describe(exc)})") from exc
    return None


def exif_with_comment(text: str) -> bytes:
    """EXIF bytes holding ``text`` as UserComment, encoded like A1111 (piexif "unicode")."""
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
    return exif.tobytes()


def decode_user_comment(raw: object) -> str | None:
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

"""PNG chunks: insert them into an encoded file, read text and EXIF chunks without the pixels."""

from __future__ import annotations

import contextlib
import io
import struct
import zlib
from collections.abc import Iterable
from typing import BinaryIO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_TEXT_BYTES = 1 << 24
"""Text and EXIF chunks larger than this (inflated or not) are skipped."""


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One chunk: length, type, data and the CRC32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_add_chunks(png: bytes, chunks: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Insert ``(type, data)`` chunks right after IHDR of a PNG file, with lengths and CRC32s.

    Raises ValueError when ``png`` does not start with a signature and IHDR.
    """
    if not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("not a PNG file starting with IHDR")
    end = 8 + 12 + struct.unpack(">I", png[8:12])[0]
    return png[:end] + b"".join(png_chunk(kind, data) for kind, data in chunks) + png[end:]


def png_text_chunk(key: str, text: str) -> tuple[bytes, bytes]:
    """A tEXt chunk when ``text`` is Latin-1 (as A1111 writes it), else an uncompressed iTXt."""
    keyword = key.encode("latin-1")
    try:
        return b"tEXt", keyword + b"\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        # keyword, NUL, compression flag 0, method 0, empty language tag and translated keyword
        return b"iTXt", keyword + b"\0\0\0\0\0" + text.encode("utf-8")


def png_metadata(fh: BinaryIO) -> tuple[dict[str, str], bytes | None]:
    """Text chunks (tEXt, zTXt, iTXt; first of each key) and the eXIf payload of a PNG stream
    positioned after its signature. Pixel data is skipped, not read; damaged text is ignored."""
    texts: dict[str, str] = {}
    exif: bytes | None = None
    while True:
        head = fh.read(8)
        if len(head) < 8:
            break
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND":
            break
        if kind not in (b"tEXt", b"zTXt", b"iTXt", b"eXIf") or length > MAX_TEXT_BYTES:
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
    out = inflater.decompress(data, MAX_TEXT_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError("text chunk too large")
    return out

"""``multipart/form-data`` bodies parsed with the standard library's ``email`` package.

(``cgi`` is gone in Python 3.13.) The body is already read and bounded by the server.
"""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass

from tileup.errors import TileupError


class MultipartError(TileupError):
    """A body that is not the multipart form expected (one line)."""


@dataclass(frozen=True)
class Part:
    """One form field: its name, the client's file name (None for plain fields), its bytes."""

    name: str
    filename: str | None
    data: bytes


def parse_multipart(content_type: str, body: bytes) -> list[Part]:
    """The fields of a ``multipart/form-data`` body, in order; MultipartError otherwise."""
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in (
        content_type.lower()
    ):
        raise MultipartError("expected a multipart/form-data body with a boundary")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise MultipartError("the multipart body could not be parsed")
    parts: list[Part] = []
    for item in message.iter_parts():
        name = item.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = item.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        parts.append(Part(name, item.get_filename(), data))
    return parts

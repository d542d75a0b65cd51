"""The one error of image reading and writing."""

from __future__ import annotations

import re

from tileup.errors import TileupError


class ImageError(TileupError):
    """An image cannot be read or written; ``str(error)`` is one line naming the file."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", message).strip())


def describe(exc: BaseException) -> str:
    """A short reason for ``exc``: an OSError's strerror, else its message or its type name."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return text or type(exc).__name__

"""The one exception family tileup raises for problems a user can fix."""

from __future__ import annotations


class TileupError(Exception):
    """A problem with the user's input, files or settings; ``str()`` is one line for the user."""


class Cancelled(TileupError):
    """A job was stopped on request (an observer raised it): nothing was written."""

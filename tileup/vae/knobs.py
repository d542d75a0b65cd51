"""The tiled VAE's benchmark knobs, read from the environment: sizes a benchmark sweeps
without a code change (``TILEUP_VAE_KEY_BLOCK``, ``TILEUP_VAE_MAX_CHAIN``)."""

from __future__ import annotations

import os


def positive_int(name: str, default: int) -> int:
    """Environment variable ``name`` as a positive integer, ``default`` when unset or empty;
    ValueError for anything else."""
    text = os.environ.get(name, "")
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name} must be a positive integer, got {text!r}")
    return int(text)

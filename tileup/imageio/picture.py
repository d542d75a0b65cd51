"""The decoded image that flows through tileup: float32 RGB in [0, 1], optional alpha."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
"""Pillow modes of grey sources: their results are written grey again."""


@dataclass(frozen=True, eq=False)
class Picture:
    """A decoded image.

    ``rgb`` is float32 HxWx3 in [0, 1], C-contiguous; ``alpha`` float32 HxW in [0, 1] or None
    (other float arrays are converted on construction; wrong shapes raise ValueError).
    ``bit_depth`` (8 or 16) is the precision of the source; ``icc_profile`` is an RGB ICC profile
    or None (profiles of other colour spaces are dropped, as the pixels are RGB); ``source`` the
    file read (None for arrays and PIL images); ``source_format`` Pillow's format name;
    ``mode`` the source's Pillow mode (for arrays: L, LA, RGB or RGBA); ``parameters`` the
    source file's A1111 metadata text.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int
    icc_profile: bytes | None = None
    source: Path | None = None
    source_format: str | None = None
    mode: str = "RGB"
    parameters: str | None = None
    """The source file's A1111 ``parameters`` text (None: none, or not from a file)."""

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
    def is_grey(self) -> bool:
        """Whether the source was grey (its result is written as grey, not RGB)."""
        return self.mode in GREY_MODES

    @property
    def height(self) -> int:
        """Rows of pixels."""
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        """Columns of pixels."""
        return int(self.rgb.shape[1])


def make_picture(
    pixels: np.ndarray,
    bit_depth: int,
    icc_profile: bytes | None,
    source: Path | None,
    source_format: str | None,
    mode: str,
) -> Picture:
    """A Picture from HxW or HxWxC ``pixels`` (C: grey, grey+alpha, RGB, RGBA) of uint8, uint16
    or float; grey is repeated into three channels and an ICC profile that is not RGB dropped."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    channels = pixels.shape[2]
    colour = pixels[..., :3] if channels >= 3 else pixels[..., :1]
    rgb = unit_float(colour)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    alpha = unit_float(pixels[..., channels - 1]) if channels in (2, 4) else None
    if icc_profile is not None and icc_colour_space(icc_profile) != b"RGB ":
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


def unit_float(values: np.ndarray) -> np.ndarray:
    """uint8/uint16 scaled to [0, 1], floats clipped to [0, 1]; always a new float32 array."""
    out = values.astype(np.float32)
    if values.dtype == np.uint8:
        out /= 255
    elif values.dtype == np.uint16:
        out /= 65535
    else:
        np.clip(out, 0.0, 1.0, out=out)
    return out


def icc_colour_space(profile: bytes) -> bytes:
    """The data colour space signature of an ICC profile (b'RGB ', b'GRAY', b'CMYK', ...)."""
    return bytes(profile[16:20])

"""Classic resamplers on float images (OpenCV), and the final exact resize to a target size."""

from __future__ import annotations

import cv2
import numpy as np

from tileup.choices import RESAMPLERS

_INTERPOLATION = {  # one OpenCV mode per name in RESAMPLERS
    "lanczos": cv2.INTER_LANCZOS4,
    "bicubic": cv2.INTER_CUBIC,
    "bilinear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST_EXACT,
    "area": cv2.INTER_AREA,
}


def resample(image: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """Resize an HxW or HxWxC float32 image in [0, 1] to height×width; result clipped to [0, 1].

    ``method`` is one of ``tileup.choices.RESAMPLERS``. Returns the input unchanged (not a copy)
    when the size already matches.
    """
    if method not in RESAMPLERS:
        raise ValueError(f"unknown resampler {method!r}; known: {', '.join(RESAMPLERS)}")
    if image.shape[:2] == (height, width):
        return image
    out = cv2.resize(image, (width, height), interpolation=_INTERPOLATION[method])
    if out.ndim == 2 and image.ndim == 3:
        out = out[..., None]
    return np.clip(out, 0.0, 1.0, out=out)


def resize_exact(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """High-quality resize to exactly height×width: area when shrinking, lanczos when growing."""
    shrinking = height <= image.shape[0] and width <= image.shape[1]
    return resample(image, height, width, "area" if shrinking else "lanczos")

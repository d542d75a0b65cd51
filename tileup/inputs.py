"""What the engine takes as one image, decoded into a :class:`~tileup.imageio.Picture`."""

from __future__ import annotations

import os

import numpy as np
import PIL.Image
import torch

from tileup.imageio import Picture, read_image

ImageInput = str | os.PathLike[str] | PIL.Image.Image | np.ndarray | torch.Tensor | Picture
"""What the engine takes as one image."""


def as_picture(image: ImageInput, max_pixels: int) -> Picture:
    """``image`` decoded (see :meth:`Upscaler.__call__`); a tensor must be CxHxW or 1xCxHxW
    (C 1-4) and float in [0, 1]; anything else is an ImageError with one line."""
    from tileup.imageio import ImageError

    if isinstance(image, Picture):
        return image
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or not 1 <= t.shape[0] <= 4 or not t.is_floating_point():
            raise ImageError(
                f"input tensor: expected float CxHxW or 1xCxHxW with C in 1..4, got "
                f"{t.dtype} {tuple(image.shape)}"
            )
        return read_image(t.float().cpu().permute(1, 2, 0).numpy(), max_pixels=max_pixels)
    if not isinstance(image, (str, os.PathLike, PIL.Image.Image, np.ndarray)):
        raise ImageError(
            f"cannot read a {type(image).__name__} object as an image: give a path, a PIL image, a "
            "numpy array or a torch tensor"
        )
    return read_image(image, max_pixels=max_pixels)

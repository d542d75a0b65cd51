"""Read and write images: colour modes, 16 bits, alpha, EXIF orientation, pixel limits, atomic
writes and A1111-style ``parameters`` metadata.

Contracts:

- Pixels travel as float32 in [0, 1]: colour as a C-contiguous HxWx3 array, alpha as HxW.
- Every failure a user can cause (a bad path, a broken file, a limit) raises :class:`ImageError`
  whose message is one line naming the file; library exceptions are chained, never leaked.
- Written files appear complete or not at all (see :mod:`tileup.imageio.write`).

Modules: ``picture`` (the decoded image), ``read`` (files, headers, arrays → Picture), ``decode``
(decoder output → arrays), ``write`` (atomic writes, output checks), ``encode`` (one format),
``metadata`` (``parameters`` text), ``png`` (PNG chunks), ``errors``.
"""

from __future__ import annotations

from tileup.imageio.errors import ImageError
from tileup.imageio.metadata import PARAMETERS_KEY, read_parameters
from tileup.imageio.picture import Picture
from tileup.imageio.read import ImageHeader, read_header, read_image
from tileup.imageio.write import WRITE_FORMATS, check_output, write_image

__all__ = [
    "PARAMETERS_KEY",
    "WRITE_FORMATS",
    "ImageError",
    "ImageHeader",
    "Picture",
    "check_output",
    "read_header",
    "read_image",
    "read_parameters",
    "write_image",
]

"""Grey in, grey out: grey sources are written as one luma channel (L, LA, I;16), not RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tileup
from tileup.imageio import read_image, write_image
from tileup.imageio.write import LUMA_WEIGHTS

RNG = np.random.default_rng(3)
RGB = RNG.random((12, 10, 3), dtype=np.float32)
ALPHA = RNG.random((12, 10), dtype=np.float32)
LUMA = RGB @ LUMA_WEIGHTS


@pytest.mark.parametrize(
    ("suffix", "bits", "alpha", "mode"),
    [
        (".png", 8, False, "L"),
        (".png", 8, True, "LA"),
        (".png", 16, False, "I;16"),
        (".tif", 16, False, "I;16"),
        (".tif", 8, True, "LA"),
        (".jpg", 8, False, "L"),
        (".bmp", 8, False, "L"),
    ],
)
def test_grey_is_written_as_one_luma_channel(tmp_path: Path, suffix, bits, alpha, mode) -> None:
    path = write_image(
        tmp_path / f"g{suffix}", RGB, alpha=ALPHA if alpha else None, bit_depth=bits, grey=True
    )
    with Image.open(path) as img:
        assert img.mode == mode
        grey = np.asarray(img.getchannel(0) if alpha else img, dtype=np.float64)
    scale = 65535 if bits == 16 else 255
    tolerance = 0.06 * scale if suffix == ".jpg" else 0.5  # JPEG is lossy; the rest exact
    np.testing.assert_allclose(grey, np.rint(LUMA * scale), atol=tolerance)


@pytest.mark.parametrize(("suffix", "bits"), [(".webp", 8), (".png", 16)])
def test_formats_without_that_grey_mode_get_equal_channels(tmp_path: Path, suffix, bits) -> None:
    """WebP has no grey, 16-bit grey + alpha PNG has no writer: RGB(A) with R = G = B (lossless
    WebP: lossy WebP's chroma subsampling would blur that)."""
    path = write_image(
        tmp_path / f"g{suffix}", RGB, alpha=ALPHA, bit_depth=bits, grey=True, quality=100
    )
    picture = read_image(path)
    assert picture.alpha is not None
    np.testing.assert_array_equal(picture.rgb[..., 0], picture.rgb[..., 1])
    np.testing.assert_array_equal(picture.rgb[..., 0], picture.rgb[..., 2])
    np.testing.assert_allclose(picture.rgb[..., 0], LUMA, atol=1 / 255 if bits == 8 else 1e-4)


@pytest.mark.parametrize(
    ("array", "mode"),
    [
        ((RNG.random((16, 16)) * 255).astype(np.uint8), "L"),
        ((RNG.random((16, 16)) * 65535).astype(np.uint16), "I;16"),
        ((RNG.random((16, 16, 2)) * 255).astype(np.uint8), "LA"),
    ],
)
def test_grey_file_upscaled_stays_grey(tmp_path: Path, array: np.ndarray, mode: str) -> None:
    source = tmp_path / "in.png"
    Image.fromarray(array).save(source)
    outcome = tileup.upscale_files([str(source)], tileup.UpscaleSettings(upscaler="lanczos"))
    written = outcome.raise_for_errors().written[0]
    with Image.open(written) as img:
        assert (img.mode, img.size) == (mode, (32, 32))
        assert "Upscaler: lanczos" in img.info["parameters"]
    result = tileup.upscale(str(source), upscaler="lanczos")
    assert result.image.mode == ("LA" if mode == "LA" else "L")
    colour = tileup.upscale(RGB, upscaler="lanczos", scale=1)
    assert colour.image.mode == "RGB"

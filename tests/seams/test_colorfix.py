"""Colour fix: a re-diffusion colour shift is undone, new detail is kept."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from tileup.seams.colorfix import COLOR_FIXES, color_fix, wavelet_low

TOLERANCE = 1 / 255


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    """The astronaut photo at 256×256, HxWx3 float32 in [0, 1]: the pixel-upscaled reference."""
    rgb = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    return rgb.astype(np.float32) / 255


@pytest.fixture(scope="module")
def detail(source: np.ndarray) -> np.ndarray:
    """High-frequency detail that re-diffusion adds: fine noise, zero mean."""
    rng = np.random.default_rng(0)
    return rng.normal(0.0, 0.03, source.shape).astype(np.float32)


@pytest.fixture(scope="module")
def shifted(source: np.ndarray, detail: np.ndarray) -> np.ndarray:
    """The re-diffused output: source with a colour shift (+0.08 R, ×0.9 G, −0.05 B) + detail."""
    out = source * np.float32([1.0, 0.9, 1.0]) + np.float32([0.08, 0.0, -0.05]) + detail
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def high_pass(image: np.ndarray) -> np.ndarray:
    return image - cv2.GaussianBlur(image, (0, 0), 2.0)


def low_pass(image: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), 8.0)


def channel_means(image: np.ndarray) -> np.ndarray:
    return image.mean(axis=(0, 1), dtype=np.float64)


def test_methods() -> None:
    assert COLOR_FIXES == ("none", "wavelet", "adain")


def test_shift_is_visible(source: np.ndarray, shifted: np.ndarray) -> None:
    """Guard for the tests below: without a fix the means are off by far more than 1/255."""
    assert np.abs(channel_means(shifted) - channel_means(source)).max() > 10 * TOLERANCE


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_restores_mean_colour(method: str, source: np.ndarray, shifted: np.ndarray) -> None:
    fixed = color_fix(shifted, source, method)
    assert fixed.shape == source.shape and fixed.dtype == np.float32
    assert fixed.min() >= 0.0 and fixed.max() <= 1.0
    np.testing.assert_allclose(channel_means(fixed), channel_means(source), atol=TOLERANCE)


def test_wavelet_keeps_detail_and_removes_low_frequency_shift(
    source: np.ndarray, shifted: np.ndarray
) -> None:
    fixed = color_fix(shifted, source, "wavelet")
    corr = np.corrcoef(high_pass(fixed).ravel(), high_pass(shifted).ravel())[0, 1]
    assert corr > 0.9
    error_before = np.abs(low_pass(shifted) - low_pass(source)).mean()
    error_after = np.abs(low_pass(fixed) - low_pass(source)).mean()
    assert error_before > 0.04
    assert error_after < 0.1 * error_before


def test_adain_matches_std(source: np.ndarray, shifted: np.ndarray) -> None:
    fixed = color_fix(shifted, source, "adain")
    np.testing.assert_allclose(
        fixed.std(axis=(0, 1), dtype=np.float64),
        source.std(axis=(0, 1), dtype=np.float64),
        atol=2 * TOLERANCE,
    )


def test_none_is_identity(source: np.ndarray, shifted: np.ndarray) -> None:
    assert color_fix(shifted, source, "none") is shifted


@pytest.mark.parametrize("method", COLOR_FIXES)
def test_identity_when_result_equals_reference(method: str, source: np.ndarray) -> None:
    fixed = color_fix(source, source.copy(), method)
    assert np.abs(fixed - source).max() < 1e-5


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_inputs_untouched(method: str, source: np.ndarray, shifted: np.ndarray) -> None:
    before = shifted.copy(), source.copy()
    color_fix(shifted, source, method)
    np.testing.assert_array_equal(shifted, before[0])
    np.testing.assert_array_equal(source, before[1])


def test_wavelet_low_is_mean_preserving_blur(source: np.ndarray) -> None:
    low = wavelet_low(source)
    assert low.shape == source.shape and low.dtype == np.float32
    constant = np.full((40, 30, 3), 0.3, dtype=np.float32)
    np.testing.assert_allclose(wavelet_low(constant), constant, atol=1e-6)
    assert high_pass(low).std() < 0.1 * high_pass(source).std()


@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 5, 3), (7, 40, 1), (9, 9, 4)])
@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_small_and_odd_shapes(method: str, shape: tuple[int, int, int]) -> None:
    """Images smaller than the widest dilated kernel (33 px) and other channel counts."""
    rng = np.random.default_rng(1)
    result, reference = rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32)
    fixed = color_fix(result, reference, method)
    assert fixed.shape == shape and fixed.dtype == np.float32
    assert np.isfinite(fixed).all() and fixed.min() >= 0.0 and fixed.max() <= 1.0


def test_float64_and_non_contiguous_inputs(source: np.ndarray, shifted: np.ndarray) -> None:
    view = shifted[::-1, ::2]
    expected = color_fix(np.ascontiguousarray(view), source[::-1, ::2].copy(), "wavelet")
    fixed = color_fix(view.astype(np.float64), source[::-1, ::2], "wavelet")
    assert fixed.dtype == np.float32
    np.testing.assert_allclose(fixed, expected, atol=1e-6)


def test_unknown_method(source: np.ndarray) -> None:
    with pytest.raises(ValueError, match="none, wavelet, adain"):
        color_fix(source, source, "histogram")


@pytest.mark.parametrize("method", COLOR_FIXES)
def test_shape_mismatch(method: str, source: np.ndarray) -> None:
    with pytest.raises(ValueError, match="same shape"):
        color_fix(source, source[:-1], method)
    with pytest.raises(ValueError, match="same shape"):
        color_fix(source[..., 0], source[..., 0], method)

"""tileup.imageio: every mode round-trips, metadata survives, bad input gives one-line errors."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms, ImageOps
from skimage import data

from tileup.errors import TileupError
from tileup.imageio import (
    ImageError,
    Picture,
    read_header,
    read_image,
    read_parameters,
    write_image,
)
from tileup.imageio import png as imageio_png
from tileup.imageio import write as imageio_write
from tileup.imageio.picture import unit_float
from tileup.imageio.png import png_add_chunks
from tileup.infotext import format_parameters, parse_parameters

LIMIT = 1 << 24


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real 48x64 RGB photo (uint8)."""
    return np.ascontiguousarray(data.astronaut()[40:88, 200:264])


@pytest.fixture(scope="module")
def alpha8() -> np.ndarray:
    """48x64 alpha holding every 8-bit value."""
    return (np.arange(48 * 64) % 256).astype(np.uint8).reshape(48, 64)


@pytest.fixture(scope="module")
def photo16() -> np.ndarray:
    """A real 48x64 RGB photo with full 16-bit precision (low bytes are not zero)."""
    rng = np.random.default_rng(0)
    base = data.astronaut()[40:88, 200:264].astype(np.uint16) * 257
    return base ^ rng.integers(0, 256, base.shape, dtype=np.uint16)


@pytest.fixture(scope="module")
def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def to8(x: np.ndarray) -> np.ndarray:
    return np.round(x * 255).astype(np.uint8)


def to16(x: np.ndarray) -> np.ndarray:
    return np.round(x * 65535).astype(np.uint16)


def reread(pic: Picture, path: Path, **kwargs: object) -> Picture:
    write_image(path, pic.rgb, alpha=pic.alpha, bit_depth=pic.bit_depth, **kwargs)
    return read_image(path, max_pixels=LIMIT)


def encode16(path: Path, rgb16: np.ndarray) -> None:
    """Write a 16-bit RGB(A) PNG/TIFF with OpenCV (an independent writer)."""
    order = [2, 1, 0, 3][: rgb16.shape[2]]
    ok, encoded = cv2.imencode(path.suffix, rgb16[..., order])
    assert ok
    path.write_bytes(encoded.tobytes())


# -- modes -----------------------------------------------------------------------------------


def test_rgb_png(tmp_path: Path, photo: np.ndarray) -> None:
    Image.fromarray(photo).save(tmp_path / "a.png")
    pic = read_image(tmp_path / "a.png", max_pixels=LIMIT)
    assert (pic.height, pic.width, pic.bit_depth, pic.mode) == (48, 64, 8, "RGB")
    assert pic.rgb.dtype == np.float32 and pic.rgb.flags.c_contiguous
    assert pic.alpha is None and pic.source == tmp_path / "a.png" and pic.source_format == "PNG"
    np.testing.assert_array_equal(to8(pic.rgb), photo)
    np.testing.assert_array_equal(to8(reread(pic, tmp_path / "b.png").rgb), photo)


def test_rgba_png_keeps_alpha_exactly(
    tmp_path: Path, photo: np.ndarray, alpha8: np.ndarray
) -> None:
    Image.fromarray(np.dstack([photo, alpha8])).save(tmp_path / "a.png")
    pic = read_image(tmp_path / "a.png", max_pixels=LIMIT)
    assert pic.mode == "RGBA" and pic.alpha is not None
    np.testing.assert_array_equal(to8(pic.alpha), alpha8)
    np.testing.assert_array_equal(to8(pic.rgb), photo)
    again = reread(pic, tmp_path / "b.png")
    assert again.alpha is not None
    np.testing.assert_array_equal(to8(again.alpha), alpha8)
    np.testing.assert_array_equal(to8(again.rgb), photo)


def test_grey_and_grey_alpha(tmp_path: Path, photo: np.ndarray, alpha8: np.ndarray) -> None:
    grey = photo[..., 1]
    Image.fromarray(grey).save(tmp_path / "l.png")
    Image.fromarray(np.dstack([grey, alpha8])).save(tmp_path / "la.png")
    pic = read_image(tmp_path / "l.png", max_pixels=LIMIT)
    assert pic.mode == "L" and pic.alpha is None
    np.testing.assert_array_equal(to8(pic.rgb), np.dstack([grey] * 3))
    pic = read_image(tmp_path / "la.png", max_pixels=LIMIT)
    assert pic.mode == "LA" and pic.alpha is not None
    np.testing.assert_array_equal(to8(pic.rgb), np.dstack([grey] * 3))
    np.testing.assert_array_equal(to8(pic.alpha), alpha8)
    again = reread(pic, tmp_path / "b.png")
    np.testing.assert_array_equal(to8(again.alpha), alpha8)  # type: ignore[arg-type]


def test_palette_with_and_without_transparency(tmp_path: Path, photo: np.ndarray) -> None:
    palette = Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(tmp_path / "p.png")
    pic = read_image(tmp_path / "p.png", max_pixels=LIMIT)
    assert pic.mode == "P" and pic.alpha is None
    np.testing.assert_array_equal(to8(pic.rgb), np.asarray(palette.convert("RGB")))

    index = int(np.asarray(palette)[0, 0])
    palette.save(tmp_path / "pt.png", transparency=index)
    pic = read_image(tmp_path / "pt.png", max_pixels=LIMIT)
    assert pic.mode == "P" and pic.alpha is not None
    np.testing.assert_array_equal(pic.alpha == 0, np.asarray(palette) == index)
    assert set(np.unique(pic.alpha)) == {0.0, 1.0}


def test_cmyk_jpeg_drops_cmyk_profile(tmp_path: Path, photo: np.ndarray) -> None:
    cmyk_profile = bytes(16) + b"CMYKLab " + bytes(104)  # header says: a CMYK profile
    Image.fromarray(photo).convert("CMYK").save(tmp_path / "c.jpg", icc_profile=cmyk_profile)
    assert Image.open(tmp_path / "c.jpg").info["icc_profile"] == cmyk_profile
    pic = read_image(tmp_path / "c.jpg", max_pixels=LIMIT)
    assert pic.mode == "CMYK" and pic.icc_profile is None and pic.alpha is None
    expected = np.asarray(Image.open(tmp_path / "c.jpg").convert("RGB")).astype(float)
    np.testing.assert_array_equal(to8(pic.rgb), expected)
    assert np.abs(expected - photo).mean() < 8


def test_16bit_grey_png(tmp_path: Path, photo16: np.ndarray) -> None:
    grey = photo16[..., 0]
    Image.fromarray(grey).save(tmp_path / "g.png")
    pic = read_image(tmp_path / "g.png", max_pixels=LIMIT)
    assert pic.mode == "I;16" and pic.bit_depth == 16
    np.testing.assert_array_equal(to16(pic.rgb), np.dstack([grey] * 3))
    again = reread(pic, tmp_path / "b.png")
    assert again.bit_depth == 16
    np.testing.assert_array_equal(to16(again.rgb), np.dstack([grey] * 3))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_16bit_colour_exact(
    tmp_path: Path, photo16: np.ndarray, suffix: str, with_alpha: bool
) -> None:
    pixels = np.dstack([photo16, photo16[..., 1][::-1]]) if with_alpha else photo16
    encode16(tmp_path / f"a{suffix}", pixels)
    pic = read_image(tmp_path / f"a{suffix}", max_pixels=LIMIT)
    assert pic.bit_depth == 16 and (pic.alpha is not None) == with_alpha
    np.testing.assert_array_equal(to16(pic.rgb), photo16)
    again = reread(pic, tmp_path / f"b{suffix}")
    assert again.bit_depth == 16
    np.testing.assert_array_equal(to16(again.rgb), photo16)
    if with_alpha:
        assert again.alpha is not None
        np.testing.assert_array_equal(to16(again.alpha), pixels[..., 3])
    if suffix == ".png":
        header = (tmp_path / "b.png").read_bytes()[:26]
        assert header[24] == 16 and header[25] == (6 if with_alpha else 2)
    # OpenCV (libtiff/libpng) reads our file back bit-exactly too.
    decoded = cv2.imread(str(tmp_path / f"b{suffix}"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(decoded[..., 2::-1], photo16)


def test_our_tiff_is_standard(tmp_path: Path, photo16: np.ndarray, srgb_icc: bytes) -> None:
    write_image(
        tmp_path / "a.tiff",
        photo16 / 65535,
        bit_depth=16,
        icc_profile=srgb_icc,
        parameters="Steps: 20, café ☕",
    )
    with tifffile.TiffFile(tmp_path / "a.tiff") as tif:
        page = tif.pages[0]
        np.testing.assert_array_equal(page.asarray(), photo16)
        assert page.description == "Steps: 20, café ☕"
        assert page.tags["InterColorProfile"].value == srgb_icc


def test_tiff_alpha_is_unassociated_and_libtiff_reads_it(
    tmp_path: Path, photo: np.ndarray, alpha8: np.ndarray
) -> None:
    write_image(tmp_path / "a.tif", photo / 255, alpha=alpha8 / 255, parameters="Steps: 20")
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        page = tif.pages[0]
        assert page.extrasamples == (tifffile.EXTRASAMPLE.UNASSALPHA,)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    with Image.open(tmp_path / "a.tif") as img:  # Pillow decodes through libtiff
        assert img.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(img), np.dstack([photo, alpha8]))
    assert read_parameters(tmp_path / "a.tif") == "Steps: 20"


def test_float_tiff_is_clipped(tmp_path: Path) -> None:
    values = np.linspace(-0.5, 1.5, 48 * 64, dtype=np.float32).reshape(48, 64)
    Image.fromarray(values).save(tmp_path / "f.tif")
    pic = read_image(tmp_path / "f.tif", max_pixels=LIMIT)
    assert pic.mode == "F" and pic.bit_depth == 16
    np.testing.assert_allclose(pic.rgb[..., 0], np.clip(values, 0, 1))


def test_webp_lossless_bmp_jpeg(tmp_path: Path, photo: np.ndarray, alpha8: np.ndarray) -> None:
    rgba = np.dstack([photo, alpha8])
    Image.fromarray(rgba).save(tmp_path / "a.webp", lossless=True, exact=True)
    pic = read_image(tmp_path / "a.webp", max_pixels=LIMIT)
    assert pic.source_format == "WEBP" and pic.alpha is not None
    np.testing.assert_array_equal(to8(pic.rgb), photo)
    again = reread(pic, tmp_path / "b.webp", quality=100)  # quality 100: lossless
    np.testing.assert_array_equal(to8(again.rgb), photo)
    np.testing.assert_array_equal(to8(again.alpha), alpha8)  # type: ignore[arg-type]

    bmp = reread(pic, tmp_path / "c.bmp")  # BMP drops alpha
    assert bmp.alpha is None and bmp.source_format == "BMP"
    np.testing.assert_array_equal(to8(bmp.rgb), photo)

    jpeg = reread(pic, tmp_path / "d.jpg")  # JPEG drops alpha, is lossy
    assert jpeg.alpha is None and jpeg.source_format == "JPEG"
    assert np.abs(to8(jpeg.rgb).astype(int) - photo).mean() < 4


def test_arrays_and_pil_images(photo: np.ndarray, photo16: np.ndarray) -> None:
    pic = read_image(photo[..., 0], max_pixels=LIMIT)
    assert (pic.mode, pic.bit_depth, pic.source) == ("L", 8, None)
    np.testing.assert_array_equal(to8(pic.rgb), np.dstack([photo[..., 0]] * 3))
    pic = read_image(photo16, max_pixels=LIMIT)
    assert (pic.mode, pic.bit_depth) == ("RGB", 16)
    np.testing.assert_array_equal(to16(pic.rgb), photo16)
    rgba = np.dstack([photo, photo[..., :1]]).astype(np.float64) / 255
    slack = rgba.copy()
    slack[0, 0, :2] = (-2e-4, 1 + 2e-4)  # rounding slack of a computation: clipped
    pic = read_image(slack, max_pixels=LIMIT)
    assert pic.mode == "RGBA" and pic.alpha is not None
    assert (pic.rgb[0, 0, 0], pic.rgb[0, 0, 1]) == (0, 1)
    with pytest.raises(
        ImageError, match=r"float values must lie in \[0, 1\], got -0.48\d* to 1.45\d*"
    ):
        read_image(rgba * 2 - 0.5, max_pixels=LIMIT)  # not clipped to black and white
    pic = read_image(Image.fromarray(photo), max_pixels=LIMIT)
    assert pic.source is None and pic.mode == "RGB"
    np.testing.assert_array_equal(to8(pic.rgb), photo)
    with pytest.raises(ImageError, match="input array: dtype int32"):
        read_image(photo.astype(np.int32), max_pixels=LIMIT)
    with pytest.raises(ImageError, match="NaN"):
        read_image(np.full((4, 4, 3), np.nan), max_pixels=LIMIT)
    with pytest.raises(ImageError, match="input array: 64x48 = 3072 pixels exceeds"):
        read_image(photo, max_pixels=1000)


def test_picture_contract(photo: np.ndarray) -> None:
    view = (photo / 255)[:, ::-1]  # float64, not contiguous
    pic = Picture(rgb=view, alpha=None, bit_depth=8)
    assert pic.rgb.dtype == np.float32 and pic.rgb.flags.c_contiguous
    np.testing.assert_array_equal(to8(pic.rgb), photo[:, ::-1])
    with pytest.raises(ValueError, match="HxWx3"):
        Picture(rgb=view[..., 0], alpha=None, bit_depth=8)
    with pytest.raises(ValueError, match="alpha"):
        Picture(rgb=view, alpha=view[1:, :, 0], bit_depth=8)
    with pytest.raises(ValueError, match="bit_depth"):
        Picture(rgb=view, alpha=None, bit_depth=12)
    assert issubclass(ImageError, TileupError)


def test_quantisation_is_exact_for_every_value() -> None:
    for dtype in (np.uint8, np.uint16):
        values = np.arange(np.iinfo(dtype).max + 1, dtype=dtype)
        out = np.empty_like(values)
        imageio_write.quantise(unit_float(values), out)
        np.testing.assert_array_equal(out, values)


# -- orientation and ICC ---------------------------------------------------------------------


def exif_with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_jpeg_exif_orientation_6(tmp_path: Path, photo: np.ndarray) -> None:
    Image.fromarray(photo).save(tmp_path / "o.jpg", exif=exif_with_orientation(6), quality=95)
    pic = read_image(tmp_path / "o.jpg", max_pixels=LIMIT)
    assert (pic.height, pic.width) == (64, 48)
    stored = np.asarray(Image.open(tmp_path / "o.jpg"))  # as decoded, not yet rotated
    np.testing.assert_array_equal(to8(pic.rgb), np.rot90(stored, -1))  # 6: rotate 90° clockwise


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_same_on_8bit_and_16bit_paths(
    tmp_path: Path, photo16: np.ndarray, orientation: int
) -> None:
    exif = exif_with_orientation(orientation)
    photo8 = (photo16 >> 8).astype(np.uint8)
    Image.fromarray(photo8).save(tmp_path / "a.png", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "a.png")))
    _, encoded = cv2.imencode(".png", photo16[..., ::-1])
    payload = exif.tobytes()[6:]  # the eXIf chunk holds the TIFF structure without "Exif\0\0"
    png16 = png_add_chunks(encoded.tobytes(), [(b"eXIf", payload)])
    (tmp_path / "b.png").write_bytes(png16)
    pic8 = read_image(tmp_path / "a.png", max_pixels=LIMIT)
    pic16 = read_image(tmp_path / "b.png", max_pixels=LIMIT)
    assert pic16.bit_depth == 16
    np.testing.assert_array_equal(to8(pic8.rgb), expected)
    np.testing.assert_array_equal((to16(pic16.rgb) >> 8).astype(np.uint8), expected)


@pytest.mark.parametrize(
    ("name", "bit_depth"),
    [("a.png", 8), ("b.png", 16), ("c.jpg", 8), ("d.webp", 8), ("e.tif", 8), ("f.tif", 16)],
)
def test_icc_profile_kept(
    tmp_path: Path, photo: np.ndarray, srgb_icc: bytes, name: str, bit_depth: int
) -> None:
    pic = read_image(photo, max_pixels=LIMIT)
    again = reread(pic, tmp_path / name, icc_profile=srgb_icc) if bit_depth == 8 else None
    if again is None:
        write_image(tmp_path / name, pic.rgb, bit_depth=16, icc_profile=srgb_icc)
        again = read_image(tmp_path / name, max_pixels=LIMIT)
    assert again.icc_profile == srgb_icc
    assert Image.open(tmp_path / name).info["icc_profile"] == srgb_icc  # Pillow agrees
    with pytest.raises(ValueError, match="not an RGB ICC profile"):
        write_image(tmp_path / f"x{name}", pic.rgb, icc_profile=bytes(16) + b"CMYK" + bytes(108))


# -- metadata --------------------------------------------------------------------------------

TEXT = 'a cat, café ☕\nNegative prompt: dog\nSteps: 20, Upscaler: "4x, ultra"'


@pytest.mark.parametrize(
    ("name", "bit_depth"),
    [("a.png", 8), ("b.png", 16), ("c.jpg", 8), ("d.webp", 8), ("e.tif", 8), ("f.tif", 16)],
)
def test_parameters_round_trip(
    tmp_path: Path, photo: np.ndarray, name: str, bit_depth: int
) -> None:
    write_image(tmp_path / name, photo / 255, bit_depth=bit_depth, parameters=TEXT)
    assert read_parameters(tmp_path / name) == TEXT
    write_image(tmp_path / f"plain-{name}", photo / 255, bit_depth=bit_depth)
    assert read_parameters(tmp_path / f"plain-{name}") is None


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_png_parameters_chunk_like_a1111(tmp_path: Path, photo: np.ndarray, bit_depth: int) -> None:
    write_image(tmp_path / "a.png", photo / 255, bit_depth=bit_depth, parameters="Steps: 20, é")
    write_image(tmp_path / "b.png", photo / 255, bit_depth=bit_depth, parameters="café ☕")
    assert b"tEXtparameters\0Steps: 20, \xe9" in (tmp_path / "a.png").read_bytes()
    assert b"iTXtparameters\0" in (tmp_path / "b.png").read_bytes()
    for name, text in (("a.png", "Steps: 20, é"), ("b.png", "café ☕")):
        with Image.open(tmp_path / name) as img:
            img.load()  # Pillow checks every chunk's CRC on the way
            assert img.text["parameters"] == text


def test_user_comment_like_a1111_and_both_byte_orders(tmp_path: Path, photo: np.ndarray) -> None:
    write_image(tmp_path / "a.jpg", photo / 255, parameters="Steps: 20")
    with Image.open(tmp_path / "a.jpg") as img:
        raw = img.getexif().get_ifd(0x8769)[0x9286]
    assert raw == b"UNICODE\0" + "Steps: 20".encode("utf-16-be")  # piexif's "unicode" dump
    for encoded in (
        b"UNICODE\0" + "Seed: 1, ☕".encode("utf-16-le"),
        b"UNICODE\0" + "Seed: 1, ☕".encode("utf-16-be"),
        b"ASCII\0\0\0Seed: 1, \xe2\x98\x95",
    ):
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = encoded
        Image.fromarray(photo).save(tmp_path / "b.webp", exif=exif.tobytes())
        assert read_parameters(tmp_path / "b.webp") == "Seed: 1, ☕"


def test_format_and_parse_parameters() -> None:
    items = {
        "Steps": 20,
        "Sampler": "DPM++ 2M Karras",
        "Upscaler": "4x-UltraSharp, v2",
        "Prompt template": 'say "hi": twice',
        "Seed": None,
        "Denoising strength": 0.35,
        "Tile size": "512x512",
    }
    text = format_parameters("a castle,\nat dusk ", "  blurry, lowres", items)
    assert text == (
        "a castle,\nat dusk\nNegative prompt: blurry, lowres\n"
        'Steps: 20, Sampler: DPM++ 2M Karras, Upscaler: "4x-UltraSharp, v2", '
        'Prompt template: "say \\"hi\\": twice", Denoising strength: 0.35, Tile size: 512x512'
    )
    expected = {k: str(v) for k, v in items.items() if v is not None}
    assert parse_parameters(text) == ("a castle,\nat dusk", "blurry, lowres", expected)
    assert parse_parameters("just a prompt, 4k") == ("just a prompt, 4k", "", {})
    assert parse_parameters(format_parameters(None, None, {"Steps": 3})) == ("", "", {"Steps": "3"})
    assert format_parameters(None, None, {}) == ""
    with pytest.raises(ValueError, match="parameter name"):
        format_parameters(None, None, {"bad, key": 1})


prompt_line = (
    st.text(st.characters(exclude_characters="\n", exclude_categories=("Cs",)), max_size=20)
    .map(str.strip)
    .filter(lambda line: bool(line) and not line.startswith("Negative prompt:"))
)
prompts = st.one_of(st.none(), st.lists(prompt_line, min_size=1, max_size=3).map("\n".join))
keys = st.from_regex(r"[A-Za-z][A-Za-z0-9 _/-]{0,10}[A-Za-z0-9]", fullmatch=True)
values = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)


@settings(max_examples=100, deadline=None)
@given(prompts, prompts, st.dictionaries(keys, values, min_size=1, max_size=5))
def test_parameters_round_trip_property(
    prompt: str | None, negative: str | None, items: dict[str, str]
) -> None:
    text = format_parameters(prompt, negative, items)
    assert parse_parameters(text) == (prompt or "", negative or "", items)


# -- headers ---------------------------------------------------------------------------------


def png_with_late_exif(rgb16: np.ndarray, orientation: int) -> bytes:
    """A 16-bit PNG whose eXIf chunk comes after the pixels (Pillow decodes to find it)."""
    _, encoded = cv2.imencode(".png", rgb16[..., ::-1])
    png = encoded.tobytes()
    payload = exif_with_orientation(orientation).tobytes()[6:]
    chunk = struct.pack(">I", len(payload)) + b"eXIf" + payload
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + payload))
    return png[:-12] + chunk + png[-12:]  # before IEND


@pytest.mark.parametrize("orientation", [1, 6])
def test_read_header_agrees_with_read_image(
    tmp_path: Path, photo: np.ndarray, photo16: np.ndarray, alpha8: np.ndarray, orientation: int
) -> None:
    exif = exif_with_orientation(orientation)
    Image.fromarray(photo).save(tmp_path / "a.jpg", exif=exif)
    Image.fromarray(np.dstack([photo, alpha8])).save(tmp_path / "b.webp", exif=exif)
    palette = Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(tmp_path / "c.png", transparency=0)
    (tmp_path / "d.png").write_bytes(png_with_late_exif(photo16, orientation))
    for name, fmt in (("a.jpg", "JPEG"), ("b.webp", "WEBP"), ("c.png", "PNG"), ("d.png", "PNG")):
        header = read_header(tmp_path / name)
        pic = read_image(tmp_path / name, max_pixels=LIMIT)
        assert (header.height, header.width) == (pic.height, pic.width), name
        assert header.has_alpha == (pic.alpha is not None), name
        assert header.format == fmt
    header = read_header(tmp_path / "d.png")  # the late eXIf turns it too
    assert (header.height, header.width) == ((64, 48) if orientation == 6 else (48, 64))
    turned = np.rot90(photo16, -1) if orientation == 6 else photo16
    np.testing.assert_array_equal(
        to16(read_image(tmp_path / "d.png", max_pixels=LIMIT).rgb), turned
    )


def test_read_header_decodes_nothing(tmp_path: Path) -> None:
    """A PNG declaring 12000² pixels with almost no data: decoding it would fail (truncated)
    after allocating 432 MB; its header reads instantly."""
    ihdr = struct.pack(">IIBBBBB", 12000, 12000, 8, 6, 0, 0, 0)
    png = (
        imageio_png.PNG_SIGNATURE
        + imageio_png.png_chunk(b"IHDR", ihdr)
        + imageio_png.png_chunk(b"IDAT", zlib.compress(bytes(100)))
        + imageio_png.png_chunk(b"IEND", b"")
    )
    (tmp_path / "big.png").write_bytes(png)
    header = read_header(tmp_path / "big.png")
    assert (header.height, header.width, header.has_alpha) == (12000, 12000, True)
    for name, expected in (("missing.png", "no such file"), ("", "is a folder")):
        with pytest.raises(ImageError) as excinfo:
            read_header(tmp_path / name)
        assert expected in assert_one_line_error(excinfo, str(tmp_path / name))
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageError, match=r"text\.png: not an image file"):
        read_header(tmp_path / "text.png")


# -- errors ----------------------------------------------------------------------------------


def assert_one_line_error(excinfo: pytest.ExceptionInfo[ImageError], name: str) -> str:
    message = str(excinfo.value)
    assert name in message and "\n" not in message
    return message


@pytest.mark.filterwarnings("ignore:Truncated File Read:UserWarning")
def test_bad_inputs(tmp_path: Path, photo: np.ndarray) -> None:
    Image.fromarray(photo).save(tmp_path / "real.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, I am not a picture\n")
    real = (tmp_path / "real.png").read_bytes()
    (tmp_path / "half.png").write_bytes(real[: len(real) // 2])
    tiff = io.BytesIO()
    Image.fromarray(photo).save(tiff, format="TIFF")  # Pillow puts the header at the start
    (tmp_path / "half.tif").write_bytes(tiff.getvalue()[:60])
    cases = {
        "empty.png": "file is empty",
        "text.png": "not an image file (cannot identify image format)",
        "half.png": "corrupt or truncated PNG file",
        "half.tif": "corrupt or truncated TIFF file",
        "missing.png": "no such file",
        "": "is a folder",
    }
    for name, expected in cases.items():
        for read in (
            lambda p: read_image(p, max_pixels=LIMIT),
            read_parameters,
        ):
            if name == "half.png" and read is read_parameters:
                continue  # metadata is readable before the damage
            with pytest.raises(ImageError) as excinfo:
                read(tmp_path / name)
            assert expected in assert_one_line_error(excinfo, str(tmp_path / name))
    with pytest.raises(ImageError) as excinfo:
        read_image(tmp_path / "real.png", max_pixels=1000)
    message = assert_one_line_error(excinfo, "real.png")
    assert message.endswith(
        "real.png: 64x48 = 3072 pixels exceeds the limit of 1000; raise it with --max-pixels"
    )
    with pytest.raises(ImageError) as excinfo:
        read_image(tmp_path / "half.png", max_pixels=LIMIT)
    assert isinstance(excinfo.value.__cause__, Exception)


def test_our_limit_rules_not_pillows(
    tmp_path: Path, photo: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.fromarray(photo).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert read_image(tmp_path / "a.png", max_pixels=LIMIT).width == 64
    assert Image.MAX_IMAGE_PIXELS == 100


def test_write_refusals(tmp_path: Path, photo: np.ndarray) -> None:
    rgb = photo / 255
    target = tmp_path / "out.png"
    target.write_bytes(b"precious")
    with pytest.raises(ImageError) as excinfo:
        write_image(target, rgb)
    assert str(excinfo.value) == f"{target}: already exists; pass --overwrite to replace it"
    assert target.read_bytes() == b"precious"
    write_image(target, rgb, overwrite=True)
    np.testing.assert_array_equal(to8(read_image(target, max_pixels=LIMIT).rgb), photo)

    with pytest.raises(ImageError, match=r"unknown image format \.gif; use one of \.png, \.jpg"):
        write_image(tmp_path / "out.gif", rgb)
    with pytest.raises(ImageError) as excinfo:
        write_image(tmp_path / "nowhere" / "out.png", rgb)
    assert "output folder" in assert_one_line_error(excinfo, "out.png")
    with pytest.raises(ImageError, match="is not a folder"):
        write_image(target / "out.png", rgb)  # the "folder" is a file
    with pytest.raises(ValueError, match="rgb must be float"):
        write_image(tmp_path / "int.png", photo)
    with pytest.raises(ImageError, match="too large for WEBP"):
        write_image(tmp_path / "wide.webp", np.zeros((1, 16384, 3), np.float32))
    assert sorted(os.listdir(tmp_path)) == ["out.png"]


def test_unwritable_folder(
    tmp_path: Path, photo: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(**kwargs: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(imageio_write.tempfile, "mkstemp", refuse)
    with pytest.raises(ImageError, match=r"out\.png: cannot write to .*Permission denied"):
        write_image(tmp_path / "out.png", photo / 255)


def test_atomic_write_leaves_nothing_behind(
    tmp_path: Path, photo: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_image(tmp_path / "ok.png", photo / 255)
    assert os.listdir(tmp_path) == ["ok.png"]
    assert (tmp_path / "ok.png").stat().st_mode & 0o777 == 0o666 & ~imageio_write.umask()

    seen: list[str] = []

    def broken(fh: io.BufferedWriter, *args: object) -> None:
        fh.write(b"\x89PNG half an image")
        fh.flush()
        seen.extend(os.listdir(tmp_path))
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(imageio_write, "encode", broken)
    with pytest.raises(ImageError, match=r"bad\.png: cannot encode PNG") as excinfo:
        write_image(tmp_path / "bad.png", photo / 255)
    assert isinstance(excinfo.value.__cause__, RuntimeError)
    assert any(name.startswith(".bad.png.tmp-") for name in seen)  # it did write a temp file
    assert os.listdir(tmp_path) == ["ok.png"]
    with pytest.raises(ImageError):
        write_image(tmp_path / "ok.png", photo / 255, overwrite=True)
    assert os.listdir(tmp_path) == ["ok.png"]
    np.testing.assert_array_equal(to8(read_image(tmp_path / "ok.png", max_pixels=LIMIT).rgb), photo)


def test_no_overwrite_even_when_file_appears_during_write(
    tmp_path: Path, photo: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    encode = imageio_write.encode

    def racing(fh: io.BufferedWriter, *args: object) -> None:
        (tmp_path / "out.png").write_bytes(b"someone else's")
        encode(fh, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(imageio_write, "encode", racing)
    with pytest.raises(ImageError, match="already exists"):
        write_image(tmp_path / "out.png", photo / 255)
    assert (tmp_path / "out.png").read_bytes() == b"someone else's"
    assert os.listdir(tmp_path) == ["out.png"]


def test_png_add_chunks_crc(photo: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    png = png_add_chunks(buffer.getvalue(), [(b"tEXt", b"k\0v")])
    length, kind = struct.unpack(">I4s", png[33:41])
    assert (length, kind) == (3, b"tEXt")
    assert png[41:44] == b"k\0v" and png[44:48] == struct.pack(">I", zlib.crc32(b"tEXtk\0v"))
    with pytest.raises(ValueError):
        png_add_chunks(b"GIF89a", [])

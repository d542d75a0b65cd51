"""Settings: every knob declared once, with its bounds or choices, whether it needs a checkpoint
and when it applies; validation messages, metadata items and the "no effect" notes derive from
those declarations."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tileup.settings import SettingsError, UpscaleSettings, flag_of


def test_redraw_knobs_accept_their_whole_range() -> None:
    UpscaleSettings(tile=512)
    UpscaleSettings(
        tile=64, overlap=0, order="chess", padding=0, mask_blur=0,
        seam_fix="half-tile+intersections", seam_denoise=0.0, seam_width=64, seam_mask_blur=0,
        seam_padding=64,
    )  # fmt: skip


def _python_words(message: str) -> str:
    """A flag-worded message pattern in the words of the Python API (field names)."""
    return re.sub(r"--([a-z-]+)", lambda m: m.group(1).replace("-", "_"), message)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"padding": -1}, "--padding must be an integer in"),
        ({"seam_padding": -8}, "--seam-padding"),
        ({"padding": 600}, "--padding"),
        ({"mask_blur": -1}, "--mask-blur"),
        ({"seam_mask_blur": 65}, "--seam-mask-blur"),
        ({"seam_width": 520}, "--seam-width must be a multiple of 8 in \\[8, --tile 512\\]"),
        ({"seam_width": 60}, "--seam-width"),
        ({"seam_width": 0}, "--seam-width"),
        ({"order": "spiral"}, "--order must be one of linear, chess"),
        ({"seam_fix": "bands"}, "--seam-fix must be one of none, band, half-tile"),
        ({"seam_denoise": 1.5}, "--seam-denoise must be in \\[0, 1\\]"),
        ({"padding": 8.5}, "--padding"),
    ],
)
def test_redraw_knobs_refuse_bad_values(change: dict, message: str) -> None:
    with pytest.raises(SettingsError) as err:
        UpscaleSettings(tile=512, **change)
    assert re.search(message, err.value.cli_message)  # the CLI names the flag
    assert re.search(_python_words(message), str(err.value))  # Python, the field


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scale": 0}, r"--scale must be in \(0, 64\], got 0"),
        ({"scale": 65.0}, "--scale"),
        ({"width": 0}, r"--width must be an integer in \[1, ∞\), got 0"),
        ({"model_tile": 8}, r"--model-tile must be an integer in \[16, ∞\)"),
        ({"steps": 1.5}, r"--steps must be an integer in \[1, 1000\], got 1.5"),
        ({"steps": True}, "--steps"),
        ({"denoise": float("nan")}, r"--denoise must be in \[0, 1\], got nan"),
        ({"cfg": 101}, "--cfg"),
        ({"seed": -2}, r"--seed must be an integer in \[-1, 2\^63\)"),
        ({"seed": 2**63}, "--seed"),
        ({"tile": 100}, r"--tile must be a multiple of 8 in \[64, ∞\), got 100"),
        ({"tile_batch": 0}, "--tile-batch"),
        ({"vae_tile": 60}, "--vae-tile"),
        ({"overlap": 12}, "--overlap"),
        ({"overlap": 512}, r"--overlap must be a multiple of 8 in \[0, --tile\), got 512"),
        ({"mode": "tiled"}, "--mode must be one of fused, redraw; got 'tiled'"),
        ({"blend": "box"}, "--blend"),
        ({"dtype": "fp8"}, "--dtype"),
        ({"device": "gpu"}, "--device"),
        ({"upscaler": " "}, "--upscaler"),
        ({"max_pixels": 0}, "--max-pixels"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(change: dict, message: str) -> None:
    with pytest.raises(SettingsError) as err:
        UpscaleSettings(**change)
    assert re.search(message, err.value.cli_message)  # the CLI names the flag
    assert re.search(_python_words(message), str(err.value))  # Python, the field


def test_overlap_is_checked_against_the_tile_only_in_fused_mode() -> None:
    assert UpscaleSettings(mode="redraw", tile=64).overlap == 64
    with pytest.raises(SettingsError, match="overlap"):
        UpscaleSettings(mode="fused", tile=64)


def test_every_field_has_a_flag_and_help() -> None:
    flags = [flag_of(f.name) for f in dataclasses.fields(UpscaleSettings)]
    assert len(set(flags)) == len(flags) and all(f.startswith("--") for f in flags)
    assert (
        flag_of("models_dirs") == "--models-dir" and flag_of("seam_mask_blur") == "--seam-mask-blur"
    )
    assert all(f.metadata["help"] for f in dataclasses.fields(UpscaleSettings))


def test_metadata_items_leave_out_what_does_not_apply() -> None:
    fused = UpscaleSettings().metadata_items()
    assert fused["Tile overlap"] == "64" and fused["Tile blend"] == "gaussian"
    assert not {"Tile padding", "Mask blur", "Tile order", "Seam fix"} & set(fused)
    redraw = UpscaleSettings(mode="redraw", seam_fix="half-tile").metadata_items()
    assert redraw["Tile padding"] == "32" and redraw["Mask blur"] == "8"
    assert redraw["Tile order"] == "linear" and redraw["Seam fix"] == "half-tile"
    assert "Tile overlap" not in redraw and "Seam fix width" not in redraw
    band = UpscaleSettings(seam_fix="band", seam_width=32).metadata_items()
    assert band["Seam fix width"] == "32" and band["Tile order"] == "linear"
    pixel = UpscaleSettings(scale=3).metadata_items(with_checkpoint=False)
    assert pixel == {"Upscaler": "default", "Upscale by": "3"}


def test_settings_without_effect_are_named() -> None:
    assert UpscaleSettings().without_checkpoint_effect() == []
    named = UpscaleSettings(
        prompt="a cat", steps=30, sampler="DDIM", mode="redraw", color_fix="wavelet", scale=3
    ).without_checkpoint_effect()
    assert named == [
        "--prompt a cat",
        "--steps 30",
        "--sampler DDIM",
        "--mode redraw",
        "--color-fix wavelet",
    ]


def test_replace_and_from_mapping_validate() -> None:
    settings = UpscaleSettings()
    assert settings.replace(scale=4).scale == 4
    with pytest.raises(SettingsError, match=r"^scale must be"):
        settings.replace(scale=-1)
    with pytest.raises(SettingsError, match="unknown setting"):
        UpscaleSettings.from_mapping({"scael": 2})

"""txt2img with hires fix on tiny random-weight checkpoints: sizes, steps per pass, every hr
override, latent vs pixel hires upscaler, --hr-checkpoint, metadata round trip, bad values."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from diffusers import UNet2DConditionModel
from PIL import Image
from sd_fixtures import make_tiny_components, save_single_file

import tileup
from tileup.cli import main
from tileup.imageio import read_parameters
from tileup.infotext import parse_parameters
from tileup.modes.model import PromptEncoder
from tileup.settings import SettingsError
from tileup.txt2img import GenerateSettings, Generator, hires_size, settings_from_parameters
from tileup.vae.runner import VaeRunner

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen-checkpoints")
    return {
        name: save_single_file(
            make_tiny_components("sd1", seed=seed), root / f"model_{name}.safetensors", "sd1"
        )
        for name, seed in (("a", 0), ("b", 1))
    }


def _settings(checkpoint: Path, **changes) -> dict:
    """64² first pass, one 128 px tile in either pass: fast on the CPU."""
    base = dict(
        prompt="a photo of a cat", checkpoint=str(checkpoint), width=64, height=64, steps=3,
        seed=5, tile=128, overlap=32,
    )  # fmt: skip
    return base | changes


class Calls:
    """Every UNet forward's batch size (the real forward still runs) and each encoded prompt."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[tuple[int, tuple[int, int]]] = []
        self.prompts: list[tuple[str, str]] = []
        self.encodes = 0
        forward, schedule = UNet2DConditionModel.forward, PromptEncoder.schedule
        encode = VaeRunner.encode_canvas

        def counting(unet, sample, *args, **kwargs):
            self.batches.append((sample.shape[0], tuple(sample.shape[-2:])))
            return forward(unet, sample, *args, **kwargs)

        def encoding(encoder, prompt, negative, *args, **kwargs):
            self.prompts.append((prompt, negative))
            return schedule(encoder, prompt, negative, *args, **kwargs)

        def vae_encode(runner, *args, **kwargs):
            self.encodes += 1
            return encode(runner, *args, **kwargs)

        monkeypatch.setattr(UNet2DConditionModel, "forward", counting)
        monkeypatch.setattr(PromptEncoder, "schedule", encoding)
        monkeypatch.setattr(VaeRunner, "encode_canvas", vae_encode)

    def calls_at(self, latent_size: tuple[int, int]) -> list[int]:
        return [batch for batch, size in self.batches if size == latent_size]


def test_hires_size_follows_a1111() -> None:
    s = GenerateSettings()
    assert hires_size(512, 768, s) == ((1024, 1536), (1024, 1536))
    assert hires_size(512, 768, GenerateSettings(hr_scale=1.5)) == ((768, 1152),) * 2
    assert hires_size(512, 768, GenerateSettings(hr_resize_x=1536)) == ((1024, 1536),) * 2
    assert hires_size(512, 768, GenerateSettings(hr_resize_y=1024)) == ((1024, 1536),) * 2
    # both: cover 1024x1024 (scale max(1024/768, 1024/512) = 2), then crop the centre
    assert hires_size(512, 768, GenerateSettings(hr_resize_x=1024, hr_resize_y=1024)) == (
        (1024, 1536),
        (1024, 1024),
    )


def test_both_passes_sizes_steps_and_latent_hires_skips_the_vae_encode(
    checkpoints, monkeypatch
) -> None:
    calls = Calls(monkeypatch)
    (image,) = tileup.generate(**_settings(checkpoints["a"]))
    assert image.first_pass.image.size == (64, 64) and image.final.image.size == (128, 128)
    assert calls.calls_at((8, 8)) == [2, 2, 2]  # first pass: 3 steps, cond + uncond
    assert calls.calls_at((16, 16)) == [2, 2, 2]  # second pass: the main steps (hr steps 0)
    assert calls.encodes == 0  # "Latent": the first pass's latents, no decode-encode trip
    assert calls.prompts == [("a photo of a cat", "")]  # encoded once, shared by both passes
    # a pixel hires upscaler decodes, upscales the pixels and encodes them again
    calls.encodes = 0
    (pixel,) = tileup.generate(**_settings(checkpoints["a"], hr_upscaler="lanczos"))
    assert calls.encodes == 1 and pixel.final.image.size == (128, 128)
    np.testing.assert_array_equal(pixel.first_pass.picture.rgb, image.first_pass.picture.rgb)
    assert not np.array_equal(pixel.final.picture.rgb, image.final.picture.rgb)


def test_every_hires_override_is_honoured(checkpoints, monkeypatch) -> None:
    calls = Calls(monkeypatch)
    (image,) = tileup.generate(
        **_settings(
            checkpoints["a"], hr_second_pass_steps=2, hr_sampler="Heun", hr_scheduler="karras",
            hr_cfg=1.0, hr_prompt="a painting of a cat", hr_negative_prompt="blurry",
            hr_resize_x=96, denoise=0.5,
        )
    )  # fmt: skip
    assert image.final.image.size == (96, 96)  # one side given: the aspect kept
    assert calls.calls_at((8, 8)) == [2, 2, 2]  # first pass: Euler a, 3 steps, CFG 7
    assert calls.calls_at((12, 12)) == [1, 1, 1]  # Heun: 2 steps = 3 calls; CFG 1: no uncond
    assert calls.prompts == [("a photo of a cat", ""), ("a painting of a cat", "blurry")]
    _, _, items = parse_parameters(image.final.parameters)
    assert items["Size"] == "64x64" and items["Steps"] == "3" and items["Sampler"] == "Euler a"
    assert items["Hires resize"] == "96x96" and items["Hires steps"] == "2"
    assert items["Hires sampler"] == "Heun" and items["Hires schedule type"] == "karras"
    assert items["Hires prompt"] == "a painting of a cat" and items["Hires CFG Scale"] == "1"
    assert items["Denoising strength"] == "0.5" and items["Hires upscaler"] == "Latent"


def test_both_resize_sides_cut_the_upscale_before_the_second_pass(checkpoints, monkeypatch):
    calls = Calls(monkeypatch)
    (image,) = tileup.generate(**_settings(checkpoints["a"], hr_resize_x=96, hr_resize_y=64))
    assert image.final.image.size == (96, 64)  # covers 96x96 (x1.5), its centre 96x64 kept
    assert calls.calls_at((8, 12)) == [2, 2, 2]  # the second pass runs on the cut latents
    assert calls.calls_at((12, 12)) == []
    _, _, items = parse_parameters(image.final.parameters)
    assert items["Hires resize"] == "96x64"


def test_hr_checkpoint_runs_the_second_pass_with_another_model(checkpoints) -> None:
    (same,) = tileup.generate(**_settings(checkpoints["a"]))
    (swapped,) = tileup.generate(**_settings(checkpoints["a"], hr_checkpoint=str(checkpoints["b"])))
    np.testing.assert_array_equal(swapped.first_pass.picture.rgb, same.first_pass.picture.rgb)
    assert not np.array_equal(swapped.final.picture.rgb, same.final.picture.rgb)
    _, _, items = parse_parameters(swapped.final.parameters)
    assert items["Model"] == "model_a" and items["Hires checkpoint"] == "model_b"


def test_tiled_second_pass_and_no_hires_fix(checkpoints, monkeypatch) -> None:
    calls = Calls(monkeypatch)
    (tiled,) = tileup.generate(**_settings(checkpoints["a"], tile=64, overlap=16, hr_scale=2))
    assert tiled.final.stats.tiles == 9  # 128² in 64 px tiles overlapping by 16: 3 × 3
    assert tiled.final.stats.steps_per_tile == 3
    calls.batches.clear()
    (plain,) = tileup.generate(**_settings(checkpoints["a"], hires_fix=False))
    assert plain.final.image.size == (64, 64) and calls.calls_at((16, 16)) == []
    assert "Hires upscale" not in plain.final.parameters
    stats = plain.final.stats  # the first pass's own stats: the process's peak on the CPU
    assert stats.peak_memory_bytes > 0 and stats.stage_peak_bytes == {}
    assert set(stats.seconds) == {"diffusion", "vae_decode"}


def test_cli_batch_names_first_pass_and_metadata_round_trip(
    checkpoints, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "00007-1.png").write_bytes(b"")  # numbering continues after the highest
    argv = ["generate", "a (red:1.2) fox", "--checkpoint", str(checkpoints["a"]), "--quiet"]
    argv += ["--width", "64", "--height", "64", "--steps", "3", "--seed", "5", "--tile", "128"]
    argv += ["--batch-count", "2", "-o", str(out), "--save-first-pass", "--hr-scale", "1.5"]
    assert main(argv) == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "00007-1.png", "00008-5-first-pass.png", "00008-5.png", "00009-6-first-pass.png",
        "00009-6.png",
    ]  # fmt: skip
    assert Image.open(out / "00008-5.png").size == (96, 96)
    assert Image.open(out / "00008-5-first-pass.png").size == (64, 64)
    text = read_parameters(out / "00009-6.png") or ""
    values = settings_from_parameters(text)
    again = GenerateSettings.from_mapping(values | {"checkpoint": str(checkpoints["a"])})
    assert (again.prompt, again.seed, again.steps, again.width, again.height) == (
        "a (red:1.2) fox",
        6,
        3,
        64,
        64,
    )
    assert (again.hr_scale, again.denoise, again.hr_upscaler, again.sampler) == (
        1.5, 0.7, "Latent", "Euler a"
    )  # fmt: skip
    # --reuse-parameters recreates the image: the same bytes from its parameters alone
    redo = tmp_path / "redo.png"
    reuse = ["generate", "--reuse-parameters", str(out / "00009-6.png"), "--quiet", "-o"]
    reuse += [str(redo), "--checkpoint", str(checkpoints["a"]), "--tile", "128"]
    assert main(reuse) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(
        np.asarray(Image.open(redo)), np.asarray(Image.open(out / "00009-6.png"))
    )


def test_family_native_sizes(checkpoints, tmp_path: Path) -> None:
    sdxl = save_single_file(make_tiny_components("sdxl"), tmp_path / "xl.safetensors", "sdxl")
    v = save_single_file(make_tiny_components("sd2-v"), tmp_path / "v.safetensors", "sd2-v")
    sizes = {}
    for name, path in {"sd1": checkpoints["a"], "sdxl": sdxl, "sd2-v": v}.items():
        settings = GenerateSettings.from_mapping({"checkpoint": str(path), "prompt": "x"})
        sizes[name] = Generator(settings).native_size()
    assert sizes == {"sd1": (512, 512), "sdxl": (1024, 1024), "sd2-v": (768, 768)}
    one_side = GenerateSettings.from_mapping({"checkpoint": str(sdxl), "width": 832})
    assert Generator(one_side).native_size() == (832, 832)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--width", "70"], "--width must be a multiple of 8"),
        (["--hr-scale", "0.5"], "--hr-scale must be in [1, 16]"),
        (["--denoise", "1.5"], "--denoise must be in [0, 1]"),
        (["--batch-count", "0"], "--batch-count must be a whole number of at least 1"),
        (["--batch-count", "2", "-o", "one.png"], "give a folder"),
        (["--hr-sampler", "bogus"], "unknown sampler 'bogus'"),
        (["--hr-upscaler", "no-such-model"], "no-such-model"),
        (["--mode", "sideways"], "invalid choice"),
        (["--mode", "redraw"], "pick a pixel --hr-upscaler"),
    ],
)
def test_bad_values_are_refused_and_nothing_is_written(
    checkpoints, tmp_path: Path, capsys, monkeypatch, extra: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "a cat", "--checkpoint", str(checkpoints["a"]), "--quiet"]
    assert main([*argv, "--width", "64", *extra]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_missing_prompt_or_checkpoint(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TILEUP_CHECKPOINT", raising=False)
    assert main(["generate", "a cat"]) == 2
    assert "generate needs --checkpoint" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", "x.safetensors"]) == 2
    assert "needs a PROMPT" in capsys.readouterr().err
    with pytest.raises(SettingsError, match="unknown setting"):
        tileup.generate("a cat", hr_scael=2)
    with pytest.raises(SettingsError, match="hr_scale must be in"):
        GenerateSettings(hr_scale=0.5)

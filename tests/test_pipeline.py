"""Re-diffusion end to end through the CLI, on tiny random-weight SD checkpoints (no downloads)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from sd_fixtures import make_tiny_components, save_diffusers_folder, save_single_file

from tileup.cli import main
from tileup.errors import TileupError
from tileup.imageio import read_parameters
from tileup.infotext import parse_parameters
from tileup.pipeline import Upscaler
from tileup.settings import SettingsError, UpscaleSettings

os.environ["HF_HUB_OFFLINE"] = "1"

# 64 px tiles (8 latent cells) overlapping by 16 px: small enough for the CPU, several tiles
FAST = [
    "--tile",
    "64",
    "--overlap",
    "16",
    "--upscaler",
    "lanczos",
    "--quiet",
    "--steps",
    "4",
    "--seed",
    "7",
    "--prompt",
    "a photo of an astronaut",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[str, Path] = {}
    for family in ("sd1", "sdxl", "sd2-v"):
        components = make_tiny_components(family, seed=0)
        made[family] = save_single_file(components, root / f"{family}.safetensors", family)
        if family == "sd1":
            made["sd1-folder"] = save_diffusers_folder(components, root / "sd1-folder", family)
    return made


@pytest.fixture
def photo_file(tmp_path: Path, photo: np.ndarray) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.round(photo * 255).astype(np.uint8)).save(path)
    return path


class UNetCalls:
    """Counts UNet samples per forward call (the real forward still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[int] = []
        real = UNet2DConditionModel.forward

        def counting(unet, sample, *args, **kwargs):
            self.batches.append(sample.shape[0])
            return real(unet, sample, *args, **kwargs)

        monkeypatch.setattr(UNet2DConditionModel, "forward", counting)

    @property
    def samples(self) -> int:
        return sum(self.batches)


def _run(args: list[str], capsys) -> tuple[int, dict, str]:
    code = main([*args, "--stats"])
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("{")]
    return code, (json.loads(lines[-1]) if lines else {}), captured.err


@pytest.mark.parametrize("denoise", [1.0, 0.5, 0.3, 0.1])
def test_steps_actually_run_equal_steps(
    checkpoints, photo_file, tmp_path, capsys, monkeypatch, denoise: float
) -> None:
    calls = UNetCalls(monkeypatch)
    out = tmp_path / "out.png"
    code, stats, err = _run(
        [
            str(photo_file),
            "-o",
            str(out),
            "--checkpoint",
            str(checkpoints["sd1"]),
            *FAST,
            "--denoise",
            str(denoise),
            "--steps",
            "5",
        ],
        capsys,
    )
    assert code == 0, err
    tiles = stats["tiles"]
    assert tiles == 9  # 160x128 canvas, 64 px tiles overlapping by at least 16: 3 x 3
    assert calls.samples == tiles * 5 * 2  # every tile, every step, cond + uncond batched
    assert stats["steps_per_tile"] == 5 and stats["tile_steps"] == tiles * 5


def test_same_seed_same_bytes_and_batch_invariance(checkpoints, photo_file, tmp_path) -> None:
    base = [str(photo_file), "--checkpoint", str(checkpoints["sd1"]), *FAST, "--denoise", "0.5"]
    outputs = {}
    for name, extra in {
        "a": ["--tile-batch", "1"],
        "b": ["--tile-batch", "1"],
        "c": ["--tile-batch", "4"],
        "d": ["--seed", "8"],
    }.items():
        target = tmp_path / f"{name}.png"
        assert main([*base, "-o", str(target), *extra]) == 0
        outputs[name] = np.asarray(Image.open(target))
    assert np.array_equal(outputs["a"], outputs["b"]), "same seed must give the same bytes"
    # Tile batch size changes only float rounding inside the stock CPU/GPU kernels (a GEMM of
    # M=1 sums in another order than M=8): at most 1/255 on a few pixels, never a visible change.
    a, c = outputs["a"].astype(int), outputs["c"].astype(int)
    assert np.abs(a - c).max() <= 1 and (a != c).mean() < 0.002, "tile batch size must not matter"
    assert not np.array_equal(outputs["a"], outputs["d"]), "another seed gives another image"


def test_sharing_the_guidance_pairs_first_layers_changes_only_rounding(
    checkpoints, photo_file, tmp_path, monkeypatch
) -> None:
    """tileup.sampling.shared_prefix against the plain doubled batch, whole jobs of both modes
    (SD 1.5 tiny, float32 CPU): the same picture up to float rounding of a batch of k against
    one of 2k."""
    base = [str(photo_file), "--checkpoint", str(checkpoints["sd1"]), *FAST, "--denoise", "0.5"]
    for mode in ("fused", "redraw"):
        outputs = {}
        for sharing in ("on", "off"):
            monkeypatch.setenv("TILEUP_CFG_PREFIX", sharing)
            target = tmp_path / f"{mode}-{sharing}.png"
            assert main([*base, "--mode", mode, "-o", str(target)]) == 0
            outputs[sharing] = np.asarray(Image.open(target)).astype(int)
        gap = np.abs(outputs["on"] - outputs["off"])
        assert gap.max() <= 1 and (gap > 0).mean() < 0.002, (mode, gap.max(), (gap > 0).mean())


def test_diffusers_folder_equals_single_file(checkpoints, photo_file, tmp_path) -> None:
    images = []
    for key in ("sd1", "sd1-folder"):
        target = tmp_path / f"{key}.png"
        assert (
            main([str(photo_file), "-o", str(target), "--checkpoint", str(checkpoints[key]), *FAST])
            == 0
        )
        images.append(np.asarray(Image.open(target)))
    assert np.array_equal(images[0], images[1])


def test_rediffusion_changes_the_image_and_denoise_zero_does_not(
    checkpoints, photo_file, tmp_path, monkeypatch
) -> None:
    plain, zero, half = tmp_path / "plain.png", tmp_path / "zero.png", tmp_path / "half.png"
    assert main([str(photo_file), "-o", str(plain), *FAST]) == 0
    calls = UNetCalls(monkeypatch)
    ck = ["--checkpoint", str(checkpoints["sd1"])]
    assert main([str(photo_file), "-o", str(zero), *ck, *FAST, "--denoise", "0"]) == 0
    assert calls.samples == 0
    assert main([str(photo_file), "-o", str(half), *ck, *FAST, "--denoise", "0.6"]) == 0
    _, z, h = (np.asarray(Image.open(p), dtype=float) for p in (plain, zero, half))
    assert np.abs(h - z).mean() > 2.0, "re-diffusion at 0.6 must change the image"


@pytest.mark.parametrize("family", ["sdxl", "sd2-v"])
def test_other_families_run_end_to_end(
    checkpoints, photo_file, tmp_path, capsys, monkeypatch, family: str
) -> None:
    calls = UNetCalls(monkeypatch)
    out = tmp_path / f"{family}.png"
    code, stats, err = _run(
        [
            str(photo_file),
            "-o",
            str(out),
            "--checkpoint",
            str(checkpoints[family]),
            *FAST,
            "--sampler",
            "DPM++ 2M",
            "--scheduler",
            "karras",
        ],
        capsys,
    )
    assert code == 0, err
    assert calls.samples == stats["tiles"] * 4 * 2
    assert Image.open(out).size == (160, 128)


def test_latent_upscaler(checkpoints, photo_file, tmp_path, capsys) -> None:
    out = tmp_path / "latent.png"
    loud = [a for a in FAST if a != "--quiet"]
    args = [str(photo_file), "-o", str(out), *loud, "--upscaler", "latent-bislerp"]
    code = main([*args, "--checkpoint", str(checkpoints["sd1"]), "--denoise", "0.3"])
    assert code == 0
    assert "higher --denoise" in capsys.readouterr().err
    assert Image.open(out).size == (160, 128)


def test_parameters_in_a1111_order(checkpoints, photo_file, tmp_path) -> None:
    out = tmp_path / "meta.png"
    assert (
        main(
            [
                str(photo_file),
                "-o",
                str(out),
                "--checkpoint",
                str(checkpoints["sd1"]),
                *FAST,
                "--negative-prompt",
                "blurry, low quality",
            ]
        )
        == 0
    )
    text = read_parameters(out)
    prompt, negative, items = parse_parameters(text)
    assert prompt == "a photo of an astronaut" and negative == "blurry, low quality"
    keys = list(items)
    expected = [
        "Steps",
        "Sampler",
        "Schedule type",
        "CFG scale",
        "Seed",
        "Size",
        "Denoising strength",
        "Model hash",
    ]
    assert keys[: len(expected)] == expected
    assert items["Steps"] == "4" and items["Seed"] == "7" and items["Size"] == "160x128"
    assert items["Sampler"] == "Euler a" and items["Tile size"] == "64"
    assert len(items["Model hash"]) == 10


# -- bad input: clear error, exit 2, nothing written ---------------------------------------


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-ckpt",))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sampler", "Euler z"], "Euler a"),
        (["--tile", "100"], "--tile"),
        (["--denoise", "1.5"], "--denoise"),
        (["--denoise", "-0.1"], "--denoise"),
        (["--overlap", "64"], "--overlap"),
        (["--mode", "redraw", "--upscaler", "latent"], "--mode fused"),
        (["--order", "zigzag"], "--order"),
        (["--seam-fix", "full"], "--seam-fix"),
        (["--padding", "-8"], "--padding"),
        (["--seam-width", "128"], "--seam-width"),
        (["--scheduler", "weird"], "karras"),
    ],
)
def test_bad_settings(checkpoints, photo_file, capsys, extra, message) -> None:
    code = main([str(photo_file), "--checkpoint", str(checkpoints["sd1"]), *FAST, *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not photo_file.with_name("photo_tileup.png").exists()


def test_bad_checkpoints(photo_file, tmp_path, shared_models, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.ckpt"
    with evil.open("wb") as fh:
        pickle.dump({"state_dict": _Exploit()}, fh)
    cases = {
        tmp_path / "missing.safetensors": "missing.safetensors",
        shared_models / "realesr-animevideov3.safetensors": "not a Stable Diffusion checkpoint",
        evil: "evil.ckpt",
    }
    for path, message in cases.items():
        code = main([str(photo_file), "--checkpoint", str(path), *FAST])
        err = capsys.readouterr().err
        assert code == 2, err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "pwned-by-ckpt").exists()
    assert not photo_file.with_name("photo_tileup.png").exists()


def test_checkpoint_from_environment(checkpoints, photo_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TILEUP_CHECKPOINT", str(checkpoints["sd1"]))
    out = tmp_path / "env.png"
    code, stats, _ = _run([str(photo_file), "-o", str(out), *FAST], capsys)
    assert code == 0 and stats["tile_steps"] == stats["tiles"] * 4


def test_half_precision_vae_overflow_reruns_in_fp32(
    checkpoints, photo_file, tmp_path, capsys, monkeypatch
) -> None:
    """A VAE giving NaN in half precision is re-run in fp32 and the stats say so."""
    import tileup.vae.runner as runner
    from tileup.vae.tiled import NonFiniteError

    real = runner.tiled_decode
    dtypes: list[torch.dtype] = []

    def overflowing(vae, z, **kwargs):
        dtypes.append(kwargs["dtype"])
        if kwargs["dtype"] != torch.float32:
            raise NonFiniteError("decoder overflowed")
        return real(vae, z, **kwargs)

    monkeypatch.setattr(runner, "tiled_decode", overflowing)
    out = tmp_path / "half.png"
    code, stats, err = _run(
        [
            str(photo_file),
            "-o",
            str(out),
            "--checkpoint",
            str(checkpoints["sd1"]),
            *FAST,
            "--dtype",
            "bf16",
        ],
        capsys,
    )
    assert code == 0, err
    assert dtypes == [torch.bfloat16, torch.float32]
    assert any("fp32" in f for f in stats["fallbacks"])
    assert out.is_file()


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_color_fix_restores_the_source_colour(
    checkpoints, photo_file, tmp_path, monkeypatch, method: str
) -> None:
    """An output whose re-diffusion shifted its colour comes back within 1/255 of the source.

    Random weights give no meaningful image, so the decode is replaced by the pixel-upscaled
    source with a colour shift (+0.08 red, x0.9 green, -0.05 blue): the colour fix, the pipeline
    wiring and the reference it compares with are real.
    """
    from tileup.upscalers.resample import resample
    from tileup.vae.runner import VaeRunner

    source = resample(
        np.asarray(Image.open(photo_file), dtype=np.float32) / 255, 128, 160, "lanczos"
    )

    def shifted_decode(self, latents, notes, options=None):
        h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
        shifted = source * np.array([1.0, 0.9, 1.0]) + np.array([0.08, 0.0, -0.05])
        pads = ((0, h - source.shape[0]), (0, w - source.shape[1]), (0, 0))
        return np.pad(np.clip(shifted, 0, 1).astype(np.float32), pads, mode="edge")

    monkeypatch.setattr(VaeRunner, "decode_canvas", shifted_decode)
    outputs = {}
    for fix in ("none", method):
        out = tmp_path / f"{fix}.png"
        assert (
            main(
                [
                    str(photo_file),
                    "-o",
                    str(out),
                    "--checkpoint",
                    str(checkpoints["sd1"]),
                    *FAST,
                    "--color-fix",
                    fix,
                ]
            )
            == 0
        )
        outputs[fix] = np.asarray(Image.open(out), dtype=np.float64) / 255
    src_mean = source.reshape(-1, 3).mean(axis=0)
    shift = np.abs(outputs["none"].reshape(-1, 3).mean(axis=0) - src_mean).max()
    fixed = np.abs(outputs[method].reshape(-1, 3).mean(axis=0) - src_mean).max()
    assert shift > 10 / 255
    assert fixed <= 1 / 255, fixed * 255
    _, _, items = parse_parameters(read_parameters(tmp_path / f"{method}.png"))
    assert items["Color fix"] == method


def test_samplers_command(capsys) -> None:
    assert main(["samplers"]) == 0
    out = capsys.readouterr().out
    for name in ("Euler a", "DPM++ 2M", "UniPC", "karras", "exponential"):
        assert name in out


# -- the engine as a Python user calls it -------------------------------------------------------


def test_engine_takes_paths_pil_arrays_and_tensors(photo: np.ndarray, tmp_path: Path) -> None:
    import PIL.Image

    from tileup.imageio import ImageError

    engine = Upscaler(UpscaleSettings(upscaler="lanczos", scale=2))
    as_uint8 = np.round(photo * 255).astype(np.uint8)
    path = tmp_path / "in.png"
    PIL.Image.fromarray(as_uint8).save(path)
    chw = torch.from_numpy(as_uint8.astype(np.float32) / 255).permute(2, 0, 1)
    results = [
        engine(str(path)),
        engine(path),
        engine(PIL.Image.open(path)),
        engine(as_uint8),
        engine(as_uint8.astype(np.float32) / 255),
        engine(chw),
        engine(chw[None]),
    ]
    want = results[0].picture.rgb
    assert want.shape == (photo.shape[0] * 2, photo.shape[1] * 2, 3)
    for result in results[1:]:
        np.testing.assert_allclose(result.picture.rgb, want, atol=1e-5)
    with pytest.raises(ImageError, match=r"\[0, 1\], got 0 to 255 \(divide 0-255 values by 255\)"):
        engine(as_uint8.astype(np.float32))
    with pytest.raises(ImageError, match="expected float CxHxW"):
        engine(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ImageError, match="cannot read a int object as an image"):
        engine(42)  # type: ignore[arg-type]


def test_result_save_writes_metadata_and_upscale_by_is_the_real_factor(
    photo: np.ndarray, tmp_path: Path
) -> None:
    from tileup.imageio import read_parameters
    from tileup.infotext import parse_parameters

    engine = Upscaler(UpscaleSettings(upscaler="lanczos", width=photo.shape[1] * 3))
    result = engine(photo)
    written = result.save(tmp_path / "big.png")
    _, _, items = parse_parameters(read_parameters(written) or "")
    assert (
        items["Upscale by"] == "3" and items["Size"] == f"{photo.shape[1] * 3}x{photo.shape[0] * 3}"
    )
    from tileup.imageio import ImageError

    with pytest.raises(ImageError, match="exists"):
        result.save(written)  # kept without overwrite
    result.save(written, overwrite=True)


def test_models_dirs_as_one_string_is_one_folder(tmp_path: Path) -> None:
    settings = UpscaleSettings(models_dirs=str(tmp_path))  # type: ignore[arg-type]
    assert settings.models_dirs == (str(tmp_path),)
    assert UpscaleSettings(models_dirs=tmp_path).models_dirs == (str(tmp_path),)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="models_dirs must be a folder"):
        UpscaleSettings(models_dirs=3)  # type: ignore[arg-type]


def test_per_call_overrides_equal_a_fresh_engine_and_leave_the_engine_as_it_was(
    checkpoints, photo: np.ndarray, monkeypatch
) -> None:
    photo = photo[:32, :48]  # 2x: 2 tiles of 64 px
    base = dict(checkpoint=str(checkpoints["sd1"]), upscaler="lanczos", tile=64, overlap=16)
    base |= dict(steps=4, seed=7, denoise=0.3, prompt="a photo of an astronaut")
    engine = Upscaler(UpscaleSettings(**base))
    first = engine(photo)
    changes = dict(
        prompt="(a painting:1.2) of a [cat|dog]", negative_prompt="blurry", seed=9, steps=3,
        denoise=0.5, sampler="DPM++ 2M", scheduler="karras", cfg=5.0, scale=1.5,
    )  # fmt: skip
    overridden = engine(photo, **changes)
    fresh = Upscaler(UpscaleSettings(**(base | changes)))(photo)
    np.testing.assert_array_equal(overridden.picture.rgb, fresh.picture.rgb)
    assert overridden.parameters == fresh.parameters
    assert "Seed: 9" in overridden.parameters and "Steps: 3" in overridden.parameters
    again = engine(photo)  # the engine's own settings and prompts are back
    np.testing.assert_array_equal(again.picture.rgb, first.picture.rgb)
    assert again.parameters == first.parameters
    # denoise 0 for one call: the pixel upscale, the UNet never runs
    calls = UNetCalls(monkeypatch)
    pixels = engine(photo, denoise=0)
    assert calls.samples == 0
    np.testing.assert_array_equal(
        pixels.picture.rgb, Upscaler(UpscaleSettings(upscaler="lanczos"))(photo).picture.rgb
    )
    with pytest.raises(SettingsError, match=r"checkpoint, upscaler cannot change per call"):
        engine(photo, upscaler="bicubic", checkpoint="other.safetensors")
    with pytest.raises(SettingsError, match="unknown setting"):
        engine(photo, denoize=0.4)
    with pytest.raises(TileupError, match="unknown sampler"):
        engine(photo, sampler="bogus")
    with pytest.raises(SettingsError, match="tile must be a multiple of 8"):
        engine(photo, tile=68)
    assert engine(photo).parameters == first.parameters  # failed calls changed nothing

"""The CLI end to end on real weights: outputs, metadata, modes, batches, errors, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tileup
from tileup.cli import main
from tileup.imageio import read_image, read_parameters
from tileup.infotext import parse_parameters

FAST = ["--upscaler", "lanczos", "--quiet"]


@pytest.fixture
def photo_file(tmp_path: Path, photo: np.ndarray) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.round(photo * 255).astype(np.uint8)).save(path)
    return path


def test_default_run_uses_builtin_model_and_writes_beside(photo_file: Path, capsys) -> None:
    assert main([str(photo_file)]) == 0
    out = photo_file.with_name("photo_tileup.png")
    assert out.is_file()
    with Image.open(out) as img:
        assert img.size == (160, 128) and img.mode == "RGB"
    _, _, items = parse_parameters(read_parameters(out))
    assert items["Upscaler"] == "realesrgan-x4fast"
    assert items["Upscaler model"] == "RealESRGAN Compact"
    assert items["Upscale by"] == "2" and items["Size"] == "160x128"
    err = capsys.readouterr().err
    assert "pixel upscale only" in err and "photo_tileup.png" in err


def test_diffusion_options_without_a_checkpoint_are_named_as_ignored(
    photo_file: Path, capsys
) -> None:
    args = [str(photo_file), "--upscaler", "lanczos", "--mode", "redraw", "--seam-fix", "band"]
    assert main(args) == 0
    note = [line for line in capsys.readouterr().err.splitlines() if "no --checkpoint" in line]
    assert len(note) == 1
    assert "--mode redraw has no effect; --seam-fix band has no effect" in note[0]
    assert "--color-fix" not in note[0]  # left at its default: not mentioned


def test_model_result_differs_from_resampling(photo_file: Path, tmp_path: Path) -> None:
    assert main([str(photo_file), "-o", str(tmp_path / "m.png"), "--quiet"]) == 0
    assert main([str(photo_file), "-o", str(tmp_path / "l.png"), *FAST]) == 0
    model = np.asarray(Image.open(tmp_path / "m.png"), dtype=float)
    lanczos = np.asarray(Image.open(tmp_path / "l.png"), dtype=float)
    assert 1.0 < np.abs(model - lanczos).mean() < 20.0


def test_width_alone_keeps_aspect_and_stats_json(photo_file: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "w.png"
    assert main([str(photo_file), "-o", str(target), "--width", "200", "--stats", *FAST]) == 0
    assert Image.open(target).size == (200, 160)
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["output_size"] == [200, 160] and stats["input_size"] == [80, 64]
    for key in (
        "tiles",
        "tile_steps",
        "steps_per_tile",
        "seconds",
        "peak_memory_bytes",
        "fallbacks",
    ):
        assert key in stats
    assert stats["stage_peak_bytes"] == {}  # per-stage peaks are CUDA's


def test_scale_8_with_a_4x_model_file(photo_file: Path, tmp_path: Path, shared_models) -> None:
    target = tmp_path / "x8.png"
    model = shared_models / "realesr-animevideov3.safetensors"
    code = main(
        [
            str(photo_file),
            "-o",
            str(target),
            "--scale",
            "8",
            "--upscaler",
            str(model),
            "--quiet",
            "--stats",
        ]
    )
    assert code == 0
    assert Image.open(target).size == (640, 512)


def test_existing_output_is_kept_without_overwrite(photo_file: Path, capsys) -> None:
    out = photo_file.with_name("photo_tileup.png")
    out.write_bytes(b"precious")
    assert main([str(photo_file), *FAST]) == 2  # outputs are checked before any work
    assert out.read_bytes() == b"precious"
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(photo_file), "--overwrite", *FAST]) == 0
    assert Image.open(out).size == (160, 128)


def test_batch_one_bad_file_does_not_stop_others(tmp_path: Path, photo_file: Path, capsys) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(photo_file, folder / "a.png")
    (folder / "b.png").write_text("not an image")
    (folder / "c.png").write_bytes(b"")
    shutil.copy(photo_file, folder / "d.jpg")
    outdir = tmp_path / "out"
    outdir.mkdir()
    code = main([str(folder), "-o", str(outdir), *FAST])
    err = capsys.readouterr().err
    assert code == 1
    assert sorted(p.name for p in outdir.iterdir()) == [
        ".tileup-manifest.jsonl",
        "a_tileup.png",
        "d_tileup.png",
    ]
    assert "b.png" in err and "c.png" in err and "2 done, 2 failed" in err
    assert "Traceback" not in err


def test_a_file_whose_job_cannot_be_planned_fails_alone(
    tmp_path: Path, photo: np.ndarray, monkeypatch, capsys
) -> None:
    """Planning the progress of a batch reads every file's size up front; a job that fails
    there (here: the 32 px high one) fails when its turn comes, with one line, not the batch."""
    folder, outdir = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    outdir.mkdir()
    Image.fromarray(np.round(photo * 255).astype(np.uint8)).save(folder / "a.png")
    Image.fromarray(np.round(photo[:32] * 255).astype(np.uint8)).save(folder / "b.png")
    planned = tileup.pipeline.Upscaler.planned_tiles

    def planned_tiles(self, height: int, width: int, has_alpha: bool = False) -> int:
        if height == 32:
            raise ValueError("cannot plan a 32 px high job")
        return planned(self, height, width, has_alpha)

    monkeypatch.setattr(tileup.pipeline.Upscaler, "planned_tiles", planned_tiles)
    code = main([str(folder), "-o", str(outdir), *FAST])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert sorted(p.name for p in outdir.iterdir()) == [".tileup-manifest.jsonl", "a_tileup.png"]
    assert "b.png: failed: cannot plan a 32 px high job" in err and "1 done, 1 failed" in err


def test_recursive_folders_and_globs(tmp_path: Path, photo_file: Path) -> None:
    nested = tmp_path / "tree" / "sub"
    nested.mkdir(parents=True)
    shutil.copy(photo_file, tmp_path / "tree" / "top.png")
    shutil.copy(photo_file, nested / "deep.png")
    assert main([str(tmp_path / "tree"), *FAST]) == 0
    assert (tmp_path / "tree" / "top_tileup.png").exists()
    assert not (nested / "deep_tileup.png").exists()
    assert main([str(tmp_path / "tree"), "--recursive", "--overwrite", *FAST]) == 0
    assert (nested / "deep_tileup.png").exists()
    # earlier outputs are not picked up again
    assert not (tmp_path / "tree" / "top_tileup_tileup.png").exists()
    (tmp_path / "tree" / "top_tileup.png").unlink()
    assert main([str(tmp_path / "tree" / "t*.png"), *FAST]) == 0
    assert (tmp_path / "tree" / "top_tileup.png").exists()


def test_missing_input_is_a_failure_others_done(photo_file: Path, tmp_path: Path, capsys) -> None:
    code = main([str(tmp_path / "nope.png"), str(photo_file), *FAST])
    assert code == 1
    assert photo_file.with_name("photo_tileup.png").exists()
    assert "nope.png: no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scale", "0"], "--scale"),
        (["--scale", "abc"], "invalid float"),
        (["--upscaler", "4x-UltraSharp"], "unknown upscaler '4x-UltraSharp'"),
        (["--upscaler", "latent"], "needs --checkpoint"),
        (["--device", "tpu"], "--device"),
        (["--dtype", "fp8"], "invalid choice"),
        (["--model-tile", "4"], "--model-tile"),
    ],
)
def test_usage_errors_exit_2_and_write_nothing(photo_file: Path, capsys, args, message) -> None:
    with pytest.raises(SystemExit) as exited:
        raise SystemExit(main([str(photo_file), "--quiet", *args]))
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not photo_file.with_name("photo_tileup.png").exists()


def test_several_inputs_need_an_output_folder(photo_file: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other.png"
    shutil.copy(photo_file, other)
    assert main([str(photo_file), str(other), "-o", str(tmp_path / "x.png"), *FAST]) == 2
    assert "output folder" in capsys.readouterr().err


def test_unwritable_output_dir(photo_file: Path, tmp_path: Path, capsys) -> None:
    code = main([str(photo_file), "-o", str(tmp_path / "missing" / "x.png"), *FAST])
    assert code == 2  # outputs are checked before any work; a file's folder is not created
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_over_pixel_limit(photo_file: Path, capsys) -> None:
    assert main([str(photo_file), "--max-pixels", "1000", *FAST]) == 1
    assert "--max-pixels" in capsys.readouterr().err
    assert not photo_file.with_name("photo_tileup.png").exists()


def test_rgba_keeps_alpha_16bit_keeps_depth(tmp_path: Path, photo: np.ndarray) -> None:
    rgba = np.dstack([photo, np.linspace(0, 1, photo.shape[1])[None, :].repeat(64, 0)])
    src = tmp_path / "alpha.png"
    Image.fromarray(np.round(rgba * 255).astype(np.uint8), "RGBA").save(src)
    assert main([str(src), "--quiet"]) == 0
    out = read_image(src.with_name("alpha_tileup.png"), max_pixels=10**8)
    assert out.alpha is not None and out.alpha.shape == (128, 160)
    # the alpha ramp survives the upscale: left transparent, right opaque, monotone in between
    assert out.alpha[:, :4].mean() < 0.05 and out.alpha[:, -4:].mean() > 0.95
    assert np.all(np.diff(out.alpha.mean(axis=0)) > -0.02)

    import cv2

    src16 = tmp_path / "deep.png"
    cv2.imwrite(str(src16), np.round(photo[..., ::-1] * 65535).astype(np.uint16))
    assert main([str(src16), *FAST]) == 0
    out16 = read_image(src16.with_name("deep_tileup.png"), max_pixels=10**8)
    assert out16.bit_depth == 16


def test_jpeg_output_carries_parameters(photo_file: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.jpg"
    assert main([str(photo_file), "-o", str(target), *FAST]) == 0
    _, _, items = parse_parameters(read_parameters(target))
    assert items["Upscaler"] == "lanczos"


def test_models_command_lists_architecture_and_scale(tmp_path: Path, shared_models, capsys):
    (tmp_path / "ESRGAN").mkdir()
    shutil.copy(
        shared_models / "RealESRGAN_x4plus_anime_6B.safetensors",
        tmp_path / "ESRGAN" / "4x-Anime.safetensors",
    )
    (tmp_path / "broken.pth").write_text("nope")
    assert main(["models", "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "4x-Anime\tESRGAN 4x" in out
    assert "default\tRealESRGAN Compact 4x" in out
    assert "broken\tunusable" in out
    assert "lanczos" in out and "latent-bislerp" in out
    assert main(["models", "--models-dir", str(tmp_path / "nowhere")]) == 0
    assert f"models folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_models_descriptions_are_cached_and_refreshed_when_a_file_changes(
    tmp_path: Path, shared_models, monkeypatch
) -> None:
    from tileup.upscalers import catalog

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "m.safetensors"
    shutil.copy(shared_models / "RealESRGAN_x4plus_anime_6B.safetensors", model)
    assert catalog.describe_models([model]) == ["ESRGAN 4x"]
    assert catalog.cache_path().is_file()
    inspected: list[Path] = []
    monkeypatch.setattr(catalog, "_inspect", lambda path: inspected.append(path) or "fresh")
    assert catalog.describe_models([model]) == ["ESRGAN 4x"]  # unchanged: from the cache
    assert inspected == []
    model.write_bytes(b"changed")  # another size and time: inspected again
    assert catalog.describe_models([model]) == ["fresh"]
    assert inspected == [model]
    catalog.cache_path().write_text("{ not json")  # a damaged cache is ignored, then rewritten
    assert catalog.describe_models([model]) == ["fresh"]


def _imports_after(code: str, env: dict[str, str]) -> set[str]:
    """The heavy modules a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in ('torch', 'spandrel', "
    probe += "'diffusers', 'transformers') if m in sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    return set(proc.stdout.split())


def test_help_version_and_cached_models_do_not_import_torch(tmp_path: Path) -> None:
    """Start-up stays fast (bench/startup.py measures it): torch, spandrel and diffusers load
    only when a job runs or a model must be inspected."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    quiet = "import contextlib, io\nfrom tileup.cli import main\n"
    quiet += "with contextlib.redirect_stdout(io.StringIO()): main({})"
    assert _imports_after(quiet.format(["--help"]), env) == set()
    assert _imports_after(quiet.format(["--version"]), env) == set()
    assert _imports_after("import tileup; tileup.UpscaleSettings(scale=3)", env) == set()
    assert "torch" in _imports_after(quiet.format(["models"]), env)  # first time: inspected
    assert _imports_after(quiet.format(["models"]), env) == set()  # then from the cache


def test_python_api_accepts_array_and_returns_stats(photo: np.ndarray) -> None:
    result = tileup.upscale(photo, upscaler="lanczos", scale=1.5)
    assert result.image.size == (120, 96)
    assert result.stats.output_size == (120, 96)
    assert "Upscale by: 1.5" in result.parameters
    with pytest.raises(tileup.SettingsError, match="unknown setting"):
        tileup.upscale(photo, scael=2)


def test_console_script_gives_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("text, not pixels")
    proc = subprocess.run(
        [sys.executable, "-m", "tileup.cli", str(bad), "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "bad.png" in lines[0]


# -- metadata in, metadata out ----------------------------------------------------------------

A1111_TEXT = (
    "a castle on a hill, (detailed:1.2)\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, "
    'Size: 80x64, Model hash: abcdef1234, Model: dream, Lora hashes: "a: 1, b: 2"'
)


def _with_parameters(photo_file: Path, text: str) -> Path:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    path = photo_file.with_name("a1111.png")
    with Image.open(photo_file) as img:
        img.save(path, pnginfo=info)
    return path


def test_info_prints_the_parsed_parameters(photo_file: Path, capsys) -> None:
    source = _with_parameters(photo_file, A1111_TEXT)
    assert main(["info", str(source), str(photo_file)]) == 0
    out = capsys.readouterr().out
    assert "  Prompt: a castle on a hill, (detailed:1.2)" in out
    assert "  Negative prompt: blurry, lowres" in out
    assert "  Lora hashes: a: 1, b: 2" in out and f"{photo_file}: no parameters" in out
    assert main(["info", "--json", str(source)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["parameters"]["Seed"] == "1234" and record["negative_prompt"] == "blurry, lowres"
    assert main(["info", str(photo_file.with_name("missing.png"))]) == 1
    assert "missing.png" in capsys.readouterr().err


def test_an_upscaled_image_keeps_its_sources_prompt_and_seed(photo_file: Path) -> None:
    source = _with_parameters(photo_file, A1111_TEXT)
    out = source.with_name("kept.png")
    assert main([str(source), "-o", str(out), *FAST]) == 0
    prompt, negative, items = parse_parameters(read_parameters(out))
    assert prompt == "a castle on a hill, (detailed:1.2)" and negative == "blurry, lowres"
    assert items["Seed"] == "1234" and items["Model"] == "dream"
    assert items["Lora hashes"] == "a: 1, b: 2"
    assert items["Size"] == "160x128" and items["Upscaler"] == "lanczos"  # tileup's own


def test_reuse_parameters_fills_what_the_command_line_leaves_out(
    photo_file: Path, capsys, monkeypatch
) -> None:
    import tileup.batch

    seen: dict = {}

    def capture(inputs, settings, **kwargs):  # the settings the CLI built, nothing run
        seen["settings"] = settings
        return []

    monkeypatch.setattr(tileup.batch, "upscale_files", capture)  # the CLI imports it per run
    source = _with_parameters(photo_file, A1111_TEXT)
    main([str(source), "--reuse-parameters", "--seed", "7", *FAST])
    s = seen["settings"]
    assert (s.prompt, s.negative_prompt) == ("a castle on a hill, (detailed:1.2)", "blurry, lowres")
    assert (s.steps, s.sampler, s.scheduler, s.cfg, s.seed) == (28, "DPM++ 2M", "Karras", 6.5, 7)
    bad = _with_parameters(photo_file, "a cat\nSteps: many, Seed: 3")
    main([str(bad), "--reuse-parameters", *FAST])
    err = capsys.readouterr().err
    assert "warning: --reuse-parameters" in err and "Steps: 'many' is not a whole number" in err
    assert seen["settings"].steps == 20 and seen["settings"].prompt == ""
    assert main([str(bad), str(source), "--reuse-parameters", *FAST]) == 2
    assert "exactly one input image" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sd_fixtures import make_tiny_components, save_single_file

    folder = tmp_path_factory.mktemp("ckpt")
    return save_single_file(make_tiny_components("sd1"), folder / "tiny.safetensors", "sd1")


def test_img2img_is_one_pass_at_the_inputs_size(
    photo_file: Path, tiny_checkpoint: Path, capsys, monkeypatch
) -> None:
    monkeypatch.delenv("TILEUP_CHECKPOINT", raising=False)
    out = photo_file.with_name("i2i.png")
    args = ["--checkpoint", str(tiny_checkpoint), "--denoise", "0.5", "--steps", "2"]
    assert main(["img2img", str(photo_file), "-o", str(out), *args, "--quiet", "--stats"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with Image.open(photo_file) as src, Image.open(out) as img:
        assert img.size == src.size
        changed = np.abs(np.asarray(img, dtype=int) - np.asarray(src, dtype=int)).mean()
    assert changed > 1  # re-diffused, not copied
    assert stats["tiles"] == 1 and stats["tile_steps"] == 2
    _, _, items = parse_parameters(read_parameters(out))
    assert items["Denoising strength"] == "0.5" and items["Size"] == f"{img.size[0]}x{img.size[1]}"
    assert main(["img2img", str(photo_file)]) == 2
    assert "img2img needs --checkpoint" in capsys.readouterr().err
    assert not photo_file.with_name("photo_tileup.png").exists()


def test_denoise_zero_gives_the_pixel_upscale_bytes(
    photo_file: Path, tiny_checkpoint: Path, capsys
) -> None:
    plain, skipped = photo_file.with_name("plain.png"), photo_file.with_name("skipped.png")
    assert main([str(photo_file), "-o", str(plain), "--upscaler", "lanczos"]) == 0
    capsys.readouterr()
    args = ["--checkpoint", str(tiny_checkpoint), "--denoise", "0", "--upscaler", "lanczos"]
    assert main([str(photo_file), "-o", str(skipped), *args]) == 0
    assert "--denoise 0: no re-diffusion" in capsys.readouterr().err
    with Image.open(plain) as a, Image.open(skipped) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))  # not a VAE round trip
    _, _, items = parse_parameters(read_parameters(skipped))
    assert "Steps" not in items and "Model" not in items


def test_help_is_grouped_and_names_the_sub_commands(capsys) -> None:
    import dataclasses

    from tileup.cli import HELP_GROUPS

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "tileup {generate,img2img,batch,models,samplers,info,ui} ..." in text
    positions = [text.index(f"\n{title}:\n") for title in ["input and output", *HELP_GROUPS]]
    assert positions == sorted(positions)  # every section, in order
    grouped = [name for names in HELP_GROUPS.values() for name in names]
    fields = [f.name for f in dataclasses.fields(tileup.UpscaleSettings)]
    assert sorted(grouped) == sorted(fields)  # each setting in exactly one section
    assert "(default: 268.435 megapixels)" in text and "268435456" not in text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--sampler", "bogus"], "unknown sampler 'bogus'"),
        (["--scheduler", "nope"], "unknown schedule"),
        (["--sampler", "DPM++ 2M Karras", "--scheduler", "exponential"], "names schedule"),
    ],
)
def test_bad_sampler_is_refused_even_without_checkpoint(
    photo_file: Path, tmp_path: Path, capsys, options: list[str], message: str
) -> None:
    target = tmp_path / "out.png"
    assert main([str(photo_file), "-o", str(target), *FAST, *options]) == 2
    assert message in capsys.readouterr().err
    assert not target.exists()


def test_sampler_without_checkpoint_is_named_in_the_note(photo_file: Path, tmp_path: Path, capsys):
    argv = [str(photo_file), "-o", str(tmp_path / "o.png"), "--upscaler", "lanczos"]
    assert main([*argv, "--sampler", "DPM++ 2M", "--steps", "30", "--prompt", "a cat"]) == 0
    note = capsys.readouterr().err
    for flag in ("--sampler DPM++ 2M", "--steps 30", "--prompt a cat"):
        assert f"{flag} has no effect" in note


def test_library_warnings_reach_the_user_as_one_line(
    photo_file: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import warnings

    import tileup.batch

    original = tileup.batch._read_headers

    def noisy(*args, **kwargs):
        warnings.warn("a third-party note\nwith a second line", UserWarning, stacklevel=1)
        warnings.warn("a third-party note\nagain", UserWarning, stacklevel=1)  # same first line
        warnings.warn("old API", FutureWarning, stacklevel=1)  # for developers: not shown
        return original(*args, **kwargs)

    monkeypatch.setattr(tileup.batch, "_read_headers", noisy)
    assert main([str(photo_file), "-o", str(tmp_path / "o.png"), *FAST[:2]]) == 0
    err = capsys.readouterr().err
    assert err.count("tileup: warning: a third-party note") == 1
    assert "second line" not in err and "old API" not in err and "Traceback" not in err

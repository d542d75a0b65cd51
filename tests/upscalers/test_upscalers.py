"""Pixel upscalers on real Real-ESRGAN weights: exact tiling, chaining, registry, bad files."""

from __future__ import annotations

import pickle
import shutil
import threading
import time
import warnings
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from tileup.choices import RESAMPLERS
from tileup.models.weights import WeightsError
from tileup.upscalers.models import UpscalerError, load_sr_model
from tileup.upscalers.pixel import (
    ModelRunner,
    compiled_trunk,
    count_pixel_tiles,
    model_passes,
    upscale_pixels,
)
from tileup.upscalers.registry import LatentUpscaler, ModelUpscaler, Resampler, resolve_upscaler
from tileup.upscalers.resample import resample, resize_exact
from tileup.upscalers.tiled import RunReport, count_tiles, run_tiled

CPU = torch.device("cpu")


def _nchw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]


@pytest.fixture(scope="module")
def x4plus(shared_models: Path):
    return load_sr_model(shared_models / "RealESRGAN_x4plus.safetensors")


@pytest.fixture(scope="module")
def tiny(shared_models: Path):
    return load_sr_model(shared_models / "realesr-animevideov3.safetensors")


def test_count_tiles() -> None:
    assert count_tiles(50, 70, None) == 1
    assert count_tiles(50, 70, 16) == 4 * 5
    assert count_tiles(16, 16, 16) == 1


def test_rrdbnet_tiled_equals_untiled(x4plus, photo: np.ndarray) -> None:
    """RealESRGAN_x4plus, fp32, forced small tiles: max difference ≤ 2/255 (issue 2)."""
    image = _nchw(np.ascontiguousarray(np.tile(photo, (2, 2, 1))[:80, :80]))
    untiled = run_tiled(
        x4plus, image, device=CPU, dtype=torch.float32, tile=None, report=RunReport()
    )
    report = RunReport()
    tiled = run_tiled(x4plus, image, device=CPU, dtype=torch.float32, tile=40, report=report)
    assert report.tiles == 4
    assert tiled.shape == untiled.shape == (1, 3, 320, 320)
    assert (tiled - untiled).abs().max().item() <= 2 / 255
    assert tiled.permute(0, 2, 3, 1).is_contiguous()  # H×W×3 in memory: the caller's layout


def test_esrgan_goes_channels_last_on_cuda_only_and_keeps_its_output(
    x4plus, shared_models: Path, photo: np.ndarray
) -> None:
    """place(): ESRGAN's weights channels-last on CUDA (cuDNN's fast layout), never on the CPU
    nor for other architectures; a channels-last RRDBNet computes the same image (CPU, fp32)."""
    compact = load_sr_model(shared_models / "realesrgan-x4fast.safetensors")
    assert x4plus.channels_last_on(torch.device("cuda"))
    assert not x4plus.channels_last_on(CPU)
    assert not compact.channels_last_on(torch.device("cuda"))
    model = deepcopy(x4plus)
    model.place(CPU, torch.float32)
    conv = model.descriptor.model.model[0]
    assert conv.weight.is_contiguous()  # the CPU keeps NCHW
    image = _nchw(np.ascontiguousarray(photo[:24, :24]))
    want = run_tiled(model, image, device=CPU, dtype=torch.float32, tile=None, report=RunReport())
    model.descriptor.model.to(memory_format=torch.channels_last)  # what place() does on CUDA
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    got = run_tiled(model, image, device=CPU, dtype=torch.float32, tile=None, report=RunReport())
    assert (got - want).abs().max().item() <= 1e-5


def test_compact_tiled_equals_untiled_with_odd_sizes(shared_models: Path, photo) -> None:
    model = load_sr_model(shared_models / "realesrgan-x4fast.safetensors")
    image = _nchw(photo[:61, :77])
    untiled = run_tiled(
        model, image, device=CPU, dtype=torch.float32, tile=None, report=RunReport()
    )
    report = RunReport()
    tiled = run_tiled(model, image, device=CPU, dtype=torch.float32, tile=24, report=report)
    assert report.tiles == 12
    assert (tiled - untiled).abs().max().item() <= 2 / 255


def test_too_small_margin_would_show(tiny, photo) -> None:
    """The margin matters: without context the tiled result differs visibly."""
    image = _nchw(photo)
    untiled = run_tiled(tiny, image, device=CPU, dtype=torch.float32, tile=None, report=RunReport())
    no_context = torch.cat(
        [
            run_tiled(
                tiny,
                image[..., :, :40].contiguous(),
                device=CPU,
                dtype=torch.float32,
                tile=None,
                report=RunReport(),
            ),
            run_tiled(
                tiny,
                image[..., :, 40:].contiguous(),
                device=CPU,
                dtype=torch.float32,
                tile=None,
                report=RunReport(),
            ),
        ],
        dim=-1,
    )
    assert (no_context - untiled).abs().max().item() > 4 / 255


def test_out_of_memory_halves_tile_and_finishes(tiny, photo, monkeypatch) -> None:
    image = _nchw(photo)
    expected = run_tiled(
        tiny, image, device=CPU, dtype=torch.float32, tile=None, report=RunReport()
    )
    real_call = type(tiny.descriptor).__call__

    def limited(self, x):
        if x.shape[-1] * x.shape[-2] > 70 * 70:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, x)

    monkeypatch.setattr(type(tiny.descriptor), "__call__", limited)
    report = RunReport()
    progress: list[int] = []
    out = run_tiled(
        tiny,
        image,
        device=CPU,
        dtype=torch.float32,
        tile=None,
        report=report,
        on_tile=progress.append,
    )
    assert any("out of memory; tile reduced to 40px" in f for f in report.fallbacks)
    assert report.tiles > 1
    assert sum(progress) == 1, "split cores are added to and then advance the progress total"
    assert (out - expected).abs().max().item() <= 2 / 255


def test_the_next_core_is_queued_before_the_last_one_is_waited_for(tiny, photo, monkeypatch):
    """Two cores in flight: core k + 1 is launched before core k's output is waited for and
    pasted, so the device never idles on the host's paste (the result is the same)."""
    from tileup.upscalers import tiled

    image = _nchw(photo)
    expected = run_tiled(tiny, image, device=CPU, dtype=torch.float32, tile=16, report=RunReport())
    events: list[str] = []
    launched = iter(range(100))
    forward, get = tiled._forward_core, tiled._CoreOutput.get

    def recording_forward(*args, **kwargs):
        events.append(f"launch {next(launched)}")
        out = forward(*args, **kwargs)
        object.__setattr__(out, "tag", events[-1].split()[1])
        return out

    def recording_get(self):
        events.append(f"get {self.tag}")
        return get(self)

    monkeypatch.setattr(tiled, "_forward_core", recording_forward)
    monkeypatch.setattr(tiled._CoreOutput, "get", recording_get)
    report = RunReport()
    out = run_tiled(tiny, image, device=CPU, dtype=torch.float32, tile=16, report=report)
    cores = count_tiles(photo.shape[0], photo.shape[1], 16)
    assert report.tiles == cores
    order = ["launch 0"]
    for k in range(1, cores):
        order += [f"launch {k}", f"get {k - 1}"]
    assert events == [*order, f"get {cores - 1}"]
    assert torch.equal(out, expected)


def test_out_of_memory_with_a_core_in_flight_lands_that_core_first(tiny, photo, monkeypatch):
    image = _nchw(photo)
    expected = run_tiled(
        tiny, image, device=CPU, dtype=torch.float32, tile=None, report=RunReport()
    )
    real_call = type(tiny.descriptor).__call__
    calls = iter(range(1000))

    def third_fails(self, x):
        if next(calls) == 2:  # the third core's launch, while the second is in flight
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, x)

    monkeypatch.setattr(type(tiny.descriptor), "__call__", third_fails)
    report, progress, seen = RunReport(), [], []
    out = run_tiled(
        tiny,
        image,
        device=CPU,
        dtype=torch.float32,
        tile=40,
        report=report,
        on_tile=progress.append,
        on_core=lambda core, canvas: seen.append(core),
    )
    assert [f for f in report.fallbacks if "out of memory" in f] == [
        f"{tiny.name}: out of memory; tile reduced to 32px"
    ]
    assert sum(progress) == count_tiles(photo.shape[0], photo.shape[1], 40)
    assert seen[2].contains(seen[3]) and seen[2] != seen[3], "the failed core, split, runs next"
    assert (out - expected).abs().max().item() <= 2 / 255  # every core pasted, none lost


def _recorded(model, seen: list[str], tag: str = "", fail: bool = False):
    """A copy of ``model`` whose first conv records ``tag`` and the thread of each call (and may
    fail there)."""

    def hook(module: torch.nn.Module, args: object) -> None:
        seen.append(f"{tag}@{threading.current_thread().name}")
        if fail:
            raise ValueError("replica broke")
        time.sleep(0.01)  # long enough for the other device's thread to take a core

    copy = deepcopy(model)
    first = next(m for m in copy.descriptor.model.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_pre_hook(hook)
    return copy


@pytest.mark.parametrize("name", ["tiny", "x4plus"])
def test_replicas_share_the_cores_and_give_the_same_bytes(name, request, photo) -> None:
    """Cores dealt to a replica (here on the same CPU) run on the replica's own weights (also
    through an RRDBNet's trunk/tail stages) and come back into the same places."""
    model = request.getfixturevalue(name)
    image = _nchw(np.ascontiguousarray(photo[:32, :48]))
    report = RunReport()
    expected = run_tiled(model, image, device=CPU, dtype=torch.float32, tile=16, report=report)
    seen: list[str] = []
    progress: list[int] = []
    shared = RunReport()
    out = run_tiled(
        _recorded(model, seen, "primary"),
        image,
        device=CPU,
        dtype=torch.float32,
        tile=16,
        report=shared,
        on_tile=progress.append,
        replicas=[(_recorded(model, seen, "replica"), CPU)],
    )
    assert torch.equal(out, expected)
    assert shared.tiles == report.tiles == sum(progress) == len(seen) == 6
    threads = {
        tag: {s.split("@")[1] for s in seen if s.startswith(tag)} for tag in ("primary", "replica")
    }
    assert threads["primary"] and threads["replica"], "both copies ran cores"
    assert not threads["primary"] & threads["replica"], "each copy in its own device's thread"


def test_half_overflow_is_run_again_by_a_float32_copy(tiny, photo) -> None:
    """A core whose fp16 output holds NaN (an activation past fp16's range: inf − inf) runs
    again in float32 on a float32 copy of the model (the fp16 weights cannot take float32
    input); the output is finite and the caller's model keeps its fp16 weights."""
    model = deepcopy(tiny)
    model.descriptor.model.body[-1].register_forward_hook(lambda m, i, o: o * 1e9 - o * 1e9)
    model.place(CPU, torch.float16)
    image = _nchw(np.ascontiguousarray(photo[:40, :36]))
    report = RunReport()
    out = run_tiled(model, image, device=CPU, dtype=torch.float16, tile=20, report=report)
    assert report.tiles == 4 and len(report.fallbacks) == 4
    assert "non-finite output in torch.float16" in report.fallbacks[0]
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert next(model.descriptor.model.parameters()).dtype == torch.float16


def test_an_error_on_one_replica_stops_the_run(tiny, photo) -> None:
    seen: list[str] = []
    with pytest.raises(ValueError, match="replica broke"):
        run_tiled(
            _recorded(tiny, seen),
            _nchw(photo),
            device=CPU,
            dtype=torch.float32,
            tile=16,
            report=RunReport(),
            replicas=[(_recorded(tiny, seen, fail=True), CPU)],
        )
    assert len(seen) < count_tiles(photo.shape[0], photo.shape[1], 16), "the run stopped early"


def test_runner_replicas_reach_the_tiled_run(tiny, photo) -> None:
    seen: list[str] = []
    runner = ModelRunner(
        _recorded(tiny, seen, "primary"),
        CPU,
        torch.float32,
        tile=24,
        replicas=(ModelRunner(_recorded(tiny, seen, "replica"), CPU, torch.float32, tile=24),),
    )
    out = upscale_pixels(photo, (128, 160), runner=runner)
    single = upscale_pixels(photo, (128, 160), runner=ModelRunner(tiny, CPU, torch.float32, 24))
    np.testing.assert_array_equal(out, single)
    assert {s.split("@")[0] for s in seen} == {"primary", "replica"}


def test_a_compiled_trunk_runs_every_core_of_a_single_device_run(
    x4plus, tiny, photo, monkeypatch, tmp_path
) -> None:
    """The runner's compiled trunk (dynamo with its ``eager`` backend: traced, no kernels) runs
    each core of a one-device run, traced once for cores of one shape, with the eager values;
    a runner with replicas leaves it aside (no compilation in the devices' threads)."""
    from torch._dynamo.utils import counters

    from tileup.sampling import compiled as compiled_module

    monkeypatch.setattr(compiled_module, "BACKEND", "eager")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    image = np.ascontiguousarray(photo[:32, :48])
    eager = upscale_pixels(image, (128, 192), runner=ModelRunner(x4plus, CPU, torch.float32, 16))

    def graphs() -> int:
        return int(counters["stats"]["unique_graphs"])

    trunk = compiled_trunk(x4plus)
    assert trunk is not None and compiled_trunk(tiny) is None  # no stages
    before, report = graphs(), RunReport()
    runner = ModelRunner(x4plus, CPU, torch.float32, 16, trunk=trunk)
    np.testing.assert_array_equal(
        upscale_pixels(image, (128, 192), runner=runner, report=report), eager
    )
    assert report.tiles == 6 and graphs() - before == 1
    torch._dynamo.reset()
    before = graphs()
    replica = ModelRunner(x4plus, CPU, torch.float32, 16)
    shared = ModelRunner(x4plus, CPU, torch.float32, 16, replicas=(replica,), trunk=trunk)
    np.testing.assert_array_equal(upscale_pixels(image, (128, 192), runner=shared), eager)
    assert graphs() == before
    torch._dynamo.reset()


def test_model_passes() -> None:
    assert model_passes((10, 10), (20, 20), 4) == 1
    assert model_passes((10, 10), (40, 40), 4) == 1
    assert model_passes((10, 10), (80, 80), 4) == 2
    assert model_passes((10, 10), (41, 40), 4) == 2
    assert model_passes((10, 10), (5, 5), 4) == 0
    assert model_passes((10, 10), (30, 30), 2) == 2


def test_chained_passes_reach_8x(tiny, photo) -> None:
    """A 4x model reaches 8x in two passes (16x) and an exact resize down to 8x."""
    small = np.ascontiguousarray(photo[:16, :20])
    runner = ModelRunner(tiny, CPU, torch.float32, tile=None)
    report = RunReport()
    out = upscale_pixels(small, (128, 160), runner=runner, report=report)
    assert out.shape == (128, 160, 3) and report.tiles == 2
    twice = runner.run(runner.run(small, RunReport(), None), RunReport(), None)
    assert twice.shape == (256, 320, 3)
    np.testing.assert_array_equal(out, resize_exact(twice, 128, 160))
    exact = upscale_pixels(small, (256, 320), runner=runner)
    np.testing.assert_array_equal(exact, twice)
    assert count_pixel_tiles((16, 20), (128, 160), runner) == 2


def test_scale_2_is_model_then_area_resize(tiny, photo) -> None:
    runner = ModelRunner(tiny, CPU, torch.float32, tile=None)
    out = upscale_pixels(photo, (128, 160), runner=runner)
    expected = resize_exact(runner.run(photo, RunReport(), None), 128, 160)
    assert out.shape == (128, 160, 3)
    np.testing.assert_array_equal(out, expected)
    # and it is a real upscale: close to, but sharper than, a plain resample
    lanczos = resample(photo, 128, 160, "lanczos")
    assert np.abs(out - lanczos).mean() < 0.05


def test_grey_channel_through_model(tiny, photo) -> None:
    runner = ModelRunner(tiny, CPU, torch.float32, tile=None)
    grey = photo[..., :1]
    out = upscale_pixels(grey, (128, 160), runner=runner)
    assert out.shape == (128, 160, 1) and out.dtype == np.float32


@pytest.mark.parametrize("method", RESAMPLERS)
def test_resamplers(method: str, photo) -> None:
    out = resample(photo, 100, 37, method)
    assert out.shape == (100, 37, 3) and out.min() >= 0 and out.max() <= 1
    assert abs(out.mean() - photo.mean()) < 0.02


def test_nearest_is_exact_replication(photo) -> None:
    out = resample(photo, 128, 160, "nearest")
    np.testing.assert_array_equal(out[::2, ::2], photo)


# -- registry ------------------------------------------------------------------------------


def test_resolve_names_in_a1111_and_comfy_layouts(tmp_path, shared_models, monkeypatch) -> None:
    a1111, comfy, env = tmp_path / "a1111", tmp_path / "comfy", tmp_path / "env"
    (a1111 / "ESRGAN").mkdir(parents=True)
    (comfy / "upscale_models").mkdir(parents=True)
    env.mkdir()
    shutil.copy(
        shared_models / "RealESRGAN_x4plus_anime_6B.safetensors",
        a1111 / "ESRGAN" / "4x-Anime.safetensors",
    )
    shutil.copy(
        shared_models / "realesr-animevideov3.safetensors",
        comfy / "upscale_models" / "4x-Video.safetensors",
    )
    shutil.copy(shared_models / "realesrgan-x4fast.safetensors", env / "Fast.safetensors")
    monkeypatch.setenv("TILEUP_MODELS", str(env))
    dirs = [str(a1111), str(comfy)]
    assert resolve_upscaler("4x-Anime", dirs).path == a1111 / "ESRGAN" / "4x-Anime.safetensors"
    assert (
        resolve_upscaler("4x-Video", dirs).path == comfy / "upscale_models" / "4x-Video.safetensors"
    )
    assert resolve_upscaler("fast", dirs).path == env / "Fast.safetensors"
    path_spec = resolve_upscaler(str(env / "Fast.safetensors"))
    assert path_spec == ModelUpscaler("Fast", env / "Fast.safetensors")
    assert resolve_upscaler("Lanczos") == Resampler("lanczos", "lanczos")
    assert resolve_upscaler("latent-bislerp") == LatentUpscaler("latent-bislerp", "bislerp")
    assert resolve_upscaler("latent") == LatentUpscaler("latent", "bilinear")
    with pytest.raises(UpscalerError) as err:
        resolve_upscaler("4x-UltraSharp", dirs)
    message = str(err.value)
    assert "4x-UltraSharp" in message and "4x-Anime" in message and "4x-Video" in message
    assert "Fast" in message and "\n" not in message


def test_a1111_and_comfyui_names_resolve(tmp_path, shared_models) -> None:
    models = tmp_path / "models"
    (models / "RealESRGAN").mkdir(parents=True)
    (models / "ScuNET").mkdir()
    shutil.copy(
        shared_models / "RealESRGAN_x4plus.safetensors",
        models / "RealESRGAN" / "RealESRGAN_x4plus.safetensors",
    )
    shutil.copy(
        shared_models / "realesrgan-x4fast.safetensors", models / "ScuNET" / "Other.safetensors"
    )
    dirs = [str(models)]
    found = resolve_upscaler("R-ESRGAN 4x+", dirs)
    assert found == ModelUpscaler(
        "R-ESRGAN 4x+", models / "RealESRGAN" / "RealESRGAN_x4plus.safetensors"
    )
    assert resolve_upscaler("Other", dirs).path == models / "ScuNET" / "Other.safetensors"
    expected = {
        "Latent": "bilinear",
        "Latent (antialiased)": "bilinear-antialiased",
        "Latent (bicubic)": "bicubic",
        "Latent (bicubic antialiased)": "bicubic-antialiased",
        "Latent (nearest)": "nearest",
        "Latent (nearest-exact)": "nearest-exact",
        "bislerp": "bislerp",
    }
    for name, mode in expected.items():
        choice = resolve_upscaler(name)
        assert isinstance(choice, LatentUpscaler) and choice.mode == mode, name
    assert resolve_upscaler("None") == Resampler("None", "lanczos")
    assert resolve_upscaler("Nearest") == Resampler("nearest", "nearest")
    assert resolve_upscaler("nearest-exact") == Resampler("nearest-exact", "nearest")
    with pytest.raises(UpscalerError, match=r"RealESRGAN_x4plus_anime_6B\.pth") as err:
        resolve_upscaler("R-ESRGAN 4x+ Anime6B", dirs)
    assert "\n" not in str(err.value)


def test_default_is_the_builtin_real_model() -> None:
    spec = resolve_upscaler("default")
    assert isinstance(spec, ModelUpscaler)
    model = load_sr_model(spec.path)
    assert model.scale == 4 and model.architecture == "RealESRGAN Compact"


def test_unknown_latent_mode() -> None:
    with pytest.raises(UpscalerError, match="latent-bislerp"):
        resolve_upscaler("latent-cubic")


# -- model files -----------------------------------------------------------------------------
# The reader itself (tileup.models.weights) is tested with checkpoints in test_checkpoint.py;
# here: an SR model goes through it with the same answers.


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned-by-pickle",))


def test_code_executing_pickle_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pth"
    with bad.open("wb") as fh:
        pickle.dump({"params": _Exploit()}, fh, protocol=2)
    torch_bad = tmp_path / "evil2.pth"
    torch.save({"params": _Exploit()}, torch_bad)
    for path in (bad, torch_bad):
        with pytest.raises(WeightsError, match="refused to load: the pickle holds code") as err:
            load_sr_model(path)
        assert path.name in str(err.value)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_pth_with_real_weights_loads(tmp_path, shared_models, photo) -> None:
    """A .pth of the same tensors, wrapped as BasicSR writes it, gives the same model."""
    tensors = safetensors.torch.load_file(str(shared_models / "realesr-animevideov3.safetensors"))
    pth = tmp_path / "video.pth"
    torch.save({"params": tensors}, pth)
    ref = load_sr_model(shared_models / "realesr-animevideov3.safetensors")
    x = _nchw(photo[:16, :16])
    b = run_tiled(ref, x, device=CPU, dtype=torch.float32, tile=None, report=RunReport())
    # numpy scalars next to the weights: the inert globals the checkpoint reader allows too
    trained = tmp_path / "trained.pth"
    torch.save({"params": tensors, "best_psnr": np.float64(27.5)}, trained)
    # protocol 3 makes torch warn ("Detected pickle protocol 3"); the reader keeps it quiet
    old = tmp_path / "old.pth"
    torch.save({"params": tensors}, old, pickle_protocol=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models = [load_sr_model(p) for p in (pth, trained, old)]
    for model in models:
        a = run_tiled(model, x, device=CPU, dtype=torch.float32, tile=None, report=RunReport())
        assert torch.equal(a, b)


def test_content_decides_not_the_suffix(tmp_path, shared_models) -> None:
    misnamed = tmp_path / "4x-video.pth"
    shutil.copy(shared_models / "realesr-animevideov3.safetensors", misnamed)
    assert load_sr_model(misnamed).scale == 4


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.safetensors", b"", "the file is empty"),
        ("text.pth", b"this is not a model\n", "not a weights file"),
        ("text.safetensors", b"hello world, not safetensors", "not a weights file"),
        ("model.onnx", b"\x08\x01", "not a weights file"),
        ("bad.pth", b"\x80\x02 damaged pickle", "not a readable PyTorch checkpoint"),
    ],
)
def test_not_a_model_file(tmp_path, name: str, content: bytes, match: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=match) as err:
        load_sr_model(path)
    assert name in str(err.value) and "\n" not in str(err.value)


def test_missing_and_damaged_model_files(tmp_path, shared_models) -> None:
    with pytest.raises(WeightsError, match=r"nope\.pth: no such file"):
        load_sr_model(tmp_path / "nope.pth")
    data = (shared_models / "realesr-animevideov3.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cut\.safetensors: not a valid safetensors file"):
        load_sr_model(cut)
    bare = tmp_path / "tensor.pth"
    torch.save(torch.zeros(2), bare)
    with pytest.raises(WeightsError, match=r"tensor\.pth: holds a Tensor, not a state dict"):
        load_sr_model(bare)


def test_weights_of_something_else_are_named(tmp_path) -> None:
    path = tmp_path / "classifier.safetensors"
    safetensors.torch.save_file({"fc.weight": torch.zeros(10, 5), "fc.bias": torch.zeros(10)}, path)
    with pytest.raises(UpscalerError, match="not a super-resolution model") as err:
        load_sr_model(path)
    assert "classifier.safetensors" in str(err.value) and "2 tensors" in str(err.value)

"""The compiled UNet: one compilation for every batch size (dynamo traced with its ``eager``
backend, so no kernels are generated: the count of graphs is what a cold inductor cache pays
for, ~46 s each for SD 1.5 on an H200)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from sd_fixtures import make_tiny_components
from torch._dynamo.utils import counters

from tileup.sampling import compiled as compiled_module
from tileup.sampling.compiled import _mark_batch_dynamic, batch_is_dynamic, compile_module


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _call(unet: torch.nn.Module, batch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch)
    sample = torch.randn(batch, 4, 16, 16, generator=gen)
    context = torch.randn(batch, 77, 32, generator=gen)
    with torch.inference_mode():
        return unet(sample, torch.tensor(500.0), encoder_hidden_states=context)[0]


@pytest.fixture(autouse=True)
def _trace_only(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(compiled_module, "BACKEND", "eager")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


def test_the_compilation_cache_outlives_the_temporary_folder(monkeypatch, tmp_path) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    unet = torch.nn.Linear(2, 2)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "tileup" / "torchinductor"
    for torchs_default in (None, default_cache_dir()):  # importing torch._dynamo writes it
        if torchs_default is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", torchs_default)
        compile_module(unet, dynamic_batch=True)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder) and folder.is_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compile_module(unet, dynamic_batch=True)  # the user's choice stays
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_one_compilation_serves_every_batch_size_with_the_eager_values() -> None:
    unet = make_tiny_components("sd1", seed=0)["unet"].eval()
    torch._dynamo.reset()
    before = _graphs()
    compiled = compile_module(copy.deepcopy(unet), dynamic_batch=True)
    for batch in (2, 6, 4):
        assert torch.equal(_call(compiled, batch), _call(unet, batch)), batch
    assert _graphs() - before == 1  # without the hook: 2 (a static, then a dynamic batch)
    torch._dynamo.reset()


def test_every_batched_input_is_marked_sdxls_added_conditions_too() -> None:
    sample, context = torch.zeros(2, 4, 8, 8), torch.zeros(2, 77, 32)
    added = {"text_embeds": torch.zeros(2, 32), "time_ids": torch.zeros(2, 6)}
    timestep = torch.tensor(10.0)
    _mark_batch_dynamic(
        torch.nn.Identity(),
        (sample, timestep),
        {"encoder_hidden_states": context, "added_cond_kwargs": added},
    )
    for tensor in (sample, context, *added.values()):
        assert getattr(tensor, "_dynamo_weak_dynamic_indices", set()) == {0}
    assert not getattr(timestep, "_dynamo_weak_dynamic_indices", set())


def test_a_compiled_redraw_model_and_its_replicas_mark_their_batches_dynamic(tmp_path) -> None:
    from sd_fixtures import save_single_file

    from tileup.pipeline import Upscaler
    from tileup.settings import UpscaleSettings

    tiny = make_tiny_components("sd1", seed=0)
    checkpoint = save_single_file(tiny, tmp_path / "sd1.safetensors", "sd1")
    settings = UpscaleSettings(
        checkpoint=str(checkpoint), upscaler="lanczos", scale=2.0, prompt="a photo", compile=True,
        mode="redraw",
    )  # fmt: skip
    model = Upscaler(settings).model
    assert model is not None
    model.add_replicas((torch.device("cpu"),))
    for lane in model.lanes:
        assert hasattr(lane.unet, "_orig_mod") and lane.vae.options.compile
        assert batch_is_dynamic(lane.unet)  # redraw waves vary in crops
    fused = Upscaler(settings.replace(mode="fused")).model
    assert fused is not None and hasattr(fused.unet, "_orig_mod")
    assert not batch_is_dynamic(fused.unet)  # even tile batches: one static shape


def test_a_compiled_job_reports_its_compilation_apart_from_its_stages(tmp_path) -> None:
    import numpy as np
    from sd_fixtures import save_single_file

    from tileup.pipeline import Upscaler
    from tileup.settings import UpscaleSettings

    torch._dynamo.reset()
    checkpoint = save_single_file(
        make_tiny_components("sd1", seed=0), tmp_path / "m.safetensors", "sd1"
    )
    settings = UpscaleSettings(
        checkpoint=str(checkpoint), upscaler="lanczos", scale=2.0, tile=64, overlap=16,
        steps=2, denoise=0.5, prompt="a photo", seed=1, compile=True,
    )  # fmt: skip
    engine = Upscaler(settings)
    photo = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    first = engine(photo).stats.seconds
    assert first["compile"] > first["diffusion"]  # tracing the UNet, left out of its stage
    second = engine(photo).stats.seconds
    assert "compile" not in second and second["diffusion"] > 0
    torch._dynamo.reset()


def test_compiled_crop_vae_matches_the_plain_one_with_one_compilation_per_pass(monkeypatch) -> None:
    """Crop by crop, one graph per pass, its GroupNorms from per-channel statistics
    (tileup.channel_norm, within float32 rounding); the runner's VAE keeps its own GroupNorms
    (the tiled VAE reads their weights)."""
    from tileup.channel_norm import ChannelGroupNorm
    from tileup.vae.runner import VaeOptions, VaeRunner

    monkeypatch.delenv("TILEUP_CROP_NORM", raising=False)
    vae = make_tiny_components("sd1", seed=0)["vae"].eval()
    cpu = torch.device("cpu")
    plain = VaeRunner(vae, cpu, torch.float32, VaeOptions(512, 1, "cpu"))
    compiled = VaeRunner(vae, cpu, torch.float32, VaeOptions(512, 2, "cpu", compile=True))
    pixels = torch.rand(3, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    before = _graphs()
    with torch.inference_mode():
        latents = compiled.encode_crops(pixels, [])  # its batch of 2 runs crop by crop
        torch.testing.assert_close(latents, plain.encode_crops(pixels, []), rtol=0, atol=1e-4)
        decoded = compiled.decode_crops(latents, [])
        torch.testing.assert_close(decoded, plain.decode_crops(latents, []), rtol=0, atol=1e-4)
    assert _graphs() - before == 2  # one encoder and one decoder graph: crops go one by one
    for compiled_pass in compiled._compiled.values():
        norms = [m for m in compiled_pass.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert norms and all(type(m) is ChannelGroupNorm for m in norms)
    assert all(type(m) is torch.nn.GroupNorm for m in vae.modules() if "Norm" in type(m).__name__)
    torch._dynamo.reset()

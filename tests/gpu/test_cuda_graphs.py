"""The UNet replayed from CUDA graphs, on a real GPU (skipped without one; run on the GPU machine).

Tiny seeded random UNets (SD 1.5 and SDXL layouts at reduced widths): a graphed call gives the
eager call's bytes, captures once per input signature and replays after; moving the weights
releases the graphs; whole redraw and fused jobs give the same bytes with graphs as without.
"""

from __future__ import annotations

import copy

import pytest
import torch
from sd_fixtures import make_tiny_components

from tileup.models.families import SD_TRAINING_CONFIG
from tileup.modes.model import DiffusionModel, SamplingOptions
from tileup.sampling.conditioning import Conditioning
from tileup.sampling.graphs import GraphedUNet
from tileup.vae.runner import VaeOptions, VaeRunner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def tiny() -> dict:
    return make_tiny_components("sd1", seed=0)


def _inputs(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 16, 24, generator=gen).to(CUDA, torch.bfloat16)
    context = torch.randn(batch, 77, 32, generator=gen).to(CUDA, torch.bfloat16)
    return sample, context


@torch.inference_mode()
def test_graphed_calls_give_the_eager_bytes_and_capture_once_per_shape(tiny) -> None:
    unet = copy.deepcopy(tiny["unet"]).to(CUDA, torch.bfloat16)
    graphed = GraphedUNet(copy.deepcopy(unet))
    for step, t in enumerate([torch.tensor(901.0), torch.tensor(650.0), torch.tensor(99.5)]):
        for batch in (2, 6):
            sample, context = _inputs(batch, seed=10 * step + batch)
            expected = unet(sample, t, encoder_hidden_states=context, return_dict=False)[0]
            got = graphed(sample, t, encoder_hidden_states=context, return_dict=False)[0]
            assert torch.equal(got, expected), (step, batch)
    # per shape: call 1 eager, call 2 computed by the capture's warm-up, call 3 replayed
    assert (graphed.captures, graphed.replays) == (2, 2)
    assert float(expected.float().abs().mean()) > 0.01  # a real prediction


def test_parked_weights_and_grad_mode_run_eagerly_then_capture_again(tiny) -> None:
    model = _model(tiny, graphs=True)
    graphed = model.unet
    assert isinstance(graphed, GraphedUNet)
    sample, context = _inputs(2, seed=1)
    t = torch.tensor(500)

    def call() -> torch.Tensor:
        return graphed(sample, t, encoder_hidden_states=context, return_dict=False)[0]

    with torch.no_grad():
        first = [call() for _ in range(3)]
        assert (graphed.captures, graphed.replays) == (1, 1)
        assert torch.equal(first[2], first[0])
        model.place_unet("host")  # the graphs hold the old weight addresses: released
        model.place_unet("device")
        again = [call() for _ in range(3)]
    assert (graphed.captures, graphed.replays) == (2, 2)  # eager, a new capture, a replay
    assert torch.equal(again[1], first[0]) and torch.equal(again[2], first[0])
    with torch.enable_grad():
        call()
    assert (graphed.captures, graphed.replays) == (2, 2)


@torch.inference_mode()
def test_a_flop_counter_sees_every_call_of_a_graphed_unet(tiny) -> None:
    """Replays run no ops a dispatch mode could see: under FlopCounterMode a UNet whose graph
    exists runs eagerly, so the count is the plain UNet's, and replays resume after."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = copy.deepcopy(tiny["unet"]).to(CUDA, torch.bfloat16)
    graphed = GraphedUNet(copy.deepcopy(unet))
    sample, context = _inputs(2, seed=4)
    t = torch.tensor(500.0)

    def call(model: torch.nn.Module) -> torch.Tensor:
        return model(sample, t, encoder_hidden_states=context, return_dict=False)[0]

    for _ in range(3):
        call(graphed)
    assert (graphed.captures, graphed.replays) == (1, 1)
    with FlopCounterMode(display=False) as plain:
        call(unet)
    with FlopCounterMode(display=False) as counted:
        call(graphed)
    assert graphed.replays == 1 and plain.get_total_flops() > 0
    assert counted.get_total_flops() == plain.get_total_flops()
    call(graphed)
    assert graphed.replays == 2


def test_a_call_whose_activations_do_not_fit_twice_stays_eager(tiny, monkeypatch) -> None:
    graphed = GraphedUNet(copy.deepcopy(tiny["unet"]).to(CUDA, torch.bfloat16))
    sample, context = _inputs(4, seed=2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 80 * 2**30))
    with torch.inference_mode():
        outs = [graphed(sample, 300.0, encoder_hidden_states=context)[0] for _ in range(3)]
    assert (graphed.captures, graphed.replays, graphed.declined) == (0, 0, 1)
    assert torch.equal(outs[2], outs[0])


def _model(tiny: dict, graphs: bool) -> DiffusionModel:
    gen = torch.Generator().manual_seed(5)
    cond, uncond = (torch.randn(1, 77, 32, generator=gen) for _ in "cu")
    conditioning = Conditioning(
        cond=cond.to(CUDA, torch.bfloat16), uncond=uncond.to(CUDA, torch.bfloat16)
    )
    unet = copy.deepcopy(tiny["unet"]).to(CUDA, torch.bfloat16)
    vae = VaeRunner(copy.deepcopy(tiny["vae"]), CUDA, torch.bfloat16, VaeOptions(512, 4, "cuda"))
    return DiffusionModel(
        unet=GraphedUNet(unet) if graphs else unet,
        vae=vae,
        conditioning=conditioning,
        sampling=SamplingOptions("Euler a", "normal", 4, 5.0),
        scheduler_config=dict(tiny["scheduler"].config or SD_TRAINING_CONFIG),
        device=CUDA,
        dtype=torch.bfloat16,
    )


def test_redraw_and_fused_jobs_give_the_same_bytes_with_graphs(tiny) -> None:
    from tileup.modes.fused import FusedOptions, sample_fused
    from tileup.modes.model import DiffusionReport
    from tileup.modes.redraw import redraw_grid, redraw_regions
    from tileup.modes.regions import tile_regions

    gen = torch.Generator().manual_seed(3)
    canvas = torch.rand(3, 128, 192, generator=gen).to(CUDA)
    latents = torch.randn(1, 4, 24, 40, generator=gen)
    outs = {}
    for graphs in (False, True):
        model = _model(tiny, graphs)
        regions = tile_regions(redraw_grid(128, 192, 64, model.factor, "linear"))
        redrawn, _ = redraw_regions(
            model, canvas, regions, denoise=0.5, padding=16, mask_blur=4, seed=7, max_batch=2
        )
        options = FusedOptions(tile=64, overlap=16, blend="gaussian", tile_batch=3)
        fused = sample_fused(
            model, latents, seed=3, denoise=0.5, options=options, report=DiffusionReport()
        )
        outs[graphs] = (redrawn, fused)
        if graphs:
            assert model.unet.replays > 0
    assert torch.equal(outs[True][0], outs[False][0])
    assert torch.equal(outs[True][1], outs[False][1])
    assert float((outs[True][0] - canvas).abs().mean()) > 0.001  # something was redrawn


def test_a_second_job_replays_the_first_jobs_graphs(tiny, tmp_path) -> None:
    """On a card with room for the VAE beside them, the UNet's graphs stay through the VAE
    stages: the next picture replays them (no capture) and comes out the same."""
    import numpy as np
    from sd_fixtures import save_single_file

    from tileup.pipeline import Upscaler
    from tileup.settings import UpscaleSettings

    checkpoint = save_single_file(tiny, tmp_path / "sd1.safetensors", "sd1")
    settings = UpscaleSettings(
        checkpoint=str(checkpoint), upscaler="lanczos", scale=2.0, tile=64, overlap=16,
        steps=4, denoise=0.5, prompt="a photo", seed=3, device="cuda", vae_tile=64,
    )  # fmt: skip
    engine = Upscaler(settings)
    assert engine.model is not None
    unet = engine.model.unet
    assert isinstance(unet, GraphedUNet)
    photo = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    first = engine(photo)
    captures, replays = unet.captures, unet.replays
    assert captures > 0
    second = engine(photo)
    assert unet.captures == captures and unet.replays > replays
    assert np.array_equal(first.picture.rgb, second.picture.rgb)
    stats = second.stats  # each stage's peak, none above the job's
    assert {"pixel_upscale", "vae_encode", "diffusion", "vae_decode"} <= set(stats.stage_peak_bytes)
    assert 0 < max(stats.stage_peak_bytes.values()) <= stats.peak_memory_bytes
    assert stats.peak_memory_bytes <= stats.peak_reserved_bytes


def test_a_redraw_job_reports_its_passes_peaks(tiny, tmp_path) -> None:
    import numpy as np
    from sd_fixtures import save_single_file

    from tileup.pipeline import Upscaler
    from tileup.settings import UpscaleSettings

    checkpoint = save_single_file(tiny, tmp_path / "sd1.safetensors", "sd1")
    settings = UpscaleSettings(
        checkpoint=str(checkpoint), upscaler="lanczos", scale=2.0, tile=64, overlap=16, steps=4,
        denoise=0.5, prompt="a photo", seed=3, device="cuda", mode="redraw", seam_fix="band",
    )  # fmt: skip
    photo = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    stats = Upscaler(settings)(photo).stats
    peaks = stats.stage_peak_bytes
    assert peaks["redraw"] > 0 and peaks["seam_fix"] > 0
    assert max(peaks.values()) <= stats.peak_memory_bytes
    assert all(p["peak_bytes"] > 0 for p in stats.passes)


@torch.inference_mode()
def test_a_compiled_unet_is_replayed_from_graphs_with_its_compiled_bytes(tiny) -> None:
    """tileup's compiled UNet as redraw runs it (batch dynamic from the first call: one
    compilation for both batch sizes; channels-last weights) inside the graph wrapper: each
    shape's capture and replays give the compiled call's bytes, within kernel rounding of the
    eager NCHW UNet."""
    from torch._dynamo.utils import counters

    from tileup.sampling.compiled import compile_module

    unet = copy.deepcopy(tiny["unet"]).to(CUDA, torch.bfloat16)
    torch._dynamo.reset()
    graphs_before = counters["stats"]["unique_graphs"]
    # as redraw loads it: batch dynamic, weights channels-last (wants_channels_last)
    redraw_form = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    compiled = compile_module(redraw_form, dynamic_batch=True)
    graphed = GraphedUNet(compiled)
    t = torch.tensor(700.0, device=CUDA)  # as the graph's buffer holds it: one form, one graph
    for batch in (2, 6):
        sample, context = _inputs(batch, seed=5 + batch)
        # the keyword arguments the graph wrapper passes: dynamo guards on their number
        expected = compiled(
            sample, t, encoder_hidden_states=context, added_cond_kwargs=None, return_dict=False
        )[0]
        for _ in range(3):  # eager (compiled) call, capture, replay
            got = graphed(sample, t, encoder_hidden_states=context, return_dict=False)[0]
            assert torch.equal(got, expected), batch
        eager = unet(sample, t, encoder_hidden_states=context, return_dict=False)[0]
        gap = (expected.float() - eager.float()).abs()
        assert gap.mean() < 0.02 and gap.max() < 0.25, (gap.mean(), gap.max())  # rounding
    assert (graphed.captures, graphed.replays) == (2, 2)
    from torch._dynamo.utils import guard_failures

    why = {code.co_name: reasons for code, reasons in guard_failures.items()}
    breaks = dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] - graphs_before == 1, (why, breaks)


def test_a_compiled_job_replays_its_compiled_unet_from_graphs(tiny, tmp_path) -> None:
    """The engine's wiring only (a whole job compiled took minutes on the GPU machine): the
    compiled UNet sits inside the graph wrapper, whose replay of it the test above checks."""
    from sd_fixtures import save_single_file

    from tileup.pipeline import Upscaler
    from tileup.settings import UpscaleSettings

    checkpoint = save_single_file(tiny, tmp_path / "sd1.safetensors", "sd1")
    settings = UpscaleSettings(
        checkpoint=str(checkpoint), upscaler="lanczos", scale=2.0, prompt="a photo",
        device="cuda", compile=True,
    )  # fmt: skip
    model = Upscaler(settings).model
    assert model is not None
    assert isinstance(model.unet, GraphedUNet) and hasattr(model.unet.unet, "_orig_mod")
    eager = Upscaler(settings.replace(cuda_graphs=False)).model
    assert eager is not None and hasattr(eager.unet, "_orig_mod")
    # fused compiles statically (inductor picks the layout): NCHW weights; redraw's dynamic
    # batch turns inductor's layout optimisation off: channels-last weights
    fused_conv = model.unet.unet._orig_mod.conv_in.weight
    assert fused_conv.is_contiguous()
    redraw = Upscaler(settings.replace(mode="redraw")).model
    assert redraw is not None and isinstance(redraw.unet, GraphedUNet)
    redraw_conv = redraw.unet.unet._orig_mod.conv_in.weight
    assert redraw_conv.is_contiguous(memory_format=torch.channels_last)


def test_a_guidance_pair_shares_its_first_layers_compiled_and_graphed(tiny) -> None:
    """A paired call (k latents, 2k text states; tileup.sampling.shared_prefix) compiled and
    replayed from graphs: the shared resnet runs on k samples, each replay gives the compiled
    call's bytes, all within bf16 kernel rounding of the plain UNet on the doubled batch."""
    from tileup.sampling import shared_prefix
    from tileup.sampling.compiled import compile_module

    unet = copy.deepcopy(tiny["unet"]).to(CUDA, torch.bfloat16)
    paired = copy.deepcopy(unet)
    assert shared_prefix.install(paired)
    torch._dynamo.reset()
    compiled = compile_module(paired, dynamic_batch=False)
    graphed = GraphedUNet(compiled)
    assert shared_prefix.pairs_guidance(graphed)  # seen through both wrappers
    k = 3
    sample, _ = _inputs(k, seed=21)
    _, context = _inputs(2 * k, seed=22)
    t = torch.tensor(400.0, device=CUDA)
    seen: list[int] = []
    hook = (
        paired.down_blocks[0]
        .resnets[0]
        .conv1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    )
    with torch.inference_mode():
        expected = unet(torch.cat([sample, sample]), t, encoder_hidden_states=context)[0]
        eager = paired(sample, t, encoder_hidden_states=context, return_dict=False)[0]
        hook.remove()
        first = compiled(
            sample, t, encoder_hidden_states=context, added_cond_kwargs=None, return_dict=False
        )[0]
        for _ in range(3):  # eager (compiled) call, capture, replay
            got = graphed(sample, t, encoder_hidden_states=context, return_dict=False)[0]
            assert torch.equal(got, first)
    assert seen == [k]
    assert (graphed.captures, graphed.replays) == (1, 1)
    for out in (eager, first):
        assert out.shape == expected.shape == (2 * k, 4, 16, 24)
        gap = (out.float() - expected.float()).abs()
        assert gap.mean() < 0.02 and gap.max() < 0.25, (gap.mean(), gap.max())  # rounding

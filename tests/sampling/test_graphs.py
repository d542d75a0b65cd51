"""The CUDA-graph wrapper where no graph can run (the CPU): the UNet unchanged underneath.

What graphs themselves do (same bytes, one capture per shape, release on moves) is tested on the
GPU machine in ``tests/gpu/test_cuda_graphs.py``.
"""

from __future__ import annotations

import copy

import torch
from sd_fixtures import make_tiny_components

from tileup.models.families import SD_TRAINING_CONFIG
from tileup.modes.model import DiffusionModel, LoadOptions, SamplingOptions
from tileup.sampling.conditioning import Conditioning
from tileup.sampling.graphs import GraphedUNet
from tileup.settings import UpscaleSettings
from tileup.vae.runner import VaeOptions, VaeRunner

CPU = torch.device("cpu")


def test_on_the_cpu_the_wrapper_is_the_unet() -> None:
    tiny = make_tiny_components("sd1", seed=0)
    unet = tiny["unet"]
    graphed = GraphedUNet(copy.deepcopy(unet))
    gen = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 32)
    with torch.inference_mode():
        for _ in range(3):
            got = graphed(sample, torch.tensor(500.0), encoder_hidden_states=context)[0]
        expected = unet(sample, torch.tensor(500.0), encoder_hidden_states=context)[0]
    assert torch.equal(got, expected)
    assert (graphed.captures, graphed.replays) == (0, 0)
    assert graphed.config.in_channels == 4  # the UNet's attributes come through
    assert sum(p.numel() for p in graphed.parameters()) == sum(p.numel() for p in unet.parameters())

    model = DiffusionModel(
        unet=graphed,
        vae=VaeRunner(tiny["vae"], CPU, torch.float32, VaeOptions(512, 1, "cpu")),
        conditioning=Conditioning(cond=context[:1], uncond=context[1:]),
        sampling=SamplingOptions("Euler a", "normal", 2, 5.0),
        scheduler_config=dict(tiny["scheduler"].config or SD_TRAINING_CONFIG),
        device=CPU,
        dtype=torch.float32,
    )
    assert model._unet_module() is graphed.unet  # placement moves the UNet itself
    model.place_unet("streamed")
    assert not graphed.enabled
    model.place_unet("device")
    assert graphed.enabled
    model.release_graphs()


def test_graphs_are_on_unless_asked_off() -> None:
    assert LoadOptions(None, "epsilon", "", "").cuda_graphs
    assert UpscaleSettings().cuda_graphs
    assert not UpscaleSettings.from_mapping({"cuda_graphs": False}).cuda_graphs


def test_a_dispatch_mode_is_seen_as_watching_the_ops() -> None:
    """Under ``FlopCounterMode`` the wrapper is told to run eagerly (a replay runs no ops to
    count; that it does is tested on the GPU, tests/gpu/test_cuda_graphs.py)."""
    from torch.utils.flop_counter import FlopCounterMode

    from tileup.sampling.graphs import dispatch_mode_active

    assert not dispatch_mode_active()
    with FlopCounterMode(display=False):
        assert dispatch_mode_active()
    assert not dispatch_mode_active()

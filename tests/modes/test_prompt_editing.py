"""A1111 prompt editing and alternation: the conditioning changes at the scheduled steps, in the
fused and the redraw modes, for first- and second-order samplers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sd_fixtures import make_tiny_components, make_tokenizers

from tileup.modes.fused import FusedOptions, sample_fused
from tileup.modes.model import DiffusionModel, DiffusionReport, SamplingOptions
from tileup.modes.redraw import redraw_grid, redraw_regions
from tileup.modes.regions import tile_regions
from tileup.sampling.conditioning import Conditioning, encode_prompts, encode_schedule
from tileup.vae.runner import VaeOptions, VaeRunner

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny() -> dict:
    return make_tiny_components("sd1", seed=0)


def test_schedule_encodes_each_edit_once(tiny) -> None:
    sd = SimpleNamespace(
        family="sd1",
        text_encoders=(tiny["text_encoder"],),
        tokenizers=tuple(make_tokenizers("sd1").values()),
    )
    run = dict(device=CPU, dtype=torch.float32)
    edited = encode_schedule(sd, "a [cat:dog:2] x", "", 6, **run)
    assert [last for last, _ in edited] == [2, 6]
    for (_, got), text in zip(edited, ["a cat x", "a dog x"], strict=True):
        assert torch.equal(got.cond, encode_prompts(sd, text, "", **run).cond)
    alternating = encode_schedule(sd, "[cat|dog] x", "[ugly|]", 4, **run)
    assert [last for last, _ in alternating] == [1, 2, 3, 4]
    assert alternating[0][1] is alternating[2][1] and alternating[1][1] is alternating[3][1]
    plain = encode_schedule(sd, "a (cat:1.2)", "blurry", 6, **run)
    assert len(plain) == 1 and plain[0][0] == 6


class RecordingUNet(torch.nn.Module):
    """Predicts zero; records the text state each call saw (each conditioning is a constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[float] = []

    def forward(self, sample, t, encoder_hidden_states=None, added_cond_kwargs=None, **kw):
        self.seen.append(float(encoder_hidden_states.flatten()[0]))
        return (torch.zeros_like(sample),)


def _constant(value: float) -> Conditioning:
    return Conditioning(cond=torch.full((1, 77, 8), value), uncond=torch.full((1, 77, 8), value))


def _model(tiny: dict, sampler: str, steps: int) -> tuple[DiffusionModel, RecordingUNet]:
    unet = RecordingUNet()
    first, second = _constant(1.0), _constant(2.0)
    model = DiffusionModel(
        unet=unet,
        vae=VaeRunner(tiny["vae"], CPU, torch.float32, VaeOptions(512, 1, "cpu")),
        conditioning=first,
        sampling=SamplingOptions(sampler, "normal", steps, 1.0),
        scheduler_config=dict(tiny["scheduler"].config),
        device=CPU,
        dtype=torch.float32,
        schedule=((1, first), (steps, second)),  # "[a:b:1]": steps 0 and 1, then the rest
    )
    return model, unet


@pytest.mark.parametrize(
    ("sampler", "expected"), [("Euler", [1, 1, 2, 2]), ("Heun", [1] * 4 + [2] * 3)]
)
def test_fused_calls_follow_the_prompt_schedule(tiny, sampler: str, expected: list) -> None:
    model, unet = _model(tiny, sampler, steps=4)
    latents = torch.zeros(1, 4, 8, 8)
    options = FusedOptions(tile=64, overlap=16, blend="gaussian", tile_batch=4)
    sample_fused(model, latents, seed=1, denoise=1.0, options=options, report=DiffusionReport())
    assert unet.seen == expected  # Heun: two calls a step, one on the last


def test_redraw_calls_follow_the_prompt_schedule(tiny) -> None:
    model, unet = _model(tiny, "Euler", steps=3)
    canvas = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    regions = tile_regions(redraw_grid(64, 64, 64, 8, "linear"))
    redraw_regions(model, canvas, regions, denoise=1.0, padding=0, mask_blur=0, seed=2)
    assert unet.seen == [1, 1, 2]

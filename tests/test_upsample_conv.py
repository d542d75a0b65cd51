"""Nearest ×2 + 3×3 conv as one 2×2 conv of four phases (tileup.upsample_conv)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tileup import upsample_conv
from tileup.upsample_conv import folded_weight, phase_conv, swap_upsamplers


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)


@pytest.fixture
def tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, 9, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 5, 3, 3, generator=gen, dtype=torch.float64)
    return x, w, torch.randn(6, generator=gen, dtype=torch.float64)


def test_the_phases_give_upsample_then_conv(tensors) -> None:
    x, w, b = tensors
    got = phase_conv(x, w, b, padding=1)
    assert got.shape == (2, 6, 14, 18)
    torch.testing.assert_close(got, _reference(x, w, b), rtol=0, atol=1e-12)
    torch.testing.assert_close(phase_conv(x, w, None, padding=1), _reference(x, w, None))


def test_unpadded_phases_give_the_tiled_vaes_crop(tensors) -> None:
    """A crop with a one-pixel halo: the unpadded conv of its upsampling, less one upsampled
    pixel a side: the core's 2× upsampled conv, as the padded conv of the whole gives it."""
    x, w, b = tensors
    crop = x[:, :, 1:6, 2:8]  # a 3×4 core with its halo
    expected = _reference(x, w, b)[:, :, 4:10, 6:14]
    got = phase_conv(crop, w, b, padding=0)
    assert got.shape == (2, 6, 6, 8)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_the_folded_taps_sum_the_rows_and_columns_that_meet() -> None:
    w = torch.arange(9.0).view(1, 1, 3, 3)  # rows [0 1 2] [3 4 5] [6 7 8]
    folded = folded_weight(w)[:, 0]
    assert folded.shape == (4, 2, 2)
    assert folded[0].tolist() == [[0.0, 3.0], [9.0, 24.0]]  # dy 0: [K0, K1 + K2], dx 0 alike
    assert folded[3].tolist() == [[8.0, 7.0], [13.0, 8.0]]  # dy 1: [K0 + K1, K2], dx 1 alike
    assert folded.sum().item() == 4 * w.sum().item()  # every tap lands once in each phase


def test_a_channels_last_input_gives_a_channels_last_output(tensors) -> None:
    x, w, b = (t.float() for t in tensors)
    got = phase_conv(x.contiguous(memory_format=torch.channels_last), w, b, padding=1)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, _reference(x, w, b), rtol=1e-5, atol=1e-5)


def test_swapped_upsamplers_give_diffusers_output_and_keep_their_weights() -> None:
    from diffusers.models.upsampling import Upsample2D

    x = torch.randn(2, 5, 16, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.manual_seed(0)
    plain = Upsample2D(5, use_conv=True, out_channels=6)
    model = nn.Sequential(plain, Upsample2D(6, use_conv=False), Upsample2D(6, use_conv=True))
    model = model.double()
    expected, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    odd, small = plain(x, output_size=(33, 41)), plain(x[:, :, :8, :8])
    assert swap_upsamplers(model) == 2  # the conv-less one has nothing to fold
    assert type(model[0]).__name__ == "PhaseUpsample2D" and type(model[1]) is Upsample2D
    assert isinstance(model[0], Upsample2D)
    got = model(x)
    assert not torch.equal(got, expected)  # another summation: the phase form ran
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(plain(x, output_size=(32, 40)), model[0](x))
    assert torch.equal(plain(x, output_size=(33, 41)), odd)  # not a doubling: diffusers' path
    assert torch.equal(plain(x[:, :, :8, :8]), small)  # under MIN_PIXELS: diffusers' path
    assert swap_upsamplers(model) == 0  # already swapped


def test_only_a_plain_3x3_conv_folds() -> None:
    assert upsample_conv.plain_3x3(nn.Conv2d(4, 4, 3, padding=1))
    assert not upsample_conv.plain_3x3(nn.Conv2d(4, 4, 3, padding=1, stride=2))
    assert not upsample_conv.plain_3x3(nn.Conv2d(4, 4, 3, padding=1, groups=2))
    assert not upsample_conv.plain_3x3(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert not upsample_conv.plain_3x3(nn.Conv2d(4, 4, 1))


def test_the_setting_turns_it_off(monkeypatch) -> None:
    assert upsample_conv.enabled()
    monkeypatch.setenv("TILEUP_PHASE_UPSAMPLE", "off")
    assert not upsample_conv.enabled()


@pytest.mark.parametrize("padding", [0, 1])
def test_the_traced_interleaving_is_the_eager_one(tensors, padding: int, monkeypatch) -> None:
    """Under torch.compile the phases interleave by one stack and reshape (traced by dynamo
    with the eager backend: no compiler needed), to the same values as the eager copies."""
    x, w, b = tensors
    traced_forms: list[int] = []
    interleaved = upsample_conv._interleaved

    def spy(*args):
        traced_forms.append(1)
        return interleaved(*args)

    monkeypatch.setattr(upsample_conv, "_interleaved", spy)
    x = x.contiguous(memory_format=torch.channels_last)
    traced = torch.compile(
        lambda t: phase_conv(t, w, b, padding=padding), backend="eager", fullgraph=True
    )
    torch._dynamo.reset()
    got = traced(x)
    assert traced_forms == [1]  # traced once; the eager call below takes the copies
    torch.testing.assert_close(got, phase_conv(x, w, b, padding=padding), rtol=0, atol=0)
    assert traced_forms == [1]

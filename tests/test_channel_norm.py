"""GroupNorm from per-channel statistics for the compiled crop VAE and UNet (channel_norm)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sd_fixtures import make_tiny_components
from torch import nn

from tileup import channel_norm
from tileup.channel_norm import ChannelGroupNorm, swap_group_norms, with_group_norms
from tileup.sampling import compiled as compiled_module


def _norm(channels: int, groups: int) -> ChannelGroupNorm:
    gen = torch.Generator().manual_seed(channels)
    norm = ChannelGroupNorm(groups, channels, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=gen))
        norm.bias.copy_(torch.randn(channels, generator=gen))
    return norm


def _exact(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(
        x.double(), norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_it_is_group_norm_within_float32_rounding(channels_last: bool) -> None:
    """Two images whose groups sit far from zero and whose channels within a group differ in
    mean (the merge's between-channel term carries the variance)."""
    gen = torch.Generator().manual_seed(0)
    offsets = torch.linspace(-30, 30, 64)[:, None, None]
    x = torch.randn(2, 64, 19, 23, generator=gen) * 3 + offsets
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    norm = _norm(64, 16)
    with torch.no_grad():
        out = norm(x)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(out.double(), _exact(norm, x), rtol=0, atol=2e-5)


def test_bfloat16_input_gives_its_group_norm_rounded_once() -> None:
    x = torch.randn(1, 32, 12, 12, generator=torch.Generator().manual_seed(1)).bfloat16()
    norm = _norm(32, 8)
    with torch.no_grad():
        out = norm(x)
    assert out.dtype == torch.bfloat16
    # one rounding to bfloat16 of values below 8 in magnitude: at most 2^-5 off
    assert (out.double() - _exact(norm, x)).abs().max().item() <= 2**-5


def test_without_affine_it_is_pytorchs_group_norm() -> None:
    norm = ChannelGroupNorm(4, 16, affine=False)
    x = torch.randn(1, 16, 5, 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(norm(x), F.group_norm(x, 4, eps=norm.eps))


def test_the_copy_shares_weights_and_swaps_only_group_norms() -> None:
    block = nn.Sequential(nn.Conv2d(3, 16, 3), _plain(16, 4), nn.SiLU())
    copy = with_group_norms(block)
    assert type(block[1]) is nn.GroupNorm and type(copy[1]) is ChannelGroupNorm
    assert copy[1].weight is block[1].weight and copy[0].weight is block[0].weight
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(copy(x), block(x), rtol=0, atol=1e-5)


def _plain(channels: int, groups: int) -> nn.GroupNorm:
    norm = nn.GroupNorm(groups, channels)
    norm.load_state_dict(_norm(channels, groups).state_dict())
    return norm


def test_the_crop_vae_and_the_unet_take_it_unless_told(monkeypatch) -> None:
    monkeypatch.delenv("TILEUP_CROP_NORM", raising=False)
    monkeypatch.delenv("TILEUP_UNET_NORM", raising=False)
    assert channel_norm.for_crop_vae() and channel_norm.for_unet()
    monkeypatch.setenv("TILEUP_CROP_NORM", "inductor")
    monkeypatch.setenv("TILEUP_UNET_NORM", "inductor")
    assert not channel_norm.for_crop_vae() and not channel_norm.for_unet()


def test_the_swap_in_place_keeps_parameters_and_hooks() -> None:
    block = nn.Sequential(nn.Conv2d(3, 16, 3), _plain(16, 4))
    weight = block[1].weight
    seen: list[int] = []
    block[1].register_forward_hook(lambda *_: seen.append(1))
    x = torch.randn(1, 3, 9, 9, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = block(x)
        swap_group_norms(block)
        after = block(x)
    assert type(block[1]) is ChannelGroupNorm and block[1].weight is weight and seen == [1, 1]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_a_compiled_unet_takes_it(monkeypatch, tmp_path) -> None:
    """The compiled UNet's GroupNorms become ChannelGroupNorm (in place), its predictions the
    plain UNet's within float32 rounding; uncompiled, untouched."""
    from tileup.modes.model import _runnable

    monkeypatch.setattr(compiled_module, "BACKEND", "eager")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.delenv("TILEUP_UNET_NORM", raising=False)
    unet = make_tiny_components("sd1", seed=0)["unet"].eval()
    plain = copy.deepcopy(unet)
    assert _runnable(plain, compiled=False, dynamic_batch=False, graphed=False) is plain
    assert not any(isinstance(m, ChannelGroupNorm) for m in plain.modules())
    gen = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, 32, generator=gen)
    torch._dynamo.reset()
    try:
        compiled = _runnable(unet, compiled=True, dynamic_batch=True, graphed=False)
        norms = [m for m in unet.modules() if isinstance(m, nn.GroupNorm)]
        assert norms and all(type(m) is ChannelGroupNorm for m in norms)
        with torch.inference_mode():
            out = compiled(sample, torch.tensor(500.0), encoder_hidden_states=context)[0]
            ref = plain(sample, torch.tensor(500.0), encoder_hidden_states=context)[0]
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    finally:
        torch._dynamo.reset()

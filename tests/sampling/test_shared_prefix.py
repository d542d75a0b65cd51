"""Guidance pairs share the UNet's first layers (tileup.sampling.shared_prefix), on tiny
random UNets of each family."""

from __future__ import annotations

import copy

import pytest
import torch
from sd_fixtures import make_tiny_components

from tileup.sampling import shared_prefix
from tileup.sampling.conditioning import Conditioning
from tileup.sampling.guidance import guidance_inputs, guided_prediction


def _unet(family: str, seed: int = 0) -> torch.nn.Module:
    return make_tiny_components(family, seed=seed)["unet"].eval()


def _counted(layer: torch.nn.Module) -> list[int]:
    """Batch sizes the layer was called with."""
    seen: list[int] = []
    layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    return seen


def _context(unet: torch.nn.Module, k: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    dim = unet.config.cross_attention_dim
    uncond, cond = (torch.randn(1, 77, dim, generator=gen) for _ in range(2))
    return torch.cat([uncond.expand(k, -1, -1), cond.expand(k, -1, -1)])


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a_paired_call_equals_the_plain_call_on_the_doubled_batch(family: str) -> None:
    plain, paired = _unet(family), _unet(family)
    assert shared_prefix.install(paired) and shared_prefix.pairs_guidance(paired)
    k = 3
    x = torch.randn(k, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    context = _context(plain, k)
    t = torch.tensor(500)
    resnet_batches = _counted(paired.down_blocks[0].resnets[0].conv1)
    first_block = paired.down_blocks[0].attentions[0].transformer_blocks[0]
    attn_batches = _counted(first_block.attn1.to_out[0])
    cross_batches = _counted(first_block.attn2.to_out[0])
    with torch.no_grad():
        want = plain(torch.cat([x, x]), t, encoder_hidden_states=context, return_dict=False)[0]
        got = paired(x, t, encoder_hidden_states=context, return_dict=False)[0]
    assert got.shape == (2 * k, 4, 16, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the shared layers' insides ran on one half; the cross-attention on all of it
    assert resnet_batches == [k] and attn_batches == [k] and cross_batches == [2 * k]
    assert not paired._tileup_pairing.active


def test_an_unpaired_call_runs_every_sample_through_every_layer() -> None:
    unet = _unet("sd1")
    shared_prefix.install(unet)
    plain = _unet("sd1")
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    context = _context(unet, 1)  # two different states for two different latents
    batches = _counted(unet.down_blocks[0].resnets[0].conv1)
    with torch.no_grad():
        got = unet(x, 10, encoder_hidden_states=context, return_dict=False)[0]
        want = plain(x, 10, encoder_hidden_states=context, return_dict=False)[0]
    assert batches == [2]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_guided_prediction_is_the_same_with_and_without_sharing() -> None:
    shared, plain = _unet("sd1"), _unet("sd1")
    shared_prefix.install(shared)
    gen = torch.Generator().manual_seed(4)
    dim = plain.config.cross_attention_dim
    conditioning = Conditioning(
        cond=torch.randn(1, 77, dim, generator=gen), uncond=torch.zeros(1, 77, dim)
    )
    x = torch.randn(2, 4, 16, 16, generator=gen)
    inputs = guidance_inputs(conditioning, 7.0, 2)
    with torch.no_grad():
        got = guided_prediction(shared, x, torch.tensor(300), inputs, 7.0)
        want = guided_prediction(plain, x, torch.tensor(300), inputs, 7.0)
    # kernel rounding of a half batch against a whole one (float32), scaled by cfg 7
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sdxl_and_switched_off_unets_keep_the_plain_call(monkeypatch: pytest.MonkeyPatch) -> None:
    sdxl = _unet("sdxl")
    assert not shared_prefix.supports(sdxl)  # pooled text embeds enter the time embedding
    assert not shared_prefix.install(sdxl) and not shared_prefix.pairs_guidance(sdxl)
    monkeypatch.setenv("TILEUP_CFG_PREFIX", "off")
    sd1 = _unet("sd1")
    assert shared_prefix.supports(sd1) and not shared_prefix.install(sd1)
    assert "forward" not in vars(sd1)


def test_a_deep_copy_shares_its_own_layers() -> None:
    unet = _unet("sd1")
    shared_prefix.install(unet)
    twin = copy.deepcopy(unet)
    assert twin.forward.__self__ is twin
    resnet = twin.down_blocks[0].resnets[0]
    assert resnet.forward.__self__ is resnet
    assert resnet._tileup_pairing is twin._tileup_pairing is not unet._tileup_pairing
    x = torch.randn(1, 4, 16, 16)
    context = _context(unet, 1)
    with torch.no_grad():
        a = unet(x, 5, encoder_hidden_states=context, return_dict=False)[0]
        b = twin(x, 5, encoder_hidden_states=context, return_dict=False)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_call_that_raised_does_not_leave_the_next_call_sharing() -> None:
    unet = _unet("sd1")
    shared_prefix.install(unet)
    context = _context(unet, 1)
    with pytest.raises(RuntimeError), torch.no_grad():  # the wrong latent channels
        unet(torch.randn(1, 3, 16, 16), 5, encoder_hidden_states=context, return_dict=False)
    assert unet._tileup_pairing.active  # what the failed call left behind
    x = torch.randn(2, 4, 16, 16)
    batches = _counted(unet.down_blocks[0].resnets[0].conv1)
    with torch.no_grad():
        unet(x, 5, encoder_hidden_states=context, return_dict=False)
    assert batches == [2]


def test_a_streamed_unet_shares_its_first_layers_too() -> None:
    """--low-vram streams the UNet block by block (StreamedBlocks' hooks on the blocks): the
    shared resnet sits inside the first block, which its hook loads first."""
    from tileup.devices import StreamedBlocks

    unet, plain = _unet("sd1"), _unet("sd1")
    shared_prefix.install(unet)
    blocks = [*unet.down_blocks, *unet.up_blocks, unet.mid_block]
    loaded: list[str] = []
    unet.down_blocks[0].register_forward_pre_hook(lambda _m, _a: loaded.append("block"))
    streamed = StreamedBlocks(unet, blocks, torch.device("cpu"))
    batches = _counted(unet.down_blocks[0].resnets[0].conv1)
    k = 2
    x = torch.randn(k, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    context = _context(unet, k)
    with torch.no_grad():
        got = unet(x, 50, encoder_hidden_states=context, return_dict=False)[0]
        want = plain(torch.cat([x, x]), 50, encoder_hidden_states=context, return_dict=False)[0]
    streamed.remove()
    assert loaded == ["block"] and batches == [k]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

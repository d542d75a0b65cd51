"""The memory plan (pure arithmetic), and the out-of-memory fallbacks that halve a batch."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tileup.devices import StreamedBlocks
from tileup.memory import (
    GIB,
    MIB,
    RESERVE_BYTES,
    JobShape,
    MemoryBudgetError,
    ModelSizes,
    graphs_may_stay,
    plan_memory,
    vae_fixed_bytes,
    vae_scores_bytes,
    vae_tile_bytes,
)
from tileup.modes.fused import FusedDenoiser
from tileup.sampling.conditioning import Conditioning
from tileup.tiler import plan_grid

SD15 = ModelSizes(unet=int(1.72 * GIB), vae=int(0.5 * GIB), unet_block=int(0.25 * GIB), sr=70 * MIB)
SDXL = ModelSizes(unet=int(5.14 * GIB), vae=int(0.5 * GIB), unet_block=int(0.6 * GIB), sr=70 * MIB)
K4 = JobShape(4096, 4096, 512, True, 512, 81)
K8 = JobShape(8192, 8192, 512, True, 512, 361)


def test_a_big_card_keeps_everything_on_the_device() -> None:
    plan = plan_memory(139 * GIB, SD15, K4, low_vram=False)
    assert not plan.swap_unet and not plan.offload_unet
    assert plan.unet_batch == 32 and plan.vae_batch == 8
    assert plan.vae_store_bytes > 16 * GIB  # the whole 4K decode store fits
    assert plan.as_dict()["unet"] == "device"


def test_graphs_stay_beside_the_vae_only_with_room_in_the_budget_and_the_device() -> None:
    """A whole H200 keeps the UNet's CUDA graphs through the VAE stages (the next job replays
    them); a card that needs their memory for the VAE frees them."""
    big = plan_memory(139 * GIB, SD15, K4, low_vram=False)
    store = 4096 * 4096 * 512 * 2  # the 4K decode's canvases in bf16, about 16 GiB
    assert store < big.vae_work_bytes < store + 8 * GIB
    need = big.vae_work_bytes + 2 * GIB
    assert graphs_may_stay(big, reserved=34 * GIB, free=104 * GIB)  # measured after diffusion
    assert not graphs_may_stay(big, reserved=big.budget_bytes - need + 1, free=104 * GIB)
    assert not graphs_may_stay(big, reserved=34 * GIB, free=need - 1)
    for gib in (4, 8, 24):
        plan = plan_memory(gib * GIB, SD15, K4, low_vram=False)
        assert plan.vae_work_bytes <= gib * GIB
        assert not graphs_may_stay(plan, reserved=plan.budget_bytes // 2, free=gib * GIB // 2)


@pytest.mark.parametrize("gib", [4, 6, 8, 12, 24])
def test_every_card_from_4_to_24_gib_gets_a_plan_inside_its_budget(gib: int) -> None:
    for shape in (K4, JobShape(4096, 4096, 512, True, 512, 64, redraw=True)):
        plan = plan_memory(gib * GIB, SD15, shape, low_vram=False)
        assert plan.minimum_bytes <= plan.budget_bytes == gib * GIB
        assert 1 <= plan.unet_batch <= shape.tiles and 1 <= plan.vae_batch <= 8
        # what the plan keeps on the device at once stays inside the budget
        unet = 0 if plan.swap_unet else SD15.unet
        assert unet + SD15.vae + plan.vae_store_bytes <= plan.budget_bytes


def test_small_cards_park_the_unet_and_tiny_ones_stream_it() -> None:
    assert plan_memory(8 * GIB, SD15, K4, low_vram=False).swap_unet  # 4K store is 16 GiB
    streamed = plan_memory(int(2.5 * GIB), SD15, K4, low_vram=False)
    assert streamed.offload_unet and streamed.as_dict()["unet"] == "streamed"
    assert plan_memory(8 * GIB, SDXL, K4, low_vram=False).offload_unet is False
    assert plan_memory(5 * GIB, SDXL, K4, low_vram=False).offload_unet


def test_too_small_a_budget_names_the_smallest_that_works() -> None:
    with pytest.raises(MemoryBudgetError, match=r"at least 1\.50 GiB \(--vram\)"):
        plan_memory(1 * GIB, SD15, K4, low_vram=False)
    minimum = plan_memory(8 * GIB, SD15, K4, low_vram=False).minimum_bytes
    plan_memory(minimum, SD15, K4, low_vram=False)  # the minimum itself works
    print8k = plan_memory(16 * GIB, SD15, K8, low_vram=False)
    # the VAE's global attention grows with the canvas, but may wait on the host
    assert print8k.minimum_bytes == minimum
    plan_memory(minimum, SD15, K8, low_vram=False)


def test_the_vae_attention_waits_on_the_host_only_where_it_cannot_fit() -> None:
    """Q, K and V (3 GiB at 8192², 0.75 GiB at 4096²) stay on the device wherever the VAE with
    one tile holds them; else they wait on the host and the VAE's room on the device no longer
    counts them."""
    for gib, shape in ((8, K4), (2.5, K4), (8, K8), (5, K8)):
        plan = plan_memory(int(gib * GIB), SD15, shape, low_vram=False)
        assert not plan.vae_attention_on_host and plan.as_dict()["vae_attention_on_host"] is False
    for gib, shape in ((2, K4), (4, K8), (2, K8)):
        plan = plan_memory(int(gib * GIB), SD15, shape, low_vram=False)
        assert plan.vae_attention_on_host
        room = plan.budget_bytes - RESERVE_BYTES - SD15.vae
        assert vae_fixed_bytes(shape) + vae_tile_bytes(shape) > room  # they could not fit
        assert plan.vae_work_bytes <= room  # one tile batch and the store do
    assert plan_memory(2 * GIB, SD15, K8, low_vram=True).vae_attention_on_host
    assert not plan_memory(80 * GIB, SD15, K8, low_vram=True).vae_attention_on_host


def test_the_vae_attentions_chunk_of_scores_takes_the_tile_batchs_room() -> None:
    """While the attention runs no tile batch is on the device: its chunk of scores may take
    that room (at least the plan's smallest chunk), and no more (under --low-vram, one tile:
    504 MiB at a 512 px VAE tile, not the 768 MiB the attention would take on a big card)."""
    for gib, shape in ((8, K4), (8, K8), (4, K4), (139, K4)):
        plan = plan_memory(gib * GIB, SD15, shape, low_vram=False)
        assert plan.vae_scores_bytes == max(
            plan.vae_batch * vae_tile_bytes(shape), vae_scores_bytes(shape)
        )
        assert plan.as_dict()["vae_scores_gib"] == round(plan.vae_scores_bytes / GIB, 2)
    smallest = plan_memory(80 * GIB, SD15, K4, low_vram=True)
    assert smallest.vae_scores_bytes == vae_tile_bytes(K4) == 514**2 * 2000


def test_low_vram_is_the_smallest_plan_whatever_the_budget() -> None:
    """The tiled VAE with one tile and no store sets the job's peak; the UNet (streamed), the
    redraw crops and the SR tile take up to that much, not less (4K: 7 tiles a UNet batch with
    these sizes, 1.5 GiB of SR tile, against 1 tile and 64 MiB before)."""
    plan = plan_memory(80 * GIB, SD15, K4, low_vram=True)
    assert plan.offload_unet and plan.swap_unet
    assert (plan.vae_batch, plan.vae_store_bytes) == (1, 0)
    eight = plan_memory(8 * GIB, SD15, K4, low_vram=True)
    assert replace(eight, budget_bytes=plan.budget_bytes) == plan
    vae_stage = SD15.vae + vae_fixed_bytes(K4) + vae_tile_bytes(K4)
    unet_tile = 2 * 96 * MIB  # guided: two samples of a 64² latent
    assert plan.unet_batch == (vae_stage - SD15.unet_block) // unet_tile == 7
    assert SD15.unet_block + plan.unet_batch * unet_tile <= vae_stage
    assert plan.sr_bytes == 3 * GIB // 2 and SD15.sr + plan.sr_bytes <= vae_stage
    redraw = plan_memory(80 * GIB, SD15, replace(K4, redraw=True), low_vram=True)
    assert redraw.redraw_batch == 1  # a 576² crop's VAE pass alone takes ~1.25 GiB
    # where the attention's buffers wait on the host the VAE stage is smaller, and so is all
    small = plan_memory(2 * GIB, SD15, K8, low_vram=True)
    assert small.vae_attention_on_host and small.unet_batch < plan.unet_batch


# -- out-of-memory fallbacks ---------------------------------------------------------------


class LimitedUNet(torch.nn.Module):
    """Predicts a per-sample constant; raises CUDA's out-of-memory error above ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.limit, self.batches = limit, []

    def forward(self, sample, t, encoder_hidden_states=None, added_cond_kwargs=None, **_):
        self.batches.append(sample.shape[0])
        if sample.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return (sample * 0.5 + sample.mean(dim=(1, 2, 3), keepdim=True),)


def test_fused_denoiser_halves_its_batch_on_out_of_memory() -> None:
    grid = plan_grid(40, 56, 16, 4)
    cond = Conditioning(cond=torch.zeros(1, 77, 8), uncond=torch.zeros(1, 77, 8))
    latents = torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(0))
    reference = FusedDenoiser(LimitedUNet(99), grid, cond, cfg=1.0, tile_batch=1)
    unet = LimitedUNet(3)
    limited = FusedDenoiser(unet, grid, cond, cfg=1.0, tile_batch=len(grid))
    out = limited(latents, torch.tensor(5))
    assert torch.equal(out, reference(latents, torch.tensor(5)))
    # 15 tiles: a batch of 15 fails, then at most 7 (even: 5, 5, 5) fail; 3 fit (halved twice)
    assert limited.tile_batch == 3 and unet.batches[:2] == [15, 5]
    assert limited.notes == [
        "UNet out of memory: 7 tiles per batch",
        "UNet out of memory: 3 tiles per batch",
    ]
    assert limited.counter.calls == 1 and limited.counter.tile_evaluations == len(grid)


def test_streamed_blocks_give_the_same_output_and_can_be_removed() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    expected = net(x)
    streamed = StreamedBlocks(net, [net[0], net[2]], torch.device("cpu"))
    assert torch.equal(net(x), expected)
    streamed.remove()
    assert torch.equal(net(x), expected) and not net[0]._forward_pre_hooks


def test_an_image_laid_out_hwc_is_viewed_and_another_copied() -> None:
    from tileup.devices import hwc_view

    chw = torch.arange(24.0).reshape(3, 2, 4)
    copied = hwc_view(chw)
    assert torch.equal(copied, chw.permute(1, 2, 0)) and copied.is_contiguous()
    assert copied.data_ptr() != chw.data_ptr()
    channels_last = chw[None].contiguous(memory_format=torch.channels_last)[0]
    viewed = hwc_view(channels_last)
    assert torch.equal(viewed, copied) and viewed.data_ptr() == channels_last.data_ptr()


def test_budgets_of_small_cards_get_expandable_allocator_segments(monkeypatch) -> None:
    from tileup import devices

    calls: list[str] = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append)
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    assert devices.cuda_allocator_for(8 * GIB) == "expandable segments"
    assert calls == ["expandable_segments:True"]
    assert devices.cuda_allocator_for(devices.EXPANDABLE_BELOW) == "PyTorch's default"
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):  # the user's word stands
        monkeypatch.setenv(name, "max_split_size_mb:512")
        assert devices.cuda_allocator_for(4 * GIB) == "set by the environment"
        monkeypatch.delenv(name)
    assert calls == ["expandable_segments:True"]

    def refused(setting: str) -> None:
        raise RuntimeError("expandable segments are not supported on this platform")

    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", refused)
    assert devices.cuda_allocator_for(4 * GIB) == "PyTorch's default"
    monkeypatch.delattr(torch._C, "_accelerator_setAllocatorSettings")  # PyTorch before 2.9
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    assert devices.cuda_allocator_for(4 * GIB) == "expandable segments"
    assert calls == ["expandable_segments:True"] * 2

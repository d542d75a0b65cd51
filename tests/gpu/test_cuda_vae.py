"""The tiled VAE's CUDA paths, on a real GPU (skipped without one; run on the GPU machine).

CUDA-only code: channels-last canvases and tile batches, the inference batch-norm affine in half
precision, float32 attention scores from half inputs (``torch.mm(out_dtype=)``), the host store's
pinned staging and its relayout on the device. The VAE is a seeded random AutoencoderKL with
the SD layout at reduced widths (diffusers only: no text encoder needed on that machine).
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from tileup.vae import attention, dma, engine, transfer
from tileup.vae import tiled as tv
from tileup.vae.engine import StagedEngine, vae_grid
from tileup.vae.tiled import tiled_decode, tiled_encode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(64, 128, 128, 128),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    )
    return model.to("cuda").eval()


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 40, 48, generator=gen).cuda()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """A smooth random picture, 1×3×320×384 in [-1, 1]."""
    gen = torch.Generator().manual_seed(2)
    coarse = torch.rand(1, 3, 10, 12, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(320, 384), mode="bicubic").cuda()


@pytest.fixture(autouse=True)
def _no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_fp32_tiled_equals_untiled_on_cuda(vae, latents, image) -> None:
    with torch.inference_mode():
        decoded = vae.decode(latents).sample.clamp(-1, 1).cpu()
        encoded = vae.encode(image).latent_dist.mean.cpu()
    out = tiled_decode(vae, latents, tile=16, batch=4, store="device")
    assert (out - decoded).abs().max().item() < 2e-4
    z = tiled_encode(vae, image, tile=128, batch=4, store="device")
    assert (z - encoded).abs().max().item() < 2e-4


def test_bf16_tiled_is_as_close_to_fp32_as_untiled_bf16(vae, latents, image) -> None:
    half = copy.deepcopy(vae).to(torch.bfloat16)
    with torch.inference_mode():
        untiled_dec = half.decode(latents.bfloat16()).sample.float().clamp(-1, 1).cpu()
        untiled_enc = half.encode(image.bfloat16()).latent_dist.mean.float().cpu()
    with torch.inference_mode():
        truth_dec = vae.decode(latents).sample.clamp(-1, 1).cpu()
        truth_enc = vae.encode(image).latent_dist.mean.cpu()
    dec = tiled_decode(vae, latents, tile=16, batch=4, dtype=torch.bfloat16, store="device")
    enc = tiled_encode(vae, image, tile=128, batch=4, dtype=torch.bfloat16, store="device")
    for out, untiled, truth in ((dec, untiled_dec, truth_dec), (enc, untiled_enc, truth_enc)):
        err = (out - truth).abs().mean().item()
        assert err <= 1.5 * (untiled - truth).abs().mean().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_store_gives_the_device_store_bytes(vae, latents, image, dtype, vae_recompute) -> None:
    vae_recompute(False)  # the same convs on the same crops: only the staging differs
    kw = {"batch": 3, "dtype": dtype}
    on_device = tiled_decode(vae, latents, tile=16, store="device", **kw)
    assert torch.equal(tiled_decode(vae, latents, tile=16, store="cpu", **kw), on_device)
    # a memory plan's cap of 0 bytes: every canvas on the host, pinned staging both ways
    capped = tiled_decode(vae, latents, tile=16, store="device", store_limit=0, **kw)
    assert torch.equal(capped, on_device)
    z = tiled_encode(vae, image, tile=128, store="device", **kw)
    assert torch.equal(tiled_encode(vae, image, tile=128, store="cpu", **kw), z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_crops_from_the_host_on_a_side_stream_give_the_same_bytes(
    vae, latents, image, dtype, vae_recompute, monkeypatch
) -> None:
    """Every canvas on the host (a cap of 0 bytes): the crops' copies on the side stream give
    the bytes of copies on the compute stream, however far the host runs ahead of the GPU."""
    vae_recompute(False, chain=False)  # every canvas stored on the host, none recomputed
    kw = {"batch": 3, "dtype": dtype, "store": "device", "store_limit": 0}
    monkeypatch.setenv("TILEUP_VAE_DMA", "off")  # host canvases pageable, crops by the host
    monkeypatch.setenv("TILEUP_VAE_SIDE_COPIES", "off")
    transfer._SIDE.clear()
    expected_dec = tiled_decode(vae, latents, tile=16, **kw)
    expected_enc = tiled_encode(vae, image, tile=128, **kw)
    assert not transfer._SIDE
    monkeypatch.setenv("TILEUP_VAE_SIDE_COPIES", "on")
    torch.cuda._sleep(1 << 28)  # the GPU busy a while: the host queues many batches ahead
    assert torch.equal(tiled_decode(vae, latents, tile=16, **kw), expected_dec)
    assert torch.equal(tiled_encode(vae, image, tile=128, **kw), expected_enc)
    assert torch.cuda.current_device() in transfer._SIDE  # the crops went that way


def test_dma_moves_crops_between_a_pinned_canvas_and_the_gpu(monkeypatch) -> None:
    """Crops (edge ones short of the batch's size) up into a batch and results down into a
    canvas, by cudaMemcpy2DAsync on the side streams, give plain slicing's bytes."""
    monkeypatch.setenv("TILEUP_VAE_DMA", "on")
    assert dma.allowed()
    gen = torch.Generator().manual_seed(5)
    canvas = torch.empty(70, 90, 48, dtype=torch.bfloat16, pin_memory=True).permute(2, 0, 1)
    canvas.copy_(torch.randn(48, 70, 90, generator=gen))
    assert canvas.is_pinned() and dma.rows_layout(canvas)
    boxes = [((0, 20, 0, 24), (0, 20, 0, 24)), ((50, 70, 66, 90), (0, 20, 0, 24))]
    boxes.append(((60, 70, 80, 90), (5, 15, 4, 14)))
    held = dma.InFlight()
    torch.cuda._sleep(1 << 26)  # the compute stream busy: the copies must still be ordered
    batch = dma.upload(canvas, boxes, (3, 48, 20, 24), torch.device("cuda"), held)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    for i, ((y0, y1, x0, x1), (v0, v1, u0, u1)) in enumerate(boxes):
        assert torch.equal(batch[i, :, v0:v1, u0:u1].cpu(), canvas[:, y0:y1, x0:x1])
    out = torch.zeros(70, 90, 48, dtype=torch.bfloat16, pin_memory=True).permute(2, 0, 1)
    results = (batch.float() * 2).to(torch.bfloat16)
    dma.download(out, results, boxes[:2], held)
    held.drain()
    expected = torch.zeros_like(canvas)
    for i, ((y0, y1, x0, x1), (v0, v1, u0, u1)) in enumerate(boxes[:2]):
        expected[:, y0:y1, x0:x1] = results[i, :, v0:v1, u0:u1].cpu()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_crops_by_dma_give_the_host_threads_bytes(
    vae, latents, image, dtype, vae_recompute, monkeypatch
) -> None:
    """Every canvas on the host (a cap of 0 bytes), pinned: crops and pastes by DMA give the
    bytes of the host thread's copies, with the GPU far behind the host."""
    vae_recompute(False, chain=False)
    kw = {"batch": 3, "dtype": dtype, "store": "device", "store_limit": 0}
    monkeypatch.setenv("TILEUP_VAE_DMA", "off")
    expected_dec = tiled_decode(vae, latents, tile=16, **kw)
    expected_enc = tiled_encode(vae, image, tile=128, **kw)
    monkeypatch.setenv("TILEUP_VAE_DMA", "on")
    calls = {"upload": 0, "download": 0}

    def counted(name):
        real = getattr(dma, name)

        def run(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return run

    for name in calls:
        monkeypatch.setattr(dma, name, counted(name))
    torch.cuda._sleep(1 << 28)
    assert torch.equal(tiled_decode(vae, latents, tile=16, **kw), expected_dec)
    assert torch.equal(tiled_encode(vae, image, tile=128, **kw), expected_enc)
    assert calls["upload"] > 0 and calls["download"] > 0


def test_a_full_pinned_pool_leaves_canvases_pageable(monkeypatch) -> None:
    monkeypatch.setenv("TILEUP_VAE_DMA", "on")
    monkeypatch.setenv("TILEUP_VAE_PINNED_GIB", "0")
    assert not dma.may_pin(1 << 20)
    monkeypatch.delenv("TILEUP_VAE_PINNED_GIB")
    assert dma.may_pin(1 << 20)


def test_phase_upsampling_leaves_the_tiled_decode_as_close(vae, latents, monkeypatch) -> None:
    """The decoder's upsamplers as 2×2 phase convs (tileup.upsample_conv, the CUDA default):
    fp32 as plain upsampling up to rounding; bf16 as close to fp32 as before."""
    with torch.inference_mode():
        truth = vae.decode(latents).sample.clamp(-1, 1).cpu()
    kw = {"tile": 16, "batch": 4, "store": "device"}
    errors = {}
    for setting in ("off", "on"):
        monkeypatch.setenv("TILEUP_PHASE_UPSAMPLE", setting)
        fp32 = tiled_decode(vae, latents, **kw)
        assert (fp32 - truth).abs().max().item() < 2e-4
        half = tiled_decode(vae, latents, dtype=torch.bfloat16, **kw)
        errors[setting] = (half - truth).abs().mean().item()
    assert errors["on"] <= 1.1 * errors["off"]


def test_canvases_and_batches_are_channels_last(vae, latents) -> None:
    grid = vae_grid(40, 48, 16)
    eng = StagedEngine(grid, torch.device("cuda"), torch.bfloat16, torch.device("cuda"), 4)
    canvas = eng.canvas(latents[0], 1)
    assert canvas.data.shape == (4, 40, 48) and canvas.data.stride()[0] == 1
    seen = []

    def fn(crops, batch):
        seen.append(crops[0].is_contiguous(memory_format=torch.channels_last))
        return crops[0][:, :, 1:-1, 1:-1] * 2

    out = eng.stage([canvas], fn, channels=4, scale=1, halo=(1, 1))
    assert seen and all(seen)
    assert out.data.stride()[0] == 1
    assert torch.equal(out.data, canvas.data * 2)
    # statistics of the owned regions: the whole canvas's channel means
    mean = (out.mean * out.count).sum(0) / out.count.sum()
    assert torch.allclose(mean.float(), out.data.float().mean((1, 2)), atol=1e-3)


def test_attention_in_bf16_is_as_close_as_the_fused_kernel() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(1, 1, 4096, 512, device="cuda", generator=gen) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    half = [t.bfloat16() for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        fused = torch.nn.functional.scaled_dot_product_attention(*half)
    mine = attention.chunked_attention(*half, budget=4096 * 512)  # 8 chunks of queries
    assert mine.dtype == torch.bfloat16
    # bf16 probabilities before the second product (as flash attention rounds them): measured
    # on an H200 8.27e-5 against the memory-efficient kernel's 7.46e-5 (outputs ~3e-2)
    fused_err = (fused.double() - ref).abs().mean().item()
    assert (mine.double() - ref).abs().mean().item() <= 1.25 * fused_err
    # written over its queries: the same values, in the queries' storage
    queries = half[0].clone()
    (over,) = attention.sdpa([(queries, half[1], half[2])], over_queries=True)
    assert over.data_ptr() == queries.data_ptr()
    assert torch.equal(over, attention.sdpa([tuple(half)])[0])


def test_batch_norm_affine_matches_the_float32_formula() -> None:
    x = torch.randn(2, 64, 33, 35, device="cuda").bfloat16()
    x = x.contiguous(memory_format=torch.channels_last)
    a = torch.rand(1, 64, 1, 1, device="cuda") + 0.5
    b = torch.randn(1, 64, 1, 1, device="cuda") * 10
    out = tv._norm_act(x, a, b, torch.nn.SiLU(), torch.bfloat16)
    affine = (x.float() * a + b).bfloat16()
    expected = torch.nn.functional.silu(affine.float()).bfloat16()
    assert out.is_contiguous(memory_format=torch.channels_last)
    # one bf16 rounding step at most (the kernel may fuse the multiply-add differently)
    assert ((out.float() - expected.float()).abs() <= expected.float().abs() / 128 + 1e-6).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("store", ["device", "cpu"])
def test_a_second_gpu_takes_a_band_of_tile_rows(vae, latents, image, store) -> None:
    """The second GPU computes the lower tile rows from its own copies of the canvases (or the
    host's): the one-GPU result up to bf16 rounding (its attention chunks and tile batches have
    other shapes), no farther from it, nor from the float32 truth, than bf16 is from float32."""
    other = [(copy.deepcopy(vae).to("cuda:1"), torch.device("cuda:1"))]
    kw = {"dtype": torch.bfloat16, "store": store}
    truth = tiled_decode(vae, latents, tile=16, store="device", batch=1)  # float32
    z_truth = tiled_encode(vae, image, tile=128, store="device", batch=1)
    for batch in (1, 2):
        pairs = [
            (
                tiled_decode(vae, latents, tile=16, batch=batch, **kw),
                tiled_decode(vae, latents, tile=16, batch=batch, lanes=other, **kw),
                truth,
            ),
            (
                tiled_encode(vae, image, tile=128, batch=batch, **kw),
                tiled_encode(vae, image, tile=128, batch=batch, lanes=other, **kw),
                z_truth,
            ),
        ]
        for one, two, exact in pairs:
            rounding = (one - exact).abs().mean().item()
            assert (two - exact).abs().mean().item() <= 1.5 * rounding
            assert (two - one).abs().mean().item() <= 1.5 * rounding


def test_host_store_recomputes_first_convs_and_stays_close(
    vae, latents, image, vae_recipes
) -> None:
    """A canvas that would wait on the host is recomputed from the last stored one instead (and
    each resnet's first conv computed again inside its second stage): the same values up to
    the convs' rounding for other input sizes."""
    kw = {"batch": 3, "dtype": torch.bfloat16}
    truth = tiled_decode(vae, latents, tile=16, store="device", batch=3)  # float32

    def error(out: torch.Tensor) -> float:
        return (out - truth).abs().mean().item()

    on_device = tiled_decode(vae, latents, tile=16, store="device", **kw)
    on_host = tiled_decode(vae, latents, tile=16, store="cpu", **kw)
    assert error(on_host) <= 1.5 * error(on_device)  # rounded elsewhere, not worse
    limit = 6 * 40 * 48 * 128 * 2  # a memory plan's cap: a few low-resolution canvases
    capped = tiled_decode(vae, latents, tile=16, store="device", store_limit=limit, **kw)
    assert error(capped) <= 1.5 * error(on_device)
    assert vae_recipes  # canvases beyond the cap were recomputed, not stored
    z_truth = tiled_encode(vae, image, tile=128, store="device", batch=3)
    z = tiled_encode(vae, image, tile=128, store="device", **kw)
    z_host = tiled_encode(vae, image, tile=128, store="cpu", **kw)
    assert (z_host - z_truth).abs().mean() <= 1.5 * (z - z_truth).abs().mean()


def test_a_canvas_the_device_cannot_allocate_is_recomputed(vae, latents, monkeypatch) -> None:
    """Under the memory plan's cap but out of memory all the same (fragments): the activation is
    recomputed (or put on the host), noted, and the result stays within rounding."""
    kw = {"batch": 3, "dtype": torch.bfloat16, "store": "device"}
    expected = tiled_decode(vae, latents, tile=16, **kw)
    original = StagedEngine._empty
    refused: list[tuple[int, ...]] = []

    def fragmented(self, shape, dtype, device, pin=False, channels_last=False):
        stage_output = len(shape) == 3 and shape[0] > 4 and shape[1] > 0  # not the latents
        if torch.device(device).type == "cuda" and stage_output and not refused:
            refused.append(tuple(shape))
            raise torch.OutOfMemoryError("fragmented")
        return original(self, shape, dtype, device, pin, channels_last)

    monkeypatch.setattr(StagedEngine, "_empty", fragmented)
    notes: list[str] = []
    got = tiled_decode(vae, latents, tile=16, notes=notes, **kw)
    assert refused and any("recomputed or on the host" in n for n in notes)
    assert (got - expected).abs().mean().item() < 2e-3


def test_after_the_attention_its_buffers_go_to_the_store(vae, latents, monkeypatch) -> None:
    """A capped decode: once the mid-block attention is done its Q, K and V bytes (O is written
    over Q) are added to the device store's cap, and the result is as close to the float32
    truth as the uncapped one (bf16 rounding: recomputed crops round differently)."""
    engines: list[tuple[StagedEngine, int | None]] = []
    original = StagedEngine.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        engines.append((self, self.store_cap))

    kw = {"batch": 3, "dtype": torch.bfloat16}
    truth = tiled_decode(vae, latents, tile=16, store="device", batch=3)
    expected = tiled_decode(vae, latents, tile=16, store="device", **kw)
    monkeypatch.setattr(StagedEngine, "__init__", recording)
    got = tiled_decode(vae, latents, tile=16, store="device", store_limit=1 << 20, **kw)
    ((eng, cap),) = engines
    attention = 3 * latents.shape[2] * latents.shape[3] * 128 * 2  # Q, K, V: 128 ch, bf16
    assert cap is not None and eng.store_cap == cap + attention
    assert (got - truth).abs().mean() <= 1.5 * (expected - truth).abs().mean()


def test_until_the_attention_the_store_takes_its_room(vae, image, monkeypatch) -> None:
    """A capped encode: the store may take the mid-block attention's Q, K and V bytes until the
    attention starts (the encoder's largest canvases come before it); then canvases over the
    cap move to the host (noted) before the buffers are made, the cap is back to the store's
    own, and after the attention it takes the buffers' bytes again. The result is as close to
    the float32 truth as an uncapped bf16 encode."""
    engines: list[tuple[StagedEngine, int | None]] = []
    at_reclaim: list[int] = []
    original, reclaim = StagedEngine.__init__, StagedEngine.reclaim

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        engines.append((self, self.store_cap))

    def reclaiming(self, live):
        at_reclaim.append(self.store_cap)
        reclaim(self, live)
        allocated = torch.cuda.memory_allocated(self.device)
        assert allocated <= self.store_cap or not any(c.data.is_cuda for c in engine._stored(live))

    kw = {"tile": 128, "batch": 3, "dtype": torch.bfloat16, "store": "device"}
    truth = tiled_encode(vae, image, tile=128, store="device", batch=3)
    expected = tiled_encode(vae, image, **kw)
    monkeypatch.setattr(StagedEngine, "__init__", recording)
    monkeypatch.setattr(StagedEngine, "reclaim", reclaiming)
    notes: list[str] = []
    got = tiled_encode(vae, image, store_limit=0, notes=notes, **kw)
    ((eng, cap),) = engines
    attention = 3 * 40 * 48 * 128 * 2  # Q, K, V of the 40×48 latent: 128 ch, bf16
    assert cap is not None and at_reclaim == [cap + attention]
    assert eng.lent == 0 and eng.store_cap == cap + attention
    assert "VAE store: an activation moved to the host for the attention" in notes
    assert (got - truth).abs().mean() <= 1.5 * (expected - truth).abs().mean()


@pytest.mark.parametrize("on_host", ["Q", "KVQ"])
def test_attention_buffers_the_device_cannot_hold_wait_on_the_host(
    vae, latents, monkeypatch, on_host: str
) -> None:
    """Out of memory allocating the mid-block attention's buffers (the 8192² print on an 8 GiB
    card crashed there at 2e7258c, its free memory in pieces): each one that does not fit waits
    on the host, copied a chunk of queries or a block of keys at a time: the same bytes, noted,
    and only the buffers the device held go to the store's cap afterwards."""
    monkeypatch.setenv("TILEUP_VAE_KEY_BLOCK", "512")  # 1920 tokens: four blocks of keys
    kw = {"batch": 3, "dtype": torch.bfloat16, "store": "device", "store_limit": 1 << 30}
    expected = tiled_decode(vae, latents, tile=16, **kw)
    buffer_shape = (1, 1, latents.shape[2] * latents.shape[3], 128)
    order = iter("KVQ")  # the order the buffers are asked for
    real_empty = torch.empty

    def refusing(*args, **kwargs):
        shape = tuple(args[0]) if args and isinstance(args[0], (tuple, list)) else None
        on_cuda = torch.device(kwargs.get("device") or "cpu").type == "cuda"
        if shape == buffer_shape and on_cuda and next(order) in on_host:
            raise torch.OutOfMemoryError("fragmented")
        return real_empty(*args, **kwargs)

    engines: list[tuple[StagedEngine, int | None]] = []
    original = StagedEngine.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        engines.append((self, self.store_cap))

    monkeypatch.setattr(StagedEngine, "__init__", recording)
    monkeypatch.setattr(torch, "empty", refusing)
    notes: list[str] = []
    got = tiled_decode(vae, latents, tile=16, notes=notes, **kw)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert notes == [f"VAE out of memory: the attention's {b} on the host" for b in on_host]
    assert torch.equal(got, expected)
    ((eng, cap),) = engines
    held = 3 - len(on_host)
    assert cap is not None and eng.store_cap == cap + held * 1920 * 128 * 2


def test_a_plan_with_no_room_for_the_attention_keeps_it_on_the_host(
    vae, latents, image, monkeypatch
) -> None:
    """``attention_on_host`` (a memory plan's smallest budgets for a large canvas): Q, K and V
    made on the host from the start, nothing noted, the same bytes as on the device, and the
    store's cap unchanged by them."""
    monkeypatch.setenv("TILEUP_VAE_KEY_BLOCK", "512")
    kw = {"batch": 3, "dtype": torch.bfloat16, "store": "device", "store_limit": 1 << 30}
    engines: list[tuple[StagedEngine, int | None]] = []
    original = StagedEngine.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        engines.append((self, self.store_cap))

    expected = tiled_decode(vae, latents, tile=16, **kw)
    z_expected = tiled_encode(vae, image, tile=128, **kw)
    monkeypatch.setattr(StagedEngine, "__init__", recording)
    notes: list[str] = []
    got = tiled_decode(vae, latents, tile=16, notes=notes, attention_on_host=True, **kw)
    z = tiled_encode(vae, image, tile=128, notes=notes, attention_on_host=True, **kw)
    assert notes == [] and torch.equal(got, expected) and torch.equal(z, z_expected)
    assert all(eng.attention_on_host and eng.store_cap == cap for eng, cap in engines)


def test_fused_attention_kernel_is_as_close_as_pytorchs_on_the_gpu(monkeypatch) -> None:
    """tileup.vae.flash in bf16 on the GPU (opt-in: measured slower than the chunked GEMMs,
    176 against 239 TFLOP/s at 4096², H200, 2026-11-30): as close to the float64 truth as
    PyTorch's memory-efficient kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tileup.vae import flash

    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(4096, 512, device="cuda", generator=gen) for _ in range(3))
    ref = torch.softmax(q.double() @ k.double().T / 512**0.5, dim=-1) @ v.double()
    half = [t.bfloat16() for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        batched = (t[None, None] for t in half)  # the fused kernels take (batch, heads, L, d)
        fused_torch = torch.nn.functional.scaled_dot_product_attention(*batched)[0, 0]
    mine = flash.flash_attention(*half)
    torch_err = (fused_torch.double() - ref).abs().mean().item()
    assert (mine.double() - ref).abs().mean().item() <= 1.25 * torch_err


def test_a_tiled_decode_with_the_fused_attention(vae, latents, monkeypatch) -> None:
    kw = {"batch": 3, "dtype": torch.bfloat16, "store": "device"}
    truth = tiled_decode(vae, latents, tile=16, store="device", batch=3)
    chunked = tiled_decode(vae, latents, tile=16, **kw)
    monkeypatch.setenv("TILEUP_VAE_ATTENTION", "fused")
    fused = tiled_decode(vae, latents, tile=16, **kw)
    assert (fused - truth).abs().mean() <= 1.5 * (chunked - truth).abs().mean()


def _online_softmax(scores: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Row softmax of ``scores`` through tileup.vae.softmax's blocks of ``block`` keys, each
    block's probabilities brought to the final maximum (float32)."""
    from tileup.vae import softmax

    rows = scores.shape[0]
    row_max = torch.full((rows,), float("-inf"), device=scores.device)
    row_sum = torch.zeros(rows, device=scores.device)
    parts = []
    for start in range(0, scores.shape[1], block):
        probs, rescale = softmax.softmax_block(
            scores[:, start : start + block].contiguous(), row_max, row_sum, dtype
        )
        assert probs.dtype == dtype and probs.device == scores.device
        parts = [p * rescale[:, None] for p in parts] + [probs.float()]
    return torch.cat(parts, 1) / row_sum[:, None]


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_online_softmax_kernel_gives_pytorchs_softmax(dtype) -> None:
    """The kernel's blocks (held whole, and in lane steps) over a row of the VAE's length at
    4096² px: PyTorch's softmax up to one step of the probabilities' dtype."""
    from tileup.vae import softmax

    gen = torch.Generator("cuda").manual_seed(0)
    scores = torch.randn(64, 262144, device="cuda", generator=gen) * 8
    scores[:, 200000] += 40  # one dominant key per row, in a late block
    assert softmax.enabled(scores)
    torchs = torch.softmax(scores, dim=-1)
    for block in (16384, 65536):  # held whole, lane steps
        mine = _online_softmax(scores, block, dtype)
        # a step of 8 or 11 significant bits (fp16 subnormals step by 2^-24) of the
        # unnormalized probabilities (≤ 1), then scaled: at most a step and a half of the value;
        # exponentials below float32's smallest normal (2^-126) flush to zero on the GPU
        bits, tiny = (8, 2.0**-126) if dtype == torch.bfloat16 else (11, 2.0**-24)
        step = torchs.abs() * 1.5 * 2.0 ** (1 - bits) + tiny
        assert ((mine - torchs).abs() <= step).all()
    short = _online_softmax(scores[:3, :100], 64, dtype)  # a block shorter than the lanes
    assert torch.allclose(short, torch.softmax(scores[:3, :100], -1), rtol=1e-2, atol=tiny)


@torch.inference_mode()
def test_an_online_softmax_kernel_that_fails_falls_back_to_pytorchs(monkeypatch) -> None:
    from tileup.vae import softmax

    def broken() -> object:
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(softmax, "_kernel", broken)
    monkeypatch.setattr(softmax, "_FAILED", set())
    scores = torch.randn(4, 3000, device="cuda")
    with pytest.warns(UserWarning, match="softmax kernel unavailable"):
        got = _online_softmax(scores, 1000, torch.bfloat16)
    assert not softmax.enabled(scores)
    assert torch.allclose(got, torch.softmax(scores, dim=-1), rtol=2**-7)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@torch.inference_mode()
def test_the_online_softmax_kernel_runs_on_its_tensors_gpu_not_the_current_one() -> None:
    """Triton launches on the current device's stream: scores on cuda:1 while cuda:0 is
    current must still be read after cuda:1 wrote them (two-GPU VAE lanes; at 0a2fa8c the
    row softmax ran on GPU 0 through peer access, racing GPU 1: the band test was 50x off)."""
    torch.cuda.set_device(0)
    gen = torch.Generator("cuda:1").manual_seed(1)
    for _ in range(3):  # scores written by queued work on cuda:1 just before the kernel
        scores = torch.randn(256, 70000, device="cuda:1", generator=gen).mul_(6).add_(1)
        got = _online_softmax(scores, 16384, torch.bfloat16)
        expected = torch.softmax(scores, dim=-1)
        assert got.device == scores.device
        assert ((got - expected).abs() <= expected.abs() * 1.5 * 2.0**-7).all()


@torch.inference_mode()
def test_an_esrgan_model_runs_channels_last_on_cuda_with_the_nchw_output(
    shared_models,
) -> None:
    """SRModel.place: ESRGAN's weights channels-last on CUDA, the tiled run's output as with
    NCHW weights up to fp16 kernel rounding."""
    import copy

    import numpy as np

    from tileup.upscalers.models import load_sr_model
    from tileup.upscalers.tiled import RunReport, run_tiled

    model = load_sr_model(shared_models / "RealESRGAN_x4plus.safetensors")
    nchw = copy.deepcopy(model)
    nchw.descriptor.to(device="cuda", dtype=torch.float16)
    model.place(torch.device("cuda"), torch.float16)
    conv = model.descriptor.model.model[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 3, 96, 80), dtype=np.float32))
    runs = [
        run_tiled(m, image, device=torch.device("cuda"), dtype=torch.float16, tile=48,
                  report=RunReport())
        for m in (nchw, model)
    ]  # fmt: skip
    gap = (runs[0] - runs[1]).abs()
    assert gap.max().item() <= 2 / 255 and gap.mean().item() < 1e-3, gap.max().item()


@torch.inference_mode()
@pytest.mark.parametrize("channels_last", [True, False])
def test_the_statistics_kernel_gives_float32_statistics_in_place(channels_last) -> None:
    """tileup.vae.stats on the GPU, on a batch the size of the reference job's (4 tiles of
    128 channels, off the block sizes) with a mean far from zero and on a window of it: mean and
    M2 against float64, as close as PyTorch's float32 ``var_mean``."""
    from tileup.vae import stats

    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(4, 128, 258, 261, device="cuda", generator=gen) * 2 + 30
    x = x.bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert stats.enabled(x)
    pieces = (x, x[1:3, :, 5:200, 7:101])
    for t, per_program in itertools.product(pieces, (1, 4, 16)):
        mean, m2 = stats.channel_stats(t, per_program)
        var, truth = torch.var_mean(t.double(), dim=(2, 3), correction=0)
        torch_var, torch_mean = torch.var_mean(t.float(), dim=(2, 3), correction=0)
        n = t.shape[2] * t.shape[3]
        assert mean.dtype == m2.dtype == torch.float32 and mean.shape == (t.shape[0], 128)
        mean_error = (mean.double() - truth).abs().max().item()
        assert mean_error <= max(2 * (torch_mean.double() - truth).abs().max().item(), 1e-5)
        m2_error = (m2.double() / (var * n) - 1).abs().max().item()
        assert m2_error <= max(2 * (torch_var.double() / var - 1).abs().max().item(), 1e-5)
    assert stats.enabled(x)  # every variant built and ran (a failure falls back and says so)


@torch.inference_mode()
def test_a_statistics_kernel_that_fails_falls_back_to_pytorchs(monkeypatch) -> None:
    from tileup.vae import stats

    def broken() -> object:
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(stats, "_kernel", broken)
    monkeypatch.setattr(stats, "_FAILED", set())
    x = torch.randn(2, 32, 9, 10, device="cuda")
    var, expected = torch.var_mean(x, dim=(2, 3), correction=0)
    with pytest.warns(UserWarning, match="statistics kernel unavailable"):
        mean, m2 = stats.channel_stats(x)
    assert torch.equal(mean, expected) and torch.equal(m2, var * 90) and not stats.enabled(x)


@torch.inference_mode()
def test_a_unit_range_decode_comes_back_laid_out_as_an_rgb_image(vae, latents) -> None:
    """On CUDA the decoded picture lands H×W×3 on the host (no transposing copy for the
    caller) and in [0, 1] (the same float32 map as on the [-1, 1] decode), bf16 engine."""
    from tileup.devices import hwc_view

    signed = tiled_decode(vae, latents, tile=16, device="cuda", dtype=torch.bfloat16, batch=4)
    unit = tiled_decode(
        vae, latents, tile=16, device="cuda", dtype=torch.bfloat16, batch=4, unit_range=True
    )
    assert unit.device.type == "cpu" and unit[0].permute(1, 2, 0).is_contiguous()
    assert torch.equal(unit, signed.add(1).div(2).clamp(0, 1))
    rgb = hwc_view(unit[0]).numpy()
    assert rgb.shape == (320, 384, 3) and np.shares_memory(rgb, unit.numpy())  # a view


@torch.inference_mode()
def test_a_unit_range_image_is_mapped_on_the_device_to_the_same_bytes(vae) -> None:
    """The encoder's canvas filled from a [0, 1] host image, mapped to [-1, 1] on the device
    band by band (float32, then bf16): the latents equal those of the image mapped on the host,
    and the host image is left alone."""
    gen = torch.Generator().manual_seed(2)
    unit = torch.rand(1, 3, 128, 192, generator=gen)
    kept = unit.clone()
    kwargs = {"tile": 64, "device": "cuda", "dtype": torch.bfloat16, "batch": 4, "store": "device"}
    mapped = tiled_encode(vae, unit * 2 - 1, **kwargs)
    assert torch.equal(tiled_encode(vae, unit, unit_range=True, **kwargs), mapped)
    assert torch.equal(unit, kept)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_conv_epilogue_gives_pytorchs_bytes(dtype) -> None:
    """Bias and skip added by the kernel over cuDNN's channels-last result: the bytes of
    ``skip + F.conv2d(x, w, b)`` (cuDNN, then PyTorch's bias add), 3×3 and 1×1 convs."""
    from tileup.vae import epilogue

    gen = torch.Generator().manual_seed(9)
    for cin, cout, size, skip in (
        (64, 128, 3, True),
        (64, 128, 3, False),
        (128, 3, 3, False),
        (128, 64, 1, True),
    ):
        x = torch.randn(3, cin, 20, 37, generator=gen).to("cuda", dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        w = (torch.randn(cout, cin, size, size, generator=gen) * 0.05).to("cuda", dtype)
        b = torch.randn(cout, generator=gen).to("cuda", dtype)
        out_h, out_w = 20 - size + 1, 37 - size + 1
        window = None
        if skip:
            big = torch.randn(3, cout, out_h + 4, out_w + 2, generator=gen).to("cuda", dtype)
            window = big.contiguous(memory_format=torch.channels_last)[:, :, 2:-2, 1:-1]
        assert epilogue.enabled(x)
        got = epilogue.conv2d(x, w, b, (1, 1), (1, 1), 1, window)
        expected = torch.nn.functional.conv2d(x, w, b)
        if window is not None:
            expected = window + expected
        assert torch.equal(got, expected), (cin, cout, size, skip)


@torch.inference_mode()
def test_a_conv_epilogue_kernel_that_fails_falls_back_to_pytorchs(monkeypatch) -> None:
    from tileup.vae import epilogue

    def broken() -> object:
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(epilogue, "_kernel", broken)
    monkeypatch.setattr(epilogue, "_FAILED", set())
    x = torch.randn(1, 16, 9, 10, device="cuda").contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(32, 16, 3, 3, device="cuda"), torch.randn(32, device="cuda")
    with pytest.warns(UserWarning, match="bias kernel unavailable"):
        got = epilogue.conv2d(x, w, b, (1, 1), (1, 1), 1)
    assert torch.equal(got, torch.nn.functional.conv2d(x, w, b)) and not epilogue.enabled(x)


@torch.inference_mode()
def test_wide_copies_and_the_epilogue_leave_the_tiled_vaes_bytes(
    vae, latents, image, monkeypatch
) -> None:
    """A bf16 tiled encode and decode with the crops, pastes and nearest upsampling moved in
    16-byte elements and the conv biases and skips added by the kernel: the same bytes as with
    PyTorch's copies, upsampling and adds."""
    from tileup.vae import copies

    kw = {"device": "cuda", "dtype": torch.bfloat16, "batch": 4}
    decoded = tiled_decode(vae, latents, tile=16, **kw)
    encoded = tiled_encode(vae, image, tile=128, **kw)
    monkeypatch.setenv("TILEUP_VAE_EPILOGUE", "torch")
    monkeypatch.setattr(copies, "_WIDE", ())
    assert torch.equal(tiled_decode(vae, latents, tile=16, **kw), decoded)
    assert torch.equal(tiled_encode(vae, image, tile=128, **kw), encoded)


@torch.inference_mode()
def test_wide_copies_and_nearest_upsampling_on_cuda() -> None:
    from tileup.vae import copies

    x = torch.randn(4, 256, 33, 40, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    up = copies.upsample_nearest2x(x[:, :, 1:30, 2:39])
    assert torch.equal(up, torch.nn.functional.interpolate(x[:, :, 1:30, 2:39], scale_factor=2.0))
    assert up.is_contiguous(memory_format=torch.channels_last)
    canvas = torch.randn(1, 256, 100, 90, device="cuda", dtype=torch.bfloat16)
    canvas = canvas.contiguous(memory_format=torch.channels_last)[0]
    copies.copy_(x[2, :, 1:31, 0:40], canvas[:, 50:80, 10:50])
    assert torch.equal(x[2, :, 1:31, 0:40], canvas[:, 50:80, 10:50])


@torch.inference_mode()
def test_coarse_stages_batch_more_tiles_and_stay_close(vae, latents, monkeypatch) -> None:
    """On CUDA a 40×48 latent decode in tiles of 8 at batch 2 runs its latent-scale stages in
    one batch of all 30 tiles (scale 2: 8 a batch); the image is the one of batch 2 everywhere
    up to float32 rounding (cuDNN may pick other algorithms for other batch sizes); an
    out-of-memory in a boosted batch drops to the plain batch and finishes."""
    sizes: dict[int, list[int]] = {}
    stage = StagedEngine.stage

    def counted(self, inputs, fn, **kw):  # type: ignore[no-untyped-def]
        def fn_counted(crops, batch):  # type: ignore[no-untyped-def]
            sizes.setdefault(kw["scale"], []).append(crops[0].shape[0])
            return fn(crops, batch)

        return stage(self, inputs, fn_counted, **kw)

    monkeypatch.setattr(StagedEngine, "stage", counted)
    boosted = tiled_decode(vae, latents, tile=8, device="cuda", batch=2)
    assert sizes[1][0] == 30 and max(sizes[2]) == 8 and max(sizes[8]) == 2
    monkeypatch.setattr(StagedEngine, "batch_at", lambda self, scale: self.batch)
    plain = tiled_decode(vae, latents, tile=8, device="cuda", batch=2)
    assert (boosted - plain).abs().max().item() < 1e-4
    monkeypatch.undo()
    from tileup.vae import engine

    failed: list[int] = []
    owned_stats = engine._owned_stats

    def fail_once(res, owned):  # type: ignore[no-untyped-def]
        if len(owned) > 2 and not failed:
            failed.append(len(owned))
            raise torch.OutOfMemoryError("CUDA out of memory")
        return owned_stats(res, owned)

    monkeypatch.setattr(engine, "_owned_stats", fail_once)
    notes: list[str] = []
    out = tiled_decode(vae, latents, tile=8, device="cuda", batch=2, notes=notes)
    assert failed and notes == ["VAE out of memory: 2 tiles per batch"]
    assert (out - plain).abs().max().item() < 1e-4


def test_the_compiled_crop_vae_with_channel_norms_gives_the_plain_crops(vae, image) -> None:
    """--compile's crop VAE (inductor, GroupNorms from per-channel statistics: tileup.
    channel_norm) on channels-last CUDA crops: the plain VAE's latents and pixels up to float32
    rounding (TF32 off)."""
    from tileup.vae.runner import VaeOptions, VaeRunner

    cuda = torch.device("cuda")
    plain = VaeRunner(vae, cuda, torch.float32, VaeOptions(512, 1, "device"))
    compiled = VaeRunner(vae, cuda, torch.float32, VaeOptions(512, 1, "device", compile=True))
    pixels = (image[:, :, :96, :128] + 1) / 2
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            latents = compiled.encode_crops(pixels, [])
            expected = plain.encode_crops(pixels, [])
            torch.testing.assert_close(latents, expected, rtol=0, atol=1e-3)
            decoded = compiled.decode_crops(expected, [])
            torch.testing.assert_close(decoded, plain.decode_crops(expected, []), rtol=0, atol=1e-3)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_given_exact_affines_a_capped_pass_skips_its_statistics_passes(
    vae, latents, image, dtype, vae_crops, monkeypatch
) -> None:
    """The estimated mode's machinery under a memory plan's cap on CUDA (canvases recomputed
    as the engine chooses): the exact pass's affines given back give its result up to the
    rounding of recomputation, with fewer crops; the estimated functions run end to end."""
    from tileup.vae import estimated
    from tileup.vae.norms import NormAffines

    crops = vae_crops
    kw = {"batch": 3, "dtype": dtype, "store": "device", "store_limit": 1 << 20}
    tol = 1e-4 if dtype == torch.float32 else 0.05
    for run, x, tile in ((tiled_decode, latents, 16), (tiled_encode, image, 128)):
        norms = NormAffines()
        crops.clear()
        exact = run(vae, x, tile=tile, norms=norms, **kw)
        exact_crops = len(crops)
        crops.clear()
        given = run(vae, x, tile=tile, norms=norms.frozen(), **kw)
        assert (given - exact).abs().max().item() < tol, run
        assert len(crops) < exact_crops, (len(crops), exact_crops)
    monkeypatch.setattr(estimated, "SMALL_SIDE", 128)
    out = estimated.estimated_decode(vae, latents, tile=16, **kw)
    assert out.shape == (1, 3, 320, 384) and torch.isfinite(out).all()
    z = estimated.estimated_encode(vae, image, tile=128, **kw)
    assert z.shape == (1, 4, 40, 48) and torch.isfinite(z).all()

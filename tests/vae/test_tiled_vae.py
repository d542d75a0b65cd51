"""Tiled VAE: exact against untiled diffusers, and the naive per-tile GroupNorm bug is caught.

Tolerances (fp32, CPU, tiny fixture VAE): tiled vs untiled max abs difference measured at
≤ 9.1e-6 (decode, outputs in [-1, 1]) and ≤ 3.7e-6 (encode, latents up to ±1.9), the float
rounding of a different summation order (GroupNorm statistics, conv blocking). Tiling each
tile on its own (its own GroupNorm statistics) differs by > 1 with tile-mean drift > 0.1.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch

from tileup.vae import attention
from tileup.vae import tiled as tv
from tileup.vae.engine import StagedEngine, vae_grid
from tileup.vae.tiled import NonFiniteError, tiled_decode, tiled_encode

DECODE_TOL = 5e-5
ENCODE_TOL = 2e-5
F = 8  # the fixture VAE's scale factor


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def decoded(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return vae.decode(latents).sample.clamp(-1, 1)


@pytest.fixture(scope="module")
def image(photo: np.ndarray) -> torch.Tensor:
    """conftest's 64×80 astronaut crop as 1×3×H×W in [-1, 1]."""
    return torch.from_numpy(photo * 2 - 1).permute(2, 0, 1)[None].contiguous()


def untiled_encode(vae: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return vae.encode(image).latent_dist.mean


def naive_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    margin: int,
    scale: float,
) -> torch.Tensor:
    """The bug: each tile (plus ``margin`` context) through ``fn`` alone, centre kept."""
    rows, cols = x.shape[2:]
    out = None
    for y in range(0, rows, tile):
        for x0 in range(0, cols, tile):
            t, lft = max(0, y - margin), max(0, x0 - margin)
            part = fn(x[:, :, t : y + tile + margin, lft : x0 + tile + margin])
            if out is None:
                out = torch.empty(1, part.shape[1], int(rows * scale), int(cols * scale))
            oy, ox, n = int(y * scale), int(x0 * scale), int(tile * scale)
            sy, sx = int((y - t) * scale), int((x0 - lft) * scale)
            out[:, :, oy : oy + n, ox : ox + n] = part[:, :, sy : sy + n, sx : sx + n]
    assert out is not None
    return out


def tile_mean_drift(a: torch.Tensor, b: torch.Tensor, block: int) -> float:
    """Worst |mean(a - b)| over block×block squares, per channel: a colour shift per tile."""
    d = (a - b)[0]
    c, h, w = d.shape
    hb, wb = h // block, w // block
    d = d[:, : hb * block, : wb * block].reshape(c, hb, block, wb, block)
    return d.mean((2, 4)).abs().max().item()


@pytest.mark.parametrize("tile", [7, 16])
def test_decode_matches_untiled(vae, latents, decoded, tile: int) -> None:
    out = tiled_decode(vae, latents, tile=tile)
    assert out.shape == (1, 3, 24 * F, 40 * F) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert (out - decoded).abs().max().item() < DECODE_TOL


def test_naive_per_tile_groupnorm_is_caught(vae, latents, decoded) -> None:
    ours = tiled_decode(vae, latents, tile=8)

    def one(z: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return vae.decode(z).sample.clamp(-1, 1)

    naive = naive_tiled(one, latents, tile=8, margin=4, scale=F)
    naive_diff = (naive - decoded).abs().max().item()
    assert naive_diff > 100 * DECODE_TOL and naive_diff > 0.3  # measured 1.43
    assert tile_mean_drift(naive, decoded, 8 * F) > 0.02  # measured 0.105
    assert (ours - decoded).abs().max().item() < DECODE_TOL
    assert tile_mean_drift(ours, decoded, 8 * F) < 1e-5


def test_encode_matches_untiled_and_naive_is_caught(vae, image) -> None:
    ref = untiled_encode(vae, image)
    for tile in (32, 48):
        out = tiled_encode(vae, image, tile=tile)
        assert out.shape == ref.shape == (1, 4, 8, 10)
        assert (out - ref).abs().max().item() < ENCODE_TOL
    naive = naive_tiled(lambda x: untiled_encode(vae, x), image, tile=32, margin=16, scale=1 / F)
    assert (naive - ref).abs().max().item() > 0.1  # measured 0.73
    assert tile_mean_drift(naive, ref, 4) > 0.01  # measured 0.116


def test_whole_image_tile_and_canvas_smaller_than_tile(vae, latents, decoded, image) -> None:
    assert (tiled_decode(vae, latents, tile=40) - decoded).abs().max().item() < DECODE_TOL
    small = latents[:, :, 3:8, 10:17]  # 5×7 latent with a 16 tile: one tile, clipped
    with torch.inference_mode():
        ref = vae.decode(small).sample.clamp(-1, 1)
    assert (tiled_decode(vae, small, tile=16) - ref).abs().max().item() < DECODE_TOL
    out = tiled_encode(vae, image[:, :, :40, :56], tile=512)
    ref = untiled_encode(vae, image[:, :, :40, :56])
    assert (out - ref).abs().max().item() < ENCODE_TOL


def test_deterministic_and_batch_size_changes_only_rounding(vae, latents) -> None:
    a = tiled_decode(vae, latents, tile=16)
    assert torch.equal(a, tiled_decode(vae, latents, tile=16))
    # batched convs block differently: measured 7.9e-6, the size of the tiled/untiled rounding
    assert (a - tiled_decode(vae, latents, tile=16, batch=4)).abs().max().item() < DECODE_TOL


def test_batch_of_images_is_decoded_one_by_one(vae, latents) -> None:
    two = torch.cat([latents[:, :, :8, :8], latents[:, :, 8:16, 8:16] * 0.5])
    out = tiled_decode(vae, two, tile=4)
    for i in range(2):
        assert torch.equal(out[i : i + 1], tiled_decode(vae, two[i : i + 1], tile=4))


def test_unit_range_is_the_same_float32_map_done_tile_by_tile(vae, latents) -> None:
    """``unit_range``: the image in [0, 1], bit for bit ``((x + 1) / 2).clamp(0, 1)`` of the
    [-1, 1] decode, for one picture and for a batch."""
    for z in (latents[:, :, :8, :16], torch.cat([latents[:, :, :8, :8]] * 2)):
        signed = tiled_decode(vae, z, tile=4)
        unit = tiled_decode(vae, z, tile=4, unit_range=True)
        assert unit.shape == signed.shape and unit.min() >= 0 and unit.max() <= 1
        assert torch.equal(unit, signed.add(1).div(2).clamp(0, 1))


def test_a_unit_range_image_is_mapped_as_the_engine_copies_it_in(vae, image) -> None:
    """``unit_range``: an image in [0, 1] encodes to the same bytes as the caller's ``x·2 − 1``
    (the map runs in float32 as the canvas is filled), and the caller's image is left alone."""
    unit = ((image[:, :, :40, :56] + 1) / 2).contiguous()
    kept = unit.clone()
    mapped = tiled_encode(vae, unit * 2 - 1, tile=16, batch=2)
    assert torch.equal(tiled_encode(vae, unit, tile=16, batch=2, unit_range=True), mapped)
    assert torch.equal(unit, kept)


def test_half_precision_is_as_close_as_untiled_and_leaves_the_vae_alone(vae, latents) -> None:
    z = latents[:, :, :8, :16]
    half = copy.deepcopy(vae).to(torch.bfloat16)
    with torch.inference_mode():
        truth = vae.decode(z).sample.clamp(-1, 1)
        untiled = half.decode(z.bfloat16()).sample.float().clamp(-1, 1)
    out = tiled_decode(vae, z, tile=8, dtype=torch.bfloat16)
    assert next(vae.parameters()).dtype == torch.float32  # a converted copy ran
    # mean error against fp32: measured 0.0073 tiled vs 0.0080 untiled bf16
    untiled_err = (untiled - truth).abs().mean().item()
    assert (out - truth).abs().mean().item() < 1.5 * untiled_err


def test_non_finite_raises(vae, latents) -> None:
    bad = latents[:, :, :8, :8].clone()
    bad[0, 1, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError):
        tiled_decode(vae, bad, tile=4)
    with pytest.raises(NonFiniteError):
        tiled_encode(vae, torch.full((1, 3, 16, 16), float("inf")), tile=8)


def test_chunked_gemm_attention_equals_sdpa() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 37, 8, generator=gen) * 3 for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for budget in (1, 5 * 37, 1 << 27):  # one query a chunk, 5, all at once
        assert (
            attention.chunked_attention(q, k, v, budget) - ref
        ).abs().max().item() < 5e-5  # values up to ~9
    bf16 = [t.bfloat16() for t in (q, k, v)]
    half = attention.chunked_attention(*bf16, 5 * 37)
    assert half.dtype == torch.bfloat16
    # in bf16 as close to the float32 result as PyTorch's own attention in bf16 (0.100 vs 0.104)
    torch_half = torch.nn.functional.scaled_dot_product_attention(*bf16)
    assert (half.float() - ref).abs().max() <= 1.1 * (torch_half.float() - ref).abs().max()


def test_grid_owned_regions_partition_the_canvas() -> None:
    for height, width, tile in [(24, 40, 7), (9, 8, 8), (5, 7, 16), (64, 64, 64)]:
        grid = vae_grid(height, width, tile)
        cover = torch.zeros(height, width, dtype=torch.int32)
        for t in grid.tiles:
            assert t.top >= 0 and t.top + grid.tile_h <= height
            assert t.left >= 0 and t.left + grid.tile_w <= width
            cover[t.own_top : t.own_top + t.own_height, t.own_left : t.own_left + t.own_width] += 1
            assert t.top <= t.own_top and t.own_top + t.own_height <= t.top + grid.tile_h
            assert t.left <= t.own_left and t.own_left + t.own_width <= t.left + grid.tile_w
        assert torch.equal(cover, torch.ones_like(cover))


def test_bad_inputs_are_refused(vae, image) -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        tiled_encode(vae, image[:, :, :60], tile=32)
    with pytest.raises(ValueError, match="multiples of 8"):
        tiled_encode(vae, image, tile=36)
    with pytest.raises(ValueError, match="latents must be"):
        tiled_decode(vae, torch.zeros(1, 3, 8, 8))


def test_store_bytes_formula(vae) -> None:
    # fixture VAE: block_out_channels (32, 32, 64, 64): decode (32 + 2·32), encode 3·32 channels
    assert tv.store_bytes(vae, 64, 80, torch.float16, decode=True) == 96 * 64 * 80 * 2
    assert tv.store_bytes(vae, 64, 80, torch.float32, decode=False) == 96 * 64 * 80 * 4


def test_sd3_flux_style_vae_without_quant_convs(image) -> None:
    from diffusers import AutoencoderKL
    from sd_fixtures import randomize_, vae_kwargs

    kw = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    vae = randomize_(AutoencoderKL(**{**vae_kwargs("sd1"), **kw}), 3).eval()
    z = torch.randn(1, 16, 8, 10, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = vae.decode(z).sample.clamp(-1, 1)
    assert (tiled_decode(vae, z, tile=4) - ref).abs().max().item() < DECODE_TOL
    assert (tiled_encode(vae, image, tile=32) - untiled_encode(vae, image)).abs().max() < ENCODE_TOL


def _fail_once(monkeypatch: pytest.MonkeyPatch, module: object, name: str, when) -> list[int]:
    """Make ``module.name`` raise an out-of-memory error the first time ``when(*args)`` holds;
    returns the list of calls that raised (one element once it has)."""
    original = getattr(module, name)
    raised: list[int] = []

    def wrapped(*args, **kwargs):
        if not raised and when(*args):
            raised.append(1)
            raise torch.OutOfMemoryError("simulated")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return raised


def test_out_of_memory_in_a_stage_halves_the_batch_and_finishes(vae, latents, monkeypatch) -> None:
    from tileup.vae import engine

    expected = tiled_decode(vae, latents, tile=8, batch=2)
    # the float32 statistics of a full batch (what crashed a 4 GiB card), then the conv itself
    raised = _fail_once(monkeypatch, engine, "_owned_stats", lambda res, owned: len(owned) == 4)
    notes: list[str] = []
    out = tiled_decode(vae, latents, tile=8, batch=4, notes=notes)
    assert raised and notes == ["VAE out of memory: 2 tiles per batch"]
    assert torch.equal(out, expected)  # every later batch at the halved size: batch 2's bytes


def test_out_of_memory_in_the_attention_halves_its_chunk(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, 40, 8, generator=gen) for _ in range(3))
    expected = attention.chunked_attention(q, k, v, 10 * 40)
    raised = _fail_once(monkeypatch, attention, "float32_scores", lambda qs, kt: qs.shape[0] == 16)
    out = attention.chunked_attention(q, k, v, 16 * 40)  # chunks of 16, then 8 after the failure
    assert raised
    assert (out - expected).abs().max().item() < 1e-6
    monkeypatch.setattr(
        attention, "float32_scores", lambda qs, kt: (_ for _ in ()).throw(torch.OutOfMemoryError())
    )
    with pytest.raises(torch.OutOfMemoryError):  # one query a chunk and still no room
        attention.chunked_attention(q, k, v, 16 * 40)


@pytest.mark.parametrize("lanes", [1, 2])
def test_lanes_of_tile_rows_give_the_one_device_bytes(vae, latents, image, lanes: int) -> None:
    """Each lane (here copies of the VAE on this CPU) takes a band of tile rows and its own copy
    of every stored canvas, fetching the rows it reads beyond its band: with one tile per batch
    (the same batches as one device) the same bytes; larger batches group tiles differently
    (kernel rounding)."""
    other = [(copy.deepcopy(vae), "cpu") for _ in range(lanes)]  # 3 tile rows: 2 or 3 lanes
    one = tiled_decode(vae, latents, tile=8, batch=1)
    assert torch.equal(tiled_decode(vae, latents, tile=8, batch=1, lanes=other), one)
    z = tiled_encode(vae, image, tile=16, batch=1)
    assert torch.equal(tiled_encode(vae, image, tile=16, batch=1, lanes=other), z)
    grouped = tiled_decode(vae, latents, tile=8, batch=2, lanes=other)
    assert (grouped - one).abs().max().item() < 1e-5


def test_lanes_share_the_rows_their_crops_read(vae, latents, monkeypatch) -> None:
    """Only the rows beyond a lane's band that its crops reach are copied to it."""
    from tileup.vae.engine import StagedEngine

    fetched: list[tuple[int, tuple[int, int], tuple[int, int]]] = []
    share = StagedEngine.share_rows

    def recorded(self, copies, k, rows, have, scale):
        now = share(self, copies, k, rows, have, scale)
        fetched.append((k, have, now))
        return now

    monkeypatch.setattr(StagedEngine, "share_rows", recorded)
    tiled_decode(vae, latents, tile=8, batch=1, lanes=[(copy.deepcopy(vae), "cpu")])
    grown = [(k, have, now) for k, have, now in fetched if now != have]
    assert grown, "the lanes fetched rows"
    added = {(have[0] - now[0]) + (now[1] - have[1]) for _, have, now in grown}
    # a 3×3 conv's halo: one row across the band's edge; the attention's keys and values:
    # all the other lane's latent rows (lane 0 owns 8 of the 24, lane 1 16)
    assert added == {1, 16, 8}


def test_lanes_over_recomputed_canvases(vae, latents, vae_recompute) -> None:
    """Lanes whose crops are computed again through chains of recipes and resnets."""
    one = tiled_decode(vae, latents, tile=8, batch=1)
    vae_recompute(True, chain=True)
    out = tiled_decode(vae, latents, tile=8, batch=1, lanes=[(copy.deepcopy(vae), "cpu")])
    assert (out - one).abs().max().item() < 1e-5


def test_an_eviction_gathers_every_lanes_rows_on_the_host(vae, latents, monkeypatch) -> None:
    """An out-of-memory at one tile per batch midway moves the canvases to the host: each
    lane's own rows go into the one host copy, and the job goes on there."""
    from tileup.vae import engine

    one = tiled_decode(vae, latents, tile=8, batch=1)
    calls = {"n": 0}
    real = engine._owned_stats

    def fail_once(res, owned):
        calls["n"] += 1
        if calls["n"] == 60:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(res, owned)

    monkeypatch.setattr(engine, "_owned_stats", fail_once)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # evictable here
    notes: list[str] = []
    out = tiled_decode(
        vae, latents, tile=8, batch=1, lanes=[(copy.deepcopy(vae), "cpu")], notes=notes
    )
    assert notes == ["VAE out of memory: activations moved to the host"]
    assert (out - one).abs().max().item() < 1e-5


def test_every_module_of_a_stage_goes_through_its_lane(vae, latents, image, monkeypatch) -> None:
    """A stage function that used a primary module directly would run the primary's weights on
    the other device: every conv and linear layer must be looked up through the batch's lane."""
    from tileup.vae.engine import Lane

    looked_up: set[int] = set()
    original = Lane.__call__

    def recording(self, obj):
        if self.device is not None and isinstance(obj, torch.nn.Module):
            looked_up.add(id(obj))
        return original(self, obj)

    monkeypatch.setattr(Lane, "__call__", recording)
    other = [(copy.deepcopy(vae), "cpu")]
    tiled_decode(vae, latents[:, :, :16, :16], tile=4, batch=1, lanes=other)
    tiled_encode(vae, image[:, :, :32, :32], tile=8, batch=1, lanes=other)
    layers = (torch.nn.Conv2d, torch.nn.Linear)
    for part in (vae.decoder, vae.encoder, vae.post_quant_conv, vae.quant_conv):
        used = {id(m) for m in part.modules() if isinstance(m, layers)}
        assert used <= looked_up, [
            type(m).__name__ for m in part.modules() if id(m) in used - looked_up
        ]


def _assert_as_stored(vae, latents, decoded, image, tile: int, batch: int, switch) -> None:
    """Decode and encode stored, ``switch()`` the engines' mode, then again: the same result
    (and still the untiled one within the tiling tolerances)."""
    stored = tiled_decode(vae, latents, tile=tile, batch=batch)
    z_stored = tiled_encode(vae, image, tile=tile * F, batch=batch)
    switch()
    out = tiled_decode(vae, latents, tile=tile, batch=batch)
    assert (out - decoded).abs().max().item() < DECODE_TOL
    assert (out - stored).abs().max().item() < 1e-5
    z = tiled_encode(vae, image, tile=tile * F, batch=batch)
    assert (z - untiled_encode(vae, image)).abs().max().item() < ENCODE_TOL
    assert (z - z_stored).abs().max().item() < 1e-5


@pytest.mark.parametrize(("tile", "batch"), [(7, 1), (16, 3)])
def test_recomputed_canvases_give_the_stored_result(
    vae, latents, decoded, image, vae_recompute, vae_recipes, tile: int, batch: int
) -> None:
    """Chainable stages keep no output: each later stage computes its crops again from the
    last stored canvas, on crops widened by every conv's halo (and halved / doubled through
    the samplers) — the same result, with chains cut at MAX_CHAIN stages."""
    from tileup.vae import engine

    # resnets' h recomputed too: recipes with two inputs
    _assert_as_stored(
        vae, latents, decoded, image, tile, batch, lambda: vae_recompute(False, chain=True)
    )
    assert max(vae_recipes) == engine.MAX_CHAIN and len(vae_recipes) > 2 * engine.MAX_CHAIN


def test_shorter_chains_store_sooner_and_give_the_stored_result(
    vae, latents, decoded, image, vae_recompute, vae_recipes, monkeypatch
) -> None:
    """``TILEUP_VAE_MAX_CHAIN`` (a benchmark's knob) cuts every chain at that many stages: the
    same result, more canvases stored; anything but a positive integer is refused."""
    from tileup.vae import engine

    monkeypatch.setenv("TILEUP_VAE_MAX_CHAIN", "3")
    _assert_as_stored(vae, latents, decoded, image, 16, 3, lambda: vae_recompute(False, chain=True))
    assert set(vae_recipes) == {1, 2, 3}
    for bad in ("0", "-2", "four"):
        monkeypatch.setenv("TILEUP_VAE_MAX_CHAIN", bad)
        with pytest.raises(ValueError, match="TILEUP_VAE_MAX_CHAIN must be a positive integer"):
            engine.max_chain()


@pytest.mark.parametrize(("tile", "batch"), [(7, 1), (16, 3)])
def test_recomputing_the_first_conv_gives_the_stored_result(
    vae, latents, decoded, image, vae_recompute, tile: int, batch: int
) -> None:
    """The host-store mode: each resnet's first conv is only reduced to its statistics, then
    computed again (on a crop one halo wider) inside the second stage — same result."""
    _assert_as_stored(vae, latents, decoded, image, tile, batch, lambda: vae_recompute(True))


def test_a_resnet_stores_its_first_conv_only_when_both_outputs_stay_on_the_device() -> None:
    """On CUDA the first conv's output is stored only when it and the block's output fit in
    the device store together; else the second stage recomputes it (one canvas fewer held, so
    the output or the canvases after it stay on the device)."""
    from types import SimpleNamespace

    from tileup.vae.engine import Canvas

    on_device = Canvas(torch.empty(8, 4, 4, device="meta"), 1)
    on_host = Canvas(torch.empty(8, 4, 4), 1)
    room = 100

    def engine(device: str, recompute: bool | None = None) -> StagedEngine:
        fits = lambda nbytes: nbytes <= room  # noqa: E731
        return SimpleNamespace(recompute=recompute, device=torch.device(device), fits=fits)  # type: ignore[return-value]

    decide = tv._recomputes_first_conv
    assert not decide(engine("cuda"), on_device, 50)  # both fit: h stored, read by the second
    assert decide(engine("cuda"), on_device, 51)  # only one fits
    assert decide(engine("cuda"), on_device, 200)  # neither: the output recomputes both convs
    assert decide(engine("cuda"), on_host, 1)  # x on the host: read once for both convs
    assert not decide(engine("cpu"), on_device, 200)  # the CPU stores on its own memory
    assert decide(engine("cpu", True), on_device, 1) and not decide(
        engine("cuda", False), on_host, 1
    )


def test_the_store_takes_the_attention_buffers_once_they_are_freed() -> None:
    grid = vae_grid(8, 8, 4)
    cuda = StagedEngine(
        grid, torch.device("cuda"), torch.bfloat16, torch.device("cpu"), 1, store_cap=1000
    )
    cuda.release(24)
    assert cuda.store_cap == 1024
    cpu = StagedEngine(grid, torch.device("cpu"), torch.float32, torch.device("cpu"), 1)
    cpu.release(24)
    assert cpu.store_cap is None  # no cap: every canvas goes to the store


def test_the_store_borrows_the_attention_room_until_it_starts(monkeypatch) -> None:
    """``lend`` raises the cap until ``reclaim``, which lowers it again and moves the largest
    device canvases behind the live ones to the host until the device is back under it (noted
    once a canvas); nothing lent, nothing moved; without a cap (the CPU) both do nothing."""
    from tileup.vae.engine import Canvas, Recipe

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    eng = StagedEngine(vae_grid(8, 8, 4), cuda, bf16, cuda, 1, store_cap=1000)
    eng.lend(300)
    assert (eng.store_cap, eng.lent) == (1300, 300)
    big = Canvas(torch.empty(50, 1, 1, device="meta"), 1)  # 200 bytes (float32)
    small = Canvas(torch.empty(25, 1, 1, device="meta"), 1)  # 100 bytes
    host = Canvas(torch.empty(400, 1, 1), 1)
    chained = Canvas(torch.empty(0, 0, 0), 1, recipe=Recipe((small, host, big), None, (0, 0), 1, 1))  # type: ignore[arg-type]
    allocated, moved = [1250], []

    def to_host(self: StagedEngine, c: Canvas) -> None:
        moved.append(c)
        allocated[0] -= c.data.nbytes

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated[0])
    monkeypatch.setattr(StagedEngine, "_to_host", to_host)
    eng.reclaim([chained])
    assert (eng.store_cap, eng.lent) == (1000, 0)
    assert moved == [big, small]  # 1250 → 1050 → 950: both, largest first
    assert eng.notes == ["VAE store: an activation moved to the host for the attention"] * 2
    eng.reclaim([chained])
    assert len(moved) == 2 and eng.store_cap == 1000
    cpu = StagedEngine(vae_grid(8, 8, 4), torch.device("cpu"), torch.float32, cuda, 1)
    cpu.lend(300)
    cpu.reclaim([chained])
    assert (cpu.store_cap, cpu.lent, len(moved)) == (None, 0, 2)


def test_the_encoder_lends_the_attention_room_and_a_limit_bounds_its_scores(
    vae, latents, image, monkeypatch
) -> None:
    """The encode lends its store Q, K and V's bytes until its attention (the decode does not:
    its canvases come after it); ``scores_limit`` bytes become the attention's chunk budget
    (6 bytes a score), at most its own cap; the bytes do not change."""
    lent: list[int] = []
    budgets: list[int] = []
    real_lend, real_sdpa = StagedEngine.lend, attention.sdpa

    def lend(self: StagedEngine, nbytes: int) -> None:
        lent.append(nbytes)
        real_lend(self, nbytes)

    def sdpa(jobs, over_queries=False, devices=None, budget=attention.SCORES_BUDGET):
        budgets.append(budget)
        return real_sdpa(jobs, over_queries, devices, budget)

    z_plain, plain = tiled_encode(vae, image, tile=32), tiled_decode(vae, latents, tile=16)
    monkeypatch.setattr(StagedEngine, "lend", lend)
    monkeypatch.setattr(attention, "sdpa", sdpa)
    z = tiled_encode(vae, image, tile=32, scores_limit=6000)
    out = tiled_decode(vae, latents, tile=16, scores_limit=6 << 40)
    channels = vae.config.block_out_channels[-1]
    assert lent == [3 * channels * (64 // F) * (80 // F) * 4]  # the encode's, float32
    assert budgets == [1000, 1 << 40] and torch.equal(z, z_plain) and torch.equal(out, plain)
    tiled_decode(vae, latents, tile=16)
    assert budgets[-1] == attention.SCORES_BUDGET


def test_a_batch_is_sized_by_the_finest_scale_its_stage_computes_at() -> None:
    """A recomputed input's chain may reach finer canvases than the stage's own (an encoder's
    coarse stage recomputing through downsamplers): the finest scale anywhere behind it."""
    from tileup.vae.engine import Canvas, Recipe, _finest

    stored = Canvas(torch.empty(4, 16, 16), 4)
    half = Canvas(torch.empty(0, 0, 0), 2, recipe=Recipe((stored,), None, (1, 1), 4, 1))  # type: ignore[arg-type]
    quarter = Canvas(torch.empty(0, 0, 0), 1, recipe=Recipe((half,), None, (1, 1), 2, 2))  # type: ignore[arg-type]
    assert (_finest(stored), _finest(half), _finest(quarter)) == (4, 4, 4)
    assert _finest(Canvas(torch.empty(4, 2, 2), 1)) == 1


def test_coarse_stages_batch_more_tiles_on_cuda() -> None:
    """A stage at half the scale batches 4× the tiles, less 4× for channels growing to 4×: a
    top-scale batch's memory (CUDA only; the CPU keeps one batch size for every stage)."""
    grid = vae_grid(40, 48, 8)
    cuda = StagedEngine(
        grid, torch.device("cuda"), torch.bfloat16, torch.device("cuda"), 2, top_scale=8
    )
    assert [cuda.batch_at(s) for s in (1, 2, 4, 8)] == [32, 8, 2, 2]
    assert (
        StagedEngine(
            grid, torch.device("cuda"), torch.bfloat16, torch.device("cuda"), 3, top_scale=16
        ).batch_at(2)
        == 48
    )
    plain = StagedEngine(grid, torch.device("cuda"), torch.bfloat16, torch.device("cuda"), 3)
    cpu = StagedEngine(
        grid, torch.device("cpu"), torch.float32, torch.device("cpu"), 3, top_scale=8
    )
    assert plain.batch_at(1) == cpu.batch_at(1) == 3


def test_attention_buffers_the_device_cannot_hold_go_to_the_host(monkeypatch) -> None:
    """K and V are asked for first (every chunk of queries reads them), then Q; each refused
    one is made on the host instead and noted (tests/gpu runs the decode through them)."""
    real_empty = torch.empty
    asked: list[str] = []

    def refusing(shape, dtype=None, device=None):
        asked.append(str(device))
        if asked.count("meta") in (1, 3) and asked[-1] == "meta":  # K and Q do not fit
            raise torch.OutOfMemoryError("fragmented")
        return real_empty(shape, dtype=dtype, device=device)

    cpu = torch.device("cpu")
    eng = StagedEngine(vae_grid(8, 8, 8), cpu, torch.float32, cpu, 1)
    monkeypatch.setattr(torch, "empty", refusing)
    q, k, v = tv._attention_buffers((1, 2, 6, 4), torch.bfloat16, torch.device("meta"), eng)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert asked == ["meta", "cpu", "meta", "meta", "cpu"]
    assert (q.device.type, k.device.type, v.device.type) == ("cpu", "cpu", "meta")
    assert all(t.shape == (1, 2, 6, 4) and t.dtype == torch.bfloat16 for t in (q, k, v))
    assert eng.notes == [
        "VAE out of memory: the attention's K on the host",
        "VAE out of memory: the attention's Q on the host",
    ]
    # a plan with no room for them: all three on the host from the start, nothing refused
    eng = StagedEngine(vae_grid(8, 8, 8), cpu, torch.float32, cpu, 1)
    eng.attention_on_host = True
    asked.clear()
    monkeypatch.setattr(torch, "empty", refusing)
    buffers = tv._attention_buffers((1, 2, 6, 4), torch.bfloat16, torch.device("meta"), eng)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert asked == ["cpu"] * 3 and [t.device.type for t in buffers] == ["cpu"] * 3
    assert eng.notes == []


def test_phase_upsamplers_decode_as_untiled(
    vae, latents, decoded, monkeypatch, vae_recompute
) -> None:
    """The decoder's upsamplers as four-phase 2×2 convs (tileup.upsample_conv; CUDA's default,
    forced here on the CPU), recomputed chains included: as close to untiled as before."""
    plain = tiled_decode(vae, latents, tile=16)
    calls: list[int] = []
    folded_conv = tv.upsample_conv.folded_conv

    def counted(*args, **kwargs):
        calls.append(1)
        return folded_conv(*args, **kwargs)

    monkeypatch.setattr(tv, "_phase_upsampling", lambda weight: True)
    monkeypatch.setattr(tv.upsample_conv, "folded_conv", counted)
    vae_recompute(True)  # every chainable canvas recomputed: the phases run inside chains too
    out = tiled_decode(vae, latents, tile=16)
    assert calls and not torch.equal(out, plain)
    assert (out - decoded).abs().max().item() < DECODE_TOL

"""The memory plan: where models live and how big each stage's batches are, inside a budget.

A budget in bytes (``--vram``, or the device's free memory when the engine starts) is shared by
the stages of a job. :func:`plan_memory` is pure arithmetic over the sizes of the models and of
the canvas; its :class:`MemoryPlan` tells the pipeline

- whether the UNet stays on the device for the whole job, is parked on the host while the VAE
  and the SR model run (``swap_unet``), or is streamed block by block (``offload_unet``: it
  does not fit even alone);
- the UNet tile batch, the VAE tile batch, and how many bytes the tiled VAE may keep its
  full-size activations in on the device (the rest wait on the host), and whether its global
  attention's Q, K and V fit on the device at all (else they wait on the host: the smallest
  budget then no longer grows with the canvas);
- the SR model's activation budget;
- whether the UNet's CUDA graphs may stay through the VAE stages (:func:`graphs_may_stay`).

Estimates are deliberately conservative (measured on an H200, bf16, SD 1.5 and SDXL; see
bench/results/gpu.md); an out-of-memory error that happens anyway halves the batch or tile it
came from and the job goes on. A budget below :attr:`MemoryPlan.minimum_bytes` is refused up
front with a one-line :class:`MemoryBudgetError` naming that minimum.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from tileup.errors import TileupError

GIB = 1 << 30
MIB = 1 << 20

UNET_SAMPLE_BYTES_64 = 96 * MIB
"""UNet activations per sample at a 64×64 latent tile (SD 1.5, bf16; ~91 MB measured at batch
64), scaled by tile area; a guided tile is two samples."""

VAE_TILE_BYTES_PER_PX = 2000
"""Tiled-VAE working bytes per pixel of a tile in one batch: 128 channels at full resolution in
the compute dtype, the float32 copy its statistics are reduced from and the conv output."""

VAE_ATTENTION_BYTES_PER_CELL = 3 * 512 * 2
"""Q, K and V (O is written over Q) of the VAE mid-block attention per latent cell (512
channels, bf16)."""

VAE_SCORES_BYTES = 6 << 24
"""A small chunk of VAE attention scores (2^24 float32 scores and their bf16 probabilities);
the attention takes larger chunks, up to 2^27 scores, as far as ~85 % of the free memory holds
them."""

VAE_HOST_ATTENTION_BYTES = VAE_SCORES_BYTES + 64 * MIB
"""Device bytes of the VAE attention while its Q, K and V wait on the host: a small chunk of
scores, and the chunk of queries, its output and a block of keys and values copied in."""

VAE_STORE_BYTES_PER_PX = 1024
"""Peak bytes per output pixel of the tiled VAE's full-size activations ((256 + 2·128) channels
at full resolution, bf16, while decoding); all of it on the device is the fast case."""

RESERVE_BYTES = 512 * MIB
"""Kept free for the allocator's rounding, cuDNN/cuBLAS workspaces and small tensors."""

MAX_UNET_BATCH = 32
MAX_VAE_BATCH = 8
SR_MAX_BYTES = 3 * GIB // 2


class MemoryBudgetError(TileupError):
    """The budget is too small for the job; the message names the smallest budget that works."""


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of the models on the device: UNet (in its dtype), VAE (fp32 weights plus a copy in
    the compute dtype), the largest UNet block (the unit of streaming), the SR model."""

    unet: int
    vae: int
    unet_block: int
    sr: int = 0


@dataclass(frozen=True)
class JobShape:
    """The job's geometry in pixels: the diffused canvas, the UNet tile (a guided tile counts
    twice), the tiled VAE's tile, tiles of the job."""

    canvas_height: int
    canvas_width: int
    tile: int
    guided: bool
    vae_tile: int
    tiles: int
    vae_factor: int = 8
    redraw: bool = False
    redraw_crop: int = 576


@dataclass(frozen=True)
class MemoryPlan:
    """What fits: see the module docstring. Byte counts are budgets, not measurements."""

    budget_bytes: int
    minimum_bytes: int
    swap_unet: bool
    offload_unet: bool
    unet_batch: int
    vae_batch: int
    vae_store_bytes: int
    sr_bytes: int
    redraw_batch: int = 1
    vae_attention_on_host: bool = False
    """The VAE mid-block attention's Q, K and V wait on the host, copied in a chunk of queries
    or a block of keys at a time: they do not fit beside the VAE and one tile (a large canvas
    on a small budget). With them there, the smallest budget no longer grows with the canvas."""
    vae_work_bytes: int = 0
    """Device bytes a tiled VAE stage takes beside the models: its attention buffers, a tile
    batch (or a chunk of scores) and its activation store, as far as the store fits."""
    vae_scores_bytes: int = VAE_SCORES_BYTES
    """Device bytes the VAE attention's chunk of scores (and probabilities) may take: the tile
    batch's room, which is free while the attention runs (0 < this; the attention takes at
    most 2^27 scores a chunk, 768 MiB, whatever the plan)."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the byte counts also in GiB (rounded) for people."""
        data: dict[str, Any] = asdict(self)
        for key in (
            "budget_bytes",
            "minimum_bytes",
            "vae_store_bytes",
            "sr_bytes",
            "vae_work_bytes",
            "vae_scores_bytes",
        ):
            data[key.replace("_bytes", "_gib")] = round(data[key] / GIB, 2)
        data["unet"] = "streamed" if self.offload_unet else "parked" if self.swap_unet else "device"
        return data


def graphs_may_stay(plan: MemoryPlan, reserved: int, free: int) -> bool:
    """Whether the UNet's CUDA graphs (and the memory pool they hold) may stay through a VAE
    stage, so that the next job replays them instead of capturing again: the VAE stage's work
    (:attr:`MemoryPlan.vae_work_bytes`) and a margin of 2 GiB fit beside everything
    ``reserved`` now, in the budget and in the device's ``free`` memory."""
    need = plan.vae_work_bytes + 2 * GIB
    return reserved + need <= plan.budget_bytes and need <= free


def unet_tile_bytes(shape: JobShape) -> int:
    """UNet activation bytes of one tile (both halves of guidance)."""
    latent = shape.tile / shape.vae_factor
    return math.ceil(UNET_SAMPLE_BYTES_64 * (latent / 64) ** 2 * (2 if shape.guided else 1))


def vae_fixed_bytes(shape: JobShape) -> int:
    """Device bytes the tiled VAE needs whatever its batch: the global attention buffers (unless
    the plan keeps them on the host: :attr:`MemoryPlan.vae_attention_on_host`)."""
    cells = (shape.canvas_height // shape.vae_factor) * (shape.canvas_width // shape.vae_factor)
    return cells * VAE_ATTENTION_BYTES_PER_CELL


def vae_scores_bytes(shape: JobShape) -> int:
    """Device bytes of the smallest chunk of attention scores the plan allows for (while the
    attention runs no tile batch is on the device)."""
    cells = (shape.canvas_height // shape.vae_factor) * (shape.canvas_width // shape.vae_factor)
    return min(VAE_SCORES_BYTES, 6 * cells * cells)


def vae_tile_bytes(shape: JobShape) -> int:
    """Working bytes of one tiled-VAE tile."""
    return (shape.vae_tile + 2) ** 2 * VAE_TILE_BYTES_PER_PX


def redraw_crop_bytes(shape: JobShape) -> int:
    """Working bytes of one redraw crop: the plain VAE on the crop, then its UNet samples."""
    crop = shape.redraw_crop
    unet = UNET_SAMPLE_BYTES_64 * (crop / shape.vae_factor / 64) ** 2 * (2 if shape.guided else 1)
    return math.ceil(max(unet, (crop + 2) ** 2 * VAE_TILE_BYTES_PER_PX * 2))


def plan_memory(budget: int, sizes: ModelSizes, shape: JobShape, *, low_vram: bool) -> MemoryPlan:
    """The plan for ``budget`` bytes; MemoryBudgetError when not even the smallest plan fits.

    Largest batches first, the UNet resident for the whole job when it and every other stage fit
    together; else parked on the host outside its stage; else streamed. ``low_vram`` takes the
    smallest plan whatever the budget: the tiled VAE with one tile and its store on the host,
    the UNet streamed block by block; that VAE stage sets the job's peak, and the UNet batch,
    the redraw batch and the SR tile take up to as much.
    """
    free = budget - RESERVE_BYTES
    tile, vae_tile = unet_tile_bytes(shape), vae_tile_bytes(shape)
    fixed, scores = vae_fixed_bytes(shape), vae_scores_bytes(shape)
    vae_need = sizes.vae + fixed + max(vae_tile, scores)
    # the VAE with one tile and the attention's buffers on the host (never more than vae_need)
    host_need = sizes.vae + max(vae_tile, min(fixed + scores, VAE_HOST_ATTENTION_BYTES))
    attention_on_host = vae_need > free  # not even the smallest VAE plan holds them
    if attention_on_host:
        fixed, vae_need = 0, host_need
    stream_need = sizes.unet_block + tile
    crop = redraw_crop_bytes(shape) if shape.redraw else 0
    # the smallest plan: UNet streamed block by block, one tile, VAE alone with one tile; a
    # redraw pass needs the UNet (streamed) and the VAE together, with one crop
    minimum = RESERVE_BYTES + max(
        stream_need + sizes.vae, host_need, sizes.sr + 64 * MIB, sizes.unet_block + sizes.vae + crop
    )
    if budget < minimum:
        raise MemoryBudgetError(
            f"a memory budget of {budget / GIB:.2f} GiB is too small for this job: it needs at "
            f"least {math.ceil(minimum / GIB * 100) / 100:.2f} GiB (--vram); use smaller "
            "--tile/--vae-tile or a smaller output"
        )
    if low_vram:
        # the job's peak is the tiled VAE's with one tile and no store: the other stages take
        # up to that much (a 64 MiB SR tile and one streamed UNet tile made the 4K job's SR
        # 17.7 s and its diffusion 74 s, at stage peaks of 0.59 and 0.69 GiB against 1.97)
        peak = vae_need
        unet_batch = max(1, min(MAX_UNET_BATCH, shape.tiles, (peak - sizes.unet_block) // tile))
        sr = max(64 * MIB, min(SR_MAX_BYTES, peak - sizes.sr))
        beside = peak - sizes.unet_block - sizes.vae
        redraw_batch = max(1, min(MAX_UNET_BATCH, beside // crop)) if crop else 1
        room = max(vae_tile, scores)
        return MemoryPlan(
            budget,
            minimum,
            True,
            True,
            unet_batch,
            1,
            0,
            sr,
            redraw_batch,
            attention_on_host,
            0,
            room,
        )
    offload = sizes.unet + sizes.vae + tile > free
    resident_unet = 0 if offload else sizes.unet
    # the UNet stays on the device while the VAE runs only when the VAE's whole activation
    # store still fits beside it: parking it costs two copies, a host store costs far more
    store_need = shape.canvas_height * shape.canvas_width * VAE_STORE_BYTES_PER_PX
    swap = offload or resident_unet + vae_need + store_need > free
    unet_room = free - (stream_need if offload else sizes.unet) - (0 if swap else sizes.vae)
    unet_batch = max(1, min(MAX_UNET_BATCH, shape.tiles, unet_room // tile))
    vae_room = free - sizes.vae - fixed - (0 if swap else resident_unet)
    # half the room for the tile batch: a larger store (a quarter for the batch) made the 8 GiB
    # card's 4K encode slower (16.1 → 16.7 s, 676f441): a 4 GiB canvas then fit the store but
    # not the allocator's fragments, and the greedy placement recomputed what came after it
    vae_batch = max(1, min(MAX_VAE_BATCH, vae_room // 2 // vae_tile))
    store = max(0, vae_room - vae_batch * vae_tile)
    sr_room = free - sizes.sr - sizes.vae - (0 if swap else resident_unet)
    sr = max(64 * MIB, min(SR_MAX_BYTES, sr_room))
    redraw_room = free - (sizes.unet_block if offload else sizes.unet) - sizes.vae
    redraw_batch = max(1, min(MAX_UNET_BATCH, redraw_room // max(crop, 1))) if crop else 1
    attention_room = max(vae_batch * vae_tile, scores)  # no tile batch while it runs
    work = fixed + attention_room + min(store, store_need)
    return MemoryPlan(
        budget,
        minimum,
        swap,
        offload,
        unet_batch,
        vae_batch,
        store,
        sr,
        redraw_batch,
        attention_on_host,
        work,
        attention_room,
    )

"""Tiled VAE encode/decode whose every GroupNorm uses whole-image statistics.

Naive tiling runs each tile through the VAE on its own, so every GroupNorm normalises with that
tile's mean and variance and colours shift from tile to tile. Here the network is walked op by
op ("staged" tiling) over all tiles at once:

* An activation lives as a full-size *canvas* (C×H×W) on ``store`` (the CPU by default). Each
  stage reads, for every tile, its core plus a halo (the receptive field of the stage's one
  spatial conv: 1 px, or 2 low-res px for an upsampler) from the input canvas(es), runs the
  stage on the device and writes the core back to a new canvas. Because the neighbours' halo
  is read from the exact previous activation, the tiled result equals the untiled one.
* A stage is "GroupNorm (with global statistics) → SiLU → conv", the residual add of a
  ResnetBlock2D, an up/down sampler, or the mid-block attention. While an output tile is on the
  device its per-channel mean and M2 over the tile's *owned* region (the owned regions
  partition the canvas, so every pixel counts once) are reduced in float32 and kept on the
  device; the next GroupNorm combines them (Chan's parallel variance, float64) into the exact
  whole-image per-group mean and variance, and applies them with its weight, bias and eps.
* Tiles have one uniform core size (edge tiles are snapped inward and overlap their neighbour,
  only the owned region is written), so ``batch`` tiles run through a stage together. Outside
  the image a crop is zero and is re-zeroed after every pointwise pre-op, which reproduces the
  convs' zero padding at the image border exactly.
* The mid-block self-attention is exact and global: pass 1 writes Q, K and V of every owned
  token to latent-resolution device buffers, exact attention (on CUDA two matrix products per
  chunk of queries, float32 scores of at most 2^27 elements a chunk) gives O, written over
  Q, and pass 2 applies the output projection and residual per tile. Q, K and V take 3·C·h·w
  values on the device (768 MiB in fp16 for a 4096² SD image, C = 512); before it starts and
  once it is done, a memory plan's device store takes their room. A plan with no room for
  them keeps them on the host (``attention_on_host``), copied in a chunk of queries or a block
  of keys at a time.

Device memory is bounded by one batch of tiles plus those latent-resolution buffers. The
canvases on ``store`` hold up to three activations at once; the peak is at full resolution:
decode ≈ (c₁ + 2c₀)·H·W elements (c₀, c₁ the first two ``block_out_channels``: 512 channels
for SD, 16 GiB in fp16 / 32 GiB in fp32 for a 4096² image), encode ≈ 3c₀·H·W (12 GiB fp16).
With a CPU store every canvas crosses the host link once per stage, which dominates the time.
On CUDA canvases and tile batches are channels-last (the convs run ~1.5× faster on tensor
cores), the norm-affine is the inference batch-norm kernel, and the attention is two GEMMs per
chunk of queries with float32 scores and one softmax kernel (:mod:`tileup.vae.softmax`; the
512-wide head has no flash/cuDNN kernel and the memory-efficient one ran it at 14 % of peak).
Measured on an H200 (bf16, tile 512 px, batch 4; bench/vae/README.md) a 4096² image once
encoded in 4.8 s and decoded in 7.2 s with an 8 GiB card's device store, the rest on the host,
bound by host-side crop and paste copies. So on CUDA a canvas that would wait on the host is
not stored at all: its stage keeps only its statistics, and every later stage that reads it
computes its crops again from the last canvas stored on the device, through the chain of
stages in between (convs, norm-activations, resnet adds, samplers), on crops widened by each
conv's halo (:class:`tileup.vae.engine.Recipe`; at most ``MAX_CHAIN`` stages, then a canvas
is stored on the host after all). A full-resolution conv costs milliseconds, a gigabyte
canvas crossing the host link hundreds of them. A resnet whose input is recomputed (or on
the host) reduces its first conv to statistics only and computes it again inside its second
stage, so its input is produced once per batch. Every stage boundary is one host sync (to
check the statistics are finite); crop and paste work per tile is tile-sized, never
image-sized.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from tileup import upsample_conv
from tileup.vae import attention, copies, epilogue
from tileup.vae.engine import (
    Canvas,
    Lane,
    NonFiniteError,
    StageBatch,
    StagedEngine,
    VaeGrid,
    vae_grid,
)
from tileup.vae.norms import NormAffines
from tileup.vae.protocols import (
    Attention,
    Decoder,
    Downsample,
    Encoder,
    MidBlock,
    Placeable,
    ResnetBlock,
    Upsample,
    Vae,
)

__all__ = ["NonFiniteError", "store_bytes", "tiled_decode", "tiled_encode", "vae_scale_factor"]


def vae_scale_factor(vae: Vae) -> int:
    """Pixels per latent pixel of an AutoencoderKL: ``2 ** (len(block_out_channels) - 1)``."""
    factor: int = 2 ** (len(vae.config.block_out_channels) - 1)  # int ** int is Any to mypy
    return factor


# --- ops ---------------------------------------------------------------------------------------


def _norm_act(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, act: nn.Module | None, dtype: torch.dtype
) -> torch.Tensor:
    """``act(x·a + b)`` in ``dtype``, rounded as diffusers rounds: the affine computed in float32
    and stored in ``dtype`` (one pass: no float32 copy of ``x``), then the activation in place.
    Keeps ``x``'s memory format."""
    if x.is_cuda and x.dtype == dtype != torch.float32:
        # the inference batch norm kernel: x·a + b with float32 a, b on half x, 2.8× faster
        # than a mixed-precision addcmul (bench/vae/profile_vae.py micro)
        ones, zeros = torch.ones_like(a).flatten(), torch.zeros_like(a).flatten()
        h = F.batch_norm(x, zeros, ones, a.flatten(), b.flatten(), False, 0.0, 1e-30)
    else:
        h = torch.empty_like(x, dtype=dtype)
        torch.addcmul(b, x, a, out=h)
    if act is None:
        return h
    if isinstance(act, nn.SiLU):
        return F.silu(h, inplace=True)
    return act(h)  # type: ignore[no-any-return]  # an nn.Module call is Any to mypy


def _conv(conv: nn.Conv2d, h: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """``conv`` without its padding (the crop carries the halo / zero border instead); with
    ``skip``, ``skip + conv(h)`` (bias and skip in one pass on CUDA, :mod:`tileup.vae.epilogue`,
    PyTorch's values)."""
    w, b = conv.weight, conv.bias
    return epilogue.conv2d(h, w, b, conv.stride, conv.dilation, conv.groups, skip)


def _halo(conv: nn.Conv2d) -> tuple[int, int]:
    """Halo of a stride-1 'same' conv: (p, p)."""
    k, p = conv.kernel_size, conv.padding
    if not (
        isinstance(p, tuple)
        and k[0] == k[1]
        and p[0] == p[1] == (k[0] - 1) // 2
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
    ):
        raise NotImplementedError(f"unsupported conv for tiling: {conv}")
    return p[0], p[0]


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"tiled VAE supports diffusers AutoencoderKL with GroupNorm blocks; {what}"
    )


def _resnet(eng: StagedEngine, x: Canvas, r: ResnetBlock) -> Canvas:
    """ResnetBlock2D (no time embedding, no up/down): two stages."""
    if (
        type(r).__name__ != "ResnetBlock2D"
        or r.time_emb_proj is not None
        or r.upsample is not None
        or r.downsample is not None
    ):
        raise _unsupported(f"got resnet {type(r).__name__}")
    dtype, m = eng.dtype, x.scale
    a1, b1 = eng.affine(x, r.norm1)

    def first(crops: list[torch.Tensor], batch: StageBatch) -> torch.Tensor:
        a, b, lane = batch.lane(a1), batch.lane(b1), batch.lane
        return _conv(
            lane(r.conv1), batch.zero_outside(_norm_act(crops[0], a, b, r.nonlinearity, dtype))
        )

    out_bytes = r.conv2.out_channels * eng.grid.height * eng.grid.width * m * m
    recompute = _recomputes_first_conv(eng, x, out_bytes * dtype.itemsize)
    l1 = _halo(r.conv1)
    h = eng.stage(
        [x], first, channels=r.conv1.out_channels, scale=m, halo=l1, keep=not recompute, chain=True
    )
    a2, b2 = eng.affine(h, r.norm2)
    lo, hi = _halo(r.conv2)

    def second(crops: list[torch.Tensor], batch: StageBatch) -> torch.Tensor:
        a, b, lane = batch.lane(a2), batch.lane(b2), batch.lane
        skip = crops[1][:, :, lo : crops[1].shape[2] - hi, lo : crops[1].shape[3] - hi]
        shortcut = r.conv_shortcut
        if isinstance(shortcut, nn.Conv2d) and shortcut.padding == (0, 0):
            skip = _conv(lane(shortcut), skip)
        elif shortcut is not None:
            skip = lane(shortcut)(skip)
        h = batch.zero_outside(_norm_act(crops[0], a, b, r.nonlinearity, dtype))
        if r.output_scale_factor == 1:  # x / 1 is x: the sum is the block's output
            return _conv(lane(r.conv2), h, skip)
        return (skip + _conv(lane(r.conv2), h)) / r.output_scale_factor

    if not recompute:
        channels = r.conv2.out_channels
        return eng.stage([h, x], second, channels=channels, scale=m, halo=(lo, hi), chain=True)

    def both(crops: list[torch.Tensor], batch: StageBatch) -> torch.Tensor:
        """``first`` on a crop wider by the second conv's halo, then ``second`` on its output."""
        x_crop = crops[0]
        h_crop = first([x_crop], batch)
        rows, cols = x_crop.shape[-2:]
        x_inner = x_crop[:, :, l1[0] : rows - l1[1], l1[0] : cols - l1[1]]
        return second([h_crop, x_inner], batch.inner(l1[0]))

    channels = r.conv2.out_channels
    halo = (l1[0] + lo, l1[1] + hi)
    return eng.stage([x], both, channels=channels, scale=m, halo=halo, chain=True)


def _recomputes_first_conv(eng: StagedEngine, x: Canvas, out_bytes: int) -> bool:
    """Whether a resnet block on ``x`` whose output takes ``out_bytes`` recomputes its first conv
    inside its second stage (:attr:`StagedEngine.recompute`; None: on CUDA when ``x`` waits on
    the host or is recomputed — read it once for both convs — or when the first conv's output
    and the block's would not both stay on the device: storing the first would leave the
    output, or later canvases, to the host or to deeper recomputation)."""
    if eng.recompute is not None:
        return eng.recompute
    if eng.device.type != "cuda":
        return False
    return x.data.device.type == "cpu" or not eng.fits(2 * out_bytes)


def _attention(eng: StagedEngine, x: Canvas, attn: Attention) -> Canvas:
    """The VAE mid-block self-attention, exact over the whole latent-resolution canvas.

    Pass 1 projects every owned token to Q, K and V in raster order (device buffers of
    1×heads×(h·w)×d each), then one global attention gives O; pass 2 applies the output
    projection and the residual tile by tile. With several lanes each projects the tokens its
    tiles own into buffers on its device, then takes every key and value and the queries its
    cores read from the others, and computes the output of those queries.
    """
    if (
        attn.spatial_norm is not None
        or attn.norm_q is not None
        or attn.norm_k is not None
        or attn.group_norm is None
        or attn.is_cross_attention
    ):
        raise _unsupported("got an attention variant it does not mirror")
    eng.reclaim([x])  # the room the store had until now is the buffers'
    dtype, m = eng.dtype, x.scale
    heads, inner = attn.heads, attn.to_q.out_features
    d, channels = inner // heads, x.data.shape[0]
    rows, cols = eng.grid.height * m, eng.grid.width * m
    lanes = range(len(eng.lanes))
    devices = [lane.device or eng.device for lane in eng.lanes]
    qkv = [  # per lane, Q, K and V (1×heads×(h·w)×d) on its device, of the tokens its tiles own
        _attention_buffers((1, heads, rows * cols, d), dtype, dev, eng) for dev in devices
    ]
    held = [t.device.type != "cpu" for t in qkv[0]]  # on the store's device: Q, K, V
    a, b = eng.affine(x, attn.group_norm)

    def grid5(t: torch.Tensor) -> torch.Tensor:
        return t.view(heads, rows, cols, d)

    def project(crops: list[torch.Tensor], batch: StageBatch) -> None:
        lane = batch.lane
        h = _norm_act(crops[0], lane(a), lane(b), None, dtype).permute(0, 2, 3, 1)  # B×th×tw×C
        mine = qkv[eng.lanes.index(lane)]
        for proj, dst in zip((attn.to_q, attn.to_k, attn.to_v), mine, strict=True):
            p = lane(proj)(h).unflatten(-1, (heads, d)).permute(0, 3, 1, 2, 4)  # B×heads×th×tw×d
            for i, (top, left) in enumerate(batch.cores):
                y0, y1, x0, x1 = batch.owned[i]
                grid5(dst[0])[:, top + y0 : top + y1, left + x0 : left + x1] = p[i, :, y0:y1, x0:x1]

    eng.stage([x], project, channels=0, scale=m, halo=(0, 0))
    bands = eng.bands(m)
    jobs, reaches = [], [eng.reach(k, m) for k in lanes]
    for k in lanes:  # each lane: every key and value, the queries its cores read
        for which, need in ((0, reaches[k]), (1, (0, rows)), (2, (0, rows))):
            views = [grid5(qkv[j][which][0]) for j in lanes]
            eng.share_rows(views, k, need, bands[k], m)
        q, key, value = qkv[k]
        jobs.append((q[:, :, reaches[k][0] * cols : reaches[k][1] * cols], key, value))
    # per lane: the output of its queries (heads×its rows×cols×d) and the first of those rows
    outs = [
        (o[0].reshape(heads, bottom - top, cols, d), top)
        for (top, bottom), o in zip(
            reaches,
            attention.sdpa(jobs, over_queries=True, devices=devices, budget=eng.scores_budget),
            strict=True,
        )
    ]
    buffer = heads * rows * cols * d * dtype.itemsize
    del q, key, value
    qkv.clear()  # K and V freed (O is over Q): budgeted beside the store, now the store's
    jobs.clear()
    eng.release((held[1] + held[2]) * buffer)

    def out(crops: list[torch.Tensor], batch: StageBatch) -> torch.Tensor:
        x_in = crops[0]
        th, tw = x_in.shape[-2:]
        lane = batch.lane
        o, first = outs[eng.lanes.index(lane)]
        h = torch.stack([o[:, y - first : y - first + th, x : x + tw] for y, x in batch.cores])
        h = h.to(x_in.device).permute(0, 2, 3, 1, 4).flatten(-2)  # B×th×tw×inner
        h = lane(attn.to_out[1])(lane(attn.to_out[0])(h)).permute(0, 3, 1, 2)
        if attn.residual_connection:
            h = h + x_in
        return h / attn.rescale_output_factor

    result = eng.stage([x], out, channels=channels, scale=m, halo=(0, 0))
    outs.clear()
    eng.release(held[0] * buffer)  # and Q, holding O
    return result


def _attention_buffers(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, eng: StagedEngine
) -> list[torch.Tensor]:
    """Q, K and V buffers of the mid-block attention on ``device``: K and V first (every chunk
    of queries reads all of them), then Q (read and written over once); each that does not fit
    (the plan's estimate was low, or the device's free memory lies in pieces) on the host
    instead, noted in the engine's notes: the attention then copies it in blocks. All three on
    the host with :attr:`StagedEngine.attention_on_host`."""
    buffers: dict[str, torch.Tensor] = {}
    where = torch.device("cpu") if eng.attention_on_host else device
    for name in "KVQ":
        try:
            buffers[name] = torch.empty(shape, dtype=dtype, device=where)
        except torch.OutOfMemoryError:
            buffers[name] = torch.empty(shape, dtype=dtype, device="cpu")
            eng.notes.append(f"VAE out of memory: the attention's {name} on the host")
    return [buffers["Q"], buffers["K"], buffers["V"]]


def _mid(eng: StagedEngine, x: Canvas, mid: MidBlock) -> Canvas:
    """UNetMidBlock2D: resnet, then (attention, resnet) pairs."""
    if type(mid).__name__ != "UNetMidBlock2D":
        raise _unsupported(f"got mid block {type(mid).__name__}")
    x = _resnet(eng, x, mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            x = _attention(eng, x, attn)
        x = _resnet(eng, x, resnet)
    return x


def _downsample(eng: StagedEngine, x: Canvas, ds: Downsample) -> Canvas:
    """Downsample2D with a stride-2 conv (diffusers pads (0, 1, 0, 1) when ``padding == 0``)."""
    conv = getattr(ds, "conv", None)
    if (
        not ds.use_conv
        or ds.norm is not None
        or not isinstance(conv, nn.Conv2d)
        or conv.stride != (2, 2)
        or conv.kernel_size != (3, 3)
        or not isinstance(conv.padding, tuple)  # not "same"/"valid"
        or conv.padding[0] != conv.padding[1]
        or x.scale % 2
    ):
        raise _unsupported(f"got downsampler {ds}")
    p = conv.padding[0]
    halo = (p, 3 - 2 - p)  # output o reads input 2o - p .. 2o - p + 2

    def down(crops: list[torch.Tensor], batch: StageBatch) -> torch.Tensor:
        return _conv(batch.lane(conv), crops[0])

    channels, scale = conv.out_channels, x.scale // 2
    return eng.stage([x], down, channels=channels, scale=scale, halo=halo, chain=True)


def _phase_upsampling(weight: torch.Tensor) -> bool:
    """Whether the upsamplers of a VAE whose weights lie like ``weight`` run as phase convs
    (:mod:`tileup.upsample_conv`): on CUDA, unless ``TILEUP_PHASE_UPSAMPLE=off``. The CPU keeps
    the plain form (and its outputs)."""
    return weight.is_cuda and upsample_conv.enabled()


def _upsample(eng: StagedEngine, x: Canvas, us: Upsample) -> Canvas:
    """Upsample2D: nearest ×2, then a 3×3 conv (halo 1 low-res px, 2 high-res px cropped off)."""
    conv = upsample_conv.conv_of(us)
    if us.use_conv_transpose or us.norm is not None or not us.interpolate or not us.use_conv:
        raise _unsupported(f"got upsampler {us}")
    if conv is None:
        raise _unsupported("got an upsampler without a Conv2d")
    lo, hi = _halo(conv)
    if (lo, hi) != (1, 1):
        raise _unsupported(f"got upsampler conv {conv}")
    folded = None  # the conv as four phases (2.25× fewer multiply-adds), folded once
    if _phase_upsampling(conv.weight) and upsample_conv.plain_3x3(conv):
        bias4 = None if conv.bias is None else conv.bias.repeat(4)
        folded = (upsample_conv.folded_weight(conv.weight), bias4)

    def up(crops: list[torch.Tensor], batch: StageBatch) -> torch.Tensor:
        if folded is not None:
            weight, bias = folded
            bias = None if bias is None else batch.lane(bias)
            return upsample_conv.folded_conv(crops[0], batch.lane(weight), bias, padding=0)
        h = _conv(batch.lane(conv), copies.upsample_nearest2x(crops[0]))
        return h[:, :, 1:-1, 1:-1]

    channels, scale = conv.out_channels, x.scale * 2
    return eng.stage([x], up, channels=channels, scale=scale, halo=(1, 1), chain=True)


# --- encoder / decoder walks --------------------------------------------------------------------


def _encode_one(
    eng: StagedEngine, enc: Encoder, quant: nn.Module | None, latent: int, image: Canvas
) -> tuple[torch.Tensor, bool]:
    """Encoder → quant_conv → posterior mean; (latent C×h×w float32 CPU, whether every
    statistic and output was finite)."""
    x = eng.stage(
        [image],
        lambda c, b: _conv(b.lane(enc.conv_in), c[0]),
        channels=enc.conv_in.out_channels,
        scale=image.scale,
        halo=_halo(enc.conv_in),
        chain=True,
    )
    del image  # stored until nothing reads it (a recipe may)
    for block in enc.down_blocks:
        if type(block).__name__ != "DownEncoderBlock2D":
            raise _unsupported(f"got down block {type(block).__name__}")
        for r in block.resnets:
            x = _resnet(eng, x, r)
        for ds in block.downsamplers or ():
            x = _downsample(eng, x, ds)
    x = _mid(eng, x, enc.mid_block)
    a, b = eng.affine(x, enc.conv_norm_out)
    flags: list[torch.Tensor] = []

    def out(crops: list[torch.Tensor], batch: StageBatch) -> torch.Tensor:
        lane = batch.lane
        h = batch.zero_outside(_norm_act(crops[0], lane(a), lane(b), enc.conv_act, eng.dtype))
        h = _conv(lane(enc.conv_out), h)
        if quant is not None:
            h = lane(quant)(h)
        h = h[:, :latent]
        flags.append(torch.isfinite(h).all())  # on the lane's device: no wait between lanes
        return h

    z = eng.stage(
        [x],
        out,
        channels=latent,
        scale=x.scale,
        halo=_halo(enc.conv_out),
        out_dtype=torch.float32,
        out_device=torch.device("cpu"),
    )
    return z.data, eng.all_finite(flags)


def _decode_one(
    eng: StagedEngine, dec: Decoder, post: nn.Module | None, z: Canvas, unit_range: bool
) -> tuple[torch.Tensor, bool]:
    """post_quant_conv → Decoder; (image 3×H×W float32 CPU clamped to [-1, 1], or mapped to
    [0, 1] with ``unit_range``; whether every statistic and output was finite)."""
    norm_out = dec.conv_norm_out
    if type(norm_out).__name__ != "GroupNorm" or not isinstance(norm_out, nn.GroupNorm):
        raise _unsupported("got a decoder with spatial norm")

    def conv_in(crops: list[torch.Tensor], batch: StageBatch) -> torch.Tensor:
        h = crops[0] if post is None else batch.zero_outside(batch.lane(post)(crops[0]))
        return _conv(batch.lane(dec.conv_in), h)

    channels, halo = dec.conv_in.out_channels, _halo(dec.conv_in)
    x = eng.stage([z], conv_in, channels=channels, scale=z.scale, halo=halo, chain=True)
    x = _mid(eng, x, dec.mid_block)
    for block in dec.up_blocks:
        if type(block).__name__ != "UpDecoderBlock2D":
            raise _unsupported(f"got up block {type(block).__name__}")
        for r in block.resnets:
            x = _resnet(eng, x, r)
        for us in block.upsamplers or ():
            x = _upsample(eng, x, us)
    a, b = eng.affine(x, norm_out)
    flags: list[torch.Tensor] = []

    def out(crops: list[torch.Tensor], batch: StageBatch) -> torch.Tensor:
        lane = batch.lane
        h = batch.zero_outside(_norm_act(crops[0], lane(a), lane(b), dec.conv_act, eng.dtype))
        h = _conv(lane(dec.conv_out), h)
        flags.append(torch.isfinite(h).all())  # on the lane's device: no wait between lanes
        h = h.clamp(-1, 1).float()
        return h.add_(1).div_(2).clamp_(0, 1) if unit_range else h

    img = eng.stage(
        [x],
        out,
        channels=dec.conv_out.out_channels,
        scale=x.scale,
        halo=_halo(dec.conv_out),
        out_dtype=torch.float32,
        out_device=torch.device("cpu"),
        out_channels_last=True,
    )
    return img.data, eng.all_finite(flags)


# --- public API ---------------------------------------------------------------------------------


_M = TypeVar("_M", bound=Placeable)


def _placed(
    main: _M, conv: nn.Module | None, device: torch.device, dtype: torch.dtype
) -> tuple[_M, nn.Module | None]:
    """The VAE's ``main`` module (encoder or decoder) and its optional quant ``conv`` on
    (device, dtype): the originals when already there, otherwise converted copies (the caller's
    VAE is never modified)."""
    params = [*main.parameters(), *(conv.parameters() if conv is not None else ())]
    if all(p.device == device and p.dtype == dtype for p in params):
        return main, conv
    return (
        copy.deepcopy(main).to(device, dtype),
        None if conv is None else copy.deepcopy(conv).to(device, dtype),
    )


def _encoder(vae: Vae) -> tuple[Encoder, nn.Module | None]:
    """The modules an encode pass runs: the encoder and the quant conv (if any)."""
    return vae.encoder, getattr(vae, "quant_conv", None)


def _decoder(vae: Vae) -> tuple[Decoder, nn.Module | None]:
    """The modules a decode pass runs: the decoder and the post-quant conv (if any)."""
    return vae.decoder, getattr(vae, "post_quant_conv", None)


def _staged(
    part: Callable[[Vae], tuple[_M, nn.Module | None]],
    vae: Vae,
    lanes: Sequence[tuple[Vae, torch.device | str]],
    grid: VaeGrid,
    where: tuple[torch.device, torch.dtype, torch.device],
    batch: int,
    store_limit: int | None,
    notes: list[str] | None,
) -> tuple[StagedEngine, _M, nn.Module | None]:
    """A pass's modules (``part`` of ``vae``) placed on the (device, dtype) of ``where`` and its
    staged engine over ``grid`` (store: ``where``'s third), with a :class:`Lane` per (VAE copy,
    device) in ``lanes`` whose modules are that copy's ``part``, placed alike."""
    dev, dt, st = where
    main, conv = _placed(*part(vae), dev, dt)

    def tree(pair: tuple[Placeable, nn.Module | None]) -> nn.Module:
        return nn.ModuleList([m for m in pair if m is not None])  # type: ignore[misc]  # modules

    others = []
    for copy_, device in lanes:
        lane_dev = torch.device(device)
        placed = _placed(*part(copy_), lane_dev, dt)
        others.append(Lane.of(lane_dev, tree((main, conv)), tree(placed)))
    cap = _cap(dev, store_limit)
    eng = StagedEngine(
        grid,
        dev,
        dt,
        st,
        max(1, batch),
        store_cap=cap,
        notes=notes,
        lanes=others,
        top_scale=vae_scale_factor(vae),
    )
    return eng, main, conv


def store_bytes(vae: Vae, height: int, width: int, dtype: torch.dtype, *, decode: bool) -> int:
    """Approximate peak bytes the canvases need on ``store`` for an H×W image (px)."""
    c = vae.config.block_out_channels
    channels = (c[min(1, len(c) - 1)] + 2 * c[0]) if decode else 3 * c[0]
    return channels * height * width * torch.empty((), dtype=dtype).element_size()


def _setup(
    vae: Vae,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    store: torch.device | str,
    need: Callable[[torch.dtype], int],
) -> tuple[torch.device, torch.dtype, torch.device]:
    """Resolve (device, dtype, store); ``need(dtype)`` is the store's peak in bytes."""
    first = next(vae.parameters())
    dev = torch.device(device) if device is not None else first.device
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    dt = dtype or first.dtype
    if store == "device":
        st = dev
    elif store == "auto":
        fits = dev.type == "cuda" and need(dt) <= torch.cuda.mem_get_info(dev)[0] // 2
        st = dev if fits else torch.device("cpu")
    else:
        st = torch.device(store)
        if st.type == dev.type and st.index is None:
            st = dev
    return dev, dt, st


def _set_attention(
    eng: StagedEngine,
    part: Encoder | Decoder,
    on_host: bool,
    scores_limit: int | None,
    *,
    lend: bool,
) -> None:
    """Where the mid-block attention's Q, K and V go (``on_host``: the host from the start) and
    how many bytes its chunk of scores may take. ``lend``: until it starts, the device store
    may take the room Q, K and V will hold (budgeted beside the store). The encoder's largest
    canvases come before it (at 8192² px on an 8 GiB card its encode took 10.0 s instead of
    13.5); the decoder's come after it, where lending only raised the smallest plan's peak
    (4096², 1.46 → 1.71 GiB; bench/vae/results/low_vram_peaks_h200.json)."""
    eng.attention_on_host = on_host
    if scores_limit is not None:
        eng.scores_budget = max(1, scores_limit // attention.SCORE_BYTES)
    attn = next((a for a in part.mid_block.attentions if a is not None), None)
    if lend and attn is not None and not on_host:
        itemsize = torch.empty((), dtype=eng.dtype).element_size()
        eng.lend(3 * attn.to_q.out_features * eng.grid.height * eng.grid.width * itemsize)


def _cap(device: torch.device, store_limit: int | None) -> int | None:
    """The device bytes allowed in all while the call runs: what is allocated now plus
    ``store_limit`` (None: no cap; canvases go to ``store``)."""
    if store_limit is None or device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device) + store_limit


def tiled_encode(
    vae: Vae,
    image: torch.Tensor,
    *,
    tile: int = 512,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    batch: int = 1,
    store: torch.device | str = "cpu",
    store_limit: int | None = None,
    notes: list[str] | None = None,
    lanes: Sequence[tuple[Vae, torch.device | str]] = (),
    unit_range: bool = False,
    attention_on_host: bool = False,
    scores_limit: int | None = None,
    norms: NormAffines | None = None,
) -> torch.Tensor:
    """Posterior mean of a diffusers AutoencoderKL, computed tile by tile, exactly.

    ``image``: N×3×H×W float in [-1, 1] (any device), H and W multiples of the scale factor
    f (:func:`vae_scale_factor`); with ``unit_range`` in [0, 1], mapped by ``x·2 − 1`` in its
    dtype as it is copied to where the encoder runs (the same values as mapping it first, with
    no pass over the whole image on the host). Returns N×C×H/f×W/f float32 on the CPU,
    *unscaled* (the caller multiplies by ``vae.config.scaling_factor``); equals
    ``vae.encode(image).latent_dist.mean`` up to float rounding, deterministically.

    ``tile``: core size in image px (a multiple of f); ``device``/``dtype``: where and in what
    precision to compute (default: the VAE's); ``batch``: tiles per forward call (device memory
    grows with it); ``store``: where the full-size activations wait between stages:
    ``"cpu"`` keeps device memory bounded by the tile (CPU memory: :func:`store_bytes`),
    ``"device"`` is several times faster when they fit, ``"auto"`` takes the device when they
    need at most half of its free memory; ``store_limit`` (CUDA) instead places each activation
    on the device while the device holds at most that many bytes more than when the call
    started, plus the bytes the mid-block attention's Q, K and V take (budgeted beside the
    store) before they exist (canvases over the cap then move to the host) and after, else on
    the host: the budget of a memory plan. On out-of-memory the batch
    is halved (noted in ``notes``). ``lanes``: copies of the VAE on other devices, each taking
    its turn of every stage's tile batches (the canvases stay with ``device``; the result is the
    one-device result when the devices compute alike). ``attention_on_host``: the mid-block
    attention's Q, K and V wait on the host (copied in by chunk; a plan's smallest budget).
    ``scores_limit``: device bytes its chunk of scores and probabilities may take (None: as
    far as free memory allows, up to :data:`tileup.vae.attention.SCORES_BUDGET` scores).
    ``norms``: the GroupNorm affines to record, or to take (:mod:`tileup.vae.norms`; one
    picture). Raises NonFiniteError on NaN/inf.
    """
    f = vae_scale_factor(vae)
    if image.ndim != 4 or image.shape[1] != vae.config.in_channels:
        raise ValueError(f"image must be N×{vae.config.in_channels}×H×W, got {tuple(image.shape)}")
    _, _, height, width = image.shape
    if height % f or width % f or tile % f or tile < f:
        raise ValueError(f"image size {height}×{width} and tile {tile} must be multiples of {f}")
    dev, dt, st = _setup(
        vae, device, dtype, store, lambda d: store_bytes(vae, height, width, d, decode=False)
    )
    grid = vae_grid(height // f, width // f, tile // f)
    eng, enc, quant = _staged(_encoder, vae, lanes, grid, (dev, dt, st), batch, store_limit, notes)
    _set_attention(eng, enc, attention_on_host, scores_limit, lend=True)
    eng.norms = None if norms is None else norms.for_pass(len(image))
    latent = vae.config.latent_channels
    outs = []
    with torch.inference_mode():
        for one in image:
            z, finite = _encode_one(eng, enc, quant, latent, eng.canvas(one, f, signed=unit_range))
            if not finite:
                raise NonFiniteError(f"VAE encode produced NaN/inf in {dt}")
            outs.append(z)
    return torch.stack(outs)


def tiled_decode(
    vae: Vae,
    latents: torch.Tensor,
    *,
    tile: int = 64,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    batch: int = 1,
    store: torch.device | str = "cpu",
    store_limit: int | None = None,
    notes: list[str] | None = None,
    lanes: Sequence[tuple[Vae, torch.device | str]] = (),
    unit_range: bool = False,
    attention_on_host: bool = False,
    scores_limit: int | None = None,
    norms: NormAffines | None = None,
) -> torch.Tensor:
    """Decode with a diffusers AutoencoderKL tile by tile, exactly.

    ``latents``: N×C×h×w, *unscaled* (already divided by ``scaling_factor``), any device.
    Returns N×3×h·f×w·f float32 on the CPU, clamped to [-1, 1]; equals
    ``vae.decode(latents).sample.clamp(-1, 1)`` up to float rounding, deterministically.
    ``unit_range``: ``(x + 1) / 2`` clamped to [0, 1] instead, computed tile by tile where the
    decoder runs (the same float32 operations as on the returned tensor). On a channels-last
    (CUDA) engine the image is laid out H×W×3 (``image.permute(1, 2, 0)`` is contiguous), and
    one picture comes back without a copy.

    ``tile``: core size in latent px; other arguments as in :func:`tiled_encode`. Raises
    NonFiniteError when the decoder produces NaN/inf (SD1.5/SDXL VAEs in fp16): re-run in
    float32.
    """
    f = vae_scale_factor(vae)
    if latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
        raise ValueError(
            f"latents must be N×{vae.config.latent_channels}×h×w, got {tuple(latents.shape)}"
        )
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    h, w = latents.shape[2] * f, latents.shape[3] * f
    dev, dt, st = _setup(
        vae, device, dtype, store, lambda d: store_bytes(vae, h, w, d, decode=True)
    )
    grid = vae_grid(latents.shape[2], latents.shape[3], tile)
    eng, dec, post = _staged(_decoder, vae, lanes, grid, (dev, dt, st), batch, store_limit, notes)
    _set_attention(eng, dec, attention_on_host, scores_limit, lend=False)
    eng.norms = None if norms is None else norms.for_pass(len(latents))
    outs = []
    with torch.inference_mode():
        for one in latents:
            img, finite = _decode_one(eng, dec, post, eng.canvas(one, 1), unit_range)
            if not finite:
                raise NonFiniteError(f"VAE decode produced NaN/inf in {dt}")
            outs.append(img)
    return outs[0][None] if len(outs) == 1 else torch.stack(outs)

"""Nearest ×2 upsampling then a 3×3 conv, computed as one 2×2 conv with four output phases.

In ``conv3x3(up2(x))`` (zero padding 1) output pixel (2i + dy, 2j + dx) reads upsampled rows
2i + dy − 1 … 2i + dy + 1, which are rows i + dy − 1 and i + dy of ``x`` (nearest upsampling
repeats each row twice). So its three kernel rows fold into two, [K0, K1 + K2] for dy = 0 and
[K0 + K1, K2] for dy = 1, and the columns likewise. The four phases (dy, dx), stacked as 4·O
output channels, make one 2×2 conv over ``x`` whose output (i + dy, j + dx) is the phase's
pixel (i, j): 16 instead of 36 multiply-adds per pixel of ``x`` and weight (2.25× fewer), and
no upsampled copy 4× the input's size.

The same function up to rounding: each folded tap is summed in float32 and cast to the weight's
dtype (in bf16, one more rounding of that tap), and the conv sums in another order. The SD UNets'
upsamplers are ~9 % of an SD 1.5 UNet call's FLOPs (three at 64² tiles: 68 of 783 GFLOP a
sample) and the VAE decoder's three are ~28 % of its convs'. Used on CUDA, in the UNet eager or
compiled (:func:`swap_upsamplers`, from :data:`MIN_PIXELS` input pixels) and the tiled VAE
(:mod:`tileup.vae.tiled`), unless ``TILEUP_PHASE_UPSAMPLE=off``. The compiled SD 1.5 fused call
(27 tiles at 64², H200, 2026-12-01, bench/diffusion/results/inductor-phase-upsample-h200.json):
103.77 → 101.34 ms.
"""

from __future__ import annotations

import os
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from tileup.vae import copies

__all__ = [
    "conv_of",
    "enabled",
    "folded_conv",
    "folded_weight",
    "phase_conv",
    "plain_3x3",
    "swap_upsamplers",
]


def enabled() -> bool:
    """Whether upsamplers take the phase form (``TILEUP_PHASE_UPSAMPLE``, default ``on``)."""
    return os.environ.get("TILEUP_PHASE_UPSAMPLE", "on") != "off"


def plain_3x3(conv: nn.Module) -> bool:
    """Whether ``conv`` is a plain 3×3 ``nn.Conv2d``: stride 1, padding 1 with zeros, no
    dilation or groups."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def conv_of(upsampler: object) -> nn.Conv2d | None:
    """A diffusers ``Upsample2D``'s conv (``conv``, or ``Conv2d_0`` under its old name), or
    None where it has no ``nn.Conv2d`` there."""
    name = "conv" if getattr(upsampler, "name", "conv") == "conv" else "Conv2d_0"
    conv = getattr(upsampler, name, None)
    return conv if isinstance(conv, nn.Conv2d) else None


def folded_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3×3 conv's O×I×3×3 ``weight`` as the 4·O×I×2×2 weight of its four phases, in the order
    (dy, dx) = (0, 0), (0, 1), (1, 0), (1, 1); folded in float32 (or ``weight``'s dtype when
    wider), returned in ``weight``'s dtype."""
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))

    def fold(t: torch.Tensor, dim: int, phase: int) -> torch.Tensor:
        k0, k1, k2 = t.unbind(dim)
        pair = (k0, k1 + k2) if phase == 0 else (k0 + k1, k2)
        return torch.stack(pair, dim)

    phases = [fold(fold(w, 2, dy), 3, dx) for dy in (0, 1) for dx in (0, 1)]
    return torch.cat(phases).to(weight.dtype)


def phase_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, padding: int
) -> torch.Tensor:
    """``conv3x3(up2(x))`` of a B×I×H×W ``x`` with an O×I×3×3 ``weight``.

    ``padding=1``: the conv's zero padding, B×O×2H×2W, as
    ``F.conv2d(F.interpolate(x, scale_factor=2), weight, bias, padding=1)``. ``padding=0``: on a
    crop with a halo of one ``x`` pixel a side, the unpadded conv on its upsampling less a
    further upsampled pixel a side, B×O×2(H−2)×2(W−2) (the tiled VAE's crops). Laid out as the
    conv's output (channels-last for channels-last ``x`` on CUDA)."""
    bias4 = None if bias is None else bias.repeat(4)
    return folded_conv(x, folded_weight(weight), bias4, padding=padding)


def folded_conv(
    x: torch.Tensor, folded: torch.Tensor, bias4: torch.Tensor | None, *, padding: int
) -> torch.Tensor:
    """:func:`phase_conv` with the weight already folded (:func:`folded_weight`) and the bias
    repeated for the four phases (``bias.repeat(4)``): for callers that run one upsampler
    many times (the tiled VAE's crop batches)."""
    out_channels = folded.shape[0] // 4
    phases = F.conv2d(x, folded, bias4, padding=padding)  # B×4O×(n+1)×(m+1)
    rows, cols = phases.shape[-2] - 1, phases.shape[-1] - 1
    if torch.compiler.is_compiling():
        return _interleaved(phases, out_channels, rows, cols)
    layout = (
        torch.channels_last
        if phases.is_contiguous(memory_format=torch.channels_last) and phases.dim() == 4
        else torch.contiguous_format
    )
    shape = (phases.shape[0], out_channels, 2 * rows, 2 * cols)
    out = torch.empty(shape, dtype=phases.dtype, device=phases.device, memory_format=layout)
    for p, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        src = phases[:, p * out_channels : (p + 1) * out_channels, dy : dy + rows, dx : dx + cols]
        copies.copy_(out[:, :, dy::2, dx::2], src)
    return out


def _interleaved(phases: torch.Tensor, out_channels: int, rows: int, cols: int) -> torch.Tensor:
    """:func:`folded_conv`'s interleaving of the four phases as one stack and reshape, which
    torch.compile traces into one kernel (the wide-element copies are for eager runs)."""
    parts = [
        phases[:, p * out_channels : (p + 1) * out_channels, dy : dy + rows, dx : dx + cols]
        for p, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1)))
    ]
    rows_of = [torch.stack(parts[2 * dy : 2 * dy + 2], dim=-1) for dy in (0, 1)]  # B×O×n×m×2
    grid = torch.stack(rows_of, dim=3)  # B×O×n×2×m×2
    return grid.reshape(phases.shape[0], out_channels, 2 * rows, 2 * cols)


def _forward(
    self: Any, hidden_states: torch.Tensor, output_size: Any = None, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """``Upsample2D.forward`` in the phase form where it is the plain nearest ×2 + conv."""
    base: Any = type(self).__mro__[1]  # the diffusers class swapped from
    rows, cols = hidden_states.shape[-2:]
    doubled = output_size is None or tuple(output_size) == (2 * rows, 2 * cols)
    if args or kwargs or rows * cols < MIN_PIXELS or not doubled:
        return cast(torch.Tensor, base.forward(self, hidden_states, output_size, *args, **kwargs))
    conv = cast(nn.Conv2d, conv_of(self))  # swapped in only with one (_eligible)
    return phase_conv(hidden_states, conv.weight, conv.bias, padding=1)


MIN_PIXELS = 256
"""Fewest input pixels an upsampler takes the phase form at: measured on an H200 (2026-12-01,
bench/diffusion/results/phase-upsample-h200.json, bf16, channels-last) the SD 1.5 UNet's
upsamplers of a 54-sample call took 0.86 → 1.09 ms at 8² (slower), 2.59 → 2.03 ms at 16² and
3.23 → 1.84 ms at 32²; SDXL's 1.80× and 1.94× faster, the tiled VAE's crops at 8192² 1.9–2.0×."""

_PHASED: dict[type, type] = {}
"""Per upsampler class, its subclass whose forward is :func:`_forward`."""


def _eligible(layer: nn.Module) -> bool:
    """Whether ``layer`` is a diffusers ``Upsample2D`` that upsamples by nearest ×2 and then
    runs a plain 3×3 conv (no norm, no transposed conv)."""
    if type(layer).__name__ != "Upsample2D":
        return False
    if getattr(layer, "norm", None) is not None or getattr(layer, "use_conv_transpose", True):
        return False
    if not (getattr(layer, "interpolate", False) and getattr(layer, "use_conv", False)):
        return False
    conv = conv_of(layer)
    return conv is not None and plain_3x3(conv)


def swap_upsamplers(module: nn.Module) -> int:
    """Make every eligible upsampler of ``module`` compute in the phase form, in place (its
    class becomes a subclass with that ``forward``: parameters, state dict and hooks stay);
    returns how many."""
    count = 0
    for layer in module.modules():
        if not _eligible(layer):
            continue
        cls = type(layer)
        if cls not in _PHASED:
            _PHASED[cls] = type(f"Phase{cls.__name__}", (cls,), {"forward": _forward})
        layer.__class__ = _PHASED[cls]
        count += 1
    return count

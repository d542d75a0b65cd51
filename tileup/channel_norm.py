"""GroupNorm from per-channel statistics, for the compiled UNet and crop VAE.

``torch.compile`` lowers a GroupNorm on a channels-last activation to one reduction per group,
whose elements lie a few channels wide and a whole pixel apart in memory: on one 576² redraw
crop the VAE's norms took 2.3 of the encoder's 5.4 ms of kernels and 4.7 of the decoder's
10.5 ms, ~0.5 TB/s (H200, 2026-11-30, ``bench/vae/crop_variants.py``). :class:`ChannelGroupNorm`
states the same norm as a per-channel mean and variance over the pixels (a reduction whose
neighbouring outputs are neighbours in memory), merged per group (Chan's formula: a group's
channels hold equal pixel counts), then a per-channel ``x·a + b`` in float32, all of it visible
to inductor, which fuses the conv bias, residual sum and SiLU into it as before: the crop's
encode 5.81 → 4.65 ms, decode 11.30 → 8.80 ms, outputs as far from inductor's GroupNorm as
another reduction order is (same measurement).

The compiled SD 1.5 UNet, replayed from CUDA graphs, gained as much (``bench/diffusion/
unet_norms.py``, H200, 2026-11-30): 54 samples at 64² 109.4 → 104.5 ms a call (the fused
job's 60 calls 6.56 → 6.27 s), the redraw's 2-8 samples at 72² 8.64 → 8.23 up to 25.07 →
23.95 ms (its 440 calls 8.34 → 7.95 s), outputs 0.018 apart (bf16).

Used where the module runs only compiled: the crop VAE (a copy, :func:`with_group_norms`;
``TILEUP_CROP_NORM=inductor`` keeps PyTorch's) and the UNet (in place,
:func:`swap_group_norms`; ``TILEUP_UNET_NORM=inductor`` keeps PyTorch's). Eager,
PyTorch's GroupNorm stays (there the form above would be several kernels instead of one).
Values: GroupNorm's up to float32 rounding.
"""

from __future__ import annotations

import copy
import os
from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn


def for_crop_vae() -> bool:
    """Whether the compiled crop VAE takes :class:`ChannelGroupNorm` (default; ``TILEUP_CROP_
    NORM=inductor``: PyTorch's GroupNorm as inductor lowers it)."""
    return os.environ.get("TILEUP_CROP_NORM", "channels") == "channels"


def for_unet() -> bool:
    """Whether the compiled UNet takes :class:`ChannelGroupNorm` (default; ``TILEUP_UNET_NORM=
    inductor``: PyTorch's GroupNorm as inductor lowers it)."""
    return os.environ.get("TILEUP_UNET_NORM", "channels") == "channels"


class ChannelGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` from per-channel statistics (module docstring) for affine 4-d input,
    PyTorch's for anything else; output in the input's dtype and memory format."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not self.affine:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        n, c, groups = x.shape[0], x.shape[1], self.num_groups
        per = c // groups
        var, mean = torch.var_mean(x.float(), dim=(2, 3), correction=0)  # n×C each
        mean, var = mean.view(n, groups, per), var.view(n, groups, per)
        group_mean = mean.mean(-1, keepdim=True)
        group_var = (var + (mean - group_mean) ** 2).mean(-1, keepdim=True)
        scale = torch.rsqrt(group_var + self.eps) * self.weight.float().view(1, groups, per)
        shift = self.bias.float().view(1, groups, per) - group_mean * scale
        y = x.float() * scale.view(n, c, 1, 1) + shift.view(n, c, 1, 1)
        return y.to(x.dtype)


def swap_group_norms(module: nn.Module, kind: type[nn.GroupNorm] = ChannelGroupNorm) -> None:
    """Make every ``nn.GroupNorm`` layer of ``module`` (exactly that class) a ``kind``, in place
    (a subclass with its own ``forward``: parameters, buffers and hooks stay)."""
    for layer in module.modules():
        if type(layer) is nn.GroupNorm:
            layer.__class__ = kind


_Module = TypeVar("_Module")


def with_group_norms(module: _Module, kind: type[nn.GroupNorm] = ChannelGroupNorm) -> _Module:
    """A copy of ``module`` with :func:`swap_group_norms` applied, sharing every parameter and
    buffer with ``module`` (no weights are copied; moving or casting the original's parameters
    in place reaches the copy)."""
    root = cast(nn.Module, module)
    memo: dict[int, object] = {id(t): t for t in (*root.parameters(), *root.buffers())}
    clone = copy.deepcopy(root, memo)
    swap_group_norms(clone, kind)
    return cast(_Module, clone)

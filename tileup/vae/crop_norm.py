"""GroupNorm of a compiled redraw crop through the tiled VAE's kernels (opt-in, being measured).

``torch.compile`` turns the VAE's GroupNorms on one 576² crop into reductions that run at
~0.5 TB/s: 2.3 of the encoder's 5.4 ms of kernels and 4.7 of the decoder's 10.5 ms (H200,
2026-11-30, ``bench/vae/crop_variants.py``). The tiled VAE's statistics kernel
(:func:`tileup.vae.stats.channel_stats`) and batch-norm affine (:func:`tileup.vae.tiled._norm_act`)
take ~1.8 ms of norms for a 512² tile. :func:`with_group_norms` gives the crop pass a copy of
the VAE whose GroupNorms call them as one custom op, which inductor calls but does not fuse into
(the conv bias, residual sum and SiLU it fused into its own norm then run as kernels of their
own). ``TILEUP_CROP_NORM=kernel`` turns it on for ``--compile``'s crop VAE; off by default
until a GPU measurement says it is faster. Values: GroupNorm's up to float32 rounding.
"""

from __future__ import annotations

import copy
import os
from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn


def enabled() -> bool:
    """Whether the compiled crop VAE takes its GroupNorms from the tiled VAE's kernels
    (``TILEUP_CROP_NORM=kernel``; default ``inductor``)."""
    return os.environ.get("TILEUP_CROP_NORM", "inductor") == "kernel"


@torch.library.custom_op("tileup::crop_group_norm", mutates_args=())
def crop_group_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float
) -> torch.Tensor:
    """Affine GroupNorm of a 1×C×H×W ``x`` in its dtype and memory format, as the tiled VAE
    computes it: per-channel float32 mean and M2 in one pass, merged per group in float64
    (:func:`tileup.vae.stats.group_affine`), applied as a per-channel ``x·a + b`` computed in
    float32."""
    from tileup.vae.stats import channel_stats, group_affine
    from tileup.vae.tiled import _norm_act

    mean, m2 = channel_stats(x)
    pixels = torch.full((1,), x.shape[2] * x.shape[3], dtype=torch.float64, device=x.device)
    a, b = group_affine(mean.double(), m2.double(), pixels, groups, eps, weight, bias)
    return _norm_act(x, a.float().view(1, -1, 1, 1), b.float().view(1, -1, 1, 1), None, x.dtype)


@crop_group_norm.register_fake
def _crop_group_norm_shape(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float
) -> torch.Tensor:
    return torch.empty_like(x)


class KernelGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` through :func:`crop_group_norm` for one affine 4-d image (a crop pass
    runs one crop a call), PyTorch's GroupNorm for anything else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[0] != 1 or not self.affine:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        out: torch.Tensor = crop_group_norm(x, self.weight, self.bias, self.num_groups, self.eps)
        return out


_Module = TypeVar("_Module")


def with_group_norms(module: _Module, kind: type[nn.GroupNorm] = KernelGroupNorm) -> _Module:
    """A copy of ``module`` whose ``nn.GroupNorm`` layers are of class ``kind`` (a subclass
    with its own ``forward``), sharing every parameter and buffer with ``module`` (no weights
    are copied; moving or casting the original's parameters in place reaches the copy)."""
    root = cast(nn.Module, module)
    memo: dict[int, object] = {id(t): t for t in (*root.parameters(), *root.buffers())}
    clone = copy.deepcopy(root, memo)
    for layer in clone.modules():
        if type(layer) is nn.GroupNorm:
            layer.__class__ = kind
    return cast(_Module, clone)

"""GroupNorm with its statistics taken in row chunks, for the compiled crop VAE.

``torch.compile`` turns ``nn.GroupNorm`` on one channels-last crop into reductions with one
program per group (32 for a redraw crop), which leaves most of a large GPU idle: in the
compiled redraw's crop VAE (576² crops, H200, 2026-11-30) the norms took 4.8 of the decode's
10.7 ms of kernels and 2.3 of the encode's 5.4 ms. :class:`ChunkedGroupNorm` states the same
statistics as ``chunks`` partial means and variances per group (each over a band of rows),
merged with Chan's formula in float32, which compiles to reductions with ``chunks`` times the
programs. Outside compilation it is plain float32 arithmetic; the values are GroupNorm's up to
float32 rounding.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

CHUNKS = 8
"""Bands of rows per group's statistics (fewer when the height does not divide)."""


def row_chunks(height: int, most: int = CHUNKS) -> int:
    """The most bands up to ``most`` that split ``height`` rows evenly."""
    return next(k for k in range(most, 0, -1) if height % k == 0)


class ChunkedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (affine) whose statistics are merged from row bands (module docstring);
    input N×C×H×W in any memory layout, output in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not self.affine:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        b, c, h, w = x.shape
        g, k = self.num_groups, row_chunks(h)
        xf = x.float()
        var, mean = torch.var_mean(
            xf.view(b, g, c // g, k, h // k, w), dim=(2, 4, 5), correction=0, keepdim=True
        )  # b×g×1×k×1×1: each band's mean and variance
        group_mean = mean.mean(dim=3, keepdim=True)
        group_var = (var + (mean - group_mean) ** 2).mean(dim=3, keepdim=True)  # equal bands
        rstd = torch.rsqrt(group_var + self.eps)
        y = ((xf.view(b, g, c // g, k, h // k, w) - group_mean) * rstd).view(b, c, h, w)
        y = y * self.weight.float()[:, None, None] + self.bias.float()[:, None, None]
        return y.to(x.dtype)


def with_chunked_norms(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose ``nn.GroupNorm`` layers are :class:`ChunkedGroupNorm`; the
    copy shares every parameter and buffer with ``module`` (no weights are copied)."""
    memo: dict[int, object] = {id(t): t for t in (*module.parameters(), *module.buffers())}
    clone = copy.deepcopy(module, memo)
    for layer in clone.modules():
        if type(layer) is nn.GroupNorm:
            layer.__class__ = ChunkedGroupNorm
    return clone

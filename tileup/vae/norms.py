"""GroupNorm affines recorded by one tiled VAE pass and given to another: the estimated mode.

The exact tiled VAE (:mod:`tileup.vae.tiled`) gives every GroupNorm the statistics of the whole
activation, so each norm is a barrier: every tile must reach it before any tile may pass it.
Under a memory cap the activations that do not fit are recomputed, and each barrier costs a
pass over every tile through the chain of stages behind it (at 8192² px on an 8 GiB card the
decode spends ~10 s on that; ``bench/vae/README.md``).

The estimated mode is A1111's and ComfyUI's Tiled VAE "Fast Encoder / Fast Decoder": the
statistics come from the same network run on a small copy of the input, whose per-channel mean
and standard deviation are set back to the full input's (their "distribution shift" fix; see
:func:`small_copy`). Here that run is the exact tiled pass itself (any memory plan holds it),
which records each norm's per-channel affine ``x·a + b`` in the order it applies them
(:class:`NormAffines`); the full-size pass then takes those affines instead of its own
statistics, so no stage runs a pass for statistics alone and a recomputed activation costs
nothing until a stored one or the output reads it. Tiling stays exact: the full pass equals the
untiled network with those fixed norms, up to float rounding. Only the statistics are
estimates, and what that changes depends on the VAE's weights and the picture (measured with
random weights only: ``tests/vae/test_estimated_norms.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NormAffines", "small_copy"]


@dataclass
class NormAffines:
    """Per GroupNorm, in the order a pass over one picture applies them, its per-channel
    affine ``(a, b)`` (float32 1×C×1×1 on the compute device) and the norm's (groups, channels).

    Empty, an engine records into it (:meth:`record`); once :attr:`given` (:meth:`frozen`), an
    engine takes a fresh copy's affines in the same order (:meth:`take`) and skips every pass
    that only made statistics."""

    affines: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    shapes: list[tuple[int, int]] = field(default_factory=list)
    given: bool = False
    taken: int = 0
    """Affines handed out so far."""

    def record(self, norm: nn.GroupNorm, a: torch.Tensor, b: torch.Tensor) -> None:
        """Keep ``norm``'s affine, in order (not into given affines)."""
        if self.given:
            raise RuntimeError("given affines are not recorded into")
        self.affines.append((a, b))
        self.shapes.append((norm.num_groups, norm.num_channels))

    def take(self, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """The next recorded affine, which must be for a norm of ``norm``'s shape."""
        k = self.taken
        shape = (norm.num_groups, norm.num_channels)
        if k >= len(self.affines) or self.shapes[k] != shape:
            raise RuntimeError(f"no recorded affine for GroupNorm {k} of shape {shape}")
        self.taken += 1
        return self.affines[k]

    def for_pass(self, pictures: int) -> NormAffines:
        """These norms for a pass over ``pictures`` pictures, which must be one: given ones as a
        fresh copy (taken from the first), empty ones as they are (recorded into)."""
        if pictures != 1:
            raise ValueError(f"norms hold one picture's GroupNorm affines, got {pictures} pictures")
        return self.frozen() if self.given else self

    def frozen(self) -> NormAffines:
        """These affines, to be given to a pass."""
        return NormAffines(list(self.affines), list(self.shapes), given=True)


def small_copy(x: torch.Tensor, side: int, multiple: int = 1) -> torch.Tensor:
    """``x`` (N×C×H×W) downsized so that its longer side is at most ``side`` (nearest-exact, to
    whole multiples of ``multiple`` px, at least one; unchanged when it already fits), each
    channel's mean and
    standard deviation set back to ``x``'s and the values clamped to ``x``'s range: the input of
    the estimated mode's statistics pass. Computed in float32, returned in ``x``'s dtype."""
    height, width = x.shape[-2:]
    if max(height, width) <= side:
        return x
    shrink = side / max(height, width)
    size = tuple(max(multiple, int(n * shrink) // multiple * multiple) for n in (height, width))
    full = x.float()
    small = F.interpolate(full, size=size, mode="nearest-exact")
    std, mean = torch.std_mean(full, dim=(0, 2, 3), keepdim=True)
    small_std, small_mean = torch.std_mean(small, dim=(0, 2, 3), keepdim=True)
    small = (small - small_mean) / small_std.clamp_min(1e-6) * std + mean
    low, high = torch.aminmax(full)
    return small.clamp_(low, high).to(x.dtype)

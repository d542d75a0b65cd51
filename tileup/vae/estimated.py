"""The tiled VAE with estimated GroupNorm statistics (:mod:`tileup.vae.norms`): per picture,
an exact tiled pass over a small copy records every norm's affine, and the full-size pass takes
them. Same arguments and results as :func:`tileup.vae.tiled.tiled_encode` and
:func:`tileup.vae.tiled.tiled_decode`, but for the statistics."""

from __future__ import annotations

from typing import Any

import torch

from tileup.vae.norms import SMALL_SIDE, NormAffines, small_copy
from tileup.vae.protocols import Vae
from tileup.vae.tiled import tiled_decode, tiled_encode, vae_scale_factor

__all__ = ["estimated_decode", "estimated_encode"]


def estimated_encode(vae: Vae, image: torch.Tensor, **options: Any) -> torch.Tensor:
    """:func:`tileup.vae.tiled.tiled_encode` of ``image`` (N×3×H×W) with each picture's
    statistics from its copy of at most :data:`tileup.vae.norms.SMALL_SIDE` px a side."""
    f = vae_scale_factor(vae)
    outs = []
    for one in image:
        norms = NormAffines()
        tiled_encode(vae, small_copy(one[None], SMALL_SIDE, f), norms=norms, **options)
        outs.append(tiled_encode(vae, one[None], norms=norms.frozen(), **options))
    return torch.cat(outs)


def estimated_decode(vae: Vae, latents: torch.Tensor, **options: Any) -> torch.Tensor:
    """:func:`tileup.vae.tiled.tiled_decode` of ``latents`` (N×C×h×w, unscaled) with each
    picture's statistics from its latents' copy of at most ``SMALL_SIDE / f`` px a side."""
    side = max(1, SMALL_SIDE // vae_scale_factor(vae))
    outs = []
    for one in latents:
        norms = NormAffines()
        tiled_decode(vae, small_copy(one[None], side), norms=norms, **options)
        outs.append(tiled_decode(vae, one[None], norms=norms.frozen(), **options))
    return torch.cat(outs)

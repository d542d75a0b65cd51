"""The tiled VAE with estimated GroupNorm statistics (:mod:`tileup.vae.norms`): per picture,
an exact tiled pass over a small copy records every norm's affine, and the full-size pass takes
them. Same arguments and results as :func:`tileup.vae.tiled.tiled_encode` and
:func:`tileup.vae.tiled.tiled_decode`, but for the statistics. Measured on an emulated 8 GiB
card (H200, 2026-12-01, bench/vae/README.md): a 2048² → 8192² job's VAE 26.4 → 16.8 s, its
whole job 67.0 → 57.1 s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tileup.vae.norms import NormAffines, small_copy
from tileup.vae.protocols import Vae
from tileup.vae.tiled import tiled_decode, tiled_encode, vae_scale_factor

__all__ = ["SMALL_SIDE", "estimated_decode", "estimated_encode"]

SMALL_SIDE = 1024
"""Longest side, in image px, of the copy the statistics come from (A1111's fast mode downsizes
to one tile; a whole 1024² image is cheap for an exact tiled pass)."""

_Pass = Callable[..., torch.Tensor]


def _estimated(
    run: _Pass, vae: Vae, x: torch.Tensor, side: int, multiple: int, **options: Any
) -> torch.Tensor:
    """``run`` per picture of ``x`` with its affines from its copy of at most ``side`` px: a
    picture that small is its own copy, and its exact pass is the result. The small pass keeps
    its notes apart (they would describe the copy, not the picture)."""
    outs = []
    for one in x:
        picture = one[None]
        small = small_copy(picture, side, multiple)
        if small is picture:
            outs.append(run(vae, picture, **options))
            continue
        norms = NormAffines()
        run(vae, small, **{**options, "notes": []}, norms=norms)
        outs.append(run(vae, picture, **options, norms=norms.frozen()))
    return outs[0] if len(outs) == 1 else torch.cat(outs)  # one picture: the pass's own layout


def estimated_encode(vae: Vae, image: torch.Tensor, **options: Any) -> torch.Tensor:
    """:func:`tileup.vae.tiled.tiled_encode` of ``image`` (N×3×H×W) with each picture's
    statistics from its copy of at most :data:`SMALL_SIDE` px a side."""
    f = vae_scale_factor(vae)
    return _estimated(tiled_encode, vae, image, SMALL_SIDE, f, **options)


def estimated_decode(vae: Vae, latents: torch.Tensor, **options: Any) -> torch.Tensor:
    """:func:`tileup.vae.tiled.tiled_decode` of ``latents`` (N×C×h×w, unscaled) with each
    picture's statistics from its latents' copy of at most ``SMALL_SIDE / f`` px a side."""
    side = max(1, SMALL_SIDE // vae_scale_factor(vae))
    return _estimated(tiled_decode, vae, latents, side, 1, **options)

"""Classifier-free guidance pairs share the start of the UNet: computed once, then doubled.

Under guidance every latent goes through the UNet twice, uncond and cond, which differ only in
the text states. In an SD 1.5 / SD 2.x UNet the time embedding depends on the timestep alone,
so everything before the first cross-attention sees the same input twice: ``conv_in``, the
first resnet of the first down block, and that block's first transformer up to its
self-attention (~40 of the 803 GFLOP a 64² latent costs, and the 64² self-attention runs at
the UNet's lowest rate). :func:`install` gives such a UNet a paired call: called with ``k``
latents and ``2k`` text states (uncond then cond), it runs diffusers' own forward on the
doubled batch, but its first resnet and that self-attention compute the first half only and
repeat it. The result is the plain call's on ``torch.cat([x, x])`` up to kernel rounding (a
batch of ``k`` may pick other kernels than one of ``2k``); the batch layout, every later layer,
ControlNet-style residuals, CUDA graphs and ``torch.compile`` see the same doubled batch.

SDXL adds the pooled text embeds to the time embedding, so its halves differ from the first
resnet on: :func:`supports` refuses it (and any UNet whose first block is not a plain
resnet + self-attention transformer), and :func:`tileup.sampling.guidance.guided_prediction`
then doubles the batch itself. ``TILEUP_CFG_PREFIX=off`` turns the sharing off (for
benchmarks).

Measured on an H200 (SD 1.5, bf16, 27 tiles of 64² a call replayed from CUDA graphs,
2026-12-01, bench/diffusion/results/shared-prefix-h200.json): eager 153.5 → 150.3 ms a call
with bit-identical output, compiled 110.0 → 107.4 ms (2.5 % of the call's 43.4 TFLOP saved);
the compiled reference job 8.31 → 8.12 s.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["Pairing", "install", "pairs_guidance", "supports"]


class Pairing:
    """Whether the UNet call under way runs a doubled guidance batch (set by the UNet's paired
    call for its duration; read by the shared layers)."""

    def __init__(self) -> None:
        self.active = False


def enabled() -> bool:
    """Whether UNets get the paired call: unless ``TILEUP_CFG_PREFIX=off``."""
    return os.environ.get("TILEUP_CFG_PREFIX", "on") != "off"


def _first_transformer_block(unet: nn.Module) -> nn.Module | None:
    blocks = getattr(unet, "down_blocks", None)
    first = blocks[0] if blocks else None
    attentions = getattr(first, "attentions", None)
    if not attentions or not getattr(first, "resnets", None):
        return None
    inner = getattr(attentions[0], "transformer_blocks", None)
    return inner[0] if inner else None


def supports(unet: nn.Module) -> bool:
    """Whether ``unet``'s first resnet and first self-attention see identical halves under
    guidance: a diffusers UNet whose time embedding has no added or class embedding (SD 1.x /
    2.x), whose first down block opens with a resnet and a transformer, and whose first
    transformer block is a plain layer-norm block with self-attention first."""
    config = getattr(unet, "config", None)
    if config is None or getattr(unet, "class_embedding", None) is not None:
        return False
    if getattr(config, "addition_embed_type", None) is not None:
        return False
    if getattr(config, "time_cond_proj_dim", None) is not None:
        return False
    block = _first_transformer_block(unet)
    attn1 = getattr(block, "attn1", None)
    return (
        block is not None
        and attn1 is not None
        and not getattr(attn1, "is_cross_attention", True)
        and not getattr(block, "only_cross_attention", True)
        and getattr(block, "norm_type", None) == "layer_norm"
        and getattr(block, "pos_embed", None) is None
        and getattr(block, "fuser", None) is None
    )


def pairs_guidance(unet: object) -> bool:
    """Whether ``unet`` (or the module a compiled or graphed wrapper holds) takes a guidance
    batch as ``k`` latents with ``2k`` text states."""
    return bool(getattr(unet, "pairs_guidance", False))


def install(unet: nn.Module) -> bool:
    """Give ``unet`` the paired call when :func:`supports` and :func:`enabled` allow (once;
    a deep copy keeps it, bound to the copy). Returns whether ``unet`` has it."""
    if pairs_guidance(unet):
        return True
    if not (enabled() and supports(unet)):
        return False
    pairing = Pairing()
    model: Any = unet  # diffusers' submodules, untyped
    block: Any = _first_transformer_block(unet)
    changes: tuple[tuple[Any, Callable[..., Any]], ...] = (
        (model.down_blocks[0].resnets[0], _first_half_repeated),
        (block.attn1, _first_half_repeated),
        (model, _paired_forward),
    )
    for module, forward in changes:
        module._tileup_pairing = pairing
        module._tileup_plain_forward = type(module).forward  # dynamo cannot trace type(m).forward
        module.forward = types.MethodType(forward, module)
    model.pairs_guidance = True
    return True


def _paired_forward(
    self: Any,
    sample: torch.Tensor,
    timestep: torch.Tensor | float,
    encoder_hidden_states: torch.Tensor | None = None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """The UNet's forward; with ``2k`` text states for ``k`` latents (a guidance pair), the
    latents doubled and the shared layers computing one half."""
    plain = self._tileup_plain_forward
    paired = (
        encoder_hidden_states is not None
        and encoder_hidden_states.shape[0] == 2 * sample.shape[0]
        and not args
    )
    # set on every call, so a call that raised cannot leave the next one sharing
    pairing = self._tileup_pairing
    pairing.active = paired and kwargs.get("cross_attention_kwargs") is None
    if paired:
        sample = torch.cat([sample, sample])
    out = plain(self, sample, timestep, encoder_hidden_states, *args, **kwargs)
    pairing.active = False
    return out


def _first_half_repeated(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The layer's forward; during a paired call on the first half of its batch (and of every
    batched tensor argument), the result repeated for the second half."""
    plain = self._tileup_plain_forward
    if not self._tileup_pairing.active:
        return plain(self, hidden_states, *args, **kwargs)
    half = hidden_states.shape[0] // 2

    def first(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 2 * half:
            return value[:half]
        return value

    out = plain(
        self,
        hidden_states[:half],
        *(first(a) for a in args),
        **{k: first(v) for k, v in kwargs.items()},
    )
    return torch.cat([out, out])

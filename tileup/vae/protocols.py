"""What tileup needs of a diffusers ``AutoencoderKL`` and of the blocks the tiled VAE walks.

Structural types only, nothing here imports diffusers. :class:`Vae` is what the runner and the
public tiled functions take; the block Protocols state which attributes of diffusers'
``Encoder``/``Decoder``, ``ResnetBlock2D``, ``Attention``, ``UNetMidBlock2D``, ``Downsample2D``
and ``Upsample2D`` the tiled walk reads (it also checks their class names at run time and refuses
any other block).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from typing_extensions import Self


class VaeConfig(Protocol):
    """The ``AutoencoderKL`` config keys tileup reads (attribute access, as diffusers allows)."""

    @property
    def block_out_channels(self) -> Sequence[int]: ...

    @property
    def in_channels(self) -> int: ...

    @property
    def latent_channels(self) -> int: ...

    @property
    def scaling_factor(self) -> float: ...


class Posterior(Protocol):
    """The latent distribution of an encode; tileup takes its mean."""

    @property
    def mean(self) -> torch.Tensor: ...


class EncodeOutput(Protocol):
    @property
    def latent_dist(self) -> Posterior: ...


class DecodeOutput(Protocol):
    @property
    def sample(self) -> torch.Tensor: ...


class Placeable(Protocol):
    """A module that can be inspected and moved: ``parameters()`` and ``to(device, dtype)``."""

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def to(self, device: torch.device | None = ..., dtype: torch.dtype | None = ...) -> Self: ...


class ResnetBlock(Protocol):
    """``ResnetBlock2D`` without time embedding or resampling (those members must be None)."""

    norm1: nn.GroupNorm
    conv1: nn.Conv2d
    norm2: nn.GroupNorm
    conv2: nn.Conv2d
    nonlinearity: nn.Module
    conv_shortcut: nn.Module | None
    output_scale_factor: float
    time_emb_proj: object
    upsample: object
    downsample: object


class Attention(Protocol):
    """diffusers' ``Attention`` as a VAE mid-block self-attention (group norm, no extras)."""

    group_norm: nn.GroupNorm | None
    spatial_norm: object
    norm_q: object
    norm_k: object
    is_cross_attention: bool
    heads: int
    to_q: nn.Linear
    to_k: nn.Linear
    to_v: nn.Linear
    to_out: Sequence[Callable[[torch.Tensor], torch.Tensor]]  # (linear, dropout)
    residual_connection: bool
    rescale_output_factor: float


class MidBlock(Protocol):
    """``UNetMidBlock2D``: resnets[0], then (attention, resnet) pairs."""

    resnets: Sequence[ResnetBlock]
    attentions: Sequence[Attention | None]


class Downsample(Protocol):
    """``Downsample2D`` (its ``conv`` is probed: it must be a stride-2 3×3 ``nn.Conv2d``)."""

    use_conv: bool
    norm: object


class Upsample(Protocol):
    """``Upsample2D``: its conv is ``conv`` or, by ``name``, ``Conv2d_0``."""

    name: str
    conv: nn.Conv2d
    Conv2d_0: nn.Conv2d
    use_conv: bool
    use_conv_transpose: bool
    interpolate: bool
    norm: object


class DownBlock(Protocol):
    """``DownEncoderBlock2D``."""

    resnets: Sequence[ResnetBlock]
    downsamplers: Sequence[Downsample] | None


class UpBlock(Protocol):
    """``UpDecoderBlock2D``."""

    resnets: Sequence[ResnetBlock]
    upsamplers: Sequence[Upsample] | None


class Encoder(Placeable, Protocol):
    conv_in: nn.Conv2d
    down_blocks: Sequence[DownBlock]
    mid_block: MidBlock
    conv_norm_out: nn.GroupNorm
    conv_act: nn.Module
    conv_out: nn.Conv2d


class Decoder(Placeable, Protocol):
    """Its ``conv_norm_out`` must be a GroupNorm (a spatial norm is refused)."""

    conv_in: nn.Conv2d
    mid_block: MidBlock
    up_blocks: Sequence[UpBlock]
    conv_norm_out: nn.Module
    conv_act: nn.Module
    conv_out: nn.Conv2d


class Vae(Placeable, Protocol):
    """A diffusers ``AutoencoderKL``. ``quant_conv``/``post_quant_conv`` are optional (probed
    with ``getattr``); ``encode``/``decode`` are the plain, untiled calls."""

    @property
    def config(self) -> VaeConfig: ...

    encoder: Encoder
    decoder: Decoder

    def encode(self, x: torch.Tensor) -> EncodeOutput: ...

    def decode(self, z: torch.Tensor) -> DecodeOutput: ...

"""Loading super-resolution models through spandrel, without ever executing pickled code.

Files are read by :mod:`tileup.models.weights` (safetensors or a ``weights_only`` pickle, told
apart by content; a file that is not readable weights is a ``WeightsError``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import spandrel
import torch

from tileup.models.weights import first_line, read_weights
from tileup.upscalers.registry import MODEL_SUFFIXES, UpscalerError

__all__ = ["MODEL_SUFFIXES", "UpscalerError", "load_sr_model"]

# Context (in input pixels) around a tile that makes tiled inference match untiled inference
# within 2/255, by architecture. Measured on an H200 in fp32 (bench/pixel/margin_sweep.py,
# 512² photo, 128 px tiles): RealESRGAN_x4plus needs 80 (64 leaves 2.4/255), the Compact models
# 32 (24 leaves 0.6/255). Other architectures get a conservative 64.
_CONTEXT_MARGIN = {"ESRGAN": 80, "RealESRGAN Compact": 32, "Compact": 32}
_DEFAULT_CONTEXT_MARGIN = 64


@dataclass(frozen=True, eq=False)
class Stages:
    """A model cut into a deep trunk at input resolution and a shallow upsampling tail.

    ``tail(trunk(x)) == model(x)``; the tail needs only ``tail_margin`` feature pixels of
    context, so it can run in small chunks while the trunk runs on large tiles.
    """

    trunk: torch.nn.Module
    tail: torch.nn.Module
    channels: int
    tail_margin: int = 4


def split_stages(descriptor: spandrel.ImageModelDescriptor) -> Stages | None:
    """Stages of an ESRGAN (RRDBNet) model without pixel-unshuffle; None for anything else.

    spandrel's ESRGAN is ``Sequential(conv_first, ShortcutBlock(body), upsampling tail...)``.
    """
    net = descriptor.model
    layers = getattr(net, "model", None)
    if (
        descriptor.architecture.name != "ESRGAN"
        or getattr(net, "shuffle_factor", None)
        or not isinstance(layers, torch.nn.Sequential)
        or len(layers) < 3
        or not isinstance(layers[0], torch.nn.Conv2d)
    ):
        return None
    return Stages(trunk=layers[:2], tail=layers[2:], channels=layers[0].out_channels)


_CHANNELS_LAST = frozenset({"ESRGAN"})
"""Architectures whose weights go channels-last on CUDA: plain conv nets where cuDNN otherwise
converts every conv's input to NHWC and back. RealESRGAN_x4plus's trunk on an 845² fp16 tile
(H200, 2026-11-30): 218 ms NCHW, 177 ms channels-last; its tail chunk 1.62 → 1.28 ms."""


@dataclass(frozen=True, eq=False)
class SRModel:
    """A loaded image-to-image SR model: input NCHW RGB in [0, 1], output ``scale``× larger."""

    name: str
    descriptor: spandrel.ImageModelDescriptor

    @property
    def architecture(self) -> str:
        return self.descriptor.architecture.name

    @property
    def scale(self) -> int:
        return self.descriptor.scale

    @property
    def context_margin(self) -> int:
        """Input pixels of context each tile needs so that tiled output equals untiled output."""
        return _CONTEXT_MARGIN.get(self.architecture, _DEFAULT_CONTEXT_MARGIN)

    @property
    def stages(self) -> Stages | None:
        """The trunk/tail split when the architecture allows it (lower memory per pixel)."""
        return split_stages(self.descriptor)

    def place(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the weights to ``device`` in ``dtype``; channels-last where that is faster
        (ESRGAN on CUDA; copies made later with ``.to(device)`` keep the layout)."""
        self.descriptor.to(device=device, dtype=dtype)
        if self.channels_last_on(device):
            self.descriptor.model.to(memory_format=torch.channels_last)

    def channels_last_on(self, device: torch.device) -> bool:
        """Whether :meth:`place` makes the weights channels-last on ``device``."""
        return device.type == "cuda" and self.architecture in _CHANNELS_LAST

    @property
    def prefers_untiled(self) -> bool:
        """True when the model tiles internally or tiling would degrade it."""
        return self.descriptor.tiling is not spandrel.ModelTiling.SUPPORTED


def load_sr_model(path: str | Path, name: str | None = None) -> SRModel:
    """Load an SR model file (any spandrel architecture) on the CPU in eval mode, fp32.

    ``name`` defaults to the file's stem. Raises WeightsError for a file that is not readable
    weights, UpscalerError for weights that are not an RGB image-to-image model.
    """
    path = Path(path)
    state_dict = spandrel.canonicalize_state_dict(read_weights(path))
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(state_dict)
    except spandrel.UnsupportedModelError as exc:
        raise UpscalerError(
            f"{path}: not a super-resolution model spandrel recognises "
            f"({len(state_dict)} tensors, none of a known architecture)"
        ) from exc
    except Exception as exc:  # spandrel raises assorted errors for malformed weights
        raise UpscalerError(f"{path}: could not build a model from it ({first_line(exc)})") from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UpscalerError(
            f"{path}: a {descriptor.architecture.name} {descriptor.purpose} model, "
            "not an image-to-image upscaler"
        )
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise UpscalerError(
            f"{path}: {descriptor.architecture.name} model has {descriptor.input_channels}→"
            f"{descriptor.output_channels} channels; only RGB→RGB models are supported"
        )
    descriptor.eval()
    return SRModel(name=name or path.stem, descriptor=descriptor)

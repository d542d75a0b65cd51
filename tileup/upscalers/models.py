"""Loading super-resolution models through spandrel, without ever executing pickled code."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import spandrel
import torch

from tileup.errors import TileupError

MODEL_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")

# Context (in input pixels) around a tile that makes tiled inference match untiled inference
# within 2/255, by architecture. Measured on an H200 in fp32 (bench/pixel/margin_sweep.py,
# 512² photo, 128 px tiles): RealESRGAN_x4plus needs 80 (64 leaves 2.4/255), the Compact models
# 32 (24 leaves 0.6/255). Other architectures get a conservative 64.
_CONTEXT_MARGIN = {"ESRGAN": 80, "RealESRGAN Compact": 32, "Compact": 32}
_DEFAULT_CONTEXT_MARGIN = 64


class UpscalerError(TileupError):
    """An upscaler could not be found or loaded; the message is one line naming the file."""


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


@dataclass(frozen=True, eq=False)
class SRModel:
    """A loaded image-to-image SR model: input NCHW RGB in [0, 1], output ``scale``× larger."""

    name: str
    path: Path
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

    @property
    def prefers_untiled(self) -> bool:
        """True when the model tiles internally or tiling would degrade it."""
        return self.descriptor.tiling is not spandrel.ModelTiling.SUPPORTED


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from .safetensors or a pickle checkpoint with ``weights_only=True``.

    Raises UpscalerError (one line, naming the file) for anything that is not a readable
    weights file, including pickles that would execute code on load.
    """
    if not path.is_file():
        raise UpscalerError(f"{path}: no such model file")
    if path.stat().st_size == 0:
        raise UpscalerError(f"{path}: model file is empty")
    suffix = path.suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise UpscalerError(
            f"{path}: unsupported model file type {suffix!r}; use {', '.join(MODEL_SUFFIXES)}"
        )
    if suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except (safetensors.SafetensorError, OSError, ValueError) as exc:
            raise UpscalerError(
                f"{path}: not a valid safetensors file ({_first_line(exc)})"
            ) from exc
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UpscalerError(
            f"{path}: refused to load: the file holds pickled code or objects that are not plain "
            "weights (only tensors are loaded; convert it to .safetensors)"
        ) from exc
    except Exception as exc:  # torch.load raises many types for non-checkpoint bytes
        raise UpscalerError(
            f"{path}: not a readable PyTorch weights file ({_first_line(exc)})"
        ) from exc
    if not isinstance(loaded, dict):
        raise UpscalerError(f"{path}: holds a {type(loaded).__name__}, not a state dict of weights")
    return loaded


def load_sr_model(path: str | Path, name: str | None = None) -> SRModel:
    """Load an SR model file (any spandrel architecture) on the CPU in eval mode, fp32."""
    path = Path(path)
    state_dict = read_state_dict(path)
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(
            spandrel.canonicalize_state_dict(state_dict)
        )
    except spandrel.UnsupportedModelError as exc:
        raise UpscalerError(
            f"{path}: not a super-resolution model spandrel recognises "
            f"({len(state_dict)} tensors, none of a known architecture)"
        ) from exc
    except Exception as exc:  # spandrel raises assorted errors for malformed weights
        raise UpscalerError(
            f"{path}: could not build a model from it ({_first_line(exc)})"
        ) from exc
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
    return SRModel(name=name or path.stem, path=path, descriptor=descriptor)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__

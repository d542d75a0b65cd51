"""Loading a user's Stable Diffusion checkpoint offline, without executing pickled code.

Accepts what users have: an original single file (LDM / A1111 / ComfyUI layout, ``.safetensors``
or a ``.ckpt``/``.pt``/``.pth`` pickle read with ``weights_only=True``) or a diffusers pipeline
folder (``model_index.json``). Single files carry no configs and no tokenizer: the family is read
from the keys, the configs from the tensor shapes (``tileup.models.families``, starting from the
shipped full-size configs), and the CLIP tokenizer is the one shipped in ``tileup/data``. Nothing
touches a model hub. Files are opened by :mod:`tileup.models.weights` (a file that is not readable
weights is a ``WeightsError``); every other problem, such as weights that do not fit the
architecture, is a ``CheckpointError``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from tileup.choices import PREDICTIONS
from tileup.errors import TileupError
from tileup.models import families as fam
from tileup.models.families import Family, LayoutError, TextEncoderSpec
from tileup.models.weights import Tensors, first_line, open_tensors

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

MAX_TOKENS = 77

_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# diffusers builds folder models without random init only with accelerate installed.
_HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None


_M = TypeVar("_M", bound=nn.Module)


class CheckpointError(TileupError):
    """A checkpoint or VAE could not be found or loaded; the message is one line naming the file."""


@dataclass(frozen=True, eq=False)
class SDModel:
    """A loaded Stable Diffusion model: CPU, float32, eval mode, no gradients.

    ``text_encoders`` is ``(CLIPTextModel,)`` for SD1/SD2 and ``(CLIPTextModel,
    CLIPTextModelWithProjection)`` for SDXL, with one tokenizer each. ``scheduler_config`` is the
    training schedule as diffusers scheduler kwargs. ``model_hash`` is A1111's short hash (first
    10 hex digits of the file's SHA-256; for a folder, of its UNet weights file).
    """

    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: tuple[CLIPTextModel | CLIPTextModelWithProjection, ...]
    tokenizers: tuple[CLIPTokenizer, ...]
    scheduler_config: dict[str, Any]
    name: str
    model_hash: str
    vae_name: str | None = None


def load_checkpoint(
    path: str | Path, *, vae: str | Path | None = None, prediction: str = "auto"
) -> SDModel:
    """Load an SD 1.x / 2.x / XL checkpoint (single file or diffusers folder), offline.

    ``vae``: a VAE single file (LDM names, optionally under ``first_stage_model.``) or a diffusers
    AutoencoderKL folder replacing the checkpoint's VAE; the family's latent scaling is kept.
    ``prediction``: "auto" (a ``v_pred`` key, the SD2-768-v heuristic, or the folder's scheduler
    says), "epsilon" or "v_prediction".
    """
    path = Path(path).expanduser()
    if prediction not in PREDICTIONS:
        raise CheckpointError(
            f"{path}: unknown prediction type {prediction!r}; use {', '.join(PREDICTIONS)}"
        )
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    vae_path = Path(vae).expanduser() if vae is not None else None
    if vae_path is not None and not vae_path.exists():
        raise CheckpointError(f"{vae_path}: no such VAE file or folder")
    if path.is_dir():
        return _load_folder(path, vae_path, prediction)
    return _load_single_file(path, vae_path, prediction)


# --- the model hash ----------------------------------------------------------------------------


def _short_hash(path: Path) -> str:
    """A1111's model hash: the first 10 hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:10]


# --- building models ---------------------------------------------------------------------------


def _adapt_keys(state: dict[str, torch.Tensor], expected: Mapping[str, Any]) -> None:
    """In place: match the ``text_model.`` prefix to the model's own keys (transformers 5 dropped
    it from CLIPTextModel, kept it in CLIPTextModelWithProjection); drop legacy ``position_ids``.
    """
    for key in list(state):
        bare = key.removeprefix("text_model.")
        name = next((k for k in (key, bare, "text_model." + bare) if k in expected), key)
        if name not in expected and name.endswith("position_ids"):
            del state[key]
        elif name != key:
            state[name] = state.pop(key)


def _mismatch(missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            parts.append(f"{label}: {', '.join(keys[:3])}{more}")
    return "; ".join(parts)


def _fill(model: _M, state: dict[str, torch.Tensor], what: str, path: Path) -> _M:
    """Load ``state`` strictly into ``model`` (built on the meta device) as float32 weights.

    ``state`` is consumed: each value is replaced in place by a float32 copy in fresh memory
    (file-backed tensors may be memory-mapped or misaligned, which changes float results of some
    CPU kernels), so source tensors are freed one by one and no weight is held twice for long.
    """
    expected = model.state_dict()
    _adapt_keys(state, expected)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(
        k
        for k in expected.keys() & state.keys()
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: {what} weights do not fit the inferred architecture "
            f"({_mismatch(missing, unexpected, wrong)})"
        )
    for key, value in state.items():
        state[key] = value.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    model.load_state_dict(state, strict=True, assign=True)
    state.clear()
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta and name == "position_ids":  # CLIP's non-persistent buffer
                setattr(module, name, torch.arange(buffer.shape[-1]).expand(buffer.shape))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: {what}: no values for {', '.join(left[:3])}")
    return model.eval().requires_grad_(False)


def _empty(build: Callable[[], _M]) -> _M:
    """Build a model without allocating or initialising its weights."""
    with torch.device("meta"):
        return build()


def _unet_from_file(tensors: Tensors, config: dict, path: Path) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    model = _empty(lambda: UNet2DConditionModel.from_config(config))
    state = convert_ldm_unet_checkpoint(tensors.take(fam.UNET_PREFIX), config)
    return _fill(model, state, "UNet", path)


def _vae_from_file(tensors: Tensors, config: dict, prefix: str, path: Path) -> AutoencoderKL:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    model = _empty(lambda: AutoencoderKL.from_config(config))
    raw = tensors.take(tuple(prefix + part for part in _VAE_PARTS))
    if prefix not in ("", fam.VAE_PREFIX):  # the converter knows only these two
        raw = {k.removeprefix(prefix): v for k, v in raw.items()}
    state = convert_ldm_vae_checkpoint(raw, config)
    del raw
    return _fill(model, state, "VAE", path)


def _text_encoder_from_file(
    tensors: Tensors, spec: TextEncoderSpec, config: dict, path: Path
) -> CLIPTextModel | CLIPTextModelWithProjection:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls: type[CLIPTextModel | CLIPTextModelWithProjection] = (
        CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
    )
    model = _empty(lambda: cls(CLIPTextConfig.from_dict(config)))
    raw = tensors.take(spec.prefix)
    if spec.openclip:
        used = config["num_hidden_layers"]
        unused = re.compile(re.escape(spec.prefix) + r"transformer\.resblocks\.(\d+)\.")
        for key in list(raw):
            m = unused.match(key)
            if (m and int(m[1]) >= used) or (
                key == spec.prefix + "text_projection" and not spec.with_projection
            ):
                del raw[key]
        state = convert_open_clip_checkpoint(model, raw, prefix=spec.prefix)
    else:
        state = convert_ldm_clip_checkpoint(raw, remove_prefix=spec.prefix)
    del raw
    return _fill(model, state, f"{spec.component} (text encoder)", path)


def _shipped_tokenizer(pad_token: str) -> CLIPTokenizer:
    """CLIP BPE tokenizer from the vocabulary shipped in ``tileup/data/tokenizers/clip``."""
    from transformers import CLIPTokenizer

    root = resources.files("tileup").joinpath("data/tokenizers/clip")
    with (
        resources.as_file(root.joinpath("vocab.json")) as vocab,
        resources.as_file(root.joinpath("merges.txt")) as merges,
    ):
        return CLIPTokenizer(
            str(vocab), str(merges), pad_token=pad_token, model_max_length=MAX_TOKENS
        )


# --- single files ------------------------------------------------------------------------------


def _load_single_file(path: Path, vae_path: Path | None, prediction: str) -> SDModel:
    with open_tensors(path) as tensors:
        if tensors.other_keys and not tensors.shapes:  # e.g. an SR model's nested dict
            keys = ", ".join(tensors.other_keys[:5]) or "none"
            raise CheckpointError(
                f"{path}: not a Stable Diffusion checkpoint (no tensors at the top level; "
                f"keys {keys})"
            )
        markers = {*tensors.shapes, *tensors.other_keys}  # A1111 may store them as non-tensors
        try:
            family = fam.detect_family(tensors.shapes.keys())
            configs = fam.infer_configs(tensors.shapes, family)
        except LayoutError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        if "vae" not in configs and vae_path is None:
            raise CheckpointError(
                f"{path}: has no VAE weights ({fam.VAE_PREFIX}); pass a VAE (--vae)"
            )

        def auto() -> str:
            v = fam.V_PRED_KEY in markers or fam.looks_v_prediction(
                family, tensors.get(fam.SD2_V_PROBE_KEY)
            )
            return "v_prediction" if v else "epsilon"

        prediction_type = auto() if prediction == "auto" else prediction
        extra = {"rescale_betas_zero_snr": True} if fam.ZTSNR_KEY in markers else {}
        encoders = tuple(
            _text_encoder_from_file(tensors, spec, configs[spec.component], path)
            for spec in family.text_encoders
        )
        unet = _unet_from_file(tensors, configs["unet"], path)
        if vae_path is None:
            vae_model = _vae_from_file(tensors, configs["vae"], fam.VAE_PREFIX, path)
    if vae_path is not None:  # read after the checkpoint's own file is closed
        vae_model = _load_vae(vae_path, family, family.scaling_factor, unet.config.in_channels)
    return SDModel(
        family=family.name,
        prediction_type=prediction_type,
        unet=unet,
        vae=vae_model,
        text_encoders=encoders,
        tokenizers=tuple(_shipped_tokenizer(s.pad_token) for s in family.text_encoders),
        scheduler_config=fam.scheduler_config(prediction_type, **extra),
        name=path.stem,
        model_hash=_short_hash(path),
        vae_name=_vae_name(vae_path),
    )


def _vae_name(vae_path: Path | None) -> str | None:
    if vae_path is None:
        return None
    return vae_path.name if vae_path.is_dir() else vae_path.stem


def _load_vae(
    path: Path, family: Family, scaling_factor: float, latent_channels: int
) -> AutoencoderKL:
    """A replacement VAE from a single file or a diffusers folder, with ``scaling_factor``."""
    if path.is_dir():
        vae = _vae_from_folder(path)
    else:
        with open_tensors(path) as tensors:
            keys = tensors.shapes.keys()
            prefix = next(
                (p for p in (fam.VAE_PREFIX, "vae.", "") if f"{p}encoder.conv_in.weight" in keys),
                None,
            )
            if prefix is None:
                hint = (
                    "diffusers-format VAE weights; pass the folder with its config.json"
                    if any(k.startswith("encoder.down_blocks.") for k in keys)
                    else f"not a VAE (no encoder.conv_in.weight; {fam.describe_keys(keys)})"
                )
                raise CheckpointError(f"{path}: {hint}")
            try:
                config = fam.vae_config(tensors.shapes, family, prefix)
            except LayoutError as exc:
                raise CheckpointError(f"{path}: {exc}") from exc
            vae = _vae_from_file(tensors, config, prefix, path)
    vae.register_to_config(scaling_factor=scaling_factor)
    if vae.config.latent_channels != latent_channels:
        raise CheckpointError(
            f"{path}: the VAE has {vae.config.latent_channels} latent channels but the UNet "
            f"expects {latent_channels}"
        )
    return vae


# --- diffusers folders -------------------------------------------------------------------------


def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot read {path.name} ({first_line(exc)})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{folder}: {path.name} is not a JSON object")
    return data


def _variant(sub: Path) -> str | None:
    """The weights variant ("fp16", ...) when only variant files are present in ``sub``."""
    names = [p.name for p in sub.glob("*") if p.suffix in (".safetensors", ".bin")]
    if not names or any(re.fullmatch(r"[^.]+\.(safetensors|bin)", n) for n in names):
        return None
    variants = {n.split(".")[-2] for n in names if n.count(".") >= 2}
    return variants.pop() if len(variants) == 1 else None


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers progress bars while loading (tileup reports progress itself)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _pretrained(cls: Any, folder: Path, sub: str) -> Any:
    """``cls.from_pretrained`` of the local ``folder/sub`` as float32, eval, no gradients."""
    variant = _variant(folder / sub)
    try:
        if cls.__module__.startswith("diffusers"):
            model = cls.from_pretrained(
                folder,
                **({"subfolder": sub} if sub else {}),
                local_files_only=True,
                variant=variant,
                torch_dtype=torch.float32,
                low_cpu_mem_usage=_HAS_ACCELERATE,
            )
        else:
            with _quiet_transformers():
                model = cls.from_pretrained(folder / sub, local_files_only=True, variant=variant)
            model = model.to(torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{folder}: cannot load {sub or 'the model'} ({first_line(exc)})"
        ) from exc
    return _aligned(model).eval().requires_grad_(False)


def _aligned(model: nn.Module) -> nn.Module:
    """Move weights that from_pretrained left in misaligned file buffers into fresh memory.

    Some CPU kernels round differently on misaligned data; this keeps a folder and the same
    weights as a single file numerically identical.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    return model


def _vae_from_folder(folder: Path) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    if (folder / "config.json").is_file():
        return _pretrained(AutoencoderKL, folder, "")
    if (folder / "vae" / "config.json").is_file():
        return _pretrained(AutoencoderKL, folder, "vae")
    raise CheckpointError(f"{folder}: not a diffusers VAE folder (no config.json)")


def _component(index: Mapping[str, Any], name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _folder_family(folder: Path, index: Mapping[str, Any]) -> Family:
    kind = index.get("_class_name", "a diffusers pipeline")
    if not _component(index, "unet"):
        raise CheckpointError(
            f"{folder}: {kind} without a UNet; only SD 1.x, SD 2.x and SDXL base are supported"
        )
    if _component(index, "text_encoder_2"):
        if not _component(index, "text_encoder"):
            raise CheckpointError(
                f"{folder}: looks like an SDXL refiner; "
                "only SD 1.x, SD 2.x and SDXL base are supported"
            )
        return fam.FAMILIES["sdxl"]
    if not _component(index, "text_encoder"):
        raise CheckpointError(f"{folder}: {kind} without a text encoder")
    text = _read_json(folder / "text_encoder" / "config.json", folder)
    return fam.FAMILIES["sd2" if text.get("hidden_act") == "gelu" else "sd1"]


def _unet_weights(folder: Path) -> Path:
    files = sorted((folder / "unet").glob("diffusion_pytorch_model*"))
    weights = [p for p in files if p.suffix in (".safetensors", ".bin")] or files
    if not weights:
        raise CheckpointError(f"{folder}: no UNet weights in unet/")
    return weights[0]


def _load_folder(folder: Path, vae_path: Path | None, prediction: str) -> SDModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if not (folder / "model_index.json").is_file():
        raise CheckpointError(
            f"{folder}: a folder but not a diffusers pipeline (no model_index.json)"
        )
    index = _read_json(folder / "model_index.json", folder)
    family = _folder_family(folder, index)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_file, folder) if sched_file.is_file() else {}

    def auto() -> str:
        value = sched.get("prediction_type", "epsilon")
        if value not in PREDICTIONS[1:]:
            raise CheckpointError(f"{folder}: unsupported scheduler prediction_type {value!r}")
        return value

    prediction_type = auto() if prediction == "auto" else prediction
    unet = _pretrained(UNet2DConditionModel, folder, "unet")
    if unet.config.in_channels != unet.config.out_channels:
        raise CheckpointError(
            f"{folder}: the UNet takes {unet.config.in_channels} input channels (an inpainting "
            "or similar model); only text-to-image checkpoints are supported"
        )
    encoders = tuple(
        _pretrained(
            CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel,
            folder,
            spec.component,
        )
        for spec in family.text_encoders
    )
    tokenizers = []
    for i, spec in enumerate(family.text_encoders):
        sub = folder / ("tokenizer_2" if i else "tokenizer")
        if sub.is_dir():
            try:
                tokenizers.append(CLIPTokenizer.from_pretrained(sub, local_files_only=True))
            except (OSError, ValueError) as exc:
                raise CheckpointError(
                    f"{folder}: cannot load {sub.name} ({first_line(exc)})"
                ) from exc
        else:
            tokenizers.append(_shipped_tokenizer(spec.pad_token))
    if vae_path is None:
        vae_model = _pretrained(AutoencoderKL, folder, "vae")
    else:
        own = folder / "vae" / "config.json"
        scale = _read_json(own, folder) if own.is_file() else {}
        scaling = scale.get("scaling_factor", family.scaling_factor)
        vae_model = _load_vae(vae_path, family, scaling, unet.config.in_channels)
    schedule = {k: sched[k] for k in fam.SCHEDULE if k in sched}
    if sched.get("rescale_betas_zero_snr"):
        schedule["rescale_betas_zero_snr"] = True
    return SDModel(
        family=family.name,
        prediction_type=prediction_type,
        unet=unet,
        vae=vae_model,
        text_encoders=encoders,
        tokenizers=tuple(tokenizers),
        scheduler_config=fam.scheduler_config(prediction_type, **schedule),
        name=folder.name,
        model_hash=_short_hash(_unet_weights(folder)),
        vae_name=_vae_name(vae_path),
    )

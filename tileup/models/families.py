"""Stable Diffusion families, told apart by the keys of an original (LDM) single file.

Pure functions over ``key -> shape`` maps (``Mapping[str, Sequence[int]]``; a ``torch.Size`` is
one): which family a file holds, and the diffusers configs of its UNet, VAE and text encoders,
starting from the shipped full-size configs (``tileup/data/configs``) and overriding whatever the
shapes reveal. What the weights cannot reveal follows the SD conventions: GroupNorm 32; UNet
``attention_head_dim`` 8 for SD1 and ``max(1, c // 64)`` per level for SD2/SDXL; text encoders
with ``max(1, hidden // 64)`` heads; ``quick_gelu`` for OpenAI CLIP, ``gelu`` for OpenCLIP; SD2
files hold one more text layer than SD2 uses. Nothing here builds a model or reads a file.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any

import torch

Shapes = Mapping[str, Sequence[int]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
V_PRED_KEY = "v_pred"  # marker tensor A1111/ComfyUI write into v-prediction files
ZTSNR_KEY = "ztsnr"  # marker tensor of zero-terminal-SNR training
# SD2-768-v weights have a much wider spread here than SD2-base (epsilon) weights.
SD2_V_PROBE_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_PROBE_STD = 0.09

SD_TRAINING_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
    }
)
"""The noise schedule every SD 1.x / 2.x / XL model was trained with (diffusers config keys)."""

SCHEDULE = {**SD_TRAINING_CONFIG, "timestep_spacing": "leading"}
"""The training schedule as a checkpoint's scheduler config states it (plus ``prediction_type``)."""


class LayoutError(ValueError):
    """The keys are not those of a supported Stable Diffusion checkpoint; ``str()`` is one line."""


@dataclass(frozen=True)
class TextEncoderSpec:
    """Where one text encoder lives in an LDM file and how to rebuild it in transformers."""

    component: str  # "text_encoder" or "text_encoder_2" (config file and diffusers name)
    prefix: str  # LDM key prefix
    openclip: bool  # OpenCLIP names (resblocks, in_proj) rather than transformers' CLIP names
    pad_token: str
    with_projection: bool = False  # CLIPTextModelWithProjection (pooled, projected output)
    extra_layers: int = 0  # layers the file holds beyond those the model uses

    @property
    def hidden_act(self) -> str:
        return "gelu" if self.openclip else "quick_gelu"


@dataclass(frozen=True)
class Family:
    """One supported model family: its shipped configs and its single-file layout."""

    name: str  # "sd1" | "sd2" | "sdxl"
    config_dir: str  # folder under tileup/data/configs
    text_encoders: tuple[TextEncoderSpec, ...]
    scaling_factor: float  # VAE latent scaling
    heads_per_64_channels: bool  # UNet attention_head_dim convention (else 8 everywhere)


FAMILIES: dict[str, Family] = {
    "sd1": Family(
        "sd1",
        "sd15",
        (TextEncoderSpec("text_encoder", "cond_stage_model.transformer.", False, "<|endoftext|>"),),
        0.18215,
        heads_per_64_channels=False,
    ),
    "sd2": Family(
        "sd2",
        "sd21",
        (TextEncoderSpec("text_encoder", "cond_stage_model.model.", True, "!", extra_layers=1),),
        0.18215,
        heads_per_64_channels=True,
    ),
    "sdxl": Family(
        "sdxl",
        "sdxl",
        (
            TextEncoderSpec(
                "text_encoder", "conditioner.embedders.0.transformer.", False, "<|endoftext|>"
            ),
            TextEncoderSpec(
                "text_encoder_2", "conditioner.embedders.1.model.", True, "!", with_projection=True
            ),
        ),
        0.13025,
        heads_per_64_channels=True,
    ),
}

_UNSUPPORTED = "only SD 1.x, SD 2.x and SDXL base are supported"


def shipped_config(family: str | Family, component: str) -> dict[str, Any]:
    """A fresh copy of the shipped full-size diffusers/transformers config of ``component``."""
    fam = family if isinstance(family, Family) else FAMILIES[family]
    text = resources.files("tileup").joinpath(f"data/configs/{fam.config_dir}/{component}.json")
    return json.loads(text.read_text(encoding="utf-8"))


def scheduler_config(prediction_type: str, **overrides: Any) -> dict[str, Any]:
    """The SD training schedule as diffusers scheduler config keys."""
    return {**SCHEDULE, "prediction_type": prediction_type, **overrides}


# --- detection ---------------------------------------------------------------------------------


def _prefix(key: str) -> str:
    """A short, human-readable group name for ``key`` (for error messages)."""
    if m := re.match(r"(lora_(?:unet|te\d*)_)", key):
        return m[1]
    parts = key.split(".")
    if len(parts) == 1:
        return key
    if len(parts) >= 3 and not parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}."
    return f"{parts[0]}."


def describe_keys(keys: Collection[str], limit: int = 5) -> str:
    """``"found N tensors with prefixes a., b., ..."`` (most common first)."""
    if not keys:
        return "found no tensors"
    common = [p for p, _ in Counter(map(_prefix, keys)).most_common()]
    more = ", ..." if len(common) > limit else ""
    return f"found {len(keys)} tensors with prefixes {', '.join(common[:limit])}{more}"


def _has(keys: Collection[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _is_vae(keys: Collection[str]) -> bool:
    return any(
        f"{p}encoder.conv_in.weight" in keys and f"{p}decoder.conv_out.weight" in keys
        for p in ("", VAE_PREFIX, "vae.")
    )


def detect_family(keys: Collection[str]) -> Family:
    """The family of an LDM single file from its keys; LayoutError says what was found instead."""
    if _has(keys, UNET_PREFIX + "joint_blocks.") or _has(keys, "joint_blocks."):
        raise LayoutError(f"looks like a Stable Diffusion 3 checkpoint (MMDiT); {_UNSUPPORTED}")
    if _has(keys, UNET_PREFIX + "double_blocks.") or _has(keys, "double_blocks."):
        raise LayoutError(f"looks like a Flux checkpoint; {_UNSUPPORTED}")
    if not _has(keys, UNET_PREFIX):
        if any("lora_" in k or ".lora." in k or ".lora_A." in k for k in keys):
            raise LayoutError(f"looks like a LoRA, not a checkpoint ({describe_keys(keys)})")
        if _is_vae(keys):
            raise LayoutError(
                "is a VAE, not a full Stable Diffusion checkpoint; pass it as the VAE (--vae)"
            )
        if _has(keys, "down_blocks.") and _has(keys, "time_embedding."):
            raise LayoutError(
                "looks like diffusers UNet weights; pass the whole diffusers folder "
                "(the one with model_index.json)"
            )
        raise LayoutError(
            f"not a Stable Diffusion checkpoint (no UNet weights under {UNET_PREFIX}; "
            f"{describe_keys(keys)})"
        )
    if UNET_PREFIX + "input_blocks.0.0.weight" not in keys:
        raise LayoutError(
            f"not a Stable Diffusion UNet under {UNET_PREFIX} ({describe_keys(keys)}); "
            f"{_UNSUPPORTED}"
        )
    if "edm_mean" in keys or "edm_std" in keys:
        raise LayoutError(f"looks like Playground v2.5 (EDM schedule); {_UNSUPPORTED}")
    if _has(keys, "conditioner.embedders.0.model."):
        raise LayoutError(f"looks like an SDXL refiner; {_UNSUPPORTED}")
    has_label_emb = _has(keys, UNET_PREFIX + "label_emb.")
    if _has(keys, "conditioner.embedders.1.model."):
        if not has_label_emb:
            raise LayoutError(f"SDXL text encoders but no SDXL UNet (label_emb); {_UNSUPPORTED}")
        return FAMILIES["sdxl"]
    if has_label_emb:
        raise LayoutError(
            f"the UNet has a class/size embedding (label_emb) but no SDXL text encoders; "
            f"{_UNSUPPORTED}"
        )
    if _has(keys, "cond_stage_model.model."):
        return FAMILIES["sd2"]
    if _has(keys, "cond_stage_model.transformer."):
        return FAMILIES["sd1"]
    raise LayoutError(
        "has UNet weights but no text encoder (cond_stage_model. or conditioner.embedders.); "
        f"only full checkpoints are supported ({describe_keys(keys)})"
    )


def looks_v_prediction(family: Family, probe: torch.Tensor | None) -> bool:
    """The SD2-768-v heuristic: ``SD2_V_PROBE_KEY``'s values have std > ``SD2_V_PROBE_STD``."""
    if family.name != "sd2" or probe is None or probe.numel() < 2:
        return False
    return float(probe.float().std()) > SD2_V_PROBE_STD


# --- shape inference ---------------------------------------------------------------------------


def _strip(shapes: Shapes, prefix: str) -> dict[str, tuple[int, ...]]:
    n = len(prefix)
    return {k[n:]: tuple(v) for k, v in shapes.items() if k.startswith(prefix)}


def _shape(s: Mapping[str, tuple[int, ...]], key: str, what: str) -> tuple[int, ...]:
    if key not in s:
        raise LayoutError(f"{what} weights incomplete: no {key!r}")
    return s[key]


def _indices(s: Mapping[str, Any], prefix: str) -> list[int]:
    """Sorted distinct integers N of keys ``prefix + "N."...``."""
    n = len(prefix)
    found = {k[n:].split(".", 1)[0] for k in s if k.startswith(prefix)}
    return sorted(int(i) for i in found if i.isdigit())


def unet_config(shapes: Shapes, family: Family, *, pooled_dim: int | None = None) -> dict:
    """UNet2DConditionModel config of the ``model.diffusion_model.*`` weights in ``shapes``.

    ``pooled_dim`` (SDXL only) is the projection size of the second text encoder; the remaining
    width of ``label_emb`` is 6 size/crop numbers, each embedded in ``addition_time_embed_dim``.
    """
    s = _strip(shapes, UNET_PREFIX)
    what = "UNet"
    conv_in = _shape(s, "input_blocks.0.0.weight", what)
    in_channels, model_channels = conv_in[1], conv_in[0]
    out_channels = _shape(s, "out.2.weight", what)[0]
    if in_channels != out_channels:
        raise LayoutError(
            f"the UNet takes {in_channels} input channels for {out_channels} output channels "
            "(an inpainting, depth, instruct-pix2pix or upscaler model); only text-to-image "
            "checkpoints are supported"
        )
    inputs = _indices(s, "input_blocks.")
    n_down = sum(f"input_blocks.{i}.0.op.weight" in s for i in inputs)
    levels = n_down + 1
    layers, rest = divmod(len(inputs) - 1 - n_down, levels)
    n_out = len(_indices(s, "output_blocks."))
    if rest or layers < 1 or n_out != levels * (layers + 1):
        raise LayoutError(
            f"UNet block layout not understood ({len(inputs)} input blocks, {n_down} "
            f"downsamplers, {n_out} output blocks)"
        )
    channels, down_types, depth = [], [], []
    for level in range(levels):
        first = f"input_blocks.{1 + level * (layers + 1)}."
        channels.append(_shape(s, first + "0.out_layers.3.weight", what)[0])
        attention = _indices(s, first + "1.transformer_blocks.")
        down_types.append("CrossAttnDownBlock2D" if attention else "DownBlock2D")
        depth.append(len(attention) or 1)
    up_types = [
        "CrossAttnUpBlock2D"
        if _has(s, f"output_blocks.{b * (layers + 1)}.1.transformer_blocks.")
        else "UpBlock2D"
        for b in range(levels)
    ]
    if not _has(s, "middle_block.1.transformer_blocks."):
        raise LayoutError("UNet has no mid-block attention; not a Stable Diffusion UNet")
    if channels[0] != model_channels:
        raise LayoutError(f"UNet conv_in has {model_channels} channels, level 0 {channels[0]}")
    to_k = next((v for k, v in s.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((v for k, v in s.items() if k.endswith(".proj_in.weight")), None)
    if to_k is None or proj_in is None:
        raise LayoutError("UNet has no cross-attention (attn2) weights")

    cfg = shipped_config(family, "unet")
    cfg.update(
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=down_types,
        up_block_types=up_types,
        transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else depth,
        cross_attention_dim=to_k[1],
        use_linear_projection=len(proj_in) == 2,
        attention_head_dim=(
            [max(1, c // 64) for c in channels] if family.heads_per_64_channels else 8
        ),
    )
    time_dim = _shape(s, "time_embed.0.weight", what)[0]
    if time_dim != 4 * model_channels:
        cfg["time_embedding_dim"] = time_dim
    if family.name == "sdxl":
        adm = _shape(s, "label_emb.0.0.weight", what)[1]
        if pooled_dim is None or (adm - pooled_dim) <= 0 or (adm - pooled_dim) % 6:
            raise LayoutError(
                f"SDXL size embedding of width {adm} does not fit a pooled text size {pooled_dim}"
            )
        cfg.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=(adm - pooled_dim) // 6,
            projection_class_embeddings_input_dim=adm,
        )
    return cfg


def vae_config(shapes: Shapes, family: Family, prefix: str = VAE_PREFIX) -> dict:
    """AutoencoderKL config of the LDM-named VAE weights under ``prefix``; the family's scale."""
    s = _strip(shapes, prefix)
    what = "VAE"
    conv_in = _shape(s, "encoder.conv_in.weight", what)
    levels = _indices(s, "encoder.down.")
    if not levels or levels != list(range(len(levels))):
        raise LayoutError("VAE weights incomplete: no encoder.down.N blocks")
    channels = [_shape(s, f"encoder.down.{i}.block.0.conv2.weight", what)[0] for i in levels]
    cfg = shipped_config(family, "vae")
    cfg.update(
        in_channels=conv_in[1],
        out_channels=_shape(s, "decoder.conv_out.weight", what)[0],
        block_out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
        layers_per_block=len(_indices(s, "encoder.down.0.block.")),
        latent_channels=_shape(s, "decoder.conv_in.weight", what)[1],
        scaling_factor=family.scaling_factor,
    )
    if "quant_conv.weight" not in s:
        cfg.update(use_quant_conv=False, use_post_quant_conv=False)
    return cfg


def text_layers_in_file(shapes: Shapes, spec: TextEncoderSpec) -> int:
    """How many transformer layers the file holds for ``spec`` (used or not)."""
    s = _strip(shapes, spec.prefix)
    if spec.openclip:
        return len(_indices(s, "transformer.resblocks."))
    s = _strip(s, "text_model.") or s
    return len(_indices(s, "encoder.layers."))


def text_encoder_config(shapes: Shapes, family: Family, spec: TextEncoderSpec) -> dict:
    """CLIPTextConfig dict of the text encoder ``spec`` describes (OpenCLIP or HF names)."""
    s = _strip(shapes, spec.prefix)
    what = f"text encoder ({spec.prefix})"
    if spec.openclip:
        vocab, hidden = _shape(s, "token_embedding.weight", what)
        positions = _shape(s, "positional_embedding", what)[0]
        intermediate = _shape(s, "transformer.resblocks.0.mlp.c_fc.weight", what)[0]
    else:
        s = _strip(s, "text_model.") or s
        vocab, hidden = _shape(s, "embeddings.token_embedding.weight", what)
        positions = _shape(s, "embeddings.position_embedding.weight", what)[0]
        intermediate = _shape(s, "encoder.layers.0.mlp.fc1.weight", what)[0]
    layers = text_layers_in_file(shapes, spec) - spec.extra_layers
    if layers < 1:
        raise LayoutError(f"{what} has no usable transformer layers")
    cfg = shipped_config(family, spec.component)
    cfg.update(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=positions,
        hidden_act=spec.hidden_act,
    )
    if spec.with_projection:
        projection = _shape(s, "text_projection", what)  # [hidden, projection]
        if projection[0] != hidden:
            raise LayoutError(f"{what} text_projection {projection} does not fit width {hidden}")
        cfg["projection_dim"] = projection[1]
    return cfg


def infer_configs(shapes: Shapes, family: Family) -> dict[str, dict]:
    """Configs of every component: unet, vae (if the file has one), text_encoder[, _2]."""
    out = {
        spec.component: text_encoder_config(shapes, family, spec) for spec in family.text_encoders
    }
    pooled = out["text_encoder_2"]["projection_dim"] if "text_encoder_2" in out else None
    out["unet"] = unet_config(shapes, family, pooled_dim=pooled)
    if VAE_PREFIX + "encoder.conv_in.weight" in shapes:
        out["vae"] = vae_config(shapes, family)
    return out

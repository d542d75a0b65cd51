"""Tiny random-weight Stable Diffusion components, saved as users have them.

Each family ("sd1", "sd2", "sd2-v", "sdxl") gets a UNet, VAE, CLIP text encoder(s) and scheduler
small enough for CPU tests, saved either as a diffusers folder or as an original LDM / A1111 /
ComfyUI single file (.safetensors or .ckpt). The LDM export is the inverse of diffusers'
single-file converters (adapted from diffusers' scripts/convert_diffusers_to_original_*.py,
Apache-2.0); tests/test_sd_fixtures.py proves it against the forward converters.

Conventions the tileup loader relies on (they cannot be read from weights): GroupNorm groups 32;
UNet ``attention_head_dim`` 8 for SD1, ``[max(1, c // 64) ...]`` for SD2/SDXL; linear projection
for SD2/SDXL; text encoders have ``max(1, hidden // 64)`` heads; SD2 single files hold one more
text layer than the diffusers text encoder (as the real ones do: 24 vs 23).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "tileup/data/tokenizers/clip"

HIDDEN = 32  # text hidden size of SD1/SD2 and of SDXL's first encoder
HIDDEN_XL2 = 64  # SDXL's second encoder: wider than the first, as real ones are (768 vs 1280)
PROJ_XL2 = 32  # its text_projection output (pooled) size; != HIDDEN_XL2 so mix-ups show
SD2_TEXT_LAYERS = 23  # diffusers' SD2 text encoder; the single file holds 24, like the real one
_EXTRA_LAYER_SEED = 4242  # random weights of SD2's extra (unused) single-file text layer

_SCHED = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _heads(channels: int) -> int:
    return max(1, channels // 64)


def unet_kwargs(family: str) -> dict[str, Any]:
    """Constructor arguments of the tiny UNet2DConditionModel for ``family``."""
    _check_family(family)
    if family == "sdxl":
        channels = (32, 64)
        return dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=channels,
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            norm_num_groups=32,
            cross_attention_dim=HIDDEN + HIDDEN_XL2,
            attention_head_dim=[_heads(c) for c in channels],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=PROJ_XL2 + 6 * 8,
        )
    # SD1/SD2: four levels, attention on the first three, like the real (320, 640, 1280, 1280).
    channels = (32, 64, 96, 96)
    sd2 = family != "sd1"
    return dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=32,
        cross_attention_dim=HIDDEN,
        attention_head_dim=[_heads(c) for c in channels] if sd2 else 8,
        use_linear_projection=sd2,
    )


def vae_kwargs(family: str) -> dict[str, Any]:
    """Constructor arguments of the tiny AutoencoderKL (scale factor 8) for ``family``."""
    _check_family(family)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
    )


def text_encoder_kwargs(family: str, which: int = 1) -> dict[str, Any]:
    """CLIPTextConfig arguments of text encoder ``which`` (1, or 2 for SDXL's second)."""
    _check_family(family)
    openclip = (family in ("sd2", "sd2-v")) or which == 2
    layers = SD2_TEXT_LAYERS if family in ("sd2", "sd2-v") else 5
    hidden = HIDDEN_XL2 if which == 2 else HIDDEN
    return dict(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden if openclip else 37,
        num_hidden_layers=layers,
        num_attention_heads=_heads(hidden),
        max_position_embeddings=77,
        hidden_act="gelu" if openclip else "quick_gelu",
        projection_dim=PROJ_XL2 if which == 2 else hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0 if openclip else 49407,  # "!" for OpenCLIP, "<|endoftext|>" for CLIP-L
    )


def make_scheduler(family: str) -> Any:
    """DDIM (SD1/SD2) or Euler (SDXL) scheduler configured as Stable Diffusion ships it."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    _check_family(family)
    prediction = "v_prediction" if family == "sd2-v" else "epsilon"
    if family == "sdxl":
        return EulerDiscreteScheduler(
            **_SCHED, prediction_type=prediction, interpolation_type="linear"
        )
    return DDIMScheduler(
        **_SCHED, prediction_type=prediction, clip_sample=False, set_alpha_to_one=False
    )


def make_tokenizers(family: str) -> dict[str, Any]:
    """CLIP tokenizers from the shipped vocab: "tokenizer" (and "tokenizer_2" for SDXL)."""
    from transformers import CLIPTokenizer

    _check_family(family)

    def tok(pad: str) -> Any:
        return CLIPTokenizer(
            str(TOKENIZER_DIR / "vocab.json"),
            str(TOKENIZER_DIR / "merges.txt"),
            pad_token=pad,
            model_max_length=77,
        )

    if family == "sdxl":
        return {"tokenizer": tok("<|endoftext|>"), "tokenizer_2": tok("!")}
    return {"tokenizer": tok("!" if family in ("sd2", "sd2-v") else "<|endoftext|>")}


def _std(name: str, shape: torch.Size, norm: bool) -> tuple[float, float]:
    """(mean, std): norm weights ~1, biases ~0.05, matrices ~1/sqrt(fan_in) in [0.02, 0.2]."""
    if norm and name.endswith("weight"):
        return 1.0, 0.1
    if len(shape) < 2:
        return 0.0, 0.05
    return 0.0, min(0.2, max(0.02, (shape[1:].numel()) ** -0.5))


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter with seeded small noise (diffusers zero-inits some layers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            norm = isinstance(module, (nn.GroupNorm, nn.LayerNorm))
            for name, p in module.named_parameters(recurse=False):
                p.normal_(*_std(name, p.shape, norm), generator=gen)
    return model


def make_tiny_components(family: str, seed: int = 0) -> dict[str, Any]:
    """Tiny random-weight components: unet, vae, text_encoder[, text_encoder_2], scheduler."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _check_family(family)
    builders: dict[str, Any] = {
        "unet": lambda: UNet2DConditionModel(**unet_kwargs(family)),
        "vae": lambda: AutoencoderKL(**vae_kwargs(family)),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**text_encoder_kwargs(family))),
    }
    if family == "sdxl":
        builders["text_encoder_2"] = lambda: CLIPTextModelWithProjection(
            CLIPTextConfig(**text_encoder_kwargs(family, 2))
        )
    out: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        for i, (name, build) in enumerate(builders.items()):
            torch.manual_seed(seed * 100 + i)
            model = build()
            out[name] = randomize_(model, seed * 100 + i).eval()
    out["scheduler"] = make_scheduler(family)
    return out


def save_diffusers_folder(components: dict[str, Any], folder: Path, family: str) -> Path:
    """Save as a diffusers pipeline folder (model_index.json, safetensors, tokenizers)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    _check_family(family)
    folder = Path(folder)
    parts = {k: components[k] for k in ("unet", "vae", "text_encoder", "scheduler")}
    parts.update(make_tokenizers(family))
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=components["text_encoder_2"])
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# --- diffusers -> LDM key mapping (inverse of diffusers.loaders.single_file_utils) -------------

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_BLOCK = re.compile(
    r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\."
)
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.")


def _resnet(rest: str, table: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}"


def _unet_key(key: str, config: Any) -> str:
    n = config["layers_per_block"] + 1
    module, _, leaf = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    if m := _BLOCK.match(key):
        kind, b, part, j = m[1], int(m[2]), m[3], int(m[4])
        rest = key[m.end() :]
        if part == "downsamplers":
            return f"input_blocks.{(b + 1) * n}.0.op.{rest.removeprefix('conv.')}"
        if part == "upsamplers":
            attn = "CrossAttn" in config["up_block_types"][b]
            return f"output_blocks.{b * n + n - 1}.{2 if attn else 1}.{rest}"
        idx, blocks = (
            (1 + b * n + j, "input_blocks") if kind == "down" else (b * n + j, "output_blocks")
        )
        if part == "resnets":
            return f"{blocks}.{idx}.0.{_resnet(rest, _UNET_RESNET)}"
        return f"{blocks}.{idx}.1.{rest}"
    if m := _MID.match(key):
        rest = key[m.end() :]
        if m[1] == "resnets":
            return f"middle_block.{2 * int(m[2])}.{_resnet(rest, _UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _vae_key(key: str, n_up: int) -> str:
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.removeprefix('conv_norm_out.')}"
    if m := re.match(r"(down|up)_blocks\.(\d+)\.", rest):
        i = int(m[2]) if m[1] == "down" else n_up - 1 - int(m[2])
        rest = rest[m.end() :]
        if r := re.match(r"resnets\.(\d+)\.", rest):
            tail = _resnet(rest[r.end() :], {"conv_shortcut": "nin_shortcut"})
            return f"{side}.{m[1]}.{i}.block.{r[1]}.{tail}"
        sampler = "downsample" if m[1] == "down" else "upsample"
        return f"{side}.{m[1]}.{i}.{sampler}.{rest.removeprefix(f'{sampler}rs.0.')}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.", rest):
        return f"{side}.mid.block_{int(m[1]) + 1}.{rest[m.end() :]}"
    if rest.startswith("mid_block.attentions.0."):
        tail = rest.removeprefix("mid_block.attentions.0.").replace("to_out.0.", "to_out.")
        return f"{side}.mid.attn_1.{_resnet(tail, _VAE_ATTN)}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    raise KeyError(f"no LDM name for VAE key {key!r}")


def hf_clip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with the hub/LDM names ("text_model.*").

    transformers >= 5.6 flattened CLIPTextModel (keys "embeddings.*", "encoder.*", ...);
    CLIPTextModelWithProjection still wraps a ``text_model``.
    """
    sd = model.state_dict()
    return sd if hasattr(model, "text_model") else {"text_model." + k: v for k, v in sd.items()}


def _openclip(
    sd: dict[str, torch.Tensor], prefix: str, projection: torch.Tensor
) -> dict[str, torch.Tensor]:
    """HF CLIP text state dict ("text_model.*") -> OpenCLIP names; projection is [hidden, proj]."""
    t = "text_model."
    out = {
        prefix + "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd[t + "embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd[t + "final_layer_norm.weight"],
        prefix + "ln_final.bias": sd[t + "final_layer_norm.bias"],
        prefix + "text_projection": projection,
    }
    names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith(t + "encoder.layers.")})
    for i in layers:
        hf, oc = f"{t}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{hf}self_attn.{x}_proj.{kind}"] for x in "qkv"]
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat(qkv, 0)
            for a, b in names.items():
                out[f"{oc}{b}.{kind}"] = sd[f"{hf}{a}.{kind}"]
    return out


def _extra_openclip_layer(sd: dict[str, torch.Tensor], index: int, prefix: str) -> dict:
    """Random weights for the text layer real SD2 files hold but SD2 does not use."""
    gen = torch.Generator().manual_seed(_EXTRA_LAYER_SEED)
    first = f"{prefix}transformer.resblocks.0."
    return {
        k.replace(first, f"{prefix}transformer.resblocks.{index}."): torch.empty(v.shape).normal_(
            *_std(k, v.shape, norm=".ln_" in k), generator=gen
        )
        for k, v in sd.items()
        if k.startswith(first)
    }


def ldm_state_dict(components: dict[str, Any], family: str) -> dict[str, torch.Tensor]:
    """Original single-file (LDM / A1111 / ComfyUI) state dict of ``components``."""
    _check_family(family)
    unet, vae, te = components["unet"], components["vae"], components["text_encoder"]
    out: dict[str, torch.Tensor] = {}
    for k, v in unet.state_dict().items():
        out["model.diffusion_model." + _unet_key(k, unet.config)] = v
    n_up = len(vae.config["up_block_types"])
    for k, v in vae.state_dict().items():
        if ".mid_block.attentions.0.to_" in k and k.endswith(".weight"):
            v = v[:, :, None, None]  # real checkpoints store these as 1x1 convs
        out["first_stage_model." + _vae_key(k, n_up)] = v
    te_sd = hf_clip_state_dict(te)
    if family == "sd1":
        out.update({"cond_stage_model.transformer." + k: v for k, v in te_sd.items()})
    elif family in ("sd2", "sd2-v"):
        prefix = "cond_stage_model.model."
        gen = torch.Generator().manual_seed(_EXTRA_LAYER_SEED + 1)
        projection = torch.randn(HIDDEN, HIDDEN, generator=gen) * HIDDEN**-0.5  # unused by SD2
        clip = _openclip(te_sd, prefix, projection)
        clip.update(_extra_openclip_layer(clip, te.config.num_hidden_layers, prefix))
        out.update(clip)
        if family == "sd2-v":
            out["v_pred"] = torch.zeros(0)
    else:
        out.update({"conditioner.embedders.0.transformer." + k: v for k, v in te_sd.items()})
        te2_sd = hf_clip_state_dict(components["text_encoder_2"])
        projection = te2_sd.pop("text_projection.weight").T
        out.update(_openclip(te2_sd, "conditioner.embedders.1.model.", projection))
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def save_single_file(components: dict[str, Any], path: Path, family: str) -> Path:
    """Save ``ldm_state_dict`` as .safetensors or .ckpt ({"state_dict": ...}); returns path."""
    path = Path(path)
    sd = ldm_state_dict(components, family)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path), metadata={"format": "pt", "tileup_family": family})
    elif path.suffix == ".ckpt":
        torch.save({"state_dict": sd}, path)
    else:
        raise ValueError(f"unsupported single-file suffix {path.suffix!r} (.safetensors or .ckpt)")
    return path


def describe(family: str) -> str:
    """JSON of every constructor argument used for ``family`` (for logs and reports)."""
    te = {"text_encoder": text_encoder_kwargs(family)}
    if family == "sdxl":
        te["text_encoder_2"] = text_encoder_kwargs(family, 2)
    cfg = {"unet": unet_kwargs(family), "vae": vae_kwargs(family), **te}
    cfg["scheduler"] = dict(make_scheduler(family).config)
    return json.dumps(cfg, indent=1, default=str)

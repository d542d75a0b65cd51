"""Tiny SD fixtures: LDM export inverts diffusers' converters; saved models reload; UNet runs."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sd_fixtures import (
    FAMILIES,
    SD2_TEXT_LAYERS,
    hf_clip_state_dict,
    ldm_state_dict,
    make_tiny_components,
    save_diffusers_folder,
    save_single_file,
)

os.environ["HF_HUB_OFFLINE"] = "1"

Built = tuple[dict[str, Any], dict[str, torch.Tensor]]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread and do not suffer from a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def built(family: str) -> Built:
    """(components, ldm_state_dict) for ``family``."""
    comps = make_tiny_components(family)
    return comps, ldm_state_dict(comps, family)


@pytest.fixture(scope="module")
def saved(family: str, built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with repo/ (diffusers), model.safetensors and model.ckpt."""
    comps, _ = built
    root = tmp_path_factory.mktemp(f"tiny-{family}")
    save_diffusers_folder(comps, root / "repo", family)
    save_single_file(comps, root / "model.safetensors", family)
    save_single_file(comps, root / "model.ckpt", family)
    return root


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want), (
        sorted(set(got) - set(want))[:5],
        sorted(set(want) - set(got))[:5],
    )
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, bad[:5]


def test_unet_and_vae_match_diffusers_converters(family: str, built: Built) -> None:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    comps, ldm = built
    unet, vae = comps["unet"], comps["vae"]
    _assert_same(convert_ldm_unet_checkpoint(ldm, unet.config), unet.state_dict())
    _assert_same(convert_ldm_vae_checkpoint(ldm, vae.config), vae.state_dict())
    attn_q = ldm["first_stage_model.decoder.mid.attn_1.q.weight"]
    assert attn_q.ndim == 4 and attn_q.shape[2:] == (1, 1)


def test_text_encoders_match_diffusers_converters(family: str, built: Built) -> None:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )

    comps, ldm = built
    te = comps["text_encoder"]
    if family == "sd1":
        _assert_same(convert_ldm_clip_checkpoint(ldm), hf_clip_state_dict(te))
    elif family in ("sd2", "sd2-v"):
        # The file holds one more layer (like real SD2: 24 resblocks); diffusers skips it.
        extra = (
            f"cond_stage_model.model.transformer.resblocks.{SD2_TEXT_LAYERS}.attn.in_proj_weight"
        )
        assert extra in ldm
        assert te.config.num_hidden_layers == SD2_TEXT_LAYERS
        _assert_same(convert_open_clip_checkpoint(te, ldm), hf_clip_state_dict(te))
        assert ("v_pred" in ldm) == (family == "sd2-v")
    else:
        te2 = comps["text_encoder_2"]
        _assert_same(convert_ldm_clip_checkpoint(ldm), hf_clip_state_dict(te))
        prefix = "conditioner.embedders.1.model."
        got = convert_open_clip_checkpoint(te2, ldm, prefix=prefix)
        _assert_same(got, hf_clip_state_dict(te2))
        assert ldm[prefix + "text_projection"].shape == (64, 32)  # [hidden, projection]


def test_ldm_prefixes(family: str, built: Built) -> None:
    _, ldm = built
    text = {
        "sd1": ("cond_stage_model.transformer.text_model.",),
        "sd2": ("cond_stage_model.model.",),
        "sd2-v": ("cond_stage_model.model.", "v_pred"),
        "sdxl": (
            "conditioner.embedders.0.transformer.text_model.",
            "conditioner.embedders.1.model.",
        ),
    }[family]
    prefixes = ("model.diffusion_model.", "first_stage_model.", *text)
    assert all(k.startswith(prefixes) for k in ldm)
    assert all(any(k.startswith(p) for k in ldm) for p in prefixes)
    assert all(v.is_contiguous() for v in ldm.values())


def test_single_files_roundtrip(built: Built, saved: Path) -> None:
    from safetensors.torch import load_file

    _, ldm = built
    _assert_same(load_file(saved / "model.safetensors"), ldm)
    ckpt = torch.load(saved / "model.ckpt", map_location="cpu", weights_only=True)
    assert list(ckpt) == ["state_dict"]
    _assert_same(ckpt["state_dict"], ldm)


def test_diffusers_folder_reloads(family: str, built: Built, saved: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    comps, _ = built
    folder = saved / "repo"
    index = json.loads((folder / "model_index.json").read_text())
    xl = family == "sdxl"
    assert index["_class_name"] == (
        "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    )
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    if xl:
        classes["text_encoder_2"] = CLIPTextModelWithProjection
    for name, cls in classes.items():
        assert index[name][1] == cls.__name__
        loaded = cls.from_pretrained(folder / name, local_files_only=True)
        _assert_same(loaded.state_dict(), comps[name].state_dict())
    sched = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert sched["prediction_type"] == ("v_prediction" if family == "sd2-v" else "epsilon")
    pads = {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sd2-v": ["!"], "sdxl": ["<|endoftext|>", "!"]}
    for sub, pad in zip(("tokenizer", "tokenizer_2"), pads[family], strict=False):
        tok = CLIPTokenizer.from_pretrained(folder / sub, local_files_only=True)
        ids = tok("a photo", padding="max_length", max_length=77).input_ids
        assert (tok.pad_token, len(ids), ids[:2], ids[3]) == (pad, 77, [49406, 320], 49407)


def test_diffusers_single_file_loader_agrees(family: str, built: Built, saved: Path) -> None:
    """diffusers' own from_single_file, given the folder as config, rebuilds identical models."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    comps, _ = built
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    path, config = str(saved / "model.safetensors"), str(saved / "repo")
    pipe = cls.from_single_file(path, config=config, local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in comps:
            _assert_same(getattr(pipe, name).state_dict(), comps[name].state_dict())


def test_unet_output_is_nontrivial(family: str, built: Built) -> None:
    comps, _ = built
    unet = comps["unet"]
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    extra = {}
    if family == "sdxl":
        pooled = torch.randn(1, comps["text_encoder_2"].config.projection_dim, generator=gen)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        out = unet(latent, 500, encoder_hidden_states=context, **extra).sample
        out2 = unet(latent, 500, encoder_hidden_states=context * 2, **extra).sample
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert 0.05 < out.std().item() < 5
    assert (out - out2).abs().max() > 1e-3  # the text conditioning matters


def test_deterministic_from_seed() -> None:
    a, b, c = (make_tiny_components("sd1", seed=s) for s in (0, 0, 1))
    for name in ("unet", "vae", "text_encoder"):
        sd_a, sd_c = a[name].state_dict(), c[name].state_dict()
        _assert_same(b[name].state_dict(), sd_a)
        assert not any(torch.equal(sd_a[k], sd_c[k]) for k in sd_a)
        assert all(v.abs().sum() > 0 for v in sd_a.values())  # nothing left zero-initialised

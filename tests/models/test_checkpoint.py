"""Checkpoint loading: every family and format loads to the exact models that made it, offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
import json
import pickle
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sd_fixtures import (
    FAMILIES,
    _openclip,
    _unet_key,
    _vae_key,
    hf_clip_state_dict,
    ldm_state_dict,
    make_tiny_components,
    save_diffusers_folder,
    save_single_file,
    unet_kwargs,
)

from tileup.errors import TileupError
from tileup.models import families as fam
from tileup.models.checkpoint import CheckpointError, SDModel, load_checkpoint
from tileup.models.weights import REFUSED, WeightsError, open_tensors, read_weights
from tileup.upscalers.models import load_sr_model
from tileup.vae.tiled import vae_scale_factor

FORMATS = {"safetensors": "model.safetensors", "ckpt": "model.ckpt", "folder": "repo"}
FAMILY = {"sd1": "sd1", "sd2": "sd2", "sd2-v": "sd2", "sdxl": "sdxl"}
PADS = {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sd2-v": ["!"], "sdxl": ["<|endoftext|>", "!"]}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread and do not suffer from a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Store:
    """Tiny components, their saved forms and loaded models, each made once per module."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @cache  # noqa: B019 - one Store per module
    def components(self, family: str) -> dict[str, Any]:
        return make_tiny_components(family)

    @cache  # noqa: B019
    def saved(self, family: str) -> Path:
        root = self.root / family
        comps = self.components(family)
        save_diffusers_folder(comps, root / "repo", family)
        save_single_file(comps, root / "model.safetensors", family)
        save_single_file(comps, root / "model.ckpt", family)
        return root

    @cache  # noqa: B019
    def loaded(self, family: str, fmt: str) -> SDModel:
        return load_checkpoint(self.saved(family) / FORMATS[fmt])

    def write(self, name: str, state: dict[str, torch.Tensor]) -> Path:
        path = self.root / "misc" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save({"state_dict": state}, path)
        return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module", params=list(FORMATS))
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(store: Store, family: str, fmt: str) -> SDModel:
    return store.loaded(family, fmt)


def _assert_same_weights(got: torch.nn.Module, want: torch.nn.Module) -> None:
    a, b = got.state_dict(), want.state_dict()
    assert set(a) == set(b), (sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3])
    bad = [k for k in b if not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


def _components(model: SDModel) -> dict[str, Any]:
    """diffusers pipeline component names -> models (scheduler excluded)."""
    out: dict[str, Any] = {"unet": model.unet, "vae": model.vae}
    for i, (encoder, tokenizer) in enumerate(
        zip(model.text_encoders, model.tokenizers, strict=True)
    ):
        suffix = f"_{i + 1}" if i else ""
        out[f"text_encoder{suffix}"] = encoder
        out[f"tokenizer{suffix}"] = tokenizer
    return out


def _raises(
    match: str, path: Path | str, error: type[TileupError] = CheckpointError, **kwargs: Any
) -> str:
    """Load ``path``, expect a one-line ``error`` naming the file; returns the message.

    ``WeightsError`` for a file that is not readable weights, else ``CheckpointError``.
    """
    with pytest.raises(error) as info:
        load_checkpoint(path, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, TileupError)
    assert "\n" not in message
    assert Path(path).name in message, message
    assert match in message, message
    return message


# --- every family, every format ----------------------------------------------------------------


def test_loads_the_weights_that_made_it(store: Store, family: str, model: SDModel) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    comps = store.components(family)
    assert model.family == FAMILY[family]
    assert model.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    assert isinstance(model.unet, UNet2DConditionModel)
    assert isinstance(model.vae, AutoencoderKL)
    classes = [CLIPTextModel] + ([CLIPTextModelWithProjection] if family == "sdxl" else [])
    assert [type(m) for m in model.text_encoders] == classes
    parts = _components(model)
    assert set(parts) == {k for k in comps if k != "scheduler"} | {
        "tokenizer" + s for s in ("", "_2")[: len(classes)]
    }
    for name, module in parts.items():
        if name.startswith("tokenizer"):
            continue
        _assert_same_weights(module, comps[name])
        assert not module.training
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in module.parameters())
        assert all(t.device.type == "cpu" for t in [*module.parameters(), *module.buffers()])
    assert vae_scale_factor(model.vae) == 8
    assert model.vae.config.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)


def test_unet_forward_matches(store: Store, family: str, model: SDModel) -> None:
    comps = store.components(family)
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=gen)
    extra = {}
    if family == "sdxl":
        pooled = torch.randn(1, model.text_encoders[1].config.projection_dim, generator=gen)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        got = model.unet(latent, 500, encoder_hidden_states=context, **extra).sample
        want = comps["unet"](latent, 500, encoder_hidden_states=context, **extra).sample
    assert torch.equal(got, want)


def test_text_encoders_and_tokenizers_match(store: Store, family: str, model: SDModel) -> None:
    comps = store.components(family)
    originals = [comps["text_encoder"]] + ([comps["text_encoder_2"]] if family == "sdxl" else [])
    assert [t.pad_token for t in model.tokenizers] == PADS[family]
    for tokenizer, loaded, original in zip(
        model.tokenizers, model.text_encoders, originals, strict=True
    ):
        assert tokenizer.model_max_length == 77
        ids = tokenizer(
            ["a photo of a cat", ""], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        assert ids.shape == (2, 77) and ids[0, :2].tolist() == [49406, 320]
        with torch.no_grad():
            got = loaded(ids, output_hidden_states=True)
            want = original(ids, output_hidden_states=True)
        assert len(got.hidden_states) == len(want.hidden_states)
        torch.testing.assert_close(got.hidden_states[-2], want.hidden_states[-2])
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state)
        if hasattr(want, "text_embeds"):  # SDXL's pooled, projected output
            assert got.text_embeds.shape == (2, original.config.projection_dim)
            torch.testing.assert_close(got.text_embeds, want.text_embeds)


def test_scheduler_config(family: str, model: SDModel) -> None:
    assert model.scheduler_config == {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": model.prediction_type,
    }


def test_name_and_hash(store: Store, family: str, fmt: str, model: SDModel) -> None:
    path = store.saved(family) / FORMATS[fmt]
    hashed = path / "unet" / "diffusion_pytorch_model.safetensors" if fmt == "folder" else path
    assert model.model_hash == hashlib.sha256(hashed.read_bytes()).hexdigest()[:10]
    assert (model.name, model.vae_name) == (path.stem, None)


# --- family specifics --------------------------------------------------------------------------


def test_sd2_uses_one_fewer_text_layer_than_the_file_holds(store: Store) -> None:
    path = store.saved("sd2") / "model.safetensors"
    spec = fam.FAMILIES["sd2"].text_encoders[0]
    held = fam.text_layers_in_file({k: v.shape for k, v in load_file(path).items()}, spec)
    used = store.loaded("sd2", "safetensors").text_encoders[0].config.num_hidden_layers
    assert used == held - 1 == store.components("sd2")["text_encoder"].config.num_hidden_layers


def test_sdxl_second_encoder_projects(store: Store) -> None:
    model = store.loaded("sdxl", "safetensors")
    te2 = model.text_encoders[1]
    hidden, proj = te2.config.hidden_size, te2.config.projection_dim
    assert hidden != proj
    assert te2.text_projection.weight.shape == (proj, hidden)
    want = store.components("sdxl")["text_encoder_2"].text_projection.weight
    assert torch.equal(te2.text_projection.weight, want)
    # label_emb width = pooled size + 6 size/crop numbers × addition_time_embed_dim
    cfg = model.unet.config
    assert cfg.projection_class_embeddings_input_dim == proj + 6 * cfg.addition_time_embed_dim


def test_prediction_override_and_validation(store: Store) -> None:
    v_file = store.saved("sd2-v") / "model.safetensors"
    assert load_checkpoint(v_file, prediction="epsilon").prediction_type == "epsilon"
    eps = load_checkpoint(store.saved("sd2") / "repo", prediction="v_prediction")
    assert eps.prediction_type == eps.scheduler_config["prediction_type"] == "v_prediction"
    _raises("unknown prediction type 'v'", v_file, prediction="v")


def test_sd2_v_heuristic_and_ztsnr(store: Store) -> None:
    sd2 = fam.FAMILIES["sd2"]
    wide = torch.randn(320, generator=torch.Generator().manual_seed(0)) * 0.2
    assert fam.looks_v_prediction(sd2, wide)
    assert not fam.looks_v_prediction(sd2, wide * 0.25)
    assert not fam.looks_v_prediction(fam.FAMILIES["sd1"], wide)
    assert not fam.looks_v_prediction(sd2, None)
    state = ldm_state_dict(store.components("sd2"), "sd2")
    assert "v_pred" not in state
    assert not fam.looks_v_prediction(sd2, state[fam.SD2_V_PROBE_KEY])
    state[fam.SD2_V_PROBE_KEY] = wide[: state[fam.SD2_V_PROBE_KEY].numel()]
    state["ztsnr"] = torch.zeros(0)  # zero-terminal-SNR marker
    model = load_checkpoint(store.write("sd2-768-v.safetensors", state))
    assert model.prediction_type == model.scheduler_config["prediction_type"] == "v_prediction"
    assert model.scheduler_config["rescale_betas_zero_snr"] is True


# --- VAE replacement ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_vae(store: Store) -> tuple[torch.nn.Module, dict[str, Path]]:
    """A different VAE (sd1 config, seed 1) as an A1111 file, a prefixed file and a folder."""
    comps = make_tiny_components("sd1", seed=1)
    ldm = ldm_state_dict(comps, "sd1")
    vae_sd = {k: v for k, v in ldm.items() if k.startswith("first_stage_model.")}
    bare = {k.removeprefix("first_stage_model."): v for k, v in vae_sd.items()}
    folder = store.root / "misc" / "vae-folder"
    comps["vae"].save_pretrained(folder)
    return comps["vae"], {
        "a1111": store.write("other.vae.safetensors", bare),
        "prefixed": store.write("other-vae.ckpt", vae_sd),
        "folder": folder,
    }


@pytest.mark.parametrize(
    ("family", "fmt", "kind"),
    [
        ("sdxl", "safetensors", "a1111"),
        ("sdxl", "ckpt", "prefixed"),
        ("sdxl", "safetensors", "folder"),
        ("sd1", "folder", "a1111"),
    ],
)
def test_vae_replacement(
    store: Store, other_vae: tuple[Any, dict[str, Path]], family: str, fmt: str, kind: str
) -> None:
    vae, paths = other_vae
    model = load_checkpoint(store.saved(family) / FORMATS[fmt], vae=paths[kind])
    _assert_same_weights(model.vae, vae)
    assert model.vae_name == ("vae-folder" if kind == "folder" else paths[kind].stem)
    # the family's latent scaling is kept, whatever the replacement's config says
    assert model.vae.config.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)
    assert not model.vae.training and not any(p.requires_grad for p in model.vae.parameters())


def test_checkpoint_without_vae_needs_one(
    store: Store, other_vae: tuple[Any, dict[str, Path]]
) -> None:
    state = ldm_state_dict(store.components("sd1"), "sd1")
    path = store.write(
        "no-vae.safetensors", {k: v for k, v in state.items() if "first_stage" not in k}
    )
    _raises("--vae", path)
    vae, paths = other_vae
    _assert_same_weights(load_checkpoint(path, vae=paths["a1111"]).vae, vae)


def test_bad_vae_files(store: Store, shared_models: Path) -> None:
    ckpt = store.saved("sd1") / "model.safetensors"
    esrgan = shared_models / "realesr-animevideov3.safetensors"
    with pytest.raises(CheckpointError, match=r"realesr-animevideov3.*not a VAE.*body\."):
        load_checkpoint(ckpt, vae=esrgan)
    with pytest.raises(CheckpointError, match="no such VAE"):
        load_checkpoint(ckpt, vae=store.root / "missing.safetensors")


# --- errors ------------------------------------------------------------------------------------


def test_missing_empty_and_text_files(tmp_path: Path) -> None:
    _raises("no such checkpoint", tmp_path / "nope.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _raises("the file is empty", tmp_path / "empty.safetensors", WeightsError)
    (tmp_path / "notes.safetensors").write_text("these are my favourite prompts\n" * 20)
    _raises("not a weights file", tmp_path / "notes.safetensors", WeightsError)
    (tmp_path / "folder").mkdir()
    _raises("no model_index.json", tmp_path / "folder")


def test_corrupt_files(store: Store, tmp_path: Path) -> None:
    data = (store.saved("sd1") / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    _raises("not a valid safetensors file", tmp_path / "cut.safetensors", WeightsError)
    data = (store.saved("sd1") / "model.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    _raises("not a readable PyTorch checkpoint", tmp_path / "cut.ckpt", WeightsError)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_code_executing_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Payload(marker)}, path)
    _raises("refused", path, WeightsError)
    assert not marker.exists()


def test_lightning_training_checkpoint_loads(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Original SD 1.x .ckpt files pickle a Lightning callback class and numpy scalars."""
    names = ("pytorch_lightning", "pytorch_lightning.callbacks")
    for name in (*names, "pytorch_lightning.callbacks.model_checkpoint"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = sys.modules["pytorch_lightning.callbacks.model_checkpoint"]
    callback = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = callback  # type: ignore[attr-defined]
    state = ldm_state_dict(store.components("sd1"), "sd1")
    path = tmp_path / "sd-v1-x.ckpt"
    extra = {"callbacks": {callback: {"best_model_score": np.float64(0.5)}}, "global_step": 470000}
    torch.save({"state_dict": state, **extra}, path)
    model = load_checkpoint(path)
    _assert_same_weights(model.unet, store.components("sd1")["unet"])


def test_not_stable_diffusion(store: Store, shared_models: Path) -> None:
    esrgan = shared_models / "realesr-animevideov3.safetensors"
    _raises(
        "not a Stable Diffusion checkpoint (no UNet weights under model.diffusion_model.; "
        "found 53 tensors with prefixes body.",
        esrgan,
    )
    noise = {f"layer{i}.weight": torch.randn(4, 4) for i in range(3)}
    _raises("not a Stable Diffusion checkpoint", store.write("random.safetensors", noise))
    lora = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0),
    }
    _raises("looks like a LoRA", store.write("style.safetensors", lora))
    nested = store.root / "misc" / "RealESRGAN_x2plus.pth"
    torch.save({"params_ema": {"body.0.weight": torch.zeros(2)}}, nested)
    _raises("no tensors at the top level; keys params_ema", nested)
    bare = store.root / "misc" / "tensor.pt"
    torch.save(torch.zeros(2), bare)
    _raises("holds a Tensor, not a state dict", bare, WeightsError)


def test_vae_only_file_as_checkpoint(other_vae: tuple[Any, dict[str, Path]]) -> None:
    _, paths = other_vae
    _raises("is a VAE, not a full Stable Diffusion checkpoint", paths["a1111"])
    _raises("is a VAE", paths["prefixed"])


def test_other_model_families_are_named(store: Store) -> None:
    t = torch.zeros(2, 2)
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}
    refiner = {
        **unet,
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 2560),
        "conditioner.embedders.0.model.text_projection": t,
        "conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight": torch.zeros(2),
    }
    _raises(
        "looks like an SDXL refiner; only SD 1.x, SD 2.x and SDXL base are supported",
        store.write("refiner.safetensors", refiner),
    )
    sd3 = {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": t}
    _raises("Stable Diffusion 3", store.write("sd3.safetensors", sd3))
    flux = {"double_blocks.0.img_attn.norm.key_norm.scale": t}
    _raises("Flux", store.write("flux.safetensors", flux))
    _raises("no text encoder", store.write("unet-only.safetensors", unet))


def test_inpainting_and_mismatched_weights(store: Store) -> None:
    state = ldm_state_dict(store.components("sd1"), "sd1")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    inpaint = {**state, key: torch.zeros(state[key].shape[0], 9, 3, 3)}
    _raises("9 input channels", store.write("inpainting.safetensors", inpaint))
    broken = {k: v for k, v in state.items() if k != "model.diffusion_model.out.0.weight"}
    _raises(
        "UNet weights do not fit the inferred architecture (missing: conv_norm_out.weight)",
        store.write("broken.ckpt", broken),
    )


def test_refiner_folder(store: Store, tmp_path: Path) -> None:
    index = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline",
        "unet": ["diffusers", "U"],
        "text_encoder": [None, None],
        "text_encoder_2": ["transformers", "C"],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="SDXL refiner"):
        load_checkpoint(tmp_path)


# --- the one weights reader (tileup.models.weights), shared with SR models ----------------------


def _bad_files(root: Path) -> dict[str, tuple[Path, str]]:
    """Files no loader may accept -> (path, what the message says)."""
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[Path, str]] = {}

    def add(name: str, what: str, data: bytes | None = None, obj: Any = None) -> Path:
        path = root / name
        if data is not None:
            path.write_bytes(data)
        else:
            torch.save(obj, path)
        files[name] = (path, what)
        return path

    add("empty.ckpt", "the file is empty", b"")
    add("notes.safetensors", "not a weights file", b"my favourite prompts\n" * 20)
    add("bad.pth", "not a readable PyTorch checkpoint", b"\x80\x02 damaged pickle")
    add("list.pt", "holds a list, not a state dict", obj=[torch.zeros(2)])
    add("evil.ckpt", REFUSED, obj={"w": torch.zeros(2), "x": _Payload(root / "pwned")})
    plain = root / "plain.pkl"  # pickle.dump, protocol 5: torch's safe reader cannot parse it
    with plain.open("wb") as fh:
        pickle.dump({"w": torch.zeros(2), "x": _Payload(root / "pwned")}, fh, protocol=5)
    files[plain.name] = (plain, "uses instructions the safe reader does not support")
    return files


def test_every_loader_gives_the_same_answer(tmp_path: Path) -> None:
    """Checkpoints and SR models are refused alike, in one line naming the file."""
    loaders: tuple[Callable[[Path], Any], ...] = (load_checkpoint, load_sr_model, read_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Detected pickle protocol 5" stays inside
        for name, (path, what) in _bad_files(tmp_path).items():
            messages = set()
            for load in loaders:
                with pytest.raises(WeightsError) as info:
                    load(path)
                messages.add(str(info.value))
            assert len(messages) == 1, messages
            message = messages.pop()
            assert message.startswith(f"{path}: ") and what in message, name
            assert "\n" not in message
    assert not (tmp_path / "pwned").exists()  # no pickled code ran


def test_lazy_view_reads_and_releases(tmp_path: Path) -> None:
    state = {"a.w": torch.ones(2, 3), "a.b": torch.zeros(2), "b.w": torch.full((4,), 2.0)}
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": state, "v_pred": None, "global_step": 7}, ckpt, pickle_protocol=3)
    safe = tmp_path / "m.safetensors"
    save_file(state, str(safe))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # protocol 3: torch would warn
        with open_tensors(ckpt) as tensors:
            assert tensors.shapes == {"a.w": (2, 3), "a.b": (2,), "b.w": (4,)}
            assert tensors.other_keys == ("v_pred", "global_step")
            assert torch.equal(tensors.get("b.w"), state["b.w"]) and tensors.get("c") is None
            taken = tensors.take("a.")
            assert set(taken) == {"a.w", "a.b"} and torch.equal(taken["a.w"], state["a.w"])
            with pytest.raises(KeyError):  # the reader's own reference is gone
                tensors.read("a.w")
    wrapped = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": [1]}, wrapped)
    with pytest.raises(WeightsError, match=r"wrapped\.ckpt: its state_dict is a list, not a dict"):
        open_tensors(wrapped).__enter__()
    with open_tensors(safe) as tensors:
        assert tensors.shapes == {"a.w": (2, 3), "a.b": (2,), "b.w": (4,)}
        assert tensors.other_keys == ()
        assert all(torch.equal(v, state[k]) for k, v in tensors.take(("a.", "b.")).items())


def test_whole_dict_keeps_nesting(tmp_path: Path) -> None:
    inner = {"body.0.weight": torch.ones(2)}
    path = tmp_path / "RealESRGAN_x2plus.pth"
    torch.save({"params_ema": inner, "iter": np.int64(3)}, path)
    loaded = read_weights(path)
    assert set(loaded) == {"params_ema", "iter"} and torch.equal(
        loaded["params_ema"]["body.0.weight"], inner["body.0.weight"]
    )


# --- shape inference on the shipped full-size configs ------------------------------------------


def _meta_ldm_shapes(config_dir: str) -> tuple[dict[str, torch.Size], dict[str, dict]]:
    """LDM key -> shape of the full-size models built (on the meta device) from shipped configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    family = next(f for f in fam.FAMILIES.values() if f.config_dir == config_dir)
    configs = {c: fam.shipped_config(family, c) for c in ("unet", "vae")}
    shapes: dict[str, torch.Size] = {}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        for spec in family.text_encoders:
            configs[spec.component] = cfg = fam.shipped_config(family, spec.component)
            cls = CLIPTextModelWithProjection if spec.with_projection else CLIPTextModel
            te_sd = hf_clip_state_dict(cls(CLIPTextConfig.from_dict(cfg)))
            if not spec.openclip:
                shapes.update({spec.prefix + k: v.shape for k, v in te_sd.items()})
                continue
            proj = te_sd.pop("text_projection.weight", torch.empty(cfg["hidden_size"], 512)).T
            clip = _openclip(te_sd, spec.prefix, proj)
            first = f"{spec.prefix}transformer.resblocks.0."
            for n in range(spec.extra_layers):  # SD2 files hold one more layer than is used
                last = f"{spec.prefix}transformer.resblocks.{cfg['num_hidden_layers'] + n}."
                clip.update(
                    {k.replace(first, last): v for k, v in clip.items() if k.startswith(first)}
                )
            shapes.update({k: v.shape for k, v in clip.items()})
    shapes.update(
        {fam.UNET_PREFIX + _unet_key(k, unet.config): v.shape for k, v in unet.state_dict().items()}
    )
    n_up = len(vae.config["up_block_types"])
    shapes.update(
        {fam.VAE_PREFIX + _vae_key(k, n_up): v.shape for k, v in vae.state_dict().items()}
    )
    return shapes, configs


@pytest.mark.parametrize(
    ("config_dir", "name"), [("sd15", "sd1"), ("sd21", "sd2"), ("sdxl", "sdxl")]
)
def test_inference_recovers_the_shipped_full_size_configs(config_dir: str, name: str) -> None:
    from diffusers import UNet2DConditionModel

    shapes, shipped = _meta_ldm_shapes(config_dir)
    family = fam.detect_family(shapes.keys())
    assert family.name == name
    inferred = fam.infer_configs(shapes, family)
    assert set(inferred) == set(shipped)
    for component in set(shipped) - {"unet"}:
        assert inferred[component] == shipped[component], component
    with torch.device("meta"):  # equal as built: unset keys in the shipped config are defaults
        got = UNet2DConditionModel.from_config(inferred["unet"]).config
        want = UNet2DConditionModel.from_config(shipped["unet"]).config
    diff = {k: (got[k], want[k]) for k in want if not k.startswith("_") and got[k] != want[k]}
    assert not diff, diff
    if name == "sdxl":
        assert inferred["unet"]["addition_time_embed_dim"] == 256
        assert inferred["text_encoder_2"]["projection_dim"] == 1280
    if name == "sd2":
        assert inferred["text_encoder"]["num_hidden_layers"] == 23


def test_inference_on_tiny_fixtures(store: Store, family: str) -> None:
    shapes = {k: v.shape for k, v in ldm_state_dict(store.components(family), family).items()}
    inferred = fam.infer_configs(shapes, fam.detect_family(shapes.keys()))["unet"]
    for key, value in unet_kwargs(family).items():
        if key == "sample_size":  # not in the weights; the shipped config's is kept
            continue
        value = list(value) if isinstance(value, tuple) else value
        if key == "transformer_layers_per_block" and isinstance(inferred[key], int):
            value = value[0] if len(set(value)) == 1 else value
        assert inferred[key] == value, key


def test_describe_keys() -> None:
    keys = ["body.0.weight", "body.1.weight", "conv_up.weight", "lora_unet_a_b.alpha", "v_pred"]
    assert fam.describe_keys(keys) == (
        "found 5 tensors with prefixes body., conv_up., lora_unet_, v_pred"
    )
    assert fam.describe_keys([]) == "found no tensors"

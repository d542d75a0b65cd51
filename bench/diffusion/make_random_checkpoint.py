"""Write a full-size SD1.5 or SDXL diffusers folder with random weights, from tileup's configs.

Weights do not change speed or memory, so benchmarks run the real architectures this way.

    python bench/diffusion/make_random_checkpoint.py sd15 /tmp/sd15
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def _config(family: str, name: str) -> dict:
    path = resources.files("tileup") / "data" / "configs" / family / f"{name}.json"
    return json.loads(path.read_text())


def main(family: str, out: str) -> None:
    folder = Path(out)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_config(family, "unet"))
    unet.save_pretrained(folder / "unet")
    AutoencoderKL.from_config(_config(family, "vae")).save_pretrained(folder / "vae")
    vocab = resources.files("tileup") / "data" / "tokenizers" / "clip"
    encoders = [("text_encoder", "tokenizer", CLIPTextModel, "<|endoftext|>")]
    if family == "sdxl":
        encoders.append(("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection, "!"))
    for sub, tok_sub, cls, pad in encoders:
        cls(CLIPTextConfig(**_config(family, sub))).save_pretrained(folder / sub)
        CLIPTokenizer(
            str(vocab / "vocab.json"), str(vocab / "merges.txt"), pad_token=pad, model_max_length=77
        ).save_pretrained(folder / tok_sub)
    EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    ).save_pretrained(folder / "scheduler")
    pipeline = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    index = {
        "_class_name": pipeline,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    if family == "sdxl":
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    print(folder)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

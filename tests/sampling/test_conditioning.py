"""Prompt encoding: A1111's 75-token chunks, SD1 and SDXL layouts, once per job."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sd_fixtures import make_tiny_components, make_tokenizers

from tileup.sampling.conditioning import CHUNK_TOKENS, encode_prompts, token_chunks

CPU = torch.device("cpu")
LONG = ", ".join(f"word{i}" for i in range(60))  # far more than 75 tokens


def _model(family: str) -> SimpleNamespace:
    parts = make_tiny_components(family)
    encoders = tuple(parts[k] for k in ("text_encoder", "text_encoder_2") if k in parts)
    tokenizers = tuple(make_tokenizers(family).values())
    return SimpleNamespace(family=family, text_encoders=encoders, tokenizers=tokenizers)


@pytest.fixture(scope="module")
def sd1() -> SimpleNamespace:
    return _model("sd1")


@pytest.fixture(scope="module")
def sdxl() -> SimpleNamespace:
    return _model("sdxl")


def test_token_chunks_layout(sd1) -> None:
    tok = sd1.tokenizers[0]
    short = token_chunks(tok, "a photo of a cat")
    assert short == [[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70]
    long = token_chunks(tok, LONG)
    ids = tok(LONG, add_special_tokens=False).input_ids
    assert len(long) == -(-len(ids) // CHUNK_TOKENS) >= 2
    assert all(len(c) == 77 and c[0] == 49406 for c in long)
    second = ids[75:150]
    assert long[0][1:76] == ids[:75] and long[1][1 : 1 + len(second)] == second
    assert token_chunks(tok, "") == [[49406, 49407] + [49407] * 75]


def test_long_prompt_is_not_truncated(sd1) -> None:
    full = encode_prompts(sd1, LONG, "", device=CPU, dtype=torch.float32)
    assert full.cond.shape == (1, 77 * full.chunks, 32) and full.chunks >= 2
    assert full.uncond.shape == full.cond.shape, "negative padded to the same number of chunks"
    words = LONG.split(", ")
    tail_changed = encode_prompts(
        sd1, ", ".join([*words[:-1], "zebra"]), "", device=CPU, dtype=torch.float32
    )
    # the last word lives in the second chunk: only it changes
    assert torch.equal(full.cond[:, :77], tail_changed.cond[:, :77])
    assert not torch.equal(full.cond[:, 77:], tail_changed.cond[:, 77:])


def test_negative_prompt_and_determinism(sd1) -> None:
    a = encode_prompts(sd1, "a cat", "blurry", device=CPU, dtype=torch.float32)
    b = encode_prompts(sd1, "a cat", "blurry", device=CPU, dtype=torch.float32)
    c = encode_prompts(sd1, "a cat", "", device=CPU, dtype=torch.float32)
    assert torch.equal(a.cond, b.cond) and torch.equal(a.uncond, b.uncond)
    assert torch.equal(a.cond, c.cond) and not torch.equal(a.uncond, c.uncond)
    assert a.pooled_cond is None


def test_sdxl_concatenates_penultimate_states_and_pools(sdxl) -> None:
    out = encode_prompts(sdxl, "a cat", "", device=CPU, dtype=torch.float32)
    enc1, enc2 = sdxl.text_encoders
    width = enc1.config.hidden_size + enc2.config.hidden_size
    assert out.cond.shape == (1, 77, width)
    assert out.pooled_cond is not None
    assert out.pooled_cond.shape == (1, enc2.config.projection_dim)
    ids = torch.tensor([token_chunks(sdxl.tokenizers[0], "a cat")[0]])
    with torch.inference_mode():
        first = enc1(ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(out.cond[..., : enc1.config.hidden_size], first)

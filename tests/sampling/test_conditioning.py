"""Prompt encoding: A1111's 75-token chunks, SD1 and SDXL layouts, once per job."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sd_fixtures import make_tiny_components, make_tokenizers

from tileup.sampling.conditioning import encode_prompts, prompt_rows

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


def token_chunks(tok, text: str) -> list[list[int]]:
    return [list(ids) for ids, _ in prompt_rows(tok, text)]


def test_token_chunks_layout(sd1) -> None:
    tok = sd1.tokenizers[0]
    short = token_chunks(tok, "a photo of a cat")
    assert short == [[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70]
    long = token_chunks(tok, LONG)
    ids = tok(LONG, add_special_tokens=False).input_ids
    assert len(long) >= 2 and all(len(c) == 77 and c[0] == 49406 for c in long)
    # A1111: a full chunk is cut after its last comma when that lies within 20 tokens of the end
    comma = tok.convert_tokens_to_ids(",</w>")
    cut = max(i for i in range(75) if ids[i] == comma) + 1
    assert 75 - cut < 20 and cut < 75
    assert long[0][1 : 1 + cut] == ids[:cut] and long[0][1 + cut :] == [49407] * (76 - cut)
    second = ids[cut : cut + 20]
    assert long[1][1 : 1 + len(second)] == second
    assert [t for c in long for t in c if t not in (49406, 49407)] == ids  # nothing lost
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


def _states(model: SimpleNamespace, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model.text_encoders[0](torch.tensor([ids])).last_hidden_state


def test_emphasis_weights_the_token_states_keeping_the_mean(sd1) -> None:
    """A1111's "Original" emphasis: ``(cat:1.5)`` scales the cat token's states by 1.5, then
    the whole chunk by old mean / new mean; unweighted prompts are the encoder's own states."""
    tok = sd1.tokenizers[0]
    plain_ids = token_chunks(tok, "a cat")[0]
    plain = encode_prompts(sd1, "a cat", "", device=CPU, dtype=torch.float32).cond
    assert torch.equal(plain, _states(sd1, plain_ids))  # weight 1: untouched
    weighted = encode_prompts(sd1, "a (cat:1.5)", "", device=CPU, dtype=torch.float32).cond
    z = _states(sd1, plain_ids)
    weights = torch.ones(1, 77)
    weights[0, 2] = 1.5  # BOS, "a", "cat"
    scaled = z * weights[..., None]
    expected = scaled * (z.mean() / scaled.mean())
    torch.testing.assert_close(weighted, expected)
    torch.testing.assert_close(weighted.mean(), z.mean())
    assert not torch.allclose(weighted, plain)
    rows = prompt_rows(tok, "[[dog]] \\(literal\\)")
    assert rows[0][1][1] == pytest.approx(1 / 1.1**2)  # nested [] divide twice
    assert "(" in tok.decode(rows[0][0][1:8])  # escaped brackets are text


def test_break_starts_a_new_chunk(sd1) -> None:
    tok = sd1.tokenizers[0]
    rows = token_chunks(tok, "a cat BREAK a dog")
    a_cat, a_dog = (tok("a cat").input_ids[1:-1], tok("a dog").input_ids[1:-1])
    assert len(rows) == 2
    assert rows[0][: 2 + len(a_cat)] == [49406, *a_cat, 49407]
    assert rows[1][: 2 + len(a_dog)] == [49406, *a_dog, 49407]
    out = encode_prompts(sd1, "a cat BREAK a dog", "", device=CPU, dtype=torch.float32)
    assert out.cond.shape[1] == 154 and out.uncond.shape == out.cond.shape

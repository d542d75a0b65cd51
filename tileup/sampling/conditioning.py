"""Prompt encoding as A1111 does it: emphasis weights, prompts of any length in 75-token chunks.

The prompt's A1111 syntax (``(word)``, ``[word]``, ``(word:1.3)``, escapes, ``BREAK``) is parsed
by :mod:`tileup.sampling.prompts`; chunks end at ``BREAK`` or, when full, at the last comma within
20 tokens of the end. Each chunk is ``[BOS] + 75 tokens (padded) + [EOS]``, its hidden states
scaled per token by the weights with the mean restored (A1111's "Original" emphasis); the
chunks' hidden states are concatenated
along the sequence, and the prompt and the negative prompt are padded to the same number of
chunks with empty chunks. SD1 uses the last hidden state, SD2 its penultimate layer (the loaded
encoder already stops there), SDXL the penultimate hidden states of both encoders side by side
and the pooled projection of the second encoder's first chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tileup.sampling.prompts import prompt_schedule, restore_mean, tokenize_weighted

CHUNK_TOKENS = 75


@dataclass(frozen=True, eq=False)
class Conditioning:
    """Encoded prompt and negative prompt; tensors have batch 1 and equal sequence lengths."""

    cond: torch.Tensor
    uncond: torch.Tensor
    pooled_cond: torch.Tensor | None = None
    pooled_uncond: torch.Tensor | None = None

    @property
    def chunks(self) -> int:
        return self.cond.shape[1] // (CHUNK_TOKENS + 2)

    def to(self, device: torch.device) -> Conditioning:
        """The same conditioning with every tensor on ``device``."""

        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Conditioning(
            self.cond.to(device),
            self.uncond.to(device),
            moved(self.pooled_cond),
            moved(self.pooled_uncond),
        )


Row = tuple[tuple[int, ...], tuple[float, ...]]
"""One encoder row: 77 token ids (BOS, 75 tokens, EOS) and their emphasis weights."""


def prompt_rows(tokenizer: Any, text: str) -> list[Row]:
    """``text`` as A1111 feeds it to a CLIP encoder: its emphasis parsed (``(word:1.2)``,
    ``[word]``, ``BREAK``; :mod:`tileup.sampling.prompts`), cut into 75-token chunks (at the
    last comma when it lies within 20 tokens of the end), each framed BOS … EOS and padded
    (with EOS; OpenCLIP's pad id after the first EOS). At least one row."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    if comma == tokenizer.unk_token_id:
        comma = None

    def tokenize(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        ids: list[list[int]] = tokenizer(
            texts, add_special_tokens=False, truncation=False
        ).input_ids
        return ids

    chunks = tokenize_weighted(
        tokenize, text, comma_token=comma, pad_token=eos, chunk_length=CHUNK_TOKENS
    )
    return [c.framed(bos=bos, eos=eos, pad=pad) for c in chunks]


@torch.inference_mode()
def _encode_chunks(
    family: str,
    encoders: tuple[Any, ...],
    rows: Sequence[Sequence[Row]],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states [1, 77·k, D] and (SDXL) the pooled vector [1, P] of the first chunk.

    ``rows[e][k]``: chunk k for encoder e (every encoder has the same count). Each chunk's
    states are weighted by its tokens' emphasis with A1111's mean restoration (skipped when
    every weight is 1: the states are then exactly the encoder's).
    """
    states: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for index, chunk in enumerate(zip(*rows, strict=True)):
        per_encoder = []
        for encoder, (token_ids, weights) in zip(encoders, chunk, strict=True):
            ids = torch.tensor([token_ids], dtype=torch.long, device=device)
            out = encoder(ids, output_hidden_states=True)
            if family == "sdxl":
                z = out.hidden_states[-2]
                if index == 0 and hasattr(out, "text_embeds"):
                    pooled = out.text_embeds
            else:
                z = out.last_hidden_state
            if any(w != 1.0 for w in weights):
                z = restore_mean(z, torch.tensor([weights], dtype=z.dtype, device=z.device))
            per_encoder.append(z)
        states.append(torch.cat(per_encoder, dim=-1))
    return torch.cat(states, dim=1), pooled


def encode_prompts(
    model: Any, prompt: str, negative_prompt: str, *, device: torch.device, dtype: torch.dtype
) -> Conditioning:
    """Encode both prompts once per job with the model's text encoders (on ``device``)."""
    tokenizers, encoders = model.tokenizers, model.text_encoders
    per_text: list[list[list[Row]]] = []  # [text][tokenizer][chunk]
    for text in (prompt, negative_prompt):
        per_text.append([prompt_rows(tok, text) for tok in tokenizers])
    count = max(len(chunks) for tokenized in per_text for chunks in tokenized)
    empty = [prompt_rows(tok, "")[0] for tok in tokenizers]
    results = []
    for tokenized in per_text:
        rows = [chunks + [empty[k]] * (count - len(chunks)) for k, chunks in enumerate(tokenized)]
        results.append(_encode_chunks(model.family, tuple(encoders), rows, device))
    (cond, pooled_cond), (uncond, pooled_uncond) = results
    return Conditioning(
        cond=cond.to(dtype),
        uncond=uncond.to(dtype),
        pooled_cond=None if pooled_cond is None else pooled_cond.to(dtype),
        pooled_uncond=None if pooled_uncond is None else pooled_uncond.to(dtype),
    )


def encode_schedule(
    model: Any,
    prompt: str,
    negative_prompt: str,
    steps: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[tuple[int, Conditioning], ...]:
    """A1111's prompt editing (``[from:to:when]``) and alternation (``[a|b]``) over ``steps``
    sampling steps, for the prompt and the negative prompt: (last step, conditioning) pairs,
    each distinct pair of texts encoded once. One pair when neither prompt changes."""
    positive = prompt_schedule(prompt, steps)
    negative = prompt_schedule(negative_prompt, steps)
    ends = sorted({end for end, _ in positive} | {end for end, _ in negative})

    def text_at(schedule: list[tuple[int, str]], step: int) -> str:
        return next(text for end, text in schedule if step <= end)

    encoded: dict[tuple[str, str], Conditioning] = {}
    schedule: list[tuple[int, Conditioning]] = []
    for end in ends:
        texts = (text_at(positive, end), text_at(negative, end))
        if texts not in encoded:
            encoded[texts] = encode_prompts(model, *texts, device=device, dtype=dtype)
        if schedule and schedule[-1][1] is encoded[texts]:
            schedule[-1] = (end, encoded[texts])  # the same texts go on
        else:
            schedule.append((end, encoded[texts]))
    return tuple(schedule)

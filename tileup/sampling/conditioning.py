"""Prompt encoding as A1111 does it: prompts longer than 77 tokens go in 75-token chunks.

Each chunk is ``[BOS] + 75 tokens (padded) + [EOS]``; the chunks' hidden states are concatenated
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


def token_chunks(tokenizer: Any, text: str) -> list[list[int]]:
    """Token ids of ``text`` cut into chunks of 77 (BOS, 75 tokens padded, EOS); at least one."""
    ids = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    chunks = []
    for start in range(0, max(len(ids), 1), CHUNK_TOKENS):
        body = ids[start : start + CHUNK_TOKENS]
        # A1111 ends each chunk with EOS right after the text, then pads
        chunk = [bos, *body, eos]
        chunk += [pad] * (CHUNK_TOKENS + 2 - len(chunk))
        chunks.append(chunk)
    return chunks


@torch.inference_mode()
def _encode_chunks(
    family: str,
    encoders: tuple[Any, ...],
    ids: Sequence[Sequence[torch.Tensor]],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states [1, 77·k, D] and (SDXL) the pooled vector [1, P] of the first chunk.

    ``ids[e][k]``: the token ids of chunk k for encoder e (every encoder has the same count).
    """
    states: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for index, chunk in enumerate(zip(*ids, strict=True)):
        per_encoder = []
        for encoder, token_ids in zip(encoders, chunk, strict=True):
            out = encoder(token_ids[None].to(device), output_hidden_states=True)
            if family == "sdxl":
                per_encoder.append(out.hidden_states[-2])
                if index == 0 and hasattr(out, "text_embeds"):
                    pooled = out.text_embeds
            else:
                per_encoder.append(out.last_hidden_state)
        states.append(torch.cat(per_encoder, dim=-1))
    return torch.cat(states, dim=1), pooled


def encode_prompts(
    model: Any, prompt: str, negative_prompt: str, *, device: torch.device, dtype: torch.dtype
) -> Conditioning:
    """Encode both prompts once per job with the model's text encoders (on ``device``)."""
    tokenizers, encoders = model.tokenizers, model.text_encoders
    per_text: list[list[list[list[int]]]] = []  # [text][tokenizer][chunk][token]
    for text in (prompt, negative_prompt):
        per_text.append([token_chunks(tok, text) for tok in tokenizers])
    count = max(len(chunks) for tokenized in per_text for chunks in tokenized)
    empty = [token_chunks(tok, "")[0] for tok in tokenizers]
    results = []
    for tokenized in per_text:
        ids: list[list[torch.Tensor]] = []
        for tok_index, chunks in enumerate(tokenized):
            padded = chunks + [empty[tok_index]] * (count - len(chunks))
            ids.append([torch.tensor(c, dtype=torch.long) for c in padded])
        results.append(_encode_chunks(model.family, tuple(encoders), ids, device))
    (cond, pooled_cond), (uncond, pooled_uncond) = results
    return Conditioning(
        cond=cond.to(dtype),
        uncond=uncond.to(dtype),
        pooled_cond=None if pooled_cond is None else pooled_cond.to(dtype),
        pooled_uncond=None if pooled_uncond is None else pooled_uncond.to(dtype),
    )

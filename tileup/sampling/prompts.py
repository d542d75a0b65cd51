"""AUTOMATIC1111's prompt syntax as pure functions: emphasis, prompt editing, 75-token chunks.

Behaviour-for-behaviour re-implementations (no code taken over) of stable-diffusion-webui:

- :func:`parse_attention`: ``modules/prompt_parser.py`` ``parse_prompt_attention``;
- :func:`prompt_schedule`: ``modules/prompt_parser.py``
  ``get_learned_conditioning_prompt_schedules`` for one prompt. A1111 parses with a lark Earley
  grammar; here a small recursive-descent parser gives the same results, including the
  fallback to the unparsed prompt where lark finds no parse (see :func:`prompt_schedule` for
  the one kind of prompt where A1111's own result varies from run to run);
- :func:`tokenize_weighted`: ``modules/sd_hijack_clip.py`` ``tokenize_line`` (without textual
  inversion embeddings);
- :func:`restore_mean`: the "Original" emphasis of ``modules/sd_emphasis.py``, applied by
  ``process_tokens``.

Read from AUTOMATIC1111/stable-diffusion-webui ``modules/prompt_parser.py`` at 28bd8e14
(the version with ``hires_steps`` and ``use_old_scheduling``, grammar run by lark 1.1.2, A1111's
pin) and ``modules/sd_hijack_clip.py`` at 5ad03e65.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    import torch

BREAK = ("BREAK", -1.0)
"""The entry :func:`parse_attention` gives for the keyword ``BREAK`` (a forced chunk end)."""

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# --- emphasis: (a), [a], (a:1.3) ------------------------------------------------------------

# One token each: an escape, an opening bracket, ":w)" closing with a weight, a closing bracket,
# a run of text, a lone ":". Same alternatives, same order as A1111's re_attention.
_ATTENTION = re.compile(
    r"""
    \\[()\[\]\\]          # escaped bracket or backslash: the literal character
    | \\                  # lone backslash: nothing
    | [(\[]               # opening bracket
    | :\s*([+-]?[.\d]+)\s*\)  # ":1.3)": closes a round bracket with that weight
    | [)\]]               # closing bracket
    | [^\\()\[\]:]+       # text
    | :
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into (text, weight) runs, A1111's ``parse_prompt_attention``.

    ``(a)`` multiplies by 1.1, ``[a]`` divides by 1.1, ``(a:w)`` multiplies by ``w``; brackets
    nest; ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; a closing bracket
    without its opening one is text, an opening one left unclosed applies to the end of the text.
    The keyword ``BREAK`` (a whole word) and the whitespace around it give a :data:`BREAK`
    entry; its weight of -1 is multiplied like any other, so a ``BREAK`` inside brackets stops
    being one (as in A1111). Neighbouring runs of equal weight are merged; an empty text gives
    ``[("", 1.0)]``. A weight that is not a number (``(a:1.2.3)``) raises ``ValueError``.
    """
    res: list[list[str | float]] = []  # [text, weight]: weights are scaled in place
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for entry in res[start:]:
            entry[1] = float(entry[1]) * factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    res.append(list(BREAK))
                res.append([part, 1.0])

    for start in round_open:
        multiply(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply(start, SQUARE_MULTIPLIER)

    out = [(str(part), float(weight)) for part, weight in res] or [("", 1.0)]
    merged = [out[0]]
    for part, weight in out[1:]:
        if merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + part, weight)
        else:
            merged.append((part, weight))
    return merged


# --- prompt editing [from:to:when] and alternation [a|b] ---------------------------------------


@dataclass(frozen=True, eq=False)
class _Edit:
    """``[before:after:when]``; ``before`` is None for ``[after:when]``."""

    before: tuple[_Node, ...] | None
    after: tuple[_Node, ...]
    when: str  # the number as written: whether it has a "." decides its meaning


@dataclass(frozen=True, eq=False)
class _Alternate:
    """``[a|b|...]``: option ``(step - 1) % len(options)`` at each step."""

    options: tuple[tuple[_Node, ...], ...]


_Node: TypeAlias = "str | _Edit | _Alternate"


class _NoParse(Exception):
    """The prompt is not in A1111's grammar: it is used unchanged at every step."""


# The grammar's terminals, as lark compiles them; "plain" stops at \ [ ] ( ) : | but takes
# backslash escapes (never a newline), whitespace included.
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_NUMBER = re.compile(
    r"[+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+)"
)
_WHEN = re.compile(rf"\s*({_NUMBER.pattern})\s*\]")  # after the last ":" of [..:..:when]


def _nested_openers(text: str) -> set[int]:
    """Positions of the opening brackets closed by their kind with only nested pairs between.

    Only these can start a group; checking first keeps a run of unclosed ``(`` linear.
    """
    found: set[int] = set()
    stack: list[int] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char == "\\" and text[pos + 1 : pos + 2] not in ("", "\n"):
            pos += 2  # an escape, as "plain" reads it
            continue
        if char in "([":
            stack.append(pos)
        elif char in ")]":
            if stack and text[stack[-1]] == ("(" if char == ")" else "["):
                found.add(stack.pop())
            else:  # a stray closer: no group open around it can close
                stack.clear()
        pos += 1
    return found


class _Parser:
    """Recursive descent over A1111's schedule grammar.

    Inside brackets every bracket must be matched; at the top level an opening bracket that
    starts no well-formed group, and any ``]`` ``)`` ``:``, are literal text (the grammar's
    ``/[][():]/+`` alternative). A well-formed group is always taken as one: lark's choice
    wherever it makes one (see :func:`prompt_schedule`). A ``|`` outside an alternation, or a
    backslash escaping nothing (at the end, before a newline), makes the prompt unparsable.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.nested = _nested_openers(text)

    def parse(self) -> tuple[_Node, ...]:
        nodes, pos = self._sequence(0, top=True)
        if pos != len(self.text):
            raise _NoParse
        return nodes

    def _char(self, pos: int) -> str:
        return self.text[pos] if pos < len(self.text) else ""

    def _sequence(self, pos: int, *, top: bool) -> tuple[tuple[_Node, ...], int]:
        """Items from ``pos`` up to the first character they cannot take."""
        nodes: list[_Node] = []
        while pos < len(self.text):
            plain = _PLAIN.match(self.text, pos)
            char = self.text[pos]
            if plain:
                nodes.append(plain.group(0))
                pos = plain.end()
                continue
            if char in "([" and pos in self.nested:
                try:
                    group, pos = self._group(pos)
                except _NoParse:
                    if not top:
                        raise
                    nodes.append(char)
                    pos += 1
                    continue
                nodes.extend(group)
            elif top and char in "([]):":
                nodes.append(char)
                pos += 1
            else:
                break
        return tuple(nodes), pos

    def _expect(self, pos: int, char: str) -> int:
        if self._char(pos) != char:
            raise _NoParse
        return pos + 1

    def _group(self, pos: int) -> tuple[list[_Node], int]:
        """The bracketed group opening at ``pos``, as the nodes it adds to its sequence."""
        opening = self.text[pos]
        first, pos = self._sequence(pos + 1, top=False)
        sep = self._char(pos)
        if opening == "(":  # emphasis: kept as written
            if sep == ")":
                return ["(", *first, ")"], pos + 1
            second, pos = self._sequence(self._expect(pos, ":"), top=False)
            return ["(", *first, ":", *second, ")"], self._expect(pos, ")")
        if sep == "]":
            return ["[", *first, "]"], pos + 1
        if sep == "|":
            options = [first]
            while self._char(pos) == "|":
                option, pos = self._sequence(pos + 1, top=False)
                options.append(option)
            return [_Alternate(tuple(options))], self._expect(pos, "]")
        pos = self._expect(pos, ":")
        when = _WHEN.match(self.text, pos)
        if when:
            return [_Edit(None, first, when.group(1))], when.end()
        second, pos = self._sequence(pos, top=False)
        when = _WHEN.match(self.text, self._expect(pos, ":"))
        if not when:
            raise _NoParse
        return [_Edit(first, second, when.group(1))], when.end()


def _walk(nodes: Sequence[_Node]) -> Iterator[_Edit | _Alternate]:
    for node in nodes:
        if isinstance(node, _Edit):
            yield node
            yield from _walk(node.before or ())
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def _text_at(nodes: Sequence[_Node], step: int, ends: dict[_Edit, int]) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Edit):
            part = (node.before or ()) if step <= ends[node] else node.after
            out.append(_text_at(part, step, ends))
        else:
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step, ends))
    return "".join(out)


def prompt_schedule(
    text: str,
    steps: int,
    *,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> list[tuple[int, str]]:
    """(end step, prompt) pairs of ``text``, A1111's ``get_learned_conditioning_prompt_schedules``.

    ``[from:to:when]`` is ``from`` up to step ``when`` (inclusive) and ``to`` after it;
    ``[to:when]`` and ``[from::when]`` leave one side empty; groups nest. A ``when`` written
    with a "." is a fraction of the steps (``.5``, ``1.0``: ``int(when * steps)``), else a step
    count; it is capped at ``steps``, and one below 1 adds no boundary (the ``to`` side then
    holds from the first step). ``[a|b|...]`` alternates every step, so the schedule has one
    entry per step. Emphasis brackets are kept as written for :func:`parse_attention`. The
    pairs are sorted by end step, the last ends at ``steps``; a prompt outside the grammar
    (``a|b``, unmatched ``|``) is ``[(steps, text)]``.

    The defaults are current A1111's first pass (``use_old_scheduling`` off, "Use old prompt
    editing timelines" unticked). ``hires_steps`` gives the hires pass's schedule, over
    ``hires_steps`` steps: a step count then counts from the start of the first pass (``15``
    with 10 first-pass steps is hires step 5), a fraction from 1.0 to 2.0 covers the hires pass.
    ``use_old_scheduling`` is A1111's old timeline: a ``when`` below 1 is a fraction, any other
    a step count, over ``steps`` (``hires_steps`` then ignored).

    One divergence, where A1111 has no single answer: a top-level group holding an edit that is
    directly followed by a stray ``]`` ``)`` ``:`` or an unclosed ``[`` ``(`` (``[a:3]]``) has
    two parses that lark 1.1.2, A1111's pin, ranks equal and orders by hash, so A1111 gives
    the edit or the literal text depending on the process. Here the edit is always taken.
    """
    if hires_steps is None or use_old_scheduling:
        int_offset, float_offset, total = 0, 0.0, steps
    else:
        int_offset, float_offset, total = steps, 1.0, hires_steps
    try:
        nodes = _Parser(text).parse()
    except _NoParse:
        return [(total, text)]

    def end_step(when: str) -> int:
        value = float(when)
        if use_old_scheduling:
            value = value * total if value < 1 else value
        elif "." in when:
            value = (value - float_offset) * total
        else:
            value = value - int_offset
        return min(total, int(value))

    ends: dict[_Edit, int] = {}
    boundaries = {total}
    for node in _walk(nodes):
        if isinstance(node, _Edit):
            ends[node] = end_step(node.when)
            if ends[node] >= 1:
                boundaries.add(ends[node])
        else:
            boundaries.update(range(1, total + 1))
    return [(step, _text_at(nodes, step, ends)) for step in sorted(boundaries)]


# --- chunking ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptChunk:
    """One chunk of a prompt: its token ids and their weights, without BOS/EOS."""

    tokens: tuple[int, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.weights):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.weights)} weights")

    def framed(
        self, *, bos: int, eos: int, pad: int | None = None
    ) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The encoder's row as A1111 sends it: BOS, the tokens, EOS; BOS/EOS weigh 1.0.

        With ``pad`` other than ``eos`` (SD2's OpenCLIP), every id after the first EOS becomes
        ``pad``, as A1111's ``process_tokens`` does (chunks padded with the EOS id then read
        ``BOS, text, EOS, pad, ..., pad``).
        """
        ids = [bos, *self.tokens, eos]
        if pad is not None and pad != eos:
            first = ids.index(eos)
            ids[first + 1 :] = [pad] * (len(ids) - first - 1)
        return tuple(ids), (1.0, *self.weights, 1.0)


def tokenize_weighted(
    tokenize: Callable[[list[str]], list[list[int]]],
    text: str,
    *,
    comma_token: int | None,
    pad_token: int,
    chunk_length: int = 75,
    comma_backtrack: int = 20,
) -> list[PromptChunk]:
    """``text``'s tokens in weighted chunks of ``chunk_length``, A1111's ``tokenize_line``.

    ``tokenize`` maps texts to token ids without BOS/EOS (a CLIP tokenizer's ``input_ids`` with
    ``add_special_tokens=False, truncation=False``); it gets every run of
    :func:`parse_attention` in one call. Each token weighs its run's weight. A chunk ends when
    full; ``BREAK`` ends it early (a ``BREAK`` first gives a chunk of padding). When a chunk is
    full and the next token is no comma, the tokens after the chunk's last comma (index ``i``)
    move to the next chunk if ``chunk_length - i <= comma_backtrack`` (0: never); a comma that
    comes when the chunk is full opens the next one and is no cut point there. Chunks are
    padded to ``chunk_length`` with ``pad_token`` (A1111 pads with EOS), weight 1.0; an empty
    text gives one chunk of padding. There is always at least one chunk. Textual inversion
    embeddings are not looked up: their names are tokenized as text.
    """
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be at least 1, got {chunk_length}")
    parsed = parse_attention(text)
    tokenized = tokenize([part for part, _ in parsed])
    if len(tokenized) != len(parsed):
        raise ValueError(f"tokenize gave {len(tokenized)} results for {len(parsed)} texts")

    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal last_comma
        fill = chunk_length - len(tokens)
        chunks.append(
            PromptChunk(tuple(tokens) + (pad_token,) * fill, tuple(weights) + (1.0,) * fill)
        )
        tokens.clear()
        weights.clear()
        last_comma = -1

    for ids, (part, weight) in zip(tokenized, parsed, strict=True):
        if (part, weight) == BREAK:
            close()
            continue
        for token in ids:
            if token == comma_token:
                last_comma = len(tokens)
            elif (
                comma_backtrack != 0
                and len(tokens) == chunk_length
                and last_comma != -1
                and len(tokens) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                del tokens[cut:], weights[cut:]
                close()
                tokens.extend(moved[0])
                weights.extend(moved[1])
            if len(tokens) == chunk_length:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close()
    return chunks


# --- weighting hidden states --------------------------------------------------------------------


def restore_mean(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``z`` [..., T, C] scaled per token by ``weights`` [..., T], keeping ``z.mean()``.

    A1111's "Original" emphasis: ``z * weights[..., None]``, then multiplied by
    ``old_mean / new_mean``, the means over the whole tensor (every row of the batch encoded
    together, as in A1111). All-1 weights return ``z`` unchanged in value.
    """
    original_mean = z.mean()
    z = z * weights.reshape((*weights.shape, 1)).expand(z.shape)
    new_mean = z.mean()
    return z * (original_mean / new_mean)

"""A1111 prompt syntax: emphasis weights, prompt editing / alternation, 75-token chunks.

Expected values are A1111's: the doctests of stable-diffusion-webui's ``modules/prompt_parser.py``
(28bd8e14) and results of its ``get_learned_conditioning_prompt_schedules`` /
``parse_prompt_attention`` / ``sd_hijack_clip.tokenize_line`` (5ad03e65) run on these inputs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sd_fixtures import make_tokenizers

from tileup.sampling.prompts import (
    PromptChunk,
    parse_attention,
    prompt_schedule,
    restore_mean,
    tokenize_weighted,
)

# --- parse_attention ---------------------------------------------------------------------------

# parse_prompt_attention's doctests, verbatim (the docstring's "\(" is a backslash and a paren).
ATTENTION_DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION_DOCTESTS)
def test_parse_attention_a1111_doctests(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == expected  # exact floats: same multiplication order


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", [("", 1.0)]),
        ("(a:1.3)", [("a", 1.3)]),
        ("(a: 1.5 ) b", [("a", 1.5), (" b", 1.0)]),
        ("[a]", [("a", 1 / 1.1)]),
        ("[[a]] b", [("a", 1 / 1.1 / 1.1), (" b", 1.0)]),
        ("a) b] c: d", [("a) b] c: d", 1.0)]),  # stray closers and colons are text
        (r"\\ \[x\] \)", [("\\ [x] )", 1.0)]),
        ("a \\", [("a ", 1.0)]),  # a lone backslash is dropped
        ("[unclosed (both", [("unclosed ", 1 / 1.1), ("both", 1.1 / 1.1)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a\n BREAK\tb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("BREAKfast", [("BREAKfast", 1.0)]),  # only the whole word
        ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
        # inside brackets BREAK's -1 is multiplied too: it stops being a BREAK (as in A1111)
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ],
)
def test_parse_attention(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == expected


def test_parse_attention_bad_weight_raises_like_a1111() -> None:
    with pytest.raises(ValueError):
        parse_attention("(a:1.2.3)")


# --- prompt_schedule ---------------------------------------------------------------------------

ALTERNATING = [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]

# get_learned_conditioning_prompt_schedules' doctests, g = lambda p: f([p], 10)[0]
SCHEDULE_DOCTESTS = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", ALTERNATING),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
]


@pytest.mark.parametrize(("text", "expected"), SCHEDULE_DOCTESTS)
def test_prompt_schedule_a1111_doctests(text: str, expected: list[tuple[int, str]]) -> None:
    assert prompt_schedule(text, 10) == expected


def test_prompt_schedule_a1111_hires_doctests() -> None:
    # g = lambda p: f([p], 10, 10)[0]
    assert prompt_schedule("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]


def test_prompt_schedule_stale_a1111_doctest() -> None:
    # A1111's doctest says [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this right now"),
    # but its grammar has no parse for a "|" outside [a|b] (lark 1.1.2 and 1.3.1 alike): the
    # prompt is used unchanged, which is what A1111 actually returns.
    assert prompt_schedule("a [{b|d{:.5] c", 10) == [(10, "a [{b|d{:.5] c")]


def test_prompt_schedule_a1111_comment_example() -> None:
    text = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
    )
    assert prompt_schedule(text, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


@pytest.mark.parametrize(
    ("text", "steps", "expected"),
    [
        ("a [b: 3 ]", 10, [(3, "a "), (10, "a b")]),
        ("[a:b:20]", 10, [(10, "a")]),  # capped at steps
        ("[a:b:0]", 10, [(10, "b")]),  # below 1: no boundary, "to" from the start
        ("[a:b:-3]", 10, [(10, "b")]),
        ("[a:b:+2]", 10, [(2, "a"), (10, "b")]),
        ("[a:b:1e1]", 20, [(10, "a"), (20, "b")]),  # no ".": a step count
        ("[a:b:1.]", 10, [(10, "a")]),  # a ".": a fraction, 1.0 = all steps
        ("[a:b:2.5]", 4, [(4, "a")]),
        ("[a::3] [::2]", 10, [(2, "a "), (3, "a "), (10, " ")]),
        ("[a:[b:c:6]:3]", 10, [(3, "a"), (6, "b"), (10, "c")]),
        ("(a [b:c:3]:1.2)", 10, [(3, "(a b:1.2)"), (10, "(a c:1.2)")]),
        ("[cat:dog:0.3] (red:1.2)", 10, [(3, "cat (red:1.2)"), (10, "dog (red:1.2)")]),
        ("[[a|b]:c:2]", 4, [(1, "a"), (2, "b"), (3, "c"), (4, "c")]),
        ("[a|b|c] [d:e:2]", 5, [(1, "a d"), (2, "b d"), (3, "c e"), (4, "a e"), (5, "b e")]),
        ("[(a:3)|[b]]", 2, [(1, "(a:3)"), (2, "[b]")]),
        ("[|]", 3, [(1, ""), (2, ""), (3, "")]),
        ("a:b", 10, [(10, "a:b")]),
        (r"a \[b:3\]", 10, [(10, r"a \[b:3\]")]),  # escaped: not an edit
        (r"a\\[b:3]", 10, [(3, r"a\\"), (10, r"a\\b")]),  # escaped backslash, then an edit
        # outside the grammar ("|" outside [a|b], a backslash escaping nothing): unchanged
        ("[x:3] a|b", 10, [(10, "[x:3] a|b")]),
        ("[x:3] \\", 10, [(10, "[x:3] \\")]),
        ("[a|b:3]", 10, [(10, "[a|b:3]")]),
        ("(" * 2000 + "a [b:3]", 10, [(3, "(" * 2000 + "a "), (10, "(" * 2000 + "a b")]),
        # stray brackets are text, well-formed groups are still groups
        ("[[a:3]", 10, [(3, "["), (10, "[a")]),
        ("][a:3]", 10, [(3, "]"), (10, "]a")]),
        # A1111's lark 1.1.2 resolves this one per process (hash order of tied parses): either
        # this or [(10, "[a:3]]")]. The group is always taken here.
        ("[a:3]]", 10, [(3, "]"), (10, "a]")]),
    ],
)
def test_prompt_schedule(text: str, steps: int, expected: list[tuple[int, str]]) -> None:
    assert prompt_schedule(text, steps) == expected


@pytest.mark.parametrize(
    ("text", "kwargs", "expected"),
    [
        # old timelines: below 1 a fraction, else steps (1.0 is step 1)
        ("a [b:1.0]", dict(use_old_scheduling=True), [(1, "a "), (10, "a b")]),
        ("a [b:1.0]", {}, [(10, "a ")]),
        ("[a:b:0.99]", dict(use_old_scheduling=True), [(9, "a"), (10, "b")]),
        # hires pass: a step count counts from the first pass's start, 1.0-2.0 spans the hires
        ("a [b:15]", dict(hires_steps=10), [(5, "a "), (10, "a b")]),
        ("a [b:5]", dict(hires_steps=10), [(10, "a b")]),
        ("a [b:c:1.5] d", dict(hires_steps=20), [(10, "a b d"), (20, "a c d")]),
        ("a [b:c:12] d", dict(hires_steps=20), [(2, "a b d"), (20, "a c d")]),
        # old timelines ignore hires_steps
        ("a [b:15]", dict(hires_steps=20, use_old_scheduling=True), [(10, "a ")]),
        ("a [b:.5]", dict(hires_steps=20, use_old_scheduling=True), [(5, "a "), (10, "a b")]),
    ],
)
def test_prompt_schedule_timelines(
    text: str, kwargs: dict[str, Any], expected: list[tuple[int, str]]
) -> None:
    assert prompt_schedule(text, 10, **kwargs) == expected


# --- tokenize_weighted: a real CLIP tokenizer ---------------------------------------------------

COMMA, EOS, CAT, DOG, BIRD, RED, BREAK_WORD = 267, 49407, 2368, 1929, 3329, 736, 2568


@pytest.fixture(scope="module")
def tokenize():
    tok = make_tokenizers("sd1")["tokenizer"]  # the shipped CLIP vocabulary, offline

    def run(texts: list[str]) -> list[list[int]]:
        return tok(texts, add_special_tokens=False, truncation=False).input_ids

    ids = (CAT, DOG, COMMA, BIRD, RED, BREAK_WORD)
    assert run(["cat", "dog", ",", "bird", "red", "BREAK"]) == [[i] for i in ids]
    return run


def chunks_of(tokenize, text: str, **kwargs) -> list[PromptChunk]:
    return tokenize_weighted(tokenize, text, comma_token=COMMA, pad_token=EOS, **kwargs)


def padded(tokens: list[int], weights: list[float] | None = None) -> PromptChunk:
    weights = [1.0] * len(tokens) if weights is None else weights
    fill = 75 - len(tokens)
    return PromptChunk(tuple(tokens) + (EOS,) * fill, tuple(weights) + (1.0,) * fill)


def words(word: str, n: int) -> str:
    return " ".join([word] * n)


def test_empty_prompt_is_one_chunk_of_padding(tokenize) -> None:
    assert chunks_of(tokenize, "") == [PromptChunk((EOS,) * 75, (1.0,) * 75)]


def test_short_prompt_and_weights(tokenize) -> None:
    assert chunks_of(tokenize, "a photo of a cat") == [padded([320, 1125, 539, 320, CAT])]
    assert chunks_of(tokenize, "(cat:1.5) dog [bird]") == [
        padded([CAT, DOG, BIRD], [1.5, 1.0, 1 / 1.1])
    ]


def test_pad_token_is_a_parameter(tokenize) -> None:
    (chunk,) = tokenize_weighted(tokenize, "cat", comma_token=COMMA, pad_token=0)
    assert chunk.tokens == (CAT,) + (0,) * 74


def test_one_tokenize_call_with_every_run(tokenize) -> None:
    calls: list[list[str]] = []

    def spy(texts: list[str]) -> list[list[int]]:
        calls.append(texts)
        return tokenize(texts)

    chunks_of(spy, "a (cat) BREAK dog")
    assert calls == [["a ", "cat", "", "BREAK", "dog"]]  # BREAK takes the spaces around it


def test_long_prompt_without_commas(tokenize) -> None:
    assert chunks_of(tokenize, words("cat", 75)) == [padded([CAT] * 75)]  # exactly full: one
    assert chunks_of(tokenize, words("cat", 80)) == [padded([CAT] * 75), padded([CAT] * 5)]


def test_cut_at_last_comma_within_backtrack(tokenize) -> None:
    # comma at index 60: 15 from the end; the 14 cats after it move to the next chunk
    text = words("dog", 60) + ", (" + words("cat", 20) + ":1.3)"
    assert chunks_of(tokenize, text) == [
        padded([DOG] * 60 + [COMMA]),
        padded([CAT] * 20, [1.3] * 20),  # moved tokens keep their weights
    ]
    # backtrack 0: never cut
    assert chunks_of(tokenize, text, comma_backtrack=0) == [
        PromptChunk((DOG,) * 60 + (COMMA,) + (CAT,) * 14, (1.0,) * 61 + (1.3,) * 14),
        padded([CAT] * 6, [1.3] * 6),
    ]


def test_backtrack_limit_is_inclusive(tokenize) -> None:
    at_20 = words("dog", 55) + ", " + words("cat", 30)  # comma at index 55: 75 - 55 = 20
    assert chunks_of(tokenize, at_20) == [padded([DOG] * 55 + [COMMA]), padded([CAT] * 30)]
    at_21 = words("dog", 54) + ", " + words("cat", 30)  # comma at 54: 21 from the end
    assert chunks_of(tokenize, at_21) == [
        PromptChunk((DOG,) * 54 + (COMMA,) + (CAT,) * 20, (1.0,) * 75),
        padded([CAT] * 10),
    ]
    assert len(chunks_of(tokenize, at_21, comma_backtrack=21)[0].tokens) == 75
    assert chunks_of(tokenize, at_21, comma_backtrack=21)[1] == padded([CAT] * 30)


def test_comma_that_opens_a_chunk_is_no_cut_point(tokenize) -> None:
    # the comma arrives when the chunk is full: it goes first into the next chunk, which then
    # forgets it (A1111 resets last_comma on every new chunk), so a backtrack of 75 cuts nothing
    text = words("dog", 75) + ", " + words("cat", 80)
    assert chunks_of(tokenize, text, comma_backtrack=75) == [
        padded([DOG] * 75),
        padded([COMMA] + [CAT] * 74),
        padded([CAT] * 6),
    ]


def test_chunk_lengths_and_cuts_on_a_long_comma_list(tokenize) -> None:
    text = ", ".join(["red cat", "dog", "bird"] * 30)  # "red cat , dog , bird ," x 30: 209 tokens

    def ends(chunks: list[PromptChunk]) -> list[int]:
        return [c.tokens.index(EOS) if EOS in c.tokens else 75 for c in chunks]

    chunks = chunks_of(tokenize, text)
    # index 74 of each full chunk is a comma: the cut there moves nothing
    assert ends(chunks) == [75, 75, 59]
    assert chunks[0].tokens[74] == chunks[1].tokens[74] == COMMA
    assert [t for c in chunks for t in c.tokens[: ends([c])[0]]] == tokenize([text])[0]
    # two tokens more in front: the second chunk is full on "red" after a comma at 73, and
    # "red" moves to the third chunk
    shifted = chunks_of(tokenize, "bird, " + text)
    assert ends(shifted) == [75, 74, 62]
    assert shifted[1].tokens[73] == COMMA
    assert shifted[2].tokens[:3] == (RED, CAT, COMMA)


def test_break(tokenize) -> None:
    assert chunks_of(tokenize, "cat BREAK dog") == [padded([CAT]), padded([DOG])]
    assert chunks_of(tokenize, "cat BREAK") == [padded([CAT])]
    assert chunks_of(tokenize, "BREAK cat") == [padded([]), padded([CAT])]
    assert chunks_of(tokenize, "cat BREAK BREAK dog") == [padded([CAT]), padded([]), padded([DOG])]
    # a full chunk then BREAK: no empty chunk in between
    assert chunks_of(tokenize, words("cat", 75) + " BREAK dog") == [
        padded([CAT] * 75),
        padded([DOG]),
    ]
    # BREAK inside brackets is the word "break" with weight -1.1 (A1111's quirk)
    assert chunks_of(tokenize, "(cat BREAK dog)") == [
        padded([CAT, BREAK_WORD, DOG], [1.1, -1.1, 1.1])
    ]


def test_break_resets_the_comma(tokenize) -> None:
    text = "cat, BREAK " + words("dog", 80)
    assert chunks_of(tokenize, text, comma_backtrack=75) == [
        padded([CAT, COMMA]),
        padded([DOG] * 75),
        padded([DOG] * 5),
    ]


def test_framed_rows() -> None:
    chunk = PromptChunk((CAT, DOG) + (EOS,) * 3, (1.2, 1.0, 1.0, 1.0, 1.0))
    assert chunk.framed(bos=49406, eos=EOS) == (
        (49406, CAT, DOG, EOS, EOS, EOS, EOS),
        (1.0, 1.2, 1.0, 1.0, 1.0, 1.0, 1.0),
    )
    # SD2: everything after the first EOS becomes the pad id
    assert chunk.framed(bos=49406, eos=EOS, pad=0)[0] == (49406, CAT, DOG, EOS, 0, 0, 0)
    full = PromptChunk((CAT,) * 3, (1.0,) * 3)
    assert full.framed(bos=49406, eos=EOS, pad=0)[0] == (49406, CAT, CAT, CAT, EOS)
    with pytest.raises(ValueError):
        PromptChunk((CAT,), ())


def test_bad_chunk_length() -> None:
    with pytest.raises(ValueError):
        tokenize_weighted(
            lambda t: [[] for _ in t], "a", comma_token=1, pad_token=0, chunk_length=0
        )


# --- restore_mean -------------------------------------------------------------------------------


def test_restore_mean_unit_weights_change_nothing() -> None:
    z = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(restore_mean(z, torch.ones(2, 77)), z)


def test_restore_mean_values() -> None:
    z = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    out = restore_mean(z, torch.tensor([[1.0, 2.0]]))
    # z * w = [[1, 2], [6, 8]] (mean 4.25), rescaled by 2.5 / 4.25
    expected = torch.tensor([[[1.0, 2.0], [6.0, 8.0]]]) * (2.5 / 4.25)
    torch.testing.assert_close(out, expected)


def test_restore_mean_keeps_the_mean_of_the_whole_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 77, 16, generator=gen) + 0.5
    weights = 0.5 + torch.rand(2, 77, generator=gen)
    out = restore_mean(z, weights)
    torch.testing.assert_close(out.mean(), z.mean())
    # one factor for the whole batch (A1111 weighs a batch at once), not one per row
    ratio = out / (z * weights[..., None])
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0, 0, 0])))
    assert not torch.allclose(out[0].mean(), z[0].mean())

"""A1111's ``parameters`` text: the settings of an image, as A1111 writes and reads them.

Layout: the prompt, a "Negative prompt: ..." line when there is one, then one line of
``Key: value`` pairs (values with ``,``, ``:`` or a newline JSON-quoted). :func:`job_parameters`
builds the text of a tileup job; A1111's PNG Info and every tool that reads A1111 metadata read it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from tileup.version import __version__

if TYPE_CHECKING:
    from tileup.modes.model import ModelInfo
    from tileup.settings import UpscaleSettings

_NEGATIVE = "Negative prompt:"
_KEY = r"\w[\w \-/]+"
_PAIR = rf'\s*({_KEY}):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
_PAIR_RE = re.compile(_PAIR)
_LINE_RE = re.compile(rf"(?:{_PAIR})+")


def _quote(value: str) -> str:
    """A1111's quoting (json for values with ',', ':' or a newline), also for values that would
    not survive parsing otherwise: containing '"' or surrounded by whitespace."""
    if any(c in value for c in ',:"\n\r') or value != value.strip():
        return json.dumps(value, ensure_ascii=False)
    return value


def format_parameters(
    prompt: str | None, negative_prompt: str | None, items: Mapping[str, object]
) -> str:
    """Settings text in A1111's layout: the prompt, a "Negative prompt: ..." line when given, and
    one ``Key: value, Key: value`` line (None values are left out). Prompts are stripped.
    Keys must match A1111's ``\\w[\\w \\-/]+``; values are str()-ed and quoted when needed.
    """
    parts: list[str] = []
    if prompt and prompt.strip():
        parts.append(prompt.strip())
    if negative_prompt and negative_prompt.strip():
        parts.append(f"{_NEGATIVE} {negative_prompt.strip()}")
    pairs = []
    for key, value in items.items():
        if not re.fullmatch(_KEY, key):
            raise ValueError(f"parameter name {key!r} is not letters, digits, ' ', '-', '_', '/'")
        if value is not None:
            pairs.append(f"{key}: {_quote(str(value))}")
    if pairs:
        parts.append(", ".join(pairs))
    return "\n".join(parts)


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """Split A1111-style settings text into (prompt, negative prompt, {key: value}).

    The last line holds the settings when it consists only of ``Key: value`` pairs; quoted values
    are unquoted. Inverts :func:`format_parameters` whenever it was given at least one item.
    """
    lines = text.strip().split("\n")
    items: dict[str, str] = {}
    last = lines[-1].strip()
    if not last.startswith(_NEGATIVE) and _LINE_RE.fullmatch(last):
        lines.pop()
        for key, value in _PAIR_RE.findall(last):
            items[key] = _unquote(value)
    prompt: list[str] = []
    negative: list[str] = []
    for line in (line.strip() for line in lines):
        if not negative and line.startswith(_NEGATIVE):
            negative.append(line[len(_NEGATIVE) :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    return "\n".join(prompt), "\n".join(negative), items


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        with contextlib.suppress(ValueError):
            unquoted = json.loads(value)
            if isinstance(unquoted, str):
                return unquoted
    return value.strip()


_A1111_FIRST = ("Steps", "Sampler", "Schedule type", "CFG scale")


def _schedule_label(sampler: str, schedule: str) -> str:
    """The schedule a job ran, as A1111 records it: "automatic" resolved to the sampler's own
    (e.g. karras for DPM++ 2M); the setting itself when it cannot be resolved."""
    from tileup.sampling.schedules import SamplerError, resolve

    try:
        return resolve(sampler, schedule)[1].name
    except SamplerError:
        return schedule


def job_parameters(
    settings: UpscaleSettings,
    *,
    size: tuple[int, int],
    seed: int | None,
    model: ModelInfo | None,
    upscaler: str,
    upscaler_architecture: str | None = None,
    source: str | None = None,
    factor: float | None = None,
) -> str:
    """The ``parameters`` text of a job whose result is ``size`` (H, W).

    With a model (re-diffusion): the prompt and negative prompt lines, then A1111's keys in
    A1111's order (Steps, Sampler, Schedule type, CFG scale, Seed, Size, Denoising strength,
    Model hash, Model, VAE), then tileup's own. Without: only the upscale settings, after the
    ``source`` image's own parameters (its prompt, seed, ...: A1111's extras tab keeps them too).
    ``factor`` (output width / input width) is the ``Upscale by`` recorded.
    """
    known = settings.metadata_items(with_checkpoint=model is not None)
    if factor is not None and "Upscale by" in known:  # the factor reached, --width included
        known["Upscale by"] = f"{round(factor, 4):g}"
    items: dict[str, object] = {}
    text_size = f"{size[1]}x{size[0]}"
    if model is None:
        items["Size"] = text_size
    else:
        for key in _A1111_FIRST:
            items[key] = known[key]
        items["Schedule type"] = _schedule_label(settings.sampler, settings.scheduler)
        items["Seed"] = seed
        items["Size"] = text_size
        items["Denoising strength"] = known["Denoising strength"]
        items["Model hash"] = model.model_hash
        items["Model"] = model.name
        if model.vae_name:
            items["VAE"] = model.vae_name
    items.update({k: v for k, v in known.items() if k not in items})
    items["Upscaler"] = upscaler
    if upscaler_architecture is not None:
        items["Upscaler model"] = upscaler_architecture
    items["Version"] = f"tileup {__version__}"
    if model is None:
        kept_prompt, kept_negative, kept = parse_parameters(source) if source else ("", "", {})
        kept = {k: v for k, v in kept.items() if k not in items and k not in _NOT_KEPT}
        return format_parameters(kept_prompt, kept_negative, kept | items)
    return format_parameters(settings.prompt, settings.negative_prompt, items)


_NOT_KEPT = ("Size", "Version")
"""A source's keys that describe the source file itself, not the image's making."""

REUSED = {
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg", float),
    "Seed": ("seed", int),
}
"""A1111 keys → the settings ``--reuse-parameters`` takes from an image (and their types)."""


class ParametersWarning(ValueError):
    """An image's ``parameters`` text that cannot be reused (its message is one line)."""


def reusable_settings(text: str) -> dict[str, object]:
    """Settings values from an image's ``parameters``: prompt, negative prompt and the
    :data:`REUSED` keys present. A value of the wrong type raises ParametersWarning."""
    prompt, negative, items = parse_parameters(text)
    if not items:
        raise ParametersWarning("its parameters text has no 'Key: value' line")
    values: dict[str, object] = {}
    if prompt:
        values["prompt"] = prompt
    if negative:
        values["negative_prompt"] = negative
    for key, (name, kind) in REUSED.items():
        if key in items:
            try:
                values[name] = kind(items[key])
            except ValueError:
                what = "a whole number" if kind is int else "a number"
                raise ParametersWarning(f"{key}: {items[key]!r} is not {what}") from None
    return values

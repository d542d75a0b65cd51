"""Client JSON → checked :class:`~tileup.settings.UpscaleSettings`.

The same validation as the CLI (``UpscaleSettings`` raises the same one-line SettingsError,
naming fields), plus what a server must add: model names are mapped through the
:class:`~tileup.web.catalog.Catalog` (never a client path), the server's own fields (model
folders, device) cannot be set by a client, and the pixel limit cannot be raised past the
server's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from tileup.settings import SettingsError, UpscaleSettings
from tileup.txt2img import MANAGED, GenerateSettings
from tileup.web.catalog import Catalog
from tileup.web.config import ServerConfig

SERVER_FIELDS = ("models_dirs", "device")
"""Settings only the server sets."""


def parse_settings_json(text: str | bytes | None) -> dict[str, Any]:
    """A JSON object of settings (empty text: ``{}``); SettingsError for anything else."""
    if text is None or not str(text if isinstance(text, str) else text.decode()).strip():
        return {}
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SettingsError(f"settings are not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise SettingsError(f"settings must be a JSON object, got {type(value).__name__}")
    return value


def _check_names_and_types(values: Mapping[str, Any], kinds: Mapping[str, str]) -> None:
    """SettingsError for a name not in ``kinds`` (field → type), one the server sets itself,
    or a value of the wrong JSON type."""
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise SettingsError(
            f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(kinds))}"
        )
    fixed = sorted(set(values) & set(SERVER_FIELDS))
    if fixed:
        raise SettingsError(f"{', '.join(fixed)} is set by the server, not by a client")
    _check_types(values, kinds)


def settings_from_client(
    values: Mapping[str, Any], catalog: Catalog, config: ServerConfig
) -> UpscaleSettings:
    """Checked settings of a client's ``values`` (UpscaleSettings field names).

    No checkpoint named: the server's default (the first offered), unless ``checkpoint`` is
    null or "" (pixel upscale only). Raises SettingsError with one line."""
    _check_names_and_types(
        values, {f.name: str(f.type) for f in dataclasses.fields(UpscaleSettings)}
    )
    chosen = dict(values)
    chosen["upscaler"] = catalog.upscaler(chosen.get("upscaler", "default"))
    _server_side(chosen, catalog, config)
    try:
        return UpscaleSettings(**chosen)
    except TypeError as exc:  # a JSON value of a type no field takes, e.g. a list
        raise SettingsError(f"bad settings: {exc}") from None


def _check_types(values: Mapping[str, Any], kinds: Mapping[str, str]) -> None:
    """SettingsError for a value that is not a string (``str`` fields) or a boolean."""
    for name, value in values.items():
        kind = kinds.get(name, "")
        text = kind in ("str", "str | None") and not (
            isinstance(value, str) or (value is None and kind != "str")
        )
        if text or (kind == "bool" and not isinstance(value, bool)):
            raise SettingsError(f"{name} must be a {kind}, got {value!r}")


def _server_side(chosen: dict[str, Any], catalog: Catalog, config: ServerConfig) -> None:
    """Map checkpoint and VAE names through the catalog (the server's default checkpoint when
    none is named), cap max_pixels and set the server's own fields, in place."""
    checkpoint = chosen.get("checkpoint", catalog.default_checkpoint())
    chosen["checkpoint"] = catalog.checkpoint(checkpoint) if checkpoint else None
    vae = chosen.get("vae")
    chosen["vae"] = catalog.vae(vae) if vae else None
    limit = chosen.get("max_pixels", config.max_pixels)
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > config.max_pixels:
        raise SettingsError(f"max_pixels must be at most {config.max_pixels} on this server")
    chosen["max_pixels"] = limit
    chosen["models_dirs"] = tuple(str(d) for d in config.models_dirs)
    chosen["device"] = config.device


def generate_from_client(
    values: Mapping[str, Any], catalog: Catalog, config: ServerConfig
) -> GenerateSettings:
    """Checked :class:`~tileup.txt2img.GenerateSettings` of a client's flat ``values`` (the
    names :meth:`GenerateSettings.from_mapping` takes). Checkpoint, hires checkpoint and hires
    upscaler are names from the catalog; a checkpoint is required (the server's default when
    none is named). Raises SettingsError with one line."""
    own = {f.name: str(f.type) for f in dataclasses.fields(GenerateSettings)}
    rest = {f.name: str(f.type) for f in dataclasses.fields(UpscaleSettings)}
    kinds = {k: v for k, v in rest.items() if k not in MANAGED} | own
    kinds.pop("upscale")
    _check_names_and_types(values, kinds)
    chosen = dict(values)
    _server_side(chosen, catalog, config)
    if not chosen["checkpoint"]:
        raise SettingsError("generate needs a checkpoint (none is offered by this server)")
    if chosen.get("hr_checkpoint"):
        chosen["hr_checkpoint"] = catalog.checkpoint(chosen["hr_checkpoint"])
    else:
        chosen["hr_checkpoint"] = None
    chosen["hr_upscaler"] = catalog.hr_upscaler(chosen.get("hr_upscaler", "Latent"))
    try:
        return GenerateSettings.from_mapping(chosen)
    except TypeError as exc:  # a JSON value of a type no field takes, e.g. a list
        raise SettingsError(f"bad settings: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())

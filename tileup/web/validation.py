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


def settings_from_client(
    values: Mapping[str, Any], catalog: Catalog, config: ServerConfig
) -> UpscaleSettings:
    """Checked settings of a client's ``values`` (UpscaleSettings field names).

    No checkpoint named: the server's default (the first offered), unless ``checkpoint`` is
    null or "" (pixel upscale only). Raises SettingsError with one line."""
    known = {f.name for f in dataclasses.fields(UpscaleSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingsError(
            f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    fixed = sorted(set(values) & set(SERVER_FIELDS))
    if fixed:
        raise SettingsError(f"{', '.join(fixed)} is set by the server, not by a client")
    fields = {f.name: str(f.type) for f in dataclasses.fields(UpscaleSettings)}
    for name, value in values.items():
        kind = fields[name]
        wrong = (kind == "str" and not isinstance(value, str)) or (
            kind == "bool" and not isinstance(value, bool)
        )
        if wrong:
            raise SettingsError(f"{name} must be a {kind}, got {value!r}")
    chosen = dict(values)
    chosen["upscaler"] = catalog.upscaler(chosen.get("upscaler", "default"))
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
    try:
        return UpscaleSettings(**chosen)
    except TypeError as exc:  # a JSON value of a type no field takes, e.g. a list
        raise SettingsError(f"bad settings: {exc}") from None

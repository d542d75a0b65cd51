"""What each SR model file is ("ESRGAN 4x"), remembered between runs.

Telling an architecture apart needs spandrel and torch (seconds to import, then the whole file
read), so ``tileup models`` keeps each answer in ``$XDG_CACHE_HOME/tileup/models.json``
(default ``~/.cache``), keyed by the file's resolved path, size and modification time: a file
that changes is inspected again. A cache that cannot be read or written is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tileup.errors import TileupError

CACHE_NAME = "models.json"


def cache_path() -> Path:
    """The cache file (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tileup" / CACHE_NAME


def _key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _inspect(path: Path) -> str:
    from tileup.upscalers.models import load_sr_model

    try:
        model = load_sr_model(path)
    except TileupError as exc:
        return f"unusable: {exc}"
    return f"{model.architecture} {model.scale}x"


def describe_models(paths: list[Path]) -> list[str]:
    """One description per path ("ESRGAN 4x", or "unusable: <reason>"), from the cache where
    the file is unchanged, else by loading it (and then remembered)."""
    cache_file = cache_path()
    try:
        cache: dict[str, str] = json.loads(cache_file.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    descriptions, changed = [], False
    for path in paths:
        try:
            key = _key(path)
        except OSError as exc:
            descriptions.append(f"unusable: {exc.strerror or exc}")
            continue
        if not isinstance(cache.get(key), str):
            cache[key], changed = _inspect(path), True
        descriptions.append(cache[key])
    if changed:
        _store(cache_file, cache)
    return descriptions


def _store(cache_file: Path, cache: dict[str, str]) -> None:
    """Write the cache atomically; silently give up where that is not possible."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache, indent=0, sort_keys=True))
        os.replace(temporary, cache_file)
    except OSError:
        pass

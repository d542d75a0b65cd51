"""The batch manifest: ``OUT/.tileup-manifest.jsonl``, one JSON line per event, so a long batch
survives faults and restarts.

Every batch into an output folder appends, for each file it is about to run, a ``planned``
record, and as each file finishes a ``done`` or ``failed`` record (flushed and fsync'ed, one
line each, by the one driver process). Re-running the same command reads it back and
:func:`decide` settles each input from its latest record:

- ``done`` with the same settings hash, the output present with the recorded size → skip;
- ``failed`` under the same settings → retried once; failed twice → not run again (its recorded
  error is reported, and still counts as a failure);
- ``planned`` (an interrupted run) or a different settings hash → run again.

An output the manifest says this tool wrote (or may have been writing: ``planned``) for that
input may be replaced without ``--overwrite``; any other existing file still needs
``--overwrite`` (or ``--skip-existing``). Lines that are not a complete record — the last one,
cut short by a crash mid-write — are ignored.

The settings hash (:func:`settings_hash`) covers the settings that change an output's bytes; see
:data:`NOT_HASHED` for those left out. Pure logic here; the batch (``tileup.batch``) does the
file system work around it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tileup.choices import CHECKPOINT_ENV
from tileup.errors import TileupError
from tileup.settings import UpscaleSettings

MANIFEST_NAME = ".tileup-manifest.jsonl"
"""The manifest's file name inside the output folder."""

RETRIES = 1
"""How many times an input that failed under the same settings is tried again in later runs."""

NOT_HASHED = frozenset(
    {
        "device", "vram", "low_vram", "tile_batch", "model_tile", "compile", "cuda_graphs",
        "max_pixels",
    }
)  # fmt: skip
"""Settings that do not change an output's bytes (beyond the float rounding of kernels): where
the job runs, its memory plan and batches (a tiled SR model equals the untiled one), compilation,
and a size limit (a refused file fails, and failures are retried). ``models_dirs`` is left out
too: it says where to look for a model, not which one (the ``upscaler`` name is hashed)."""

Status = Literal["planned", "done", "failed"]
STATUSES: tuple[Status, ...] = ("planned", "done", "failed")


class ManifestError(TileupError):
    """The manifest cannot be written."""


@dataclass(frozen=True)
class Record:
    """One manifest line. ``input``: the input file's absolute path; ``output``: its output path
    relative to the output folder (POSIX); ``settings_hash``: :func:`settings_hash` of the run;
    ``size``: the output's bytes (``done``); ``time``: when it was recorded (Unix seconds)."""

    input: str
    output: str
    settings_hash: str
    status: Status
    seconds: float | None = None
    error: str | None = None
    size: int | None = None
    time: float | None = None

    def to_json(self) -> str:
        """One line of JSON, without the newline."""
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Record | None:
        """The record of a manifest line, or None when the line is not a complete record."""
        try:
            data = json.loads(line)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        text = ("input", "output", "settings_hash")
        if not all(isinstance(data.get(k), str) for k in text):
            return None
        if data.get("status") not in STATUSES:
            return None
        seconds, error, size, when = (data.get(k) for k in ("seconds", "error", "size", "time"))
        return cls(
            input=data["input"],
            output=data["output"],
            settings_hash=data["settings_hash"],
            status=data["status"],
            seconds=float(seconds) if isinstance(seconds, int | float) else None,
            error=error if isinstance(error, str) else None,
            size=size if isinstance(size, int) and not isinstance(size, bool) else None,
            time=float(when) if isinstance(when, int | float) else None,
        )


def hashed_settings(
    settings: UpscaleSettings, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The settings that make an output's bytes, as a JSON-ready dict: every field set away from
    its default except :data:`NOT_HASHED`, those that do not apply to the job (e.g. ``overlap``
    in redraw mode) and, with no checkpoint, every re-diffusion field; ``checkpoint`` is the one
    actually used (``$TILEUP_CHECKPOINT`` when the setting is empty). Fields at their default
    are left out so that a knob added to a later tileup does not change every earlier hash."""
    env = os.environ if environ is None else environ
    checkpoint = settings.checkpoint or env.get(CHECKPOINT_ENV) or None
    values: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        if f.name in NOT_HASHED or f.name == "models_dirs" or not settings.applies(f.name):
            continue
        if f.metadata["needs_checkpoint"] and checkpoint is None:
            continue
        value = checkpoint if f.name == "checkpoint" else getattr(settings, f.name)
        if value != f.default:
            values[f.name] = list(value) if isinstance(value, tuple) else value
    return values


def settings_hash(settings: UpscaleSettings, environ: Mapping[str, str] | None = None) -> str:
    """A stable 16-hex-digit hash of :func:`hashed_settings` (same settings → same hash, across
    processes, machines and Python versions)."""
    text = json.dumps(hashed_settings(settings, environ), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- reading and deciding ---------------------------------------------------------------------


def read_manifest(path: str | os.PathLike[str]) -> list[Record]:
    """Every complete record of the manifest at ``path``, in file order ([] when there is none).
    Lines that are not a record (a crash cut the last one short) are skipped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from exc
    records = (Record.from_json(line) for line in data.decode("utf-8", "replace").splitlines())
    return [r for r in records if r is not None]


@dataclass(frozen=True)
class History:
    """One input's records, boiled down: the ``latest``; ``failures``, the failed attempts
    under the latest's settings since its last ``done`` (``planned`` lines between them do not
    break the run); ``owned``, every output the tool wrote or may have been writing for it."""

    latest: Record
    failures: int
    owned: frozenset[str]


def histories(records: Iterable[Record]) -> dict[str, History]:
    """Each input's :class:`History`, keyed by its ``input`` path."""
    by_input: dict[str, list[Record]] = {}
    for record in records:
        by_input.setdefault(record.input, []).append(record)
    result: dict[str, History] = {}
    for key, items in by_input.items():
        latest, failures = items[-1], 0
        for record in reversed(items):
            if record.settings_hash != latest.settings_hash or record.status == "done":
                break
            failures += record.status == "failed"
        owned = frozenset(r.output for r in items if r.status in ("planned", "done"))
        result[key] = History(latest, failures, owned)
    return result


Action = Literal["run", "skip", "give-up"]


@dataclass(frozen=True)
class Decision:
    """What a run does with one input: ``run`` it, ``skip`` it (done before) or ``give-up``
    (failed too often: ``error`` is the recorded one). ``replace``: its output may be replaced
    without ``--overwrite`` (the manifest says this tool wrote it). ``reason`` says why."""

    action: Action
    reason: str
    replace: bool = False
    error: str | None = None


def decide(
    history: History | None,
    digest: str,
    output: str,
    output_size: int | None,
    retries: int = RETRIES,
) -> Decision:
    """The :class:`Decision` for an input whose record history is ``history`` (None: never
    recorded), run with settings hash ``digest``, to be written to ``output`` (relative to the
    output folder) where a file of ``output_size`` bytes is now (None: nothing there)."""
    if history is None:
        return Decision("run", "new")
    latest, replace = history.latest, output in history.owned
    if latest.settings_hash != digest:
        return Decision("run", "settings changed", replace)
    if latest.status == "done":
        if latest.output != output:
            return Decision("run", "output path changed", replace)
        if output_size is None:
            return Decision("run", "output missing", replace)
        if latest.size is not None and latest.size != output_size:
            return Decision("run", "output changed since it was written", replace)
        return Decision("skip", "done")
    if latest.status == "failed":
        if history.failures > retries:
            return Decision("give-up", "failed before", replace, latest.error)
        return Decision("run", "retry after a failure", replace)
    return Decision("run", "interrupted", replace)


# -- writing ----------------------------------------------------------------------------------


class ManifestWriter:
    """Appends records to a manifest, each batch of lines written, flushed and fsync'ed at once
    (thread-safe). The file is opened on the first append (created with its folder then), and a
    last line left unfinished by a crash is closed with a newline first."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._lock = threading.Lock()

    def append(self, records: Sequence[Record]) -> None:
        """Write ``records`` (stamped with the current time when they have none) durably."""
        if not records:
            return
        now = time.time()
        stamped = [r if r.time is not None else dataclasses.replace(r, time=now) for r in records]
        data = "".join(r.to_json() + "\n" for r in stamped).encode()
        with self._lock:
            try:
                fd = self._open()
                os.write(fd, data)
                os.fsync(fd)
            except OSError as exc:
                reason = exc.strerror or exc
                raise ManifestError(f"{self.path}: cannot write the manifest ({reason})") from exc

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                os.write(fd, b"\n")  # a crash left the last line unfinished
            self._fd = fd
        return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

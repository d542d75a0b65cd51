"""The job queue behind the one GPU: jobs run one at a time, in order, on one worker thread.

A :class:`Job` is created by the server with its checked settings and its uploaded file (an
upscale job) or its :class:`~tileup.txt2img.GenerateSettings` for one seed (a generate job: one
job per image of a batch); the worker builds an engine or a generator (models from the
:class:`~tileup.web.engines.EngineCache`), runs it with a :class:`JobObserver` (progress, stage,
tile, preview, cancel; both passes of a generate job) and writes the result atomically under the
output folder (``<stem>_tileup.png``, or A1111's ``NNNNN-SEED.png`` for a generated image).
Any exception marks that job failed with one line and the worker goes on; a cancelled job
writes nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import re
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tileup.errors import Cancelled, TileupError
from tileup.imageio import read_image
from tileup.result import UpscaleResult
from tileup.settings import UpscaleSettings
from tileup.tiler import Box
from tileup.txt2img import MANAGED, GenerateSettings
from tileup.web.engines import EngineCache
from tileup.web.plan import box_json
from tileup.web.preview import jpeg_bytes, latents_to_rgb, thumbnail

STATES = ("queued", "running", "done", "failed", "cancelled")
PREVIEW_SECONDS = 0.4
"""Least time between two previews of a job (a preview costs a device sync and a JPEG)."""


def safe_stem(name: str | None) -> str:
    """A file stem made of ``[A-Za-z0-9._-]`` from a client's file name (folders dropped)."""
    base = re.split(r"[\\/]", name or "")[-1]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:80]
    return clean or "image"


_NUMBERED = re.compile(r"^(\d{5})-")


@dataclass(eq=False)
class Job:
    """One image's job; its fields change under ``lock`` (the worker writes, HTTP threads read).

    An upscale job has its upload as ``source``; a generate job has none and its settings in
    ``generate`` (``settings`` is then its hires pass's, or first pass's, for the rates)."""

    id: str
    name: str
    source: Path | None
    settings: UpscaleSettings
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    total: float
    batch: str = ""
    generate: GenerateSettings | None = None
    save_first_pass: bool = False
    first_pass_output: Path | None = None
    state: str = "queued"
    stage: str = ""
    done: float = 0.0
    error: str | None = None
    tiles: list[list[int]] = field(default_factory=list)
    output: Path | None = None
    stats: dict[str, Any] | None = None
    parameters: str | None = None
    preview: bytes | None = None
    preview_kind: str = ""
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def status(self, rate: float | None = None) -> dict[str, Any]:
        """JSON status: state, stage, fraction, eta (seconds, None when unknown), tile boxes,
        error, sizes, the output file's name, stats and parameters once done."""
        with self.lock:
            fraction = 1.0 if self.state == "done" else min(1.0, self.done / max(self.total, 1))
            eta: float | None = None
            if self.state == "running" and self.started is not None:
                elapsed = time.time() - self.started
                if fraction > 0.02:
                    eta = elapsed * (1 - fraction) / fraction
                elif rate is not None:
                    eta = max(0.0, rate * self.total - elapsed)
            elif self.state == "queued" and rate is not None:
                eta = rate * self.total
            return {
                "id": self.id,
                "name": self.name,
                "batch": self.batch,
                "state": self.state,
                "stage": self.stage,
                "fraction": round(fraction, 4),
                "done_units": self.done,
                "total_units": self.total,
                "eta": None if eta is None else round(eta, 1),
                "tile": self.tiles[0] if self.tiles else None,
                "tiles": list(self.tiles),
                "error": self.error,
                "input_size": list(self.input_size),
                "output_size": list(self.output_size),
                "output": self.output.name if self.output else None,
                "kind": "upscale" if self.generate is None else "generate",
                "seed": None if self.generate is None else self.generate.seed,
                "first_pass_output": (
                    self.first_pass_output.name if self.first_pass_output else None
                ),
                "stats": self.stats,
                "parameters": self.parameters,
                "has_preview": self.preview is not None,
                "created": self.created,
                "started": self.started,
                "finished": self.finished,
                "preview_kind": self.preview_kind,
                "seconds": (
                    round((self.finished or time.time()) - self.started, 2)
                    if self.started
                    else None
                ),
            }


class JobObserver:
    """The pipeline :class:`~tileup.pipeline.Observer` of one job: records progress, stage,
    tiles and throttled previews on the job and raises Cancelled once it is cancelled."""

    def __init__(self, job: Job, family: str = "") -> None:
        self.job, self.family = job, family
        self.last_preview = 0.0
        self.passes = 0

    def _check(self) -> None:
        if self.job.cancel.is_set():
            raise Cancelled(f"{self.job.name}: cancelled")

    def stage(self, name: str) -> None:
        """Record the stage; a generate job's hires pass shows as ``hires: <stage>``."""
        if self.job.generate is not None and name == "pixel_upscale":
            self.passes += 1  # the hires pass always begins with the upscale
        shown = f"hires: {name}" if self.passes else name
        with self.job.lock:
            self.job.stage = shown
        self._check()

    def add_total(self, count: int) -> None:
        with self.job.lock:
            self.job.total += count

    def advance(self, count: int) -> None:
        with self.job.lock:
            self.job.done += count
        self._check()

    def tiles(self, boxes: Sequence[Box]) -> None:
        with self.job.lock:
            self.job.tiles = [box_json(b) for b in boxes]
        self._check()

    def preview(self, image: torch.Tensor, latent: bool) -> None:
        self._check()
        now = time.monotonic()
        if now - self.last_preview < PREVIEW_SECONDS:
            return
        self.last_preview = now
        rgb = latents_to_rgb(image, self.family) if latent else image
        data = jpeg_bytes(thumbnail(rgb))
        with self.job.lock:
            self.job.preview = data
            self.job.preview_kind = "latent approximation" if latent else "canvas"


class JobQueue:
    """Jobs in submission order, run by one worker thread; outputs under ``output_dir``."""

    def __init__(self, engines: EngineCache, output_dir: Path) -> None:
        self.engines = engines
        self.output_dir = output_dir
        self.jobs: dict[str, Job] = {}
        self.pending: queue.Queue[str | None] = queue.Queue()
        self.lock = threading.Lock()
        self.rates: dict[Any, float] = {}
        """Seconds per progress unit of the last finished job, by :func:`rate_key`."""
        self.worker = threading.Thread(target=self._work, name="tileup-jobs", daemon=True)
        self.current: Job | None = None

    def start(self) -> None:
        self.worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every job and stop the worker (after the running job's next step)."""
        with self.lock:
            for job in self.jobs.values():
                job.cancel.set()
        self.pending.put(None)
        if self.worker.is_alive():
            self.worker.join(timeout)

    def new_id(self) -> str:
        return secrets.token_hex(6)

    def submit(self, job: Job) -> None:
        with self.lock:
            self.jobs[job.id] = job
        self.pending.put(job.id)

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def all(self) -> list[Job]:
        with self.lock:
            return sorted(self.jobs.values(), key=lambda j: j.created)

    def cancel(self, job: Job) -> None:
        """Ask ``job`` to stop: a queued job never starts, a running one stops at its next
        step (nothing is written); a finished one is left alone."""
        job.cancel.set()
        with job.lock:
            if job.state == "queued":
                job.state, job.finished = "cancelled", time.time()

    def rate(self, settings: UpscaleSettings, generate: bool = False) -> float | None:
        """Seconds per progress unit measured on the last finished job like this one."""
        return self.rates.get(rate_key(settings, generate))

    def rate_of(self, job: Job) -> float | None:
        """:meth:`rate` for ``job``'s kind and settings."""
        return self.rate(job.settings, job.generate is not None)

    # -- the worker -------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job_id = self.pending.get()
            if job_id is None:
                return
            job = self.get(job_id)
            if job is None or job.cancel.is_set():
                continue
            self.current = job
            try:
                self._run(job)
            finally:
                self.current = None

    def _run(self, job: Job) -> None:
        with job.lock:
            job.state, job.started, job.stage = "running", time.time(), "loading models"
        try:
            written, result = self._generate(job) if job.generate else self._upscale(job)
        except Cancelled:
            self._finish(job, "cancelled", None)
        except TileupError as exc:
            self._finish(job, "failed", str(exc))
        except torch.OutOfMemoryError:
            self._finish(
                job, "failed", f"{job.name}: out of memory; try Low VRAM or a smaller tile"
            )
        except Exception as exc:  # one bad job never takes the server down
            traceback.print_exc(file=sys.stderr)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self._finish(job, "failed", f"{job.name}: failed: {type(exc).__name__} {first}".strip())
        else:
            with job.lock:
                job.output = written
                job.stats = result.stats.as_dict()
                job.parameters = result.parameters
            self._finish(job, "done", None)
            elapsed = (job.finished or time.time()) - (job.started or time.time())
            self.rates[rate_key(job.settings, job.generate is not None)] = elapsed / max(
                job.total, 1
            )

    def _upscale(self, job: Job) -> tuple[Path, UpscaleResult]:
        """An upscale job's result, written (Cancelled once cancelled)."""
        assert job.source is not None
        engine = self.engines.engine(job.settings)
        _check_cancel(job)
        picture = read_image(job.source, max_pixels=job.settings.max_pixels)
        family = engine.model.info.family if engine.model is not None else ""
        with job.lock:
            job.stage = "starting"
        result = engine(picture, observer=JobObserver(job, family))
        _check_cancel(job)
        with job.lock:
            job.stage = "writing"
        return self._write(job, result), result

    def _generate(self, job: Job) -> tuple[Path, UpscaleResult]:
        """A generate job's image (its one seed), written as ``NNNNN-SEED.png`` (and
        ``NNNNN-SEED-first-pass.png`` when asked); Cancelled once cancelled, in either pass."""
        settings = job.generate
        assert settings is not None
        generator = self.engines.generator(settings)
        _check_cancel(job)
        model = generator.first.model
        assert model is not None
        units = generator.planned_units()
        height, width = generator.native_size()
        with job.lock:  # the loaded model's own count and sizes (the plan may have guessed)
            job.total, job.stage = float(max(units, 1)), "starting"
            job.input_size = (width, height)
        image = generator.generate_one(settings.seed, JobObserver(job, model.info.family))
        _check_cancel(job)
        with job.lock:
            job.stage = "writing"
            job.output_size = (image.final.picture.width, image.final.picture.height)
        path = self._write_numbered(image.final, settings.seed)
        if job.save_first_pass:
            first = path.with_name(f"{path.stem}-first-pass.png")
            written = self._write_at(first, image.first_pass)
            with job.lock:
                job.first_pass_output = written
        return path, image.final

    def _finish(self, job: Job, state: str, error: str | None) -> None:
        with job.lock:
            job.state, job.error, job.finished = state, error, time.time()
            job.stage, job.tiles = "", []

    def _write(self, job: Job, result: Any) -> Path:
        """The result written atomically as ``<stem>_tileup[-N].png`` in the output folder."""
        folder = self.output_dir.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        stem = safe_stem(job.name)
        for n in itertools.count(1):
            name = f"{stem}_tileup.png" if n == 1 else f"{stem}_tileup-{n}.png"
            path = folder / name
            if path.parent != folder:  # a safe stem cannot leave the folder; checked anyway
                raise TileupError(f"{name}: refused: outside the output folder")
            if os.path.lexists(path):
                continue
            try:
                return self._write_at(path, result)
            except TileupError:
                if os.path.lexists(path):  # taken meanwhile: the next name
                    continue
                raise
        raise AssertionError("unreachable")

    def _write_numbered(self, result: UpscaleResult, seed: int) -> Path:
        """``result`` written atomically as A1111's ``NNNNN-SEED.png`` in the output folder,
        numbered after the highest number there."""
        folder = self.output_dir.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
        for n in itertools.count(max(numbers, default=-1) + 1):
            path = folder / f"{n:05d}-{seed}.png"
            if os.path.lexists(path):
                continue
            try:
                return self._write_at(path, result)
            except TileupError:
                if os.path.lexists(path):
                    continue
                raise
        raise AssertionError("unreachable")

    def _write_at(self, path: Path, result: UpscaleResult) -> Path:
        """``result`` written atomically at ``path`` (never replacing a file)."""
        return result.save(path)


def _check_cancel(job: Job) -> None:
    if job.cancel.is_set():
        raise Cancelled(f"{job.name}: cancelled")


def rate_key(settings: UpscaleSettings, generate: bool = False) -> Any:
    """Jobs whose seconds per progress unit are alike: same kind, models, mode, steps and
    device."""
    s = settings
    return (generate, s.upscaler, s.checkpoint, s.mode, s.tile, s.device, s.dtype, s.cfg != 1)


def settings_summary(settings: UpscaleSettings | GenerateSettings) -> dict[str, Any]:
    """The settings as JSON (a GenerateSettings flat, as ``from_mapping`` takes them), with
    file paths reduced to their names."""
    data = dataclasses.asdict(settings)
    if isinstance(settings, GenerateSettings):
        data = data | {k: v for k, v in data.pop("upscale").items() if k not in MANAGED}
    for key in ("checkpoint", "hr_checkpoint", "vae", "upscaler"):
        if data.get(key) and ("/" in data[key] or "\\" in data[key]):
            data[key] = Path(data[key]).name if key != "upscaler" else Path(data[key]).stem
    data.pop("models_dirs", None)
    return data

"""Batches of files: inputs (files, folders, globs) → checked output paths → one outcome per input.

1. :func:`expand_inputs` turns files, folders and globs into :class:`Source` files, each with the
   folder its output path is taken relative to.
2. :func:`plan_outputs` gives every source its output path (sub-folders mirrored under an output
   folder) and checks them all before any work: a bad one raises :class:`OutputError`.
3. :func:`upscale_files` reads, upscales (one shared :class:`~tileup.pipeline.Upscaler`, or
   one per GPU, or Ray workers: :mod:`tileup.distributed`) and writes each file atomically; a
   failure is recorded in that file's :class:`FileOutcome` and never stops the rest. Into an
   output folder, the manifest (:mod:`tileup.manifest`) records every file and lets a re-run
   skip what is done.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import itertools
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from tileup.choices import IMAGE_SUFFIXES
from tileup.devices import on_device
from tileup.errors import Cancelled, TileupError
from tileup.imageio import ImageHeader, check_output, read_header, read_image
from tileup.imageio.write import remove_temp_files
from tileup.manifest import (
    MANIFEST_NAME,
    ManifestWriter,
    Record,
    Status,
    decide,
    histories,
    read_manifest,
    settings_hash,
)
from tileup.options import target_size
from tileup.pipeline import Upscaler
from tileup.progress import LockedProgress, NoProgress, Progress
from tileup.result import Stats
from tileup.settings import UpscaleSettings

OUTPUT_SUFFIX = "_tileup"


class OutputError(TileupError):
    """An output of the batch cannot be written; found before any work, nothing is written."""


@dataclass(frozen=True)
class FileOutcome:
    """One input's fate: the output written, or the one-line error. ``skipped``: the output was
    done by an earlier run (manifest or ``skip_existing``) and left as it was; ``seconds``: the
    wall time of reading, upscaling and writing it."""

    source: Path
    output: Path | None = None
    error: str | None = None
    stats: Stats | None = None
    seconds: float | None = None
    skipped: bool = False


class BatchError(TileupError):
    """Some files of a batch failed (raised by :meth:`Outcomes.raise_for_errors`)."""


class Outcomes(list[FileOutcome]):
    """Every input's outcome, in input order. Failures do not raise by themselves (one bad file
    must not stop the rest): check :attr:`failed` or call :meth:`raise_for_errors`."""

    @property
    def failed(self) -> list[FileOutcome]:
        return [o for o in self if o.error is not None]

    @property
    def written(self) -> list[Path]:
        """The outputs this run wrote (not those it skipped)."""
        return [o.output for o in self if o.output is not None and not o.skipped]

    @property
    def skipped(self) -> list[FileOutcome]:
        """The inputs whose output an earlier run made (see :func:`upscale_files`)."""
        return [o for o in self if o.skipped]

    def raise_for_errors(self) -> Outcomes:
        """Self when no file failed (and at least one was given); else BatchError naming how
        many failed and the first error."""
        failed = self.failed
        if failed:
            raise BatchError(f"{len(failed)} of {len(self)} files failed; first: {failed[0].error}")
        if not self:
            raise BatchError("no input files")
        return self


@dataclass(frozen=True)
class Source:
    """An input image file. ``root`` is the folder given as input (or the fixed start of a
    glob) that it was found under; its path below ``root`` is mirrored under an output folder.
    None for a file named directly: its output goes straight into the output folder."""

    path: Path
    root: Path | None = None


@dataclass(frozen=True)
class Job:
    """One input file and the output path its result is written to; ``replace``: an existing
    file there may be replaced (``overwrite``, or the manifest says this tool wrote it)."""

    source: Path
    output: Path
    replace: bool = False


def expand_inputs(
    inputs: Sequence[str], recursive: bool = False
) -> tuple[list[Source], list[FileOutcome]]:
    """Files, folders and globs → image files in order (each file once), plus failures for
    inputs that match none.

    Folders give their image files (sub-folders too with ``recursive``), skipping earlier
    tileup outputs (``*_tileup.*``); ``**`` in a glob descends only with ``recursive``.
    """
    sources: list[Source] = []
    missing: list[FileOutcome] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted(
                p
                for p in path.glob(pattern)
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not p.stem.endswith(OUTPUT_SUFFIX)
            )
            if not found:
                missing.append(FileOutcome(path, error=f"{item}: folder holds no images"))
            sources.extend(Source(p, path) for p in found)
        elif path.exists():
            sources.append(Source(path))
        elif glob.has_magic(item):
            pattern = os.path.expanduser(item)
            matched = sorted(Path(p) for p in glob.glob(pattern, recursive=recursive))
            matched = [p for p in matched if p.is_file()]
            if not matched:
                missing.append(FileOutcome(path, error=f"{item}: no file matches"))
            root = _glob_root(pattern)
            sources.extend(Source(p, root) for p in matched)
        else:
            missing.append(FileOutcome(path, error=f"{item}: no such file or folder"))
    unique: dict[Path, Source] = {}
    for source in sources:
        unique.setdefault(source.path.resolve(), source)
    return list(unique.values()), missing


def _glob_root(pattern: str) -> Path:
    """The folders at the start of a glob pattern, before its first wildcard ("." if none)."""
    return Path(*itertools.takewhile(lambda p: not glob.has_magic(p), Path(pattern).parts[:-1]))


def output_path_for(
    src: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    suffix: str = OUTPUT_SUFFIX,
    ext: str = ".png",
    *,
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """Where to write the result for ``src``: ``<src dir>/<stem><suffix><ext>`` when ``output``
    is None; ``<output>/<sub>/<stem><suffix><ext>`` when it is an existing folder or ends with a
    path separator, ``<sub>`` being the folder of ``src`` below ``root`` (none without a root);
    otherwise ``output`` itself (``~`` expanded)."""
    src = Path(src)
    name = f"{src.stem}{suffix}{ext}"
    if output is None:
        return src.parent / name
    out = Path(output).expanduser()
    if not is_folder_output(output):
        return out
    sub = Path(os.path.relpath(src.parent, root)) if root is not None else Path()
    return out / (Path() if ".." in sub.parts else sub) / name


def is_folder_output(output: str | os.PathLike[str]) -> bool:
    """Whether ``-o output`` names a folder: it ends with a path separator or is a folder."""
    text = os.fspath(output)
    return text.endswith(("/", os.sep)) or Path(text).expanduser().is_dir()


def plan_outputs(
    sources: Sequence[Source],
    output: str | None,
    *,
    overwrite: bool = False,
    replaceable: Collection[Path] = frozenset(),
) -> list[Job]:
    """Every source with its output path, all checked before any work is done.
    ``replaceable``: outputs that may be replaced without ``overwrite`` (as output_path_for
    spells them).

    Raises OutputError naming the first bad output (and how many more there are) when an output
    has an unknown suffix, is a folder, exists without ``overwrite``, is one of the inputs
    (even with ``overwrite``), is the output of another input too, or lies in a folder that
    cannot be written or created (only an output folder given with ``output`` and the
    sub-folders below it are created; a file's folder must exist).
    """
    if output is not None and len(sources) > 1 and not is_folder_output(output):
        raise OutputError(
            f"-o {output}: several inputs need an output folder, not a file "
            "(end it with / to create the folder)"
        )
    if output is not None and not is_folder_output(output) and not Path(output).suffix:
        raise OutputError(
            f"-o {output}: names no image file (no suffix such as .png) and no folder; "
            "end it with / to write into a new folder"
        )
    creatable = Path(output).expanduser() if output and is_folder_output(output) else None
    inputs = {source.path.resolve(): source.path for source in sources}
    claimed: dict[Path, Path] = {}
    folders: dict[Path, str | None] = {}
    jobs: list[Job] = []
    problems: list[str] = []
    for source in sources:
        out = output_path_for(source.path, output, root=source.root)
        key = out.resolve()
        problem: str | None = None
        if key in inputs:
            problem = f"{out}: is the input {inputs[key]}; tileup never replaces its inputs"
        else:
            try:
                check_output(out, overwrite=overwrite or out in replaceable)
            except TileupError as exc:
                problem = str(exc)
        if problem is None and key in claimed:
            problem = (
                f"{claimed[key]} and {source.path} would both be written to {out}; "
                "upscale them in separate runs"
            )
        if problem is None:
            if out.parent not in folders:
                folders[out.parent] = _folder_problem(out, creatable)
            problem = folders[out.parent]
        if problem is not None:
            problems.append(problem)
        claimed.setdefault(key, source.path)
        jobs.append(Job(source.path, out, replace=overwrite or out in replaceable))
    if problems:
        more = len(problems) - 1
        tail = f" (and {more} more bad output{'s' * (more > 1)})" if more else ""
        raise OutputError(problems[0] + tail)
    return jobs


def _folder_problem(out: Path, creatable: Path | None) -> str | None:
    """Why ``out`` cannot be written into its folder, or None. A missing folder is fine when it
    is ``creatable`` or below it and its nearest existing parent is a writable folder."""
    folder = out.parent
    if folder.is_dir():
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{out}: cannot write into {folder} (permission denied)"
        return None
    may_create = creatable is not None and (folder == creatable or creatable in folder.parents)
    if not may_create:
        if os.path.lexists(folder):
            return f"{out}: output folder {folder} is not a folder"
        return f"{out}: output folder {folder} does not exist; create it first"
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{out}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{out}: cannot create {folder} in {existing} (permission denied)"
    return None


def upscale_files(
    inputs: Sequence[str],
    settings: UpscaleSettings | None = None,
    *,
    engine: Upscaler | None = None,
    output: str | None = None,
    overwrite: bool = False,
    recursive: bool = False,
    progress: Progress | None = None,
    on_outcome: Callable[[FileOutcome], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    skip_existing: bool = False,
    manifest: bool = True,
    ray: bool | str | None = None,
    workers: int | None = None,
) -> Outcomes:
    """Upscale every input file and write each result atomically; one failure never stops the rest.

    ``output`` is a file (one input only) or a folder (created when missing; sub-folders of
    folder inputs are mirrored below it); default ``<stem>_tileup.png`` beside the input. Bad
    outputs (see :func:`plan_outputs`) and settings or model problems common to every file raise
    TileupError before any work, with nothing written. Give ``settings`` (an engine is built from
    them) or an ``engine`` already built (its models are reused; its progress is used).

    Into an output folder the batch keeps the manifest ``OUT/.tileup-manifest.jsonl`` (unless
    ``manifest`` is False) and a re-run resumes: files done with the same settings are skipped,
    failed ones retried once (see :mod:`tileup.manifest`). ``skip_existing``: skip every input
    whose output file exists, whoever wrote it.

    ``ray``: run on a Ray cluster (:mod:`tileup.distributed`; needs ``settings``): True starts a
    local one (or uses the one this process is connected to), ``"auto"``, ``"HOST:PORT"`` or
    ``"ray://HOST:PORT"`` joins one; ``workers`` engines (default: one per GPU, else one per CPU);
    ``progress`` then counts files, not tiles.

    Returns :class:`Outcomes` in input order: a failed file is an outcome with an error, not an
    exception; ``upscale_files(...).raise_for_errors()`` raises when any failed.
    """
    if (settings is None) == (engine is None):
        raise TypeError("upscale_files needs settings or an engine (exactly one)")
    if ray is not None and engine is not None:
        raise TypeError("upscale_files(ray=...) needs settings: every Ray worker builds its engine")
    if workers is not None and ray is None:
        raise TypeError("upscale_files(workers=...) needs ray=...; one machine follows the device")
    if settings is None:
        assert engine is not None
        settings = engine.settings
    sources, outcomes = expand_inputs(inputs, recursive)
    # 1. What earlier runs settled (manifest, skip_existing); every other output checked before
    #    anything is loaded or written.
    folder = Path(output).expanduser() if output and is_folder_output(output) else None
    digest = settings_hash(settings)
    resume = _resume(sources, output, folder if manifest else None, digest, skip_existing)
    run = [sources[i] for i in resume.run]
    jobs = plan_outputs(run, output, overwrite=overwrite, replaceable=resume.replaceable)
    for outcome in outcomes:
        _report(on_outcome, outcome)
    for outcome in resume.settled.values():
        _report(on_outcome, outcome)
    if not jobs:
        return Outcomes(outcomes + [resume.settled[i] for i in sorted(resume.settled)])
    recorder = _Recorder(folder, digest, jobs) if folder is not None and manifest else None

    def start() -> None:  # the engines are ready: the files are about to be written
        for job in jobs:
            remove_temp_files(job.output)  # left by a writer killed in an earlier run
        if recorder is not None:
            recorder.planned()

    def finished(outcome: FileOutcome) -> None:
        if recorder is not None:
            recorder.finished(outcome)
        _report(on_outcome, outcome)

    # 2. The files: on Ray workers, on one engine per device, or one by one.
    try:
        if ray is not None:
            from tileup.distributed import run_on_ray

            done = run_on_ray(
                jobs,
                settings,
                address=ray,
                workers=workers,
                overwrite=overwrite,
                progress=progress,
                on_start=start,
                on_outcome=finished,
                on_note=on_note,
            )
        else:
            done = _run_local(jobs, settings, engine, overwrite, progress, start, finished, on_note)
    finally:
        if recorder is not None:
            recorder.close()
    ran = dict(zip(resume.run, done, strict=True))
    return Outcomes(
        outcomes + [ran[i] if i in ran else resume.settled[i] for i in range(len(sources))]
    )


@dataclass(frozen=True)
class _Resume:
    """What earlier runs settled: the indices of the sources to ``run``; the outputs among theirs
    this tool may replace; the outcome of every other source by index (skipped, or failed)."""

    run: list[int]
    replaceable: frozenset[Path]
    settled: dict[int, FileOutcome]


def _resume(
    sources: Sequence[Source],
    output: str | None,
    folder: Path | None,
    digest: str,
    skip_existing: bool,
) -> _Resume:
    """Each source decided from the manifest in ``folder`` (None: no manifest) and, with
    ``skip_existing``, from its output's presence."""
    history = {}
    if folder is not None and folder.is_dir():  # not a folder: plan_outputs says so
        history = histories(read_manifest(folder / MANIFEST_NAME))
    run: list[int] = []
    replaceable: set[Path] = set()
    settled: dict[int, FileOutcome] = {}
    for index, source in enumerate(sources):
        out = output_path_for(source.path, output, root=source.root)
        size = _size(out)
        if folder is not None:
            relative = Path(os.path.relpath(out, folder)).as_posix()
            decision = decide(history.get(str(source.path.resolve())), digest, relative, size)
            if decision.action == "skip":
                settled[index] = FileOutcome(source.path, output=out, skipped=True)
                continue
            if decision.action == "give-up":
                error = decision.error or f"{source.path}: failed"
                settled[index] = FileOutcome(
                    source.path, error=f"{error} (failed twice with these settings; not retried)"
                )
                continue
            if decision.replace:
                replaceable.add(out)
        if skip_existing and size is not None:
            settled[index] = FileOutcome(source.path, output=out, skipped=True)
            continue
        run.append(index)
    return _Resume(run, frozenset(replaceable), settled)


def _size(path: Path) -> int | None:
    """The size of the file at ``path``; None when there is no file."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


class _Recorder:
    """The batch's manifest lines: ``planned`` for every job before the first file is written,
    ``done``/``failed`` as each finishes (thread-safe)."""

    def __init__(self, folder: Path, digest: str, jobs: Sequence[Job]) -> None:
        self.folder, self.digest = folder, digest
        self.writer = ManifestWriter(folder / MANIFEST_NAME)
        self.outputs = {job.source: job.output for job in jobs}

    def _record(
        self,
        source: Path,
        status: Status,
        seconds: float | None = None,
        error: str | None = None,
        size: int | None = None,
    ) -> Record:
        relative = os.path.relpath(self.outputs[source], self.folder)
        return Record(
            str(source.resolve()),
            Path(relative).as_posix(),
            self.digest,
            status,
            seconds=seconds,
            error=error,
            size=size,
        )

    def planned(self) -> None:
        self.writer.append([self._record(source, "planned") for source in self.outputs])

    def finished(self, outcome: FileOutcome) -> None:
        seconds = None if outcome.seconds is None else round(outcome.seconds, 3)
        if outcome.error is not None or outcome.output is None:
            record = self._record(outcome.source, "failed", seconds, error=outcome.error)
        else:
            record = self._record(outcome.source, "done", seconds, size=_size(outcome.output))
        self.writer.append([record])

    def close(self) -> None:
        self.writer.close()


def _run_local(
    jobs: list[Job],
    settings: UpscaleSettings,
    engine: Upscaler | None,
    overwrite: bool,
    progress: Progress | None,
    start: Callable[[], None],
    on_outcome: Callable[[FileOutcome], None],
    on_note: Callable[[str], None] | None,
) -> list[FileOutcome]:
    """The jobs on this machine, outcomes in the jobs' order: one engine for every file (built
    here unless given); with several devices, one file per device at a time."""
    if engine is None:
        engine = Upscaler(settings, progress or NoProgress())
    progress = engine.progress
    for note in engine.notes:
        if on_note is not None:
            on_note(note)
    start()
    # Headers: the progress total and the output size of every file, nothing decoded.
    headers = _read_headers(jobs, engine, progress)
    if len(jobs) > 1 and len(engine.devices) > 1:
        with device_engines(engine) as engines:
            return _spread(jobs, engines, overwrite, headers, on_outcome)
    outcomes: list[FileOutcome] = []
    for job in jobs:
        outcome = _process_file(job, engine, overwrite, headers.get(job.source))
        outcomes.append(outcome)
        on_outcome(outcome)
    return outcomes


@contextmanager
def device_engines(engine: Upscaler) -> Iterator[list[Upscaler]]:
    """One engine per device, to spread files across them: ``engine`` on its primary device
    alone (its model's replicas set aside for the duration) and a view per other device
    running that device's replica (the SR model copied there once). One device: ``engine``."""
    model = engine.model
    if len(engine.devices) == 1:
        yield [engine]
        return
    views: list[Upscaler] = []
    for k, device in enumerate(engine.devices[1:]):
        view = copy.copy(engine)
        view.device, view.devices = device, (device,)
        view.model = model.replicas[k] if model is not None else None
        view.runner = engine.sr_replica(device)
        views.append(view)
    replicas = model.replicas if model is not None else ()
    devices, progress = engine.devices, engine.progress
    if model is not None:
        model.replicas = ()
    engine.devices = (engine.device,)
    for one in [engine, *views]:
        one.progress = LockedProgress(progress)
    try:
        yield [engine, *views]
    finally:
        engine.devices, engine.progress = devices, progress
        if model is not None:
            model.replicas = replicas


def _spread(
    jobs: list[Job],
    engines: list[Upscaler],
    overwrite: bool,
    headers: dict[Path, Header],
    on_outcome: Callable[[FileOutcome], None] | None,
) -> list[FileOutcome]:
    """The files run by one thread per engine (device), each taking the next file when done;
    outcomes reported as files finish, returned in the jobs' order."""
    pending: queue.SimpleQueue[tuple[int, Job]] = queue.SimpleQueue()
    for item in enumerate(jobs):
        pending.put(item)
    finished: dict[int, FileOutcome] = {}
    lock = threading.Lock()

    def work(engine: Upscaler) -> None:
        with on_device(engine.device):
            while True:
                try:
                    index, job = pending.get_nowait()
                except queue.Empty:
                    return
                outcome = _process_file(job, engine, overwrite, headers.get(job.source))
                with lock:
                    finished[index] = outcome
                    _report(on_outcome, outcome)

    with ThreadPoolExecutor(len(engines), thread_name_prefix="tileup-device") as pool:
        for future in [pool.submit(work, e) for e in engines]:
            future.result()
    return [finished[i] for i in range(len(jobs))]


@dataclass(frozen=True)
class Header:
    """A file's header and the progress units planned for it (None: not planned)."""

    image: ImageHeader
    planned: int | None


def _read_headers(jobs: list[Job], engine: Upscaler, progress: Progress) -> dict[Path, Header]:
    """Every readable file's header and planned tiles; the tiles go to the progress total up
    front. A file missing here fails when its turn comes, with the reader's message."""
    headers: dict[Path, Header] = {}
    for job in jobs:
        try:
            header = read_header(job.source)
        except Exception:
            continue
        planned: int | None = None
        if _size_problem(job.source, header, engine.settings) is None:
            try:
                planned = engine.planned_tiles(header.height, header.width, header.has_alpha)
            except Exception:
                pass  # the same error is raised, and reported, when the file is processed
            else:
                progress.add_total(planned)
        headers[job.source] = Header(header, planned)
    return headers


def _size_problem(path: Path, header: ImageHeader, settings: UpscaleSettings) -> str | None:
    """Why the job over ``header``'s image is refused for its size (input or output), or None."""
    limit = settings.max_pixels
    height, width = header.height, header.width
    what = ""
    if height * width <= limit:
        height, width = target_size(height, width, settings)
        what = "output "
    if height * width <= limit:
        return None
    return (
        f"{path}: {what}{width}x{height} = {width * height} pixels exceeds the limit of {limit}; "
        "raise it with --max-pixels"
    )


def process_job(job: Job, engine: Upscaler, overwrite: bool = False) -> FileOutcome:
    """One job as a batch runs it, on ``engine`` (a Ray worker's): its size checked from the
    header first, written atomically; a problem with the file is its outcome, never raised."""
    headers = _read_headers([job], engine, engine.progress)
    return _process_file(job, engine, overwrite, headers.get(job.source))


def _process_file(
    job: Job, engine: Upscaler, overwrite: bool, header: Header | None
) -> FileOutcome:
    start = time.perf_counter()
    outcome = _attempt(job, engine, overwrite or job.replace, header)
    return dataclasses.replace(outcome, seconds=time.perf_counter() - start)


def _attempt(job: Job, engine: Upscaler, overwrite: bool, header: Header | None) -> FileOutcome:
    path, destination = job.source, job.output
    try:
        if header is not None:
            problem = _size_problem(path, header.image, engine.settings)
            if problem is not None:
                raise TileupError(problem)
        check_output(destination, overwrite=overwrite)  # it may have appeared meanwhile
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = exc.strerror or exc
            raise TileupError(f"{destination.parent}: cannot create the folder ({reason})") from exc
        picture = read_image(path, max_pixels=engine.settings.max_pixels)
        if header is None or header.planned is None:
            engine.progress.add_total(
                engine.planned_tiles(picture.height, picture.width, picture.alpha is not None)
            )
        result = engine(picture)
        written = result.save(destination, overwrite=overwrite)
        return FileOutcome(path, output=written, stats=result.stats)
    except Cancelled:  # the whole batch stops: not one file's failure
        raise
    except TileupError as exc:
        return FileOutcome(path, error=str(exc))
    except torch.OutOfMemoryError:
        return FileOutcome(
            path, error=f"{path}: out of memory; try --model-tile 128 or --device cpu"
        )
    except Exception as exc:  # one broken file must not stop a batch
        if os.environ.get("TILEUP_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return FileOutcome(path, error=f"{path}: failed: {first} (TILEUP_DEBUG=1 shows details)")


def _report(on_outcome: Callable[[FileOutcome], None] | None, outcome: FileOutcome) -> None:
    if on_outcome is not None:
        on_outcome(outcome)

"""Batches on a Ray cluster: one tileup engine per worker, files streamed to the workers, every
input ending with exactly one outcome.

:func:`tileup.batch.upscale_files` plans and checks every output and keeps the manifest as
always; :func:`run_on_ray` then runs its jobs on Ray actors instead of this process. Each
:class:`_Worker` actor holds one :class:`~tileup.pipeline.Upscaler` built once from the settings
(one GPU per worker with ``num_gpus``, or CPU workers when the cluster has no GPU) and is fed
file paths, never image bytes: it reads the input and writes its output atomically into the
output folder, which must be a path every node and the driver see (a shared file system).

The driver keeps at most :data:`IN_FLIGHT` files queued per worker, so files stream and a slow
worker holds back no more than that. When a worker process dies (killed, out of memory, its node
lost), the file it was running is handed to a new worker with its stray temporary file removed
(the atomic writer never shows a partial file under the final name); the files queued behind it
go back to the queue. A file whose worker died :data:`MAX_ATTEMPTS` times fails alone. Ray is
imported only here, and only when asked for: ``pip install "tileup[ray]"``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from tileup.batch import FileOutcome, Job, process_job
from tileup.errors import TileupError
from tileup.imageio.write import remove_temp_files
from tileup.pipeline import Upscaler
from tileup.progress import NoProgress, Progress
from tileup.settings import SettingsError, UpscaleSettings

IN_FLIGHT = 2
"""Files queued on one worker at a time: the one it runs and the next one."""

MAX_ATTEMPTS = 3
"""A file whose worker process died this many times while running it is recorded as failed."""

_ADDRESS = re.compile(r"(ray://)?[^\s:/]+:\d+")


class RayError(TileupError):
    """Ray is not installed, or the cluster cannot be reached or used."""


def check_address(address: bool | str) -> bool | str:
    """``address`` as :func:`run_on_ray` takes it: True (or ``"local"``) starts a local cluster,
    ``"auto"`` joins the one ``ray start`` runs here, ``HOST:PORT`` / ``ray://HOST:PORT`` a remote
    one. Raises SettingsError for anything else."""
    if address is True or address == "local":
        return True
    if isinstance(address, str) and (address == "auto" or _ADDRESS.fullmatch(address)):
        return address
    raise SettingsError(
        f"--ray {address}: not a Ray cluster address (auto, HOST:PORT or ray://HOST:PORT); "
        "with no address (a local cluster) put --ray after the inputs"
    )


def import_ray() -> ModuleType:
    """The ``ray`` module, or RayError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayError(
            'Ray is not installed: pip install "tileup[ray]" (or pip install "ray>=2.9")'
        ) from None
    return ray


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers, the Ray resources each reserves, and the device setting of their
    engines (``cuda``: the GPU Ray gives the worker, the only one it sees)."""

    count: int
    num_cpus: float
    num_gpus: float
    device: str


def plan_workers(
    device: str, cpus: float, gpus: float, jobs: int, workers: int | None = None
) -> WorkerPlan:
    """The workers for ``jobs`` files on a cluster of ``cpus`` CPUs and ``gpus`` GPUs.

    GPU workers when the cluster has GPUs and ``device`` is not ``cpu`` (or ``mps``): one per GPU
    by default; more ``workers`` than GPUs share them (fractional ``num_gpus``). Otherwise CPU
    workers: one per CPU by default (each runs single-threaded and holds its own models). Never
    more workers than files. A ``cuda`` device on a cluster without GPUs is a SettingsError.
    """
    if workers is not None and workers < 1:
        raise SettingsError(f"--workers must be at least 1, got {workers}")
    wants_gpu = device.startswith("cuda") or device == "all"
    if wants_gpu and gpus < 1:
        raise SettingsError(f"--device {device}: the Ray cluster has no GPU")
    on_gpu = gpus >= 1 and device not in ("cpu", "mps")
    available = gpus if on_gpu else cpus
    count = max(1, min(workers or int(available), jobs))
    share = min(1.0, available / count) if available > 0 else 1.0
    if on_gpu:
        return WorkerPlan(count, min(1.0, cpus / count), share, "cuda")
    return WorkerPlan(count, share, 0.0, device if device == "mps" else "cpu")


@dataclass(frozen=True)
class Ready:
    """A worker's answer once its engine is built: its process, the engine's notes, or the error
    that stopped it (a settings or model problem, common to every file)."""

    pid: int
    notes: tuple[str, ...]
    error: TileupError | None
    cli_message: str | None


class _Worker:
    """A Ray actor holding one engine: builds it once, then runs the files it is given."""

    def __init__(self, settings: UpscaleSettings) -> None:
        self.engine: Upscaler | None = None
        self.error: TileupError | None = None
        try:
            self.engine = Upscaler(settings)
        except TileupError as exc:
            self.error = exc

    def ready(self) -> Ready:
        notes = tuple(self.engine.notes) if self.engine is not None else ()
        message = getattr(self.error, "cli_message", None)
        return Ready(os.getpid(), notes, self.error, message)

    def run(self, job: Job, overwrite: bool) -> FileOutcome:
        if self.engine is None:
            return FileOutcome(job.source, error=str(self.error))
        return process_job(job, self.engine, overwrite)


@dataclass
class _Slot:
    """One worker place: its current actor, how many it replaced, and its queued calls (the
    first one runs)."""

    actor: Any
    generation: int = 0
    queue: collections.deque[Any] = dataclasses.field(default_factory=collections.deque)


def connect(ray: ModuleType, address: bool | str) -> bool:
    """Connect this process to Ray (nothing when it already is); True when it did (and must
    disconnect). Raises RayError when the cluster cannot be reached."""
    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if isinstance(address, str):
        _check_reachable(address)
    handlers = _python_handlers()
    try:
        if address is True:
            ray.init(include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayError(
            f"--ray {address}: cannot connect to the Ray cluster ({_first_line(exc)})"
        ) from exc
    finally:
        # Ray's core installs its own SIGTERM handler (print a stack, abort): put back the
        # caller's, so that SIGTERM still stops the batch cleanly (workers stopped, exit 143).
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return True


def _check_reachable(address: str) -> None:
    """RayError at once when ``HOST:PORT`` (or ``ray://HOST:PORT``) does not accept a TCP
    connection within 5 s: Ray itself would retry for minutes. ``auto`` is left to Ray."""
    import socket

    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" or a form Ray interprets itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RayError(f"--ray {address}: cannot connect to the Ray cluster ({reason})") from None


def _python_handlers() -> dict[int, Any]:
    """The Python-level handlers of SIGTERM and SIGHUP (main thread only: none elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    names = ("SIGTERM", "SIGHUP")
    found = [getattr(signal, n) for n in names if hasattr(signal, n)]
    return {s: signal.getsignal(s) for s in found if signal.getsignal(s) is not None}


def run_on_ray(
    jobs: Sequence[Job],
    settings: UpscaleSettings,
    *,
    address: bool | str = True,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    on_start: Callable[[], None] | None = None,
    on_outcome: Callable[[FileOutcome], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> list[FileOutcome]:
    """Run ``jobs`` (planned and checked by :func:`tileup.batch.plan_outputs`) on Ray workers;
    their outcomes in the jobs' order, one each.

    ``address``: see :func:`check_address` (a process already connected to Ray uses that
    connection). A settings or model problem raises TileupError once the first worker has
    tried to build its engine, before any file. ``on_start`` runs then, before the first file;
    ``on_outcome`` as each file finishes (in this process); ``progress`` counts files. Raises
    RayError without Ray. Interrupted (Ctrl-C), every worker is stopped before it returns.
    """
    ray = import_ray()
    address = check_address(address)
    started = connect(ray, address)
    slots: list[_Slot] = []
    try:
        resources = ray.cluster_resources()
        plan = plan_workers(
            settings.device, resources.get("CPU", 0), resources.get("GPU", 0), len(jobs), workers
        )
        actor_class = ray.remote(_Worker).options(
            num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=0
        )
        worker_settings = settings.replace(device=plan.device)

        def spawn() -> Any:
            return actor_class.remote(worker_settings)

        slots = [_Slot(spawn()) for _ in range(plan.count)]
        # 1. The first engine: the problems common to every file come out before any work.
        try:
            ready: Ready = ray.get(slots[0].actor.ready.remote())
        except ray.exceptions.RayError as exc:
            raise RayError(f"the first Ray worker did not start: {_first_line(exc)}") from exc
        if ready.error is not None:
            if ready.cli_message is not None:
                ready.error.cli_message = ready.cli_message  # type: ignore[attr-defined]
            raise ready.error
        for note in ready.notes:
            if on_note is not None:
                on_note(note)
        if on_start is not None:
            on_start()
        # 2. The files, streamed.
        progress = progress or NoProgress()
        progress.add_total(len(jobs))
        return _dispatch(ray, jobs, slots, spawn, overwrite, progress, on_outcome)
    finally:
        for slot in slots:
            ray.kill(slot.actor, no_restart=True)
        if started:
            ray.shutdown()


def _dispatch(
    ray: ModuleType,
    jobs: Sequence[Job],
    slots: list[_Slot],
    spawn: Callable[[], Any],
    overwrite: bool,
    progress: Progress,
    on_outcome: Callable[[FileOutcome], None] | None,
) -> list[FileOutcome]:
    """Feed the jobs to the slots' workers, at most IN_FLIGHT each, until every job has its
    outcome; a dead worker is replaced and its files handed on (see the module's notes)."""
    pending = collections.deque(range(len(jobs)))
    deaths = [0] * len(jobs)
    replace = [False] * len(jobs)  # its output may have been written by a worker that died
    calls: dict[Any, tuple[int, int]] = {}  # call → (job index, slot index)
    finished: dict[int, FileOutcome] = {}

    def finish(index: int, outcome: FileOutcome) -> None:
        finished[index] = outcome
        progress.advance(1)
        if on_outcome is not None:
            on_outcome(outcome)

    while len(finished) < len(jobs):
        for s, slot in enumerate(slots):
            while len(slot.queue) < IN_FLIGHT and pending:
                index = pending.popleft()
                job = (
                    dataclasses.replace(jobs[index], replace=True)
                    if replace[index]
                    else jobs[index]
                )
                call = slot.actor.run.remote(job, overwrite)
                calls[call] = (index, s)
                slot.queue.append(call)
        done, _ = ray.wait(list(calls), num_returns=1, timeout=0.5)
        for call in done:
            if call not in calls:
                continue  # settled with its dead worker's other calls
            index, s = calls.pop(call)
            slot = slots[s]
            try:
                outcome: FileOutcome = ray.get(call)
            except ray.exceptions.RayTaskError as exc:  # a bug, not a dead worker
                slot.queue.remove(call)
                finish(index, FileOutcome(jobs[index].source, error=_failed(jobs[index], exc)))
                continue
            except ray.exceptions.RayError:
                calls[call] = (index, s)
                _bury(ray, slot, calls, jobs, pending, deaths, replace, finish)
                slot.actor = spawn()
                slot.generation += 1
                continue
            slot.queue.remove(call)
            finish(index, outcome)
    return [finished[i] for i in range(len(jobs))]


def _bury(
    ray: ModuleType,
    slot: _Slot,
    calls: dict[Any, tuple[int, int]],
    jobs: Sequence[Job],
    pending: collections.deque[int],
    deaths: list[int],
    replace: list[bool],
    finish: Callable[[int, FileOutcome], None],
) -> None:
    """Settle every call queued on ``slot``'s dead worker: those that finished before it died
    keep their outcome; the first that did not was running: it counts a death (failing at
    MAX_ATTEMPTS) and its stray temporary file is removed; the rest go back to the queue."""
    queued = list(slot.queue)
    slot.queue.clear()
    ray.kill(slot.actor, no_restart=True)
    ray.wait(queued, num_returns=len(queued), timeout=10)
    back: list[int] = []
    running = True
    for call in queued:
        index, _ = calls.pop(call)
        try:
            outcome: FileOutcome = ray.get(call, timeout=0)
        except Exception:
            outcome = None  # type: ignore[assignment]
        if outcome is not None:
            finish(index, outcome)
            continue
        if not running:
            back.append(index)
            continue
        running = False
        job = jobs[index]
        remove_temp_files(job.output)
        deaths[index] += 1
        replace[index] = True
        if deaths[index] >= MAX_ATTEMPTS:
            error = (
                f"{job.source}: failed: the Ray worker running it died {deaths[index]} times "
                "(out of memory? see the Ray logs)"
            )
            finish(index, FileOutcome(job.source, error=error))
        else:
            back.insert(0, index)
    pending.extendleft(reversed(back))


def _failed(job: Job, exc: BaseException) -> str:
    return f"{job.source}: failed: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

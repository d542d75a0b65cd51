"""The HTTP server: the page, its static files and the JSON API, on ``http.server`` alone.

Routes (JSON unless said otherwise; errors are ``{"error": "<one line>"}`` with a 4xx status):

- ``GET /`` the page; ``GET /static/NAME`` its files (package data, nothing else is served);
- ``GET /api/models`` names of the upscalers, checkpoints and VAEs offered, the settings'
  fields (groups, defaults, choices) and the presets;
- ``GET|POST /api/plan`` (``width``, ``height``, ``has_alpha``, ``settings``) → the plan;
- ``POST /api/jobs`` (multipart: ``image`` files, ``settings`` JSON) → 202 ``{"jobs": [...]}``;
- ``GET /api/jobs``; ``GET /api/jobs/ID`` status; ``GET /api/jobs/ID/result`` the PNG with its
  metadata; ``GET /api/jobs/ID/preview`` a JPEG; ``GET /api/jobs/ID/source`` the upload;
  ``POST /api/jobs/ID/cancel``;
- ``POST /api/generate`` (JSON, or multipart with a ``settings`` field: GenerateSettings
  fields, flat, plus ``save_first_pass``) → 202 ``{"jobs": [...]}``, one job per image of the
  batch (seeds ``seed``, ``seed+1``, …); ``POST /api/generate/plan`` (the same body) → the
  first-pass and output sizes, seeds, progress units and estimate, nothing queued;
- ``POST /api/parameters`` (multipart ``image``) → the A1111 parameters in it and the settings
  they would reuse (``settings`` for an upscale, ``generate`` for the Generate form).

Every route asks for HTTP Basic auth when the server has ``auth``. Bodies are refused from their
Content-Length before they are read; images from their header before they are decoded. A
request from another web site (an ``Origin`` that is not this server) and, on a loopback
server, a ``Host`` that is not a loopback name (DNS rebinding) are refused.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hmac
import json
import mimetypes
import re
import shutil
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tileup.choices import IMAGE_SUFFIXES
from tileup.errors import TileupError
from tileup.imageio import ImageError, read_header
from tileup.settings import UpscaleSettings
from tileup.txt2img import GenerateSettings, hires_size, settings_from_parameters
from tileup.version import __version__
from tileup.web.catalog import Catalog
from tileup.web.config import ServerConfig
from tileup.web.engines import EngineCache
from tileup.web.jobs import Job, JobQueue, safe_stem, settings_summary
from tileup.web.multipart import parse_multipart
from tileup.web.plan import plan_job
from tileup.web.presets import PRESETS
from tileup.web.validation import (
    generate_from_client,
    parse_settings_json,
    settings_from_client,
)

JSON_LIMIT = 1 << 20
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class HttpError(Exception):
    """An answer with a 4xx/5xx status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files (package data under ``tileup/web/static``) by name, read once."""
    folder = resources.files("tileup.web") / "static"
    files: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        if entry.is_file() and re.fullmatch(r"[\w-]+\.(html|js|css|svg|png)", entry.name):
            kind = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind.endswith("javascript"):
                kind += "; charset=utf-8"
            files[entry.name] = (entry.read_bytes(), kind)
    return files


class WebApp:
    """The server's state: config, catalog, engines, the job queue, uploads folder."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.catalog = Catalog(config.models_dirs, config.checkpoints)
        self.engines = EngineCache()
        self.output_dir = config.output_dir.expanduser().resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.uploads = Path(tempfile.mkdtemp(prefix="tileup-ui-"))
        self.queue = JobQueue(self.engines, self.output_dir)
        self.static = _static_files()
        self.routes: list[tuple[str, re.Pattern[str], Callable[..., None]]] = [
            ("GET", re.compile(r"/"), self.index),
            ("GET", re.compile(r"/index\.html"), self.index),
            ("GET", re.compile(r"/static/(?P<name>[\w.-]+)"), self.static_file),
            ("GET", re.compile(r"/api/models"), self.models),
            ("GET", re.compile(r"/api/plan"), self.plan),
            ("POST", re.compile(r"/api/plan"), self.plan),
            ("GET", re.compile(r"/api/jobs"), self.list_jobs),
            ("POST", re.compile(r"/api/jobs"), self.submit),
            ("GET", re.compile(r"/api/jobs/(?P<id>[0-9a-f]{12})"), self.job_status),
            ("GET", re.compile(r"/api/jobs/(?P<id>[0-9a-f]{12})/result"), self.job_result),
            ("GET", re.compile(r"/api/jobs/(?P<id>[0-9a-f]{12})/preview"), self.job_preview),
            ("GET", re.compile(r"/api/jobs/(?P<id>[0-9a-f]{12})/source"), self.job_source),
            ("POST", re.compile(r"/api/jobs/(?P<id>[0-9a-f]{12})/cancel"), self.job_cancel),
            ("POST", re.compile(r"/api/parameters"), self.parameters),
            ("POST", re.compile(r"/api/generate"), self.generate),
            ("POST", re.compile(r"/api/generate/plan"), self.generate_plan),
        ]

    def start(self) -> None:
        self.queue.start()

    def close(self) -> None:
        """Stop the worker (cancelling jobs) and remove the uploads."""
        if self.queue.worker.is_alive():
            self.queue.stop()
        shutil.rmtree(self.uploads, ignore_errors=True)

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, request: Handler, method: str) -> None:
        """Answer one request; an exception in a route is a 500 for that request only."""
        try:
            self._guard(request, method)
            path = urlsplit(request.path).path
            for verb, pattern, route in self.routes:
                match = pattern.fullmatch(path)
                if match and verb == method:
                    route(request, **match.groupdict())
                    return
            known = any(p.fullmatch(path) for _, p, _ in self.routes)
            if known:
                raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed here")
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such page: {path[:100]}")
        except HttpError as exc:
            request.send_json({"error": _one_line(str(exc))}, exc.status)
        except TileupError as exc:  # settings, names, images: the user's to fix
            request.send_json({"error": _one_line(str(exc))}, HTTPStatus.BAD_REQUEST)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            message = f"internal error: {type(exc).__name__}: {_one_line(str(exc))[:200]}"
            with contextlib.suppress(OSError):
                request.send_json({"error": message}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _guard(self, request: Handler, method: str) -> None:
        """Auth, then the Host and Origin checks (see the module doc)."""
        auth = self.config.auth
        if auth is not None:
            given = request.headers.get("Authorization", "")
            expected = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            if not hmac.compare_digest(given.encode(), expected.encode()):
                raise HttpError(HTTPStatus.UNAUTHORIZED, "authentication required")
        host = request.headers.get("Host", "")
        if not self.config.listens_publicly:
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in LOOPBACK_NAMES:
                raise HttpError(HTTPStatus.FORBIDDEN, f"Host {host[:60]!r} refused")
        origin = request.headers.get("Origin")
        if origin and method != "GET" and urlsplit(origin).netloc != host:
            raise HttpError(HTTPStatus.FORBIDDEN, "cross-site request refused")

    # -- the page ---------------------------------------------------------------------------

    def index(self, request: Handler) -> None:
        self.static_file(request, "index.html")

    def static_file(self, request: Handler, name: str) -> None:
        found = self.static.get(name)
        if found is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such file: {name}")
        data, kind = found
        request.send_bytes(data, kind, cache="no-cache")

    # -- models, plan -----------------------------------------------------------------------

    def models(self, request: Handler) -> None:
        from tileup.cli import HELP_GROUPS
        from tileup.sampling.schedules import SAMPLERS, SCHEDULES

        fields = []
        for f in dataclasses.fields(UpscaleSettings):
            if f.name in ("models_dirs", "device"):
                continue
            bounds = f.metadata.get("bounds")
            fields.append(
                {
                    "name": f.name,
                    "type": str(f.type),
                    "default": f.default,
                    "help": f.metadata["help"],
                    "choices": f.metadata.get("choices"),
                    "bounds": dataclasses.asdict(bounds) if bounds else None,
                    "needs_checkpoint": f.metadata["needs_checkpoint"],
                }
            )
        listing = self.catalog.listing()
        request.send_json(
            {
                **listing,
                "hr_upscalers": self.catalog.hr_upscalers(),
                "generate_defaults": _generate_defaults(),
                "default_checkpoint": self.catalog.default_checkpoint(),
                "samplers": [s.name for s in SAMPLERS],
                "schedulers": ["automatic", *(s.name for s in SCHEDULES)],
                "fields": fields,
                "groups": {k: list(v) for k, v in HELP_GROUPS.items()},
                "presets": PRESETS,
                "version": __version__,
                "max_upload_bytes": self.config.max_upload_bytes,
                "max_pixels": self.config.max_pixels,
                "output_dir": self.output_dir.name,
            }
        )

    def plan(self, request: Handler) -> None:
        if request.command == "POST":
            body = request.read_body(JSON_LIMIT)
            data = parse_settings_json(body) if body else {}
        else:
            query = parse_qs(urlsplit(request.path).query)
            data = {k: v[-1] for k, v in query.items()}
            data["settings"] = parse_settings_json(data.get("settings"))
        try:
            width, height = int(data.get("width", 0)), int(data.get("height", 0))
        except (TypeError, ValueError):
            raise HttpError(HTTPStatus.BAD_REQUEST, "width and height must be integers") from None
        if width < 1 or height < 1:
            raise HttpError(HTTPStatus.BAD_REQUEST, "width and height must be positive")
        if width * height > self.config.max_pixels:
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"{width}x{height} exceeds the server's limit of {self.config.max_pixels} pixels",
            )
        raw = data.get("settings") or {}
        if not isinstance(raw, dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, "settings must be a JSON object")
        settings = settings_from_client(raw, self.catalog, self.config)
        engine = self.engines.planner(settings)
        plan = plan_job(engine, height, width, bool(data.get("has_alpha")))
        rate = self.queue.rate(settings)
        plan["estimate_seconds"] = None if rate is None else round(rate * plan["units"], 1)
        plan["queue_ahead"] = sum(1 for j in self.queue.all() if j.state in ("queued", "running"))
        request.send_json(plan)

    # -- jobs -------------------------------------------------------------------------------

    def submit(self, request: Handler) -> None:
        body = request.read_body(self.config.max_upload_bytes)
        parts = parse_multipart(request.headers.get("Content-Type", ""), body)
        texts = [p.data for p in parts if p.name == "settings"]
        settings = settings_from_client(
            parse_settings_json(texts[-1] if texts else None), self.catalog, self.config
        )
        images = [p for p in parts if p.name == "image"]
        if not images:
            raise HttpError(HTTPStatus.BAD_REQUEST, "no image: send one or more 'image' files")
        batch = self.queue.new_id() if len(images) > 1 else ""
        planner = self.engines.planner(settings)
        jobs: list[Job] = []
        try:
            for part in images:
                jobs.append(self._new_job(part.filename, part.data, settings, planner, batch))
        except BaseException:
            for job in jobs:
                if job.source is not None:
                    job.source.unlink(missing_ok=True)
            raise
        for job in jobs:
            self.queue.submit(job)
        request.send_json(
            {"jobs": [j.id for j in jobs], "settings": settings_summary(settings)},
            HTTPStatus.ACCEPTED,
        )

    def _new_job(
        self,
        filename: str | None,
        data: bytes,
        settings: UpscaleSettings,
        planner: Any,
        batch: str,
    ) -> Job:
        """A queued job for one uploaded image, checked from its header (kind, pixels)."""
        name = (filename or "image").replace("\\", "/").split("/")[-1][:120] or "image"
        if not data:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"{name}: the file is empty")
        job_id = self.queue.new_id()
        path = self.uploads / f"{job_id}.upload"
        path.write_bytes(data)
        try:
            try:
                header = read_header(path)
            except ImageError as exc:
                raise HttpError(HTTPStatus.BAD_REQUEST, str(exc).replace(str(path), name)) from None
            pixels = header.width * header.height
            if pixels > settings.max_pixels:
                raise HttpError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"{name}: {header.width}x{header.height} = {pixels} pixels exceeds the limit "
                    f"of {settings.max_pixels} (refused before decoding)",
                )
            suffix = "." + (header.format or "").lower().replace("jpeg", "jpg")
            if suffix in IMAGE_SUFFIXES or suffix in (".gif",):
                path = path.rename(path.with_suffix(suffix))
            plan = plan_job(planner, header.height, header.width, header.has_alpha)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Job(
            id=job_id,
            name=name,
            source=path,
            settings=settings,
            input_size=(header.width, header.height),
            output_size=(plan["output"][0], plan["output"][1]),
            total=float(max(plan["units"], 1)),
            batch=batch,
        )

    def _job(self, job_id: str) -> Job:
        job = self.queue.get(job_id)
        if job is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no job {job_id}")
        return job

    def list_jobs(self, request: Handler) -> None:
        request.send_json({"jobs": [j.status(self.queue.rate_of(j)) for j in self.queue.all()]})

    def job_status(self, request: Handler, id: str) -> None:
        job = self._job(id)
        request.send_json(job.status(self.queue.rate_of(job)))

    def job_result(self, request: Handler, id: str) -> None:
        job = self._job(id)
        if job.state != "done" or job.output is None:
            raise HttpError(HTTPStatus.CONFLICT, f"job {id} is {job.state}: no result")
        path = job.output
        if path.parent != self.output_dir or not path.is_file():
            raise HttpError(HTTPStatus.GONE, f"job {id}: its output is no longer on disk")
        request.send_bytes(path.read_bytes(), "image/png", filename=path.name)

    def job_preview(self, request: Handler, id: str) -> None:
        job = self._job(id)
        with job.lock:
            data = job.preview
        if data is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"job {id} has no preview yet")
        request.send_bytes(data, "image/jpeg")

    def job_source(self, request: Handler, id: str) -> None:
        job = self._job(id)
        if job.source is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"job {id} is a generate job: no upload")
        if not job.source.is_file():
            raise HttpError(HTTPStatus.GONE, f"job {id}: its upload is gone")
        kind = mimetypes.guess_type(job.source.name)[0] or "application/octet-stream"
        request.send_bytes(job.source.read_bytes(), kind)

    def job_cancel(self, request: Handler, id: str) -> None:
        job = self._job(id)
        self.queue.cancel(job)
        request.send_json(job.status(), HTTPStatus.ACCEPTED)

    def parameters(self, request: Handler) -> None:
        from tileup.imageio.metadata import parameters_in
        from tileup.infotext import ParametersWarning, parse_parameters, reusable_settings

        body = request.read_body(self.config.max_upload_bytes)
        parts = [p for p in parse_multipart(request.headers.get("Content-Type", ""), body)]
        images = [p for p in parts if p.name == "image"]
        if not images or not images[0].data:
            raise HttpError(HTTPStatus.BAD_REQUEST, "send one 'image' file")
        name = safe_stem(images[0].filename)
        text = parameters_in(Path(name), images[0].data)
        answer: dict[str, Any] = {
            "text": text, "settings": {}, "generate": {}, "items": {}, "warning": None
        }  # fmt: skip
        if text:
            answer["items"] = parse_parameters(text)[2]
            try:
                answer["settings"] = reusable_settings(text)
                answer["generate"] = settings_from_parameters(text)
            except ParametersWarning as exc:
                answer["warning"] = str(exc)
        request.send_json(answer)

    # -- generate ---------------------------------------------------------------------------

    def _generate_request(self, request: Handler) -> tuple[GenerateSettings, bool, dict]:
        """The checked settings of a generate request (JSON body or multipart ``settings``),
        whether to save the first pass, and the plan of its batch (sizes, seeds, units)."""
        body = request.read_body(JSON_LIMIT)
        kind = request.headers.get("Content-Type", "")
        if kind.startswith("multipart/"):
            texts = [p.data for p in parse_multipart(kind, body) if p.name == "settings"]
            values = parse_settings_json(texts[-1] if texts else None)
        else:
            values = parse_settings_json(body)
        save_first_pass = values.pop("save_first_pass", False)
        if not isinstance(save_first_pass, bool):
            raise HttpError(HTTPStatus.BAD_REQUEST, "save_first_pass must be a bool")
        settings = generate_from_client(values, self.catalog, self.config)
        return settings, save_first_pass, self._generate_plan(settings)

    def _generate_plan(self, settings: GenerateSettings) -> dict[str, Any]:
        generator = self.engines.generator(settings, plan_only=True)
        first = generator.native_size()
        output = hires_size(*first, settings)[1] if settings.hires_fix else first
        limit = settings.upscale.max_pixels
        if output[0] * output[1] > limit:
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"output {output[1]}x{output[0]} = {output[0] * output[1]} pixels exceeds the "
                f"limit of {limit}",
            )
        units = generator.planned_units() // settings.batch_count
        rate = self.queue.rate(_rate_settings(settings), True)
        return {
            "first_pass": [first[1], first[0]],
            "output": [output[1], output[0]],
            "seeds": generator.seeds(),
            "units": units,
            "notes": list(generator.notes),
            "estimate_seconds": None if rate is None else round(rate * units, 1),
            "queue_ahead": sum(1 for j in self.queue.all() if j.state in ("queued", "running")),
        }

    def generate_plan(self, request: Handler) -> None:
        request.send_json(self._generate_request(request)[2])

    def generate(self, request: Handler) -> None:
        settings, save_first_pass, plan = self._generate_request(request)
        seeds = plan["seeds"]
        batch = self.queue.new_id() if len(seeds) > 1 else ""
        jobs = []
        for seed in seeds:
            one = dataclasses.replace(settings, seed=seed, batch_count=1)
            jobs.append(
                Job(
                    id=self.queue.new_id(),
                    name=f"seed {seed}",
                    source=None,
                    settings=_rate_settings(one),
                    input_size=(plan["first_pass"][0], plan["first_pass"][1]),
                    output_size=(plan["output"][0], plan["output"][1]),
                    total=float(max(plan["units"], 1)),
                    batch=batch,
                    generate=one,
                    save_first_pass=save_first_pass,
                )
            )
        for job in jobs:
            self.queue.submit(job)
        request.send_json(
            {"jobs": [j.id for j in jobs], "seeds": seeds, "settings": settings_summary(settings)},
            HTTPStatus.ACCEPTED,
        )


def _generate_defaults() -> dict[str, Any]:
    """GenerateSettings' own fields and their defaults (the Generate form's)."""
    return {f.name: f.default for f in dataclasses.fields(GenerateSettings) if f.name != "upscale"}


def _rate_settings(settings: GenerateSettings) -> UpscaleSettings:
    """The pass whose settings key a generate job's rate: the hires pass when enabled."""
    return settings.second_pass() if settings.hires_fix else settings.first_pass()


class Handler(BaseHTTPRequestHandler):
    """One request, answered by the server's :class:`WebApp`."""

    server: TileupServer
    server_version = f"tileup/{__version__}"
    sys_version = ""
    timeout = 120  # seconds a client may stall a read (a slow upload holds one thread only)

    def do_GET(self) -> None:
        self.server.app.handle(self, "GET")

    def do_POST(self) -> None:
        self.server.app.handle(self, "POST")

    def do_HEAD(self) -> None:
        self.send_error(HTTPStatus.METHOD_NOT_ALLOWED)

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.app.config.quiet:
            super().log_message(format, *args)

    def read_body(self, limit: int) -> bytes:
        """The request body: Content-Length is required and checked against ``limit`` before
        anything is read (413 with one line; the connection is then closed)."""
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        try:
            length = int(length_text)
        except ValueError:
            raise HttpError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
        if length < 0:
            raise HttpError(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        if length > limit:
            self.close_connection = True
            self._discard(length)
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"upload of {length} bytes exceeds the limit of {limit} bytes",
            )
        data = self.rfile.read(length)
        if len(data) != length:
            raise HttpError(HTTPStatus.BAD_REQUEST, "the body ended early")
        return data

    def _discard(self, length: int) -> None:
        """Read and drop a refused body (up to 1 GiB), so the client reads the answer instead
        of a reset connection; nothing is kept."""
        left = length if length <= 1 << 30 else 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                return
            left -= len(chunk)

    def send_json(self, value: Any, status: int = HTTPStatus.OK) -> None:
        data = json.dumps(value, ensure_ascii=False, default=str).encode()
        self.send_bytes(data, "application/json; charset=utf-8", status=status)

    def send_bytes(
        self,
        data: bytes,
        kind: str,
        *,
        status: int = HTTPStatus.OK,
        filename: str | None = None,
        cache: str = "no-store",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Basic realm="tileup", charset="UTF-8"')
        if filename is not None:
            self.send_header("Content-Disposition", f'attachment; filename="{filename}"')
        for key, value in self.server.app.config.extra_headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


class TileupServer(ThreadingHTTPServer):
    """A threading HTTP server that carries its :class:`WebApp`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: WebApp) -> None:
        self.app = app
        if ":" in address[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else str(host)
        return f"http://{shown}:{port}/"


def make_server(config: ServerConfig) -> TileupServer:
    """A server bound to ``config.host:config.port`` (port 0: any free one), its worker
    started; run it with ``serve_forever()`` and stop it with :func:`stop_server`."""
    app = WebApp(config)
    try:
        server = TileupServer((config.host, config.port), app)
    except BaseException:
        app.close()
        raise
    app.start()
    return server


def stop_server(server: TileupServer) -> None:
    """Stop serving, stop the worker (cancelling jobs), close the socket, remove uploads."""
    server.shutdown()
    server.app.close()
    server.server_close()


def serve(config: ServerConfig) -> None:
    """Serve until interrupted (Ctrl-C)."""
    server = make_server(config)
    print(f"tileup ui: serving on {server.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    thread = threading.Thread(target=server.serve_forever, name="tileup-http", daemon=True)
    thread.start()
    try:
        thread.join()
    except KeyboardInterrupt:
        print("tileup ui: stopping", file=sys.stderr)
    finally:
        stop_server(server)

"""Command line: arguments → UpscaleSettings → one library call; progress, summary, exit codes.

Exit codes: 0 every input succeeded, 1 some input failed (the others were still done),
2 usage, settings or output error (nothing was done), 130 interrupted (SIGINT), 128 + N
stopped by signal N (SIGTERM: 143). However the job stops, no temporary file is left behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from tileup.choices import LATENT_MODES, RESAMPLERS
from tileup.errors import TileupError
from tileup.settings import UpscaleSettings
from tileup.upscalers.registry import (
    builtin_model_path,
    iter_model_files,
    models_dirs,
)
from tileup.version import __version__

if TYPE_CHECKING:  # torch, spandrel and diffusers load only when a job runs (fast --help)
    from tileup.batch import FileOutcome

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
COMMANDS = ("generate", "img2img", "batch", "models", "samplers", "info", "ui")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _flag(field: dataclasses.Field[Any]) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


HELP_GROUPS = {
    "pixel upscale": ("upscaler", "models_dirs", "scale", "width", "height", "model_tile"),
    "re-diffusion": (
        "checkpoint", "vae", "prompt", "negative_prompt", "denoise", "steps", "sampler",
        "scheduler", "cfg", "seed", "prediction", "mode",
    ),
    "tiles": ("tile", "overlap", "blend", "tile_batch", "vae_tile", "vae_stats"),
    "redraw and seam fix": (
        "order", "padding", "mask_blur", "seam_fix", "seam_denoise", "seam_width",
        "seam_mask_blur", "seam_padding",
    ),
    "colour": ("color_fix",),
    "device and memory": (
        "device", "dtype", "vram", "low_vram", "compile", "cuda_graphs", "max_pixels"
    ),
}  # fmt: skip
"""The --help sections, as A1111/ComfyUI users group the settings; every field is in one."""


def _default_note(field: dataclasses.Field[Any]) -> str:
    """ " (default: …)" in human units, or nothing for empty and on/off defaults."""
    if field.default in (None, (), "") or isinstance(field.default, bool):
        return ""
    value = field.default
    if field.name == "max_pixels" and isinstance(value, int):
        return f" (default: {value / 1e6:g} megapixels)"
    return f" (default: {value})"


def _add_settings_arguments(
    parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset()
) -> None:
    """One option per UpscaleSettings field (but ``skip``), typed from its annotation, in its
    help section."""
    titles = [t for t, names in HELP_GROUPS.items() if set(names) - skip]
    sections = {title: parser.add_argument_group(title) for title in titles}
    section_of = {
        n: sections[t] for t, names in HELP_GROUPS.items() for n in names if n not in skip
    }
    for field in dataclasses.fields(UpscaleSettings):
        if field.name in skip:
            continue
        kind = str(field.type)
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "help": field.metadata["help"] + _default_note(field),
            "default": argparse.SUPPRESS,
        }
        if field.metadata.get("metavar"):
            kwargs["metavar"] = field.metadata["metavar"]
        if field.metadata.get("choices"):
            kwargs["choices"] = field.metadata["choices"]
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("tuple"):
            kwargs["action"] = "append"
        elif kind.startswith("int"):
            kwargs["type"] = int
        elif kind.startswith("float"):
            kwargs["type"] = float
        section_of[field.name].add_argument(_flag(field), **kwargs)


def build_parser(batch: bool = False) -> argparse.ArgumentParser:
    """The main command's parser; with ``batch``, ``tileup batch``'s (its options added)."""
    if batch:
        parser = _Parser(
            prog="tileup batch",
            usage="%(prog)s INPUT... [-o OUT/] [--ray [ADDRESS]] [--workers N] [options]",
            description="Upscale many files, on this machine or on a Ray cluster (--ray), "
            "resumably: into an output folder, OUT/.tileup-manifest.jsonl records every file, "
            "and running the same command again skips those done and retries those that failed "
            "(once). Takes every option of the main command.",
        )
    else:
        parser = _Parser(
            prog="tileup",
            usage="%(prog)s INPUT... [options]\n       %(prog)s {" + ",".join(COMMANDS) + "} ...",
            description="Upscale images with SR models and re-diffuse the tiles with a Stable "
            "Diffusion checkpoint, seamless and in bounded memory. Other commands: 'tileup batch' "
            "runs large batches (resumable; --ray for a cluster), 'tileup models' "
            "lists the upscalers found, 'tileup samplers' the samplers and schedules, 'tileup "
            "info IMAGE' the parameters stored in an image, 'tileup img2img IMAGE --checkpoint "
            "M' one re-diffusion pass at the image's size, 'tileup generate PROMPT --checkpoint "
            "M' txt2img with hires fix, 'tileup ui' a local web page and HTTP API.",
        )
    io = parser.add_argument_group("input and output")
    io.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    io.add_argument("-o", "--output", help="output file (one input) or folder")
    io.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    io.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    io.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    io.add_argument("--stats", action="store_true", help="print each image's stats as JSON")
    io.add_argument(
        "--reuse-parameters",
        action="store_true",
        help="take the prompt, negative prompt, seed, sampler, schedule, CFG and steps from the "
        "input image's A1111 parameters for every one of them not given here",
    )
    io.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip every input whose output file exists, whoever wrote it",
    )
    io.add_argument(
        "--no-manifest",
        action="store_true",
        help="neither read nor write OUT/.tileup-manifest.jsonl, the record that lets a re-run "
        "of a batch into a folder skip the files done",
    )
    parser.add_argument("--version", action="version", version=f"tileup {__version__}")
    if batch:
        group = parser.add_argument_group("batch")
        group.add_argument(
            "--ray",
            nargs="?",
            const=True,
            metavar="ADDRESS",
            help="run on a Ray cluster: no ADDRESS starts a local one; auto, HOST:PORT or "
            "ray://HOST:PORT joins one (the output folder must be shared). Put it after the "
            "inputs, or write --ray=ADDRESS",
        )
        group.add_argument(
            "--workers",
            type=int,
            metavar="N",
            help="Ray workers, each with its own engine (default: one per GPU of the cluster, "
            "or one per CPU without GPUs)",
        )
    _add_settings_arguments(parser)
    return parser


def _models_command(argv: Sequence[str]) -> int:
    from tileup.upscalers.catalog import describe_models

    parser = _Parser(prog="tileup models", description="List the upscalers tileup can find.")
    parser.add_argument("--models-dir", action="append", default=[], metavar="DIR")
    args = parser.parse_args(argv)
    dirs = models_dirs(args.models_dir)
    rows = [("default", builtin_model_path())] + [(p.stem, p) for p in iter_model_files(dirs)]
    for (name, path), kind in zip(rows, describe_models([p for _, p in rows]), strict=True):
        print(f"{name}\t{kind}\t{path}")
    print("resamplers:\t" + ", ".join(RESAMPLERS))
    print("latent (need --checkpoint):\tlatent, " + ", ".join(f"latent-{m}" for m in LATENT_MODES))
    for folder in dirs:
        if not folder.is_dir():
            print(f"tileup: warning: models folder {folder} does not exist", file=sys.stderr)
    if not dirs:
        print("(add folders with --models-dir or $TILEUP_MODELS)")
    return EXIT_OK


def _info_command(argv: Sequence[str]) -> int:
    from tileup.imageio import read_parameters
    from tileup.infotext import parse_parameters

    parser = _Parser(
        prog="tileup info", description="Print the A1111-style parameters stored in images."
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    args = parser.parse_args(argv)
    status = EXIT_OK
    for image in args.images:
        try:
            text = read_parameters(image)
        except (TileupError, OSError) as exc:
            print(f"tileup: error: {exc}", file=sys.stderr)
            status = EXIT_FAILED
            continue
        prompt, negative, items = parse_parameters(text) if text else ("", "", {})
        if args.json:
            record = {
                "image": image,
                "prompt": prompt,
                "negative_prompt": negative,
                "parameters": items,
                "text": text,
            }
            print(json.dumps(record, ensure_ascii=False))
            continue
        if text is None:
            print(f"{image}: no parameters")
            continue
        print(f"{image}:")
        print(f"  Prompt: {prompt}")
        if negative:
            print(f"  Negative prompt: {negative}")
        for key, value in items.items():
            print(f"  {key}: {value}")
    return status


def _reuse_parameters(values: dict[str, Any], inputs: Sequence[str]) -> str | None:
    """Fill ``values`` (the settings given on the command line) from the one input image's
    ``parameters`` for every reusable setting not given; a one-line warning, or None."""
    from tileup.infotext import reusable_settings

    if len(inputs) != 1 or not Path(inputs[0]).is_file():
        raise TileupError("--reuse-parameters takes exactly one input image")
    return reuse_from_image(values, inputs[0], reusable_settings)


def reuse_from_image(
    values: dict[str, Any], image: str, extract: Callable[[str], dict[str, object]]
) -> str | None:
    """Fill ``values`` with what ``extract`` finds in ``image``'s A1111 ``parameters``, for
    every setting not already there; a one-line warning (unreadable, none, malformed: the
    defaults stay), or None."""
    from tileup.imageio import read_parameters
    from tileup.infotext import ParametersWarning

    try:
        text = read_parameters(image)
    except (TileupError, OSError) as exc:
        return f"--reuse-parameters: {exc}; using the defaults"
    if text is None:
        return f"--reuse-parameters: {image} has no parameters; using the defaults"
    try:
        found = extract(text)
    except ParametersWarning as exc:
        return f"--reuse-parameters: {image}: {exc}; using the defaults"
    for name, value in found.items():
        values.setdefault(name, value)
    return None


def _img2img_command(argv: list[str]) -> int:
    """``tileup img2img IMAGE --checkpoint M --denoise D``: one re-diffusion pass at the input's
    size (or ``--scale`` / ``--width`` / ``--height``, reached by a Lanczos resize unless
    ``--upscaler`` says otherwise), tiled only when the image exceeds one tile."""
    from tileup.choices import CHECKPOINT_ENV

    asks_help = any(a in ("-h", "--help") for a in argv)
    named = any(a == "--checkpoint" or a.startswith("--checkpoint=") for a in argv)
    if not (asks_help or named or os.environ.get(CHECKPOINT_ENV)):
        return _usage_error(f"img2img needs --checkpoint MODEL.safetensors (or ${CHECKPOINT_ENV})")
    return main(["--scale", "1", "--upscaler", "lanczos", *argv])


def _ui_command(argv: Sequence[str]) -> int:
    """``tileup ui``: the web page and HTTP API (the web package is imported only here)."""
    parser = _Parser(
        prog="tileup ui",
        description="Serve tileup's web page and HTTP API on this machine (offline).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7870, help="port (default: 7870)")
    parser.add_argument(
        "--listen", action="store_true", help="serve on the network (0.0.0.0); needs --auth"
    )
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="HTTP Basic auth on every page")
    parser.add_argument(
        "--models-dir", action="append", default=[], metavar="DIR", help="upscaler models folder"
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="PATH",
        help="a .safetensors checkpoint or a folder of them (repeatable; the first is the default)",
    )
    parser.add_argument(
        "--output-dir", default="tileup_outputs", metavar="DIR", help="where results are written"
    )
    parser.add_argument("--device", default="auto", help="device for every job (default: auto)")
    parser.add_argument(
        "--max-upload-mb", type=float, default=64, metavar="MB", help="largest upload (64)"
    )
    parser.add_argument("--quiet", action="store_true", help="no request log")
    args = parser.parse_args(argv)
    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not (user and sep and password):
            return _usage_error("--auth must be USER:PASSWORD, both non-empty")
        auth = (user, password)
    host = "0.0.0.0" if args.listen else args.host
    if host not in ("127.0.0.1", "localhost", "::1") and auth is None:
        return _usage_error("--listen (or a non-loopback --host) needs --auth USER:PASSWORD")
    if not 0 <= args.port <= 65535:
        return _usage_error(f"--port must be in [0, 65535], got {args.port}")
    try:
        UpscaleSettings(device=args.device)
    except TileupError as exc:
        return _usage_error(_cli_text(exc))
    from tileup.web import ServerConfig, serve

    config = ServerConfig(
        host=host,
        port=args.port,
        auth=auth,
        models_dirs=tuple(Path(d).expanduser() for d in args.models_dir),
        checkpoints=tuple(Path(c).expanduser() for c in args.checkpoint),
        output_dir=Path(args.output_dir).expanduser(),
        device=args.device,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        quiet=args.quiet,
    )
    try:
        serve(config)
    except OSError as exc:
        return _usage_error(f"cannot serve on {host}:{args.port}: {exc.strerror or exc}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "generate":
        from tileup.txt2img_cli import generate_command

        return generate_command(argv[1:])
    if argv and argv[0] == "batch":
        return _upscale_command(argv[1:], batch=True)
    if argv and argv[0] == "models":
        return _models_command(argv[1:])
    if argv and argv[0] == "info":
        return _info_command(argv[1:])
    if argv and argv[0] == "img2img":
        return _img2img_command(argv[1:])
    if argv and argv[0] == "ui":
        return _ui_command(argv[1:])
    if argv and argv[0] == "samplers":
        from tileup.sampling.schedules import describe_samplers

        print(describe_samplers())
        return EXIT_OK
    return _upscale_command(argv, batch=False)


def _upscale_command(argv: list[str], batch: bool) -> int:
    """The main command (``batch``: ``tileup batch``, with its options): settings from the
    arguments, one :func:`upscale_files` call, progress, summary and exit code."""
    try:
        args = build_parser(batch).parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2): a code, not a raise
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    ray: bool | str | None = getattr(args, "ray", None)
    workers: int | None = getattr(args, "workers", None)
    if workers is not None and ray is None:
        return _usage_error("--workers needs --ray (on one machine, --device picks the GPUs)")
    if ray is not None:
        from tileup.distributed import check_address, import_ray

        try:
            ray = check_address(ray)
            import_ray()
        except TileupError as exc:
            return _usage_error(_cli_text(exc))
    known = {f.name for f in dataclasses.fields(UpscaleSettings)}
    values = {k: v for k, v in vars(args).items() if k in known}
    if "models_dirs" in values:
        values["models_dirs"] = tuple(values["models_dirs"])
    try:
        warning = _reuse_parameters(values, args.inputs) if args.reuse_parameters else None
        settings = UpscaleSettings(**values)
    except TileupError as exc:
        return _usage_error(_cli_text(exc))

    from tileup.batch import upscale_files

    quiet = args.quiet
    if warning:
        print(f"tileup: warning: {warning}", file=sys.stderr)
    progress = _Bar(disabled=quiet, unit="image" if ray is not None else "tile")
    failures: list[FileOutcome] = []
    skipped: list[FileOutcome] = []

    def on_outcome(outcome: FileOutcome) -> None:
        if outcome.error:
            failures.append(outcome)
            progress.write(f"tileup: error: {outcome.error}")
        elif outcome.skipped:
            skipped.append(outcome)
        elif outcome.output is not None and not quiet:
            progress.write(f"{outcome.source} -> {outcome.output}")
        if args.stats and outcome.stats is not None:
            print(json.dumps(outcome.stats.as_dict()), flush=True)

    try:
        with _signals_raise(), _warnings_as_notes(progress.write):
            outcomes = upscale_files(
                args.inputs,
                settings,
                output=args.output,
                overwrite=args.overwrite,
                recursive=args.recursive,
                progress=progress,
                on_outcome=on_outcome,
                on_note=None if quiet else (lambda note: progress.write(f"tileup: {note}")),
                skip_existing=args.skip_existing,
                manifest=not args.no_manifest,
                ray=ray,
                workers=workers,
            )
    except TileupError as exc:
        progress.close()
        return _usage_error(_cli_text(exc))
    except (KeyboardInterrupt, _Terminated) as stop:
        return _stopped(progress, stop)
    progress.close()
    done = len(outcomes) - len(failures) - len(skipped)
    if failures or (len(outcomes) > 1 and not quiet):
        before = f", {len(skipped)} skipped (done before)" if skipped else ""
        print(f"tileup: {done} done, {len(failures)} failed{before}", file=sys.stderr)
    return EXIT_FAILED if failures or not outcomes else EXIT_OK


def _stopped(progress: _Bar, stop: BaseException) -> int:
    """The exit status of a job stopped by SIGINT (130) or a signal N (128 + N), said once."""
    progress.close()
    if isinstance(stop, _Terminated):
        print(f"tileup: stopped by {signal.Signals(stop.signum).name}", file=sys.stderr)
        return 128 + stop.signum
    print("tileup: interrupted", file=sys.stderr)
    return 130


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM/SIGHUP, as SIGINT raises KeyboardInterrupt, so every
    ``finally`` block on the way out (the removal of a half-written temporary file) still runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _signals_raise() -> Iterator[None]:
    """While the job runs, SIGTERM and SIGHUP raise :class:`_Terminated` instead of killing the
    process on the spot; the previous handlers come back afterwards. A signal that is ignored
    (``nohup``) or already handled stays as it is; only the main thread can set handlers:
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated(signum)

    names = ("SIGTERM", "SIGHUP")  # SIGHUP: not on Windows
    caught = [getattr(signal, name) for name in names if hasattr(signal, name)]
    previous = {
        signum: signal.signal(signum, handler)
        for signum in caught
        if signal.getsignal(signum) is signal.SIG_DFL
    }
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextmanager
def _warnings_as_notes(write: Any) -> Iterator[None]:
    """While the job runs, a warning from any library reaches the user as one line, once:
    ``tileup: warning: <first line>``; deprecation notices meant for developers (Deprecation-,
    PendingDeprecation- and FutureWarning raised outside tileup) are not shown at all."""
    seen: set[str] = set()

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
        if text not in seen:
            seen.add(text)
            write(f"tileup: warning: {text}")

    with warnings.catch_warnings():
        for quiet in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=quiet)
            warnings.filterwarnings("default", category=quiet, module="tileup")
        warnings.showwarning = show
        yield


def _cli_text(exc: TileupError) -> str:
    """An error's message in the command line's words (flags rather than field names)."""
    return str(getattr(exc, "cli_message", exc))


def _usage_error(message: str) -> int:
    print(f"tileup: error: {message}", file=sys.stderr)
    return EXIT_USAGE


class _Bar:
    """One tqdm bar over every tile (or ``unit``: image) of the job, created lazily on stderr;
    it shows the rate and the time left."""

    def __init__(self, disabled: bool, unit: str = "tile") -> None:
        self.disabled = disabled or os.environ.get("TILEUP_NO_PROGRESS") == "1"
        self.unit = unit
        self._bar: Any = None
        self._total = 0

    def _get(self) -> Any:
        if self._bar is None and not self.disabled:
            from tqdm import tqdm

            self._bar = tqdm(total=self._total, unit=self.unit, dynamic_ncols=True, file=sys.stderr)
        return self._bar

    def add_total(self, count: int) -> None:
        self._total += count
        if self._bar is not None:
            self._bar.total = self._total
            self._bar.refresh()

    def advance(self, count: int) -> None:
        bar = self._get()
        if bar is not None:
            bar.update(count)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


if __name__ == "__main__":
    raise SystemExit(main())

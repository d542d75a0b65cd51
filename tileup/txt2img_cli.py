"""``tileup generate PROMPT``: txt2img with hires fix on the command line (see tileup.txt2img).

Outputs: ``-o FILE`` (one image), or a folder (default: the current one) where images are named
A1111's way, ``NNNNN-SEED.png`` numbered after the highest number already there.
``--save-first-pass`` also writes ``<name>-first-pass.png``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tileup.cli import (
    EXIT_FAILED,
    EXIT_OK,
    _add_settings_arguments,
    _Bar,
    _cli_text,
    _Parser,
    _signals_raise,
    _stopped,
    _Terminated,
    _usage_error,
    _warnings_as_notes,
    reuse_from_image,
)
from tileup.errors import TileupError
from tileup.imageio import WRITE_FORMATS, check_output
from tileup.txt2img import MANAGED, GenerateSettings

_NUMBERED = re.compile(r"^(\d{5})-")


def build_generate_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tileup generate",
        usage="%(prog)s PROMPT --checkpoint MODEL [options]",
        description="Text to image at the model's native size, then A1111's hires fix: upscale "
        "and a second pass re-diffused in tileup's tiled modes (bounded memory at any size).",
    )
    gen = parser.add_argument_group("generation (first pass)")
    gen.add_argument("prompt", nargs="?", default=None, metavar="PROMPT", help="the prompt")
    gen.add_argument("--negative-prompt", default=None, metavar="TEXT")
    gen.add_argument(
        "--width",
        type=int,
        default=None,
        help="default: the model's native size (512 SD 1.x, 768 SD 2.x v-prediction, 1024 SDXL)",
    )
    gen.add_argument("--height", type=int, default=None, help="default: as --width")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (default: 20)")
    gen.add_argument("--sampler", default=None, help="default: Euler a; see 'tileup samplers'")
    gen.add_argument("--scheduler", default=None, help="default: automatic")
    gen.add_argument("--cfg", type=float, default=None, help="CFG scale (default: 7)")
    gen.add_argument("--seed", type=int, default=None, help="-1: random (default)")
    gen.add_argument("--batch-count", type=int, default=None, help="images, seeds seed+i")
    hr = parser.add_argument_group("hires fix (second pass)")
    hr.add_argument(
        "--hires-fix",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the second pass (default: on; --no-hires-fix: first pass only)",
    )
    hr.add_argument("--hr-scale", type=float, default=None, help="upscale by (default: 2)")
    hr.add_argument(
        "--hr-resize-x",
        type=int,
        default=None,
        metavar="W",
        help="resize width (0: use --hr-scale; one side alone keeps the aspect)",
    )
    hr.add_argument("--hr-resize-y", type=int, default=None, metavar="H", help="resize height")
    hr.add_argument(
        "--hr-upscaler",
        default=None,
        help="Latent (default), Latent (bicubic antialiased), …, lanczos, or an SR "
        "model name (see 'tileup models')",
    )
    hr.add_argument(
        "--hr-second-pass-steps",
        type=int,
        default=None,
        metavar="N",
        help="0: the first pass's steps (default)",
    )
    hr.add_argument(
        "--denoise", type=float, default=None, help="second pass denoising strength (default: 0.7)"
    )
    for name in ("sampler", "scheduler", "prompt", "negative-prompt"):
        hr.add_argument(f"--hr-{name}", default=None, help="default: the first pass's")
    hr.add_argument("--hr-cfg", type=float, default=None, help="default: the first pass's")
    hr.add_argument(
        "--hr-checkpoint",
        default=None,
        metavar="MODEL",
        help="another model for the second pass (default: --checkpoint)",
    )
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "-o",
        "--output",
        default=None,
        help="a file (one image) or a folder (default: here), NNNNN-SEED.png",
    )
    io.add_argument("--overwrite", action="store_true", help="replace an existing -o FILE")
    io.add_argument(
        "--save-first-pass",
        action="store_true",
        help="also write the first pass as <name>-first-pass.png",
    )
    io.add_argument(
        "--reuse-parameters",
        metavar="IMAGE",
        default=None,
        help="take prompt, seed, sampler, steps, CFG, size and hires settings from "
        "an image's A1111 parameters for every one not given here",
    )
    io.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    io.add_argument("--stats", action="store_true", help="print each image's stats as JSON")
    _add_settings_arguments(parser, skip=MANAGED)
    return parser


_GENERATE_FLAGS = (
    "prompt", "negative_prompt", "width", "height", "steps", "sampler", "scheduler", "cfg",
    "seed", "batch_count", "hires_fix", "hr_scale", "hr_resize_x", "hr_resize_y",
    "hr_upscaler", "hr_second_pass_steps", "denoise", "hr_sampler", "hr_scheduler",
    "hr_prompt", "hr_negative_prompt", "hr_cfg", "hr_checkpoint",
)  # fmt: skip


def generate_command(argv: Sequence[str]) -> int:
    from tileup.txt2img import Generator

    try:
        args = build_generate_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    values: dict[str, Any] = {
        k: v for k, v in vars(args).items() if k in _GENERATE_FLAGS and v is not None
    }
    upscale = {
        k: v for k, v in vars(args).items() if k not in _GENERATE_FLAGS and k in _upscale_names()
    }
    if "models_dirs" in upscale:
        upscale["models_dirs"] = tuple(upscale["models_dirs"])
    warning = None
    try:
        if args.reuse_parameters:
            warning = _reuse(values, args.reuse_parameters)
        if "prompt" not in values and not args.reuse_parameters:
            raise TileupError("generate needs a PROMPT (or --reuse-parameters IMAGE)")
        settings = GenerateSettings.from_mapping({**values, **upscale})
        target = _output(args.output, settings.batch_count, args.overwrite)
    except TileupError as exc:
        return _usage_error(_cli_text(exc))
    if warning:
        print(f"tileup: warning: {warning}", file=sys.stderr)
    progress = _Bar(disabled=args.quiet)
    written = 0
    try:
        with _signals_raise(), _warnings_as_notes(progress.write):
            generator = Generator(settings, progress)
            if not args.quiet:
                for note in generator.notes:
                    progress.write(f"tileup: {note}")
            progress.add_total(generator.planned_units())
            for image in generator:
                path = target.path_for(image.seed)
                image.final.save(path, overwrite=args.overwrite)
                if args.save_first_pass:
                    first = path.with_name(f"{path.stem}-first-pass{path.suffix}")
                    image.first_pass.save(first, overwrite=args.overwrite)
                written += 1
                if not args.quiet:
                    progress.write(f"seed {image.seed} -> {path}")
                if args.stats:
                    print(json.dumps(image.final.stats.as_dict()), flush=True)
    except TileupError as exc:
        progress.close()
        print(f"tileup: error: {_cli_text(exc)}", file=sys.stderr)
        return EXIT_FAILED if written else 2
    except (KeyboardInterrupt, _Terminated) as stop:
        return _stopped(progress, stop)
    progress.close()
    return EXIT_OK


def _upscale_names() -> set[str]:
    import dataclasses

    from tileup.settings import UpscaleSettings

    return {f.name for f in dataclasses.fields(UpscaleSettings)} - MANAGED


def _reuse(values: dict[str, Any], image: str) -> str | None:
    """Fill ``values`` from ``image``'s parameters for every generation setting not given (the
    image must exist: it is what the command reuses)."""
    from tileup.txt2img import settings_from_parameters

    if not Path(image).is_file():
        raise TileupError(f"--reuse-parameters: {image}: no such image file")
    return reuse_from_image(values, image, settings_from_parameters)


class _Target:
    """Where each image goes: one file, or numbered names in a folder."""

    def __init__(self, file: Path | None, folder: Path) -> None:
        self.file, self.folder = file, folder
        numbers = [
            int(m.group(1))
            for p in (folder.iterdir() if folder.is_dir() else ())
            if (m := _NUMBERED.match(p.name))
        ]
        self.next = max(numbers, default=-1) + 1

    def path_for(self, seed: int) -> Path:
        if self.file is not None:
            return self.file
        path = self.folder / f"{self.next:05d}-{seed}.png"
        self.next += 1
        return path


def _output(output: str | None, count: int, overwrite: bool) -> _Target:
    """The output target, checked before anything loads (TileupError with one line)."""
    if output is not None and Path(output).suffix.lower() in WRITE_FORMATS:
        if count > 1:
            raise TileupError("-o names one file; with --batch-count above 1 give a folder")
        file = Path(output)
        check_output(file, overwrite=overwrite)
        if not file.parent.is_dir():
            raise TileupError(f"{file}: output folder {file.parent} does not exist")
        return _Target(file, file.parent)
    folder = Path(output or ".")
    if folder.exists() and not folder.is_dir():
        raise TileupError(f"{folder}: not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return _Target(None, folder)

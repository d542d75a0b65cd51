"""Batches of files: inputs (files, folders, globs) → output paths → one outcome per input.

Each file is read, upscaled by one shared :class:`~tileup.pipeline.Upscaler` and written
atomically; a failure is recorded in that file's :class:`FileOutcome` and never stops the rest.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch

from tileup.choices import IMAGE_SUFFIXES
from tileup.errors import TileupError
from tileup.imageio import read_image, write_image
from tileup.pipeline import NoProgress, Progress, Upscaler
from tileup.result import Stats
from tileup.settings import SettingsError, UpscaleSettings

OUTPUT_SUFFIX = "_tileup"


@dataclass(frozen=True)
class FileOutcome:
    """One input's fate: the output written, or the one-line error."""

    source: Path
    output: Path | None = None
    error: str | None = None
    stats: Stats | None = None


def expand_inputs(
    inputs: Sequence[str], recursive: bool = False
) -> tuple[list[Path], list[FileOutcome]]:
    """Files, folders and globs → image files in order, plus failures for inputs that match none.

    Folders give their image files (sub-folders too with ``recursive``), skipping earlier
    tileup outputs (``*_tileup.*``).
    """
    files: list[Path] = []
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
            files.extend(found)
        elif path.exists():
            files.append(path)
        elif glob.has_magic(item):
            matched = sorted(
                Path(p) for p in glob.glob(os.path.expanduser(item), recursive=recursive)
            )
            matched = [p for p in matched if p.is_file()]
            if not matched:
                missing.append(FileOutcome(path, error=f"{item}: no file matches"))
            files.extend(matched)
        else:
            missing.append(FileOutcome(path, error=f"{item}: no such file or folder"))
    unique = list(dict.fromkeys(files))
    return unique, missing


def upscale_files(
    inputs: Sequence[str],
    settings: UpscaleSettings,
    *,
    output: str | None = None,
    overwrite: bool = False,
    recursive: bool = False,
    progress: Progress | None = None,
    on_outcome: Callable[[FileOutcome], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> list[FileOutcome]:
    """Upscale every input file and write each result atomically; one failure never stops the rest.

    ``output`` is a file (one input only) or a folder; default ``<stem>_tileup.png`` beside the
    input. Settings/model problems common to every file raise TileupError before any work.
    """
    files, outcomes = expand_inputs(inputs, recursive)
    if output is not None and len(files) > 1 and not _is_dir_like(output):
        raise SettingsError(f"-o {output}: several inputs need an output folder, not a file")
    for outcome in outcomes:
        _report(on_outcome, outcome)
    if not files:
        return outcomes
    progress = progress or NoProgress()
    engine = Upscaler(settings, progress)
    for note in engine.notes:
        if on_note is not None:
            on_note(note)
    pictures = _plan_progress(files, engine, progress, settings.max_pixels)
    for path in files:
        outcome = _process_file(path, engine, output, overwrite, pictures.get(path))
        outcomes.append(outcome)
        _report(on_outcome, outcome)
    return outcomes


def _plan_progress(
    files: list[Path], engine: Upscaler, progress: Progress, max_pixels: int
) -> dict[Path, int]:
    """Add every file's planned tiles to the progress total up front (header reads only)."""
    planned: dict[Path, int] = {}
    for path in files:
        try:
            with PIL.Image.open(path) as img:
                width, height = img.size
                has_alpha = "A" in img.getbands() or "transparency" in img.info
        except Exception:
            continue  # reported properly when the file is read
        if width * height <= max_pixels:
            try:
                planned[path] = engine.planned_tiles(height, width, has_alpha)
            except Exception:
                continue  # the same error is raised, and reported, when the file is processed
            progress.add_total(planned[path])
    return planned


def _process_file(
    path: Path, engine: Upscaler, output: str | None, overwrite: bool, planned: int | None
) -> FileOutcome:
    try:
        destination = output_path_for(path, output, OUTPUT_SUFFIX)
        if destination.exists() and not overwrite:
            raise TileupError(f"{destination}: already exists; pass --overwrite to replace it")
        picture = read_image(path, max_pixels=engine.settings.max_pixels)
        if planned is None:
            engine.progress.add_total(
                engine.planned_tiles(picture.height, picture.width, picture.alpha is not None)
            )
        result = engine(picture)
        written = write_image(
            destination,
            result.picture.rgb,
            alpha=result.picture.alpha,
            bit_depth=result.picture.bit_depth,
            icc_profile=result.picture.icc_profile,
            parameters=result.parameters,
            overwrite=overwrite,
        )
        return FileOutcome(path, output=written, stats=result.stats)
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


def _is_dir_like(output: str) -> bool:
    return output.endswith(("/", os.sep)) or Path(output).is_dir()


def _report(on_outcome: Callable[[FileOutcome], None] | None, outcome: FileOutcome) -> None:
    if on_outcome is not None:
        on_outcome(outcome)


def output_path_for(
    src: str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    suffix: str = "_tileup",
    ext: str = ".png",
) -> Path:
    """Where to write the result for ``src``: ``<src dir>/<stem><suffix><ext>`` when ``output``
    is None, ``<output>/<stem><suffix><ext>`` when it is an existing folder or ends with a path
    separator, otherwise ``output`` itself (``~`` expanded)."""
    src = Path(src)
    name = f"{src.stem}{suffix}{ext}"
    if output is None:
        return src.parent / name
    text = os.fspath(output)
    out = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or out.is_dir():
        return out / name
    return out

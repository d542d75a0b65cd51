"""Orchestration only: read → pixel upscale → (re-diffuse) → alpha back → write, in steps."""

from __future__ import annotations

import dataclasses
import glob
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import PIL.Image
import torch

from tileup import __version__
from tileup.errors import TileupError
from tileup.imageio import Picture, format_parameters, output_path_for, read_image, write_image
from tileup.seams.colorfix import color_fix
from tileup.settings import SettingsError, UpscaleSettings
from tileup.upscalers.models import load_sr_model
from tileup.upscalers.pixel import ModelRunner, count_pixel_tiles, upscale_pixels
from tileup.upscalers.registry import UpscalerSpec, resolve_upscaler
from tileup.upscalers.resample import resample
from tileup.upscalers.tiled import RunReport, auto_tile_size

if TYPE_CHECKING:
    from tileup.sampler.engine import DiffusionReport, Rediffuser
    from tileup.sampler.redraw import PassCounts

CHECKPOINT_ENV = "TILEUP_CHECKPOINT"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
OUTPUT_SUFFIX = "_tileup"


class Progress(Protocol):
    """Receives tile counts: ``add_total`` when work is planned, ``advance`` when done."""

    def add_total(self, count: int) -> None: ...

    def advance(self, count: int) -> None: ...


class _NoProgress:
    def add_total(self, count: int) -> None:
        pass

    def advance(self, count: int) -> None:
        pass


@dataclass(frozen=True)
class Stats:
    """What one image's job did.

    ``tiles`` counts the re-diffusion tiles when re-diffusion runs, otherwise the pixel model's
    tiles; ``pixel_tiles`` always counts the pixel model's tiles (all passes, alpha included).
    ``passes`` lists the per-region passes (redraw, seam fix) with their counts and seconds;
    ``seam_fix_jobs`` and ``seam_fix_tile_steps`` sum the seam-fix regions and their steps.
    """

    tiles: int
    pixel_tiles: int
    tile_steps: int
    steps_per_tile: int
    seconds: dict[str, float]
    peak_memory_bytes: int
    fallbacks: tuple[str, ...]
    device: str
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    passes: tuple[dict[str, Any], ...] = ()
    seam_fix_jobs: int = 0
    seam_fix_tile_steps: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (sizes as [width, height])."""
        data = dataclasses.asdict(self)
        data["fallbacks"] = list(self.fallbacks)
        data["input_size"] = list(self.input_size)
        data["output_size"] = list(self.output_size)
        data["passes"] = [dict(p) for p in self.passes]
        return data


@dataclass(frozen=True, eq=False)
class UpscaleResult:
    """The upscaled picture (float RGB in [0, 1], alpha, bit depth, ICC) and its stats."""

    picture: Picture
    stats: Stats
    parameters: str

    @property
    def image(self) -> PIL.Image.Image:
        """An 8-bit PIL image (RGBA when there is alpha)."""
        rgb = np.round(np.clip(self.picture.rgb, 0, 1) * 255).astype(np.uint8)
        if self.picture.alpha is None:
            return PIL.Image.fromarray(rgb, "RGB")
        alpha = np.round(np.clip(self.picture.alpha, 0, 1) * 255).astype(np.uint8)
        return PIL.Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


@dataclass
class _StageClock:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SettingsError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def target_size(height: int, width: int, settings: UpscaleSettings) -> tuple[int, int]:
    """Output (H, W): --width/--height exactly, one of them keeping the aspect, else × scale."""
    if settings.width and settings.height:
        return settings.height, settings.width
    if settings.width:
        return max(1, round(height * settings.width / width)), settings.width
    if settings.height:
        return settings.height, max(1, round(width * settings.height / height))
    return max(1, round(height * settings.scale)), max(1, round(width * settings.scale))


class Upscaler:
    """Loads what the settings name once, then upscales any number of pictures with it."""

    def __init__(self, settings: UpscaleSettings, progress: Progress | None = None) -> None:
        self.settings = settings
        self.progress: Progress = progress or _NoProgress()
        self.device = resolve_device(settings.device)
        self.spec: UpscalerSpec = resolve_upscaler(settings.upscaler, settings.models_dirs)
        self.load_fallbacks: list[str] = []
        self.notes: list[str] = []
        self.runner: ModelRunner | None = None
        checkpoint = settings.checkpoint or os.environ.get(CHECKPOINT_ENV) or None
        if self.spec.kind == "latent" and settings.mode == "redraw":
            raise SettingsError(
                f"--mode redraw redraws pixel tiles; the latent upscaler {self.spec.name} needs "
                "--mode fused (or pick a pixel upscaler)"
            )
        if self.spec.kind == "latent" and not checkpoint:
            raise SettingsError(
                f"--upscaler {self.spec.name} works on latents and needs --checkpoint"
            )
        if self.spec.kind == "model":
            assert self.spec.path is not None
            self.runner = self._place_model(self.spec.path)
        self.rediffuser: Rediffuser | None = None
        if checkpoint:
            from tileup.sampler.engine import Rediffuser  # diffusers loads only when needed

            self.rediffuser = Rediffuser(settings, checkpoint, self.device)
            if self.spec.kind == "latent" and settings.denoise < 0.5:
                self.notes.append(
                    f"hint: latent upscaling needs a higher --denoise (0.5-0.7) to remove the "
                    f"blur of interpolated latents; --denoise is {settings.denoise:g}"
                )
        else:
            ignored = "".join(f"; {flag} has no effect" for flag in _diffusion_only_flags(settings))
            self.notes.append(
                "no --checkpoint given: pixel upscale only (add --checkpoint MODEL.safetensors "
                f"or set ${CHECKPOINT_ENV} to re-diffuse the tiles){ignored}"
            )

    def _place_model(self, path: Path) -> ModelRunner:
        model = load_sr_model(path, name=self.spec.name)
        dtype = self._model_dtype(
            model.descriptor.supports_half, model.descriptor.supports_bfloat16
        )
        model.descriptor.to(device=self.device, dtype=dtype)
        tile = self.settings.model_tile
        if tile is None and not model.prefers_untiled:
            tile = auto_tile_size(model, self.device, dtype)
        return ModelRunner(model=model, device=self.device, dtype=dtype, tile=tile)

    def _model_dtype(self, supports_half: bool, supports_bf16: bool) -> torch.dtype:
        wanted = self.settings.dtype
        if wanted == "auto":
            if self.device.type != "cuda":
                return torch.float32
            return (
                torch.float16
                if supports_half
                else torch.bfloat16
                if supports_bf16
                else torch.float32
            )
        dtype = _DTYPES[wanted]
        allowed = {torch.float32: True, torch.float16: supports_half, torch.bfloat16: supports_bf16}
        if not allowed[dtype]:
            self.load_fallbacks.append(f"upscaler does not support {wanted}; using fp32")
            return torch.float32
        return dtype

    def planned_tiles(self, height: int, width: int, has_alpha: bool = False) -> int:
        """Progress units the job over an H×W input will take: pixel tiles + tile-steps."""
        target = target_size(height, width, self.settings)
        pixel = (
            0
            if self.spec.kind == "latent"
            else count_pixel_tiles((height, width), target, self.runner)
        )
        diffusion = 0
        if self.rediffuser is not None:
            settings = self.settings
            if settings.mode == "redraw" or settings.seam_fix != "none":
                from tileup.sampler.redraw import RedrawOptions, planned_tile_steps

                options = RedrawOptions.from_settings(settings)
                diffusion = planned_tile_steps(self.rediffuser, *target, options)
            else:
                diffusion = self.rediffuser.planned_tile_steps(*target)
        return pixel * (2 if has_alpha else 1) + diffusion

    def __call__(self, picture: Picture) -> UpscaleResult:
        """Upscale one picture. Raises TileupError for problems the user can fix."""
        settings, clock = self.settings, _StageClock()
        report = RunReport(fallbacks=list(self.load_fallbacks))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # 1. Plan the output size.
        height, width = picture.height, picture.width
        target = target_size(height, width, settings)
        if target[0] * target[1] > settings.max_pixels:
            raise TileupError(
                f"output {target[1]}x{target[0]} = {target[0] * target[1]} pixels exceeds the "
                f"limit of {settings.max_pixels}; raise it with --max-pixels"
            )
        diffusion = None
        if self.rediffuser is not None:
            from tileup.sampler.engine import DiffusionReport

            diffusion = DiffusionReport(seed=self._seed())
        # 2. Upscale: pixel (model passes + exact resize) or, for latent modes, in latent space.
        latents = None
        rgb: np.ndarray | None = None
        with clock.stage("pixel_upscale"):
            if self.spec.kind == "latent":
                assert self.rediffuser is not None and self.spec.mode is not None
                assert diffusion is not None
                latents = self.rediffuser.upscale_latents(
                    picture.rgb, target, self.spec.mode, diffusion.fallbacks
                )
            else:
                rgb = upscale_pixels(
                    picture.rgb,
                    target,
                    runner=self.runner,
                    resampler=self.spec.mode or "lanczos",
                    report=report,
                    on_tile=self._on_tile,
                )
        # 3. Re-diffusion: fused (tiled VAE encode, fused sampling, tiled decode) or per-tile
        #    redraw; then the seam-fix passes and the colour fix, when asked.
        passes: tuple[PassCounts, ...] = ()
        if self.rediffuser is not None and diffusion is not None:
            rgb, passes = self._rediffuse(picture, rgb, latents, target, diffusion, clock)
        assert rgb is not None
        # 4. Alpha, upscaled separately with the same upscaler.
        with clock.stage("alpha"):
            alpha = self._upscale_alpha(picture.alpha, target, report)
        # 5. Result, stats and metadata.
        out = dataclasses.replace(picture, rgb=np.ascontiguousarray(rgb), alpha=alpha)
        fallbacks = list(report.fallbacks) + (diffusion.fallbacks if diffusion else [])
        seam_passes = [p for p in passes if p.name != "redraw"]
        stats = Stats(
            tiles=diffusion.tiles if diffusion else report.tiles,
            pixel_tiles=report.tiles,
            tile_steps=diffusion.tile_steps if diffusion else 0,
            steps_per_tile=diffusion.steps_per_tile if diffusion else 0,
            seconds=clock.seconds,
            peak_memory_bytes=_peak_memory(self.device),
            fallbacks=tuple(fallbacks),
            device=str(self.device),
            input_size=(width, height),
            output_size=(target[1], target[0]),
            passes=tuple(p.as_dict() for p in passes),
            seam_fix_jobs=sum(p.regions for p in seam_passes),
            seam_fix_tile_steps=sum(p.tile_steps for p in seam_passes),
        )
        parameters = self.parameters(target, diffusion.seed if diffusion else None)
        return UpscaleResult(picture=out, stats=stats, parameters=parameters)

    def _rediffuse(
        self,
        picture: Picture,
        rgb: np.ndarray | None,
        latents: torch.Tensor | None,
        target: tuple[int, int],
        diffusion: DiffusionReport,
        clock: _StageClock,
    ) -> tuple[np.ndarray, tuple[PassCounts, ...]]:
        """Step 3: the re-diffusion of the upscaled canvas (``rgb``, or ``latents`` for a latent
        upscaler) in the settings' mode, then the seam fix and the colour fix."""
        from tileup.sampler.engine import pad_to
        from tileup.sampler.redraw import RedrawOptions, rediffuse_pixels

        settings, rediffuser = self.settings, self.rediffuser
        assert rediffuser is not None
        source = rgb
        if settings.mode == "fused":
            if latents is None:
                assert rgb is not None
                with clock.stage("vae_encode"):
                    canvas = pad_to(rgb, rediffuser.canvas_size(*target))
                    latents = rediffuser.encode(canvas, diffusion.fallbacks)
            with clock.stage("diffusion"):
                latents = rediffuser.sample(
                    latents, diffusion.seed, diffusion, on_tiles=self._on_tile
                )
            with clock.stage("vae_decode"):
                rgb = rediffuser.decode(latents, diffusion.fallbacks)[: target[0], : target[1]]
        passes: tuple[PassCounts, ...] = ()
        if settings.mode == "redraw" or settings.seam_fix != "none":
            assert rgb is not None
            rgb, passes = rediffuse_pixels(
                rediffuser,
                rgb,
                diffusion.seed,
                diffusion,
                RedrawOptions.from_settings(settings),
                on_tiles=self._on_tile,
            )
            for p in passes:
                stage = "redraw" if p.name == "redraw" else "seam_fix"
                clock.seconds[stage] = round(clock.seconds.get(stage, 0.0) + p.seconds, 4)
        if settings.color_fix != "none":
            with clock.stage("color_fix"):
                if source is None:  # latent upscale: compare with a resize of the source
                    source = resample(picture.rgb, target[0], target[1], "lanczos")
                rgb = color_fix(rgb, source, settings.color_fix)
        assert rgb is not None
        return rgb, passes

    def _seed(self) -> int:
        seed = self.settings.seed
        return seed if seed >= 0 else random.randrange(2**32)

    def _upscale_alpha(
        self, alpha: np.ndarray | None, target: tuple[int, int], report: RunReport
    ) -> np.ndarray | None:
        if alpha is None:
            return None
        if alpha.min() == alpha.max():
            return np.full(target, alpha.flat[0], dtype=np.float32)
        up = upscale_pixels(
            alpha[..., None],
            target,
            runner=self.runner,
            resampler=self.spec.mode or "lanczos",
            report=report,
            on_tile=self._on_tile,
        )
        return up[..., 0]

    def _on_tile(self, count: int) -> None:
        if count > 0:
            self.progress.advance(count)
        else:
            self.progress.add_total(-count)

    def parameters(self, target: tuple[int, int], seed: int | None = None) -> str:
        """The A1111-style ``parameters`` text for a result of size ``target`` (H, W).

        With re-diffusion: prompt and negative prompt lines, then A1111's keys in A1111's order
        (Steps, Sampler, Schedule type, CFG scale, Seed, Size, Denoising strength, Model hash),
        then tileup's own. Without: only the upscale settings.
        """
        settings = self.settings
        size = f"{target[1]}x{target[0]}"
        known = settings.metadata_items()
        items: dict[str, object] = {}
        if self.rediffuser is None:
            items["Size"] = size
            items.update({k: v for k, v in known.items() if k not in _DIFFUSION_KEYS})
        else:
            model = self.rediffuser.model
            for key in ("Steps", "Sampler", "Schedule type", "CFG scale"):
                items[key] = known[key]
            items["Seed"] = seed
            items["Size"] = size
            items["Denoising strength"] = known["Denoising strength"]
            items["Model hash"] = model.model_hash
            items["Model"] = model.name
            if model.vae_name:
                items["VAE"] = model.vae_name
            items.update({k: v for k, v in known.items() if k not in items})
        items["Upscaler"] = self.spec.name
        if self.runner is not None:
            items["Upscaler model"] = self.runner.model.architecture
        items["Version"] = f"tileup {__version__}"
        if self.rediffuser is None:
            return format_parameters(None, None, items)
        return format_parameters(settings.prompt, settings.negative_prompt, items)


_DIFFUSION_KEYS = frozenset(
    {
        "Steps",
        "Sampler",
        "Schedule type",
        "CFG scale",
        "Seed",
        "Denoising strength",
        "Color fix",
        "Tile mode",
        "Tile size",
        "Tile overlap",
        "Tile blend",
        "Tile order",
        "Tile padding",
        "Mask blur",
        "Seam fix",
        "Seam fix denoise",
        "Seam fix width",
        "Seam fix mask blur",
        "Seam fix padding",
    }
)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def upscale(
    image: str | os.PathLike[str] | PIL.Image.Image | np.ndarray,
    settings: UpscaleSettings | None = None,
    *,
    progress: Progress | None = None,
    **overrides: Any,
) -> UpscaleResult:
    """Upscale one image (path, PIL image or numpy array) and return it with its stats.

    Settings come from ``settings`` and/or keyword overrides named as in UpscaleSettings,
    e.g. ``upscale("photo.png", scale=4, upscaler="lanczos")``.
    """
    settings = _merge_settings(settings, overrides)
    picture = read_image(image, max_pixels=settings.max_pixels)
    return Upscaler(settings, progress)(picture)


def _merge_settings(settings: UpscaleSettings | None, overrides: dict[str, Any]) -> UpscaleSettings:
    if settings is None:
        return UpscaleSettings.from_mapping(overrides)
    return settings.replace(**overrides) if overrides else settings


# ---------------------------------------------------------------------------------------------
# Batches of files


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
    progress = progress or _NoProgress()
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


def _diffusion_only_flags(settings: UpscaleSettings) -> list[str]:
    """The re-diffusion options set away from their defaults (``--mode redraw``, …): without a
    checkpoint they do nothing, which the user should hear."""
    defaults = {f.name: f.default for f in dataclasses.fields(settings)}
    return [
        f"--{name.replace('_', '-')} {getattr(settings, name)}"
        for name in ("mode", "seam_fix", "color_fix")
        if getattr(settings, name) != defaults[name]
    ]


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

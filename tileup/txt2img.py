"""Text to image with A1111's hires fix: a first pass from noise at the model's native size,
an upscale (latent, resampler or SR model), and a second pass re-diffused in tileup's tiled
modes, so the result can reach 4K in bounded memory.

The meaning and defaults are A1111's: ``hr_scale`` 2, ``hr_resize_x``/``hr_resize_y``
overriding it (one alone keeps the aspect; both: the upscale covers that size and is cropped
to it, centred, before the second pass), ``hr_upscaler`` "Latent", ``denoise`` 0.7 for the
second pass, ``hr_second_pass_steps`` 0 = the first pass's steps, and the ``hr_*`` sampler,
schedule, prompts and CFG defaulting to the first pass's. ``hr_checkpoint`` swaps the model for
the second pass (A1111's refiner-style checkpoint swap). Steps are fixed: every pass runs
exactly its steps. Batch image ``i`` uses seed ``seed + i``, as A1111's batch count does.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tileup.choices import CHECKPOINT_ENV
from tileup.infotext import format_parameters, job_parameters, parse_parameters
from tileup.settings import SettingsError, UpscaleSettings

if TYPE_CHECKING:
    from tileup.modes.model import DiffusionModel
    from tileup.pipeline import Upscaler
    from tileup.progress import Observer, Progress
    from tileup.result import UpscaleResult

    EngineFactory = Callable[..., Upscaler]
    """Builds an engine as ``Upscaler(settings, progress, model=...)`` does."""

FAMILY_SIZES = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}
"""The native size of each model family (SD 2.x v-prediction models: 768)."""

MANAGED = frozenset(
    {
        "prompt", "negative_prompt", "width", "height", "steps", "sampler", "scheduler", "cfg",
        "seed", "denoise", "upscaler", "scale",
    }
)  # fmt: skip
"""UpscaleSettings fields that generation sets itself (from its own fields of those names, or
``hr_upscaler``/``hr_scale``); the others (tiles, mode, seam fix, device, ...) pass through."""


@dataclass(frozen=True)
class GenerateSettings:
    """One txt2img job (``batch_count`` images) with an optional hires fix.

    ``upscale`` carries everything else both passes use: ``checkpoint``, ``vae``, tiles, mode,
    seam fix, colour fix, device and memory; its :data:`MANAGED` fields are ignored.
    """

    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = 20
    sampler: str = "Euler a"
    scheduler: str = "automatic"
    cfg: float = 7.0
    seed: int = -1
    batch_count: int = 1
    hires_fix: bool = True
    hr_scale: float = 2.0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    denoise: float = 0.7
    hr_sampler: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None
    hr_cfg: float | None = None
    hr_checkpoint: str | None = None
    upscale: UpscaleSettings = field(default_factory=UpscaleSettings)

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (_not_int(value) or value < 64 or value % 8):
                raise SettingsError(f"--{name} must be a multiple of 8 of at least 64, got {value}")
        _check_int("steps", self.steps, 1)
        _check_int("batch-count", self.batch_count, 1)
        _check_int("seed", self.seed, -1)
        _check_int("hr-second-pass-steps", self.hr_second_pass_steps, 0)
        for name in ("hr_resize_x", "hr_resize_y"):
            value = getattr(self, name)
            _check_int(name.replace("_", "-"), value, 0)
            if 0 < value < 64:
                raise SettingsError(f"--{name.replace('_', '-')} must be 0 or at least 64")
        if not 1 <= self.hr_scale <= 16:
            raise SettingsError(f"--hr-scale must be in [1, 16], got {self.hr_scale}")
        if not 0 <= self.denoise <= 1:
            raise SettingsError(f"--denoise must be in [0, 1], got {self.denoise}")
        for name in ("cfg", "hr_cfg"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 100:
                raise SettingsError(f"--{name.replace('_', '-')} must be in [0, 100], got {value}")
        if not isinstance(self.upscale, UpscaleSettings):
            raise SettingsError("upscale must be an UpscaleSettings")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> GenerateSettings:
        """From flat keyword values: this class's fields, and any other UpscaleSettings field
        (``tile``, ``mode``, ``checkpoint``, ``device``, ...) into :attr:`upscale`."""
        own = {f.name for f in dataclasses.fields(cls)} - {"upscale"}
        upscale_fields = {f.name for f in dataclasses.fields(UpscaleSettings)} - MANAGED
        unknown = sorted(set(values) - own - upscale_fields)
        if unknown:
            known = ", ".join(sorted(own | upscale_fields))
            raise SettingsError(f"unknown setting(s) {', '.join(unknown)}; known: {known}")
        rest = {k: v for k, v in values.items() if k in upscale_fields}
        mine = {k: v for k, v in values.items() if k in own}
        return cls(**mine, upscale=UpscaleSettings.from_mapping(rest))

    def first_pass(self) -> UpscaleSettings:
        """The first pass's settings (its sampling and prompts; the model of ``upscale``)."""
        return self.upscale.replace(
            upscaler="lanczos", scale=1, width=None, height=None, denoise=1.0, seed=self.seed,
            steps=self.steps, sampler=self.sampler, scheduler=self.scheduler, cfg=self.cfg,
            prompt=self.prompt, negative_prompt=self.negative_prompt,
        )  # fmt: skip

    def second_pass(self) -> UpscaleSettings:
        """The hires pass's settings: ``hr_*`` where given, else the first pass's."""
        return self.upscale.replace(
            checkpoint=self.hr_checkpoint or self.upscale.checkpoint,
            upscaler=self.hr_upscaler,
            scale=self.hr_scale, width=None, height=None,
            denoise=self.denoise,
            steps=self.hr_second_pass_steps or self.steps,
            sampler=self.hr_sampler or self.sampler,
            scheduler=self.hr_scheduler or self.scheduler,
            cfg=self.cfg if self.hr_cfg is None else self.hr_cfg,
            prompt=self.hr_prompt or self.prompt,
            negative_prompt=self.hr_negative_prompt or self.negative_prompt,
            seed=self.seed,
        )  # fmt: skip


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _check_int(flag: str, value: object, low: int) -> None:
    if _not_int(value) or value < low:  # type: ignore[operator]
        raise SettingsError(f"--{flag} must be a whole number of at least {low}, got {value!r}")


def hires_size(
    height: int, width: int, settings: GenerateSettings
) -> tuple[tuple[int, int], tuple[int, int]]:
    """(upscaled H, W) and (final H, W) of the hires pass, as A1111: ``hr_scale`` times the
    first pass; one of ``hr_resize_x``/``_y`` keeps the aspect; both cover that size (the
    upscale is cropped to it, centred)."""
    rx, ry = settings.hr_resize_x, settings.hr_resize_y
    if rx == 0 and ry == 0:
        size = (int(height * settings.hr_scale), int(width * settings.hr_scale))
        return size, size
    if ry == 0:
        size = (round(height * rx / width), rx)
        return size, size
    if rx == 0:
        size = (ry, round(width * ry / height))
        return size, size
    cover = max(rx / width, ry / height)
    return (max(ry, round(height * cover)), max(rx, round(width * cover))), (ry, rx)


@dataclass(frozen=True)
class Generated:
    """One generated image: the ``final`` result (after the hires pass when enabled), the
    ``first_pass`` result, and the seed it used. Both carry the job's ``parameters``."""

    final: UpscaleResult
    first_pass: UpscaleResult
    seed: int


class Generator:
    """Loads the checkpoint (and the hires checkpoint) once, then generates any number of
    images. ``model`` and ``hr_model`` inject already loaded DiffusionModels (tests, a cache),
    as for Upscaler; ``make_engine`` builds the two passes' engines (default
    :class:`~tileup.pipeline.Upscaler`; the web UI's cache passes its own)."""

    def __init__(
        self,
        settings: GenerateSettings,
        progress: Progress | None = None,
        *,
        model: DiffusionModel | None = None,
        hr_model: DiffusionModel | None = None,
        make_engine: EngineFactory | None = None,
    ) -> None:
        import os

        from tileup.pipeline import Upscaler

        self.settings = s = settings
        if not (s.upscale.checkpoint or os.environ.get(CHECKPOINT_ENV) or model is not None):
            raise SettingsError(
                f"generate needs --checkpoint MODEL.safetensors (or ${CHECKPOINT_ENV})"
            )
        if s.hires_fix and s.upscale.mode == "redraw":
            from tileup.upscalers.registry import resolve_upscaler

            if resolve_upscaler(s.hr_upscaler, s.upscale.models_dirs).works_on_latents:
                raise SettingsError(
                    f"--mode redraw redraws pixel tiles; the hires upscaler {s.hr_upscaler!r} "
                    "works on latents: pick a pixel --hr-upscaler (lanczos, an SR model) or "
                    "--mode fused"
                )
        make = make_engine or Upscaler
        self.first = make(s.first_pass(), progress, model=model)
        assert self.first.model is not None
        self.second: Upscaler | None = None
        if s.hires_fix:
            shared = self.first.model if not s.hr_checkpoint and hr_model is None else hr_model
            self.second = make(s.second_pass(), self.first.progress, model=shared)
        self.notes = [*self.first.notes, *(self.second.notes if self.second else [])]

    def native_size(self) -> tuple[int, int]:
        """The first pass's (H, W): the settings', else the model family's native size."""
        model = self.first.model
        assert model is not None
        family = model.info.family
        if family == "sd2" and model.prediction_type == "v_prediction":
            family = "sd2-v"
        native = FAMILY_SIZES.get(family, 512)
        s = self.settings
        width = s.width or (native if s.height is None else s.height)
        height = s.height or (native if s.width is None else s.width)
        return height, width

    def seeds(self) -> list[int]:
        """The seeds of the batch: ``seed + i`` (a random base for seed -1)."""
        base = self.settings.seed if self.settings.seed >= 0 else random.randrange(2**32)
        return [(base + i) % 2**32 for i in range(self.settings.batch_count)]

    def planned_units(self) -> int:
        """Progress units (tile evaluations) of the whole batch."""
        from tileup.modes.fused import planned_tile_steps

        model = self.first.model
        assert model is not None
        height, width = self.native_size()
        options = _fused_options(self.first.settings)
        units = planned_tile_steps(model, height, width, 1.0, options)
        if self.second is not None:
            _, cropped = hires_size(height, width, self.settings)  # re-diffused at this size
            with self.second.using(height=cropped[0], width=cropped[1]):
                units += self.second.planned_tiles(height, width)
        return units * self.settings.batch_count

    def __iter__(self) -> Iterator[Generated]:
        """The batch's images, one at a time."""
        for seed in self.seeds():
            yield self.generate_one(seed)

    def generate_one(self, seed: int, observer: Observer | None = None) -> Generated:
        """One image with ``seed``: the first pass, then the hires pass when enabled.
        ``observer`` watches both passes and may cancel either (see Observer)."""
        from tileup import peaks
        from tileup.imageio import Picture
        from tileup.result import Stats, UpscaleResult

        s, first_model = self.settings, self.first.model
        assert first_model is not None
        height, width = self.native_size()
        with (
            self.first.using(seed=seed),  # the first pass's sampling and prompts on the model
            peaks.window(self.first.devices) as first_peak,
        ):
            latents, rgb, report, clock = self.first.txt2img(height, width, seed, observer=observer)
        picture = Picture(rgb=rgb, alpha=None, bit_depth=8)
        peak_allocated, peak_reserved = first_peak.so_far()
        stats = Stats(
            tiles=report.tiles, pixel_tiles=0, tile_steps=report.tile_steps,
            steps_per_tile=report.steps_per_tile, seconds=clock.seconds,
            peak_memory_bytes=peak_allocated, peak_reserved_bytes=peak_reserved,
            stage_peak_bytes=dict(clock.peak_bytes),
            fallbacks=tuple(report.fallbacks), device=str(self.first.device),
            input_size=(width, height), output_size=(width, height),
        )  # fmt: skip
        first = UpscaleResult(picture=picture, stats=stats, parameters="")
        final = first
        if self.second is not None:
            upscaled, cropped = hires_size(height, width, s)
            with self.second.using(height=upscaled[0], width=upscaled[1], seed=seed):
                final = self.second.from_latents(picture, latents, observer=observer, crop=cropped)
        parameters = self.parameters(seed, (height, width))
        return Generated(
            final=dataclasses.replace(final, parameters=parameters),
            first_pass=dataclasses.replace(first, parameters=parameters),
            seed=seed,
        )

    def parameters(self, seed: int, size: tuple[int, int]) -> str:
        """A1111's txt2img infotext: the first pass's settings and ``Size``, then the hires
        keys A1111 writes (Denoising strength, Hires upscale or resize, Hires steps, upscaler,
        and the hr_* overrides that differ) after Model/VAE, then tileup's tile settings (the
        same for both passes)."""
        s, model = self.settings, self.first.model
        assert model is not None
        first_text = job_parameters(
            self.first.settings, size=size, seed=seed, model=model.info, upscaler="None",
        )  # fmt: skip
        _, _, items = parse_parameters(first_text)
        for key in ("Denoising strength", "Upscaler", "Upscale by"):
            items.pop(key, None)
        hires: dict[str, object] = {}
        if self.second is not None:
            hires["Denoising strength"] = f"{s.denoise:g}"
            if s.hr_resize_x or s.hr_resize_y:
                final = hires_size(*size, s)[1]
                hires["Hires resize"] = f"{final[1]}x{final[0]}"
            else:
                hires["Hires upscale"] = f"{s.hr_scale:g}"
            if s.hr_second_pass_steps:
                hires["Hires steps"] = s.hr_second_pass_steps
            hires["Hires upscaler"] = s.hr_upscaler
            if s.hr_checkpoint:
                second_model = self.second.model
                hires["Hires checkpoint"] = second_model.info.name if second_model else None
            if s.hr_sampler and s.hr_sampler != s.sampler:
                hires["Hires sampler"] = s.hr_sampler
            if s.hr_scheduler and s.hr_scheduler != s.scheduler:
                hires["Hires schedule type"] = s.hr_scheduler
            if s.hr_prompt and s.hr_prompt != s.prompt:
                hires["Hires prompt"] = s.hr_prompt
            if s.hr_negative_prompt and s.hr_negative_prompt != s.negative_prompt:
                hires["Hires negative prompt"] = s.hr_negative_prompt
            if s.hr_cfg is not None and s.hr_cfg != s.cfg:
                hires["Hires CFG Scale"] = f"{s.hr_cfg:g}"
        version = items.pop("Version", None)
        keys = list(items)
        cut = max((keys.index(k) for k in ("Model", "VAE") if k in keys), default=-1) + 1
        ordered = dict(list(items.items())[:cut]) | hires | dict(list(items.items())[cut:])
        return format_parameters(s.prompt, s.negative_prompt, ordered | {"Version": version})


def _fused_options(settings: UpscaleSettings) -> Any:
    from tileup.options import fused_options

    return fused_options(settings)


def generate(
    prompt: str = "",
    *,
    progress: Progress | None = None,
    on_image: Callable[[Generated], None] | None = None,
    **settings: Any,
) -> list[Generated]:
    """Generate ``batch_count`` images for ``prompt`` (see :class:`GenerateSettings`; any
    UpscaleSettings field such as ``checkpoint``, ``tile``, ``mode``, ``device`` is accepted too)
    and return them; ``on_image`` sees each as it is made."""
    chosen = GenerateSettings.from_mapping({"prompt": prompt, **settings})
    generator = Generator(chosen, progress)
    made = []
    for image in generator:
        made.append(image)
        if on_image is not None:
            on_image(image)
    return made


_HIRES_REUSED: dict[str, tuple[str, type]] = {
    "Denoising strength": ("denoise", float),
    "Hires upscale": ("hr_scale", float),
    "Hires steps": ("hr_second_pass_steps", int),
    "Hires upscaler": ("hr_upscaler", str),
    "Hires sampler": ("hr_sampler", str),
    "Hires schedule type": ("hr_scheduler", str),
    "Hires prompt": ("hr_prompt", str),
    "Hires negative prompt": ("hr_negative_prompt", str),
    "Hires CFG Scale": ("hr_cfg", float),
}
"""A1111's hires-fix keys → GenerateSettings fields (``Hires resize`` and ``Size`` apart)."""


def settings_from_parameters(text: str) -> dict[str, object]:
    """GenerateSettings values from an image's A1111 ``parameters``: prompt, negative prompt,
    steps, sampler, schedule, CFG, seed, ``Size`` (width, height) and the hires-fix keys
    present. Raises ParametersWarning for a value of the wrong kind."""
    from tileup.infotext import ParametersWarning, reusable_settings

    values = reusable_settings(text)
    _, _, items = parse_parameters(text)
    sizes = {"Size": ("width", "height"), "Hires resize": ("hr_resize_x", "hr_resize_y")}
    for key, (x, y) in sizes.items():
        if key in items:
            match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", items[key])
            if match is None:
                raise ParametersWarning(f"{key}: {items[key]!r} is not WIDTHxHEIGHT")
            values[x], values[y] = int(match.group(1)), int(match.group(2))
    for key, (name, kind) in _HIRES_REUSED.items():
        if key in items:
            try:
                values[name] = kind(items[key])
            except ValueError:
                raise ParametersWarning(f"{key}: {items[key]!r} is not a number") from None
    if "hr_scale" in values or "hr_resize_x" in values:
        values["hires_fix"] = True
    return values

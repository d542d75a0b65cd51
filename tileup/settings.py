"""Every knob of tileup, validated once: the CLI, the Python API and the metadata derive from here.

Each field of :class:`UpscaleSettings` is declared with :func:`knob`: its CLI flag, help text,
metadata key, allowed values (``choices`` or :class:`Bounds`), whether it needs a checkpoint to
have any effect, and when it applies to a job at all. Validation, the ``--help`` text, the
metadata and the "has no effect" notes all read those declarations; nothing below the pipeline
imports this module (the pipeline turns settings into the small option objects of each stage).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tileup.choices import (
    BLENDS,
    COLOR_FIXES,
    DEFAULT_MAX_PIXELS,
    DTYPES,
    MODES,
    ORDERS,
    PREDICTIONS,
    SEAM_FIX_MODES,
    VAE_STATS,
)
from tileup.errors import TileupError

DEFAULT_UPSCALER = "default"


class SettingsError(TileupError, ValueError):
    """A setting has a value tileup cannot use; the message is one line for the user.

    Written with the command-line flags (``--scale must be ...``), kept as :attr:`cli_message`
    for the CLI; ``str()`` names the Python fields instead (``scale must be ...``)."""

    def __init__(self, message: str) -> None:
        super().__init__(_python_names(message))
        self.cli_message = message


def _python_names(message: str) -> str:
    """``message`` with each settings flag (``--models-dir``) replaced by its field name."""
    fields = {flag_of(f.name): f.name for f in dataclasses.fields(UpscaleSettings)}

    def name(match: re.Match[str]) -> str:
        flag = match.group(0)
        return fields.get(flag) or flag[2:].replace("-", "_")

    return re.sub(r"--[a-z0-9][a-z0-9-]*", name, message)


@dataclass(frozen=True)
class Bounds:
    """The numbers a field accepts: ``[low, high]`` (either end open, or absent), integers only,
    a multiple of ``multiple``. ``high`` may name another field (``"tile"``) whose value is the
    upper end. None as a value is always accepted (an unset optional field)."""

    low: float | None = None
    high: float | str | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    multiple: int = 1

    def describe(self, settings: UpscaleSettings) -> str:
        """What a value must be, e.g. "a multiple of 8 in [8, --tile 512]"."""
        low = "-∞" if self.low is None else _number(self.low)
        high = self._high_text(settings)
        interval = f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.high is None:
            interval = interval[:-1] + ")"
        if self.multiple > 1:
            return f"a multiple of {self.multiple} in {interval}"
        return f"an integer in {interval}" if self.integer else f"in {interval}"

    def _high_text(self, settings: UpscaleSettings) -> str:
        if self.high is None:
            return "∞"
        if isinstance(self.high, str):
            return f"{flag_of(self.high)} {getattr(settings, self.high)}"
        return _number(self.high)

    def accepts(self, value: Any, settings: UpscaleSettings) -> bool:
        if value is None:
            return True
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if self.multiple > 1 and value % self.multiple:
            return False
        high = getattr(settings, self.high) if isinstance(self.high, str) else self.high
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = high is None or (value < high if self.high_open else value <= high)
        return bool(above and below)


def _number(value: float) -> str:
    """``1``, ``0.5``, and large powers of two as ``2^63``."""
    if isinstance(value, int) and value >= 2**32 and value & (value - 1) == 0:
        return f"2^{value.bit_length() - 1}"
    return f"{value:g}"


def knob(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    meta: str | None = None,
    choices: tuple[str, ...] | None = None,
    bounds: Bounds | None = None,
    needs_checkpoint: bool = False,
    applies: Callable[[UpscaleSettings], bool] | None = None,
    metavar: str | None = None,
) -> Any:
    """A settings field with everything that derives from it.

    ``flag``: the CLI option (default ``--field-name``); ``meta``: the key in the image's
    ``parameters`` (none: not recorded); ``choices``/``bounds``: the values accepted;
    ``needs_checkpoint``: it does nothing without a Stable Diffusion checkpoint;
    ``applies(settings)``: whether it means anything for that job (metadata leaves it out
    otherwise, e.g. the overlap in redraw mode).
    """
    return field(
        default=default,
        metadata={
            "help": help,
            "flag": flag,
            "meta": meta,
            "choices": choices,
            "bounds": bounds,
            "needs_checkpoint": needs_checkpoint,
            "applies": applies,
            "metavar": metavar,
        },
    )


def flag_of(name: str) -> str:
    """The CLI flag of the field ``name``."""
    declared = _FIELDS[name].metadata.get("flag") if name in _FIELDS else None
    return declared or "--" + name.replace("_", "-")


def _fused(s: UpscaleSettings) -> bool:
    return s.mode == "fused"


def _redraw(s: UpscaleSettings) -> bool:
    return s.mode == "redraw"


def _estimated_vae_stats(s: UpscaleSettings) -> bool:
    """Only estimated statistics are recorded: parameters without the key read as exact, as
    every image's did before the setting existed."""
    return s.vae_stats != "exact"


def _seam_fix(s: UpscaleSettings) -> bool:
    return s.seam_fix != "none"


_INT_POS = Bounds(1, integer=True)
_UNIT = Bounds(0, 1)
_TILE_PX = Bounds(64, multiple=8, integer=True)


@dataclass(frozen=True)
class UpscaleSettings:
    """All settings of one job; construct with keywords. Invalid values raise SettingsError."""

    # -- pixel upscale ---------------------------------------------------------------------
    upscaler: str = knob(
        DEFAULT_UPSCALER,
        "SR model name or path, a resampler (lanczos, bicubic, bilinear, nearest, area), or a "
        "latent mode (latent, latent-bislerp, ...); 'default' is the built-in 4x model",
        meta="Upscaler",
        metavar="NAME",
    )
    models_dirs: tuple[str, ...] = knob(
        (),
        "extra folder to search for upscaler models (repeatable; A1111/ComfyUI layouts work)",
        flag="--models-dir",
        metavar="DIR",
    )
    scale: float = knob(
        2.0,
        "upscale factor (ignored when --width/--height is given)",
        meta="Upscale by",
        bounds=Bounds(0, 64, low_open=True),
    )
    width: int | None = knob(
        None, "target width in pixels (alone: keeps the aspect)", bounds=_INT_POS
    )
    height: int | None = knob(
        None, "target height in pixels (alone: keeps the aspect)", bounds=_INT_POS
    )
    model_tile: int | None = knob(
        None,
        "force the SR model's input tile size in pixels (default: from free memory)",
        bounds=Bounds(16, integer=True),
        metavar="N",
    )
    device: str = knob(
        "auto",
        "auto, cpu, cuda, cuda:N, a list such as cuda:0,cuda:1 (tiles and files split across "
        "the GPUs), or all (every CUDA device)",
        metavar="DEVICE",
    )
    vram: float | None = knob(
        None,
        "device memory budget in GiB that every stage plans inside (default: the device's free "
        "memory); a budget too small for the job is refused naming the smallest that works",
        bounds=Bounds(0.25, 4096),
        metavar="GB",
    )
    low_vram: bool = knob(
        False,
        "the smallest memory plan: the VAE one tile at a time with its activations on the "
        "host, the UNet streamed block by block; other stages batch up to that peak",
    )
    dtype: str = knob("auto", "compute precision", choices=DTYPES)
    max_pixels: int = knob(
        DEFAULT_MAX_PIXELS,
        "refuse inputs or outputs with more pixels than this",
        bounds=_INT_POS,
        metavar="N",
    )

    # -- re-diffusion ------------------------------------------------------------------------
    checkpoint: str | None = knob(
        None,
        "Stable Diffusion checkpoint (.safetensors/.ckpt or diffusers folder) to re-diffuse "
        "tiles with (default: $TILEUP_CHECKPOINT; none: pixel upscale only)",
        metavar="PATH",
    )
    vae: str | None = knob(
        None,
        "replace the checkpoint's VAE (file or diffusers folder)",
        needs_checkpoint=True,
        metavar="PATH",
    )
    prompt: str = knob("", "prompt for re-diffusion", needs_checkpoint=True)
    negative_prompt: str = knob("", "negative prompt", needs_checkpoint=True)
    cfg: float = knob(
        7.0,
        "classifier-free guidance scale",
        meta="CFG scale",
        bounds=Bounds(0, 100),
        needs_checkpoint=True,
    )
    steps: int = knob(
        20,
        "denoising steps actually run, whatever --denoise",
        meta="Steps",
        bounds=Bounds(1, 1000, integer=True),
        needs_checkpoint=True,
    )
    denoise: float = knob(
        0.3,
        "denoising strength in [0, 1]; 0 skips diffusion",
        meta="Denoising strength",
        bounds=_UNIT,
        needs_checkpoint=True,
    )
    seed: int = knob(
        -1,
        "noise seed (-1: random, recorded in the metadata)",
        meta="Seed",
        bounds=Bounds(-1, 2**63, high_open=True, integer=True),
        needs_checkpoint=True,
    )
    sampler: str = knob(
        "Euler a", "sampler (see 'tileup samplers')", meta="Sampler", needs_checkpoint=True
    )
    scheduler: str = knob(
        "automatic",
        "noise schedule: automatic (the sampler's A1111 default: karras for DPM++ 2M, ...), "
        "normal, karras, exponential, simple, ...",
        meta="Schedule type",
        needs_checkpoint=True,
    )
    prediction: str = knob(
        "auto",
        "model prediction type (auto detects)",
        choices=PREDICTIONS,
        needs_checkpoint=True,
    )
    mode: str = knob(
        "fused",
        "fused: all tiles blended every step (seamless); "
        "redraw: per-tile img2img (Ultimate SD Upscale)",
        choices=MODES,
        meta="Tile mode",
        needs_checkpoint=True,
    )
    tile: int = knob(
        512,
        "diffusion tile size in pixels (multiple of 8)",
        meta="Tile size",
        bounds=_TILE_PX,
        needs_checkpoint=True,
    )
    overlap: int = knob(
        64,
        "overlap between fused-mode diffusion tiles in pixels",
        meta="Tile overlap",
        bounds=Bounds(0, multiple=8, integer=True),
        needs_checkpoint=True,
        applies=_fused,
    )
    tile_batch: int | None = knob(
        None,
        "tiles per UNet batch (default: from free memory)",
        bounds=_INT_POS,
        needs_checkpoint=True,
        metavar="N",
    )
    blend: str = knob(
        "gaussian",
        "weight window for fused tiles",
        choices=BLENDS,
        meta="Tile blend",
        needs_checkpoint=True,
        applies=_fused,
    )
    compile: bool = knob(
        False,
        "compile the UNet, the crop VAE and (CUDA) the SR model's trunk with torch.compile (a "
        "one-time cost, reported apart and cached on disk, then faster steps)",
        needs_checkpoint=True,
    )
    cuda_graphs: bool = knob(
        True,
        "replay the UNet from CUDA graphs (CUDA, UNet on the device; compiled or not): the "
        "same kernels without launching each one, for small tile batches",
        needs_checkpoint=True,
    )
    vae_tile: int = knob(
        512, "tiled VAE tile size in pixels", bounds=_TILE_PX, needs_checkpoint=True, metavar="N"
    )
    vae_stats: str = knob(
        "exact",
        "tiled VAE GroupNorm statistics: exact (the whole image's: no colour shift between "
        "tiles) or estimated (from a copy of at most 1024 px a side, as A1111's Fast "
        "Encoder/Decoder: faster when the VAE's activations do not fit on the card)",
        choices=VAE_STATS,
        meta="VAE stats",
        needs_checkpoint=True,
        applies=_estimated_vae_stats,
    )

    # -- redraw mode and seam fix (Ultimate SD Upscale's knobs, same meaning) -----------------
    order: str = knob(
        "linear",
        "redraw order: linear (row by row) or chess (one colour of a chessboard, then the other)",
        choices=ORDERS,
        meta="Tile order",
        needs_checkpoint=True,
        applies=lambda s: _redraw(s) or _seam_fix(s),
    )
    padding: int = knob(
        32,
        "redraw: context pixels around each tile, locked while it is redrawn",
        meta="Tile padding",
        bounds=Bounds(0, "tile", integer=True),
        needs_checkpoint=True,
        applies=_redraw,
    )
    mask_blur: int = knob(
        8,
        "redraw: blur of the mask a tile is pasted back through",
        meta="Mask blur",
        bounds=Bounds(0, 64, integer=True),
        needs_checkpoint=True,
        applies=_redraw,
    )
    seam_fix: str = knob(
        "none",
        "re-diffuse the seams after the tiles: band (a strip on every seam), half-tile "
        "(tile-sized passes centred on the seams), half-tile+intersections (and on every corner)",
        choices=SEAM_FIX_MODES,
        meta="Seam fix",
        needs_checkpoint=True,
        applies=_seam_fix,
    )
    seam_denoise: float = knob(
        0.35,
        "seam fix denoising strength",
        meta="Seam fix denoise",
        bounds=_UNIT,
        needs_checkpoint=True,
        applies=_seam_fix,
    )
    seam_width: int = knob(
        64,
        "seam fix band width in pixels",
        meta="Seam fix width",
        bounds=Bounds(8, "tile", multiple=8, integer=True),
        needs_checkpoint=True,
        applies=lambda s: s.seam_fix == "band",
    )
    seam_mask_blur: int = knob(
        4,
        "seam fix mask blur",
        meta="Seam fix mask blur",
        bounds=Bounds(0, 64, integer=True),
        needs_checkpoint=True,
        applies=_seam_fix,
    )
    seam_padding: int = knob(
        16,
        "seam fix context pixels",
        meta="Seam fix padding",
        bounds=Bounds(0, "tile", integer=True),
        needs_checkpoint=True,
        applies=_seam_fix,
    )
    color_fix: str = knob(
        "none",
        "after re-diffusion, take the low frequencies (wavelet) or the channel mean/std (adain) "
        "from the pixel-upscaled source, so colours cannot shift",
        choices=COLOR_FIXES,
        meta="Color fix",
        needs_checkpoint=True,
    )

    def __post_init__(self) -> None:
        dirs: object = self.models_dirs
        if isinstance(dirs, (str, os.PathLike)):  # one folder, not its characters
            dirs = (dirs,)
        if not isinstance(dirs, (tuple, list)):
            raise SettingsError(f"models_dirs must be a folder or a tuple of folders, got {dirs!r}")
        object.__setattr__(self, "models_dirs", tuple(str(d) for d in dirs))
        if not self.upscaler or not self.upscaler.strip():
            raise SettingsError("--upscaler must not be empty")
        one = r"cuda(:\d+)?"
        if not re.fullmatch(rf"auto|all|cpu|mps|{one}(,{one})*", self.device):
            raise SettingsError(
                "--device must be auto, all, cpu, cuda, cuda:N or a list such as cuda:0,cuda:1; "
                f"got {self.device!r}"
            )
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata["choices"]
            bounds = f.metadata["bounds"]
            if choices and value not in choices:
                raise SettingsError(
                    f"{flag_of(f.name)} must be one of {', '.join(choices)}; got {value!r}"
                )
            if bounds and not bounds.accepts(value, self):
                raise SettingsError(
                    f"{flag_of(f.name)} must be {bounds.describe(self)}, got {value!r}"
                )
        # the one rule across fields: fused tiles overlap by less than a tile (redraw tiles do
        # not overlap at all: --padding gives them context, so --overlap is not used there)
        if self.mode == "fused" and self.overlap >= self.tile:
            raise SettingsError(
                f"--overlap must be a multiple of 8 in [0, --tile), got {self.overlap} "
                f"with --tile {self.tile}"
            )

    def replace(self, **changes: Any) -> UpscaleSettings:
        """A copy with some fields changed (validated again; unknown names refused)."""
        _refuse_unknown(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> UpscaleSettings:
        """Build from keyword values, refusing unknown names with the list of known ones."""
        _refuse_unknown(values)
        return cls(**values)

    def metadata_items(self, *, with_checkpoint: bool = True) -> dict[str, str]:
        """The settings that carry a metadata key and mean something for this job, as
        ``{key: text}`` in declaration order: set (not None), applying to the job (no overlap
        in redraw mode, no seam-fix knobs without a seam fix, ...) and, without a checkpoint,
        none of the re-diffusion settings."""
        items: dict[str, str] = {}
        for f in dataclasses.fields(self):
            key, value = f.metadata["meta"], getattr(self, f.name)
            if not key or value is None or not self.applies(f.name):
                continue
            if f.metadata["needs_checkpoint"] and not with_checkpoint:
                continue
            items[key] = _format_value(value)
        return items

    def applies(self, name: str) -> bool:
        """Whether the field ``name`` means anything for this job (its ``applies`` rule)."""
        rule = _FIELDS[name].metadata["applies"]
        return rule is None or bool(rule(self))

    def without_checkpoint_effect(self) -> list[str]:
        """``--flag value`` for every setting that needs a checkpoint and was set away from its
        default: without a checkpoint they do nothing, which the user should hear."""
        return [
            f"{flag_of(f.name)} {_format_value(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if f.metadata["needs_checkpoint"] and getattr(self, f.name) != f.default
        ]


def _refuse_unknown(values: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(UpscaleSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingsError(
            f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


_FIELDS: Mapping[str, dataclasses.Field[Any]] = {
    f.name: f for f in dataclasses.fields(UpscaleSettings)
}


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)

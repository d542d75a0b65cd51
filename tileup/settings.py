"""Every knob of tileup, validated once: the CLI, the Python API and the metadata derive from here.

Each field of :class:`UpscaleSettings` carries its CLI flag, help text and metadata key in the
dataclass field metadata, so adding a knob here adds it everywhere.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tileup.errors import TileupError
from tileup.seams.seamfix import SEAM_FIX_MODES, validate_redraw_settings
from tileup.tiler.geometry import ORDERS

DEFAULT_UPSCALER = "default"
DEFAULT_MAX_PIXELS = 16384 * 16384
DTYPES = ("auto", "fp32", "fp16", "bf16")
MODES = ("fused", "redraw")
BLENDS = ("gaussian", "cosine", "linear")
COLOR_FIXES = ("none", "wavelet", "adain")
PREDICTIONS = ("auto", "epsilon", "v_prediction")


class SettingsError(TileupError, ValueError):
    """A setting has a value tileup cannot use; the message is one line for the user."""


def knob(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    meta: str | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
) -> Any:
    """A settings field with its CLI flag (default ``--field-name``), help and metadata key."""
    return field(
        default=default,
        metadata={"help": help, "flag": flag, "meta": meta, "choices": choices, "metavar": metavar},
    )


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
        2.0, "upscale factor (ignored when --width/--height is given)", meta="Upscale by"
    )
    width: int | None = knob(None, "target width in pixels (alone: keeps the aspect)")
    height: int | None = knob(None, "target height in pixels (alone: keeps the aspect)")
    model_tile: int | None = knob(
        None,
        "force the SR model's input tile size in pixels (default: from free memory)",
        metavar="N",
    )
    device: str = knob("auto", "auto, cpu, cuda or cuda:N", metavar="DEVICE")
    dtype: str = knob("auto", "compute precision", choices=DTYPES)
    max_pixels: int = knob(
        DEFAULT_MAX_PIXELS, "refuse inputs or outputs with more pixels than this", metavar="N"
    )

    # -- re-diffusion ------------------------------------------------------------------------
    checkpoint: str | None = knob(
        None,
        "Stable Diffusion checkpoint (.safetensors/.ckpt or diffusers folder) to re-diffuse "
        "tiles with (default: $TILEUP_CHECKPOINT; none: pixel upscale only)",
        metavar="PATH",
    )
    vae: str | None = knob(
        None, "replace the checkpoint's VAE (file or diffusers folder)", metavar="PATH"
    )
    prompt: str = knob("", "prompt for re-diffusion")
    negative_prompt: str = knob("", "negative prompt")
    cfg: float = knob(7.0, "classifier-free guidance scale", meta="CFG scale")
    steps: int = knob(20, "denoising steps actually run, whatever --denoise", meta="Steps")
    denoise: float = knob(
        0.3, "denoising strength in [0, 1]; 0 skips diffusion", meta="Denoising strength"
    )
    seed: int = knob(-1, "noise seed (-1: random, recorded in the metadata)", meta="Seed")
    sampler: str = knob("Euler a", "sampler (see 'tileup samplers')", meta="Sampler")
    scheduler: str = knob(
        "normal", "noise schedule: normal, karras, exponential, simple, ...", meta="Schedule type"
    )
    prediction: str = knob("auto", "model prediction type (auto detects)", choices=PREDICTIONS)
    mode: str = knob(
        "fused",
        "fused: all tiles blended every step (seamless); "
        "redraw: per-tile img2img (Ultimate SD Upscale)",
        choices=MODES,
        meta="Tile mode",
    )
    tile: int = knob(512, "diffusion tile size in pixels (multiple of 8)", meta="Tile size")
    overlap: int = knob(
        64, "overlap between fused-mode diffusion tiles in pixels", meta="Tile overlap"
    )
    tile_batch: int | None = knob(
        None, "tiles per UNet batch (default: from free memory)", metavar="N"
    )
    blend: str = knob(
        "gaussian", "weight window for fused tiles", choices=BLENDS, meta="Tile blend"
    )
    vae_tile: int = knob(512, "tiled VAE tile size in pixels", metavar="N")

    # -- redraw mode and seam fix (Ultimate SD Upscale's knobs, same meaning) -----------------
    order: str = knob(
        "linear",
        "redraw order: linear (row by row) or chess (one colour of a chessboard, then the other)",
        choices=ORDERS,
        meta="Tile order",
    )
    padding: int = knob(
        32,
        "redraw: context pixels around each tile, locked while it is redrawn",
        meta="Tile padding",
    )
    mask_blur: int = knob(
        8, "redraw: blur of the mask a tile is pasted back through", meta="Mask blur"
    )
    seam_fix: str = knob(
        "none",
        "re-diffuse the seams after the tiles: band (a strip on every seam), half-tile "
        "(tile-sized passes centred on the seams), half-tile+intersections (and on every corner)",
        choices=SEAM_FIX_MODES,
        meta="Seam fix",
    )
    seam_denoise: float = knob(0.35, "seam fix denoising strength", meta="Seam fix denoise")
    seam_width: int = knob(64, "seam fix band width in pixels", meta="Seam fix width")
    seam_mask_blur: int = knob(4, "seam fix mask blur", meta="Seam fix mask blur")
    seam_padding: int = knob(16, "seam fix context pixels", meta="Seam fix padding")
    color_fix: str = knob(
        "none",
        "after re-diffusion, take the low frequencies (wavelet) or the channel mean/std (adain) "
        "from the pixel-upscaled source, so colours cannot shift",
        choices=COLOR_FIXES,
        meta="Color fix",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "models_dirs", tuple(str(d) for d in self.models_dirs))
        if not self.upscaler or not self.upscaler.strip():
            raise SettingsError("--upscaler must not be empty")
        if not (self.scale > 0) or self.scale > 64:
            raise SettingsError(f"--scale must be in (0, 64], got {self.scale}")
        for name in ("width", "height", "model_tile"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SettingsError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.model_tile is not None and self.model_tile < 16:
            raise SettingsError("--model-tile must be at least 16 pixels")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise SettingsError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _check_choice("dtype", self.dtype, DTYPES)
        if self.max_pixels < 1:
            raise SettingsError("--max-pixels must be positive")
        self._check_diffusion()

    def _check_diffusion(self) -> None:
        if not 0.0 <= self.denoise <= 1.0:
            raise SettingsError(f"--denoise must be in [0, 1], got {self.denoise}")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            raise SettingsError(f"--steps must be an integer in [1, 1000], got {self.steps}")
        if not 0.0 <= self.cfg <= 100.0:
            raise SettingsError(f"--cfg must be in [0, 100], got {self.cfg}")
        if self.seed < -1 or self.seed >= 2**63:
            raise SettingsError(f"--seed must be -1 (random) or in [0, 2^63), got {self.seed}")
        _check_choice("mode", self.mode, MODES)
        _check_choice("blend", self.blend, BLENDS)
        _check_choice("prediction", self.prediction, PREDICTIONS)
        _check_choice("color_fix", self.color_fix, COLOR_FIXES)
        if self.tile < 64 or self.tile % 8:
            raise SettingsError(f"--tile must be a multiple of 8 and at least 64, got {self.tile}")
        # redraw tiles do not overlap (--padding gives them context): --overlap is not used there
        too_wide = self.mode == "fused" and self.overlap >= self.tile
        if self.overlap < 0 or self.overlap % 8 or too_wide:
            raise SettingsError(
                f"--overlap must be a multiple of 8 in [0, --tile), got {self.overlap} "
                f"with --tile {self.tile}"
            )
        if self.tile_batch is not None and self.tile_batch < 1:
            raise SettingsError("--tile-batch must be a positive integer")
        if self.vae_tile < 64 or self.vae_tile % 8:
            raise SettingsError("--vae-tile must be a multiple of 8 and at least 64")
        try:
            validate_redraw_settings(
                tile=self.tile,
                order=self.order,
                padding=self.padding,
                mask_blur=self.mask_blur,
                seam_fix=self.seam_fix,
                seam_denoise=self.seam_denoise,
                seam_width=self.seam_width,
                seam_mask_blur=self.seam_mask_blur,
                seam_padding=self.seam_padding,
            )
        except ValueError as exc:
            raise SettingsError(str(exc)) from None

    def replace(self, **changes: Any) -> UpscaleSettings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> UpscaleSettings:
        """Build from keyword values, refusing unknown names with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingsError(
                f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def metadata_items(self) -> dict[str, str]:
        """The settings that carry a metadata key and mean something for this job (no overlap
        or blend in redraw mode, no padding or mask blur in fused mode, the order only where
        tiles or seams are redrawn, seam-fix knobs only with a seam fix, the width only for the
        band), as ``{key: text}`` in declaration order."""
        unused = self._unused_fields()
        items: dict[str, str] = {}
        for f in dataclasses.fields(self):
            key = f.metadata.get("meta")
            value = getattr(self, f.name)
            if key and value is not None and f.name not in unused:
                items[key] = _format_value(value)
        return items

    def _unused_fields(self) -> set[str]:
        unused = {"overlap", "blend"} if self.mode == "redraw" else {"padding", "mask_blur"}
        if self.seam_fix == "none":
            unused |= {"seam_fix", "seam_denoise", "seam_width", "seam_mask_blur", "seam_padding"}
            if self.mode == "fused":
                unused.add("order")
        elif self.seam_fix != "band":
            unused.add("seam_width")
        return unused


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        flag = "--" + name.replace("_", "-")
        raise SettingsError(f"{flag} must be one of {', '.join(choices)}; got {value!r}")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)

"""Settings → the small frozen option objects each stage takes (the one translation table).

The stages (``tileup.modes``, ``tileup.vae``, ...) never see :class:`UpscaleSettings`; the
pipeline calls these functions and hands the results down. Defaults live in the settings alone.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from tileup.settings import SettingsError, UpscaleSettings

if TYPE_CHECKING:
    import torch

    from tileup.modes.fused import FusedOptions
    from tileup.modes.model import DiffusionModel, LoadOptions, SamplingOptions
    from tileup.modes.redraw import RedrawOptions
    from tileup.upscalers.registry import UpscalerChoice
    from tileup.vae.runner import VaeOptions


def sampling_options(settings: UpscaleSettings) -> SamplingOptions:
    """The sampler, schedule, steps and guidance of the settings."""
    from tileup.modes.model import SamplingOptions

    s = settings
    return SamplingOptions(s.sampler, s.scheduler, s.steps, s.cfg)


def fused_options(settings: UpscaleSettings) -> FusedOptions:
    """The fused mode's tiles, overlap, blend and batch of the settings."""
    from tileup.modes.fused import FusedOptions

    s = settings
    return FusedOptions(s.tile, s.overlap, s.blend, s.tile_batch)


def redraw_options(settings: UpscaleSettings) -> RedrawOptions:
    """The redraw and seam-fix knobs of the settings."""
    from tileup.modes.redraw import RedrawOptions

    s = settings
    return RedrawOptions(
        tile=s.tile,
        order=s.order,
        padding=s.padding,
        mask_blur=s.mask_blur,
        seam_fix=s.seam_fix,
        seam_denoise=s.seam_denoise,
        seam_width=s.seam_width,
        seam_mask_blur=s.seam_mask_blur,
        seam_padding=s.seam_padding,
        tile_batch=s.tile_batch,
    )


def load_options(settings: UpscaleSettings) -> LoadOptions:
    """What loading the checkpoint needs: replacement VAE, prediction type, prompts."""
    from tileup.modes.model import LoadOptions

    s = settings
    return LoadOptions(
        s.vae,
        s.prediction,
        s.prompt,
        s.negative_prompt,
        compile=s.compile,
        dynamic_batch=s.mode == "redraw",  # waves of 1 to max_batch crops
        cuda_graphs=s.cuda_graphs,
    )


def vae_options(settings: UpscaleSettings, device: torch.device) -> VaeOptions:
    """The VAE's tile and statistics from the settings; its batch and activation store from the
    device."""
    from tileup.vae.runner import VaeOptions

    options = VaeOptions.for_device(device, settings.vae_tile)
    return dataclasses.replace(options, statistics=settings.vae_stats)


def target_size(height: int, width: int, settings: UpscaleSettings) -> tuple[int, int]:
    """Output (H, W): --width/--height exactly, one of them keeping the aspect, else × scale."""
    if settings.width and settings.height:
        return settings.height, settings.width
    if settings.width:
        return max(1, round(height * settings.width / width)), settings.width
    if settings.height:
        return settings.height, max(1, round(width * settings.height / height))
    return max(1, round(height * settings.scale)), max(1, round(width * settings.scale))


def merge_settings(
    settings: UpscaleSettings | None, overrides: dict[str, object]
) -> UpscaleSettings:
    """``settings`` with ``overrides`` applied (validated), or settings from the overrides."""
    if settings is None:
        return UpscaleSettings.from_mapping(overrides)
    return settings.replace(**overrides) if overrides else settings


RELOAD_FIELDS = frozenset(
    {
        "checkpoint", "vae", "prediction", "upscaler", "models_dirs", "model_tile", "device",
        "dtype", "vram", "low_vram", "compile", "cuda_graphs", "vae_tile", "vae_stats",
    }
)  # fmt: skip
"""Settings an engine loads or plans with once: they cannot change per call."""


def diffuses(settings: UpscaleSettings, upscaler: UpscalerChoice) -> bool:
    """Whether ``settings`` re-diffuse anything: a denoise above 0, a latent upscaler (its
    latents must be decoded), or a seam fix with a denoise of its own."""
    seam_fix = settings.seam_fix != "none" and settings.seam_denoise > 0
    return settings.denoise > 0 or upscaler.works_on_latents or seam_fix


def check_tiles(settings: UpscaleSettings, model: DiffusionModel) -> None:
    """SettingsError unless the tiles fit the model's VAE grid."""
    if settings.tile % model.factor or settings.overlap % model.factor:
        raise SettingsError(
            f"--tile and --overlap must be multiples of the VAE scale factor {model.factor}"
        )


def check_sampler(settings: UpscaleSettings) -> None:
    """SamplerError for an unknown sampler or schedule, or a combination that cannot run, before
    anything loads (and even without a checkpoint, where they would do nothing). The defaults
    are valid: checking them would import diffusers for pixel-only jobs."""
    defaults = UpscaleSettings()
    if (settings.sampler, settings.scheduler) != (defaults.sampler, defaults.scheduler):
        from tileup.sampling.schedules import resolve

        resolve(settings.sampler, settings.scheduler)

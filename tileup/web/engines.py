"""Engines for the server: models loaded once and kept, planning that never loads a checkpoint.

:class:`EngineCache` keeps the last loaded checkpoint (keyed by everything loading it depends on:
the file, the option objects :mod:`tileup.options` makes for loading, sampling and the VAE, the
precision and the device) and the last SR models. :meth:`EngineCache.engine` builds a fresh
:class:`~tileup.Upscaler` per job, so every check of its constructor runs as for the CLI, but
the loads go through the cache. :meth:`EngineCache.planner` builds one that never loads a
checkpoint: it holds the loaded model when it is the job's, otherwise a weightless stand-in
with the same VAE factor and step plan, which the pipeline's planning methods accept.
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from tileup.models.families import scheduler_config
from tileup.modes.model import DiffusionModel
from tileup.options import sampling_options
from tileup.pipeline import Upscaler
from tileup.settings import UpscaleSettings

if TYPE_CHECKING:
    from tileup.sampling.conditioning import Conditioning
    from tileup.sampling.protocols import UNet
    from tileup.upscalers.pixel import ModelRunner
    from tileup.upscalers.registry import ModelUpscaler
    from tileup.vae.runner import VaeRunner

SD_VAE_FACTOR = 8
"""The VAE scale factor of every supported family (SD 1.x, 2.x, SDXL)."""

_T = TypeVar("_T")


def model_key(settings: UpscaleSettings, checkpoint: str, device: torch.device) -> Hashable:
    """What a loaded checkpoint depends on: reload when any of it changes. Prompts and sampling
    options are not part of it: an engine runs a cached model with its own (they are encoded
    again when they differ)."""
    s = settings
    return (checkpoint, s.vae, s.prediction, s.compile, s.vae_tile, s.dtype, str(device))


class GeometryModel(DiffusionModel):
    """A weightless stand-in of a checkpoint for planning: its VAE factor (8 for every supported
    family) and its sampler's step plan, nothing else (no UNet, VAE or prompts)."""

    def add_replicas(self, devices: tuple[torch.device, ...]) -> None:
        """Nothing to copy."""


def geometry_model(settings: UpscaleSettings, device: torch.device) -> GeometryModel:
    """The planning stand-in for ``settings`` (SamplerError for a bad sampler or step count)."""
    prediction = "epsilon" if settings.prediction == "auto" else settings.prediction
    return GeometryModel(
        unet=cast("UNet", None),
        vae=cast("VaeRunner", SimpleNamespace(factor=SD_VAE_FACTOR)),
        conditioning=cast("Conditioning", None),
        sampling=sampling_options(settings),
        scheduler_config=scheduler_config(prediction),
        prediction_type=prediction,
        device=device,
        dtype=torch.float32,
    )


class _Lru:
    """A small least-recently-used map, thread-safe; a value is built outside the lock (two
    threads may build the same one: the last wins). ``clear_first`` frees the old entries
    before a new one is built (a second checkpoint must not sit beside the first on the
    device)."""

    def __init__(self, size: int, clear_first: bool) -> None:
        self.size, self.clear_first = size, clear_first
        self.items: OrderedDict[Hashable, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            return None

    def get_or_build(self, key: Hashable, build: Callable[[], _T]) -> _T:
        found = self.get(key)
        if found is not None:
            return cast(_T, found)
        if self.clear_first:
            with self.lock:
                self.items.clear()
            _free_memory()
        value = build()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class EngineCache:
    """Loaded checkpoints (the last one) and SR models (the last two), shared by every job.

    Thread-safe: planning (HTTP threads) and the job worker may ask at once; a checkpoint is
    only ever loaded by :meth:`engine` (the worker)."""

    def __init__(self, models: int = 1, runners: int = 2) -> None:
        self.models = _Lru(models, clear_first=True)
        self.runners = _Lru(runners, clear_first=False)

    def engine(self, settings: UpscaleSettings) -> Upscaler:
        """An engine for a job: checkpoint and SR model loaded (or taken from the cache)."""
        return _CachedUpscaler(settings, self, plan_only=False)

    def planner(self, settings: UpscaleSettings) -> Upscaler:
        """An engine for planning only: never loads a checkpoint (see the module doc). Raises
        what the constructor raises for the settings (SettingsError, UpscalerError, ...)."""
        return _CachedUpscaler(settings, self, plan_only=True)

    def loaded(self, key: Hashable) -> DiffusionModel | None:
        """The model loaded under ``key``, if it still is."""
        found = self.models.get(key)
        return found if isinstance(found, DiffusionModel) else None


class _CachedUpscaler(Upscaler):
    """An Upscaler whose loads go through an :class:`EngineCache`."""

    def __init__(self, settings: UpscaleSettings, cache: EngineCache, *, plan_only: bool) -> None:
        self._cache = cache
        self._plan_only = plan_only
        super().__init__(settings)

    def _place_sr_model(self, upscaler: ModelUpscaler) -> ModelRunner:
        s = self.settings
        key = (str(upscaler.path), s.dtype, str(self.device), s.model_tile)
        before = len(self.load_fallbacks)

        def build() -> tuple[ModelRunner, list[str]]:
            runner = Upscaler._place_sr_model(self, upscaler)
            return runner, self.load_fallbacks[before:]

        runner, notes = self._cache.runners.get_or_build(key, build)
        self.load_fallbacks[before:] = notes
        return runner

    def _load(self, checkpoint: str) -> DiffusionModel:
        key = model_key(self.settings, checkpoint, self.device)
        if self._plan_only:  # the loaded model only when its step plan is these settings'
            loaded = self._cache.loaded(key)
            if loaded is not None and loaded.sampling == sampling_options(self.settings):
                return loaded
            return geometry_model(self.settings, self.device)
        return self._cache.models.get_or_build(key, lambda: Upscaler._load(self, checkpoint))

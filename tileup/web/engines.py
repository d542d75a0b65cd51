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

import functools
import gc
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch

from tileup.devices import resolve_devices
from tileup.errors import TileupError
from tileup.models.families import LayoutError, scheduler_config
from tileup.modes.model import DiffusionModel, ModelInfo
from tileup.options import sampling_options
from tileup.pipeline import Upscaler
from tileup.settings import UpscaleSettings
from tileup.txt2img import GenerateSettings, Generator

if TYPE_CHECKING:
    from tileup.modes.model import SamplingOptions
    from tileup.progress import Progress
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
    return (
        checkpoint,
        s.vae,
        s.prediction,
        s.compile,
        s.cuda_graphs,
        s.vae_tile,
        s.vae_stats,
        s.dtype,
        str(device),
    )


class GeometryModel(DiffusionModel):
    """A weightless stand-in of a checkpoint for planning: its VAE factor (8 for every supported
    family) and its sampler's step plan, nothing else (no UNet, VAE or prompts)."""

    def add_replicas(self, devices: tuple[torch.device, ...]) -> None:
        """Nothing to copy."""

    @contextmanager
    def sampling_as(
        self, sampling: SamplingOptions, prompt: str, negative_prompt: str
    ) -> Iterator[None]:
        """Other sampling options for the duration (prompts mean nothing to a stand-in)."""
        saved, self.sampling = self.sampling, sampling
        try:
            self.step_plan(1.0)
            yield
        finally:
            self.sampling = saved


@functools.lru_cache(maxsize=32)
def _header_facts(path: str, mtime_ns: int) -> tuple[str, bool]:
    """(family, looks v-prediction) of a single-file checkpoint, from its header and one small
    tensor (nothing else is read)."""
    from tileup.models import families as fam
    from tileup.models.weights import open_tensors

    with open_tensors(Path(path)) as tensors:
        family = fam.detect_family(tensors.shapes.keys())
        v = fam.V_PRED_KEY in tensors.shapes or fam.looks_v_prediction(
            family, tensors.get(fam.SD2_V_PROBE_KEY)
        )
    return family.name, v


def checkpoint_facts(checkpoint: str | None, prediction: str) -> tuple[str, str]:
    """(family, prediction type) of a ``.safetensors`` checkpoint without loading it; ("",
    the setting or epsilon) for anything else or a file whose header cannot be read."""
    fallback = "epsilon" if prediction == "auto" else prediction
    path = Path(checkpoint) if checkpoint else None
    if path is None or not path.is_file() or path.suffix.lower() != ".safetensors":
        return "", fallback
    try:
        family, v = _header_facts(str(path), path.stat().st_mtime_ns)
    except (TileupError, LayoutError, OSError):
        return "", fallback
    if prediction != "auto":
        return family, prediction
    return family, "v_prediction" if v else "epsilon"


def geometry_model(
    settings: UpscaleSettings, device: torch.device, checkpoint: str | None = None
) -> GeometryModel:
    """The planning stand-in for ``settings`` (SamplerError for a bad sampler or step count);
    its family and prediction type come from ``checkpoint``'s header when given."""
    family, prediction = checkpoint_facts(checkpoint, settings.prediction)
    return GeometryModel(
        unet=cast("UNet", None),
        vae=cast("VaeRunner", SimpleNamespace(factor=SD_VAE_FACTOR)),
        conditioning=cast("Conditioning", None),
        sampling=sampling_options(settings),
        scheduler_config=scheduler_config(prediction),
        prediction_type=prediction,
        device=device,
        dtype=torch.float32,
        info=ModelInfo(family=family),
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

    def generator(self, settings: GenerateSettings, *, plan_only: bool = False) -> Generator:
        """A :class:`~tileup.txt2img.Generator` whose engines load through this cache.

        ``plan_only``: no checkpoint is loaded and a loaded one is never touched (planning
        switches a pass's sampling options on its model, which the worker may be running):
        geometry stand-ins, the family read from the checkpoint's header for the native size.
        A hires checkpoint and the first one are kept together as one entry (both must be on
        the device for the job anyway)."""

        def make(
            s: UpscaleSettings, progress: Progress | None = None, *, model: Any = None
        ) -> Upscaler:
            return _CachedUpscaler(
                s, self, plan_only=plan_only, progress=progress, model=model, stand_in=plan_only
            )

        if plan_only or not (settings.hires_fix and settings.hr_checkpoint):
            return Generator(settings, make_engine=make)
        first, second = settings.first_pass(), settings.second_pass()
        device = resolve_devices(first.device)[0]
        keys = tuple(model_key(s, str(s.checkpoint), device) for s in (first, second))

        def build() -> tuple[DiffusionModel, DiffusionModel]:
            one = _load_alone(first)
            return one, one if keys[0] == keys[1] else _load_alone(second)

        model, hr_model = self.models.get_or_build(keys, build)
        return Generator(settings, model=model, hr_model=hr_model, make_engine=make)

    def loaded(self, key: Hashable) -> DiffusionModel | None:
        """The model loaded under ``key``, if it still is."""
        found = self.models.get(key)
        return found if isinstance(found, DiffusionModel) else None


class _CachedUpscaler(Upscaler):
    """An Upscaler whose loads go through an :class:`EngineCache`; ``stand_in``: a planner
    that always plans on a geometry stand-in, never on the loaded model."""

    def __init__(
        self,
        settings: UpscaleSettings,
        cache: EngineCache,
        *,
        plan_only: bool,
        progress: Progress | None = None,
        model: DiffusionModel | None = None,
        stand_in: bool = False,
    ) -> None:
        self._cache = cache
        self._plan_only = plan_only
        self._stand_in = stand_in
        super().__init__(settings, progress, model=model)

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
            loaded = None if self._stand_in else self._cache.loaded(key)
            if loaded is not None and loaded.sampling == sampling_options(self.settings):
                return loaded
            return geometry_model(self.settings, self.device, checkpoint)
        return self._cache.models.get_or_build(key, lambda: Upscaler._load(self, checkpoint))


def _load_alone(settings: UpscaleSettings) -> DiffusionModel:
    """The checkpoint of ``settings`` loaded by a plain engine (no SR model, no cache)."""
    model = Upscaler(settings.replace(upscaler="lanczos", denoise=1.0, seam_fix="none")).model
    assert model is not None
    return model

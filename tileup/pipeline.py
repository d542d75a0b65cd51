"""Orchestration only: read → pixel upscale → (re-diffuse) → alpha back → result, in steps.

:class:`Upscaler` is the one engine. Built from :class:`~tileup.settings.UpscaleSettings`, it
loads what they name once (the upscaler, the checkpoint) and hands each stage the small frozen
option objects :mod:`tileup.options` makes of the settings: nothing below this module sees the
settings. Calling it runs one picture through the numbered steps of :meth:`Upscaler.__call__`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tileup import peaks
from tileup.choices import CHECKPOINT_ENV
from tileup.devices import (
    cuda_allocator_for,
    module_bytes,
    resolve_devices,
    sr_dtype,
)
from tileup.errors import TileupError
from tileup.imageio import Picture
from tileup.infotext import job_parameters
from tileup.inputs import ImageInput, as_picture
from tileup.memory import GIB, JobShape, MemoryPlan, ModelSizes, graphs_may_stay, plan_memory
from tileup.options import (
    RELOAD_FIELDS,
    check_sampler,
    check_tiles,
    diffuses,
    fused_options,
    load_options,
    merge_settings,
    redraw_options,
    sampling_options,
    target_size,
    vae_options,
)
from tileup.progress import Hooks, NoProgress, Observer, Progress, StageClock
from tileup.result import Stats, UpscaleResult
from tileup.settings import SettingsError, UpscaleSettings, flag_of
from tileup.upscalers.registry import (
    LatentUpscaler,
    ModelUpscaler,
    Resampler,
    UpscalerChoice,
    resolve_upscaler,
)

if TYPE_CHECKING:
    from tileup.batch import Outcomes
    from tileup.modes.model import DiffusionModel, DiffusionReport
    from tileup.modes.redraw import PassCounts, RedrawPass
    from tileup.tiler import TileGrid
    from tileup.upscalers.pixel import ModelRunner
    from tileup.upscalers.tiled import RunReport
    from tileup.vae.runner import VaeOptions


class Upscaler:
    """Loads what the settings name once, then upscales any number of pictures with it.

    ``model`` injects an already loaded :class:`~tileup.modes.model.DiffusionModel` (tests use
    it to run stand-in UNets and VAEs through the whole pipeline); by default the settings'
    checkpoint (or ``$TILEUP_CHECKPOINT``) is loaded.
    """

    def __init__(
        self,
        settings: UpscaleSettings,
        progress: Progress | None = None,
        *,
        model: DiffusionModel | None = None,
    ) -> None:
        self.settings = settings
        self.progress: Progress = progress or NoProgress()
        self.devices = resolve_devices(settings.device)
        self.device = self.devices[0]
        self.upscaler: UpscalerChoice = resolve_upscaler(settings.upscaler, settings.models_dirs)
        self.load_fallbacks: list[str] = []
        self.notes: list[str] = []
        self.allocator = ""
        self.budget = self._budget()
        check_sampler(settings)
        checkpoint = settings.checkpoint or os.environ.get(CHECKPOINT_ENV) or None
        latent = self.upscaler.works_on_latents
        if latent and settings.mode == "redraw":
            raise SettingsError(
                f"--mode redraw redraws pixel tiles; the latent upscaler {self.upscaler.name} "
                "needs --mode fused (or pick a pixel upscaler)"
            )
        if latent and not (checkpoint or model):
            raise SettingsError(
                f"--upscaler {self.upscaler.name} works on latents and needs --checkpoint"
            )
        self.runner = (
            self._place_sr_model(self.upscaler)
            if isinstance(self.upscaler, ModelUpscaler)
            else None
        )
        skipped = (checkpoint or model) and not self._diffuses()
        if skipped:  # nothing would be re-diffused: the checkpoint is not even loaded
            checkpoint, model = None, None
            self.notes.append(
                "--denoise 0: no re-diffusion, the checkpoint is not used (pixel upscale only)"
            )
        self.model = model if model is not None or not checkpoint else self._load(checkpoint)
        if self.model is not None and len(self.devices) > 1 and not self.model.replicas:
            self.model.add_replicas(self.devices[1:])
        if self.model is None and not skipped:
            ignored = "".join(
                f"; {flag} has no effect" for flag in settings.without_checkpoint_effect()
            )
            self.notes.append(
                "no --checkpoint given: pixel upscale only (add --checkpoint MODEL.safetensors "
                f"or set ${CHECKPOINT_ENV} to re-diffuse the tiles){ignored}"
            )
        elif latent and settings.denoise < 0.5:
            self.notes.append(
                f"hint: latent upscaling needs a higher --denoise (0.5-0.7) to remove the "
                f"blur of interpolated latents; --denoise is {settings.denoise:g}"
            )

    def upscale_files(self, inputs: Sequence[str], **options: Any) -> Outcomes:
        """:func:`tileup.batch.upscale_files` with this engine (its models are not loaded
        again); ``options`` are that function's (output, overwrite, recursive, ...)."""
        from tileup.batch import upscale_files

        return upscale_files(inputs, engine=self, **options)

    def _diffuses(self) -> bool:
        return diffuses(self.settings, self.upscaler)

    # -- several devices ------------------------------------------------------------------------

    def sr_replica(self, device: torch.device) -> ModelRunner | None:
        """The SR model's runner on ``device`` (a copy made on first use)."""
        if self.runner is None:
            return None
        cache: dict[torch.device, ModelRunner] = self.__dict__.setdefault("_sr_replicas", {})
        if device not in cache:
            m = copy.deepcopy(self.runner.model)
            m.descriptor.to(device=device)
            cache[device] = dataclasses.replace(
                self.runner, model=m, device=device, replicas=(), trunk=None
            )
        return cache[device]

    # -- loading ------------------------------------------------------------------------------

    def _budget(self) -> int | None:
        """Device bytes this engine's jobs plan inside: ``--vram``, else the free memory before
        anything is loaded (CUDA; the allocator set up for it, :func:`cuda_allocator_for`);
        None off CUDA (no plan: host memory is not planned)."""
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        vram = self.settings.vram
        budget = min(free, int(vram * GIB)) if vram else free
        self.allocator = cuda_allocator_for(budget)
        return budget

    def _place_sr_model(self, upscaler: ModelUpscaler) -> ModelRunner:
        from tileup.upscalers.models import load_sr_model
        from tileup.upscalers.pixel import ModelRunner, compiled_trunk
        from tileup.upscalers.tiled import auto_tile_size

        model = load_sr_model(upscaler.path, name=upscaler.name)
        dtype, note = sr_dtype(
            self.settings.dtype,
            self.device,
            supports_half=model.descriptor.supports_half,
            supports_bf16=model.descriptor.supports_bfloat16,
        )
        if note:
            self.load_fallbacks.append(note)
        model.place(self.device, dtype)
        tile = self.settings.model_tile
        if tile is None and not model.prefers_untiled:
            tile = auto_tile_size(model, self.device, dtype)
        compiled = self.settings.compile and self.device.type == "cuda"
        trunk = compiled_trunk(model) if compiled else None
        return ModelRunner(model=model, device=self.device, dtype=dtype, tile=tile, trunk=trunk)

    def _load(self, checkpoint: str) -> DiffusionModel:
        from tileup.devices import diffusion_dtype
        from tileup.modes.model import DiffusionModel

        s = self.settings
        model = DiffusionModel.load(
            checkpoint,
            device=self.device,
            dtype=diffusion_dtype(s.dtype, self.device),
            load=load_options(s),
            sampling=sampling_options(s),
            vae=vae_options(s, self.device),
        )
        check_tiles(s, model)
        return model

    def _job_grid(self, model: DiffusionModel, height: int, width: int) -> TileGrid | None:
        """The pixel-unit grid whose tiles are redrawn (mode "redraw") or whose seams the seam
        fix follows (the fused grid) over a ``height``×``width`` canvas; None without passes."""
        from tileup.modes.fused import fused_grid
        from tileup.modes.redraw import redraw_grid

        s = self.settings
        if s.mode == "redraw":
            return redraw_grid(height, width, s.tile, model.factor, s.order)
        if s.seam_fix != "none":
            return fused_grid(model.factor, height, width, fused_options(self.settings)).scaled(
                model.factor
            )
        return None

    def _passes(self, grid: TileGrid | None) -> tuple[RedrawPass, ...]:
        """The per-region passes over the job grid: the tile redraw, then the seam fix."""
        from tileup.modes.redraw import plan_passes

        if grid is None:
            return ()
        s = self.settings
        return plan_passes(grid, redraw_options(s), s.denoise, redraw_tiles=s.mode == "redraw")

    # -- planning -----------------------------------------------------------------------------

    def planned_tiles(self, height: int, width: int, has_alpha: bool = False) -> int:
        """Progress units the job over an H×W input will take: pixel tiles + tile-steps."""
        target = target_size(height, width, self.settings)
        pixel = 0
        if self.runner is not None:
            from tileup.upscalers.pixel import count_pixel_tiles

            pixel = count_pixel_tiles((height, width), target, self.runner)
        diffusion = 0
        if self.model is not None:
            from tileup.modes import fused, redraw

            model, s = self.model, self.settings
            if s.mode == "fused":
                diffusion = fused.planned_tile_steps(model, *target, s.denoise, fused_options(s))
            grid = self._job_grid(model, *model.canvas_size(*target))
            diffusion += redraw.planned_tile_steps(model, self._passes(grid))
        return pixel * (2 if has_alpha else 1) + diffusion

    # -- one picture --------------------------------------------------------------------------

    def __call__(
        self, image: ImageInput, *, observer: Observer | None = None, **overrides: Any
    ) -> UpscaleResult:
        """Upscale one image: a path, a PIL image, a numpy array (uint8, uint16 or float in
        [0, 1]; HxW or HxWxC), a torch tensor (CxHxW or 1xCxHxW, float in [0, 1], as spandrel
        takes) or a :class:`Picture`. Raises TileupError for problems the user can fix.

        ``overrides`` are settings for this call only (``engine(img, denoise=0.4, seed=7,
        prompt="...")``): any field except those that load something (:data:`RELOAD_FIELDS`),
        which raise SettingsError naming a new engine as the way. ``observer`` watches the job
        (stages, progress, tiles, previews) and may cancel it by raising
        :class:`~tileup.errors.Cancelled` (see :class:`Observer`)."""
        if not overrides:
            return self._run(image, observer=observer)
        with self.using(**overrides):
            return self._run(image, observer=observer)

    @contextmanager
    def using(self, **overrides: Any) -> Iterator[None]:
        """This engine with ``overrides`` applied to its settings (and its model's sampling
        options and prompts) for the duration: ``with engine.using(seed=3): engine(a);
        engine(b)``. The same rules as the overrides of :meth:`__call__`."""
        saved = self.settings
        settings = saved.replace(**overrides)
        reload = [f for f in sorted(RELOAD_FIELDS) if getattr(settings, f) != getattr(saved, f)]
        if reload:
            raise SettingsError(
                f"{', '.join(flag_of(f) for f in reload)} cannot change per call (the engine "
                "loads them once); build another Upscaler for them"
            )
        check_sampler(settings)
        if self.model is None and settings.checkpoint and diffuses(settings, self.upscaler):
            raise SettingsError(
                "this engine was built with nothing to re-diffuse (denoise 0), so its checkpoint "
                "is not loaded; build another Upscaler for a denoise above 0"
            )
        model = self.model if diffuses(settings, self.upscaler) else None
        self.settings = settings
        try:
            if model is None:
                with self._without_model():
                    yield
                return
            check_tiles(settings, model)
            options = sampling_options(settings)
            with model.sampling_as(options, settings.prompt, settings.negative_prompt):
                yield
        finally:
            self.settings = saved

    @contextmanager
    def _without_model(self) -> Iterator[None]:
        model, self.model = self.model, None
        try:
            yield
        finally:
            self.model = model

    def txt2img(
        self, height: int, width: int, seed: int, *, observer: Observer | None = None
    ) -> tuple[torch.Tensor, np.ndarray, DiffusionReport, StageClock]:
        """A first pass from pure noise (denoise 1) at ``height``×``width`` with this engine's
        model, sampling options and prompts, fused and tiled like any canvas (one tile at the
        model's native size). Returns the scaled latents, the decoded RGB, the report and the
        stage clock (seconds and, on CUDA, peak bytes per stage). ``observer`` sees the stages
        ``first_pass`` and ``vae_decode``, every model evaluation (advance, tiles, latent
        preview) and may cancel (see Observer)."""
        from tileup.modes.fused import sample_fused
        from tileup.modes.model import DiffusionReport

        model, clock = self.model, StageClock(settle=self._settle, devices=self.devices)
        if model is None:
            raise SettingsError("txt2img needs --checkpoint")
        report = DiffusionReport(seed=seed)
        plan = self._plan((height, width))
        canvas = model.canvas_size(height, width)
        f = model.factor
        zeros = torch.zeros(1, model.vae.latent_channels, canvas[0] // f, canvas[1] // f)
        options = fused_options(self.settings)
        if plan is not None and self.settings.tile_batch is None:
            options = dataclasses.replace(options, tile_batch=plan.unet_batch)
        hooks = None if observer is None else Hooks(observer, (height, width), f)
        with clock.stage("diffusion"):
            if hooks is not None:
                hooks.observer.stage("first_pass")
            self._place(plan, "unet")
            latents = sample_fused(
                model, zeros, seed=seed, denoise=1.0, options=options, report=report,
                on_tiles=self._on_tile if hooks is None else self._watched(hooks),
                on_batch=hooks.on_fused_batch if hooks is not None else None,
                on_step=hooks.on_latents if hooks is not None else None,
            )  # fmt: skip
        with clock.stage("vae_decode"):
            if hooks is not None:
                hooks.observer.stage("vae_decode")
            self._place(plan, "vae")
            rgb = model.vae.decode_canvas(latents, report.fallbacks, self._vae_options(plan))
        return latents, rgb[:height, :width], report, clock

    def from_latents(
        self,
        image: ImageInput,
        latents: torch.Tensor,
        *,
        observer: Observer | None = None,
        crop: tuple[int, int] | None = None,
        **overrides: Any,
    ) -> UpscaleResult:
        """:meth:`__call__` for an image whose scaled latents (1×C×h×w, this model's VAE) are
        already known, such as a generated first pass: a latent upscaler interpolates them
        instead of encoding the image again (no VAE round trip); other upscalers ignore them.
        ``crop`` (H, W): the upscale is cut to its centre at that size before re-diffusion, on
        the latent grid (A1111's hires fix with both resize sides). ``observer`` as for
        :meth:`__call__`."""
        if not overrides:
            return self._run(image, latents, observer, crop)
        with self.using(**overrides):
            return self._run(image, latents, observer, crop)

    def _run(
        self,
        image: ImageInput,
        latents: torch.Tensor | None = None,
        observer: Observer | None = None,
        crop: tuple[int, int] | None = None,
    ) -> UpscaleResult:
        with self._model_as_settings():
            return self._run_as_set(image, latents, observer, crop)

    def _model_as_settings(self) -> contextlib.AbstractContextManager[None]:
        """A loaded model shared by several engines (a cache, generate's two passes) runs with
        this engine's sampling options and prompts (encoded again only when they differ). An
        injected model without its text encoders keeps its own conditioning."""
        model, s = self.model, self.settings
        if model is None or model.prompts is None:
            return contextlib.nullcontext()
        options = sampling_options(s)
        if model.sampling == options and model.prompt_texts == (s.prompt, s.negative_prompt):
            return contextlib.nullcontext()
        return model.sampling_as(options, s.prompt, s.negative_prompt)

    def _run_as_set(
        self,
        image: ImageInput,
        latents: torch.Tensor | None,
        observer: Observer | None,
        crop: tuple[int, int] | None = None,
    ) -> UpscaleResult:
        from tileup.upscalers.tiled import RunReport

        with peaks.window(self.devices) as job_peak:
            picture = as_picture(image, self.settings.max_pixels)
            settings = self.settings
            clock = StageClock(observer=observer, settle=self._settle, devices=self.devices)
            report = RunReport(fallbacks=list(self.load_fallbacks))
            # 1. Plan the output size.
            height, width = picture.height, picture.width
            target = target_size(height, width, settings)
            if target[0] * target[1] > settings.max_pixels:
                raise TileupError(
                    f"output {target[1]}x{target[0]} = {target[0] * target[1]} pixels exceeds the "
                    f"limit of {settings.max_pixels}; raise it with --max-pixels"
                )
            diffusion = self._new_report()
            plan = self._plan(target)
            factor = self.model.factor if self.model is not None else 8
            hooks = None if observer is None else Hooks(observer, target, factor)
            self._place(plan, "vae")
            # 2. Upscale: pixel (model passes + exact resize) or, for latent modes, in latent space.
            source_latents, latents, rgb = latents, None, None
            with clock.stage("pixel_upscale"):
                if isinstance(self.upscaler, LatentUpscaler):
                    assert self.model is not None and diffusion is not None
                    latents = self._upscale_latents(
                        picture.rgb, target, diffusion.fallbacks, plan, source_latents
                    )
                else:
                    rgb = self._upscale_pixels(picture.rgb, target, report, plan, hooks)
            if crop is not None and crop != target:
                from tileup.upscalers.latent import centre_crop

                f = self.model.factor if self.model is not None else 1
                rgb, latents = centre_crop(rgb, latents, target, crop, f)
                target = crop
                hooks = dataclasses.replace(hooks, target=target) if hooks is not None else None
            # 3. Re-diffusion: fused (tiled VAE encode, fused sampling, tiled decode) or per-tile
            #    redraw; then the seam-fix passes and the colour fix, when asked.
            passes: tuple[PassCounts, ...] = ()
            if self.model is not None and diffusion is not None:
                rgb, passes = self._rediffuse(
                    picture, rgb, latents, target, diffusion, clock, plan, hooks
                )
            assert rgb is not None
            # 4. Alpha, upscaled separately with the same upscaler.
            with clock.stage("alpha"):
                alpha = self._upscale_alpha(picture.alpha, target, report, hooks)
            # 5. Result, stats and metadata.
            out = dataclasses.replace(
                picture, rgb=np.ascontiguousarray(rgb), alpha=alpha, parameters=None
            )
            fallbacks = list(report.fallbacks) + (diffusion.fallbacks if diffusion else [])
            seam_passes = [p for p in passes if p.name != "redraw"]
            peak_allocated, peak_reserved = job_peak.so_far()
            stats = Stats(
                tiles=diffusion.tiles if diffusion else report.tiles,
                pixel_tiles=report.tiles,
                tile_steps=diffusion.tile_steps if diffusion else 0,
                steps_per_tile=diffusion.steps_per_tile if diffusion else 0,
                seconds=clock.seconds,
                peak_memory_bytes=peak_allocated,
                peak_reserved_bytes=peak_reserved,
                stage_peak_bytes=dict(clock.peak_bytes),
                memory_plan={**plan.as_dict(), "cuda_allocator": self.allocator} if plan else {},
                fallbacks=tuple(fallbacks),
                device=",".join(str(d) for d in self.devices),
                input_size=(width, height),
                output_size=(target[1], target[0]),
                passes=tuple(p.as_dict() for p in passes),
                seam_fix_jobs=sum(p.regions for p in seam_passes),
                seam_fix_tile_steps=sum(p.tile_steps for p in seam_passes),
            )
            parameters = job_parameters(
                settings,
                source=picture.parameters,
                factor=target[1] / width,
                size=target,
                seed=diffusion.seed if diffusion else None,
                model=self.model.info if self.model is not None else None,
                upscaler=self.upscaler.name,
                upscaler_architecture=self.runner.model.architecture if self.runner else None,
            )
            return UpscaleResult(picture=out, stats=stats, parameters=parameters)

    # -- the memory plan ----------------------------------------------------------------------

    def _plan(self, target: tuple[int, int]) -> MemoryPlan | None:
        """The job's memory plan (CUDA with a checkpoint); MemoryBudgetError when even the
        smallest plan does not fit the budget."""
        if self.budget is None or self.model is None:
            return None
        from tileup.modes.fused import fused_grid
        from tileup.modes.regions import blur_radius

        s, model = self.settings, self.model
        unet, vae, block = model.weight_bytes()
        sr = 0 if self.runner is None else module_bytes(self.runner.model.descriptor.model)
        height, width = model.canvas_size(*target)
        grid = self._job_grid(model, height, width)
        fused = fused_grid(model.factor, height, width, fused_options(s))
        crop = s.tile + 2 * max(s.padding, blur_radius(s.mask_blur))
        shape = JobShape(
            canvas_height=height, canvas_width=width, tile=s.tile, guided=s.cfg != 1,
            vae_tile=s.vae_tile, tiles=len(fused) if s.mode == "fused" else len(grid or fused),
            vae_factor=model.factor, redraw=bool(self._passes(grid)), redraw_crop=crop,
        )  # fmt: skip
        sizes = ModelSizes(unet=unet, vae=vae, unet_block=block, sr=sr)
        return plan_memory(self.budget, sizes, shape, low_vram=s.low_vram)

    def _place(self, plan: MemoryPlan | None, stage: str) -> None:
        """Models where the plan wants them for ``stage`` ("vae": the SR model and the tiled
        VAE run; "unet": fused sampling; "redraw": per-region passes need both)."""
        if (model := self.model) is not None and stage == "vae" and not self._graphs_stay(plan):
            model.release_graphs()  # the UNet's CUDA graphs hold their activations' memory
        if plan is None or model is None:
            return
        unet_home = "streamed" if plan.offload_unet else "device"
        if stage == "vae":
            model.place_vae("device")
            if plan.swap_unet and not plan.offload_unet:
                model.place_unet("host")
        else:
            model.place_unet(unet_home)
            model.place_vae("host" if stage == "unet" and plan.swap_unet else "device")

    def _graphs_stay(self, plan: MemoryPlan | None) -> bool:
        """Whether the UNet's graphs may stay beside the VAE (:func:`graphs_may_stay`)."""
        if plan is None or self.device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        return graphs_may_stay(plan, torch.cuda.memory_reserved(self.device), free)

    def _vae_options(self, plan: MemoryPlan | None) -> VaeOptions | None:
        """The tiled VAE's options for a job (None: no model): the plan's batch, device store and
        attention buffers' place, and a lane of tile rows per other device (its replica's VAE)."""
        if self.model is None:
            return None
        lanes = tuple(r.vae for r in self.model.replicas) if len(self.devices) > 1 else ()
        options = dataclasses.replace(self.model.vae.options, lanes=lanes)
        if plan is None:
            return options
        return dataclasses.replace(
            options,
            batch=plan.vae_batch,
            store_bytes=plan.vae_store_bytes,
            attention_on_host=plan.vae_attention_on_host,
            scores_bytes=plan.vae_scores_bytes,
        )

    def _new_report(self) -> DiffusionReport | None:
        if self.model is None:
            return None
        from tileup.modes.model import DiffusionReport

        seed = self.settings.seed
        return DiffusionReport(seed=seed if seed >= 0 else random.randrange(2**32))

    def _upscale_pixels(
        self,
        image: np.ndarray,
        target: tuple[int, int],
        report: RunReport,
        plan: MemoryPlan | None = None,
        hooks: Hooks | None = None,
    ) -> np.ndarray:
        from tileup.upscalers.pixel import upscale_pixels
        from tileup.upscalers.tiled import auto_tile_size

        resampler = self.upscaler.mode if isinstance(self.upscaler, Resampler) else "lanczos"
        runner = self.runner
        planned = plan is not None and self.settings.model_tile is None
        if runner is not None and plan is not None and planned and runner.tile is not None:
            # the SR tile from the plan's SR budget
            tile = auto_tile_size(runner.model, self.device, runner.dtype, plan.sr_bytes)
            runner = dataclasses.replace(runner, tile=tile)
        if runner is not None and len(self.devices) > 1:  # every device takes cores
            others = tuple(self.sr_replica(d) for d in self.devices[1:])
            runner = dataclasses.replace(runner, replicas=tuple(filter(None, others)))
        return upscale_pixels(
            image,
            target,
            runner=runner,
            resampler=resampler,
            report=report,
            on_tile=self._on_tile if hooks is None else self._watched(hooks),
            on_core=hooks.on_core if hooks is not None else None,
        )

    def _upscale_latents(
        self,
        rgb: np.ndarray,
        target: tuple[int, int],
        notes: list[str],
        plan: MemoryPlan | None,
        source_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Step 2 for a latent upscaler: encode the source (unless its latents are given),
        interpolate to the target's canvas."""
        from tileup.upscalers.latent import interpolate_latents

        model = self.model
        assert model is not None and isinstance(self.upscaler, LatentUpscaler)
        f = model.factor
        if source_latents is not None:
            latents = source_latents
        else:
            padded = model.pad_canvas(rgb)
            latents = model.vae.encode_canvas(padded, notes, self._vae_options(plan))
        canvas = model.canvas_size(*target)
        return interpolate_latents(latents, canvas[0] // f, canvas[1] // f, self.upscaler.mode)

    def _rediffuse(
        self,
        picture: Picture,
        rgb: np.ndarray | None,
        latents: torch.Tensor | None,
        target: tuple[int, int],
        diffusion: DiffusionReport,
        clock: StageClock,
        plan: MemoryPlan | None,
        hooks: Hooks | None = None,
    ) -> tuple[np.ndarray, tuple[PassCounts, ...]]:
        """Step 3: the re-diffusion of the upscaled canvas (``rgb``, or ``latents`` for a latent
        upscaler) in the settings' mode, then the seam fix and the colour fix."""
        from tileup.modes import redraw
        from tileup.modes.fused import sample_fused

        s, model = self.settings, self.model
        assert model is not None
        source, vae_plan = rgb, self._vae_options(plan)
        on_tile = self._on_tile if hooks is None else self._watched(hooks)
        if s.mode == "fused":
            if latents is None:
                assert rgb is not None
                with clock.stage("vae_encode"):
                    canvas = model.pad_canvas(rgb)
                    latents = model.vae.encode_canvas(canvas, diffusion.fallbacks, vae_plan)
            options = fused_options(s)
            if plan is not None and s.tile_batch is None:
                options = dataclasses.replace(options, tile_batch=plan.unet_batch)
            with clock.stage("diffusion"):
                self._place(plan, "unet")
                latents = sample_fused(
                    model,
                    latents,
                    seed=diffusion.seed,
                    denoise=s.denoise,
                    options=options,
                    report=diffusion,
                    on_tiles=on_tile,
                    on_batch=hooks.on_fused_batch if hooks is not None else None,
                    on_step=hooks.on_latents if hooks is not None else None,
                )
            with clock.stage("vae_decode"):
                self._place(plan, "vae")
                rgb = model.vae.decode_canvas(latents, diffusion.fallbacks, vae_plan)
                rgb = rgb[: target[0], : target[1]]
        assert rgb is not None
        grid = self._job_grid(model, *model.canvas_size(*target))
        passes = self._passes(grid)
        counts: tuple[PassCounts, ...] = ()
        if grid is not None and passes:
            self._place(plan, "redraw")
            if plan is not None and s.tile_batch is None:
                batch = plan.redraw_batch
            else:
                batch = redraw.max_batch(model, grid, s.padding, s.tile_batch)
            canvas, counts = redraw.rediffuse_pixels(
                model,
                model.pad_canvas(rgb),
                passes,
                seed=diffusion.seed,
                max_batch=batch,
                report=diffusion,
                on_tiles=on_tile,
                on_regions=hooks.on_regions if hooks is not None else None,
                on_pasted=hooks.on_pasted if hooks is not None else None,
            )
            rgb = canvas[: target[0], : target[1]]
            if not self._graphs_stay(plan):
                model.release_graphs()  # their memory pool
            for p in counts:
                clock.add("redraw" if p.name == "redraw" else "seam_fix", p.seconds, p.peak_bytes)
        if s.color_fix != "none":
            from tileup.seams.colorfix import color_fix
            from tileup.upscalers.resample import resample

            with clock.stage("color_fix"):
                if source is None:  # latent upscale: compare with a resize of the source
                    source = resample(picture.rgb, target[0], target[1], "lanczos")
                rgb = color_fix(rgb, source, s.color_fix)
        return rgb, counts

    def _upscale_alpha(
        self,
        alpha: np.ndarray | None,
        target: tuple[int, int],
        report: RunReport,
        hooks: Hooks | None = None,
    ) -> np.ndarray | None:
        if alpha is None:
            return None
        if alpha.min() == alpha.max():
            return np.full(target, alpha.flat[0], dtype=np.float32)
        return self._upscale_pixels(alpha[..., None], target, report, hooks=hooks)[..., 0]

    def _settle(self) -> None:
        """Wait for this engine's CUDA devices (a stage's end: see :class:`StageClock`)."""
        for device in self.devices:
            if device.type == "cuda" and torch.cuda.is_initialized():
                torch.cuda.synchronize(device)

    def _on_tile(self, count: int) -> None:
        if count > 0:
            self.progress.advance(count)
        else:
            self.progress.add_total(-count)

    def _watched(self, hooks: Hooks) -> Callable[[int], None]:
        """:meth:`_on_tile` that also tells the observer."""

        def on_tile(count: int) -> None:
            self._on_tile(count)
            hooks.on_tile(count)

        return on_tile


def upscale(
    image: ImageInput,
    settings: UpscaleSettings | None = None,
    *,
    progress: Progress | None = None,
    **overrides: Any,
) -> UpscaleResult:
    """Upscale one image (anything :meth:`Upscaler.__call__` takes) with its stats. Settings
    come from ``settings`` and/or keyword overrides named as in UpscaleSettings, e.g.
    ``upscale("photo.png", scale=4, upscaler="lanczos")``."""
    settings = merge_settings(settings, overrides)
    picture = as_picture(image, settings.max_pixels)
    return Upscaler(settings, progress)(picture)

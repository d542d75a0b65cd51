"""Per-tile img2img with locked context (Ultimate SD Upscale's redraw) and the seam-fix passes.

:func:`redraw_regions` is the one primitive. For each region (a pixel box and its mask, see
:mod:`tileup.modes.regions`) it

1. crops the box grown by ``padding``, or by the reach of the mask blur when that is larger
   (rounded outward to the VAE factor f; at the canvas edge shifted inward keeping its size,
   see ``context_crop``) from the *current* canvas, so it sees every
   region redrawn before it, and VAE-encodes it (plain ``vae.encode``: posterior mean × scaling
   factor);
2. noises it with its crop of one canvas-wide noise drawn once per pass (CPU generator seeded
   ``seed + pass_index``) and samples exactly ``steps`` steps at the pass's denoise (fixed step
   scheduling: ``DiffusionModel.step_plan`` → ``noise_latents`` → ``run_sampler``);
3. locks the context after every model evaluation: latent cells where the region mask is 0
   everywhere are reset to the original crop latents noised to the level the sampler's latents
   are at now (``scheduler.add_noise`` for the next timestep; at the last evaluation the clean
   original), so only the region is redrawn and the context is bit-for-bit the original at the
   end;
4. decodes the crop and pastes it through the region mask blurred by ``mask_blur`` (Gaussian,
   σ = mask_blur, radius ``int(2.5σ + 0.5)``, canvas borders replicated), as A1111 pastes a
   masked crop: the blend reaches up to the radius beyond the box into the (locked, decoded)
   context and never beyond the crop; pixels where the blurred mask is 0 are not touched.

Batching without changing the result: regions run in the given order, except that a region
whose padded crop overlaps no crop of an earlier region still pending joins the earliest batch
("wave") after all regions it overlaps. Regions of one wave read and write disjoint crops, so
running them together equals running them one by one in order. A wave's regions of the same
crop size go through the VAE and the UNet together (CFG batched too), up to ``max_batch``.
Stochastic samplers draw their per-step noise from one generator per region (seeded by the
seed, the pass and the region's position), so batching never changes what a region gets.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from tileup import peaks
from tileup.devices import on_device, to_hwc, to_pinned_host
from tileup.modes.model import DiffusionModel, DiffusionReport
from tileup.modes.regions import Region, context_crop, crop_masks, seam_fix_passes, tile_regions
from tileup.progress import work_clock
from tileup.sampling.graphs import GraphedUNet
from tileup.sampling.guidance import GuidanceInputs, guidance_inputs, guided_prediction
from tileup.sampling.loop import StepPlan, add_noise_on_host, noise_latents, run_sampler
from tileup.sampling.protocols import Scheduler
from tileup.tiler import Box, TileGrid, plan_grid
from tileup.vae.tiled import NonFiniteError

Progress = Callable[[int], None]


@dataclass(frozen=True)
class RedrawOptions:
    """The redraw and seam-fix knobs (Ultimate SD Upscale's meaning), in pixels.

    ``tile`` is the redraw tile (mode "redraw"); ``tile_batch`` caps the regions per UNet batch
    (None: from free memory). Built from the settings by the pipeline, which holds the defaults.
    """

    tile: int
    order: str
    padding: int
    mask_blur: int
    seam_fix: str
    seam_denoise: float
    seam_width: int
    seam_mask_blur: int
    seam_padding: int
    tile_batch: int | None


@dataclass(frozen=True)
class RedrawPass:
    """One pass: regions in order, redrawn at ``denoise`` with ``padding`` and ``mask_blur``.

    ``index`` offsets the seed of the pass's noise (0: the main redraw, 1..: seam-fix passes).
    """

    name: str
    index: int
    regions: tuple[Region, ...]
    denoise: float
    padding: int
    mask_blur: int


@dataclass(frozen=True)
class PassCounts:
    """What one pass did: regions, UNet batches, steps each, region-steps, UNet forward calls.

    ``skipped`` is True for a pass with denoise 0 (nothing encoded, nothing changed);
    ``seconds`` its wall time and ``peak_bytes`` the peak allocated on its CUDA devices while it
    ran (filled by :func:`run_passes`, not compared; 0 off CUDA).
    """

    name: str
    regions: int
    batches: int
    steps: int
    tile_steps: int
    unet_calls: int
    denoise: float
    skipped: bool = False
    seconds: float = field(default=0.0, compare=False)
    peak_bytes: int = field(default=0, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def redraw_grid(height: int, width: int, tile: int, factor: int, order: str) -> TileGrid:
    """USDU's tiles over a pixel canvas: ``tile`` px, no overlap, edge tiles snapped inward."""
    return plan_grid(height, width, tile, 0, align=factor, order=order)


def plan_passes(
    grid: TileGrid, options: RedrawOptions, denoise: float, *, redraw_tiles: bool
) -> tuple[RedrawPass, ...]:
    """The passes of a job over a pixel-unit ``grid``: the tile redraw (``redraw_tiles``, index
    0, at ``denoise``) and the seam-fix passes on the grid's seams (indices 1, 2, ...). Passes at
    denoise 0 are kept (counted as skipped when run)."""
    passes = []
    if redraw_tiles:
        passes.append(
            RedrawPass("redraw", 0, tile_regions(grid), denoise, options.padding, options.mask_blur)
        )
    seams = seam_fix_passes(grid, options.seam_fix, options.seam_width, order=options.order)
    for i, seam in enumerate(seams, start=1):
        passes.append(
            RedrawPass(
                seam.name,
                i,
                seam.regions,
                options.seam_denoise,
                options.seam_padding,
                options.seam_mask_blur,
            )
        )
    return tuple(passes)


def batch_schedule(crops: Sequence[Box], max_batch: int) -> tuple[tuple[int, ...], ...]:
    """Batches (indices into ``crops``) that run the regions as if one by one, in order.

    ``max_batch`` 1: every region alone, in order. Otherwise region j goes in wave
    ``1 + max(wave(i))`` over earlier regions i whose crop overlaps its crop (0 if none), so a
    wave's crops are disjoint and each region runs after every earlier one it overlaps; waves
    run in turn, each split into batches of equal crop size (first-come order) of at most
    ``max_batch``.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    if max_batch == 1:
        return tuple((i,) for i in range(len(crops)))
    waves: list[int] = []
    for j, crop in enumerate(crops):
        before = [waves[i] for i in range(j) if crop.intersect(crops[i]) is not None]
        waves.append(1 + max(before) if before else 0)
    batches: list[tuple[int, ...]] = []
    for wave in sorted(set(waves)):
        groups: dict[tuple[int, int], list[int]] = {}
        for j, w in enumerate(waves):
            if w == wave:
                groups.setdefault((crops[j].height, crops[j].width), []).append(j)
        for members in groups.values():
            batches += [
                tuple(members[k : k + max_batch]) for k in range(0, len(members), max_batch)
            ]
    return tuple(batches)


def region_seed(seed: int, pass_index: int, position: int) -> int:
    """A 64-bit seed for the per-step noise of the region at ``position`` of a pass."""
    state = np.random.SeedSequence([seed, pass_index, position]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def pass_noise(shape: tuple[int, ...], seed: int, pass_index: int) -> torch.Tensor:
    """The canvas-wide latent noise of one pass (CPU float32, seeded ``seed + pass_index``)."""
    generator = torch.Generator("cpu").manual_seed(seed + pass_index)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def lock_target(
    scheduler: Scheduler, plan: StepPlan, i: int, original: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """``original`` at the noise level the sampler's latents have after evaluation ``i``.

    The clean original after the last evaluation; otherwise ``scheduler.add_noise`` for the
    next timestep (after a step the k-samplers read the level from their step index, DDIM-like
    ones from the timestep), through :func:`add_noise_on_host` (no host syncs). DPM2 between
    its two stages sits at an interpolated σ, read back from ``scale_model_input``
    (``x / sqrt(σ² + 1)``).
    """
    if i + 1 >= plan.evaluations:
        return original
    following = plan.timesteps[i + 1 : i + 2]
    if (
        hasattr(scheduler, "sigmas_interpol")  # DPM2 (both members probed, for the type checker)
        and hasattr(scheduler, "state_in_first_order")
        and not scheduler.state_in_first_order
    ):
        one = torch.ones((), dtype=torch.float64)
        scale = scheduler.scale_model_input(one, following[0]).double().cpu()
        sigma = float((1.0 / scale**2 - 1.0).clamp(min=0).sqrt())
        return original + sigma * noise
    return add_noise_on_host(scheduler, original, noise, following)


MIN_LANE_CROPS = 8
"""Fewest crops a device gets when a batch is split across several: below it one device runs
the batch. Measured on two H200s (2026-11-29): the reference redraw job, whose linear waves
hold at most 8 crops, took 35.7 s split 4 + 4 against 24.0 s on one GPU (each UNet call of a
few crops is bound by the host's kernel launches, and two lanes' threads share one
interpreter)."""

MIN_LANE_CROPS_GRAPHED = 2
"""The same with the UNet replayed from CUDA graphs (:mod:`tileup.sampling.graphs`): a call no
longer waits on the host's launches, so even small waves are worth splitting."""


def _min_lane_crops(model: DiffusionModel) -> int:
    """:data:`MIN_LANE_CROPS_GRAPHED` when the UNet runs from CUDA graphs, else
    :data:`MIN_LANE_CROPS`."""
    graphed = isinstance(model.unet, GraphedUNet) and model.unet.enabled
    return MIN_LANE_CROPS_GRAPHED if graphed else MIN_LANE_CROPS


def lane_count(crops: int, lanes: int, max_batch: int, min_lane_crops: int) -> int:
    """Lanes a batch of ``crops`` runs on: enough that none gets more than ``max_batch``, and
    more only while each still gets at least ``min_lane_crops``; at most ``lanes``."""
    needed = -(-crops // max_batch)
    wanted = crops // min_lane_crops
    return max(1, min(lanes, max(needed, wanted)))


# -- the primitive ---------------------------------------------------------------------------


@torch.no_grad()
def redraw_regions(
    model: DiffusionModel,
    canvas: torch.Tensor,
    regions: Sequence[Region],
    *,
    denoise: float,
    padding: int,
    mask_blur: float,
    seed: int,
    pass_index: int = 0,
    max_batch: int = 1,
    name: str = "redraw",
    fallbacks: list[str] | None = None,
    on_tiles: Progress | None = None,
    on_batch: Callable[[tuple[int, ...]], None] | None = None,
    min_lane_crops: int | None = None,
    on_pasted: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, PassCounts]:
    """Redraw ``regions`` of ``canvas`` (3×H×W float32 in [0, 1], H and W multiples of f) in
    order (see the module docstring); returns the new canvas (the input is left alone) and the
    pass's counts. ``denoise`` 0 returns the input itself: no encode, no decode.

    ``on_tiles(k)`` runs after each UNet evaluation of a batch of k regions; ``on_batch``
    receives each batch (region indices) before it runs; ``on_pasted`` the canvas after each
    batch is pasted (read only: a preview). The VAE's NaN/inf checks in bfloat16 and float32
    are read once at the end of the pass (:meth:`VaeRunner.check_finite`); NaN/inf in bfloat16
    runs the whole pass again with the VAE in float32 (noted), in float32 it is an error
    (float16 falls back call by call). With replicas (``model.lanes``) a
    batch holds up to ``max_batch`` regions per lane and is split across
    :func:`lane_count` lanes.
    """
    f = model.factor
    height, width = canvas.shape[-2:]
    if height % f or width % f:
        raise ValueError(f"canvas {height}x{width} must be a multiple of the VAE factor {f}")
    if padding < 0 or mask_blur < 0:
        raise ValueError(f"padding and mask blur must be non-negative: {padding}, {mask_blur}")
    scheduler, plan = model.step_plan(denoise)
    if plan.empty or not regions:
        return canvas, PassCounts(name, len(regions), 0, 0, 0, 0, float(denoise), skipped=True)
    notes = fallbacks if fallbacks is not None else []
    area = Box(0, 0, height, width)
    for region in regions:
        if not area.contains(region.box):
            raise ValueError(f"region {region.box} lies outside the canvas {height}x{width}")
    crops = [context_crop(r.box, padding, mask_blur, area, f) for r in regions]
    channels = model.vae.latent_channels
    lanes = model.lanes
    noise = pass_noise((channels, height // f, width // f), seed, pass_index)
    works = [
        _LaneWork(lane, lane.step_plan(denoise)[0] if k else scheduler, noise.to(lane.device))
        for k, lane in enumerate(lanes)
    ]
    source, canvas = canvas, canvas.clone()
    unet_calls = batches = 0
    queue = deque(batch_schedule(crops, max_batch * len(lanes)))
    pool = ThreadPoolExecutor(len(lanes), "tileup-lane") if len(lanes) > 1 else None
    counted = _locked(on_tiles) if pool is not None else on_tiles
    try:
        while queue:
            batch = queue.popleft()
            if on_batch is not None:
                on_batch(batch)
            job = _Batch(
                regions=[regions[j] for j in batch],
                crops=[crops[j] for j in batch],
                seeds=[region_seed(seed, pass_index, j) for j in batch],
            )
            try:
                least = min_lane_crops or _min_lane_crops(model)
                lanes_used = lane_count(len(batch), len(works), max_batch, least)
                run = works[:lanes_used]
                _redraw_batch(run, pool, canvas, job, plan, mask_blur, notes, counted)
            except torch.OutOfMemoryError:
                if len(batch) == 1:
                    raise
                for lane in lanes:
                    if lane.device.type == "cuda":
                        with on_device(lane.device):
                            torch.cuda.empty_cache()  # the canvas is pasted once a batch is done
                half = len(batch) // 2
                queue.extendleft((batch[half:], batch[:half]))
                notes.append(f"{name}: out of memory; batches of {half} regions")
                continue
            batches += 1
            unet_calls += plan.evaluations
            if on_pasted is not None:
                on_pasted(canvas)
    finally:
        if pool is not None:
            pool.shutdown()
    try:
        for lane in lanes:  # the VAE's NaN/inf flags of the whole pass: one host wait
            lane.vae.check_finite()
    except NonFiniteError:
        if not model.vae.fall_back(notes):
            raise
        for replica in lanes[1:]:
            replica.vae.fall_back([])
        return redraw_regions(
            model,
            source,
            regions,
            denoise=denoise,
            padding=padding,
            mask_blur=mask_blur,
            seed=seed,
            pass_index=pass_index,
            max_batch=max_batch,
            name=name,
            fallbacks=notes,
            on_tiles=on_tiles,
            on_batch=on_batch,
            min_lane_crops=min_lane_crops,
            on_pasted=on_pasted,
        )
    counts = PassCounts(
        name,
        len(regions),
        batches,
        plan.steps,
        len(regions) * plan.steps,
        unet_calls,
        float(denoise),
    )
    return canvas, counts


@dataclass(frozen=True)
class _Batch:
    """Regions redrawn together: their crops and per-step noise seeds."""

    regions: list[Region]
    crops: list[Box]
    seeds: list[int]

    def split(self, parts: int) -> list[_Batch]:
        """Up to ``parts`` non-empty runs of consecutive regions, as even as can be."""
        count = min(parts, len(self.regions))
        base, extra = divmod(len(self.regions), count)
        runs, start = [], 0
        for k in range(count):
            end = start + base + (1 if k < extra else 0)
            runs.append(
                _Batch(self.regions[start:end], self.crops[start:end], self.seeds[start:end])
            )
            start = end
        return runs


@dataclass(frozen=True, eq=False)
class _LaneWork:
    """A device's model (the primary or a replica), its own scheduler (schedulers keep step
    state) and the pass noise on its device."""

    model: DiffusionModel
    scheduler: Scheduler
    noise: torch.Tensor


def _locked(progress: Progress | None) -> Progress | None:
    """``progress`` called under a lock (lanes report from their threads)."""
    if progress is None:
        return None
    lock = threading.Lock()

    def report(count: int) -> None:
        with lock:
            progress(count)

    return report


def _redraw_batch(
    works: Sequence[_LaneWork],
    pool: ThreadPoolExecutor | None,
    canvas: torch.Tensor,
    job: _Batch,
    plan: StepPlan,
    mask_blur: float,
    notes: list[str],
    on_tiles: Progress | None,
) -> None:
    """Redraw one batch, split across the lanes (their crops are disjoint), then paste each
    part's regions in place, in order, once every part is done."""
    parts = job.split(len(works))
    if pool is None or len(parts) == 1:
        results = [_redraw_crops(works[0], canvas, parts[0], plan, mask_blur, notes, on_tiles)]
    else:
        futures = [
            pool.submit(_redraw_crops, work, canvas, part, plan, mask_blur, notes, on_tiles)
            for work, part in zip(works, parts, strict=False)
        ]
        results = [future.result() for future in futures]
    for part, (redrawn, pastes) in zip(parts, results, strict=True):
        for k, c in enumerate(part.crops):
            ys, xs = c.slices
            paste = pastes[k].to(canvas.device)
            view = canvas[:, ys, xs]
            blended = view * (1 - paste) + redrawn[k] * paste
            canvas[:, ys, xs] = torch.where(paste > 0, blended, view)


def _redraw_crops(
    work: _LaneWork,
    canvas: torch.Tensor,
    job: _Batch,
    plan: StepPlan,
    mask_blur: float,
    notes: list[str],
    on_tiles: Progress | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Encode, sample with the context locked and decode one batch on a lane's device; the
    redrawn crops (on the canvas's device) and their paste masks."""
    model, scheduler = work.model, work.scheduler
    with torch.no_grad(), on_device(model.device):  # grad mode is per thread
        f = model.factor
        height, width = canvas.shape[-2:]
        area = Box(0, 0, height, width)
        masks = [
            crop_masks(r, c, area, mask_blur, f, device=model.device)
            for r, c in zip(job.regions, job.crops, strict=True)
        ]
        free = torch.stack([m[1] for m in masks])[:, None]
        pixels = torch.stack([canvas[:, ys, xs] for ys, xs in (c.slices for c in job.crops)])
        original = model.vae.encode_crops(pixels.to(model.device), notes)
        latent_boxes = [c.scaled(Fraction(1, f)) for c in job.crops]
        crop_noise = torch.stack(
            [work.noise[:, ys, xs] for ys, xs in (c.slices for c in latent_boxes)]
        )
        unet_param = next(model.unet.parameters())
        time_ids = torch.tensor(
            [[height, width, c.top, c.left, c.height, c.width] for c in job.crops]
        )
        built: dict[int, GuidanceInputs] = {}  # per conditioning of the prompt schedule
        calls = 0

        def inputs_now() -> GuidanceInputs:
            step = calls * plan.steps // max(plan.evaluations, 1)
            conditioning = model.conditioning_at(step)
            if id(conditioning) not in built:
                built[id(conditioning)] = guidance_inputs(
                    conditioning,
                    model.sampling.cfg,
                    len(job.crops),
                    time_ids=time_ids,
                    device=unet_param.device,
                    dtype=unet_param.dtype,
                )
            return built[id(conditioning)]

        generator: list[torch.Generator] | None = None  # diffusers takes one per sample
        if hasattr(scheduler, "noise_sampler_seed"):  # a Brownian tree per sample
            scheduler.noise_sampler_seed = list(job.seeds)
        else:  # diffusers draws each sample's step noise from its own generator
            generator = [torch.Generator("cpu").manual_seed(s) for s in job.seeds]

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            cfg = model.sampling.cfg
            out = guided_prediction(model.unet, x.to(unet_param.dtype), t, inputs_now(), cfg)
            calls += 1
            if on_tiles is not None:
                on_tiles(len(job.crops))
            return out

        def lock(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
            target = lock_target(scheduler, plan, i, original, crop_noise)
            return torch.where(free, latents, target)

        start = noise_latents(scheduler, plan, original, crop_noise)
        sampled = run_sampler(scheduler, plan, start, predict, generator=generator, on_step=lock)
        redrawn = model.vae.decode_crops(sampled, notes).to(canvas.device)
        return redrawn, [m[0] for m in masks]


def run_passes(
    model: DiffusionModel,
    canvas: torch.Tensor,
    passes: Sequence[RedrawPass],
    *,
    seed: int,
    max_batch: int = 1,
    fallbacks: list[str] | None = None,
    on_tiles: Progress | None = None,
    on_regions: Callable[[str, tuple[Box, ...]], None] | None = None,
    on_pasted: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, tuple[PassCounts, ...]]:
    """Run ``passes`` one after another over ``canvas``; the canvas and each pass's counts.

    ``on_regions(name, boxes)`` sees the pass's name and the boxes of each batch of regions
    before it runs; ``on_pasted`` the canvas after each batch (see :func:`redraw_regions`)."""
    counts = []
    devices = [canvas.device, *(lane.device for lane in model.lanes)]
    for p in passes:
        start = work_clock()  # compilation (torch.compile) is reported apart
        on_batch = None if on_regions is None else _batch_boxes(on_regions, p)
        with peaks.window(devices) as opened:
            canvas, c = redraw_regions(
                model,
                canvas,
                p.regions,
                denoise=p.denoise,
                padding=p.padding,
                mask_blur=p.mask_blur,
                seed=seed,
                pass_index=p.index,
                max_batch=max_batch,
                name=p.name,
                fallbacks=fallbacks,
                on_tiles=on_tiles,
                on_batch=on_batch,
                on_pasted=on_pasted,
            )
            if canvas.device.type == "cuda":
                torch.cuda.synchronize(canvas.device)
        seconds = round(work_clock() - start, 4)
        counts.append(replace(c, seconds=seconds, peak_bytes=opened.peak_allocated))
    return canvas, tuple(counts)


def _batch_boxes(
    on_regions: Callable[[str, tuple[Box, ...]], None], p: RedrawPass
) -> Callable[[tuple[int, ...]], None]:
    """An ``on_batch`` for :func:`redraw_regions` that tells ``on_regions`` the batch's boxes."""

    def on_batch(batch: tuple[int, ...]) -> None:
        on_regions(p.name, tuple(p.regions[j].box for j in batch))

    return on_batch


# -- a job's passes over a pixel canvas ------------------------------------------------------


def planned_tile_steps(model: DiffusionModel, passes: Sequence[RedrawPass]) -> int:
    """Progress units (region evaluations) of ``passes``: what :func:`rediffuse_pixels`
    reports through ``on_tiles``."""
    return sum(len(p.regions) * model.evaluations(p.denoise) for p in passes)


def max_batch(model: DiffusionModel, grid: TileGrid, padding: int, requested: int | None) -> int:
    """Regions per UNet batch over a pixel-unit ``grid``: ``requested``, or the model's tile
    batch for the grid's tiles scaled down by the padded crop's area (CUDA)."""
    latent = grid.scaled(Fraction(1, model.factor))
    batch = model.tile_batch(latent.tile_height, latent.tile_width, len(latent), requested)
    if requested or model.device.type != "cuda":
        return batch
    tile = grid.tile_height * grid.tile_width
    crop = (grid.tile_height + 2 * padding) * (grid.tile_width + 2 * padding)
    return max(1, batch * tile // crop)


def _canvas_device(device: torch.device, nbytes: int) -> torch.device:
    """Where the pixel canvas lives: the device when it and a copy take at most a quarter of
    the free memory, else the CPU (each region's crop and paste then cross the bus)."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if 2 * nbytes <= free // 4 else torch.device("cpu")


def rediffuse_pixels(
    model: DiffusionModel,
    rgb: np.ndarray,
    passes: Sequence[RedrawPass],
    *,
    seed: int,
    max_batch: int,
    report: DiffusionReport,
    on_tiles: Progress | None = None,
    on_regions: Callable[[str, tuple[Box, ...]], None] | None = None,
    on_pasted: Callable[[torch.Tensor], None] | None = None,
) -> tuple[np.ndarray, tuple[PassCounts, ...]]:
    """Run ``passes`` over a pixel canvas: HxWx3 float32 in [0, 1] (multiples of the VAE
    factor) → same size. Fills ``report`` (seed, fallbacks; and, when the first pass is the
    tile redraw, tiles, steps, tile-steps, UNet calls and batch). ``on_regions`` and
    ``on_pasted``: see :func:`run_passes`. The first pass's seconds include the canvas's way
    to its device and back (0.53 s of the compiled redraw job went uncounted before)."""
    report.seed = seed
    if not passes:
        return rgb, ()
    start = work_clock()
    canvas = _to_canvas(rgb, _canvas_device(model.device, rgb.size * 4))
    moved = work_clock() - start
    canvas, counts = run_passes(
        model,
        canvas,
        passes,
        seed=seed,
        max_batch=max_batch,
        fallbacks=report.fallbacks,
        on_tiles=on_tiles,
        on_regions=on_regions,
        on_pasted=on_pasted,
    )
    if passes[0].name == "redraw":
        main = counts[0]
        report.tiles = main.regions
        report.steps_per_tile = main.steps
        report.tile_steps = main.tile_steps
        report.unet_evaluations = main.unet_calls
        report.tile_batch = max_batch
    start = work_clock()
    out = _to_rgb(canvas)
    moved += work_clock() - start  # the canvas's way in and out: the first pass's stage
    counts = (replace(counts[0], seconds=round(counts[0].seconds + moved, 4)), *counts[1:])
    return out, counts


def _to_canvas(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    """An H×W×3 image as the 3×H×W float32 canvas on ``device``; on CUDA the relayout runs
    there (a contiguous copy over the bus, no transposing copy on one host core)."""
    if device.type == "cuda":
        hwc = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32))
        return hwc.to(device).permute(2, 0, 1).contiguous()
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32))


def _to_rgb(canvas: torch.Tensor) -> np.ndarray:
    """The canvas back as an H×W×3 float32 host image (relaid on the device when there, and
    brought back through pinned memory)."""
    if canvas.is_cuda:
        return to_pinned_host(canvas.float().permute(1, 2, 0).contiguous()).numpy()
    return to_hwc(canvas.float()).numpy()

"""Per-tile img2img with locked context (Ultimate SD Upscale's redraw) and the seam-fix passes.

:func:`redraw_regions` is the one primitive. For each region (a pixel box and its mask, see
:mod:`tileup.seams.seamfix`) it

1. crops the box grown by ``padding``, or by the reach of the mask blur when that is larger
   (rounded outward to the VAE factor f; at the canvas edge shifted inward keeping its size,
   see ``context_crop``) from the *current* canvas, so it sees every
   region redrawn before it, and VAE-encodes it (plain ``vae.encode``: posterior mean × scaling
   factor);
2. noises it with its crop of one canvas-wide noise drawn once per pass (CPU generator seeded
   ``seed + pass_index``) and samples exactly ``steps`` steps at the pass's denoise (fixed step
   scheduling: ``make_scheduler`` → ``plan_steps`` → ``noise_latents`` → ``run_sampler``);
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

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tileup.sampler.conditioning import Conditioning
from tileup.sampler.schedules import (
    StepPlan,
    make_scheduler,
    noise_latents,
    plan_steps,
    run_sampler,
)
from tileup.sampler.tiled_vae import NonFiniteError
from tileup.seams.seamfix import (
    Region,
    context_crop,
    crop_masks,
    seam_fix_passes,
    tile_regions,
    validate_redraw_settings,
)
from tileup.tiler import Box, TileGrid, plan_grid

if TYPE_CHECKING:
    from tileup.sampler.engine import DiffusionReport, Rediffuser

Progress = Callable[[int], None]


# -- the UNet call shared with the fused denoiser ---------------------------------------------


def guidance_inputs(
    conditioning: Conditioning,
    cfg: float,
    count: int,
    *,
    time_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """What the UNet gets besides the latents for a batch of ``count`` samples, built once.

    The text states (uncond then cond when ``cfg != 1``) and, when the conditioning has pooled
    vectors (SDXL), the added conditions: pooled text embeds and ``time_ids`` (count×6: original
    size, crop top-left, target size, in pixels), doubled alike under guidance.
    """
    c, guided = conditioning, cfg != 1.0
    embeds = [c.uncond, c.cond] if guided else [c.cond]
    context = torch.cat([e.expand(count, -1, -1) for e in embeds]).to(device)
    if c.pooled_cond is None or c.pooled_uncond is None:
        return context, None
    if time_ids is None:
        raise ValueError("SDXL conditioning needs time_ids")
    pooled = [c.pooled_uncond, c.pooled_cond] if guided else [c.pooled_cond]
    text_embeds = torch.cat([p.expand(count, -1) for p in pooled]).to(device)
    ids = time_ids.to(device, dtype or text_embeds.dtype)
    return context, {
        "text_embeds": text_embeds,
        "time_ids": torch.cat([ids, ids]) if guided else ids,
    }


def guided_prediction(
    unet: Any,
    x: torch.Tensor,
    t: torch.Tensor | float,
    inputs: tuple[torch.Tensor, dict[str, torch.Tensor] | None],
    cfg: float,
) -> torch.Tensor:
    """The UNet's prediction for a batch ``x`` (k×C×h×w, in the UNet's dtype) at ``t`` after
    classifier-free guidance: with ``cfg != 1`` uncond and cond run as one batch of 2k and the
    result is ``u + cfg·(c − u)``. ``inputs`` from :func:`guidance_inputs`. Returns float32."""
    context, added = inputs
    guided = cfg != 1.0
    pred = unet(
        torch.cat([x, x]) if guided else x,
        t,
        encoder_hidden_states=context,
        added_cond_kwargs=added,
        return_dict=False,
    )[0].float()
    if guided:
        uncond, cond = pred.chunk(2)
        pred = uncond + cfg * (cond - uncond)
    return pred


# -- settings, plans and counts --------------------------------------------------------------


@dataclass(frozen=True)
class RedrawOptions:
    """The redraw and seam-fix knobs (USDU's defaults); validated against ``tile`` on use."""

    order: str = "linear"
    padding: int = 32
    mask_blur: int = 8
    seam_fix: str = "none"
    seam_denoise: float = 0.35
    seam_width: int = 64
    seam_mask_blur: int = 4
    seam_padding: int = 16

    @classmethod
    def from_settings(cls, settings: Any) -> RedrawOptions:
        """The options named like the settings fields (defaults where a field is missing)."""
        names = cls.__dataclass_fields__
        return cls(**{n: getattr(settings, n) for n in names if hasattr(settings, n)})

    def validate(self, tile: int) -> None:
        """ValueError naming the flag for any value tileup refuses."""
        validate_redraw_settings(tile=tile, **asdict(self))


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
    ``seconds`` its wall time (filled by :func:`run_passes`, not compared).
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def redraw_grid(height: int, width: int, tile: int, factor: int, order: str) -> TileGrid:
    """USDU's tiles over a pixel canvas: ``tile`` px, no overlap, edge tiles snapped inward."""
    return plan_grid(height, width, tile, 0, align=factor, order=order)


def plan_passes(
    grid: TileGrid, mode: str, options: RedrawOptions, denoise: float
) -> tuple[RedrawPass, ...]:
    """The passes of a job over a pixel-unit ``grid``: the tile redraw (mode "redraw", index 0)
    and the seam-fix passes (indices 1, 2, ...). Passes at denoise 0 are kept (counted as
    skipped when run)."""
    passes = []
    if mode == "redraw":
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
    scheduler: Any, plan: StepPlan, i: int, original: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """``original`` at the noise level the sampler's latents have after evaluation ``i``.

    The clean original after the last evaluation; otherwise ``scheduler.add_noise`` for the
    next timestep (after a step the k-samplers read the level from their step index, DDIM-like
    ones from the timestep). DPM2 between its two stages sits at an interpolated σ, read back
    from ``scale_model_input`` (``x / sqrt(σ² + 1)``).
    """
    if i + 1 >= plan.evaluations:
        return original
    following = plan.timesteps[i + 1 : i + 2]
    if hasattr(scheduler, "sigmas_interpol") and not scheduler.state_in_first_order:
        one = torch.ones((), dtype=torch.float64)
        scale = scheduler.scale_model_input(one, following[0]).double().cpu()
        sigma = float((1.0 / scale**2 - 1.0).clamp(min=0).sqrt())
        return original + sigma * noise
    return scheduler.add_noise(original, noise, following)


# -- the model pieces a redraw needs -----------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RedrawModel:
    """A loaded UNet and VAE (on ``device``), the encoded prompts and the sampling settings."""

    unet: Any
    vae: Any
    conditioning: Conditioning
    scheduler_config: Any
    prediction_type: str
    sampler: str
    schedule: str
    cfg: float
    steps: int
    device: torch.device
    vae_dtype: torch.dtype
    factor: int
    vae_batch: int = 1

    @classmethod
    def from_rediffuser(cls, rediffuser: Rediffuser) -> RedrawModel:
        s, m = rediffuser.settings, rediffuser.model
        return cls(
            unet=m.unet,
            vae=m.vae,
            conditioning=rediffuser.conditioning,
            scheduler_config=m.scheduler_config,
            prediction_type=m.prediction_type,
            sampler=s.sampler,
            schedule=s.scheduler,
            cfg=s.cfg,
            steps=s.steps,
            device=rediffuser.device,
            vae_dtype=rediffuser.vae_dtype,
            factor=rediffuser.factor,
            vae_batch=int(rediffuser.vae_options.get("batch", 1)),
        )

    def scheduler_and_plan(self, denoise: float) -> tuple[Any, StepPlan]:
        scheduler = make_scheduler(
            self.sampler,
            self.schedule,
            self.scheduler_config,
            prediction_type=self.prediction_type,
        )
        return scheduler, plan_steps(scheduler, self.steps, denoise)


class CropVae:
    """Plain VAE encode/decode of crops in the job's VAE precision, with one fp32 re-run.

    The VAE keeps fp32 weights; a copy in ``dtype`` is made once when that differs. On NaN/inf
    in half precision the call runs again in fp32 (noted in ``fallbacks``) and so do all later
    calls, as the engine's tiled VAE does.
    """

    def __init__(self, model: RedrawModel, fallbacks: list[str]) -> None:
        self.vae, self.device, self.dtype = model.vae, model.device, model.vae_dtype
        self.batch = max(1, model.vae_batch)
        self.fallbacks = fallbacks
        self.scale = float(model.vae.config.scaling_factor)
        self._cast: Any = None
        self.calls = 0

    def _module(self) -> Any:
        params = list(self.vae.parameters())
        if self.dtype == torch.float32 or not params or params[0].dtype == self.dtype:
            return self.vae
        if self._cast is None:
            self._cast = copy.deepcopy(self.vae).to(self.device, self.dtype)
        return self._cast

    def _run(self, fn: Callable[[Any, torch.Tensor], torch.Tensor], x: torch.Tensor):
        outs = []
        for part in x.split(self.batch):
            self.calls += 1
            out = fn(self._module(), part.to(self.device, self.dtype)).float()
            if not bool(torch.isfinite(out).all()):
                if self.dtype == torch.float32:
                    raise NonFiniteError("the VAE produced NaN/inf in float32")
                self.fallbacks.append(f"VAE produced NaN/inf in {self.dtype}; re-ran it in fp32")
                self.dtype, self._cast = torch.float32, None
                out = fn(self.vae, part.to(self.device, torch.float32)).float()
            outs.append(out)
        return torch.cat(outs)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """k×3×h×w in [0, 1] → scaled latents k×C×h/f×w/f (float32, on the device)."""
        z = self._run(lambda vae, x: vae.encode(x).latent_dist.mean, pixels * 2 - 1)
        return z * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → k×3×h×w float32 in [0, 1] (on the device)."""
        x = self._run(lambda vae, z: vae.decode(z).sample, latents / self.scale)
        return ((x + 1) / 2).clamp(0, 1)


# -- the primitive ---------------------------------------------------------------------------


@torch.no_grad()
def redraw_regions(
    model: RedrawModel,
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
    vae: CropVae | None = None,
    fallbacks: list[str] | None = None,
    on_tiles: Progress | None = None,
    on_batch: Callable[[tuple[int, ...]], None] | None = None,
) -> tuple[torch.Tensor, PassCounts]:
    """Redraw ``regions`` of ``canvas`` (3×H×W float32 in [0, 1], H and W multiples of f) in
    order (see the module docstring); returns the new canvas (the input is left alone) and the
    pass's counts. ``denoise`` 0 returns the input itself: no encode, no decode.

    ``on_tiles(k)`` runs after each UNet evaluation of a batch of k regions; ``on_batch``
    receives each batch (region indices) before it runs.
    """
    f = model.factor
    height, width = canvas.shape[-2:]
    if height % f or width % f:
        raise ValueError(f"canvas {height}x{width} must be a multiple of the VAE factor {f}")
    if padding < 0 or mask_blur < 0:
        raise ValueError(f"padding and mask blur must be non-negative: {padding}, {mask_blur}")
    scheduler, plan = model.scheduler_and_plan(denoise)
    if plan.empty or not regions:
        return canvas, PassCounts(name, len(regions), 0, 0, 0, 0, float(denoise), skipped=True)
    vae = vae or CropVae(model, fallbacks if fallbacks is not None else [])
    area = Box(0, 0, height, width)
    for region in regions:
        if not area.contains(region.box):
            raise ValueError(f"region {region.box} lies outside the canvas {height}x{width}")
    crops = [context_crop(r.box, padding, mask_blur, area, f) for r in regions]
    channels = int(model.vae.config.latent_channels)
    noise = pass_noise((channels, height // f, width // f), seed, pass_index).to(model.device)
    canvas = canvas.clone()
    unet_calls = 0
    batches = batch_schedule(crops, max_batch)
    for batch in batches:
        if on_batch is not None:
            on_batch(batch)
        job = _Batch(
            regions=[regions[j] for j in batch],
            crops=[crops[j] for j in batch],
            seeds=[region_seed(seed, pass_index, j) for j in batch],
        )
        _redraw_batch(model, canvas, job, noise, vae, scheduler, plan, mask_blur, on_tiles)
        unet_calls += plan.evaluations
    counts = PassCounts(
        name,
        len(regions),
        len(batches),
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


def _redraw_batch(
    model: RedrawModel,
    canvas: torch.Tensor,
    job: _Batch,
    noise: torch.Tensor,
    vae: CropVae,
    scheduler: Any,
    plan: StepPlan,
    mask_blur: float,
    on_tiles: Progress | None,
) -> None:
    """Encode, sample with the context locked, decode and paste one batch (in place)."""
    f = model.factor
    height, width = canvas.shape[-2:]
    area = Box(0, 0, height, width)
    masks = [
        crop_masks(r, c, area, mask_blur, f, device=model.device)
        for r, c in zip(job.regions, job.crops, strict=True)
    ]
    free = torch.stack([m[1] for m in masks])[:, None]
    pixels = torch.stack([canvas[(slice(None), *c.slices)] for c in job.crops])
    original = vae.encode(pixels.to(model.device))
    latent_boxes = [c.scaled(Fraction(1, f)) for c in job.crops]
    crop_noise = torch.stack([noise[(slice(None), *c.slices)] for c in latent_boxes])
    unet_param = next(model.unet.parameters())
    time_ids = torch.tensor([[height, width, c.top, c.left, c.height, c.width] for c in job.crops])
    inputs = guidance_inputs(
        model.conditioning,
        model.cfg,
        len(job.crops),
        time_ids=time_ids,
        device=unet_param.device,
        dtype=unet_param.dtype,
    )
    generator: Any = None  # diffusers' schedulers take a list: one generator per sample
    if hasattr(scheduler, "noise_sampler_seed"):  # a Brownian tree per sample
        scheduler.noise_sampler_seed = list(job.seeds)
    else:  # diffusers draws each sample's step noise from its own generator
        generator = [torch.Generator("cpu").manual_seed(s) for s in job.seeds]

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = guided_prediction(model.unet, x.to(unet_param.dtype), t, inputs, model.cfg)
        if on_tiles is not None:
            on_tiles(len(job.crops))
        return out

    def lock(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return torch.where(free, latents, lock_target(scheduler, plan, i, original, crop_noise))

    start = noise_latents(scheduler, plan, original, crop_noise)
    sampled = run_sampler(scheduler, plan, start, predict, generator=generator, on_step=lock)
    redrawn = vae.decode(sampled).to(canvas.device)
    for k, c in enumerate(job.crops):
        paste = masks[k][0].to(canvas.device)
        view = canvas[(slice(None), *c.slices)]
        blended = view * (1 - paste) + redrawn[k] * paste
        canvas[(slice(None), *c.slices)] = torch.where(paste > 0, blended, view)


def run_passes(
    model: RedrawModel,
    canvas: torch.Tensor,
    passes: Sequence[RedrawPass],
    *,
    seed: int,
    max_batch: int = 1,
    fallbacks: list[str] | None = None,
    on_tiles: Progress | None = None,
) -> tuple[torch.Tensor, tuple[PassCounts, ...], CropVae]:
    """Run ``passes`` one after another over ``canvas``; the canvas, each pass's counts and the
    VAE runner (its ``dtype`` says whether an fp32 fallback happened)."""
    vae = CropVae(model, fallbacks if fallbacks is not None else [])
    counts = []
    for p in passes:
        start = time.perf_counter()
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
            vae=vae,
            on_tiles=on_tiles,
        )
        if canvas.device.type == "cuda":
            torch.cuda.synchronize(canvas.device)
        counts.append(replace(c, seconds=round(time.perf_counter() - start, 4)))
    return canvas, tuple(counts), vae


# -- the job-level entry points (a loaded Rediffuser) ------------------------------------------


def _job_grid(rediffuser: Rediffuser, height: int, width: int, options: RedrawOptions) -> TileGrid:
    """The pixel-unit grid of the job on an H×W canvas (multiples of f): the redraw tiles in
    mode "redraw", else the fused grid (whose seams the seam fix follows)."""
    if rediffuser.settings.mode == "redraw":
        f = rediffuser.factor
        return redraw_grid(height, width, rediffuser.settings.tile, f, options.order)
    return rediffuser.grid(height, width).scaled(rediffuser.factor)


def _max_batch(rediffuser: Rediffuser, grid: TileGrid, padding: int) -> int:
    """--tile-batch, or the engine's tile batch scaled down by the padded crop's area (CUDA)."""
    batch = rediffuser.tile_batch(grid.scaled(Fraction(1, rediffuser.factor)))
    if rediffuser.settings.tile_batch or rediffuser.device.type != "cuda":
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


def _to_tensor(rgb: np.ndarray, device: torch.device) -> torch.Tensor:
    chw = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32))
    return chw.to(_canvas_device(device, chw.numel() * chw.element_size()))


def _to_rgb(canvas: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(canvas.float().cpu().numpy().transpose(1, 2, 0))


def rediffuse_pixels(
    rediffuser: Rediffuser,
    rgb: np.ndarray,
    seed: int,
    report: DiffusionReport,
    options: RedrawOptions,
    *,
    on_tiles: Progress | None = None,
) -> tuple[np.ndarray, tuple[PassCounts, ...]]:
    """The per-tile passes of a job on a pixel canvas: HxWx3 float32 in [0, 1] → same size.

    Mode "redraw": the tile redraw at ``--denoise`` then the seam-fix passes; mode "fused"
    (``rgb`` already decoded): the seam-fix passes only, on the fused grid's seams. The canvas
    is padded to multiples of f (by reflection) and cropped back. Fills ``report`` (seed,
    fallbacks; in mode "redraw" also tiles, steps, tile-steps, UNet calls, batch).
    """
    from tileup.sampler.engine import pad_to

    settings = rediffuser.settings
    options.validate(settings.tile)
    height, width = rgb.shape[:2]
    canvas_hw = rediffuser.canvas_size(height, width)
    grid = _job_grid(rediffuser, *canvas_hw, options)
    passes = plan_passes(grid, settings.mode, options, settings.denoise)
    report.seed = seed
    if not passes:
        return rgb, ()
    model = RedrawModel.from_rediffuser(rediffuser)
    max_batch = _max_batch(rediffuser, grid, options.padding)
    canvas = _to_tensor(pad_to(rgb, canvas_hw), rediffuser.device)
    canvas, counts, vae = run_passes(
        model,
        canvas,
        passes,
        seed=seed,
        max_batch=max_batch,
        fallbacks=report.fallbacks,
        on_tiles=on_tiles,
    )
    rediffuser.vae_dtype = vae.dtype  # an fp32 fallback holds for the rest of the job
    if settings.mode == "redraw":
        main = counts[0]
        report.tiles = main.regions
        report.steps_per_tile = main.steps
        report.tile_steps = main.tile_steps
        report.unet_evaluations = main.unet_calls
        report.tile_batch = max_batch
    return _to_rgb(canvas)[:height, :width], counts


def planned_tile_steps(
    rediffuser: Rediffuser, height: int, width: int, options: RedrawOptions
) -> int:
    """Progress units (region evaluations) of a job over an H×W target, all passes included:
    what :func:`rediffuse_pixels` reports through ``on_tiles`` (plus the fused sampling's
    tile evaluations in mode "fused")."""
    canvas_hw = rediffuser.canvas_size(height, width)
    grid = _job_grid(rediffuser, *canvas_hw, options)
    settings = rediffuser.settings
    total = rediffuser.planned_tile_steps(height, width) if settings.mode == "fused" else 0
    model = RedrawModel.from_rediffuser(rediffuser)
    for p in plan_passes(grid, settings.mode, options, settings.denoise):
        total += len(p.regions) * model.scheduler_and_plan(p.denoise)[1].evaluations
    return total

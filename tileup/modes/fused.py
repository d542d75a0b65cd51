"""Fused mode: the whole latent canvas sampled at once, all tiles blended at every step.

The canvas is noised once with one seeded canvas-wide noise; the scheduler runs unchanged on the
whole canvas with :class:`FusedDenoiser` as its model: every call cuts the canvas into the
grid's overlapping tiles, runs them through the UNet in batches (guidance batched alongside, see
:mod:`tileup.sampling.guidance`) and blends the predictions with precomputed normalised weight
windows. Every latent cell gets one prediction, a convex combination of the tiles covering it,
so no seam can form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from tileup.devices import on_device
from tileup.modes.model import DiffusionModel, DiffusionReport
from tileup.sampling.conditioning import Conditioning
from tileup.sampling.guidance import GuidanceInputs, guidance_inputs, guided_prediction
from tileup.sampling.loop import StepCallback, noise_latents, run_sampler
from tileup.sampling.protocols import UNet
from tileup.seams.windows import normalized_windows
from tileup.tiler import Tile, TileGrid, plan_grid


@dataclass(frozen=True)
class FusedOptions:
    """Tile and overlap in pixels (multiples of the VAE factor), blend window, UNet batch (None:
    from free memory). Built from the settings by the pipeline, which holds the defaults."""

    tile: int
    overlap: int
    blend: str
    tile_batch: int | None


def fused_grid(factor: int, height: int, width: int, options: FusedOptions) -> TileGrid:
    """The latent-unit grid over a pixel canvas of ``height``×``width`` (multiples of f)."""
    f = factor
    return plan_grid(height // f, width // f, options.tile // f, options.overlap // f)


def planned_tile_steps(
    model: DiffusionModel, height: int, width: int, denoise: float, options: FusedOptions
) -> int:
    """Progress units (tile evaluations) of sampling a target of ``height``×``width`` pixels."""
    grid = fused_grid(model.factor, *model.canvas_size(height, width), options)
    return len(grid) * model.evaluations(denoise)


@dataclass
class DenoiseCounter:
    """Tile evaluations and canvas calls made so far (plain ints: no device sync)."""

    tile_evaluations: int = 0
    calls: int = 0


def lane_batches(tiles: list[Tile], tile_batch: int, lanes: int) -> list[list[list[Tile]]]:
    """The tiles cut into batches of at most ``tile_batch``, then dealt to ``lanes`` devices.

    The fewest batches that hold the tiles, rounded up to a multiple of ``lanes``, with the
    tiles split evenly among them (sizes differ by at most one: 81 tiles at 32 make 27, 27, 27,
    not 32, 32, 17), each lane taking a contiguous run of batches (lanes may be empty with few
    tiles). Even batches keep every UNet call at one shape: one compilation under
    ``--compile`` (diffusers and PyTorch branch on the batch size at 16 and 64, so 64 and 34
    samples compile twice) and one CUDA graph per step.
    """
    if not tiles:
        return [[] for _ in range(lanes)]
    count = -(-len(tiles) // tile_batch)
    count = lanes * -(-count // lanes)
    base, extra = divmod(len(tiles), count)
    batches, start = [], 0
    for k in range(count):
        size = base + (1 if k < extra else 0)
        batches.append(tiles[start : start + size])
        start += size
    per_lane = count // lanes
    return [[b for b in batches[i * per_lane : (i + 1) * per_lane] if b] for i in range(lanes)]


@dataclass(eq=False)
class _Lane:
    """One device's share of the tiles: its UNet, blend windows, batches and guidance inputs."""

    unet: UNet
    device: torch.device
    dtype: torch.dtype
    windows: tuple[torch.Tensor, ...]
    batches: list[list[Tile]]
    inputs: list[GuidanceInputs]


@dataclass(eq=False)
class FusedDenoiser:
    """Whole-canvas denoiser that runs a latent-unit ``grid`` of tiles through ``unet``.

    ``pixel_scale`` converts latent cells to pixels (the VAE scale factor), for SDXL's size and
    crop conditioning. ``replicas`` (a UNet and the conditioning on another device, each) take
    a share of every call's tiles, run in parallel threads; their partial canvases are summed
    on the primary device. Tiles are accumulated in index order within each device.
    """

    unet: UNet
    grid: TileGrid
    conditioning: Conditioning
    cfg: float
    tile_batch: int
    blend: str = "gaussian"
    pixel_scale: int = 8
    counter: DenoiseCounter = field(default_factory=DenoiseCounter)
    notes: list[str] = field(default_factory=list)
    replicas: Sequence[tuple[UNet, Conditioning]] = ()
    schedule: Sequence[tuple[int, Sequence[Conditioning]]] = ()
    """Prompt editing: (last step, the conditioning of each lane) pairs; empty: no editing."""
    step_of_call: Callable[[int], int] | None = None
    """The sampling step (0-based) of the n-th call (second-order samplers call twice a step)."""
    on_batch: Callable[[list[Tile]], None] | None = None
    """Sees each batch of tiles just before it goes through the UNet (from the lane's thread);
    may raise to stop the sampling (an observer's cancellation)."""

    def __post_init__(self) -> None:
        param = next(self.unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.windows = normalized_windows(self.grid, self.blend, device=self.device)
        self.tiles: list[Tile] = sorted(self.grid.tiles, key=lambda t: t.index)
        self._pool: ThreadPoolExecutor | None = None
        self._current: Sequence[Conditioning] | None = None
        self._rebatch(self.tile_batch)

    def _rebatch(self, tile_batch: int) -> None:
        """Cut the tiles into batches of ``tile_batch`` per lane; everything but the latents is
        the same at every step, so the guidance inputs are built once per batch, on its device."""
        self.tile_batch = tile_batch
        units = [(self.unet, self.conditioning), *self.replicas]
        self.lanes: list[_Lane] = []
        for (unet, conditioning), batches in zip(
            units, lane_batches(self.tiles, tile_batch, len(units)), strict=True
        ):
            param = next(unet.parameters())
            device, dtype = param.device, param.dtype
            windows = (
                self.windows if device == self.device else tuple(w.to(device) for w in self.windows)
            )
            inputs = [self._inputs(b, conditioning, device, dtype) for b in batches]
            self.lanes.append(_Lane(unet, device, dtype, windows, batches, inputs))

    def _inputs(
        self,
        batch: list[Tile],
        conditioning: Conditioning,
        device: torch.device,
        dtype: torch.dtype,
    ) -> GuidanceInputs:
        """Guidance inputs of a batch; SDXL's per-tile canvas size, offset and size (pixels)."""
        s, g = self.pixel_scale, self.grid
        rows = [
            [
                g.height * s,
                g.width * s,
                t.box.top * s,
                t.box.left * s,
                t.box.height * s,
                t.box.width * s,
            ]
            for t in batch
        ]
        return guidance_inputs(
            conditioning,
            self.cfg,
            len(batch),
            time_ids=torch.tensor(rows),
            device=device,
            dtype=dtype,
        )

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Blended UNet prediction (after CFG) for a 1×C×h×w canvas at timestep ``t``.

        On out-of-memory the tile batch is halved (noted) and the call runs again: the result
        is the same up to the kernels' rounding for another batch size."""
        self._follow_schedule()
        while True:
            try:
                out = self._blend(latents, t)
                break
            except torch.OutOfMemoryError:
                if self.tile_batch == 1:
                    raise
                torch.cuda.empty_cache()
                self._rebatch(self.tile_batch // 2)
                self.notes.append(f"UNet out of memory: {self.tile_batch} tiles per batch")
        self.counter.tile_evaluations += len(self.tiles)
        self.counter.calls += 1
        return out.to(latents.dtype)

    def _follow_schedule(self) -> None:
        """Switch every lane to the conditioning of this call's step (prompt editing)."""
        if not self.schedule:
            return
        step = self.step_of_call(self.counter.calls) if self.step_of_call else self.counter.calls
        chosen = next((c for last, c in self.schedule if step <= last), self.schedule[-1][1])
        if chosen is self._current:
            return
        self._current = chosen
        self.conditioning = chosen[0]
        self.replicas = [(u, c) for (u, _), c in zip(self.replicas, chosen[1:], strict=True)]
        self._rebatch(self.tile_batch)

    def _blend(self, latents: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        busy = [lane for lane in self.lanes if lane.batches]
        if len(busy) == 1 and busy[0].device == latents.device:
            return self._run_lane(busy[0], latents, t)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(len(self.lanes), thread_name_prefix="tileup-lane")
        # inputs copied to every device here, before any lane queues work: a copy between
        # devices waits for both devices' queued work, and a blocking copy from the host waits
        # for the device to finish
        placed = [(latents.to(lane.device), _on(t, lane.device)) for lane in busy]
        futures = [
            self._pool.submit(self._run_lane, lane, *args)
            for lane, args in zip(busy, placed, strict=True)
        ]
        parts = [f.result() for f in futures]  # every lane finishes before any error is raised
        out = parts[0].to(latents.device)
        for part in parts[1:]:
            out += part.to(latents.device)
        return out

    def _run_lane(
        self, lane: _Lane, latents: torch.Tensor, t: torch.Tensor | float
    ) -> torch.Tensor:
        """One lane's tiles blended into a canvas on its device (inference mode is per thread)."""
        with torch.inference_mode(), on_device(lane.device):
            x_all, t_lane = latents.to(lane.device), _on(t, lane.device)
            out = torch.zeros(x_all.shape, device=lane.device, dtype=torch.float32)
            for batch, inputs in zip(lane.batches, lane.inputs, strict=True):
                if self.on_batch is not None:
                    self.on_batch(batch)
                crops = [x_all[0][:, ys, xs] for ys, xs in (tile.box.slices for tile in batch)]
                x = torch.stack(crops).to(lane.dtype)
                pred = guided_prediction(lane.unet, x, t_lane, inputs, self.cfg)
                for i, tile in enumerate(batch):
                    ys, xs = tile.box.slices
                    out[0][:, ys, xs] += pred[i] * lane.windows[tile.index]
            return out

    def close(self) -> None:
        """Stop the lane threads (none run between calls)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _on(t: torch.Tensor | float, device: torch.device) -> torch.Tensor | float:
    """The timestep on ``device``; a 0-dim host tensor is filled in there (a blocking copy from
    the host would wait for the device to finish its queued work)."""
    if not isinstance(t, torch.Tensor) or t.device == device:
        return t
    if t.device.type == "cpu" and t.ndim == 0:
        return torch.full((), t.item(), dtype=t.dtype, device=device)
    return t.to(device)


def sample_fused(
    model: DiffusionModel,
    latents: torch.Tensor,
    *,
    seed: int,
    denoise: float,
    options: FusedOptions,
    report: DiffusionReport,
    on_tiles: Callable[[int], None] | None = None,
    on_batch: Callable[[list[Tile]], None] | None = None,
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Noise scaled latents (1×C×h×w) once with a seeded canvas-wide noise and sample them.

    Runs exactly ``steps`` steps (fixed step scheduling) through the fused tiled denoiser;
    returns the sampled latents on the device; denoise 0 returns the input. One CPU generator
    seeded ``seed`` draws the canvas noise, then the stochastic samplers' step noise.
    ``on_batch`` sees each UNet batch of (latent-unit) tiles before it runs; ``on_step`` the
    canvas latents after every model evaluation (read only: a preview).
    """
    f = model.factor
    grid = fused_grid(f, latents.shape[-2] * f, latents.shape[-1] * f, options)
    report.seed, report.tiles = seed, len(grid)
    if denoise == 0:
        return latents
    scheduler, plan = model.step_plan(denoise)
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    latents = latents.to(model.device, torch.float32)
    start = noise_latents(scheduler, plan, latents, noise.to(model.device))
    batch = model.tile_batch(grid.tile_height, grid.tile_width, len(grid), options.tile_batch)
    denoiser = FusedDenoiser(
        unet=model.unet,
        grid=grid,
        conditioning=model.conditioning,
        cfg=model.sampling.cfg,
        tile_batch=batch,
        blend=options.blend,
        pixel_scale=f,
        replicas=[(r.unet, r.conditioning) for r in model.replicas],
        schedule=[
            (last, tuple(lane.schedule[k][1] for lane in model.lanes))
            for k, (last, _) in enumerate(model.schedule)
        ]
        if model.edited
        else (),
        step_of_call=lambda n: n * plan.steps // max(plan.evaluations, 1),
        on_batch=on_batch,
    )
    denoiser.notes = report.fallbacks
    report.tile_batch = batch

    def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = denoiser(x, t)
        if on_tiles is not None:
            on_tiles(len(grid))
        return out

    watch: StepCallback | None = None
    if on_step is not None:
        seen = on_step

        def watch_step(i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            seen(x)
            return x

        watch = watch_step

    try:
        sampled = run_sampler(scheduler, plan, start, counted, generator=generator, on_step=watch)
    finally:
        denoiser.close()
    report.tile_batch = denoiser.tile_batch
    report.unet_evaluations = denoiser.counter.calls
    report.steps_per_tile = plan.steps
    report.tile_steps = report.tiles * plan.steps
    return sampled

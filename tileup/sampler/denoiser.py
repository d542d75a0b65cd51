"""The fused tiled denoiser: a ``(latents, t) -> prediction`` callable over the whole canvas.

Every call cuts the latent canvas into the grid's overlapping tiles, runs them through the UNet
in batches of ``tile_batch`` (with classifier-free guidance batched alongside), and blends the
predictions with precomputed normalised weight windows, so that any diffusers scheduler runs
unchanged on the whole canvas and no seam can form: every latent cell gets one prediction, a
convex combination of the tiles covering it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tileup.sampler.conditioning import Conditioning
from tileup.seams import normalized_windows
from tileup.tiler import Tile, TileGrid


@dataclass
class DenoiseCounter:
    """Tile evaluations and canvas calls made so far (plain ints: no device sync)."""

    tile_evaluations: int = 0
    calls: int = 0


@dataclass(eq=False)
class FusedDenoiser:
    """Whole-canvas denoiser that runs a latent-unit ``grid`` of tiles through ``unet``.

    ``pixel_scale`` converts latent cells to pixels (the VAE scale factor), for SDXL's size and
    crop conditioning. Output identical for any ``tile_batch``: tiles are accumulated in index
    order whatever the batching.
    """

    unet: Any
    grid: TileGrid
    conditioning: Conditioning
    cfg: float
    tile_batch: int
    blend: str = "gaussian"
    pixel_scale: int = 8
    counter: DenoiseCounter = field(default_factory=DenoiseCounter)

    def __post_init__(self) -> None:
        param = next(self.unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.windows = normalized_windows(self.grid, self.blend, device=self.device)
        self.tiles: list[Tile] = sorted(self.grid.tiles, key=lambda t: t.index)
        self.batches = [
            self.tiles[i : i + self.tile_batch] for i in range(0, len(self.tiles), self.tile_batch)
        ]
        self.guided = self.cfg != 1.0
        # everything but the latents is the same at every step: build it once, on the device
        self.inputs = [self._inputs(batch) for batch in self.batches]

    def _inputs(self, batch: list[Tile]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Text states (uncond then cond when guided) and SDXL added conditions for a batch."""
        c, count = self.conditioning, len(batch)
        embeds = [c.uncond, c.cond] if self.guided else [c.cond]
        context = torch.cat([e.expand(count, -1, -1) for e in embeds]).to(self.device)
        if c.pooled_cond is None or c.pooled_uncond is None:
            return context, None
        pooled = [c.pooled_uncond, c.pooled_cond] if self.guided else [c.pooled_cond]
        text_embeds = torch.cat([p.expand(count, -1) for p in pooled]).to(self.device)
        # SDXL micro-conditioning per tile: canvas size, tile offset, tile size (pixels)
        s = self.pixel_scale
        rows = [
            [
                self.grid.height * s,
                self.grid.width * s,
                t.box.top * s,
                t.box.left * s,
                t.box.height * s,
                t.box.width * s,
            ]
            for t in batch
        ]
        ids = torch.tensor(rows, device=self.device, dtype=self.dtype)
        time_ids = torch.cat([ids, ids]) if self.guided else ids
        return context, {"text_embeds": text_embeds, "time_ids": time_ids}

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Blended UNet prediction (after CFG) for a 1×C×h×w canvas at timestep ``t``."""
        out = torch.zeros(latents.shape, device=latents.device, dtype=torch.float32)
        for batch, (context, added) in zip(self.batches, self.inputs, strict=True):
            x = torch.stack([latents[0][(slice(None), *tile.box.slices)] for tile in batch])
            x = x.to(self.dtype)
            model_in = torch.cat([x, x]) if self.guided else x
            pred = self.unet(
                model_in,
                t,
                encoder_hidden_states=context,
                added_cond_kwargs=added,
                return_dict=False,
            )[0].float()
            if self.guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + self.cfg * (cond - uncond)
            for i, tile in enumerate(batch):
                out[0][(slice(None), *tile.box.slices)] += pred[i] * self.windows[tile.index]
        self.counter.tile_evaluations += len(self.tiles)
        self.counter.calls += 1
        return out.to(latents.dtype)

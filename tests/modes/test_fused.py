"""The fused tiled denoiser: partition of unity, batch invariance, and no seams."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from tileup.modes.fused import FusedDenoiser
from tileup.sampling.conditioning import Conditioning
from tileup.seams.metrics import seam_ratio
from tileup.tiler import plan_grid


class OffsetUNet(torch.nn.Module):
    """Stands in for a UNet whose prediction for tile k is the constant colour ``offsets[k]``.

    The denoiser runs tiles in index order, so the k-th sample of each canvas call is tile k.
    """

    def __init__(self, offsets: torch.Tensor) -> None:
        super().__init__()
        self.offsets = offsets  # [tiles, C]
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.seen = 0

    def forward(
        self, sample, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True
    ):
        n = sample.shape[0]
        index = (torch.arange(n) + self.seen) % len(self.offsets)
        self.seen += n
        out = self.offsets[index][:, :, None, None].expand_as(sample).clone()
        return (out,)


def _conditioning() -> Conditioning:
    states = torch.zeros(1, 77, 8)
    return Conditioning(cond=states, uncond=states)


def _canvas() -> torch.Tensor:
    """A smooth real photo (skimage astronaut 512², blurred σ=6) as 1×3×H×W in [0, 1].

    Smooth, so that its own gradients on the seam lines and between them are alike (its seam
    ratio is about 0.8) and an added seam stands out.
    """
    photo = cv2.GaussianBlur(data.astronaut().astype(np.float32) / 255, (0, 0), 6)
    return torch.from_numpy(photo).permute(2, 0, 1)[None].contiguous()


def _naive_paste(canvas: torch.Tensor, grid, offsets: torch.Tensor) -> torch.Tensor:
    """Each tile's prediction pasted up to the seam lines (mid-overlap), without blending."""
    ys, xs = grid.inner_seams()
    rows, cols = [0, *ys, grid.height], [0, *xs, grid.width]
    out = canvas.clone()
    for tile in grid.tiles:
        box = (slice(rows[tile.row], rows[tile.row + 1]), slice(cols[tile.col], cols[tile.col + 1]))
        out[0][(slice(None), *box)] += offsets[tile.index][:, None, None]
    return out


def _offsets(tiles: int, seed: int = 0, scale: float = 0.05) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(tiles, 3, generator=gen) * 2 - 1) * scale


@pytest.mark.parametrize("blend", ["gaussian", "cosine", "linear"])
def test_tile_offsets_leave_no_seam_in_fused_mode(blend: str) -> None:
    """A denoiser adding a different colour offset (±0.05) to every tile: no seam when fused."""
    canvas = _canvas()
    grid = plan_grid(512, 512, 256, 64)
    offsets = _offsets(len(grid))
    denoiser = FusedDenoiser(
        OffsetUNet(offsets),
        grid,
        _conditioning(),
        cfg=1.0,
        tile_batch=3,
        blend=blend,
        pixel_scale=1,
    )
    fused = canvas + denoiser(canvas, torch.tensor(500))
    base_ratio = seam_ratio(canvas[0], grid)
    fused_ratio = seam_ratio(fused[0], grid)
    naive_ratio = seam_ratio(_naive_paste(canvas, grid, offsets)[0], grid)
    assert fused_ratio <= 1.05 and fused_ratio <= 1.05 * base_ratio, (fused_ratio, base_ratio)
    assert naive_ratio > 2.0, naive_ratio


def test_constant_prediction_is_reproduced_exactly() -> None:
    """Partition of unity: if every tile predicts the same value, the canvas gets exactly it."""
    grid = plan_grid(40, 56, 16, 6)
    offsets = torch.full((len(grid), 4), 0.75)
    denoiser = FusedDenoiser(
        OffsetUNet(offsets), grid, _conditioning(), cfg=1.0, tile_batch=2, pixel_scale=8
    )
    out = denoiser(torch.zeros(1, 4, 40, 56), torch.tensor(10))
    torch.testing.assert_close(out, torch.full((1, 4, 40, 56), 0.75), atol=1e-6, rtol=0)
    assert denoiser.counter.tile_evaluations == len(grid) and denoiser.counter.calls == 1


@pytest.mark.parametrize("batch", [1, 2, 5, 64])
def test_tile_batch_does_not_change_the_result(batch: int) -> None:
    grid = plan_grid(40, 56, 16, 6)
    offsets = _offsets(len(grid), seed=3)
    latents = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    ref = FusedDenoiser(OffsetUNet(offsets), grid, _conditioning(), cfg=1.0, tile_batch=1)
    test = FusedDenoiser(OffsetUNet(offsets), grid, _conditioning(), cfg=1.0, tile_batch=batch)
    assert torch.equal(ref(latents, torch.tensor(1)), test(latents, torch.tensor(1)))


def test_cfg_is_batched_and_applied() -> None:
    """With CFG the batch holds uncond then cond; the result is u + cfg·(c − u)."""

    class CondUNet(OffsetUNet):
        def forward(
            self, sample, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True
        ):
            # prediction = the mean of the text states: 0 for uncond, 1 for cond
            value = encoder_hidden_states.mean(dim=(1, 2))
            return (value[:, None, None, None].expand_as(sample).clone(),)

    grid = plan_grid(24, 24, 16, 8)
    cond = Conditioning(cond=torch.ones(1, 77, 8), uncond=torch.zeros(1, 77, 8))
    unet = CondUNet(torch.zeros(1, 4))
    out = FusedDenoiser(unet, grid, cond, cfg=7.5, tile_batch=4)(torch.zeros(1, 4, 24, 24), 5)
    torch.testing.assert_close(out, torch.full((1, 4, 24, 24), 7.5))

"""Per-tile redraw with locked context and the seam-fix passes (CPU, tiny or stand-in models).

Two kinds of model are used:

- the tiny random-weight SD1 UNet and VAE (tests/sd_fixtures.py): real kernels, for batching,
  locking and end-to-end behaviour;
- exact stand-ins where pixel values must mean something: a VAE that is a pixel (un)shuffle
  (f = 8, 192 latent channels, decode(encode(x)) == x exactly) and an "oracle" UNet whose Euler
  x0-estimate is the clean photo plus a colour offset distinct for every region (the crop
  comes in through SDXL's time_ids). The random tiny VAE turns any picture into unrelated
  texture, so seam ratios measured through it say nothing about the redraw geometry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sd_fixtures import make_tiny_components, save_single_file
from skimage import data

from tileup.imageio import Picture
from tileup.models.families import SD_TRAINING_CONFIG
from tileup.modes import redraw as redraw_module
from tileup.modes.model import DiffusionModel, DiffusionReport, SamplingOptions
from tileup.modes.redraw import (
    PassCounts,
    batch_schedule,
    lock_target,
    plan_passes,
    redraw_grid,
    redraw_regions,
    run_passes,
)
from tileup.modes.regions import crop_box, crop_masks, tile_regions
from tileup.options import redraw_options, sampling_options
from tileup.pipeline import Upscaler
from tileup.sampling.conditioning import Conditioning
from tileup.sampling.guidance import guidance_inputs, guided_prediction
from tileup.sampling.loop import noise_latents, plan_steps, run_sampler
from tileup.sampling.schedules import SAMPLERS, make_scheduler
from tileup.seams.metrics import boundary_ratio, seam_ratio
from tileup.settings import SettingsError, UpscaleSettings
from tileup.tiler import Box
from tileup.vae.runner import VaeOptions, VaeRunner
from tileup.vae.tiled import NonFiniteError

os.environ["HF_HUB_OFFLINE"] = "1"

H, W, TILE, F8 = 128, 192, 64, 8  # a 3 × 2 grid of 64 px tiles


# -- stand-ins -------------------------------------------------------------------------------


class ShuffleVAE(torch.nn.Module):
    """An exact VAE stand-in: pixel-unshuffle by 8 (192 latent channels); counts its calls and
    keeps the latents of its last encode."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(
            latent_channels=192, scaling_factor=1.0, block_out_channels=(1, 1, 1, 1)
        )
        self.calls = {"encode": 0, "decode": 0}
        self.last_encoded: torch.Tensor | None = None

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        self.calls["encode"] += 1
        self.last_encoded = F.pixel_unshuffle(x, F8)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=self.last_encoded))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        self.calls["decode"] += 1
        return SimpleNamespace(sample=F.pixel_shuffle(z, F8))


Crop = tuple[int, int, int, int]  # top, left, height, width in pixels


def _offset(top: int, left: int, height: int, width: int, scale: float = 0.05) -> torch.Tensor:
    """A colour offset (RGB, ±scale) distinct for every crop."""
    gen = torch.Generator().manual_seed(((top * 1009 + left) * 1013 + height) * 1019 + width)
    return (torch.rand(3, generator=gen) * 2 - 1) * scale


class OracleUNet(torch.nn.Module):
    """Predicts the ε that makes Euler's x0-estimate ``reference(k, crop) + offset(crop)``.

    An ideal denoiser biased by a colour offset (RGB in [0, 1] units) chosen per crop, as a real
    model's colour drifts from tile to tile. The reference is the clean photo's latents under
    the crop (``clean``) or, without it, the latents the VAE has just encoded: the denoiser then
    returns its input plus the offset. Records the crops it sees, in order.
    """

    def __init__(
        self,
        clean: torch.Tensor | None = None,
        offset_scale: float = 0.05,
        *,
        vae: ShuffleVAE | None = None,
        offset: Callable[[Crop], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.clean = None if clean is None else F.pixel_unshuffle(clean[None] * 2 - 1, F8)[0]
        self.vae = vae
        self.offset = offset or (lambda crop: _offset(*crop, scale=offset_scale))
        scheduler = make_scheduler("Euler", "normal", SD_TRAINING_CONFIG, prediction_type="epsilon")
        ac = scheduler.alphas_cumprod.double()
        self.train_sigmas = (((1 - ac) / ac) ** 0.5).numpy()
        self.seen: list[Crop] = []

    def _reference(self, k: int, crop: Crop) -> torch.Tensor:
        if self.clean is None:
            assert self.vae is not None and self.vae.last_encoded is not None
            encoded = self.vae.last_encoded  # CFG runs the batch twice: sample k is k mod n
            return encoded[k % len(encoded)].double()
        top, left, height, width = crop
        return self.clean[:, top // F8 : (top + height) // F8, left // F8 : (left + width) // F8]

    def forward(self, sample, t, encoder_hidden_states=None, added_cond_kwargs=None, **_):
        sigma = float(np.interp(float(t), np.arange(len(self.train_sigmas)), self.train_sigmas))
        x = sample.double() * (sigma**2 + 1) ** 0.5
        out = []
        for k, ids in enumerate(added_cond_kwargs["time_ids"].long().tolist()):
            crop: Crop = tuple(ids[2:])
            self.seen.append(crop)
            shift = self.offset(crop).double().repeat_interleave(F8 * F8)
            target = self._reference(k, crop) + 2 * shift[:, None, None]
            out.append((x[k] - target) / sigma)
        return (torch.stack(out).float(),)


def _photo(height: int = H, width: int = W) -> torch.Tensor:
    """A smooth real photo (astronaut, blurred σ = 6, resized) as 3×H×W float32 in [0, 1]."""
    photo = cv2.GaussianBlur(data.astronaut().astype(np.float32) / 255, (0, 0), 6)
    photo = cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(photo.transpose(2, 0, 1)))


def _model(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    conditioning: Conditioning,
    *,
    sampler: str,
    steps: int,
    cfg: float,
    scheduler_config: dict | None = None,
    vae_dtype: torch.dtype = torch.float32,
    vae_batch: int = 1,
) -> DiffusionModel:
    """A DiffusionModel of the given parts on the CPU (the model's injection point)."""
    cpu = torch.device("cpu")
    return DiffusionModel(
        unet=unet,
        vae=VaeRunner(vae, cpu, vae_dtype, VaeOptions(tile=512, batch=vae_batch, store="cpu")),
        conditioning=conditioning,
        sampling=SamplingOptions(sampler, "normal", steps, cfg),
        scheduler_config=scheduler_config or dict(SD_TRAINING_CONFIG),
        prediction_type="epsilon",
        device=cpu,
        dtype=torch.float32,
    )


def _stand_in_conditioning() -> Conditioning:
    pooled = torch.zeros(1, 4)
    return Conditioning(
        cond=torch.zeros(1, 77, 8),
        uncond=torch.zeros(1, 77, 8),
        pooled_cond=pooled,
        pooled_uncond=pooled,
    )


def _stand_in_model(
    clean: torch.Tensor | None,
    steps: int = 4,
    sampler: str = "Euler",
    offset: float = 0.05,
    *,
    unet: OracleUNet | None = None,
    vae: ShuffleVAE | None = None,
    vae_dtype: torch.dtype = torch.float32,
) -> DiffusionModel:
    """The oracle UNet (or ``unet``) and the exact VAE (or ``vae``), with SDXL-style inputs:
    their time_ids carry each crop to the oracle."""
    return _model(
        unet or OracleUNet(clean, offset),
        vae or ShuffleVAE(),
        _stand_in_conditioning(),
        sampler=sampler,
        steps=steps,
        cfg=1.0,
        vae_dtype=vae_dtype,
    )


@pytest.fixture(scope="module")
def tiny() -> dict:
    return make_tiny_components("sd1", seed=0)


def _tiny_model(tiny: dict, sampler: str = "Euler a", steps: int = 3) -> DiffusionModel:
    gen = torch.Generator().manual_seed(5)
    conditioning = Conditioning(
        cond=torch.randn(1, 77, 32, generator=gen), uncond=torch.randn(1, 77, 32, generator=gen)
    )
    return _model(
        tiny["unet"],
        tiny["vae"],
        conditioning,
        sampler=sampler,
        steps=steps,
        cfg=5.0,
        scheduler_config=dict(tiny["scheduler"].config),
    )


def _to_bytes(canvas: torch.Tensor) -> np.ndarray:
    return np.round(canvas.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _close_in_8_bit(a: torch.Tensor, b: torch.Tensor) -> None:
    """At most 1/255 anywhere and on fewer than 0.2 % of the values (GEMM rounding only)."""
    x, y = _to_bytes(a).astype(int), _to_bytes(b).astype(int)
    assert np.abs(x - y).max() <= 1 and (x != y).mean() < 0.002, np.abs(x - y).max()


# -- context locking -------------------------------------------------------------------------

DETERMINISTIC = [s.name for s in SAMPLERS if not s.stochastic]
ENDS_ABOVE_ZERO = {"DDIM", "UniPC", "DEIS"}  # they stop at the smallest training σ


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_lock_target_is_at_the_samplers_own_noise_level(sampler: str) -> None:
    """With the true noise as the prediction, the sampler's latents stay exactly on the noised
    original: the lock target must agree at every evaluation (DPM2's interpolated σ too)."""
    gen = torch.Generator().manual_seed(0)
    original, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    scheduler = make_scheduler(sampler, "normal", SD_TRAINING_CONFIG, prediction_type="epsilon")
    plan = plan_steps(scheduler, 5, 0.5)
    errors: list[float] = []

    def on_step(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        errors.append(
            float((latents - lock_target(scheduler, plan, i, original, noise)).abs().max())
        )
        return latents

    start = noise_latents(scheduler, plan, original, noise)
    run_sampler(scheduler, plan, start, lambda x, t: noise, generator=None, on_step=on_step)
    assert len(errors) == plan.evaluations
    checked = errors[:-1] if sampler in ENDS_ABOVE_ZERO else errors
    assert max(checked) < 1e-5, errors


def test_context_outside_the_tile_is_unchanged_and_its_latents_locked(tiny, monkeypatch) -> None:
    model = _tiny_model(tiny, sampler="DPM++ 2M")
    canvas = _photo()
    region = tile_regions(redraw_grid(H, W, TILE, F8, "linear"))[4]  # row 1, col 1
    encoded, sampled = [], []
    real_encode, real_run = VaeRunner.encode_crops, redraw_module.run_sampler

    def encode(self, pixels, notes):
        encoded.append(real_encode(self, pixels, notes))
        return encoded[-1]

    def run(*args, **kwargs):
        sampled.append(real_run(*args, **kwargs))
        return sampled[-1]

    monkeypatch.setattr(VaeRunner, "encode_crops", encode)
    monkeypatch.setattr(redraw_module, "run_sampler", run)
    out, counts = redraw_regions(
        model, canvas, [region], denoise=0.6, padding=32, mask_blur=8, seed=3
    )
    area = Box(0, 0, H, W)
    crop = crop_box(region.box, 32, area, F8)
    paste, free = crop_masks(region, crop, area, 8, F8)
    # latents outside the region are the original's, bit for bit, after the last step
    assert torch.equal(sampled[0][0][:, ~free], encoded[0][0][:, ~free])
    assert bool((sampled[0][0][:, free] != encoded[0][0][:, free]).any())
    # pixels outside the blurred paste mask (and outside the crop) are untouched
    touched = torch.zeros(H, W, dtype=torch.bool)
    touched[crop.slices] = paste > 0
    assert torch.equal(out[:, ~touched], canvas[:, ~touched])
    inside = (slice(None), *region.box.slices)
    assert float((out[inside] - canvas[inside]).abs().mean()) > 0.01
    assert counts == PassCounts("redraw", 1, 1, 3, 3, 3, 0.6)


# -- order and batching ----------------------------------------------------------------------


def test_batch_schedule_runs_as_if_one_by_one() -> None:
    crops = [Box(0, 0, 96, 96), Box(0, 32, 96, 128), Box(0, 96, 96, 96), Box(32, 0, 96, 96)]
    assert batch_schedule(crops, 1) == ((0,), (1,), (2,), (3,))
    assert batch_schedule(crops, 8) == ((0,), (1,), (2, 3))
    assert batch_schedule(crops, 8)[2] == (2, 3) and crops[2].intersect(crops[3]) is None
    gen = np.random.default_rng(0)
    boxes = [
        Box(int(gen.integers(0, 20)) * 8, int(gen.integers(0, 20)) * 8, 64, 64) for _ in range(40)
    ]
    for max_batch in (2, 3, 64):
        batches = batch_schedule(boxes, max_batch)
        where = {j: b for b, batch in enumerate(batches) for j in batch}
        assert sorted(where) == list(range(40))
        for batch in batches:
            assert len(batch) <= max_batch
            assert all(boxes[a].intersect(boxes[b]) is None for a in batch for b in batch if a < b)
        for j in range(40):
            for i in range(j):
                if boxes[i].intersect(boxes[j]) is not None:
                    assert where[i] < where[j]
    with pytest.raises(ValueError, match="max_batch"):
        batch_schedule(crops, 0)


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        ("linear", [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]),
        ("chess", [(0, 0), (0, 2), (1, 1), (0, 1), (1, 0), (1, 2)]),
    ],
)
def test_tiles_run_in_the_documented_order(order: str, expected: list) -> None:
    canvas = _photo()
    model = _stand_in_model(canvas, steps=2)
    regions = tile_regions(redraw_grid(H, W, TILE, F8, order))
    assert [r.key for r in regions] == expected
    ran: list[tuple[int, ...]] = []
    redraw_regions(
        model, canvas, regions, denoise=0.5, padding=32, mask_blur=8, seed=1, on_batch=ran.append
    )
    assert ran == [(i,) for i in range(6)]
    # the UNet saw every tile's crop once per step, in that order
    crops = [crop_box(r.box, 32, Box(0, 0, H, W), F8) for r in regions]
    seen = model.unet.seen
    firsts = [seen[2 * i] for i in range(6)]
    assert firsts == [(c.top, c.left, c.height, c.width) for c in crops]


def test_batched_chess_equals_one_by_one_exactly_with_exact_kernels() -> None:
    """Stand-in UNet and VAE (elementwise, no GEMM): batching changes nothing at all."""
    canvas = _photo()
    regions = tile_regions(redraw_grid(H, W, TILE, F8, "chess"))
    outs, runs = [], []
    for max_batch in (1, 8):
        ran: list[tuple[int, ...]] = []
        out, _ = redraw_regions(
            _stand_in_model(canvas, sampler="Euler a"),
            canvas,
            regions,
            denoise=0.5,
            padding=8,
            mask_blur=3,
            seed=2,
            max_batch=max_batch,
            on_batch=ran.append,
        )
        outs.append(out)
        runs.append(ran)
    # padding 8 (mask blur 3 reaches 8 px): crops 80 px; (0,0) and (0,2) are apart, diagonal
    # neighbours overlap
    assert runs[1] == [(0, 1), (2,), (3,), (4, 5)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE"])
def test_batched_chess_equals_one_by_one_on_the_tiny_model(tiny, sampler: str) -> None:
    """Real kernels: a GEMM of batch 1 and of batch k round differently (~1e-6), nothing else
    depends on the batch — stochastic samplers included (per-region generators / trees)."""
    model = _tiny_model(tiny, sampler=sampler, steps=2)
    canvas = _photo()
    regions = tile_regions(redraw_grid(H, W, TILE, F8, "chess"))
    one, _ = redraw_regions(
        model, canvas, regions, denoise=0.5, padding=8, mask_blur=3, seed=4, max_batch=1
    )
    batched, counts = redraw_regions(
        model, canvas, regions, denoise=0.5, padding=8, mask_blur=3, seed=4, max_batch=8
    )
    evaluations = model.evaluations(0.5)  # 2N - 1 for DPM++ SDE
    assert counts.batches == 4 and counts.unet_calls == 4 * evaluations
    _close_in_8_bit(one, batched)
    assert float((one - batched).abs().max()) < 1e-3
    other, _ = redraw_regions(
        model, canvas, regions, denoise=0.5, padding=8, mask_blur=3, seed=5, max_batch=8
    )
    assert float((other - batched).abs().max()) > 0.01  # the seed matters


def test_guided_prediction_batches_cfg() -> None:
    class CondUNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))
            self.batches: list[int] = []

        def forward(self, sample, t, encoder_hidden_states=None, added_cond_kwargs=None, **_):
            self.batches.append(sample.shape[0])
            value = encoder_hidden_states.mean(dim=(1, 2))
            return (value[:, None, None, None].expand_as(sample).clone(),)

    cond = Conditioning(cond=torch.ones(1, 77, 8), uncond=torch.zeros(1, 77, 8))
    unet = CondUNet()
    inputs = guidance_inputs(cond, 7.5, 3)
    assert inputs.guided and inputs.added is None
    out = guided_prediction(unet, torch.zeros(3, 4, 8, 8), torch.tensor(5), inputs, 7.5)
    torch.testing.assert_close(out, torch.full((3, 4, 8, 8), 7.5))
    assert unet.batches == [6]
    plain = guided_prediction(unet, torch.zeros(3, 4, 8, 8), 5, guidance_inputs(cond, 1.0, 3), 1.0)
    torch.testing.assert_close(plain, torch.ones(3, 4, 8, 8))
    assert unet.batches == [6, 3]
    pooled = Conditioning(
        cond=torch.ones(1, 77, 8),
        uncond=torch.zeros(1, 77, 8),
        pooled_cond=torch.ones(1, 4),
        pooled_uncond=torch.zeros(1, 4),
    )
    ids = torch.arange(12.0).view(2, 6)
    inputs = guidance_inputs(pooled, 7.5, 2, time_ids=ids)
    context, added = inputs.context, inputs.added
    assert context.shape == (4, 77, 8) and added is not None
    assert torch.equal(added["time_ids"], torch.cat([ids, ids]))
    assert added["text_embeds"][:2].sum() == 0 and bool((added["text_embeds"][2:] == 1).all())
    with pytest.raises(ValueError, match="time_ids"):
        guidance_inputs(pooled, 7.5, 2)


def test_sdxl_gets_pooled_embeds_and_per_crop_time_ids() -> None:
    parts = make_tiny_components("sdxl", seed=0)
    gen = torch.Generator().manual_seed(1)
    conditioning = Conditioning(
        cond=torch.randn(1, 77, 96, generator=gen),
        uncond=torch.randn(1, 77, 96, generator=gen),
        pooled_cond=torch.randn(1, 32, generator=gen),
        pooled_uncond=torch.randn(1, 32, generator=gen),
    )
    model = _model(
        parts["unet"],
        parts["vae"],
        conditioning,
        sampler="Euler",
        steps=2,
        cfg=5.0,
        scheduler_config=dict(parts["scheduler"].config),
    )
    seen: list[torch.Tensor] = []
    hook = parts["unet"].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"]),
        with_kwargs=True,
    )
    canvas = _photo()
    regions = tile_regions(redraw_grid(H, W, TILE, F8, "linear"))[:2]
    try:
        out, counts = redraw_regions(
            model, canvas, regions, denoise=0.5, padding=16, mask_blur=4, seed=0
        )
    finally:
        hook.remove()
    assert counts.unet_calls == 4 and bool(torch.isfinite(out).all())
    crops = [crop_box(r.box, 16, Box(0, 0, H, W), F8) for r in regions]
    expected = [[H, W, c.top, c.left, c.height, c.width] for c in crops]
    assert [ids[0].tolist() for ids in seen[::2]] == expected  # uncond half, then cond half
    assert all(torch.equal(ids[0], ids[1]) for ids in seen)


def test_bf16_vae_nan_is_read_once_at_the_end_and_the_pass_reruns_in_fp32(monkeypatch) -> None:
    """In bf16 (float32's range) the crop passes' NaN/inf flags stay on the device and are read
    once per pass; NaN then reruns the whole pass with the VAE in float32: the float32 bytes."""

    class NanVAE(ShuffleVAE):
        def decode(self, z: torch.Tensor) -> SimpleNamespace:
            out = super().decode(z)
            if z.dtype == torch.bfloat16:
                out.sample = out.sample * float("nan")
            return out

    canvas = _photo()
    regions = tile_regions(redraw_grid(H, W, TILE, F8, "linear"))
    reads: list[int] = []
    check = VaeRunner.check_finite

    def counted(self: VaeRunner) -> None:
        reads.append(len(self._unchecked))
        check(self)

    monkeypatch.setattr(VaeRunner, "check_finite", counted)
    kw = {"denoise": 0.5, "padding": 32, "mask_blur": 8, "seed": 1, "max_batch": 2}
    model = _stand_in_model(canvas, vae=NanVAE(), vae_dtype=torch.bfloat16)
    notes: list[str] = []
    out, counts = redraw_regions(model, canvas, regions, fallbacks=notes, **kw)
    assert notes == ["VAE produced NaN/inf in torch.bfloat16; re-ran it in fp32"]
    # one read of every bf16 flag (an encode and a decode per batch), then the float32 rerun's
    assert reads == [2 * counts.batches] * 2 and model.vae.dtype == torch.float32
    reference, _ = redraw_regions(_stand_in_model(canvas), canvas, regions, **kw)
    assert torch.equal(out, reference)
    fp32 = _stand_in_model(canvas, vae=NanVAE(), vae_dtype=torch.float32)
    fp32.vae.vae.decode = lambda z: SimpleNamespace(sample=F.pixel_shuffle(z, F8) * float("nan"))
    with pytest.raises(NonFiniteError, match="float32"):
        redraw_regions(fp32, canvas, regions, **kw)


def test_half_precision_vae_overflow_reruns_in_fp32() -> None:
    class OverflowVAE(ShuffleVAE):
        def decode(self, z: torch.Tensor) -> SimpleNamespace:
            out = super().decode(z)
            if z.dtype == torch.float16:  # as SD's VAEs overflow in fp16
                out.sample = out.sample * float("nan")
            return out

    canvas = _photo()
    regions = tile_regions(redraw_grid(H, W, TILE, F8, "linear"))
    model = _stand_in_model(canvas, vae=OverflowVAE(), vae_dtype=torch.float16)
    grid = redraw_grid(H, W, TILE, F8, "linear")
    passes = plan_passes(grid, redraw_options(UpscaleSettings()), 0.5, redraw_tiles=True)
    fallbacks: list[str] = []
    out, _ = run_passes(model, canvas, passes, seed=1, fallbacks=fallbacks)
    assert fallbacks == ["VAE produced NaN/inf in torch.float16; re-ran it in fp32"]
    assert model.vae.dtype == torch.float32 and bool(torch.isfinite(out).all())
    reference, _ = redraw_regions(
        _stand_in_model(canvas), canvas, regions, denoise=0.5, padding=32, mask_blur=8, seed=1
    )
    torch.testing.assert_close(out, reference, atol=2e-3, rtol=0)  # the first encode was fp16


def test_the_canvas_way_in_and_out_counts_in_the_first_pass(monkeypatch) -> None:
    """rediffuse_pixels: the canvas's conversion to its device and back is stage time (the
    first pass's seconds), not time no stage reports; the image comes back as it went in
    where nothing is redrawn (denoise 0 passes still convert)."""
    import time

    canvas = _photo()
    rgb = np.ascontiguousarray(canvas.numpy().transpose(1, 2, 0))
    model = _stand_in_model(canvas)
    grid = redraw_grid(H, W, TILE, F8, "linear")
    passes = plan_passes(grid, redraw_options(UpscaleSettings()), 0.0, redraw_tiles=True)
    real = redraw_module._to_rgb

    def slow(c: torch.Tensor) -> np.ndarray:
        time.sleep(0.3)
        return real(c)

    monkeypatch.setattr(redraw_module, "_to_rgb", slow)
    report = DiffusionReport()
    out, counts = redraw_module.rediffuse_pixels(
        model, rgb, passes, seed=1, max_batch=2, report=report
    )
    assert np.array_equal(out, rgb)
    assert counts[0].name == "redraw" and counts[0].seconds >= 0.3
    assert all(c.seconds < 0.3 for c in counts[1:])


# -- seams -----------------------------------------------------------------------------------


def test_tile_offsets_leave_a_seam_that_each_seam_fix_lowers() -> None:
    """USDU's defaults (padding 32, mask blur 8; seam fix padding 16, mask blur 4) with a colour
    drift of ±0.15 per region (the oracle keys it on the crop); the band is 32 px wide (at 64 it
    would equal a half tile of 64 px)."""
    canvas = _photo(192, 256)  # 3 × 4 tiles: every region has its own crop, so its own offset
    grid = redraw_grid(192, 256, TILE, F8, "linear")
    ratios = {"photo": seam_ratio(canvas, grid)}
    for mode in ("none", "band", "half-tile", "half-tile+intersections"):
        options = redraw_options(UpscaleSettings(seam_fix=mode, seam_width=32))
        passes = plan_passes(grid, options, 0.5, redraw_tiles=True)
        model = _stand_in_model(canvas, offset=0.15)
        out, _ = run_passes(model, canvas, passes, seed=1, max_batch=4)
        ratios[mode] = seam_ratio(out, grid)
    print("seam ratios:", {k: round(v, 3) for k, v in ratios.items()})
    assert ratios["photo"] < 1.1
    assert ratios["none"] > 2.5, ratios
    for mode in ("band", "half-tile", "half-tile+intersections"):
        assert ratios[mode] < 0.6 * ratios["none"], ratios
    assert ratios["half-tile+intersections"] < ratios["half-tile"]


def test_seam_fix_after_the_intersections_leaves_the_corners_smoother() -> None:
    canvas = _photo(192, 256)  # 3 × 4 tiles: every region has its own crop, so its own offset
    grid = redraw_grid(192, 256, TILE, F8, "linear")
    near_corner = {}
    for mode in ("half-tile", "half-tile+intersections"):
        passes = plan_passes(
            grid, redraw_options(UpscaleSettings(seam_fix=mode)), 0.5, redraw_tiles=True
        )
        out, counts = run_passes(_stand_in_model(canvas), canvas, passes, seed=1, max_batch=4)
        assert [c.name for c in counts][-1] == (
            "intersections" if mode.endswith("intersections") else "half-tile-cols"
        )
        patch = out[:, 48:80, 48:80]  # around the corner (64, 64)
        near_corner[mode] = boundary_ratio(patch, (16,), (16,))
    assert near_corner["half-tile+intersections"] <= near_corner["half-tile"] * 1.05


def test_seam_denoise_zero_changes_nothing_and_encodes_nothing() -> None:
    canvas = _photo()
    grid = redraw_grid(H, W, TILE, F8, "linear")
    outs, calls = {}, {}
    for name, options in {
        "none": redraw_options(UpscaleSettings(seam_fix="none")),
        "zero": redraw_options(
            UpscaleSettings(seam_fix="half-tile+intersections", seam_denoise=0.0)
        ),
    }.items():
        model = _stand_in_model(canvas)
        passes = plan_passes(grid, options, 0.5, redraw_tiles=True)
        outs[name], counts = run_passes(model, canvas, passes, seed=1)
        calls[name] = dict(model.vae.vae.calls)
        if name == "zero":
            assert [c.skipped for c in counts] == [False, True, True, True]
    assert torch.equal(outs["none"], outs["zero"])
    assert calls["none"] == calls["zero"] == {"encode": 6, "decode": 6}
    # the same for a seam fix alone (after fused mode): the canvas is returned as it was
    options = redraw_options(UpscaleSettings(seam_fix="band", seam_denoise=0.0))
    passes = plan_passes(grid, options, 0.5, redraw_tiles=False)
    model = _stand_in_model(canvas)
    out, counts = run_passes(model, canvas, passes, seed=1)
    assert out is canvas and model.vae.vae.calls == {"encode": 0, "decode": 0}
    assert [c.name for c in counts] == ["band-rows", "band-cols"]


def test_pass_noise_is_seeded_per_pass() -> None:
    a = redraw_module.pass_noise((4, 8, 8), 7, 0)
    assert torch.equal(a, redraw_module.pass_noise((4, 8, 8), 7, 0))
    assert not torch.equal(a, redraw_module.pass_noise((4, 8, 8), 7, 1))
    assert torch.equal(
        redraw_module.pass_noise((4, 8, 8), 8, 0), redraw_module.pass_noise((4, 8, 8), 7, 1)
    )  # seed + pass index, as documented
    seeds = {redraw_module.region_seed(7, p, i) for p in range(3) for i in range(50)}
    assert len(seeds) == 150


# -- the job level, through the engine --------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_single_file(tiny, tmp_path_factory.mktemp("ckpt") / "sd1.safetensors", "sd1")


class _Progress:
    def __init__(self) -> None:
        self.total = self.done = 0

    def add_total(self, count: int) -> None:
        self.total += count

    def advance(self, count: int) -> None:
        self.done += count


def _engine(checkpoint: Path, mode: str, progress: _Progress | None = None, **values) -> Upscaler:
    settings = UpscaleSettings(
        checkpoint=str(checkpoint), upscaler="lanczos", scale=1.0, mode=mode, tile=64,
        overlap=16, steps=2, denoise=0.4, sampler="Euler a", prompt="a photo", seed=11,
        order="chess", **values,
    )  # fmt: skip
    return Upscaler(settings, progress)


@pytest.mark.parametrize("mode", ["redraw", "fused"])
def test_job_level_passes_counts_and_progress(checkpoint, mode: str) -> None:
    rgb = _photo(120, 150).permute(1, 2, 0).numpy()  # not a multiple of 8: padded, cropped back
    picture = Picture(rgb, None, 8)
    progress = _Progress()
    seams = {"seam_fix": "half-tile+intersections", "seam_denoise": 0.3}
    engine = _engine(checkpoint, mode, progress, **seams)
    result = engine(picture)
    out, stats = result.picture.rgb, result.stats
    assert out.shape == rgb.shape and out.dtype == np.float32
    names = [p["name"] for p in stats.passes]
    seam_names = ["half-tile-rows", "half-tile-cols", "intersections"]
    assert names == (["redraw", *seam_names] if mode == "redraw" else seam_names)
    regions = sum(p["regions"] for p in stats.passes)
    fused = stats.tiles * 2 if mode == "fused" else 0  # 2 steps per tile
    assert progress.done == regions * 2 + fused
    assert engine.planned_tiles(120, 150) == progress.done
    if mode == "redraw":
        # 120x150 → canvas 120x152: 2 rows x 3 cols of 64 px tiles (snapped inward)
        assert stats.tiles == 6 and stats.tile_steps == 12 and stats.steps_per_tile == 2
        assert stats.passes[0]["unet_calls"] == stats.passes[0]["batches"] * 2
    again = engine(picture).picture.rgb
    assert np.array_equal(out, again), "same seed, same bytes"
    zero = _engine(checkpoint, mode, seam_fix="band", seam_denoise=0.0)(picture).picture.rgb
    plain = _engine(checkpoint, mode, seam_fix="none")(picture).picture.rgb
    assert np.array_equal(zero, plain), "--seam-denoise 0 must equal no seam fix"


def test_job_level_refuses_bad_options() -> None:
    for values, message in (
        ({"padding": -4}, "padding"),
        ({"seam_fix": "band", "seam_width": 128}, "seam_width"),
        ({"order": "zigzag"}, "order"),
        ({"seam_fix": "full"}, "seam_fix"),
    ):
        with pytest.raises(SettingsError, match=message):
            UpscaleSettings(mode="redraw", tile=64, overlap=0, steps=1, **values)


def test_overlap_is_not_used_by_redraw_tiles() -> None:
    """Redraw tiles do not overlap (--padding gives context): a tile of 64 px with the default
    --overlap 64 is fine there, not in fused mode; a bad --overlap is still refused."""
    assert UpscaleSettings(mode="redraw", tile=64).overlap == 64
    for values in ({"mode": "fused", "tile": 64}, {"mode": "redraw", "overlap": -8}):
        with pytest.raises(SettingsError, match="overlap"):
            UpscaleSettings(**values)


# -- the CLI --------------------------------------------------------------------------------


def test_cli_redraw_end_to_end(checkpoint, photo, tmp_path, capsys, monkeypatch) -> None:
    import json

    from diffusers import UNet2DConditionModel
    from PIL import Image

    from tileup.cli import main
    from tileup.imageio import read_parameters
    from tileup.infotext import parse_parameters

    source = tmp_path / "photo.png"
    Image.fromarray(np.round(photo * 255).astype(np.uint8)).save(source)  # 64×80 → 128×160
    samples: list[int] = []
    real_forward = UNet2DConditionModel.forward

    def counting(unet, sample, *args, **kwargs):
        samples.append(sample.shape[0])
        return real_forward(unet, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counting)
    base = [
        str(source), "--checkpoint", str(checkpoint), "--upscaler", "lanczos", "--quiet",
        "--tile", "64", "--overlap", "0", "--steps", "2", "--seed", "7", "--mode", "redraw",
        "--order", "chess", "--padding", "16", "--mask-blur", "4",
    ]  # fmt: skip
    out = tmp_path / "redraw.png"
    seams = ["--seam-fix", "half-tile+intersections", "--seam-denoise", "0.3"]
    code = main([*base, *seams, "--seam-padding", "8", "-o", str(out), "--stats"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    stats = json.loads([line for line in captured.out.splitlines() if line.startswith("{")][-1])
    # 128×160: 2 rows × 3 columns of 64 px tiles (snapped inward); seams y 64, x 56 and 104
    names = [p["name"] for p in stats["passes"]]
    assert names == ["redraw", "half-tile-rows", "half-tile-cols", "intersections"]
    assert [p["regions"] for p in stats["passes"]] == [6, 3, 4, 2]
    assert stats["tiles"] == 6 and stats["tile_steps"] == 12 and stats["steps_per_tile"] == 2
    assert stats["seam_fix_jobs"] == 9 and stats["seam_fix_tile_steps"] == 18
    assert sum(samples) == 2 * 2 * (6 + 9)  # CFG-batched, 2 steps, every region
    assert Image.open(out).size == (160, 128)
    _, _, items = parse_parameters(read_parameters(out))
    assert items["Tile mode"] == "redraw" and items["Tile order"] == "chess"
    assert items["Tile padding"] == "16" and items["Mask blur"] == "4"
    assert items["Seam fix"] == "half-tile+intersections" and items["Seam fix denoise"] == "0.3"
    assert items["Seam fix padding"] == "8" and "Tile overlap" not in items
    # --seam-denoise 0 writes the very bytes of no seam fix
    zero, none = tmp_path / "zero.png", tmp_path / "none.png"
    assert main([*base, "--seam-fix", "band", "--seam-denoise", "0", "-o", str(zero)]) == 0
    assert main([*base, "-o", str(none)]) == 0
    assert np.array_equal(np.asarray(Image.open(zero)), np.asarray(Image.open(none)))
    # bad values: exit 2 with the flag named, nothing written
    for extra, message in (
        (["--padding", "-8"], "--padding"),
        (["--seam-width", "128"], "--seam-width"),
        (["--seam-denoise", "2"], "--seam-denoise"),
    ):
        assert main([*base, *extra, "-o", str(tmp_path / "bad.png")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_cli_seam_fix_after_fused_mode(checkpoint, photo, tmp_path, capsys) -> None:
    import json

    from PIL import Image

    from tileup.cli import main
    from tileup.imageio import read_parameters
    from tileup.infotext import parse_parameters

    source = tmp_path / "photo.png"
    Image.fromarray(np.round(photo * 255).astype(np.uint8)).save(source)  # 64×80 → 128×160
    out = tmp_path / "fused.png"
    args = [
        str(source), "--checkpoint", str(checkpoint), "--upscaler", "lanczos", "--quiet",
        "--tile", "64", "--overlap", "16", "--steps", "2", "--seed", "3", "--seam-fix", "band",
        "--seam-width", "32", "--seam-denoise", "0.5", "-o", str(out), "--stats",
    ]  # fmt: skip
    assert main(args) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # fused grid over 128×160 (latent 16×20, tile 8, overlap 2): 3 rows × 3 columns
    assert stats["tiles"] == 9 and stats["tile_steps"] == 18
    assert [p["name"] for p in stats["passes"]] == ["band-rows", "band-cols"]
    assert [p["regions"] for p in stats["passes"]] == [6, 6]
    assert stats["seam_fix_jobs"] == 12 and stats["seam_fix_tile_steps"] == 24
    assert "seam_fix" in stats["seconds"] and "redraw" not in stats["seconds"]
    _, _, items = parse_parameters(read_parameters(out))
    assert items["Tile mode"] == "fused" and items["Tile overlap"] == "16"
    assert items["Seam fix"] == "band" and items["Seam fix width"] == "32"
    assert "Tile padding" not in items and "Mask blur" not in items
    assert items["Tile order"] == "linear"  # the seam-fix passes run in that order


def test_cli_band_seam_fix_on_a_strip_lower_than_the_band(checkpoint, tmp_path, capsys) -> None:
    """20×100 → 40×200: vertical seams only, a band of 64 fits the 64 px tiles across them."""
    import json

    from PIL import Image

    from tileup.cli import main

    source = tmp_path / "strip.png"
    strip = _photo(20, 100).permute(1, 2, 0).numpy()
    Image.fromarray(np.round(strip * 255).astype(np.uint8)).save(source)
    out = tmp_path / "strip_out.png"
    args = [
        str(source), "--checkpoint", str(checkpoint), "--upscaler", "lanczos", "--quiet",
        "--tile", "64", "--steps", "1", "--mode", "redraw", "--seam-fix", "band", "-o", str(out),
        "--stats",
    ]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [p["name"] for p in stats["passes"]] == ["redraw", "band-cols"]
    assert [p["regions"] for p in stats["passes"]] == [4, 3]  # 200 px: 4 tiles, 3 seams
    assert Image.open(out).size == (200, 40)


# -- end to end through the CLI, with the offset denoiser ------------------------------------


def _offset_model(
    sampling: SamplingOptions, offset: Callable[[Crop], torch.Tensor], clean: np.ndarray | None
) -> DiffusionModel:
    """The offset denoiser and the exact VAE as the engine's model, instead of a tiny UNet and
    VAE whose random weights turn any picture into unrelated texture. The denoiser returns
    ``clean`` (HxWx3, the whole canvas) under the crop plus ``offset(crop)``: an ideal model
    that regenerates the picture with a colour bias; without ``clean``, its input plus the
    offset."""
    reference = None if clean is None else torch.from_numpy(clean.transpose(2, 0, 1).copy())
    shuffle = ShuffleVAE()
    return _model(
        OracleUNet(reference, vae=shuffle, offset=offset),
        shuffle,
        _stand_in_conditioning(),
        sampler=sampling.sampler,
        steps=sampling.steps,
        cfg=sampling.cfg,
        vae_batch=1024,  # one encode per batch: the denoiser reads it back
    )


def _run_offset_job(
    source: Path,
    out: Path,
    offset: Callable[[Crop], torch.Tensor],
    clean: np.ndarray | None = None,
    **values: object,
) -> None:
    """A redraw job through the engine and the batch writer (as the CLI runs it), with the
    offset denoiser injected as the engine's model."""
    from tileup.batch import upscale_files

    settings = UpscaleSettings(
        upscaler="lanczos", mode="redraw", tile=64, sampler="Euler", steps=4, denoise=0.5,
        seed=1, **values,
    )  # fmt: skip
    sampling = sampling_options(settings)
    engine = Upscaler(settings, model=_offset_model(sampling, offset, clean))
    outcomes = upscale_files([str(source)], engine=engine, output=str(out))
    assert [o.error for o in outcomes] == [None]


@pytest.fixture
def smooth_photo_file(tmp_path: Path) -> Path:
    """A smooth 96×128 photo (upscaled 2× by lanczos to 192×256: 3 × 4 tiles of 64 px)."""
    from PIL import Image

    path = tmp_path / "smooth.png"
    pixels = _photo(96, 128).permute(1, 2, 0).numpy()
    Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(path)
    return path


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64) / 255


def test_offset_denoiser_seam_and_each_seam_fix(smooth_photo_file, tmp_path) -> None:
    """A denoiser that adds a different colour offset (±0.15) to every crop leaves a seam after
    redraw without seam fix; each seam-fix mode lowers the seam ratio of the written PNG.

    The denoiser regenerates the picture (plus the offset), as a real model redraws the content
    at the seam: one that returned its input would keep the seam it is given."""
    from tileup.cli import main

    base = [str(smooth_photo_file), "--upscaler", "lanczos", "--quiet"]
    plain = tmp_path / "plain.png"
    assert main([*base, "-o", str(plain)]) == 0
    clean = _read(plain).astype(np.float32)  # what the ideal denoiser regenerates
    grid = redraw_grid(192, 256, TILE, F8, "linear")
    ratios = {"plain": seam_ratio(_read(plain), grid)}
    for mode in ("none", "band", "half-tile", "half-tile+intersections"):
        out = tmp_path / f"{mode}.png"
        offset = lambda crop: _offset(*crop, scale=0.15)  # noqa: E731
        _run_offset_job(smooth_photo_file, out, offset, clean, seam_fix=mode, seam_width=32)
        ratios[mode] = seam_ratio(_read(out), grid)
    print("seam ratios:", {k: round(v, 3) for k, v in ratios.items()})
    assert ratios["plain"] < 1.1, ratios
    assert ratios["none"] > 2.5, ratios
    for mode in ("band", "half-tile", "half-tile+intersections"):
        assert ratios[mode] < 0.5 * ratios["none"], ratios
    assert ratios["half-tile+intersections"] < ratios["half-tile"], ratios


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_color_fix_undoes_a_colour_shift_of_the_redraw(
    smooth_photo_file, tmp_path, method: str
) -> None:
    """Re-diffusion that shifts every tile's colour by the same RGB offset moves the mean colour
    by about that much; ``--color-fix`` brings it back within 1/255 of the pixel upscale."""
    from tileup.cli import main

    shift = torch.tensor([0.08, -0.06, 0.05])
    base = [str(smooth_photo_file), "--upscaler", "lanczos", "--quiet"]
    plain, shifted, fixed = (tmp_path / f"{n}.png" for n in ("plain", "shifted", "fixed"))
    assert main([*base, "-o", str(plain)]) == 0
    _run_offset_job(smooth_photo_file, shifted, lambda crop: shift)
    _run_offset_job(smooth_photo_file, fixed, lambda crop: shift, color_fix=method)
    source_mean = _read(plain).mean(axis=(0, 1))
    moved = _read(shifted).mean(axis=(0, 1)) - source_mean
    assert np.all(np.abs(moved - shift.numpy()) < 0.02), moved  # the shift is there, minus clipping
    error = np.abs(_read(fixed).mean(axis=(0, 1)) - source_mean)
    print(f"{method}: shift {np.round(moved * 255, 2)}/255 → {np.round(error * 255, 3)}/255")
    assert np.all(error <= 1 / 255), error * 255


def test_a_batch_out_of_memory_is_split_and_gives_the_same_result() -> None:
    """Exact stand-in kernels: splitting a batch on out-of-memory changes nothing."""

    class SmallCard(OracleUNet):
        def forward(self, sample, t, encoder_hidden_states=None, added_cond_kwargs=None, **kw):
            if sample.shape[0] > 1:
                raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
            return super().forward(sample, t, encoder_hidden_states, added_cond_kwargs, **kw)

    canvas = _photo()
    regions = tile_regions(redraw_grid(H, W, TILE, F8, "chess"))
    args = {"denoise": 0.5, "padding": 8, "mask_blur": 3, "seed": 2}
    one, _ = redraw_regions(_stand_in_model(canvas), canvas, regions, max_batch=1, **args)
    notes: list[str] = []
    model = _stand_in_model(canvas, unet=SmallCard(canvas))
    split, counts = redraw_regions(model, canvas, regions, max_batch=8, fallbacks=notes, **args)
    assert torch.equal(one, split)
    assert counts.batches == 6 and "redraw: out of memory; batches of 1 regions" in notes

"""The tiled VAE's estimated mode (tileup.vae.norms, tileup.vae.estimated): GroupNorm affines
recorded by one pass and given to another.

Tiling stays exact whatever the affines (the tiled pass equals the untiled VAE with those fixed
norms); given the exact affines it gives the exact result while skipping every pass that only
made statistics; the estimate from a small copy is far closer to the exact result than the
per-tile statistics of naive tiling (tiny random-weight VAE: what a real VAE's estimate changes
is not measured here).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from tileup import options as options_module
from tileup.settings import SettingsError, UpscaleSettings
from tileup.vae import estimated
from tileup.vae.estimated import estimated_decode, estimated_encode
from tileup.vae.norms import NormAffines, small_copy
from tileup.vae.runner import VaeOptions, VaeRunner
from tileup.vae.tiled import tiled_decode, tiled_encode

F = 8  # the fixture VAE's scale factor


@pytest.fixture(scope="module")
def picture() -> torch.Tensor:
    """skimage's astronaut, 256² (every 2nd pixel), 1×3×H×W in [-1, 1]."""
    from skimage import data

    rgb = data.astronaut()[::2, ::2].astype(np.float32) / 127.5 - 1
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()


@pytest.fixture(scope="module")
def latents(vae, picture) -> torch.Tensor:
    """The picture's latents (unscaled), 1×4×32×32."""
    return tiled_encode(vae, picture, tile=128)


@contextmanager
def fixed_norms(vae: torch.nn.Module, norms: NormAffines) -> Iterator[None]:
    """Every GroupNorm of ``vae`` computes ``x·a + b`` with ``norms``' affines, in call order."""
    calls = iter(range(len(norms.affines)))

    def fixed(module, inputs, _output):
        k = next(calls)
        assert norms.shapes[k] == (module.num_groups, module.num_channels)
        a, b = norms.affines[k]
        x = inputs[0]  # B×C×H×W, or B×C×N in the attention
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * a.view(shape) + b.view(shape)

    hooks = [
        m.register_forward_hook(fixed) for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _small_side(monkeypatch, side: int) -> None:
    monkeypatch.setattr(estimated, "SMALL_SIDE", side)


def test_the_small_copy_keeps_each_channels_mean_spread_and_range() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 96, 160, generator=gen) * torch.tensor([1.0, 2.0, 0.5])[:, None, None]
    small = small_copy(x, 40, multiple=8)
    assert small.shape == (1, 3, 24, 40)  # longer side ≤ 40, whole multiples of 8
    std, mean = torch.std_mean(x, dim=(0, 2, 3))
    small_std, small_mean = torch.std_mean(small, dim=(0, 2, 3))
    torch.testing.assert_close(small_mean, mean, atol=0.05, rtol=0)
    torch.testing.assert_close(small_std, std, atol=0.05, rtol=0.05)
    assert small.min() >= x.min() and small.max() <= x.max()
    assert small_copy(x, 160) is x  # already small enough
    assert small_copy(x, 4, multiple=8).shape == (1, 3, 8, 8)  # at least one multiple


def test_affines_of_another_norm_are_refused() -> None:
    norms = NormAffines()
    norms.record(torch.nn.GroupNorm(4, 8), torch.ones(1, 8, 1, 1), torch.zeros(1, 8, 1, 1))
    given = norms.frozen()
    with pytest.raises(RuntimeError, match="no recorded affine for GroupNorm 0"):
        given.take(torch.nn.GroupNorm(4, 16))
    given.take(torch.nn.GroupNorm(4, 8))
    with pytest.raises(RuntimeError, match="no recorded affine for GroupNorm 1"):
        given.take(torch.nn.GroupNorm(4, 8))
    with pytest.raises(RuntimeError, match="not recorded into"):
        given.record(torch.nn.GroupNorm(4, 8), torch.ones(1, 8, 1, 1), torch.zeros(1, 8, 1, 1))


def test_affines_go_with_one_picture_and_serve_every_pass(vae, latents) -> None:
    """Norms hold one picture's affines: a batch is refused; given ones are taken from the
    first norm again by every pass (the same object serves twice, to the same bytes)."""
    norms = NormAffines()
    with pytest.raises(ValueError, match="one picture's GroupNorm affines, got 2 pictures"):
        tiled_decode(vae, torch.cat([latents, latents]), tile=8, norms=norms)
    tiled_decode(vae, latents, tile=8, norms=norms)
    given = norms.frozen()
    first = tiled_decode(vae, latents, tile=8, norms=given)
    assert torch.equal(tiled_decode(vae, latents, tile=8, norms=given), first)


def test_given_the_exact_affines_a_recomputing_pass_skips_its_statistics_passes(
    vae, latents, picture, vae_recompute, vae_crops
) -> None:
    """Recorded by the exact pass and given back, under recomputation (every chainable stage's
    output recomputed where it is read, resnets' first convs reduced to statistics): the exact
    result up to the rounding of recomputation, with fewer crops taken."""
    crops = vae_crops
    vae_recompute(True, chain=True)
    for run, x, tile in ((tiled_decode, latents, 8), (tiled_encode, picture, 64)):
        norms = NormAffines()
        crops.clear()
        exact = run(vae, x, tile=tile, batch=2, norms=norms)
        exact_crops = len(crops)
        assert len(norms.affines) > 10  # every GroupNorm of the part
        crops.clear()
        given = run(vae, x, tile=tile, batch=2, norms=norms.frozen())
        assert (given - exact).abs().max().item() < 1e-5, run
        assert len(crops) < exact_crops / 2, (len(crops), exact_crops)


@pytest.mark.parametrize("part", ["decode", "encode"])
def test_tiled_with_given_affines_is_the_untiled_vae_with_those_norms(
    vae, latents, picture, part: str
) -> None:
    """Affines from a small copy (any affines): the tiled pass equals the untiled diffusers VAE
    whose GroupNorms apply them, within the exact tiled VAE's tolerances."""
    x = latents if part == "decode" else picture
    run = tiled_decode if part == "decode" else tiled_encode
    norms = NormAffines()
    run(
        vae, small_copy(x, 8 if part == "decode" else 64, 1 if part == "decode" else F), norms=norms
    )
    given = norms.frozen()
    tiled = run(vae, x, tile=7 if part == "decode" else 56, norms=given)
    with torch.inference_mode(), fixed_norms(vae, given):
        if part == "decode":
            untiled = vae.decode(x).sample.clamp(-1, 1)
        else:
            untiled = vae.encode(x).latent_dist.mean
    assert (tiled - untiled).abs().max().item() < 5e-5


def test_a_larger_copy_gives_a_closer_estimate(vae, latents, picture, monkeypatch) -> None:
    """Statistics from copies of 64, 128 and 192 px of the 256² astronaut: each estimate
    differs from the exact pass, less as the copy grows (a copy of the whole picture is the
    exact pass). With this tiny random-weight VAE the mean error of the decode (outputs in
    [-1, 1]) measured 0.53 / 0.23 / 0.087 and of the encode 49 / 29 / 15 % of the latents' mean
    magnitude: random weights say nothing of a real VAE's error, only that it shrinks."""
    exact = tiled_decode(vae, latents, tile=8)
    z_exact = tiled_encode(vae, picture, tile=64)
    errors, gaps = [], []
    for side in (64, 128, 192):
        _small_side(monkeypatch, side)
        errors.append((estimated_decode(vae, latents, tile=8) - exact).abs().mean().item())
        z = estimated_encode(vae, picture, tile=64)
        gaps.append((z - z_exact).abs().mean().item() / z_exact.abs().mean().item())
    assert errors[0] > errors[1] > errors[2] > 0, errors
    assert gaps[0] > gaps[1] > gaps[2] > 0, gaps


def test_a_picture_small_enough_is_its_own_estimate(vae, latents, picture, vae_crops) -> None:
    """Under SMALL_SIDE the copy is the picture: one exact pass, the exact bytes."""
    exact = tiled_decode(vae, latents, tile=8)
    exact_crops = len(vae_crops)
    assert torch.equal(estimated_decode(vae, latents, tile=8), exact)
    assert len(vae_crops) == 2 * exact_crops
    assert torch.equal(estimated_encode(vae, picture, tile=64), tiled_encode(vae, picture, tile=64))


def test_the_setting_reaches_the_runner(vae, latents, picture, monkeypatch) -> None:
    settings = UpscaleSettings(vae_stats="estimated")
    options = options_module.vae_options(settings, torch.device("cpu"))
    assert options.statistics == "estimated"
    assert options_module.vae_options(UpscaleSettings(), torch.device("cpu")).statistics == "exact"
    with pytest.raises(SettingsError, match=r"vae.stats"):
        UpscaleSettings(vae_stats="fast")
    _small_side(monkeypatch, 64)
    runner = VaeRunner(vae, torch.device("cpu"), torch.float32, VaeOptions(8 * F, 1, "cpu"))
    scaled = latents * runner.scale
    exact = runner.decode_canvas(scaled, [])
    runner.options = options
    estimate = runner.decode_canvas(scaled, [])
    expected = estimated_decode(vae, latents, tile=8, unit_range=True)[0].permute(1, 2, 0)
    # (the runner's latents went through ×scale, ÷scale: float rounding)
    np.testing.assert_allclose(estimate, expected.numpy(), atol=1e-4)
    assert np.abs(estimate - exact).mean() > 1e-2  # the estimate ran
    # the encode takes the picture as it lies, H×W×3 in [0, 1], mapped as the engine copies it
    rgb = ((picture[0].permute(1, 2, 0) + 1) / 2).numpy()
    z = runner.encode_canvas(rgb, []) / runner.scale
    torch.testing.assert_close(z, estimated_encode(vae, picture, tile=8 * F), atol=1e-5, rtol=0)


def test_only_estimated_statistics_are_recorded_in_the_parameters() -> None:
    """An exact job's parameters are as before the setting existed; an estimated one says so."""
    assert "VAE stats" not in UpscaleSettings().metadata_items()
    assert UpscaleSettings(vae_stats="estimated").metadata_items()["VAE stats"] == "estimated"

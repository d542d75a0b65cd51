"""Latent interpolation modes, bislerp included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tileup.choices import LATENT_MODES
from tileup.upscalers.latent import bislerp, interpolate_latents, slerp


@pytest.mark.parametrize("mode", LATENT_MODES)
def test_every_mode_reaches_the_size(mode: str) -> None:
    x = torch.randn(1, 4, 9, 13, generator=torch.Generator().manual_seed(0))
    out = interpolate_latents(x, 18, 26, mode)
    assert out.shape == (1, 4, 18, 26) and torch.isfinite(out).all()
    # a constant latent stays constant under every interpolation
    values = torch.tensor([1.0, -2.0, 0.5, 3.0]).view(1, 4, 1, 1)
    const = values.expand(1, 4, 5, 7).contiguous()
    expected = values.expand(1, 4, 10, 14)
    torch.testing.assert_close(
        interpolate_latents(const, 10, 14, mode), expected, atol=1e-5, rtol=0
    )


def test_nearest_exact_doubles_cells() -> None:
    x = torch.arange(12.0).view(1, 1, 3, 4)
    out = interpolate_latents(x, 6, 8, "nearest-exact")
    torch.testing.assert_close(out[..., ::2, ::2], x)


def test_antialiased_differs_from_plain_when_shrinking() -> None:
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = interpolate_latents(x, 8, 8, "bilinear")
    smooth = interpolate_latents(x, 8, 8, "bilinear-antialiased")
    assert (plain - smooth).abs().max() > 0.1
    torch.testing.assert_close(
        smooth, F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True)
    )


def test_slerp_keeps_unit_norm_and_endpoints() -> None:
    gen = torch.Generator().manual_seed(2)
    a = F.normalize(torch.randn(1, 4, 3, 3, generator=gen), dim=1)
    b = F.normalize(torch.randn(1, 4, 3, 3, generator=gen), dim=1)
    for t in (0.0, 0.25, 0.5, 1.0):
        out = slerp(a, b, torch.full((1, 1, 1, 1), t))
        torch.testing.assert_close(out.norm(dim=1), torch.ones(1, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(slerp(a, b, torch.zeros(1, 1, 1, 1)), a, atol=1e-6, rtol=0)
    torch.testing.assert_close(slerp(a, b, torch.ones(1, 1, 1, 1)), b, atol=1e-5, rtol=0)
    # lerp would shrink the midpoint of two different unit vectors; slerp does not
    assert (0.5 * (a + b)).norm(dim=1).min() < 0.99


def test_bislerp_keeps_magnitudes_between_neighbours() -> None:
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    out = bislerp(x, 12, 12)
    norms, out_norms = x.norm(dim=1), out.norm(dim=1)
    assert out_norms.min() >= norms.min() - 1e-4 and out_norms.max() <= norms.max() + 1e-4
    same = bislerp(x, 6, 6)
    torch.testing.assert_close(same, x)


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="bislerp"):
        interpolate_latents(torch.zeros(1, 4, 2, 2), 4, 4, "cubic")

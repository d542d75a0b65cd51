"""The fused attention kernel (tileup.vae.flash) on the CPU, through Triton's interpreter.

Exactness against float64 softmax attention at sizes that leave partial query and key blocks;
written over its queries; the tiled VAE's attention routes to it only when asked. Its speed and
its bf16 behaviour are measured on the GPU (tests/gpu, bench/vae/profile_vae.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tileup.vae import flash
from tileup.vae import tiled as tv


@pytest.fixture
def interpreted(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Triton's interpreter for the test's kernels (built afresh, dropped afterwards)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    flash._kernel.cache_clear()
    yield
    flash._kernel.cache_clear()


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = (t.double() for t in (q, k, v))
    return torch.softmax(q @ k.T / q.shape[-1] ** 0.5, dim=-1) @ v


@pytest.mark.parametrize(("n", "keys", "d"), [(70, 45, 32), (1, 200, 64), (64, 96, 512)])
def test_fused_attention_is_exact_in_float32(interpreted, n: int, keys: int, d: int) -> None:
    gen = torch.Generator().manual_seed(n + keys + d)
    q, k, v = (torch.randn(x, d, generator=gen) * 2 for x in (n, keys, keys))
    out = flash.flash_attention(q, k, v, config=flash.FlashConfig(16, 16, 4, 1))
    assert out.shape == (n, d) and out.dtype == torch.float32
    truth = reference(q, k, v)
    # float32 rounding of scores up to ~±15, as PyTorch's float32 product-softmax-product
    # (measured: 1.5e-5 against its 8.8e-6 at d = 512)
    torchs = torch.softmax(q @ k.T / d**0.5, dim=-1) @ v
    bound = 2 * (torchs.double() - truth).abs().max().item() + 1e-6
    assert (out.double() - truth).abs().max().item() <= bound


def test_fused_attention_in_half_precision_is_as_close_as_pytorchs(interpreted) -> None:
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(x, 64, generator=gen).half() for x in (48, 300, 300))
    truth = reference(q, k, v)
    mine = flash.flash_attention(q, k, v, config=flash.FlashConfig(16, 32, 4, 1))
    torchs = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None])[0]
    assert mine.dtype == torch.float16
    error = (mine.double() - truth).abs().mean().item()
    assert error <= 1.5 * (torchs.double() - truth).abs().mean().item()


def test_fused_attention_may_write_over_its_queries(interpreted) -> None:
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(x, 32, generator=gen) for x in (40, 50, 50))
    expected = flash.flash_attention(q, k, v)
    queries = q.clone()
    out = flash.flash_attention(queries, k, v, out=queries)
    assert out.data_ptr() == queries.data_ptr() and torch.equal(out, expected)


def test_the_tiled_vae_uses_it_only_when_asked(interpreted, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 1, x, 32, generator=gen) for x in (33, 33, 33))
    calls: list[int] = []
    original = flash.flash_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(flash, "flash_attention", counted)
    chunked = tv._chunked_attention(q, k, v, budget=33 * 5)
    assert not calls  # the default: chunks of two matrix products
    monkeypatch.setenv("TILEUP_VAE_ATTENTION", "fused")
    fused = tv._chunked_attention(q, k, v, budget=33 * 5)
    assert calls == [1]  # one kernel for the one head, whatever the chunk budget
    assert (fused - chunked).abs().max().item() < 1e-5
    assert (fused[0, 0].double() - reference(q[0, 0], k[0, 0], v[0, 0])).abs().max() < 1e-5


def test_what_it_takes_and_its_settings(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not flash.supported(torch.zeros(4, 64))  # the CPU needs the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert flash.supported(torch.zeros(4, 64)) and flash.supported(torch.zeros(4, 512))
    for width in (48, 1024, 8):
        assert not flash.supported(torch.zeros(4, width))
    assert not flash.supported(torch.zeros(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="width 48"):
        flash.flash_attention(*(torch.zeros(4, 48) for _ in range(3)))
    with pytest.raises(ValueError, match="contiguous rows"):
        flash.flash_attention(torch.zeros(4, 64), torch.zeros(64, 5).T, torch.zeros(5, 64))
    assert flash.FlashConfig.from_env() == flash.FlashConfig()
    monkeypatch.setenv("TILEUP_FLASH_CONFIG", "128,64,8,3")
    assert flash.FlashConfig.from_env() == flash.FlashConfig(128, 64, 8, 3)
    monkeypatch.setenv("TILEUP_FLASH_CONFIG", "128,x")
    with pytest.raises(ValueError, match="four integers"):
        flash.FlashConfig.from_env()
    assert not flash.enabled()
    monkeypatch.setenv("TILEUP_VAE_ATTENTION", "fused")
    assert flash.enabled()

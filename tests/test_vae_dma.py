"""Where the tiled VAE's crops may move by DMA (tileup.vae.dma), decided on any machine."""

from __future__ import annotations

import pytest
import torch

from tileup.vae import dma


def test_rows_layout_is_channel_stride_one_and_pixels_side_by_side() -> None:
    canvas = torch.empty(1, 8, 6, 10).contiguous(memory_format=torch.channels_last)[0]
    assert dma.rows_layout(canvas)
    assert dma.rows_layout(canvas[:, 1:4, 2:7])  # a crop: another row pitch, same rows
    assert not dma.rows_layout(torch.empty(8, 6, 10))  # planar C×H×W
    assert not dma.rows_layout(canvas[:, :, ::2])  # every other pixel
    assert not dma.rows_layout(torch.empty(2, 8, 6, 10))  # a batch, not a canvas


def test_the_pinned_limit_is_the_setting_or_half_the_ram(monkeypatch) -> None:
    monkeypatch.setenv("TILEUP_VAE_PINNED_GIB", "1.5")
    assert dma.pinned_limit() == 3 << 29
    monkeypatch.delenv("TILEUP_VAE_PINNED_GIB")
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert dma.pinned_limit() == ram // 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only answer")
def test_without_a_cuda_runtime_nothing_is_pinned_or_moved_by_dma(monkeypatch) -> None:
    assert not dma.allowed()
    assert not dma.may_pin(1 << 20)


@pytest.mark.parametrize("value", [None, "off", "yes"])
def test_dma_is_opt_in(monkeypatch, value) -> None:
    if value is None:
        monkeypatch.delenv("TILEUP_VAE_DMA", raising=False)
    else:
        monkeypatch.setenv("TILEUP_VAE_DMA", value)
    assert not dma.allowed() and not dma.may_pin(1)

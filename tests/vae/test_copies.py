"""tileup.vae.copies: channels-last crops, pastes and nearest ×2 upsampling moved in 16- or
8-byte elements give PyTorch's bytes; other layouts take PyTorch's own copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tileup.vae import copies


def _channels_last(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("channels", "dtype", "element"),
    [
        (128, torch.bfloat16, torch.complex128),  # 256 bytes a pixel: 16 elements of 16
        (4, torch.bfloat16, torch.int64),  # 8 bytes a pixel
        (8, torch.float32, torch.complex128),
        (3, torch.float32, None),  # 12 bytes: PyTorch's copy
    ],
)
def test_a_crop_pasted_into_a_batch_is_the_same_bytes(channels, dtype, element) -> None:
    canvas = _channels_last((1, channels, 30, 40), dtype)[0]  # C×H×W, laid out H×W×C
    batch = torch.zeros(3, channels, 12, 14, dtype=dtype).contiguous(
        memory_format=torch.channels_last
    )
    seen: list[torch.dtype] = []
    original = torch.Tensor.copy_

    def spy(self: torch.Tensor, src: torch.Tensor, *args: object) -> torch.Tensor:
        seen.append(self.dtype)
        return original(self, src, *args)

    torch.Tensor.copy_ = spy  # type: ignore[method-assign]
    try:
        out = copies.copy_(batch[1, :, 1:11, 2:14], canvas[:, 5:15, 7:19])
    finally:
        torch.Tensor.copy_ = original  # type: ignore[method-assign]
    assert seen == [element or dtype]
    assert out.data_ptr() == batch[1, :, 1:11, 2:14].data_ptr()
    assert torch.equal(batch[1, :, 1:11, 2:14], canvas[:, 5:15, 7:19])
    assert not batch[0].any() and not batch[2].any() and not batch[1, :, 0].any()


def test_other_layouts_and_mixed_tensors_take_pytorchs_copy() -> None:
    nchw = torch.randn(2, 16, 5, 6)
    out = torch.empty(2, 16, 5, 6)
    assert torch.equal(copies.copy_(out, nchw), nchw)
    half = torch.empty(2, 16, 5, 6, dtype=torch.bfloat16)
    assert torch.equal(copies.copy_(half, nchw), nchw.to(torch.bfloat16))  # a cast as well
    odd = _channels_last((1, 16, 5, 6), torch.bfloat16)
    window = odd[:, 1:9]  # a channel offset: not a whole number of wide elements
    dst = torch.empty_like(window)
    assert torch.equal(copies.copy_(dst, window), window)


@pytest.mark.parametrize(
    ("channels", "dtype", "channels_last"),
    [
        (128, torch.bfloat16, True),
        (4, torch.float16, True),
        (3, torch.float32, True),
        (8, torch.bfloat16, False),
    ],
)
def test_nearest_upsampling_is_pytorchs(channels, dtype, channels_last) -> None:
    x = _channels_last((2, channels, 7, 9), dtype, seed=channels)
    if not channels_last:
        x = x.contiguous()
    got = copies.upsample_nearest2x(x)
    expected = F.interpolate(x, scale_factor=2.0, mode="nearest")
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    window = copies.upsample_nearest2x(x[:, :, 1:5, 2:7])  # a crop of a larger batch
    assert torch.equal(window, F.interpolate(x[:, :, 1:5, 2:7], scale_factor=2.0))

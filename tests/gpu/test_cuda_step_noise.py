"""Step noise on a real GPU (skipped without one): drawn from CPU generators into pinned memory
and copied without a wait, the values diffusers would draw."""

from __future__ import annotations

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from tileup.sampling import loop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_noise_from_cpu_generators_has_diffusers_values() -> None:
    draw = loop._no_wait(randn_tensor)
    gen, again = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):  # successive draws from one generator, as the steps make them
        mine = draw((2, 4, 64, 64), generator=gen, device="cuda", dtype=torch.float32)
        theirs = randn_tensor((2, 4, 64, 64), generator=again, device=torch.device("cuda"))
        assert mine.is_cuda and torch.equal(mine, theirs)
    gens = [torch.Generator().manual_seed(k) for k in range(3)]
    again_list = [torch.Generator().manual_seed(k) for k in range(3)]
    mine = draw((3, 4, 8, 8), generator=gens, device=torch.device("cuda"))
    assert torch.equal(mine, randn_tensor((3, 4, 8, 8), generator=again_list, device="cuda"))


def test_cuda_generators_are_left_to_diffusers() -> None:
    draw = loop._no_wait(randn_tensor)
    gen = torch.Generator("cuda").manual_seed(1)
    again = torch.Generator("cuda").manual_seed(1)
    assert torch.equal(
        draw((1, 4, 8, 8), generator=gen, device="cuda"),
        randn_tensor((1, 4, 8, 8), generator=again, device=torch.device("cuda")),
    )

"""Step noise from CPU generators: the same values, drawn without waiting for the device."""

from __future__ import annotations

import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from tileup.sampling import loop


def test_noise_off_cuda_is_drawn_as_diffusers_draws_it() -> None:
    draw = loop._no_wait(randn_tensor)
    for device in (None, "cpu", torch.device("cpu")):
        gen, again = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(
            draw((2, 4, 8, 8), generator=gen, device=device),
            randn_tensor((2, 4, 8, 8), generator=again, device=device),
        )
    gens = [torch.Generator().manual_seed(k) for k in range(3)]
    again = [torch.Generator().manual_seed(k) for k in range(3)]
    assert torch.equal(
        draw((3, 4, 8, 8), generator=gens), randn_tensor((3, 4, 8, 8), generator=again)
    )


def test_the_scheduler_module_is_wrapped_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(euler_a, "randn_tensor", randn_tensor)
    scheduler = EulerAncestralDiscreteScheduler()
    loop._without_noise_waits(scheduler)
    wrapped = euler_a.randn_tensor
    assert wrapped is not randn_tensor and wrapped.tileup_no_wait
    loop._without_noise_waits(scheduler)
    assert euler_a.randn_tensor is wrapped

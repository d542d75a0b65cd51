"""The tiled VAE's host-to-device crop copies (:mod:`tileup.vae.transfer`) where no GPU is:
a plain cast on the CPU, whatever the switch; the side stream itself is tested on the GPU
(tests/gpu/test_cuda_vae.py)."""

from __future__ import annotations

import pytest
import torch

from tileup.vae import transfer


@pytest.mark.parametrize("switch", ["on", "off"])
def test_on_the_cpu_an_upload_is_a_cast(monkeypatch, switch) -> None:
    monkeypatch.setenv("TILEUP_VAE_SIDE_COPIES", switch)
    buf = torch.linspace(-2, 2, 24).view(1, 2, 3, 4)
    streams = dict(transfer._SIDE)  # GPU tests earlier in the run may have made some
    out = transfer.upload(buf, torch.device("cpu"), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == buf.shape
    assert torch.equal(out, buf.to(torch.bfloat16))
    assert streams == transfer._SIDE  # no stream for a CPU copy
    assert transfer.enabled() == (switch == "on")

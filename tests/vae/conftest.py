"""Fixtures shared by the tiled VAE's tests."""

from __future__ import annotations

import pytest
import torch
from sd_fixtures import make_tiny_components


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    """The tiny random SD 1.x VAE (scale factor 8), built once per test module."""
    return make_tiny_components("sd1")["vae"]

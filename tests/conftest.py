"""Shared fixtures: real SR weights from ../shared/models, small real photos from skimage."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TILEUP_NO_PROGRESS", "1")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TILEUP_SHARED", REPO.parent / "shared"))
MODELS = SHARED / "models"


@pytest.fixture(scope="session")
def shared_models() -> Path:
    if not MODELS.is_dir():
        pytest.fail(f"real SR weights not found at {MODELS} (set TILEUP_SHARED)")
    return MODELS


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A 64×80 crop of skimage's astronaut as float32 HxWx3 in [0, 1]."""
    from skimage import data

    return (data.astronaut()[120:184, 160:240].astype(np.float32) / 255.0).copy()


@pytest.fixture(autouse=True)
def _isolated_models_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> None:
    monkeypatch.delenv("TILEUP_MODELS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def vae_recompute(monkeypatch: pytest.MonkeyPatch):
    """``vae_recompute(True/False, chain=None)``: every staged VAE engine built afterwards in
    the test recomputes its resnets' first conv (or never does), whatever the store, and
    recomputes chainable stages' outputs instead of storing them (``chain``; default: alike)."""
    from tileup.vae.engine import StagedEngine

    def force(value: bool, chain: bool | None = None) -> None:
        init = StagedEngine.__init__

        def forced(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.recompute = value
            self.chain = value if chain is None else chain

        monkeypatch.setattr(StagedEngine, "__init__", forced)

    return force


@pytest.fixture
def vae_recipes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The depth of every recomputed canvas the staged VAE engines make during the test."""
    from tileup.vae import engine

    depths: list[int] = []
    init = engine.Recipe.__init__

    def recorded(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        depths.append(self.depth)

    monkeypatch.setattr(engine.Recipe, "__init__", recorded)
    return depths


@pytest.fixture
def vae_crops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per crop the staged VAE engines take during the test (a pass over every tile
    takes one per input and batch): ``len()`` counts the work of the passes that ran."""
    from tileup.vae import engine

    crops: list[int] = []
    crop = engine.StagedEngine._crop

    def counted(self, *args, **kwargs):
        crops.append(1)
        return crop(self, *args, **kwargs)

    monkeypatch.setattr(engine.StagedEngine, "_crop", counted)
    return crops

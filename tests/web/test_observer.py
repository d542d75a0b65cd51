"""The pipeline's Observer hooks: what a UI sees of a job, and cancellation within a step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from tileup import Cancelled, Upscaler, UpscaleSettings
from tileup.tiler import Box
from tileup.web.preview import latents_to_rgb


class Recorder:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.stages: list[str] = []
        self.done = 0
        self.added = 0
        self.boxes: list[Box] = []
        self.previews: list[tuple[tuple[int, ...], bool]] = []
        self.cancel_after = cancel_after

    def stage(self, name: str) -> None:
        if not self.stages or self.stages[-1] != name:
            self.stages.append(name)

    def add_total(self, count: int) -> None:
        self.added += count

    def advance(self, count: int) -> None:
        self.done += count
        if self.cancel_after is not None and self.done >= self.cancel_after:
            raise Cancelled("stop")

    def tiles(self, boxes: Sequence[Box]) -> None:
        self.boxes.extend(boxes)

    def preview(self, image: torch.Tensor, latent: bool) -> None:
        self.previews.append((tuple(image.shape), latent))


def _settings(checkpoint: Path, **changes: object) -> UpscaleSettings:
    base = dict(checkpoint=str(checkpoint), upscaler="lanczos", tile=64, overlap=16, steps=2,
                device="cpu", seed=1)  # fmt: skip
    return UpscaleSettings(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "stages"),
    [
        ("fused", ["pixel_upscale", "vae_encode", "diffusion", "vae_decode", "seam_fix", "alpha"]),
        ("redraw", ["pixel_upscale", "redraw", "seam_fix", "alpha"]),
    ],
)
def test_observer_sees_stages_units_tiles_and_previews(
    checkpoint_dir: Path, small_photo: np.ndarray, mode: str, stages: list[str]
) -> None:
    engine = Upscaler(_settings(checkpoint_dir / "tiny.safetensors", mode=mode, seam_fix="band"))
    seen = Recorder()
    plain = engine(small_photo)
    watched = engine(small_photo, observer=seen)
    assert np.array_equal(plain.picture.rgb, watched.picture.rgb)  # watching changes nothing
    assert seen.stages == stages
    assert seen.done == engine.planned_tiles(48, 48) and seen.added == 0
    canvas = Box(0, 0, 96, 96)
    assert seen.boxes and all(canvas.contains(b) and b.area > 0 for b in seen.boxes)
    latent = [shape for shape, is_latent in seen.previews if is_latent]
    pixels = [shape for shape, is_latent in seen.previews if not is_latent]
    assert pixels and all(shape == (3, 96, 96) for shape in pixels)
    assert (mode == "fused") == bool(latent) and all(s == (1, 4, 12, 12) for s in latent)


@pytest.mark.parametrize("mode", ["fused", "redraw"])
def test_cancel_stops_within_a_step(
    checkpoint_dir: Path, small_photo: np.ndarray, mode: str
) -> None:
    engine = Upscaler(_settings(checkpoint_dir / "tiny.safetensors", mode=mode, steps=50))
    seen = Recorder(cancel_after=1)
    with pytest.raises(Cancelled):
        engine(small_photo, observer=seen)
    assert seen.done <= 4  # one model evaluation of at most the four tiles, then stopped


def test_pixel_cores_are_reported_in_output_pixels(small_photo: np.ndarray) -> None:
    engine = Upscaler(UpscaleSettings(device="cpu", model_tile=16))
    seen = Recorder()
    engine(small_photo, observer=seen)
    assert seen.stages == ["pixel_upscale", "alpha"]
    assert len(seen.boxes) == seen.done == 9  # 48 px in 16 px cores: 3×3
    covered = np.zeros((96, 96), int)
    for b in seen.boxes:
        covered[b.slices] += 1
    assert (covered == 1).all()


def test_latent_preview_is_the_fixed_projection() -> None:
    latents = torch.zeros(1, 4, 2, 2)
    latents[0, 0] = 1.0
    rgb = latents_to_rgb(latents)
    assert torch.allclose(rgb[:, 0, 0], torch.tensor([(1 + 0.298) / 2, (1 + 0.207) / 2, 0.604]))


def test_generate_observer_covers_both_passes_and_cancels_in_the_first(
    checkpoint_dir: Path,
) -> None:
    from tileup.txt2img import GenerateSettings, Generator

    settings = GenerateSettings.from_mapping(
        dict(prompt="a cat", checkpoint=str(checkpoint_dir / "tiny.safetensors"), width=64,
             height=64, steps=2, seed=4, tile=128, overlap=32, hr_scale=1.5, device="cpu")
    )  # fmt: skip
    generator = Generator(settings)
    seen = Recorder()
    watched = generator.generate_one(4, seen)
    assert seen.stages[:2] == ["first_pass", "vae_decode"]
    assert seen.stages[2:] == ["pixel_upscale", "diffusion", "vae_decode", "alpha"]
    assert seen.done == generator.planned_units() and seen.added == 0
    assert (8, 8) in {shape[-2:] for shape, latent in seen.previews if latent}  # first pass
    assert (12, 12) in {shape[-2:] for shape, latent in seen.previews if latent}  # hires
    plain = generator.generate_one(4)  # an observer changes nothing in the result
    assert np.array_equal(watched.final.picture.rgb, plain.final.picture.rgb)
    with pytest.raises(Cancelled):
        generator.generate_one(4, Recorder(cancel_after=1))

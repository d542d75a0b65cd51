"""Work split across devices (lanes): the fused tiles of every step, the redraw waves, the files
of a batch. Run here with every lane on the CPU (a replica is a real copy of the model in its
own thread); the GPU machine runs the same code with one lane per GPU."""

from __future__ import annotations

import copy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sd_fixtures import make_tiny_components, save_single_file
from skimage import data

from tileup.batch import upscale_files
from tileup.devices import DeviceError, resolve_devices
from tileup.models.families import SD_TRAINING_CONFIG
from tileup.modes.fused import FusedDenoiser, lane_batches
from tileup.modes.model import DiffusionModel, SamplingOptions
from tileup.modes.redraw import lane_count, redraw_grid, redraw_regions
from tileup.modes.regions import tile_regions
from tileup.pipeline import Upscaler
from tileup.sampling.conditioning import Conditioning
from tileup.settings import SettingsError, UpscaleSettings
from tileup.tiler import plan_grid
from tileup.vae.runner import VaeOptions, VaeRunner

CPU = torch.device("cpu")


class CallCounter:
    """Counts the samples a module's forward sees (a forward pre-hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.samples = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        self.samples += int(args[0].shape[0])


@pytest.fixture(scope="module")
def tiny() -> dict:
    return make_tiny_components("sd1", seed=0)


def _conditioning() -> Conditioning:
    gen = torch.Generator().manual_seed(5)
    return Conditioning(
        cond=torch.randn(1, 77, 32, generator=gen), uncond=torch.randn(1, 77, 32, generator=gen)
    )


def _model(tiny: dict) -> DiffusionModel:
    return DiffusionModel(
        unet=copy.deepcopy(tiny["unet"]),
        vae=VaeRunner(copy.deepcopy(tiny["vae"]), CPU, torch.float32, VaeOptions(512, 1, "cpu")),
        conditioning=_conditioning(),
        sampling=SamplingOptions("Euler a", "normal", 2, 5.0),
        scheduler_config=dict(tiny["scheduler"].config or SD_TRAINING_CONFIG),
        device=CPU,
        dtype=torch.float32,
    )


# -- dealing tiles to lanes --------------------------------------------------------------------


def test_lane_batches_deal_every_tile_once_in_even_batches() -> None:
    tiles = list(range(81))
    one = lane_batches(tiles, 32, 1)  # the fewest batches, even: one UNet shape, not 32, 32, 17
    assert [[len(b) for b in lane] for lane in one] == [[27, 27, 27]]
    assert [t for b in one[0] for t in b] == tiles
    assert [len(b) for b in lane_batches(list(range(10)), 4, 1)[0]] == [4, 3, 3]
    two = lane_batches(tiles, 32, 2)
    assert [[len(b) for b in lane] for lane in two] == [[21, 20], [20, 20]]
    assert [t for lane in two for b in lane for t in b] == tiles
    three = lane_batches(tiles, 8, 3)  # 11 batches → 12, 4 a lane, at most 8 tiles each
    assert [len(lane) for lane in three] == [4, 4, 4]
    assert max(len(b) for lane in three for b in lane) <= 8
    assert [t for lane in three for b in lane for t in b] == tiles
    assert lane_batches([0], 4, 2) == [[[0]], []]  # fewer tiles than lanes: a lane idles
    assert lane_batches([], 4, 1) == [[]] and lane_batches([], 4, 2) == [[], []]


# -- fused: each step's tiles split across lanes -----------------------------------------------


def test_fused_lanes_give_the_one_lane_prediction(tiny) -> None:
    model = _model(tiny)
    replica = copy.deepcopy(model.unet)
    primary_calls, replica_calls = CallCounter(model.unet), CallCounter(replica)
    grid = plan_grid(24, 40, 8, 2)
    latents = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(700)
    one = FusedDenoiser(model.unet, grid, model.conditioning, cfg=5.0, tile_batch=4)
    two = FusedDenoiser(
        model.unet,
        grid,
        model.conditioning,
        cfg=5.0,
        tile_batch=4,
        replicas=[(replica, model.conditioning)],
    )
    expected = one(latents, t)
    primary_calls.samples = 0
    got = two(latents, t)
    two.close()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert float(expected.abs().mean()) > 0.01  # a real prediction, not zeros
    # each lane ran its share: half the tiles each, uncond and cond batched (× 2)
    assert primary_calls.samples + replica_calls.samples == 2 * len(grid)
    assert primary_calls.samples > 0 and replica_calls.samples > 0
    assert two.counter.tile_evaluations == len(grid)


def test_fused_job_on_two_lanes_matches_one(tiny) -> None:
    from tileup.modes.fused import FusedOptions, sample_fused
    from tileup.modes.model import DiffusionReport

    latents = torch.randn(1, 4, 24, 32, generator=torch.Generator().manual_seed(2))
    options = FusedOptions(tile=64, overlap=16, blend="gaussian", tile_batch=2)
    one_model, two_model = _model(tiny), _model(tiny)
    two_model.add_replicas((CPU,))
    assert len(two_model.lanes) == 2
    outs = []
    for model in (one_model, two_model):
        report = DiffusionReport()
        out = sample_fused(model, latents, seed=3, denoise=0.5, options=options, report=report)
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    assert float((outs[0] - latents).abs().mean()) > 0.01  # it was sampled


def test_a_job_on_two_lanes_runs_the_tiled_vae_on_both(tiny, tmp_path: Path) -> None:
    checkpoint = save_single_file(tiny, tmp_path / "sd1.safetensors", "sd1")
    settings = UpscaleSettings(
        checkpoint=str(checkpoint), upscaler="lanczos", scale=1.0, tile=64, overlap=16,
        steps=2, denoise=0.4, prompt="a photo", seed=11, device="cpu", vae_tile=64,
    )  # fmt: skip
    photo = (_photo(128, 64).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    one = Upscaler(settings)(photo)
    engine = Upscaler(settings)
    assert engine.model is not None
    engine.devices = (CPU, CPU)  # two lanes on this CPU-only machine
    engine.model.add_replicas((CPU,))
    replica_vae = CallCounter(engine.model.replicas[0].vae.vae.decoder.mid_block.attentions[0].to_q)
    two = engine(photo)
    assert replica_vae.samples > 0  # the replica's VAE decoded its band of tile rows
    # the fused lanes sum their partial canvases in another order: float rounding apart
    assert np.abs(two.picture.rgb - one.picture.rgb).max() < 1e-4


# -- redraw: each wave's crops split across lanes ----------------------------------------------


def _photo(height: int, width: int) -> torch.Tensor:
    photo = cv2.GaussianBlur(data.astronaut().astype(np.float32) / 255, (0, 0), 6)
    photo = cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(photo.transpose(2, 0, 1)))


def test_redraw_lanes_give_the_one_lane_canvas(tiny) -> None:
    canvas = _photo(96, 128)
    regions = tile_regions(redraw_grid(96, 128, 32, 8, "chess"))
    one_model, two_model = _model(tiny), _model(tiny)
    two_model.add_replicas((CPU,))
    replica_calls = CallCounter(two_model.replicas[0].unet)
    run = dict(denoise=0.5, padding=8, mask_blur=3, seed=4, max_batch=2, min_lane_crops=1)
    one, one_counts = redraw_regions(one_model, canvas, regions, **run)
    two, two_counts = redraw_regions(two_model, canvas, regions, **run)
    assert replica_calls.samples > 0
    assert two_counts.tile_steps == one_counts.tile_steps
    assert two_counts.batches < one_counts.batches  # a batch is max_batch per lane
    assert float((one - two).abs().max()) < 1e-3
    assert float((one - canvas).abs().mean()) > 0.01  # regions were redrawn


def test_lane_count_splits_only_batches_big_enough() -> None:
    assert lane_count(8, 2, 32, 8) == 1  # a linear wave of 8 crops: one device
    assert lane_count(16, 2, 32, 8) == 2
    assert lane_count(40, 2, 32, 8) == 2
    assert lane_count(12, 2, 8, 8) == 2  # one device may not take more than max_batch
    assert lane_count(3, 4, 1, 8) == 3
    assert lane_count(1, 2, 4, 1) == 1


# -- a batch of files: one file per device at a time -------------------------------------------


def test_files_are_spread_across_device_engines(tiny, tmp_path: Path) -> None:
    checkpoint = save_single_file(tiny, tmp_path / "sd1.safetensors", "sd1")
    photos = tmp_path / "in"
    photos.mkdir()
    for k, name in enumerate(["a", "b", "c", "d"]):
        rgb = (_photo(64, 48 + 8 * k).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        cv2.imwrite(str(photos / f"{name}.png"), rgb[:, :, ::-1])
    settings = UpscaleSettings(
        checkpoint=str(checkpoint), upscaler="lanczos", scale=1.0, tile=64, overlap=16,
        steps=2, denoise=0.4, prompt="a photo", seed=11, device="cpu",
    )  # fmt: skip
    one = upscale_files([str(photos)], settings, output=str(tmp_path / "one") + "/")
    engine = Upscaler(settings)
    assert engine.model is not None
    engine.devices = (CPU, CPU)  # two lanes on this CPU-only machine
    engine.model.add_replicas((CPU,))
    replica_calls = CallCounter(engine.model.replicas[0].unet)
    finished: list[str] = []
    two = upscale_files(
        [str(photos)],
        engine=engine,
        output=str(tmp_path / "two") + "/",
        on_outcome=lambda o: finished.append(o.source.name),
    )
    assert [o.source.name for o in two] == ["a.png", "b.png", "c.png", "d.png"]
    assert sorted(finished) == ["a.png", "b.png", "c.png", "d.png"]
    assert all(o.error is None for o in one + two)
    assert replica_calls.samples > 0  # the second engine took files
    for a, b in zip(one, two, strict=True):
        assert a.output is not None and b.output is not None
        assert np.array_equal(cv2.imread(str(a.output)), cv2.imread(str(b.output)))
    assert len(engine.model.replicas) == 1 and engine.devices == (CPU, CPU)  # restored


# -- naming devices ----------------------------------------------------------------------------


def test_device_lists_are_read_and_checked() -> None:
    assert resolve_devices("cpu") == (CPU,)
    if not torch.cuda.is_available():
        assert resolve_devices("all") == (CPU,)
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_devices("cuda:0,cuda:1")
    for good in ["cuda:0,cuda:1", "all", "cuda", "cuda:1"]:
        assert UpscaleSettings(device=good).device == good
    for bad in ["cuda:0,", "gpu", "cuda:0;cuda:1", "cpu,cuda"]:
        with pytest.raises(SettingsError, match=r"^device must be"):
            UpscaleSettings(device=bad)


def test_small_redraw_waves_are_split_only_when_the_unet_is_graphed(tiny) -> None:
    from tileup.modes.redraw import MIN_LANE_CROPS, MIN_LANE_CROPS_GRAPHED, _min_lane_crops
    from tileup.sampling.graphs import GraphedUNet

    model = _model(tiny)
    assert _min_lane_crops(model) == MIN_LANE_CROPS == 8
    model.unet = GraphedUNet(model.unet)
    assert _min_lane_crops(model) == MIN_LANE_CROPS_GRAPHED == 2
    assert lane_count(4, 2, 8, MIN_LANE_CROPS_GRAPHED) == 2  # a wave of 4: 2 + 2
    assert lane_count(4, 2, 8, MIN_LANE_CROPS) == 1
    model.unet.enabled = False  # parked or streamed: launches cost again
    assert _min_lane_crops(model) == MIN_LANE_CROPS

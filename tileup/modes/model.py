"""The one loaded diffusion model every mode runs on.

A :class:`DiffusionModel` holds what a job needs from a checkpoint, placed on the device once:
the UNet, the prompts encoded once, one :class:`~tileup.vae.runner.VaeRunner` (which owns the
VAE's precision and its fp32 fallback) and the sampling options, from which
:meth:`DiffusionModel.step_plan` makes the scheduler and fixed-step plan of any denoise. The
modes (fused, redraw and its seam-fix passes) are functions over it; none of them writes state
back into it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn

from tileup import channel_norm, group_norm_kernel, upsample_conv
from tileup.memory import MAX_UNET_BATCH, UNET_SAMPLE_BYTES_64
from tileup.models.checkpoint import load_checkpoint
from tileup.sampling import shared_prefix
from tileup.sampling.compiled import batch_is_dynamic, compile_module
from tileup.sampling.conditioning import Conditioning, encode_schedule
from tileup.sampling.graphs import GraphedUNet
from tileup.sampling.loop import StepPlan, plan_steps
from tileup.sampling.protocols import Scheduler, UNet
from tileup.sampling.schedules import make_scheduler
from tileup.vae.runner import VaeOptions, VaeRunner


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """diffusers' logger at error level for the duration (its casting warnings are noise)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _fast_layout(unet: nn.Module, *, channels_last: bool = False) -> None:
    """The UNet's faster GPU form: fused QKV projections in its attention (one GEMM instead of
    three); the same function up to kernel rounding. The separate projections the fused
    attention no longer reads are dropped (kept, they were a second copy of ~0.9 GiB of SDXL
    weights: its 8 GiB card ran out of memory loading the text encoders). ``channels_last``
    (see :func:`wants_channels_last`) also makes the weights channels-last, so cuDNN's convs
    take and give channels-last activations with no layout conversions around them."""
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    fuse = getattr(unet, "fuse_qkv_projections", None)
    if not callable(fuse):
        return
    fuse()
    for module in unet.modules():
        if getattr(module, "fused_projections", False):  # cross-attention still reads to_q
            unused = ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v")
            for name in unused:
                setattr(module, name, None)


def wants_channels_last(unet: nn.Module, device: torch.device, load: LoadOptions) -> bool:
    """Whether the UNet's weights go channels-last on CUDA: compiled with a dynamic batch, or eager
    with the one-kernel GroupNorm.

    Eager with PyTorch's GroupNorm, channels-last was slower (diffusion 11.1 s against 10.1 s
    on the reference job, H200, 2026-11-29: its kernel takes NCHW only). Compiled with static
    shapes, inductor's layout optimisation picks channels-last itself (explicit weights changed
    nothing: batch 64 at 64² 124.9 against 125.4 ms). With a dynamic batch (redraw waves)
    inductor turns that optimisation off, and cuDNN converted every conv's input to NHWC and
    its output back: 1.8 s of the 11.8 s the GPU was busy in the compiled redraw job (H200,
    2026-11-30, ``bench/gpu.py --trace``: 53k ``nchwToNhwcKernel`` calls, ~98 per UNet call).
    Eager where the UNet takes the one-kernel GroupNorm (:func:`tileup.group_norm_kernel.wanted`:
    SD 1.x/2.x on GPUs from compute capability 8.0)."""
    if device.type != "cuda":
        return False
    return (load.compile and load.dynamic_batch) or (
        not load.compile and group_norm_kernel.wanted(unet, device)
    )


def _device_of(module: nn.Module) -> torch.device:
    """Where ``module``'s first parameter lives (the CPU for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _runnable(unet: nn.Module, *, compiled: bool, dynamic_batch: bool, graphed: bool) -> UNet:
    """``unet`` as the sampler calls it: compiled (:func:`compile_module`, an ``OptimizedModule``
    with the UNet's interface; ``dynamic_batch`` as there) and/or replayed from CUDA graphs
    (:class:`GraphedUNet`). Compiled, its GroupNorms may come from per-channel statistics
    (:func:`tileup.channel_norm.for_unet`); eager on CUDA, from one Triton kernel where
    :func:`tileup.group_norm_kernel.wanted`. Guidance pairs share the UNet's first layers where
    its architecture allows (:mod:`tileup.sampling.shared_prefix`); on CUDA its upsamplers run as
    2×2 convs of four phases (:mod:`tileup.upsample_conv`), eager or compiled."""
    shared_prefix.install(unet)
    if _device_of(unet).type == "cuda" and upsample_conv.enabled():
        upsample_conv.swap_upsamplers(unet)
    if compiled and channel_norm.for_unet():
        channel_norm.swap_group_norms(unet)
    elif (
        not compiled
        and group_norm_kernel.wanted(unet, device := _device_of(unet))  # (checks the setting)
        and device.type == "cuda"  # not Triton's interpreter on the CPU: far too slow for a UNet
    ):
        channel_norm.swap_group_norms(unet, group_norm_kernel.KernelGroupNorm)
    module = compile_module(unet, dynamic_batch=dynamic_batch) if compiled else unet
    return cast(UNet, GraphedUNet(module) if graphed else module)


@dataclass(frozen=True)
class SamplingOptions:
    """Sampler and schedule names (A1111/ComfyUI), steps actually run, guidance scale."""

    sampler: str
    schedule: str
    steps: int
    cfg: float


@dataclass(frozen=True)
class LoadOptions:
    """What loading a checkpoint needs besides its path."""

    vae: str | None
    prediction: str
    prompt: str
    negative_prompt: str
    compile: bool = False
    """torch.compile the UNet and the crop VAE (their first calls pay the compilation)."""
    dynamic_batch: bool = False
    """Compiled, the UNet's batch is dynamic from its first call: one compilation for the
    varying crop batches of redraw waves. Off (fused: even tile batches, one shape), the first
    shape compiles statically (batch 64: 6.46 s of diffusion against 6.66 s on dynamic-batch
    kernels, H200) and a second batch size compiles once more, dynamic."""
    cuda_graphs: bool = True
    """Replay the UNet, compiled or not, from CUDA graphs (:mod:`tileup.sampling.graphs`)."""


@dataclass(frozen=True, eq=False)
class PromptEncoder:
    """A checkpoint's text encoders (kept on the host) and tokenizers, to encode other prompts
    after loading (per-call prompts, a hires-fix pass with its own prompt)."""

    family: str
    text_encoders: tuple[nn.Module, ...]
    tokenizers: tuple[Any, ...]

    def schedule(
        self,
        prompt: str,
        negative_prompt: str,
        steps: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[tuple[int, Conditioning], ...]:
        """:func:`~tileup.sampling.conditioning.encode_schedule` with the encoders brought to
        ``device`` for the call and sent back to the host after."""
        for encoder in self.text_encoders:
            encoder.to(device=device, dtype=dtype)
        try:
            return encode_schedule(self, prompt, negative_prompt, steps, device=device, dtype=dtype)
        finally:
            for encoder in self.text_encoders:  # no longer needed: free the device memory
                encoder.to("cpu")


@dataclass
class DiffusionReport:
    """Counts and fallbacks of one canvas's re-diffusion (filled in by the modes)."""

    seed: int = 0
    tiles: int = 0
    tile_steps: int = 0
    steps_per_tile: int = 0
    unet_evaluations: int = 0
    tile_batch: int = 0
    fallbacks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModelInfo:
    """What the metadata says of a loaded model: A1111's name, short hash and VAE name."""

    name: str = ""
    model_hash: str = ""
    vae_name: str | None = None
    family: str = ""


class DiffusionModel:
    """A UNet in ``dtype`` on ``device``, the prompts encoded once, one VAE runner, the sampling
    options and the model's training noise schedule. Built by :meth:`load` from a checkpoint,
    or from any parts that fit (tests inject stand-ins this way)."""

    def __init__(
        self,
        *,
        unet: UNet,
        vae: VaeRunner,
        conditioning: Conditioning,
        sampling: SamplingOptions,
        scheduler_config: Mapping[str, Any],
        prediction_type: str = "epsilon",
        device: torch.device,
        dtype: torch.dtype,
        info: ModelInfo | None = None,
        schedule: tuple[tuple[int, Conditioning], ...] = (),
        prompts: PromptEncoder | None = None,
    ) -> None:
        self.unet = unet
        self.vae = vae
        self.conditioning = conditioning
        self.schedule = schedule or ((sampling.steps, conditioning),)
        """(last step, conditioning) pairs of A1111's prompt editing: step i (0-based) uses
        the first entry whose last step is ≥ i (one entry without editing)."""
        self.sampling = sampling
        self.prompts = prompts
        """The text encoders, to encode other prompts later (None: these prompts only)."""
        self.prompt_texts: tuple[str, str] | None = None
        """The (prompt, negative prompt) ``conditioning`` encodes, when known."""
        self.scheduler_config = scheduler_config
        self.prediction_type = prediction_type
        self.device = device
        self.dtype = dtype
        self.info = info or ModelInfo()
        self.factor = vae.factor
        self.unet_placement = "device"
        self._streamed: object | None = None
        self._evaluations: dict[tuple[SamplingOptions, float], int] = {}
        self.replicas: tuple[DiffusionModel, ...] = ()
        """Copies on other devices; the modes split their tiles across ``self`` and these."""
        self.step_plan(1.0)  # refuses a bad sampler, schedule or step count before any work

    @classmethod
    def load(
        cls,
        checkpoint: str,
        *,
        device: torch.device,
        dtype: torch.dtype,
        load: LoadOptions,
        sampling: SamplingOptions,
        vae: VaeOptions,
    ) -> DiffusionModel:
        """Load ``checkpoint`` (offline), place it and encode the prompts once.

        The text encoders run on ``device`` for the prompts and go back to the host after; the
        VAE keeps float32 weights on the device (its runner makes a half copy when asked).
        """
        sd = load_checkpoint(checkpoint, vae=load.vae, prediction=load.prediction)
        with _quiet_diffusers():  # no dtype-cast chatter on the user's terminal
            sd.unet.to(device=device, dtype=dtype)
        if device.type == "cuda":
            _fast_layout(sd.unet, channels_last=wants_channels_last(sd.unet, device, load))
        runner = VaeRunner(sd.vae, device, dtype, replace(vae, compile=load.compile))
        prompts = PromptEncoder(sd.family, tuple(sd.text_encoders), tuple(sd.tokenizers))
        schedule = prompts.schedule(
            load.prompt, load.negative_prompt, sampling.steps, device=device, dtype=dtype
        )
        conditioning = schedule[0][1]
        info = ModelInfo(sd.name, sd.model_hash, sd.vae_name, sd.family)
        graphed = load.cuda_graphs and device.type == "cuda"
        unet = _runnable(
            sd.unet, compiled=load.compile, dynamic_batch=load.dynamic_batch, graphed=graphed
        )
        model = cls(
            unet=unet,
            vae=runner,
            conditioning=conditioning,
            sampling=sampling,
            scheduler_config=sd.scheduler_config,
            prediction_type=sd.prediction_type,
            device=device,
            dtype=dtype,
            info=info,
            schedule=schedule,
            prompts=prompts,
        )
        model.prompt_texts = (load.prompt, load.negative_prompt)
        return model

    @contextmanager
    def sampling_as(
        self, sampling: SamplingOptions, prompt: str, negative_prompt: str
    ) -> Iterator[None]:
        """For the duration: other sampling options and prompts (on the replicas too), the
        prompts encoded again only when their texts, or the steps of an edited prompt, change.
        SamplerError for options that cannot run, before anything changes."""
        texts = (prompt, negative_prompt)
        same_texts = texts == self.prompt_texts
        if not same_texts and self.prompts is None:
            raise ValueError("this model was built without its text encoders: no new prompts")
        saved = [(m.sampling, m.schedule, m.conditioning, m.prompt_texts) for m in self.lanes]
        if same_texts and not (self.edited and sampling.steps != self.sampling.steps):
            schedule = tuple(
                (sampling.steps if k == len(self.schedule) - 1 else last, c)
                for k, (last, c) in enumerate(self.schedule)
            )
        else:
            assert self.prompts is not None
            schedule = self.prompts.schedule(
                prompt, negative_prompt, sampling.steps, device=self.device, dtype=self.dtype
            )
        try:
            for lane in self.lanes:
                lane.sampling, lane.prompt_texts = sampling, texts
                lane.schedule = tuple((last, c.to(lane.device)) for last, c in schedule)
                lane.conditioning = lane.schedule[0][1]
            self.step_plan(1.0)  # a sampler, schedule and steps that can run
            yield
        finally:
            for lane, state in zip(self.lanes, saved, strict=True):
                lane.sampling, lane.schedule, lane.conditioning, lane.prompt_texts = state

    def conditioning_at(self, step: int) -> Conditioning:
        """The conditioning of sampling step ``step`` (0-based; the last one past the end)."""
        for last, conditioning in self.schedule:
            if step <= last:
                return conditioning
        return self.schedule[-1][1]

    @property
    def edited(self) -> bool:
        """Whether the prompts change during sampling (A1111 prompt editing/alternation)."""
        return len(self.schedule) > 1

    def add_replicas(self, devices: tuple[torch.device, ...]) -> None:
        """Copies of the UNet, the VAE runner and the encoded prompts on each of ``devices``
        (the primary's weights, compiled again when the primary is), placed as the primary."""
        replicas = []
        for device in devices:
            base = self._unet_module()
            compiled = hasattr(base, "_orig_mod")
            original = cast(nn.Module, getattr(base, "_orig_mod", base))
            unet_copy = copy.deepcopy(original).to(device)
            graphed = isinstance(self.unet, GraphedUNet) and device.type == "cuda"
            dynamic = batch_is_dynamic(base)
            unet = _runnable(unet_copy, compiled=compiled, dynamic_batch=dynamic, graphed=graphed)
            replica = DiffusionModel(
                unet=unet,
                vae=self.vae.replica(device),
                conditioning=self.conditioning.to(device),
                schedule=tuple((last, c.to(device)) for last, c in self.schedule),
                sampling=self.sampling,
                scheduler_config=self.scheduler_config,
                prediction_type=self.prediction_type,
                device=device,
                dtype=self.dtype,
                info=self.info,
            )
            replica.place_unet(self.unet_placement)
            replicas.append(replica)
        self.replicas = tuple(replicas)

    @property
    def lanes(self) -> tuple[DiffusionModel, ...]:
        """The primary model and its replicas: one lane of work per device."""
        return (self, *self.replicas)

    # -- planning ---------------------------------------------------------------------------

    def step_plan(self, denoise: float) -> tuple[Scheduler, StepPlan]:
        """A fresh scheduler and the fixed-step plan of ``denoise`` (``steps`` steps run)."""
        scheduler = make_scheduler(
            self.sampling.sampler,
            self.sampling.schedule,
            self.scheduler_config,
            prediction_type=self.prediction_type,
        )
        return scheduler, plan_steps(scheduler, self.sampling.steps, denoise)

    def evaluations(self, denoise: float) -> int:
        """Model evaluations a run at ``denoise`` makes with the current sampling options (0 for
        denoise 0); remembered per (options, denoise)."""
        key = (self.sampling, denoise)
        if key not in self._evaluations:
            self._evaluations[key] = self.step_plan(denoise)[1].evaluations
        return self._evaluations[key]

    def canvas_size(self, height: int, width: int) -> tuple[int, int]:
        """The pixel canvas actually diffused: ``height``×``width`` rounded up to the factor."""
        f = self.factor
        return math.ceil(height / f) * f, math.ceil(width / f) * f

    # -- placement (a memory plan moves models between the device and the host) -------------

    def weight_bytes(self) -> tuple[int, int, int]:
        """Bytes of (UNet, VAE with its half-precision copy, largest UNet block) on the device."""
        from tileup.devices import module_bytes

        unet = module_bytes(self._unet_module())
        params = list(self.vae.vae.parameters())
        fp32 = sum(p.numel() * p.element_size() for p in params)
        vae = fp32 + (fp32 // 2 if self.vae.dtype != torch.float32 else 0)
        blocks = self._unet_blocks()
        return unet, vae, max((module_bytes(b) for b in blocks), default=unet)

    def _unet_module(self) -> torch.nn.Module:
        """The UNet module itself (inside its CUDA-graph wrapper, if any)."""
        unet = self.unet.unet if isinstance(self.unet, GraphedUNet) else self.unet
        assert isinstance(unet, torch.nn.Module), "placement needs an nn.Module UNet"
        return unet

    def release_graphs(self) -> None:
        """Free the UNet's CUDA graphs and their memory (here and on the replicas); the next
        diffusion captures again. The pipeline calls it after each diffusion stage."""
        for lane in self.lanes:
            if isinstance(lane.unet, GraphedUNet):
                lane.unet.release()

    def _unet_blocks(self) -> list[torch.nn.Module]:
        unet = self._unet_module()
        blocks = [*getattr(unet, "down_blocks", []), *getattr(unet, "up_blocks", [])]
        mid = getattr(unet, "mid_block", None)
        return blocks + ([mid] if mid is not None else [])

    def place_unet(self, where: str) -> None:
        """``"device"``, ``"host"`` (parked while other stages need the memory) or
        ``"streamed"`` (blocks brought to the device one at a time: it does not fit)."""
        from tileup.devices import StreamedBlocks

        for replica in self.replicas:
            replica.place_unet(where)
        if where == self.unet_placement:
            return
        if isinstance(self.unet, GraphedUNet):  # graphs hold the weights' addresses
            self.unet.release()
            self.unet.enabled = where == "device"
        if isinstance(self._streamed, StreamedBlocks):
            self._streamed.remove()
            self._streamed = None
        unet = self._unet_module()
        if where == "streamed":
            self._streamed = StreamedBlocks(unet, self._unet_blocks(), self.device)
        else:
            unet.to(self.device if where == "device" else torch.device("cpu"))
        self.unet_placement = where

    def place_vae(self, where: str) -> None:
        """``"device"`` or ``"host"``."""
        for replica in self.replicas:
            replica.place_vae(where)
        self.vae.place(self.device if where == "device" else torch.device("cpu"))

    def pad_canvas(self, rgb: np.ndarray) -> np.ndarray:
        """An HxWxC image padded at the bottom/right to :meth:`canvas_size` by reflection (edge
        where the image is too small to reflect)."""
        height, width = self.canvas_size(*rgb.shape[:2])
        pad_h, pad_w = height - rgb.shape[0], width - rgb.shape[1]
        if pad_h == 0 and pad_w == 0:
            return rgb
        reflect = pad_h < rgb.shape[0] and pad_w < rgb.shape[1]
        mode: Literal["reflect", "edge"] = "reflect" if reflect else "edge"
        return np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode=mode)

    def tile_batch(
        self, tile_height: int, tile_width: int, count: int, requested: int | None
    ) -> int:
        """Tiles (latent ``tile_height``×``tile_width``) per UNet batch: ``requested`` (the
        pipeline passes its memory plan's), or as many as fit in half the free device memory by
        the plan's per-sample estimate (CUDA, at most 32), or 4 on the CPU."""
        if requested:
            return min(requested, count)
        if self.device.type != "cuda":
            return min(4, count)
        free, _ = torch.cuda.mem_get_info(self.device)
        area = tile_height * tile_width / 64**2
        per_tile = UNET_SAMPLE_BYTES_64 * area * (2 if self.sampling.cfg != 1 else 1)
        fits = max(1, int(free * 0.5 // per_tile))
        return min(count, fits, MAX_UNET_BATCH)

"""Where and in what precision things run: the device by name, and the two precision rules.

SR models prefer fp16 (what most ESRGAN-family weights are made for, per spandrel's flags);
Stable Diffusion runs in bf16 where the GPU has it (fp16 UNets and VAEs overflow more often).
Both fall back to fp32 on the CPU, and both rules live here.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext

import torch

from tileup.errors import TileupError

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DeviceError(TileupError):
    """The device asked for does not exist on this machine."""


def resolve_devices(name: str) -> tuple[torch.device, ...]:
    """The devices a job runs on, the first one primary: ``all`` → every CUDA device (the CPU
    when there is none); ``cuda:0,cuda:1`` → those (each once, in order); else one device as
    :func:`resolve_device` reads it."""
    if name == "all":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return (torch.device("cpu"),)
        return tuple(torch.device("cuda", i) for i in range(count))
    if "," not in name:
        return (resolve_device(name),)
    devices: list[torch.device] = []
    for part in name.split(","):
        device = resolve_device(part.strip())
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in devices:
            devices.append(device)
    return tuple(devices)


def resolve_device(name: str) -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


EXPANDABLE_BELOW = 48 << 30
"""Memory budgets under this many bytes (cards up to 48 GiB, or ``--vram``) switch PyTorch's
CUDA allocator to expandable segments (:func:`cuda_allocator_for`)."""


def cuda_allocator_for(budget: int) -> str:
    """Sets up PyTorch's CUDA caching allocator for a memory plan of ``budget`` bytes; says how.

    Under :data:`EXPANDABLE_BELOW` it grows one segment in place (``expandable_segments``)
    instead of reserving a segment per large allocation, unless ``PYTORCH_CUDA_ALLOC_CONF`` or
    ``PYTORCH_ALLOC_CONF`` sets the allocator up. A small card otherwise fragments: the 8192²
    print on an 8 GiB card ran out of memory allocating the tiled VAE's 1 GiB attention
    buffers with 2.79 GiB reserved but free in pieces (H200, 2026-11-30, 2e7258c); with
    expandable segments it ran, in 82.4 s. Applies to segments reserved from now on. Returns
    ``"expandable segments"``, ``"set by the environment"`` or ``"PyTorch's default"``."""
    if any(os.environ.get(name) for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        return "set by the environment"
    if budget >= EXPANDABLE_BELOW:
        return "PyTorch's default"
    # PyTorch 2.9+ names the setter per accelerator (the CUDA one warns that it is deprecated)
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    try:
        (setter or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
    except (AttributeError, RuntimeError, TypeError):  # a PyTorch or platform without them
        return "PyTorch's default"
    return "expandable segments"


def on_device(device: torch.device) -> AbstractContextManager[object]:
    """``device`` made the current CUDA device for a block (a no-op elsewhere)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def sr_dtype(
    setting: str, device: torch.device, *, supports_half: bool, supports_bf16: bool
) -> tuple[torch.dtype, str | None]:
    """An SR model's precision and, when the asked one is not supported, the note saying so.

    ``auto``: fp32 off CUDA; on CUDA fp16 if the model supports it, else bf16, else fp32.
    """
    if setting == "auto":
        if device.type != "cuda":
            return torch.float32, None
        if supports_half:
            return torch.float16, None
        return (torch.bfloat16 if supports_bf16 else torch.float32), None
    dtype = _DTYPES[setting]
    allowed = {torch.float32: True, torch.float16: supports_half, torch.bfloat16: supports_bf16}
    if not allowed[dtype]:
        return torch.float32, f"upscaler does not support {setting}; using fp32"
    return dtype, None


def diffusion_dtype(setting: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU; on CUDA bf16 where supported, else fp16; or what ``setting`` names."""
    if setting == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return _DTYPES[setting]


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class StreamedBlocks:
    """Keep the big blocks of a module on the host and bring each to ``device`` only while it
    runs (sequential offload): device memory holds one block's weights at a time.

    The host copies are pinned once; a block's forward swaps its parameters to device copies
    and back to the host copies after (nothing is copied back: inference only). Everything
    not in ``blocks`` is moved to the device and stays there. :meth:`remove` undoes it all.
    """

    def __init__(
        self, module: torch.nn.Module, blocks: list[torch.nn.Module], device: torch.device
    ) -> None:
        self.module, self.blocks, self.device = module, blocks, device
        inside = {id(p) for b in blocks for p in [*b.parameters(), *b.buffers()]}
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in inside:
                t.data = t.data.to(device)
        self.host: dict[int, torch.Tensor] = {}
        for b in blocks:
            for t in [*b.parameters(), *b.buffers()]:
                host = t.data.to("cpu")
                self.host[id(t)] = host.pin_memory() if device.type == "cuda" else host
                t.data = self.host[id(t)]
        self.handles = [
            h for b in blocks for h in (
                b.register_forward_pre_hook(self._load), b.register_forward_hook(self._unload)
            )
        ]  # fmt: skip

    def _load(self, block: torch.nn.Module, args: object) -> None:
        for t in [*block.parameters(), *block.buffers()]:
            t.data = self.host[id(t)].to(self.device, non_blocking=True)

    def _unload(self, block: torch.nn.Module, args: object, output: object) -> None:
        for t in [*block.parameters(), *block.buffers()]:
            t.data = self.host[id(t)]

    def remove(self) -> None:
        """Back to one resident module on the device."""
        for h in self.handles:
            h.remove()
        for b in self.blocks:
            for t in [*b.parameters(), *b.buffers()]:
                t.data = self.host[id(t)].to(self.device)
        self.host.clear()


def to_hwc(image: torch.Tensor) -> torch.Tensor:
    """A C×H×W host tensor as a new contiguous H×W×C one (torch's copy runs on every core,
    numpy's transposing copy on one)."""
    return torch.empty(image.shape[1:] + image.shape[:1], dtype=image.dtype).copy_(
        image.permute(1, 2, 0)
    )


def hwc_view(image: torch.Tensor) -> torch.Tensor:
    """A C×H×W host tensor as H×W×C: a view when it is laid out H×W×C in memory (channels-last),
    else a new tensor (:func:`to_hwc`)."""
    hwc = image.permute(1, 2, 0)
    return hwc if hwc.is_contiguous() else to_hwc(image)


def to_pinned_host(data: torch.Tensor) -> torch.Tensor:
    """A copy of a dense CUDA tensor in pinned host memory, in its layout, after one wait for
    its stream: ~50 GB/s against ~1.6 GB/s for ``.cpu()`` into pageable memory (the redraw's
    4096² canvas: 127 ms, H200, 2026-11-30). The block comes from PyTorch's caching host
    allocator and goes back to it when the copy is freed, so the next job's copy of that size
    allocates nothing."""
    host, done = start_pinned_copy(data)
    done.synchronize()
    return host


def start_pinned_copy(data: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """:func:`to_pinned_host` without the wait: the pinned host tensor, whose values are there
    once the returned event (recorded on ``data``'s current stream after the copy) completes."""
    host = torch.empty_strided(data.shape, data.stride(), dtype=data.dtype, pin_memory=True)
    host.copy_(data, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(data.device))
    return host, done

"""The UNet replayed from CUDA graphs: one capture per batch shape, no per-kernel launches.

A UNet call on a few tiles (a redraw wave, a small card's batch) is bound by the host launching
its ~1500 kernels, not by the GPU (36 ms for a 512² tile with CFG on an H200, eager). A CUDA
graph launches the whole recorded call at once. :class:`GraphedUNet` wraps a resident CUDA UNet
and keeps the UNet's call signature: the first call with a new input signature (shapes, dtypes,
device, the timestep's kind) runs eagerly, the second captures a graph (its output is the
warm-up call made on the capture stream just before) and every later one copies its inputs into
the graph's static buffers and replays it. The kernels are the ones eager runs, so the output
is the same. A compiled UNet (``torch.compile``) is graphed the same way: its first call at a
shape compiles, the capture records the generated kernels (SD 1.5, batch 8 at 72² latent on an
H200, 2026-11-30: 36.7 ms graphed eager, 35.1 compiled, 26.2 compiled and graphed).

Anything the graph cannot hold runs eagerly, as before: a UNet not wholly on one CUDA device
(parked on the host, streamed block by block), grad mode, a dispatch mode watching the ops
(``FlopCounterMode``: a replay runs none of them), keyword arguments other than the
text states and SDXL's added conditions, more signatures than :data:`MAX_GRAPHS`, a call whose
activations (the memory plan's per-sample estimate) would not fit twice in the free memory,
a capture that fails (out of memory): those signatures stay eager. A graph keeps its
activations' memory in its own pool, beside the allocator's cache, so on a card where the
UNet batch was sized to the memory the graphs step aside (measured on an emulated 8 GiB card,
2026-11-30: graphs there made the UNet batch halve three times). Graphs share one memory pool
per wrapper and hold it until :meth:`GraphedUNet.release`; the model releases them when it
moves the UNet and after each diffusion stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tileup.memory import RESERVE_BYTES, UNET_SAMPLE_BYTES_64

MAX_GRAPHS = 16
"""Input signatures captured at most per wrapper (beyond them, new signatures run eagerly)."""

Signature = tuple[Any, ...]


@dataclass(eq=False)
class _Graph:
    """A captured call: its graph, static inputs and output."""

    graph: torch.cuda.CUDAGraph
    sample: torch.Tensor
    timestep: torch.Tensor
    context: torch.Tensor
    added: dict[str, torch.Tensor] | None
    output: torch.Tensor


def _describe(value: torch.Tensor) -> tuple[Any, ...]:
    return (tuple(value.shape), value.dtype, value.device, value.stride())


def dispatch_mode_active() -> bool:
    """Whether a ``TorchDispatchMode`` (``FlopCounterMode``, a debug mode) watches the ops: a
    graph's replay runs none of them, so such calls run eagerly and the mode sees them all."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


class GraphedUNet(nn.Module):
    """``unet`` (a diffusers ``UNet2DConditionModel``-like module) called through CUDA graphs
    where it can be (see the module docstring); attributes it lacks come from ``unet``.

    ``enabled`` False makes every call eager (the model sets it while the UNet is not wholly on
    its device). ``captures`` and ``replays`` count what happened (for tests and reports).
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.enabled = True
        self.captures = 0
        self.replays = 0
        self.declined = 0
        """Signatures left eager: no room for a graph's memory, or a failed capture."""
        self._graphs: dict[Signature, _Graph] = {}
        self._seen: set[Signature] = set()
        self._eager_only: set[Signature] = set()
        self._pool: Any = None
        self._stream: torch.cuda.Stream | None = None
        self._resident_key: tuple[torch.device, int] | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def release(self) -> None:
        """Drop every graph and its memory (the next calls capture again)."""
        self._graphs.clear()
        self._seen.clear()
        self._eager_only.clear()
        self._pool = None

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        *,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        return_dict: bool = False,
        **kwargs: Any,
    ) -> Any:
        signature = (
            None
            if kwargs or return_dict
            else self._signature(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        )
        if signature is None or signature in self._eager_only:
            return self._eager(sample, timestep, encoder_hidden_states, added_cond_kwargs, **kwargs)
        graph = self._graphs.get(signature)
        if graph is None:
            # the timestep as the graph's buffer holds it, so a compiled UNet sees one form
            timestep = _on_device(timestep, sample.device)
            if signature not in self._seen or len(self._graphs) >= MAX_GRAPHS:
                self._seen.add(signature)
                return self._eager(sample, timestep, encoder_hidden_states, added_cond_kwargs)
            warm = self._capture(
                signature, sample, timestep, encoder_hidden_states, added_cond_kwargs
            )
            if warm is None:
                return self._eager(sample, timestep, encoder_hidden_states, added_cond_kwargs)
            return warm
        self._fill(graph, sample, timestep, encoder_hidden_states, added_cond_kwargs)
        graph.graph.replay()
        self.replays += 1
        return (graph.output.clone(),)

    # -- internals ---------------------------------------------------------------------------

    def _signature(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor,
        added: dict[str, torch.Tensor] | None,
    ) -> Signature | None:
        """The call's graph key, or None when this call must run eagerly."""
        device = sample.device
        if (
            not self.enabled
            or device.type != "cuda"
            or torch.is_grad_enabled()
            or torch.cuda.is_current_stream_capturing()
            or dispatch_mode_active()
            or context.device != device
        ):
            return None
        if isinstance(timestep, torch.Tensor):
            if timestep.dim() != 0 or timestep.device.type not in ("cpu", device.type):
                return None
            kind: Any = timestep.dtype
        elif isinstance(timestep, (int, float)):
            kind = type(timestep)
        else:
            return None
        extras: tuple[Any, ...] = ()
        if added is not None:
            if any(v.device != device for v in added.values()):
                return None
            extras = tuple((k, *_describe(v)) for k, v in sorted(added.items()))
        if not self._resident(device):
            return None
        mode = torch.is_inference_mode_enabled()  # inference tensors stay in inference mode
        return (_describe(sample), kind, _describe(context), extras, mode)

    def _resident(self, device: torch.device) -> bool:
        """Whether every parameter and buffer sits on ``device`` (checked once per signature
        and again whenever the first parameter moved)."""
        first = next(self.unet.parameters(), None)
        if first is None or first.device != device:
            return False
        key = (device, first.data_ptr())
        if self._resident_key == key:
            return True
        tensors: Iterator[torch.Tensor] = iter([*self.unet.parameters(), *self.unet.buffers()])
        if any(t.device != device for t in tensors):
            return False
        if self._graphs:  # the weights moved since the graphs were captured
            self.release()
        self._resident_key = key
        return True

    def _eager(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor,
        added: dict[str, torch.Tensor] | None,
        **kwargs: Any,
    ) -> Any:
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=context,
            added_cond_kwargs=added,
            return_dict=False,
            **kwargs,
        )

    def _capture(
        self,
        signature: Signature,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        added: dict[str, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, ...] | None:
        """Record a call with this signature and return its output: the warm-up call that
        precedes the capture (on the capture stream) computes it. None, and eager from now on
        for this signature, when the free memory cannot hold its activations twice or the
        warm-up fails; a failed capture returns the warm-up's output and stays eager too."""
        device = sample.device
        samples = max(sample.shape[0], context.shape[0])  # a guidance pair: k latents, 2k states
        area = samples * sample.shape[-2] * sample.shape[-1] / 64**2
        need = 2 * UNET_SAMPLE_BYTES_64 * area + RESERVE_BYTES
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
        if free - torch.cuda.memory_allocated(device) < need:
            self._eager_only.add(signature)
            self.declined += 1
            return None
        static_sample, static_t = _like(sample), _like(timestep)
        static_context = _like(context)
        static_added = None if added is None else {k: _like(v) for k, v in added.items()}
        holder = _Graph(
            torch.cuda.CUDAGraph(), static_sample, static_t, static_context, static_added, sample
        )
        self._fill(holder, sample, timestep, context, added)
        inputs = (static_sample, static_t, static_context, static_added)
        warm: tuple[torch.Tensor, ...] | None = None
        try:
            if self._stream is None or self._stream.device != device:
                self._stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]  # torch
            stream = self._stream
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # warm-up off the capture: lazy library set-up
                warm = tuple(self._eager(*inputs))
            current = torch.cuda.current_stream(device)
            current.wait_stream(stream)
            for tensor in warm:  # made on the side stream, read on the caller's
                tensor.record_stream(current)
            with torch.cuda.graph(
                holder.graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"
            ):
                holder.output = self._eager(*inputs)[0]
        except (torch.OutOfMemoryError, RuntimeError):  # incl. a stream the driver cannot create
            self._eager_only.add(signature)
            self.declined += 1
            torch.cuda.synchronize(device)
            return warm
        if self._pool is None:
            self._pool = holder.graph.pool()
        self._graphs[signature] = holder
        self.captures += 1
        return warm

    @staticmethod
    def _fill(
        graph: _Graph,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        context: torch.Tensor,
        added: dict[str, torch.Tensor] | None,
    ) -> None:
        """Copy a call's inputs into the graph's static buffers (no host sync: a CPU
        timestep is written as a kernel argument)."""
        graph.sample.copy_(sample)
        if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            graph.timestep.copy_(timestep)
        else:
            value = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
            graph.timestep.fill_(value)
        graph.context.copy_(context)
        if added is not None and graph.added is not None:
            for key, tensor in added.items():
                graph.added[key].copy_(tensor)


def _like(tensor: torch.Tensor) -> torch.Tensor:
    """An empty buffer like ``tensor``, an inference tensor only when ``tensor`` is one: a
    compiled UNet's guards tell the two apart, so a buffer of the other kind would compile it
    again (text states built outside inference mode, latents inside)."""
    if tensor.is_inference():
        return torch.empty_like(tensor)
    with torch.inference_mode(False):
        return torch.empty_like(tensor)


def _on_device(timestep: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """``timestep`` as a 0-dim tensor on ``device``, of the dtype the graph's buffer takes
    (its own; float64 or int64 for a Python float or int, as diffusers makes them)."""
    if isinstance(timestep, torch.Tensor):
        return timestep.to(device)
    dtype = torch.float64 if isinstance(timestep, float) else torch.int64
    return torch.tensor(timestep, dtype=dtype, device=device)

"""The UNet compiled by ``torch.compile``, its batch dimension dynamic from the first call.

Left to itself, dynamo compiles the first call for its exact shapes and, when a second batch
size comes (a fused step's last batch of 17 tiles after 32; a redraw wave of 3 crops after 1),
compiles again with the batch made dynamic: two compilations where one would do, each about
46 s on a cold cache and 8 s from torch's inductor cache (SD 1.5 UNet, H200, 2026-11-30). A
forward pre-hook on the compiled module marks dimension 0 of every tensor input (the latents,
the text states, SDXL's added conditions) as possibly dynamic before dynamo sees the call, so
one compilation serves every batch size. Runtime does not change: the reference job's steps
already ran the dynamic-batch kernels after its second shape (diffusion 6.46 s against ~6.4 s
for the static shapes' forwards, bench/diffusion/results/profile-unet-h200.json).

The compiler's start/end callbacks feed :data:`tileup.progress.COMPILING`, so a job's stage
times leave the compilation out and its stats report it apart (``seconds["compile"]``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from tileup.progress import COMPILING


def _tensors(values: Iterable[Any]) -> Iterable[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            yield from _tensors(value.values())


def _mark_batch_dynamic(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for tensor in _tensors((*args, *kwargs.values())):
        if tensor.dim() > 0:  # a scalar timestep has no batch dimension
            torch._dynamo.maybe_mark_dynamic(tensor, 0)


BACKEND = "inductor"
"""The compiler backend (tests set ``"eager"``: dynamo traces, no kernels are generated)."""

_timed = False


def _time_compilations() -> None:
    """Route the compiler's start/end callbacks to :data:`tileup.progress.COMPILING` (once)."""
    global _timed
    if _timed:
        return
    try:
        from torch._dynamo.callback import on_compile_end, on_compile_start
    except ImportError:  # an older torch: the stages then include their compilation
        return
    on_compile_start(lambda _args: COMPILING.started())
    on_compile_end(lambda _args: COMPILING.ended())
    _timed = True


def compile_unet(unet: nn.Module) -> nn.Module:
    """``torch.compile(unet)`` (an ``OptimizedModule``: same interface, ``_orig_mod`` is
    ``unet``) whose inputs' batch dimension is marked dynamic at every call."""
    _time_compilations()
    compiled = cast(nn.Module, torch.compile(unet, backend=BACKEND))
    compiled.register_forward_pre_hook(_mark_batch_dynamic, with_kwargs=True)
    return compiled

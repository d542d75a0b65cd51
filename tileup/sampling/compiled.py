"""A module (the UNet, the crop VAE) compiled by ``torch.compile``, timed and cached.

Dynamo compiles the first call for its exact shapes and, when another batch size comes,
compiles again with the batch dynamic; each compilation of the SD 1.5 UNet costs ~46 s static
and ~60 s dynamic on a cold cache, ~8 s from torch's inductor cache (H200, 2026-11-30). A
dynamic batch is not one compilation for every size: dynamo specialises sizes 0 and 1, and
diffusers and PyTorch branch on the batch (``Upsample2D`` at 64 samples, the conv's shape
checks at 16), so 2–15, 16–63 and ≥ 64 samples compile apart. Hence:

* fused mode cuts its tiles into even batches (one shape, :func:`tileup.modes.fused.
  lane_batches`) and compiles that shape statically: batch 64 at 64² ran 6.46 s of diffusion
  on static kernels against 6.66 s on dynamic-batch ones (reference job, H200);
* redraw waves hold 1 to 4 crops (2 to 8 samples with CFG): ``dynamic_batch`` marks dimension
  0 of every tensor input (latents, text states, SDXL's added conditions) dynamic before
  dynamo sees the first call, one compilation for them all;
* the crop VAE runs one crop at a time (a static shape).

The compiler's start/end callbacks feed :data:`tileup.progress.COMPILING`, so a job's stage
times leave the compilation out and its stats report it apart (``seconds["compile"]``).
"""

from __future__ import annotations

import os
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


def _compile_started(_args: object) -> None:
    COMPILING.started()


def _compile_ended(_args: object) -> None:
    COMPILING.ended()


def _time_compilations() -> None:
    """Route the compiler's start/end callbacks to :data:`tileup.progress.COMPILING` (again
    after ``torch._dynamo.reset()``, which drops every callback)."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:  # an older torch: the stages then include their compilation
        return
    if _compile_started not in callback_handler.start_callbacks:
        callback_handler.register_start_callback(_compile_started)
        callback_handler.register_end_callback(_compile_ended)


def _persistent_cache() -> None:
    """Keep torch's compilation cache in the user's cache folder (``$XDG_CACHE_HOME`` or
    ``~/.cache``, then ``tileup/torchinductor``) unless ``TORCHINDUCTOR_CACHE_DIR`` already
    says where: torch's default is a folder under the temporary directory, lost at reboot, and
    a cached compilation costs ~8 s against ~46 s cold (SD 1.5 UNet, H200). Importing
    ``torch._dynamo`` writes that default into the variable, so the default counts as unset.
    An unwritable folder leaves torch's default."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is not None and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "tileup", "torchinductor")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder


def compile_module(module: nn.Module, *, dynamic_batch: bool) -> nn.Module:
    """``torch.compile(module)`` (an ``OptimizedModule``: same interface, ``_orig_mod`` is
    ``module``), its compilations timed (:data:`tileup.progress.COMPILING`) and cached across
    processes and reboots. ``dynamic_batch``: its inputs' batch dimension is marked dynamic at
    every call (the UNet, whose batches vary); otherwise every new input shape compiles anew
    (the crop VAE, called one crop at a time)."""
    _time_compilations()
    _persistent_cache()
    compiled = cast(nn.Module, torch.compile(module, backend=BACKEND))
    if dynamic_batch:
        compiled.register_forward_pre_hook(_mark_batch_dynamic, with_kwargs=True)
    return compiled


def batch_is_dynamic(module: nn.Module) -> bool:
    """Whether ``module`` came from :func:`compile_module` with ``dynamic_batch``."""
    return _mark_batch_dynamic in module._forward_pre_hooks.values()

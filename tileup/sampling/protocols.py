"""The small interfaces the sampling core needs from diffusers' models (instead of ``Any``).

Structural types only, nothing here imports diffusers: a diffusers ``UNet2DConditionModel`` and
every scheduler of :data:`tileup.sampling.schedules.SAMPLERS` have these members (the VAE's are in
:mod:`tileup.vae.protocols`); tests pass small stand-ins.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, Protocol

import torch


class UNet(Protocol):
    """A conditional denoiser: diffusers' ``UNet2DConditionModel`` call signature.

    tileup always asks for the tuple (``return_dict=False``): ``(prediction,)``.
    """

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        *,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = ...,
        return_dict: Literal[False],
    ) -> tuple[torch.Tensor, ...]: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


class SchedulerConfig(Protocol):
    """The scheduler config keys the loop reads (diffusers' config allows attribute access)."""

    @property
    def num_train_timesteps(self) -> int: ...


class Scheduler(Protocol):
    """The parts of a diffusers scheduler the step loop uses.

    Optional members are probed with ``hasattr`` where they are used: ``set_begin_index``,
    ``step_index``, ``begin_index``, ``noise_sampler_seed`` (DPM++ SDE's Brownian tree),
    ``sigmas_interpol`` with ``state_in_first_order`` (DPM2).
    """

    @property
    def config(self) -> SchedulerConfig: ...

    order: int
    timesteps: torch.Tensor
    num_inference_steps: int | None

    def set_timesteps(self, num_inference_steps: int) -> None: ...

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor: ...

    def add_noise(
        self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor: ...

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor,
        sample: torch.Tensor,
        /,
        *,
        return_dict: Literal[False],
        **kwargs: Any,
    ) -> tuple[torch.Tensor, ...]: ...

"""The small interfaces the sampling core needs from diffusers' models (instead of ``Any``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch


class UNet(Protocol):
    """A conditional denoiser: diffusers' ``UNet2DConditionModel`` call signature."""

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        *,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = ...,
        return_dict: bool = ...,
    ) -> Any: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


class Scheduler(Protocol):
    """The parts of a diffusers scheduler the step loop uses."""

    config: Any
    order: int
    timesteps: torch.Tensor
    num_inference_steps: int | None

    def set_timesteps(self, num_inference_steps: int) -> None: ...

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor: ...

    def add_noise(
        self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor: ...

    def step(self, *args: Any, **kwargs: Any) -> Any: ...

"""Fixed step scheduling and the one sampling loop of tileup.

``--steps N`` is the number of steps actually run for every denoise in (0, 1] (A1111's
``img2img_fix_steps``, ComfyUI's KSampler): :func:`plan_steps` builds the schedule for
``T = max(N, int(N / denoise))`` steps and the plan holds its last N; :func:`noise_latents` noises
the init latents to the first of them exactly as diffusers' img2img pipelines do (a pure-noise
txt2img start is ``add_noise`` of zeros); :func:`run_sampler` runs the plan with any denoiser
``(model_input, t) -> prediction`` over the whole canvas (tiling lives inside it).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tileup.sampling.protocols import Scheduler
from tileup.sampling.schedules import LMS_ORDER, SamplerError, step_params

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(model_input, t) -> prediction`` over the whole canvas, in the scheduler's prediction type."""

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(i, t, latents) -> latents`` after model evaluation ``i`` (0-based) at timestep ``t``."""


@dataclass(frozen=True, eq=False)
class StepPlan:
    """The last ``steps`` steps of a ``total_steps`` schedule, as a scheduler will run them.

    ``timesteps`` (CPU) are the entries to iterate, one model evaluation each (second-order
    schedulers hold two entries per step but one for the last step, which ends at σ = 0);
    ``begin_index`` is the first entry's index in the full schedule; ``first_timestep`` (shape
    [1], or None for an empty plan) is the noise level of the start:
    ``scheduler.add_noise(latents, noise, plan.first_timestep)``.
    """

    timesteps: torch.Tensor
    begin_index: int
    total_steps: int
    steps: int
    first_timestep: torch.Tensor | None
    evaluations: int

    @property
    def empty(self) -> bool:
        """True when nothing runs (denoise 0)."""
        return self.evaluations == 0


def _set_schedule(scheduler: Scheduler, total: int, begin: int) -> torch.Tensor:
    """Set ``total`` steps on ``scheduler``, arm it to start at entry ``begin``; its timesteps."""
    try:
        scheduler.set_timesteps(total)
    except ValueError as exc:
        raise SamplerError(
            f"{type(scheduler).__name__} cannot make a {total}-step schedule: "
            f"{' '.join(str(exc).split())}"
        ) from exc
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps


def plan_steps(scheduler: Scheduler, steps: int, denoise: float) -> StepPlan:
    """Fixed step scheduling: run the last ``steps`` steps of a ``int(steps / denoise)`` schedule.

    Sets the scheduler's timesteps and begin index (so ``add_noise`` with ``first_timestep``
    noises to the right level and the first ``step`` starts there). ``denoise == 0`` gives an
    empty plan and leaves the scheduler alone. Raises SamplerError for ``steps < 1``,
    ``denoise`` outside [0, 1], more scheduled steps than training timesteps, or a schedule
    diffusers gets wrong (its 'trailing' spacing yields an extra, negative timestep for a few
    step counts such as 61 or 103).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SamplerError(f"steps must be a positive integer, got {steps!r}")
    denoise = float(denoise)
    if not 0.0 <= denoise <= 1.0:
        raise SamplerError(f"denoise must be in [0, 1], got {denoise}")
    if denoise == 0.0:
        return StepPlan(torch.empty(0), 0, 0, 0, None, 0)
    total = max(steps, int(steps / denoise))
    train = int(scheduler.config.num_train_timesteps)
    if total > train:
        raise SamplerError(
            f"steps / denoise = {steps} / {denoise:g} needs a {total}-step schedule, more than "
            f"the {train} training timesteps; lower --steps or raise --denoise"
        )
    order = int(scheduler.order)
    begin = (total - steps) * order
    timesteps = _set_schedule(scheduler, total, begin)
    low, high = float(timesteps.min()), float(timesteps.max())
    if len(timesteps) != total * order - (order - 1) or low < 0 or high > train - 1:
        raise SamplerError(
            f"diffusers' {type(scheduler).__name__} made a broken {total}-step schedule "
            f"({len(timesteps)} timesteps in [{low:g}, {high:g}]); change --steps or "
            f"--denoise slightly, or use another schedule"
        )
    run = timesteps[begin:].clone()
    return StepPlan(run, begin, total, steps, run[:1], len(run))


def noise_latents(
    scheduler: Scheduler, plan: StepPlan, latents: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """``latents`` noised to the plan's start (re-arms the scheduler first; same as
    ``scheduler.add_noise(latents, noise, plan.first_timestep)`` right after ``plan_steps``).
    An empty plan returns ``latents`` unchanged; zeros give a pure-noise (txt2img) start."""
    first = plan.first_timestep
    if plan.empty or first is None:  # None only in the empty plan
        return latents
    _rearm(scheduler, plan)
    return add_noise_on_host(scheduler, latents, noise, first)


def add_noise_on_host(
    scheduler: Scheduler, original: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """``scheduler.add_noise(original, noise, timestep)`` (one timestep, shape [1]) with no
    device copies or host syncs: every scheduler's ``add_noise`` is ``a·original + b·noise``, so
    ``a`` and ``b`` are read from it on one-element host tensors of ``original``'s dtype (its
    state, e.g. the step index, as it is now) and applied as Python numbers; the same values as
    diffusers computes on the device (``a`` 1 skips the product, as the k-samplers do)."""
    one = torch.ones(1, dtype=original.dtype)
    zero = torch.zeros(1, dtype=original.dtype)
    cpu_timestep = timestep.cpu()
    a = float(scheduler.add_noise(one, zero, cpu_timestep))
    b = float(scheduler.add_noise(zero, one, cpu_timestep))
    scaled_noise = noise * b
    return original + scaled_noise if a == 1.0 else original * a + scaled_noise


def _rearm(scheduler: Scheduler, plan: StepPlan) -> None:
    """Make ``scheduler`` fresh at the plan's start (set_timesteps again only if it has run)."""
    fresh = (
        getattr(scheduler, "step_index", None) is None
        and getattr(scheduler, "begin_index", plan.begin_index) == plan.begin_index
        and scheduler.num_inference_steps == plan.total_steps
    )
    if fresh:
        timesteps = scheduler.timesteps
    else:
        timesteps = _set_schedule(scheduler, plan.total_steps, plan.begin_index)
    if not torch.equal(timesteps[plan.begin_index :], plan.timesteps):
        raise SamplerError("this step plan was made for a different scheduler")


def run_sampler(
    scheduler: Scheduler,
    plan: StepPlan,
    latents: torch.Tensor,
    denoiser: Denoiser,
    *,
    generator: torch.Generator | list[torch.Generator] | None,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Run ``plan`` from ``latents`` (already noised to ``plan.first_timestep``); the result.

    Resets the scheduler to the plan first, so a plan can be run any number of times. Makes
    exactly ``plan.evaluations`` denoiser calls ``denoiser(scheduler.scale_model_input(x, t), t)``
    with ``t`` a 0-dim CPU tensor; predictions are cast to the latents' dtype (keep latents
    float32). ``generator`` (a CPU generator, for device-independent noise; or one per sample,
    which diffusers' schedulers accept) feeds the stochastic samplers; DPM++ SDE seeds its
    Brownian tree from one draw of a single generator. ``on_step``,
    if given, sees and may replace the latents after every evaluation. No host syncs of its own.
    """
    if plan.empty:
        return latents
    _rearm(scheduler, plan)
    takes_generator = "generator" in step_params(type(scheduler))
    if takes_generator and latents.is_cuda:
        _without_noise_waits(scheduler)
    if hasattr(scheduler, "noise_sampler_seed") and isinstance(generator, torch.Generator):
        seed = torch.randint(0, 2**63 - 1, (), generator=generator, device=generator.device)
        scheduler.noise_sampler_seed = int(seed)
    extra: dict[str, Any] = {"generator": generator} if takes_generator else {}
    lms = "order" in step_params(type(scheduler))  # LMSDiscreteScheduler
    with warnings.catch_warnings():
        # DPM++ SDE with one Brownian tree per sample (redraw batches) queries σ_min ~5e-8
        # below the tree's rounded start; torchsde warns and clamps the query, which is right
        warnings.filterwarnings("ignore", "Should have ta>=t0", UserWarning)
        for i, t in enumerate(plan.timesteps):
            model_input = scheduler.scale_model_input(latents, t)
            prediction = denoiser(model_input, t).to(latents.dtype)
            if lms:  # warm up from the first step run, not from the start of the full schedule
                extra["order"] = min(i + 1, LMS_ORDER)
            latents = scheduler.step(prediction, t, latents, return_dict=False, **extra)[0]
            if on_step is not None:
                latents = on_step(i, t, latents)
        return latents


def _without_noise_waits(scheduler: Scheduler) -> None:
    """Make the scheduler's module draw step noise from CPU generators into pinned memory and
    copy it to the device without waiting: diffusers' ``randn_tensor`` draws on the host, then
    copies with ``.to(device)``, a blocking copy that waits for the device to finish all its
    queued work once per step. Same values (the same generator calls); idempotent."""
    module = sys.modules.get(type(scheduler).__module__)
    draw = getattr(module, "randn_tensor", None)
    if module is None or draw is None or getattr(draw, "tileup_no_wait", False):
        return
    module.randn_tensor = _no_wait(draw)  # type: ignore[attr-defined]  # checked above


def _no_wait(draw: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``draw`` (diffusers' ``randn_tensor``) with CPU generators and a CUDA device: drawn on the
    host, pinned, copied asynchronously. Anything else goes to ``draw`` as it is."""

    def randn_tensor(
        shape: Any,
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        layout: torch.layout | None = None,
    ) -> torch.Tensor:
        target = torch.device(device) if device is not None else None
        gens = generator if isinstance(generator, list) else [generator]
        on_host = all(g is not None and g.device.type == "cpu" for g in gens)
        if target is None or target.type != "cuda" or not on_host:
            return draw(shape, generator=generator, device=device, dtype=dtype, layout=layout)
        host = draw(shape, generator=generator, device="cpu", dtype=dtype, layout=layout)
        return host.pin_memory().to(target, non_blocking=True)

    randn_tensor.tileup_no_wait = True  # type: ignore[attr-defined]  # a marker
    return randn_tensor

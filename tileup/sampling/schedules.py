"""Sampler and schedule names users know, mapped onto diffusers schedulers; fixed step scheduling.

Samplers are not written here: each name A1111 / ComfyUI users know ("Euler a", "DPM++ 2M",
"dpmpp_2m_sde", ...) is a frozen registry entry naming a diffusers scheduler class and its
options; each schedule ("normal", "karras", "exponential", "simple", "ddim_uniform") is a set of
scheduler config options. A1111's combined names ("DPM++ 2M Karras") carry their schedule.

Fixed step scheduling (A1111's ``img2img_fix_steps``, ComfyUI's KSampler): ``--steps N`` is the
number of steps actually run for every denoise in (0, 1]. The schedule is built for
``T = max(N, int(N / denoise))`` steps and its last N steps are run, starting from the init
latents noised to the first of them (``scheduler.add_noise(latents, noise, plan.first_timestep)``,
exactly as diffusers' img2img pipelines noise, i.e. ``x0 + σ·noise`` for the σ-based k-samplers
and ``√ᾱ·x0 + √(1-ᾱ)·noise`` for DDIM, LCM and the DPM-Solver/UniPC/DEIS family, whose samples
live in variance-preserving space). A pure-noise start (txt2img) is ``add_noise`` of zeros.

The plan and the loop that runs it are in :mod:`tileup.sampling.loop`.

Where this differs from A1111 / ComfyUI (diffusers' behaviour, kept rather than patched):
- "normal" for DPM++ 2M/3M, UniPC and DEIS is diffusers' linspace (999 down to ~999/N, about
  ComfyUI's sgm_uniform), not ComfyUI's normal (999 down to 0). "automatic" is A1111's per-sampler
  default: Karras for DPM++ 2M, DPM++ SDE, DPM2 and DPM2 a; exponential for the DPM++ 2M/3M SDE
  family; normal for the rest.
- k-samplers interpolate σ linearly between integer timesteps (k-diffusion: in log σ; the two
  differ by < 1e-5 relative); the DPM-Solver family and DPM2 give the model Karras/exponential
  timesteps rounded to integers.
- "simple" is diffusers' trailing spacing (within one training timestep of ComfyUI's simple and
  sgm_uniform); diffusers' trailing spacing is broken for a few step counts (61, 103, 121, ...):
  those are refused by ``plan_steps`` rather than run wrong.
- DDIM, UniPC (bh1) and DEIS stop at the smallest training σ instead of σ = 0, as A1111's DDIM
  and UniPC do. DPM++ 2M/3M SDE draw Gaussian noise per step (k-diffusion: a Brownian tree).
- LMS warms its order up from the first step run (as k-diffusion does); diffusers' own counting
  from the start of the full schedule would use 4th-order weights with one derivative.
- Not available: Euler a with karras/exponential, DPM++ 2S a, DPM fast/adaptive, Restart, PLMS,
  and the "beta" schedule (diffusers' use_beta_sigmas spaces σ, ComfyUI's beta spaces timesteps:
  a different schedule under the same name).
"""

from __future__ import annotations

import functools
import inspect
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

from tileup.choices import PREDICTIONS
from tileup.errors import TileupError
from tileup.models.families import SD_TRAINING_CONFIG
from tileup.sampling.protocols import Scheduler

TRAINING_KEYS = (*SD_TRAINING_CONFIG, "trained_betas", "rescale_betas_zero_snr")
"""The only keys ``make_scheduler`` reads from ``base_config`` (the rest are sampler choices)."""

PREDICTION_TYPES = PREDICTIONS[1:]
"""What a loaded model can predict (``auto`` resolved)."""

LMS_ORDER = 4  # k-diffusion's, A1111's and ComfyUI's LMS order


class SamplerError(TileupError):
    """Unknown sampler or schedule, an unsupported combination, or a bad steps/denoise."""


def _key(name: str) -> str:
    """Lookup key: case-insensitive; ``_``, ``-`` and runs of spaces are all one space."""
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def _frozen(**options: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(options))


@dataclass(frozen=True)
class Schedule:
    """A noise schedule: scheduler config options layered over the sampler's own options."""

    name: str
    options: Mapping[str, Any]
    summary: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sampler:
    """A sampler by the A1111 name, as a diffusers scheduler class plus config options.

    ``options`` hold the sampler's "normal" spacing; ``schedules`` are the schedule names this
    class can do (any other is refused at construction, never silently ignored).
    """

    name: str
    scheduler: type[Scheduler]
    options: Mapping[str, Any]
    schedules: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    stochastic: bool = False
    note: str = ""
    automatic: str = "normal"
    """The schedule "automatic" picks: A1111's default for the sampler (its ``scheduler``
    option in ``sd_samplers_kdiffusion.py``), e.g. Karras for DPM++ 2M."""

    @property
    def order(self) -> int:
        """Model evaluations per step (2 for Heun-like samplers, whose last step takes 1)."""
        return int(self.scheduler.order)

    def evaluations(self, steps: int) -> int:
        """Model calls for ``steps`` steps: N for first-order samplers, 2N-1 for second-order."""
        return steps * self.order - (self.order - 1) if steps > 0 else 0


SCHEDULES: tuple[Schedule, ...] = (
    Schedule(
        "normal",
        _frozen(),
        "the sampler's own spacing: timesteps evenly spaced from 999 to 0 for the k-samplers "
        "(A1111 Automatic/Uniform, ComfyUI normal), diffusers' linspace (999 down to ~999/N, "
        "≈ ComfyUI sgm_uniform) for DPM++ 2M/3M, UniPC, DEIS; A1111's uniform DDIM steps "
        "(1, 1+1000//N, ...) for DDIM; LCM's own distillation grid for LCM",
        aliases=("uniform", "default"),
    ),
    Schedule(
        "karras",
        _frozen(use_karras_sigmas=True),
        "use_karras_sigmas: Karras et al. rho=7 between the training sigma_min and sigma_max "
        "(as k-diffusion/A1111/ComfyUI)",
    ),
    Schedule(
        "exponential",
        _frozen(use_exponential_sigmas=True),
        "use_exponential_sigmas: sigmas evenly spaced in log σ between the training extremes",
    ),
    Schedule(
        "simple",
        _frozen(timestep_spacing="trailing"),
        "timestep_spacing='trailing': t = round(1000 - k·1000/N) - 1; ComfyUI simple takes "
        "999 - floor(k·1000/N) and sgm_uniform 999 - k·999/N, so both differ by under one "
        "training timestep (none when N divides 1000)",
        aliases=("sgm_uniform", "sgm uniform"),
    ),
    Schedule(
        "ddim_uniform",
        _frozen(timestep_spacing="leading"),
        "timestep_spacing='leading' with steps_offset 1: t = 1 + k·(1000//N) (ComfyUI "
        "ddim_uniform, which runs one step more when N·(1000//N) < 999)",
    ),
)

_ALL = ("normal", "karras", "exponential", "simple", "ddim_uniform")
_SPACING_ONLY = ("normal", "simple", "ddim_uniform")
_K = _frozen(timestep_spacing="linspace")


def _dpm(**options: Any) -> Mapping[str, Any]:
    return _frozen(timestep_spacing="linspace", lower_order_final=True, **options)


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("Euler", EulerDiscreteScheduler, _K, _ALL, ("euler", "k_euler")),
    Sampler(
        "Euler a",
        EulerAncestralDiscreteScheduler,
        _K,
        _SPACING_ONLY,
        ("euler_ancestral", "k_euler_a", "k_euler_ancestral"),
        stochastic=True,
        note="no karras/exponential: diffusers' EulerAncestralDiscreteScheduler lacks them",
    ),
    Sampler("Heun", HeunDiscreteScheduler, _K, _ALL, ("heun", "k_heun")),
    Sampler(
        "LMS",
        LMSDiscreteScheduler,
        _K,
        _ALL,
        ("lms", "k_lms"),
        note="order 4, warmed up from the first step run (as k-diffusion does)",
    ),
    Sampler("DPM2", KDPM2DiscreteScheduler, _K, _ALL, ("dpm_2", "k_dpm_2"), automatic="karras"),
    Sampler(
        "DPM2 a",
        KDPM2AncestralDiscreteScheduler,
        _K,
        _ALL,
        ("dpm_2_ancestral", "k_dpm_2_a", "k_dpm_2_ancestral"),
        stochastic=True,
        automatic="karras",
    ),
    Sampler(
        "DPM++ 2M",
        DPMSolverMultistepScheduler,
        _dpm(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint"),
        _ALL,
        ("dpmpp_2m", "k_dpmpp_2m"),
        automatic="karras",
    ),
    Sampler(
        "DPM++ 2M SDE",
        DPMSolverMultistepScheduler,
        _dpm(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="midpoint"),
        _ALL,
        ("dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "k_dpmpp_2m_sde"),
        stochastic=True,
        note="fresh Gaussian noise per step from the generator (k-diffusion: a Brownian tree)",
        automatic="exponential",
    ),
    Sampler(
        "DPM++ 2M SDE Heun",
        DPMSolverMultistepScheduler,
        _dpm(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="heun"),
        _ALL,
        ("dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "k_dpmpp_2m_sde_heun"),
        stochastic=True,
        automatic="exponential",
    ),
    Sampler(
        "DPM++ 3M SDE",
        DPMSolverMultistepScheduler,
        _dpm(algorithm_type="sde-dpmsolver++", solver_order=3),
        _ALL,
        ("dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "k_dpmpp_3m_sde"),
        stochastic=True,
        note="diffusers' third-order SDE DPM-Solver++ (k-diffusion's 3M SDE is a variant of it)",
        automatic="exponential",
    ),
    Sampler(
        "DPM++ SDE",
        DPMSolverSDEScheduler,
        _K,
        _ALL,
        ("dpmpp_sde", "dpmpp_sde_gpu", "k_dpmpp_sde"),
        stochastic=True,
        note="Brownian-tree noise (torchsde) seeded from the generator",
        automatic="karras",
    ),
    Sampler(
        "DDIM",
        DDIMScheduler,
        _frozen(timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False),
        _SPACING_ONLY,
        ("ddim",),
        note="eta 0; ends at ᾱ(0) like A1111 (set_alpha_to_one=False)",
    ),
    Sampler(
        "UniPC",
        UniPCMultistepScheduler,
        _dpm(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"),
        _ALL,
        ("uni_pc", "unipc"),
        note="bh1, order 3 (A1111/ComfyUI defaults); like A1111 it stops at the smallest "
        "training σ (diffusers' bh1 step to σ = 0 yields NaN)",
    ),
    Sampler(
        "UniPC bh2",
        UniPCMultistepScheduler,
        _dpm(solver_type="bh2", solver_order=3),
        _ALL,
        ("uni_pc_bh2",),
    ),
    Sampler(
        "DEIS",
        DEISMultistepScheduler,
        _dpm(solver_order=3),
        _ALL,
        ("deis",),
        note="order 3; stops at the smallest training σ (diffusers' DEIS has no final σ = 0)",
    ),
    Sampler(
        "LCM",
        LCMScheduler,
        _frozen(),
        ("normal",),
        ("lcm",),
        stochastic=True,
        note="for LCM models/LoRAs (low CFG); at most 50 scheduled steps (steps / denoise)",
    ),
)

_SAMPLER_INDEX: Mapping[str, Sampler] = MappingProxyType(
    {_key(n): s for s in SAMPLERS for n in (s.name, *s.aliases)}
)
_SCHEDULE_INDEX: Mapping[str, Schedule] = MappingProxyType(
    {_key(n): s for s in SCHEDULES for n in (s.name, *s.aliases)}
)


def _known_samplers() -> str:
    return ", ".join(s.name for s in SAMPLERS)


def _known_schedules() -> str:
    return ", ".join(s.name for s in SCHEDULES)


AUTOMATIC = "automatic"
"""A1111's "Automatic" schedule type: each sampler's own default (:attr:`Sampler.automatic`)."""


def resolve_schedule(name: str) -> Schedule:
    """The schedule called ``name`` (case-insensitive, aliases allowed); else SamplerError.
    "automatic" stands for the normal schedule here; :func:`resolve` gives it its sampler's."""
    if _key(name) == AUTOMATIC:
        return _SCHEDULE_INDEX["normal"]
    found = _SCHEDULE_INDEX.get(_key(name))
    if found is None:
        raise SamplerError(f"unknown schedule {name!r}; known: {_known_schedules()}")
    return found


def resolve(sampler: str, schedule: str = "normal") -> tuple[Sampler, Schedule]:
    """Resolve a sampler name (A1111, ComfyUI, case-insensitive) and a schedule name.

    An A1111 combined name ("DPM++ 2M Karras") carries its schedule; an explicit ``schedule``
    other than "normal" must then agree with it. The combination must be one the diffusers
    class can do: there is no silent fallback. "automatic" is the sampler's A1111 default
    (:attr:`Sampler.automatic`).
    """
    automatic = _key(schedule) == AUTOMATIC
    chosen = resolve_schedule(schedule)
    key = _key(sampler)
    entry = _SAMPLER_INDEX.get(key)
    if entry is None:
        words = key.split()
        for cut in range(len(words) - 1, 0, -1):
            head = _SAMPLER_INDEX.get(" ".join(words[:cut]))
            named = _SCHEDULE_INDEX.get(" ".join(words[cut:]))
            if head is not None and named is not None:
                if chosen.name not in ("normal", named.name):
                    raise SamplerError(
                        f"sampler {sampler!r} names schedule {named.name!r} but schedule "
                        f"{chosen.name!r} was asked for"
                    )
                entry, chosen, automatic = head, named, False
                break
    if entry is None:
        raise SamplerError(
            f"unknown sampler {sampler!r}; known: {_known_samplers()} (ComfyUI/A1111 aliases "
            f"and names like 'DPM++ 2M Karras' work too; see 'tileup samplers')"
        )
    if automatic:
        chosen = _SCHEDULE_INDEX[entry.automatic]
    if chosen.name not in entry.schedules:
        raise SamplerError(
            f"sampler {entry.name!r} cannot use schedule {chosen.name!r} "
            f"(diffusers' {entry.scheduler.__name__} has no such option); "
            f"{entry.name} supports: {', '.join(entry.schedules)}"
        )
    return entry, chosen


@functools.cache
def _init_params(cls: type[Scheduler]) -> frozenset[str]:
    return frozenset(inspect.signature(cls.__init__).parameters)


@functools.cache
def step_params(cls: type[Scheduler]) -> frozenset[str]:
    return frozenset(inspect.signature(cls.step).parameters)


def _supports_zsnr(entry: Sampler) -> bool:
    return "rescale_betas_zero_snr" in _init_params(entry.scheduler)


def make_scheduler(
    sampler: str,
    schedule: str,
    base_config: Mapping[str, Any],
    *,
    prediction_type: str,
) -> Scheduler:
    """A fresh diffusers scheduler for ``sampler`` + ``schedule`` over the model's training noise.

    Reads only the training-noise keys (``TRAINING_KEYS``) of ``base_config`` (missing ones
    default to ``SD_TRAINING_CONFIG``); spacing, solver and sigma options come from the sampler
    entry and the schedule. Raises SamplerError for unknown names, unsupported combinations and
    prediction types other than "epsilon" / "v_prediction".
    """
    entry, chosen = resolve(sampler, schedule)
    if prediction_type not in PREDICTION_TYPES:
        raise SamplerError(
            f"unsupported prediction type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}"
        )
    config: dict[str, Any] = dict(SD_TRAINING_CONFIG)
    config.update({k: base_config[k] for k in TRAINING_KEYS if base_config.get(k) is not None})
    if config.pop("rescale_betas_zero_snr", False):
        if not _supports_zsnr(entry):
            able = ", ".join(s.name for s in SAMPLERS if _supports_zsnr(s))
            raise SamplerError(
                f"this model needs zero-terminal-SNR betas, which diffusers' "
                f"{entry.scheduler.__name__} ({entry.name}) cannot do; use one of: {able}"
            )
        config["rescale_betas_zero_snr"] = True
    config.update(entry.options)
    config.update(chosen.options)
    config["prediction_type"] = prediction_type
    try:
        return entry.scheduler(**config)
    except ImportError as exc:  # DPMSolverSDEScheduler without torchsde
        raise SamplerError(f"sampler {entry.name!r} needs a missing package: {exc}") from exc


def describe_samplers() -> str:
    """The text of ``tileup samplers``: samplers with classes and aliases, then schedules."""
    wrap = functools.partial(textwrap.fill, width=100, break_on_hyphens=False)
    lines = [
        wrap(
            "Samplers (--sampler): case-insensitive; ComfyUI/A1111 aliases and A1111 names "
            "carrying a schedule ('DPM++ 2M Karras') are accepted. Model calls for --steps N: "
            "N, or 2N-1 for second-order samplers (two per step, one for the last). "
            f"Schedules * = {', '.join(_ALL)}."
        ),
        "",
    ]
    width = max(len(s.name) for s in SAMPLERS)
    indent = " " * (width + 4)
    for s in SAMPLERS:
        hidden = ("timestep_spacing", "lower_order_final")
        options = ", ".join(f"{k}={v}" for k, v in s.options.items() if k not in hidden)
        lines.append(f"  {s.name:<{width}}  {s.scheduler.__name__}")
        schedules = "*" if s.schedules == _ALL else ", ".join(s.schedules)
        detail = (
            (f"{options}; " if options else "")
            + f"calls {'N' if s.order == 1 else '2N-1'}; schedules {schedules}; "
            + f"aliases {', '.join(s.aliases)}"
            + ("; stochastic (seeded)" if s.stochastic else "")
            + (f"; {s.note}" if s.note else "")
        )
        lines.append(wrap(detail, initial_indent=indent, subsequent_indent=indent))
    lines += ["", "Schedules (--scheduler):"]
    for sch in SCHEDULES:
        alias = f" (also {', '.join(sch.aliases)})" if sch.aliases else ""
        lines.append(
            wrap(
                f"{sch.name}{alias}: {sch.summary}", initial_indent="  ", subsequent_indent="      "
            )
        )
    lines += [
        "",
        wrap(
            "--steps N runs N steps for every --denoise: the schedule is made for "
            "int(N / denoise) steps and its last N are run (A1111 img2img_fix_steps, ComfyUI "
            "KSampler)."
        ),
    ]
    return "\n".join(lines)

"""Sampler/schedule names, fixed step scheduling and the sampling loop (fast, CPU)."""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch

from tileup.errors import TileupError
from tileup.models.families import SD_TRAINING_CONFIG
from tileup.sampling.loop import add_noise_on_host, noise_latents, plan_steps, run_sampler
from tileup.sampling.schedules import (
    SAMPLERS,
    SCHEDULES,
    Sampler,
    SamplerError,
    describe_samplers,
    make_scheduler,
    resolve,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning",  # diffusers' schedulers under NumPy 2
    "ignore:Should have ta>=t0:UserWarning",  # torchsde, float rounding at sigma_min
)

NAMES = [s.name for s in SAMPLERS]
ENTRY = {s.name: s for s in SAMPLERS}
STOCHASTIC = [s.name for s in SAMPLERS if s.stochastic]
DETERMINISTIC = [s.name for s in SAMPLERS if not s.stochastic]
DENOISES = (1.0, 0.75, 0.5, 0.3, 0.1)
SHAPE = (1, 4, 8, 8)
LCM_MAX = 50  # LCMScheduler's original_inference_steps
# These stop at the smallest training σ (√(1-ᾱ(0)) ≈ 0.029 of noise left), not at σ = 0.
STOP_AT_SIGMA_MIN = {"DDIM", "UniPC", "DEIS"}
# DPM-Solver-family schedulers call the model with the Karras/exponential timestep rounded to an
# integer while the sample sits at the exact σ: the oracle's ε is off by up to ~0.03 there.
ROUNDS_T = {"DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler"}


@functools.cache
def _prototype(name: str, schedule: str, prediction: str):
    return make_scheduler(name, schedule, SD_TRAINING_CONFIG, prediction_type=prediction)


def build(name: str, schedule: str = "normal", prediction: str = "epsilon"):
    """A fresh scheduler (a copy of a cached one: diffusers' KDPM2 __init__ takes ~0.5 s)."""
    return copy.deepcopy(_prototype(name, schedule, prediction))


@functools.cache
def full_timesteps(name: str, schedule: str, total: int) -> tuple[float, ...]:
    """The timesteps of a fresh scheduler set to ``total`` steps (an independent reference)."""
    reference = build(name, schedule)
    reference.set_timesteps(total)
    return tuple(reference.timesteps.tolist())


def final_tolerance(name: str) -> float:
    return 0.04 if name in STOP_AT_SIGMA_MIN else 1e-4


def first_tolerance(name: str, schedule: str) -> float:
    rounds = ENTRY[name].scheduler.__name__ in ROUNDS_T and schedule in ("karras", "exponential")
    return 3e-2 if rounds else 1e-3


def fits(name: str, steps: int, denoise: float) -> bool:
    return name != "LCM" or max(steps, int(steps / denoise)) <= LCM_MAX


def tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


class Recorder:
    """A tiny denoiser (0.1·x) that records its calls and counts the steps begun."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self.timesteps: list[float] = []
        self.steps = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.device.type == "cpu" and t.dim() == 0
        self.timesteps.append(float(t))
        # a step begins with a first-order evaluation (second-order samplers then add one)
        if getattr(self.scheduler, "state_in_first_order", True):
            self.steps += 1
        return 0.1 * x


# --- the oracle: the exact prediction for a known x0 -------------------------------------------

_BETAS = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
_LOG_SIGMAS = np.log(np.sqrt((1 - np.cumprod(1 - _BETAS)) / np.cumprod(1 - _BETAS)))


def alpha_bar(t: float) -> float:
    """ᾱ at a (possibly fractional) training timestep, log-σ interpolated like diffusers."""
    t = min(max(t, 0.0), 999.0)
    lo = math.floor(t)
    hi = min(lo + 1, 999)
    log_sigma = (1 - (t - lo)) * _LOG_SIGMAS[lo] + (t - lo) * _LOG_SIGMAS[hi]
    return 1.0 / (1.0 + math.exp(2 * log_sigma))


class Oracle:
    """Returns the true ε (or v) of a model input ``√ᾱ·x0 + √(1-ᾱ)·ε`` for a known ``x0``."""

    def __init__(self, x0: torch.Tensor, prediction: str = "epsilon") -> None:
        self.x0, self.prediction = x0, prediction
        self.first_eps: torch.Tensor | None = None

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = alpha_bar(float(t))
        return (x - ab**0.5 * self.x0) / (1 - ab) ** 0.5

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.eps(x, t)
        if self.first_eps is None:
            self.first_eps = eps
        if self.prediction == "epsilon":
            return eps
        ab = alpha_bar(float(t))
        return ab**0.5 * eps - (1 - ab) ** 0.5 * self.x0


def rms(a: torch.Tensor) -> float:
    return float(a.pow(2).mean().sqrt())


# --- fixed step scheduling -----------------------------------------------------------------------


def _check_run(name: str, schedule: str, steps: int, denoise: float) -> None:
    scheduler = build(name, schedule)
    plan = plan_steps(scheduler, steps, denoise)
    entry = ENTRY[name]
    total = max(steps, int(steps / denoise))
    assert (plan.total_steps, plan.steps) == (total, steps)
    assert plan.evaluations == len(plan.timesteps) == entry.evaluations(steps)
    assert plan.evaluations == (steps if entry.order == 1 else 2 * steps - 1)
    assert plan.begin_index == (total - steps) * entry.order
    assert torch.equal(plan.first_timestep, plan.timesteps[:1])

    x0, noise = tensors()
    start = noise_latents(scheduler, plan, x0, noise)
    recorder = Recorder(scheduler)
    out = run_sampler(scheduler, plan, start, recorder, generator=torch.Generator().manual_seed(1))
    assert len(recorder.timesteps) == plan.evaluations
    assert recorder.steps == steps
    # the timesteps run are the last N steps of the full total_steps schedule
    assert recorder.timesteps == list(full_timesteps(name, schedule, total)[-plan.evaluations :])
    assert out.shape == SHAPE and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("denoise", DENOISES)
@pytest.mark.parametrize("steps", [1, 3, 20])
@pytest.mark.parametrize("name", NAMES)
def test_runs_exactly_steps_for_every_denoise(name: str, steps: int, denoise: float) -> None:
    if not fits(name, steps, denoise):
        pytest.skip("LCM schedules at most 50 steps (tested below)")
    _check_run(name, "normal", steps, denoise)


@pytest.mark.parametrize("denoise", [1.0, 0.3])
@pytest.mark.parametrize(
    ("name", "schedule"),
    [(s.name, sch) for s in SAMPLERS for sch in s.schedules if sch != "normal"],
)
def test_every_supported_schedule_runs_exactly_steps(
    name: str, schedule: str, denoise: float
) -> None:
    _check_run(name, schedule, 20, denoise)


def test_more_step_counts() -> None:
    for steps, denoise in [(7, 0.7), (14, 0.7), (3, 0.6), (50, 0.05), (2, 0.999), (1, 0.001)]:
        _check_run("Euler", "normal", steps, denoise)
        _check_run("Heun", "karras", steps, denoise)


def test_total_steps_is_int_of_steps_over_denoise() -> None:
    for steps, denoise, total in [(20, 0.3, 66), (20, 0.75, 26), (20, 0.1, 200), (20, 1.0, 20)]:
        assert plan_steps(build("Euler"), steps, denoise).total_steps == total


def test_denoise_zero_is_an_empty_plan() -> None:
    scheduler = build("DPM++ 2M")
    plan = plan_steps(scheduler, 20, 0.0)
    assert plan.empty and plan.evaluations == plan.steps == plan.total_steps == 0
    assert plan.first_timestep is None and len(plan.timesteps) == 0
    x0, noise = tensors()
    recorder = Recorder(scheduler)
    assert noise_latents(scheduler, plan, x0, noise) is x0
    assert run_sampler(scheduler, plan, x0, recorder, generator=None) is x0
    assert recorder.timesteps == []


@pytest.mark.parametrize(
    ("steps", "denoise"),
    [(0, 0.5), (-1, 0.5), (2.5, 0.5), (True, 0.5), (20, -0.1), (20, 1.1), (20, math.nan)],
)
def test_bad_steps_or_denoise_raise(steps, denoise) -> None:
    with pytest.raises(SamplerError):
        plan_steps(build("Euler"), steps, denoise)


def test_schedules_longer_than_training_or_broken_raise() -> None:
    with pytest.raises(SamplerError, match="1000 training timesteps"):
        plan_steps(build("Euler"), 20, 0.015)  # 1333 steps
    # DDIM's leading spacing would reach timestep 1000 (out of range)
    with pytest.raises(SamplerError, match="broken"):
        plan_steps(build("DDIM"), 20, 0.02)
    # diffusers' trailing spacing makes 62 timesteps (the last -1) for 61 steps
    with pytest.raises(SamplerError, match="broken"):
        plan_steps(build("Euler", "simple"), 20, 20 / 61.5)
    with pytest.raises(SamplerError, match="LCMScheduler cannot make a 66-step schedule"):
        plan_steps(build("LCM"), 20, 0.3)


def test_a_plan_can_be_rerun_and_belongs_to_its_scheduler() -> None:
    scheduler = build("DPM++ 2M SDE", "karras")
    plan = plan_steps(scheduler, 8, 0.5)
    x0, noise = tensors()
    start = scheduler.add_noise(x0, noise, plan.first_timestep)  # as diffusers' img2img does
    assert torch.equal(start, noise_latents(scheduler, plan, x0, noise))
    runs = [
        run_sampler(scheduler, plan, start, Recorder(scheduler), generator=torch.Generator())
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(SamplerError, match="different scheduler"):
        run_sampler(build("DPM++ 2M SDE"), plan, start, Recorder(scheduler), generator=None)


def test_on_step_sees_every_evaluation() -> None:
    scheduler = build("Heun")
    plan = plan_steps(scheduler, 5, 0.5)
    seen: list[int] = []

    def on_step(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        seen.append(i)
        return latents

    x0, noise = tensors()
    run_sampler(
        scheduler, plan, noise_latents(scheduler, plan, x0, noise), Recorder(scheduler),
        generator=None, on_step=on_step,
    )  # fmt: skip
    assert seen == list(range(plan.evaluations)) and plan.evaluations == 9


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_on_host_equals_add_noise_at_every_evaluation(name: str) -> None:
    """The host-coefficient noising (no device copies) gives add_noise's exact values, before
    the first step and after every evaluation (the step index moves), for every sampler."""
    scheduler = build(name)
    plan = plan_steps(scheduler, 5, 0.5)
    x0, noise = tensors()
    compared: list[int] = []

    def on_step(i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        following = plan.timesteps[i + 1 : i + 2]
        if len(following):
            host = add_noise_on_host(scheduler, x0, noise, following)
            assert torch.equal(host, scheduler.add_noise(x0, noise, following)), i
            compared.append(i)
        return latents

    start = noise_latents(scheduler, plan, x0, noise)
    assert plan.first_timestep is not None
    assert torch.equal(start, scheduler.add_noise(x0, noise, plan.first_timestep))
    generator = torch.Generator().manual_seed(0)
    run_sampler(scheduler, plan, start, Recorder(scheduler), generator=generator, on_step=on_step)
    assert compared == list(range(plan.evaluations - 1))


# --- determinism ---------------------------------------------------------------------------------


def _run_seeded(name: str, seed: int, scheduler=None) -> torch.Tensor:
    scheduler = scheduler or build(name)
    plan = plan_steps(scheduler, 6, 0.5)
    x0, noise = tensors()
    start = noise_latents(scheduler, plan, x0, noise)
    generator = torch.Generator().manual_seed(seed)
    return run_sampler(scheduler, plan, start, Recorder(scheduler), generator=generator)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_follow_the_seed(name: str) -> None:
    scheduler = build(name)
    a = _run_seeded(name, 1, scheduler)
    assert torch.equal(a, _run_seeded(name, 1, scheduler))  # same scheduler object again
    assert torch.equal(a, _run_seeded(name, 1))  # a fresh one
    assert not torch.allclose(a, _run_seeded(name, 2), atol=1e-3)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_ignore_the_seed(name: str) -> None:
    assert torch.equal(_run_seeded(name, 1), _run_seeded(name, 2))


# --- the oracle: the loop, input scaling, prediction types and noising are wired right ----------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", NAMES)
def test_oracle_recovers_x0_from_pure_noise(name: str, prediction: str) -> None:
    scheduler = build(name, prediction=prediction)
    assert scheduler.config.prediction_type == prediction
    plan = plan_steps(scheduler, 20, 1.0)
    x0, noise = tensors()
    start = noise_latents(scheduler, plan, torch.zeros(SHAPE), noise)
    oracle = Oracle(x0, prediction)
    out = run_sampler(scheduler, plan, start, oracle, generator=torch.Generator().manual_seed(3))
    assert rms(out - x0) < final_tolerance(name), rms(out - x0)


@pytest.mark.parametrize("denoise", [1.0, 0.5, 0.3])
@pytest.mark.parametrize("name", NAMES)
def test_noising_matches_the_first_model_input(name: str, denoise: float) -> None:
    """The first model input is √ᾱ·x0 + √(1-ᾱ)·noise at the plan's first timestep."""
    scheduler = build(name)
    plan = plan_steps(scheduler, 10, denoise)
    x0, noise = tensors()
    oracle = Oracle(x0)
    out = run_sampler(
        scheduler, plan, noise_latents(scheduler, plan, x0, noise), oracle, generator=None
    )
    assert oracle.first_eps is not None
    assert torch.allclose(oracle.first_eps, noise, atol=first_tolerance(name, "normal"))
    assert rms(out - x0) < final_tolerance(name)


@pytest.mark.parametrize("schedule", ["karras", "exponential", "simple", "ddim_uniform"])
@pytest.mark.parametrize("name", ["Euler", "Heun", "LMS", "DPM2", "DPM++ 2M", "DPM++ SDE", "UniPC"])
def test_oracle_with_other_schedules(name: str, schedule: str) -> None:
    scheduler = build(name, schedule)
    plan = plan_steps(scheduler, 12, 0.6)
    x0, noise = tensors()
    oracle = Oracle(x0)
    out = run_sampler(
        scheduler, plan, noise_latents(scheduler, plan, x0, noise), oracle, generator=None
    )
    assert torch.allclose(oracle.first_eps, noise, atol=first_tolerance(name, schedule))
    assert rms(out - x0) < final_tolerance(name)


# --- schedules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [s.name for s in SAMPLERS if "karras" in s.schedules])
def test_karras_and_exponential_change_the_sigmas(name: str) -> None:
    sigmas = {}
    for schedule in ("normal", "karras", "exponential"):
        scheduler = build(name, schedule)
        scheduler.set_timesteps(20)
        sigmas[schedule] = scheduler.sigmas.clone()
    assert not torch.allclose(sigmas["normal"], sigmas["karras"])
    assert not torch.allclose(sigmas["normal"], sigmas["exponential"])
    assert not torch.allclose(sigmas["karras"], sigmas["exponential"])


def test_schedules_match_k_diffusion_and_comfyui() -> None:
    sigma_min, sigma_max = math.exp(_LOG_SIGMAS[0]), math.exp(_LOG_SIGMAS[-1])
    ramp = torch.linspace(0, 1, 20, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / 7), sigma_max ** (1 / 7)
    karras = (hi + ramp * (lo - hi)) ** 7
    exponential = torch.linspace(math.log(sigma_max), math.log(sigma_min), 20).exp()
    for schedule, expected in (("karras", karras), ("exponential", exponential)):
        scheduler = build("Euler", schedule)
        scheduler.set_timesteps(20)
        assert torch.allclose(scheduler.sigmas[:-1].double(), expected.double(), rtol=1e-4)
        assert float(scheduler.sigmas[-1]) == 0.0
    timesteps = {}
    for schedule in ("normal", "simple", "ddim_uniform"):
        scheduler = build("Euler", schedule)
        scheduler.set_timesteps(20)
        timesteps[schedule] = scheduler.timesteps.double()
    k = torch.arange(20, dtype=torch.float64)
    assert torch.allclose(timesteps["normal"], 999 * (1 - k / 19))  # ComfyUI normal
    assert torch.equal(timesteps["simple"], 999 - k * 50)  # ComfyUI simple (20 divides 1000)
    assert torch.equal(timesteps["ddim_uniform"], 1 + 50 * (19 - k))  # ComfyUI ddim_uniform
    ddim = build("DDIM")
    ddim.set_timesteps(20)
    assert ddim.timesteps.tolist() == list(range(951, 0, -50))  # A1111's DDIM steps


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "sampler", "schedule"),
    [
        ("euler", "Euler", "normal"),
        ("EULER A", "Euler a", "normal"),
        ("euler_ancestral", "Euler a", "normal"),
        ("k_euler_a", "Euler a", "normal"),
        ("heun", "Heun", "normal"),
        ("lms", "LMS", "normal"),
        ("ddim", "DDIM", "normal"),
        ("dpm_2", "DPM2", "normal"),
        ("dpm_2_ancestral", "DPM2 a", "normal"),
        ("dpmpp_2m", "DPM++ 2M", "normal"),
        ("dpmpp_2m_sde", "DPM++ 2M SDE", "normal"),
        ("dpmpp_2m_sde_gpu", "DPM++ 2M SDE", "normal"),
        ("dpmpp_3m_sde", "DPM++ 3M SDE", "normal"),
        ("dpmpp_sde", "DPM++ SDE", "normal"),
        ("uni_pc", "UniPC", "normal"),
        ("uni_pc_bh2", "UniPC bh2", "normal"),
        ("deis", "DEIS", "normal"),
        ("lcm", "LCM", "normal"),
        ("DPM++ 2M Karras", "DPM++ 2M", "karras"),
        ("DPM++ SDE Karras", "DPM++ SDE", "karras"),
        ("DPM2 a Karras", "DPM2 a", "karras"),
        ("LMS Karras", "LMS", "karras"),
        ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "exponential"),
        ("DPM++ 2M SDE Heun Karras", "DPM++ 2M SDE Heun", "karras"),
        ("dpmpp_2m_karras", "DPM++ 2M", "karras"),
        ("Euler SGM Uniform", "Euler", "simple"),
    ],
)
def test_names_resolve(given: str, sampler: str, schedule: str) -> None:
    entry, chosen = resolve(given)
    assert (entry.name, chosen.name) == (sampler, schedule)


def test_aliases_build_the_same_scheduler() -> None:
    a, b = build("dpmpp_2m"), build("DPM++ 2M")
    assert type(a) is type(b) and dict(a.config) == dict(b.config)
    combined = build("DPM++ 2M Karras")
    assert combined.config.use_karras_sigmas and combined.config.algorithm_type == "dpmsolver++"
    assert build("DPM++ 2M Karras", "karras").config.use_karras_sigmas
    with pytest.raises(SamplerError, match="names schedule 'karras'"):
        build("DPM++ 2M Karras", "exponential")


def test_schedule_aliases() -> None:
    assert resolve("Euler", "Karras")[1].name == "karras"
    assert resolve("Euler", "sgm_uniform")[1].name == "simple"
    assert resolve("Euler", "Automatic")[1].name == "normal"


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(SamplerError) as info:
        build("DPM fast")
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in NAMES)
    assert isinstance(info.value, TileupError)
    with pytest.raises(SamplerError) as info:
        build("Euler", "polyexponential")
    assert all(s.name in str(info.value) for s in SCHEDULES)


@pytest.mark.parametrize(
    ("name", "schedule"),
    [(s.name, sch.name) for s in SAMPLERS for sch in SCHEDULES if sch.name not in s.schedules],
)
def test_unsupported_combinations_raise_naming_what_works(name: str, schedule: str) -> None:
    with pytest.raises(SamplerError) as info:
        build(name, schedule)
    assert f"{name} supports: {', '.join(ENTRY[name].schedules)}" in str(info.value)


@pytest.mark.parametrize(
    ("name", "schedule"), [(s.name, sch) for s in SAMPLERS for sch in s.schedules]
)
def test_supported_combinations_build_with_their_options(name: str, schedule: str) -> None:
    entry: Sampler = ENTRY[name]
    scheduler = build(name, schedule, prediction="v_prediction")
    assert type(scheduler) is entry.scheduler
    expected = {**entry.options, **resolve(name, schedule)[1].options}
    assert {k: scheduler.config[k] for k in expected} == expected
    for key, value in SD_TRAINING_CONFIG.items():
        assert scheduler.config[key] == value
    assert scheduler.config.prediction_type == "v_prediction"


def test_base_config_supplies_only_the_training_noise() -> None:
    base = {
        **SD_TRAINING_CONFIG,
        "beta_end": 0.02,
        "timestep_spacing": "leading",  # a pipeline's choice: ignored
        "use_karras_sigmas": True,  # ignored
        "prediction_type": "v_prediction",  # the keyword decides
    }
    scheduler = make_scheduler("Euler", "normal", base, prediction_type="epsilon")
    config = scheduler.config
    assert config.beta_end == 0.02 and config.timestep_spacing == "linspace"
    assert not config.use_karras_sigmas and config.prediction_type == "epsilon"
    assert make_scheduler("Euler", "normal", {}, prediction_type="epsilon").config.beta_end == 0.012
    with pytest.raises(SamplerError, match="prediction type"):
        make_scheduler("Euler", "normal", base, prediction_type="sample")
    zsnr = {**base, "rescale_betas_zero_snr": True}
    assert make_scheduler("Euler", "normal", zsnr, prediction_type="epsilon").config[
        "rescale_betas_zero_snr"
    ]
    with pytest.raises(SamplerError, match="zero-terminal-SNR"):
        make_scheduler("Heun", "normal", zsnr, prediction_type="epsilon")
    plain = {**base, "rescale_betas_zero_snr": False}
    assert type(make_scheduler("Heun", "normal", plain, prediction_type="epsilon")).__name__ == (
        "HeunDiscreteScheduler"
    )


def test_describe_lists_every_name() -> None:
    text = describe_samplers()
    for entry in SAMPLERS:
        assert entry.name in text and entry.scheduler.__name__ in text
        assert all(alias in text for alias in entry.aliases)
    assert all(s.name in text for s in SCHEDULES)
    assert max(len(line) for line in text.splitlines()) <= 100


# --- a real (tiny) UNet --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel
    from sd_fixtures import unet_kwargs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(**unet_kwargs("sd1")).eval()


def test_real_unet_through_the_loop(tiny_unet) -> None:
    name = "DPM++ SDE"  # second order, float64 timesteps, Brownian-tree noise
    context = torch.randn(1, 8, tiny_unet.config.cross_attention_dim, generator=torch.Generator())
    calls = []

    @torch.no_grad()
    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(float(t))
        return tiny_unet(x, t, encoder_hidden_states=context).sample

    outs = []
    for _ in range(2):
        scheduler = build(name)
        plan = plan_steps(scheduler, 2, 0.5)
        x0, noise = (t.repeat(1, 1, 2, 2) for t in tensors())
        start = noise_latents(scheduler, plan, x0, noise)
        outs.append(run_sampler(scheduler, plan, start, denoiser, generator=torch.Generator()))
    assert len(calls) == 2 * ENTRY[name].evaluations(2) == 6
    assert torch.equal(outs[0], outs[1]) and bool(torch.isfinite(outs[0]).all())


def test_automatic_picks_each_samplers_a1111_default() -> None:
    """A1111's "Automatic" schedule type: Karras for DPM++ 2M / SDE and DPM2, exponential for
    the DPM++ SDE multistep family, the uniform (normal) spacing for the others."""
    from tileup.sampling.schedules import resolve

    expected = {
        "DPM++ 2M": "karras",
        "DPM++ SDE": "karras",
        "DPM2": "karras",
        "DPM2 a": "karras",
        "DPM++ 2M SDE": "exponential",
        "DPM++ 2M SDE Heun": "exponential",
        "DPM++ 3M SDE": "exponential",
        "Euler a": "normal",
        "Euler": "normal",
        "Heun": "normal",
        "LMS": "normal",
        "DDIM": "normal",
        "UniPC": "normal",
    }
    for sampler, schedule in expected.items():
        assert resolve(sampler, "Automatic")[1].name == schedule, sampler
    assert resolve("DPM++ 2M", "normal")[1].name == "normal"  # asked for: kept
    assert resolve("DPM++ 2M Exponential", "automatic")[1].name == "exponential"  # in the name

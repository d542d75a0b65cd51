"""The stages' clock: compilation left out, the devices settled before a stage's time is read."""

from __future__ import annotations

import time

from tileup.progress import COMPILING, StageClock


def test_a_stage_settles_the_devices_before_its_time_is_read() -> None:
    events: list[str] = []

    def settle() -> None:
        time.sleep(0.05)  # the device's queued work of the stage
        events.append("settled")

    clock = StageClock(settle=settle)
    with clock.stage("diffusion"):
        events.append("ran")
    assert events == ["ran", "settled"]
    assert clock.seconds["diffusion"] >= 0.05  # the wait counts to the stage that queued it
    with clock.stage("vae_decode"):
        pass
    assert clock.seconds["vae_decode"] < 0.05 + 0.04
    assert events == ["ran", "settled", "settled"]


def test_a_stage_settles_even_when_it_fails() -> None:
    settled: list[bool] = []
    clock = StageClock(settle=lambda: settled.append(True))
    try:
        with clock.stage("pixel"):
            raise ValueError("bad tile")
    except ValueError:
        pass
    assert settled == [True] and "pixel" in clock.seconds


def test_compilation_is_left_out_of_a_stage() -> None:
    clock = StageClock()
    with clock.stage("diffusion"):
        COMPILING.started()
        time.sleep(0.05)
        COMPILING.ended()
    assert clock.seconds["diffusion"] < 0.04
    assert clock.seconds["compile"] >= 0.05

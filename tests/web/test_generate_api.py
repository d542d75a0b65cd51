"""POST /api/generate against the real server: txt2img + hires fix jobs in the same queue."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image
from webclient import Server, multipart

from tileup.infotext import parse_parameters

GEN = {
    "prompt": "a castle", "width": 64, "height": 64, "steps": 2, "seed": 7, "tile": 128,
    "overlap": 32, "hr_scale": 1.5, "denoise": 0.5,
}  # fmt: skip


def test_generate_job_from_submit_to_result(server: Server) -> None:
    status, plan = server.post_json("api/generate/plan", GEN)
    assert status == 200, plan
    assert plan["first_pass"] == [64, 64] and plan["output"] == [96, 96] and plan["seeds"] == [7]
    status, answer = server.post_json("api/generate", {**GEN, "save_first_pass": True})
    assert status == 202, answer
    (job_id,) = answer["jobs"]
    final = server.wait(job_id)
    assert final["state"] == "done" and final["fraction"] == 1.0, final
    assert final["done_units"] == final["total_units"] == plan["units"] > 0
    assert final["output_size"] == [96, 96] and final["kind"] == "generate"
    status, data, headers = server.request(f"api/jobs/{job_id}/result")
    assert status == 200 and headers["Content-Type"] == "image/png"
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (96, 96)
        prompt, _, items = parse_parameters(img.info["parameters"])
    assert prompt == "a castle" and items["Size"] == "64x64" and items["Seed"] == "7"
    assert items["Hires upscale"] == "1.5" and items["Hires upscaler"] == "Latent"
    assert items["Denoising strength"] == "0.5" and items["Model"] == "tiny"
    assert re.fullmatch(r"\d{5}-7\.png", final["output"])
    assert (server.output_dir / final["output"]).read_bytes() == data
    first = server.output_dir / final["first_pass_output"]
    assert first.name == final["output"].replace(".png", "-first-pass.png")
    with Image.open(first) as img:
        assert img.size == (64, 64)


def test_batch_is_one_job_per_seed_and_multipart_works(server: Server) -> None:
    settings = {**GEN, "hires_fix": False, "batch_count": 2, "seed": 20}
    body, kind = multipart([], settings)
    status, answer, _ = server.request("api/generate", body, {"Content-Type": kind})
    assert status == 202 and answer["seeds"] == [20, 21], answer
    finals = [server.wait(j) for j in answer["jobs"]]
    assert [f["state"] for f in finals] == ["done", "done"]
    assert [f["output_size"] for f in finals] == [[64, 64], [64, 64]]
    numbers = sorted(int(f["output"][:5]) for f in finals)
    assert numbers[1] == numbers[0] + 1  # A1111's numbering, one after another
    assert {f["output"][6:] for f in finals} == {"20.png", "21.png"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"width": 65}, "width must be a multiple of 8 of at least 64, got 65"),
        ({"hr_scale": 40}, "hr_scale must be in [1, 16], got 40"),
        ({"hr_scale": "big"}, "bad settings"),
        ({"upscaler": "lanczos"}, "unknown setting(s) upscaler"),
        ({"sampler": "Nope"}, "Nope"),
        ({"prompt": 3}, "prompt must be a str"),
        ({"checkpoint": "../tiny.safetensors"}, "not a path"),
        ({"hr_checkpoint": "/etc/passwd"}, "not a path"),
        ({"hr_checkpoint": "..\\x.safetensors"}, "not a path"),
        ({"hr_checkpoint": "evil.ckpt"}, ".safetensors checkpoints only"),
        ({"hr_checkpoint": "other.safetensors"}, "is not offered"),
        ({"hr_upscaler": "../../etc/passwd"}, "not a path"),
        ({"hr_upscaler": "nosuchmodel"}, "is not offered"),
        ({"device": "cuda"}, "set by the server"),
        ({"save_first_pass": "yes"}, "save_first_pass must be a bool"),
    ],
)
def test_bad_generate_settings_are_400_with_one_line(
    server: Server, settings: dict, message: str
) -> None:
    for path in ("api/generate", "api/generate/plan"):
        status, answer = server.post_json(path, {**GEN, **settings})
        assert status == 400 and message in answer["error"], (path, answer)
        assert "\n" not in answer["error"]


def test_cancel_mid_generate_writes_nothing(server: Server) -> None:
    before = set(server.output_dir.iterdir())
    slow = {**GEN, "steps": 2, "hr_second_pass_steps": 400, "seed": 99}
    status, answer = server.post_json("api/generate", slow)
    assert status == 202, answer
    (job_id,) = answer["jobs"]
    server.wait(job_id, ("running",))
    while server.request(f"api/jobs/{job_id}")[1]["done_units"] < 6:  # in the hires pass
        pass
    assert server.request(f"api/jobs/{job_id}")[1]["stage"].startswith("hires: ")
    server.request(f"api/jobs/{job_id}/cancel", b"", method="POST")
    final = server.wait(job_id, timeout=10)
    assert final["state"] == "cancelled" and final["fraction"] < 0.5, final
    assert set(server.output_dir.iterdir()) == before


def test_a_second_generate_reuses_the_loaded_models(server: Server) -> None:
    cache = server.handle.app.engines.models
    settings = {**GEN, "hr_checkpoint": "tiny.safetensors", "hr_prompt": "stone walls"}
    first = server.wait(server.post_json("api/generate", settings)[1]["jobs"][0])
    assert first["state"] == "done", first
    (loaded,) = cache.items.values()
    again = {**settings, "prompt": "a tower", "seed": 8, "cfg": 5.0}
    second = server.wait(server.post_json("api/generate", again)[1]["jobs"][0])
    assert second["state"] == "done", second
    assert [id(m) for m in cache.items.values()] == [id(loaded)]  # not loaded again
    items = parse_parameters(second["parameters"])[2]
    assert items["Hires checkpoint"] == "tiny" and items["Hires prompt"] == "stone walls"
    assert parse_parameters(second["parameters"])[0] == "a tower"

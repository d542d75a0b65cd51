"""The HTTP API against the real server: plan, jobs, results, validation, limits, safety."""

from __future__ import annotations

import io
import itertools
import json
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webclient import UPLOAD_LIMIT, Server, multipart, png_bytes

from tileup.imageio import read_parameters
from tileup.infotext import parse_parameters
from tileup.web import ServerConfig

PIXEL_ONLY = {"checkpoint": None}
FAST = {"tile": 64, "overlap": 16, "steps": 2, "upscaler": "lanczos", "seed": 3}


def test_models_lists_names_from_the_configured_folders_only(server: Server) -> None:
    status, models, _ = server.request("api/models")
    assert status == 200
    assert models["upscalers"][0] == "default" and "lanczos" in models["resamplers"]
    assert models["checkpoints"] == ["tiny.safetensors"]  # evil.ckpt is not offered
    names = [*models["upscalers"], *models["checkpoints"], *models["vaes"]]
    assert all("/" not in n and "\\" not in n for n in names)
    assert {"Pixel only", "Seamless (fused)", "Ultimate SD Upscale classic", "Low VRAM"} <= set(
        models["presets"]
    )
    grouped = {name for names in models["groups"].values() for name in names}
    assert {f["name"] for f in models["fields"]} <= grouped


def test_plan_comes_from_the_pipeline_geometry(server: Server) -> None:
    status, plan = server.post_json(
        "api/plan", {"width": 48, "height": 48, "settings": {**FAST, "seam_fix": "band"}}
    )
    assert status == 200, plan
    assert plan["output"] == [96, 96] and plan["mode"] == "fused"
    # 96 px canvas, tile 64, overlap 16: 2×2 fused tiles, 2 steps each
    assert len(plan["tiles"]) == 4 and plan["tile_steps"] == 8 and plan["steps_per_tile"] == 2
    assert all(x >= 0 and y >= 0 and x + w <= 96 and y + h <= 96 for x, y, w, h in plan["tiles"])
    regions = sum(len(p["regions"]) for p in plan["seam_fix"])
    assert [p["name"] for p in plan["seam_fix"]] == ["band-rows", "band-cols"]
    assert plan["seam_fix_jobs"] == regions == 4 and plan["seam_fix_tile_steps"] == 8
    assert plan["units"] == plan["tile_steps"] + plan["seam_fix_tile_steps"]
    redraw = {**FAST, "mode": "redraw"}
    status, plan = server.post_json("api/plan", {"width": 48, "height": 48, "settings": redraw})
    assert plan["mode"] == "redraw" and len(plan["tiles"]) == 4  # 96/64 → 2×2, no overlap
    query = "width=48&height=48&settings=" + json.dumps(PIXEL_ONLY)
    status, plan, _ = server.request("api/plan?" + query.replace(" ", "%20"))
    assert status == 200 and plan["mode"] is None and plan["pixel_tile_count"] == 1


def test_pixel_job_from_submit_to_result(server: Server, small_photo: np.ndarray) -> None:
    status, answer = server.submit([("api-photo.png", png_bytes(small_photo))], PIXEL_ONLY)
    assert status == 202, answer
    (job_id,) = answer["jobs"]
    final = server.wait(job_id)
    assert final["state"] == "done" and final["fraction"] == 1.0, final
    status, data, headers = server.request(f"api/jobs/{job_id}/result")
    assert status == 200 and headers["Content-Type"] == "image/png"
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (96, 96)
        _, _, items = parse_parameters(img.info["parameters"])
    assert items["Upscaler"] == "realesrgan-x4fast" and items["Size"] == "96x96"
    written = server.output_dir / final["output"]
    assert written.read_bytes() == data and written.name.startswith("api-photo_tileup")


def test_rediffusion_job_counts_what_the_plan_said(server: Server, small_photo: np.ndarray) -> None:
    _, plan = server.post_json("api/plan", {"width": 48, "height": 48, "settings": FAST})
    status, answer = server.submit([("api-diffuse.png", png_bytes(small_photo))], FAST)
    assert status == 202, answer
    final = server.wait(answer["jobs"][0])
    assert final["state"] == "done", final
    assert final["total_units"] == final["done_units"] == plan["units"]
    assert final["stats"]["tile_steps"] == plan["tile_steps"]
    items = parse_parameters(read_parameters(server.output_dir / final["output"]))[2]
    assert items["Steps"] == "2" and items["Model"] == "tiny" and items["Seed"] == "3"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tile": 65}, "tile must be a multiple of 8 in [64, ∞), got 65"),
        ({"scale": 0}, "scale must be in (0, 64], got 0"),
        ({"colour": 1}, "unknown setting(s) colour"),
        ({"upscaler": "../../etc/passwd"}, "not a path"),
        ({"upscaler": "/etc/passwd"}, "not a path"),
        ({"upscaler": "nosuchmodel"}, "is not offered"),
        ({"checkpoint": "/tmp/x.safetensors"}, "not a path"),
        ({"checkpoint": "evil.ckpt"}, ".safetensors checkpoints only"),
        ({"vae": "..\\vae.safetensors"}, "not a path"),
        ({"models_dirs": ["/"]}, "set by the server"),
        ({"device": "cuda"}, "set by the server"),
        ({"prompt": 3}, "prompt must be a str"),
        ({"max_pixels": 1 << 40}, "max_pixels must be at most"),
        ({"upscaler": "latent", "mode": "redraw"}, "needs mode fused"),
    ],
)
def test_bad_settings_are_400_with_one_line(
    server: Server, small_photo: np.ndarray, settings: dict, message: str
) -> None:
    status, answer = server.submit([("bad.png", png_bytes(small_photo))], settings)
    assert status == 400 and message in answer["error"], answer
    assert "\n" not in answer["error"]
    status, plan = server.post_json("api/plan", {"width": 8, "height": 8, "settings": settings})
    assert status == 400 and message in plan["error"]


def test_bad_uploads_are_refused_and_the_server_goes_on(server: Server) -> None:
    status, answer = server.submit([("notes.png", b"just some text, not an image")], PIXEL_ONLY)
    assert status == 400 and "notes.png: not an image file" in answer["error"], answer
    assert "/" not in answer["error"]  # the server's upload path is not shown
    big = b"\0" * (UPLOAD_LIMIT + 1)
    status, answer = server.submit([("big.png", big)], PIXEL_ONLY)
    assert status == 413 and "exceeds the limit" in answer["error"]
    status, answer = server.submit([("bomb.png", _bomb_png(30000, 30000))], PIXEL_ONLY)
    assert status == 413 and "refused before decoding" in answer["error"], answer
    body, kind = multipart([], PIXEL_ONLY)
    status, answer, _ = server.request("api/jobs", body, {"Content-Type": kind})
    assert status == 400 and "no image" in answer["error"]
    status, answer, _ = server.request("api/jobs", b"{}", {"Content-Type": "application/json"})
    assert status == 400 and "multipart" in answer["error"]
    assert server.request("api/models")[0] == 200


def test_a_job_that_fails_fails_alone(server: Server, small_photo: np.ndarray) -> None:
    good = png_bytes(small_photo)
    broken = good[: len(good) // 2]  # a valid header, truncated pixel data
    status, answer = server.submit([("broken.png", broken), ("fine.png", good)], PIXEL_ONLY)
    assert status == 202, answer
    bad, fine = (server.wait(j) for j in answer["jobs"])
    assert bad["state"] == "failed" and "broken.png" not in (bad["output"] or "")
    assert "truncated" in bad["error"] or "corrupt" in bad["error"], bad
    assert fine["state"] == "done"
    assert not list(server.output_dir.glob("broken_tileup*"))


def test_concurrent_submissions_queue_behind_one_worker(
    server: Server, small_photo: np.ndarray
) -> None:
    answers: list[tuple[int, dict]] = []

    def submit(k: int) -> None:
        answers.append(server.submit([(f"conc-{k}.png", png_bytes(small_photo))], PIXEL_ONLY))

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(status == 202 for status, _ in answers), answers
    ids = [a["jobs"][0] for _, a in answers]
    assert len(set(ids)) == 4
    finals = sorted((server.wait(i) for i in ids), key=lambda s: s["started"])
    assert all(f["state"] == "done" for f in finals)
    for before, after in itertools.pairwise(finals):  # one at a time: never overlapping
        assert after["started"] >= before["finished"]
    assert len({f["output"] for f in finals}) == 4


def test_cancel_stops_a_running_job_and_writes_nothing(
    server: Server, small_photo: np.ndarray
) -> None:
    slow = {**FAST, "steps": 400, "denoise": 1.0}
    status, answer = server.submit(
        [("api-cancel.png", png_bytes(small_photo)), ("api-queued.png", png_bytes(small_photo))],
        slow,
    )
    assert status == 202, answer
    running, queued = answer["jobs"]
    status, cancelled, _ = server.request(f"api/jobs/{queued}/cancel", b"", method="POST")
    assert status == 202 and cancelled["state"] == "cancelled"
    server.wait(running, ("running",))
    while server.request(f"api/jobs/{running}")[1]["done_units"] < 8:  # inside the sampling
        pass
    server.request(f"api/jobs/{running}/cancel", b"", method="POST")
    final = server.wait(running, timeout=10)
    assert final["state"] == "cancelled" and final["fraction"] < 0.5, final
    assert not list(server.output_dir.glob("api-cancel_tileup*"))
    assert not list(server.output_dir.glob("api-queued_tileup*"))
    status, answer, _ = server.request(f"api/jobs/{running}/result")
    assert status == 409 and "cancelled" in answer["error"]


def test_parameters_of_an_a1111_png(server: Server, small_photo: np.ndarray) -> None:
    text = "a red fox\nNegative prompt: blurry\nSteps: 12, Sampler: DPM++ 2M, CFG scale: 5, Seed: 9"
    body, kind = multipart([("a1111.png", png_bytes(small_photo, text))], None)
    status, answer, _ = server.request("api/parameters", body, {"Content-Type": kind})
    assert status == 200 and answer["text"] == text
    assert answer["settings"] == {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "steps": 12,
        "sampler": "DPM++ 2M",
        "cfg": 5.0,
        "seed": 9,
    }


def test_served_files_reference_no_other_site(server: Server) -> None:
    for path in ("", "static/app.js", "static/style.css"):
        status, body, headers = server.request(path)
        assert status == 200
        text = body.decode() if isinstance(body, bytes) else json.dumps(body)
        assert "http://" not in text and "https://" not in text, path
        assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert server.request("static/../../pyproject.toml")[0] == 404
    assert server.request("static/nosuch.js")[0] == 404


def test_cross_site_and_rebinding_requests_are_refused(server: Server) -> None:
    body, kind = multipart([], PIXEL_ONLY)
    headers = {"Content-Type": kind, "Origin": "http://evil.example"}
    status, answer, _ = server.request("api/jobs", body, headers)
    assert status == 403 and "cross-site" in answer["error"]
    status, answer, _ = server.request("api/models", headers={"Host": "evil.example:80"})
    assert status == 403


def test_basic_auth_guards_every_route(tmp_path: Path) -> None:
    import base64

    from conftest import start

    from tileup.web.server import stop_server

    config = ServerConfig(port=0, auth=("ann", "s3cret"), output_dir=tmp_path, quiet=True)
    handle, thread = start(config)
    client = Server(handle.url, tmp_path, handle)
    try:
        for path in ("", "api/models", "static/app.js"):
            status, _, headers = client.request(path)
            assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        wrong = {"Authorization": "Basic " + base64.b64encode(b"ann:nope").decode()}
        assert client.request("api/models", headers=wrong)[0] == 401
        right = {"Authorization": "Basic " + base64.b64encode(b"ann:s3cret").decode()}
        assert client.request("api/models", headers=right)[0] == 200
    finally:
        stop_server(handle)
        thread.join(10)


def test_ui_command_needs_auth_to_listen(capsys: pytest.CaptureFixture[str]) -> None:
    from tileup.cli import main

    assert main(["ui", "--listen"]) == 2
    assert "--listen (or a non-loopback --host) needs --auth" in capsys.readouterr().err
    assert main(["ui", "--auth", "nopassword"]) == 2
    assert "--auth must be USER:PASSWORD" in capsys.readouterr().err


def _bomb_png(width: int, height: int) -> bytes:
    """A small PNG whose header declares ``width``×``height`` (its data is a stub)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def test_a1111_upscaler_names_resolve_to_the_listed_files(tmp_path: Path, shared_models) -> None:
    """Parameters copied from an A1111 PNG name models A1111's way ("R-ESRGAN 4x+"): accepted
    when the file it stands for is in the configured folders, refused otherwise."""
    import shutil

    from tileup.settings import SettingsError
    from tileup.web.catalog import Catalog

    (tmp_path / "ESRGAN").mkdir()
    target = tmp_path / "ESRGAN" / "RealESRGAN_x4plus_anime_6B.safetensors"
    shutil.copy(shared_models / "RealESRGAN_x4plus_anime_6B.safetensors", target)
    catalog = Catalog(models_dirs=(tmp_path,))
    assert catalog.upscaler("R-ESRGAN 4x+ Anime6B") == str(target)
    assert catalog.hr_upscaler("r-esrgan 4x+  anime6b") == "r-esrgan 4x+  anime6b"
    with pytest.raises(SettingsError, match="not offered"):
        catalog.upscaler("R-ESRGAN 4x+")  # its file RealESRGAN_x4plus is not there
    with pytest.raises(SettingsError, match="not offered"):
        catalog.hr_upscaler("R-ESRGAN 4x+")

"""The page in a real headless Chromium (Debian's ``chromium``) against the real server.

Fails, not skips, when Chromium or Playwright is missing; ``TILEUP_SKIP_BROWSER=1`` skips.
Every request the page makes is recorded: all must go to the server (127.0.0.1).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from webclient import Server, png_bytes

from tileup.infotext import parse_parameters

CHROMIUM = os.environ.get("TILEUP_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOTS = os.environ.get("TILEUP_SCREENSHOTS")  # a folder: save the main states there


def _install_chromium() -> None:
    """Debian's chromium, installed by the tests themselves where they may (root with apt-get,
    as in CI): the README's test command is then the whole set-up."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        subprocess.run(command, check=False, capture_output=True, timeout=900)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if os.environ.get("TILEUP_SKIP_BROWSER") == "1":
        pytest.skip("TILEUP_SKIP_BROWSER=1")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install '.[test]'")
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        _install_chromium()
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        pytest.fail(f"{CHROMIUM} not found: apt-get install chromium (or TILEUP_SKIP_BROWSER=1)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1300, "height": 900})
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(server.url)
    page.wait_for_selector("body[data-ready='1']", timeout=20000)
    yield page
    context.close()
    local = (server.url, "blob:" + server.url)  # blob: URLs are the page's own files
    assert requests and all(url.startswith(local) for url in requests), [
        url for url in requests if not url.startswith(local)
    ]
    assert server.url.startswith("http://127.0.0.1:")


def _photo_file(tmp_path: Path, pixels: np.ndarray, name: str, text: str | None = None) -> Path:
    path = tmp_path / name
    path.write_bytes(png_bytes(pixels, text))
    return path


def _shot(page: Any, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / name), full_page=True)


def _job(page: Any, state: str, timeout: float = 60000) -> Any:
    return page.wait_for_selector(f".job[data-state='{state}']", timeout=timeout)


def test_pixel_only_job_from_upload_to_download(
    page: Any, server: Server, small_photo: np.ndarray, tmp_path: Path
) -> None:
    page.set_input_files("#files", str(_photo_file(tmp_path, small_photo, "ui-pixel.png")))
    page.select_option("#preset", "Pixel only")
    page.wait_for_selector("#overlay[data-pixel-tiles='1'][data-tiles='0']")
    assert "output 96×96" in page.inner_text("#summary")
    page.click("#run")
    item = _job(page, "done")
    assert "100 %" in item.inner_text()
    page.wait_for_selector("#after:not([hidden])")
    assert "Upscaler: realesrgan-x4fast" in page.inner_text("#parameters")
    with page.expect_download() as info:
        item.query_selector(".download").click()
    data = Path(info.value.path()).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (96, 96)
        _, _, items = parse_parameters(img.info["parameters"])
    assert items["Size"] == "96x96" and info.value.suggested_filename.startswith("ui-pixel")
    assert (server.output_dir / info.value.suggested_filename).read_bytes() == data


def test_rediffusion_job_shows_the_tiles_then_the_comparison(
    page: Any, server: Server, small_photo: np.ndarray, tmp_path: Path
) -> None:
    page.set_input_files("#files", str(_photo_file(tmp_path, small_photo, "ui-diffuse.png")))
    page.select_option("#f-checkpoint", "tiny.safetensors")
    page.select_option("#f-upscaler", "lanczos")
    for name, value in {"tile": "64", "overlap": "16", "steps": "2", "seed": "5"}.items():
        page.fill(f"#f-{name}", value)
    page.select_option("#f-seam_fix", "band")
    page.wait_for_selector("#overlay[data-tiles='4'][data-seam-regions='4']")
    assert "8 tile-steps" in page.inner_text("#summary").replace("\n", " ")
    _shot(page, "ui-before.png")
    page.click("#run")
    _job(page, "done")
    page.wait_for_selector("#after:not([hidden])")
    text = page.inner_text("#parameters")
    assert "Steps: 2" in text and "Seed: 5" in text and "Seam fix: band" in text
    page.fill("#slider", "30")
    assert page.eval_on_selector("#before-clip", "e => e.style.width") == "30%"
    _shot(page, "ui-after.png")
    page.click("#zoom")
    assert "zoom" in page.get_attribute("#compare", "class")
    assert page.eval_on_selector("#after-img", "e => e.clientWidth") == 96  # 1:1


def test_cancel_mid_job_writes_nothing(
    page: Any, server: Server, small_photo: np.ndarray, tmp_path: Path
) -> None:
    page.set_input_files("#files", str(_photo_file(tmp_path, small_photo, "ui-cancel.png")))
    page.select_option("#f-checkpoint", "tiny.safetensors")
    page.select_option("#f-upscaler", "lanczos")
    for name, value in {"tile": "64", "overlap": "16", "steps": "300", "denoise": "1"}.items():
        page.fill(f"#f-{name}", value)
    page.wait_for_selector("#overlay[data-tiles='4']")
    page.click("#run")
    item = _job(page, "running")
    page.wait_for_selector("#overlay:not([data-active='0'])", timeout=30000)  # tile highlighted
    page.wait_for_selector("#preview-box:not([hidden])", timeout=30000)
    assert "approximate" in page.inner_text("#preview-label")
    _shot(page, "ui-running.png")
    item.query_selector(".cancel").click()
    _job(page, "cancelled", 15000)
    assert not list(server.output_dir.glob("ui-cancel_tileup*"))


def test_bad_upload_gets_a_clear_message_and_the_server_goes_on(
    page: Any, server: Server, tmp_path: Path
) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a picture")
    page.set_input_files("#files", str(bad))
    page.wait_for_selector("#message:has-text('the browser cannot show this image')")
    page.click("#run")  # the server says what is wrong with it
    page.wait_for_selector("#message:has-text('broken.png: not an image file')")
    assert "\n" not in page.inner_text("#message").strip()
    status = page.evaluate("fetch('/api/models').then(r => r.status)")
    assert status == 200


def test_an_a1111_png_offers_its_parameters(
    page: Any, small_photo: np.ndarray, tmp_path: Path
) -> None:
    text = (
        "a castle on a hill\nNegative prompt: fog\nSteps: 7, Sampler: DDIM, CFG scale: 4, Seed: 11"
    )
    page.set_input_files("#files", str(_photo_file(tmp_path, small_photo, "a1111.png", text)))
    page.wait_for_selector("#reuse:not([hidden])")
    page.click("#reuse-apply")
    assert page.input_value("#f-prompt") == "a castle on a hill"
    assert page.input_value("#f-steps") == "7" and page.input_value("#f-sampler") == "DDIM"


def test_generate_tab_runs_txt2img_with_hires_fix(
    page: Any, server: Server, small_photo: np.ndarray, tmp_path: Path
) -> None:
    page.click("#mode-generate")
    assert page.is_hidden("#upscale-controls") and page.inner_text("#run") == "Generate"
    text = "a lighthouse\nNegative prompt: fog\nSteps: 2, Sampler: DDIM, CFG scale: 4, Seed: 12, "
    text += "Size: 64x64, Denoising strength: 0.5, Hires upscale: 1.5, Hires upscaler: Latent"
    page.set_input_files("#gen-reuse-file", str(_photo_file(tmp_path, small_photo, "g.png", text)))
    page.wait_for_selector("#gen-form[data-reused='g.png']")
    assert page.input_value("#g-prompt") == "a lighthouse"
    assert page.input_value("#g-sampler") == "DDIM" and page.input_value("#g-hr_scale") == "1.5"
    page.fill("#g-prompt", "a lighthouse at night")
    page.fill("#g-tile", "128")
    page.wait_for_selector("#summary[data-output='96x96']")
    assert "first pass 64×64" in page.inner_text("#summary")
    assert page.is_hidden("#stage-box")
    page.click("#run")
    item = _job(page, "done")
    assert "100 %" in item.inner_text() and "seed 12" in item.inner_text()
    page.wait_for_selector("#after:not([hidden])")
    assert "(96×96" in page.inner_text("#after-name")
    params = page.inner_text("#parameters")
    assert "a lighthouse at night" in params and "Hires upscale: 1.5" in params
    assert "Size: 64x64" in params and "Seed: 12" in params
    deadline = time.monotonic() + 10
    while page.eval_on_selector("#after-img", "e => e.naturalWidth") != 96:
        assert time.monotonic() < deadline, "the result image did not load"
        page.wait_for_timeout(50)
    _shot(page, "ui-generate.png")

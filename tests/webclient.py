"""Helpers of the web tests: a client of the real server, multipart bodies, PNG bytes."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from tileup.web.server import TileupServer

UPLOAD_LIMIT = 2 << 20
PIXEL_LIMIT = 4096 * 4096


@dataclass
class Server:
    """A running test server: its base URL, output folder and handle."""

    url: str
    output_dir: Path
    handle: TileupServer

    def request(
        self,
        path: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        method: str | None = None,
    ) -> tuple[int, Any, dict[str, str]]:
        """(status, parsed JSON or bytes, headers) of one request; no exception on 4xx."""
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        if method:
            req.method = method
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                status, body, head = response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            status, body, head = exc.code, exc.read(), dict(exc.headers)
        if head.get("Content-Type", "").startswith("application/json"):
            return status, json.loads(body), head
        return status, body, head

    def post_json(self, path: str, value: Any) -> tuple[int, Any]:
        data = json.dumps(value).encode()
        status, body, _ = self.request(path, data, {"Content-Type": "application/json"})
        return status, body

    def submit(
        self, images: list[tuple[str, bytes]], settings: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        body, kind = multipart(images, settings)
        status, answer, _ = self.request("api/jobs", body, {"Content-Type": kind})
        return status, answer

    def wait(self, job_id: str, states: tuple[str, ...] = ("done", "failed", "cancelled"),
             timeout: float = 60) -> dict[str, Any]:  # fmt: skip
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            _, status, _ = self.request(f"api/jobs/{job_id}")
            if status["state"] in states:
                return status
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} not {states} after {timeout} s: {status}")


def multipart(
    images: list[tuple[str, bytes]], settings: dict[str, Any] | None
) -> tuple[bytes, str]:
    """A multipart/form-data body: ``image`` files and a ``settings`` JSON field."""
    boundary = "tileuptestboundary7d1f"
    chunks = []
    for name, data in images:
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    if settings is not None:
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="settings"\r\n\r\n'.encode()
            + json.dumps(settings).encode()
            + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def png_bytes(pixels: np.ndarray, parameters: str | None = None) -> bytes:
    info = None
    if parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()

"""The real server, started in-process on a free port, with the tiny test checkpoint."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from webclient import PIXEL_LIMIT, UPLOAD_LIMIT, Server

from tileup.web import ServerConfig, make_server
from tileup.web.server import TileupServer, stop_server


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine run many times faster on one thread (several
    threads spin against each other and against the server's threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_photo() -> np.ndarray:
    """A 48×48 crop of skimage's astronaut (uint8 RGB)."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[100:148, 180:228])


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the tiny random-weight SD1 checkpoint (and a .ckpt the server refuses)."""
    from sd_fixtures import make_tiny_components, save_single_file

    folder = tmp_path_factory.mktemp("checkpoints")
    save_single_file(make_tiny_components("sd1"), folder / "tiny.safetensors", "sd1")
    (folder / "evil.ckpt").write_bytes(b"not loaded")
    return folder


def start(config: ServerConfig) -> tuple[TileupServer, threading.Thread]:
    server = make_server(config)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, checkpoint_dir: Path) -> Iterator[Server]:
    out = tmp_path_factory.mktemp("outputs")
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        checkpoints=(checkpoint_dir,),
        output_dir=out,
        device="cpu",
        max_upload_bytes=UPLOAD_LIMIT,
        max_pixels=PIXEL_LIMIT,
        quiet=True,
    )
    handle, thread = start(config)
    try:
        yield Server(handle.url, out, handle)
    finally:
        stop_server(handle)
        thread.join(10)

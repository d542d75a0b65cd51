"""tileup.distributed: batches on a local Ray cluster of 2 CPUs (started once for the module).

Tiny inputs (32×32 → 64×64 with the built-in model) so the module stays well under a minute on
two cores; most of its time is Ray starting worker processes.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

import tileup
from tileup.cli import main
from tileup.distributed import WorkerPlan, check_address, plan_workers
from tileup.manifest import MANIFEST_NAME, read_manifest
from tileup.settings import SettingsError, UpscaleSettings

TESTS = Path(__file__).resolve().parent
SETTINGS = UpscaleSettings(upscaler="default", scale=2, device="cpu")


# -- without a cluster ------------------------------------------------------------------------


def test_plan_workers() -> None:
    # CPU cluster: one single-threaded worker per CPU, never more than files
    assert plan_workers("auto", 2, 0, jobs=10) == WorkerPlan(2, 1.0, 0.0, "cpu")
    assert plan_workers("auto", 8, 0, jobs=3) == WorkerPlan(3, 1.0, 0.0, "cpu")
    assert plan_workers("cpu", 2, 4, jobs=10, workers=4) == WorkerPlan(4, 0.5, 0.0, "cpu")
    # GPUs: one worker each, the GPU Ray gives it as "cuda"; more workers share them
    assert plan_workers("auto", 16, 2, jobs=10) == WorkerPlan(2, 1.0, 1.0, "cuda")
    assert plan_workers("all", 16, 2, jobs=10, workers=4) == WorkerPlan(4, 1.0, 0.5, "cuda")
    assert plan_workers("cuda:1", 16, 2, jobs=1) == WorkerPlan(1, 1.0, 1.0, "cuda")
    with pytest.raises(SettingsError, match="has no GPU"):
        plan_workers("cuda", 8, 0, jobs=1)
    with pytest.raises(SettingsError, match="at least 1"):
        plan_workers("cpu", 8, 0, jobs=1, workers=0)


def test_check_address() -> None:
    assert check_address(True) is True and check_address("local") is True
    for address in ("auto", "10.0.0.1:6379", "head:6379", "ray://head:10001"):
        assert check_address(address) == address
    for bad in ("in/", "photos", "head:port", "http://x:1"):
        with pytest.raises(SettingsError, match="not a Ray cluster address"):
            check_address(bad)


def test_an_unreachable_cluster_is_one_line_at_once() -> None:
    """Ray itself retries an unreachable address for minutes: tileup checks the port first."""
    import socket
    import time

    from tileup.distributed import RayError, _check_reachable

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.perf_counter()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(RayError, match="cannot connect to the Ray cluster"):
            _check_reachable(address)
    assert time.perf_counter() - start < 10
    _check_reachable("auto")  # left to Ray


def test_ray_missing_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["batch", str(image), "-o", f"{tmp_path}/out/", "--ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['tileup: error: Ray is not installed: pip install "tileup[ray]" (or pip install '
                   '"ray>=2.9")']  # fmt: skip
    assert main(["batch", str(image), "--workers", "2"]) == 2
    assert "--workers needs --ray" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- on a local cluster -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A local Ray cluster of 2 CPUs; its workers run tests/ray_hooks.py's slow first write."""
    ray = pytest.importorskip("ray")
    markers = tmp_path_factory.mktemp("ray-markers")
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        runtime_env={
            "env_vars": {"PYTHONPATH": path, "TILEUP_TEST_MARKERS": str(markers)},
            "worker_process_setup_hook": "ray_hooks.slow_first_write",
        },
    )
    try:
        yield SimpleNamespace(markers=markers, address=ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


def make_inputs(folder: Path, photo: np.ndarray, names: list[str]) -> Path:
    """32×32 crops of the photo (a different one per file) under ``folder``."""
    for k, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        crop = photo[k % 32 : k % 32 + 32, 2 * k : 2 * k + 32]
        Image.fromarray(np.round(crop * 255).astype(np.uint8)).save(folder / name)
    return folder


def outputs(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` but the manifest (temporary files included), by path."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, photo: np.ndarray
) -> tuple[Path, dict[str, bytes]]:
    """Inputs (a tree) and the local batch's outputs of them."""
    root = tmp_path_factory.mktemp("ref")
    names = ["a.png", "b.png", "slow.png", "sub/c.png", "sub/deep/d.png", "e.png"]
    shots = make_inputs(root / "in", photo, names)
    out = root / "out"
    tileup.upscale_files([str(shots)], SETTINGS, output=f"{out}/", recursive=True)
    return shots, outputs(out)


def test_same_bytes_as_the_local_batch_with_a_worker_killed_mid_file(
    cluster: SimpleNamespace, reference: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """A worker is killed (SIGKILL) half-way through writing slow.png's output: that file is
    retried on another worker; every input ends with one output, byte for byte the local
    batch's, in the same tree, and no temporary file is left."""
    shots, expected = reference
    out = tmp_path / "out"
    pid_file = cluster.markers / "slow.pid"
    (cluster.markers / "armed").touch()  # the workers' first write of slow.png now hangs
    seen: dict[str, Any] = {}

    def killer() -> None:
        deadline = time.monotonic() + 50
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_file.exists():
            seen["temporary"] = [p.name for p in out.iterdir() if ".tmp-" in p.name]
            seen["pid"] = int(pid_file.read_text())
            os.kill(seen["pid"], signal.SIGKILL)

    finished: list[str] = []
    inputs = ["sub", "a.png", "b.png", "slow.png", "e.png"]
    thread = threading.Thread(target=killer)
    thread.start()
    try:
        outcomes = tileup.upscale_files(
            [str(shots / name) for name in inputs],
            SETTINGS,
            output=f"{out}/",
            recursive=True,
            ray=True,
            workers=2,
            on_outcome=lambda o: finished.append(o.source.name),
        )
    finally:
        thread.join()
    assert "pid" in seen, "no worker was killed"
    # killed half-way through slow.png's write (the other worker may be writing its own file)
    assert [t for t in seen["temporary"] if t.startswith(".slow_tileup.png.tmp-")]
    # input order kept, exactly one outcome each, all done, with their stats
    names = ["c.png", "d.png", "a.png", "b.png", "slow.png", "e.png"]
    assert [o.source.name for o in outcomes] == names and sorted(finished) == sorted(names)
    assert [o.error for o in outcomes] == [None] * 6 and all(o.stats for o in outcomes)
    # the local batch's bytes, mirrored from each input's root; nothing else (no temporary file)
    local = {"c_tileup.png": "sub/c_tileup.png", "deep/d_tileup.png": "sub/deep/d_tileup.png"}
    got = outputs(out)
    assert sorted(local.get(name, name) for name in got) == sorted(expected)
    for name, data in got.items():
        assert data == expected[local.get(name, name)], name
    done = [r for r in read_manifest(out / MANIFEST_NAME) if r.status != "planned"]
    assert sorted((r.output, r.status) for r in done) == [(n, "done") for n in sorted(got)]


def test_interrupted_run_resumes(
    cluster: SimpleNamespace, reference: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    shots, expected = reference
    out = tmp_path / "out"
    seen: list[str] = []

    def interrupt_after_two(outcome: tileup.FileOutcome) -> None:
        seen.append(outcome.source.name)
        if len(seen) == 2:
            raise KeyboardInterrupt  # Ctrl-C on the driver

    run: dict[str, Any] = {"output": f"{out}/", "recursive": True, "ray": True}
    with pytest.raises(KeyboardInterrupt):  # one worker, two files in flight
        tileup.upscale_files(
            [str(shots)], SETTINGS, on_outcome=interrupt_after_two, **run, workers=1
        )
    done_first = {r.input for r in read_manifest(out / MANIFEST_NAME) if r.status == "done"}
    assert len(done_first) == 2
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*_tileup.png")}
    again = tileup.upscale_files([str(shots)], SETTINGS, **run, workers=2)
    assert not again.failed and len(again) == 6
    assert {str(o.source.resolve()) for o in again.skipped} == done_first
    assert outputs(out) == expected
    for path, mtime in mtimes.items():  # the done ones untouched
        if any(path.name.startswith(Path(i).stem + "_") for i in done_first):
            assert path.stat().st_mtime_ns == mtime


def test_cli_joins_the_cluster_and_a_corrupt_file_fails_alone(
    cluster: SimpleNamespace, photo: np.ndarray, tmp_path: Path
) -> None:
    shots = make_inputs(tmp_path / "in", photo, ["a.png", "b.png", "d.png", "e.png"])
    (shots / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))  # in the middle
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tileup.cli", "batch", str(shots), "-o", f"{out}/",
               "--upscaler", "default", "--device", "cpu", "--stats", "--quiet",
               "--ray", cluster.address, "--workers", "2"]  # fmt: skip
    env = {**os.environ, "TILEUP_NO_PROGRESS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tileup:")]
    assert errors[-1] == "tileup: 4 done, 1 failed"
    assert sum("c.png" in line for line in errors) == 1
    assert len(proc.stdout.splitlines()) == 4  # --stats: one JSON line per file done
    assert sorted(outputs(out)) == ["a_tileup.png", "b_tileup.png", "d_tileup.png", "e_tileup.png"]
    failed = [r for r in read_manifest(out / MANIFEST_NAME) if r.status == "failed"]
    assert [Path(r.input).name for r in failed] == ["c.png"] and failed[0].error

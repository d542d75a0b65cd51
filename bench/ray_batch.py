"""Benchmark: a batch on Ray workers — images/s with 1, 2, … workers (CPU) or GPUs.

Makes ``--files`` crops of skimage's astronaut (``--size`` pixels square), starts one local Ray
cluster (``--cpus`` CPUs; the GPUs it finds) and runs ``tileup.upscale_files(..., ray=True,
workers=N)`` once per worker count into a fresh folder (manifest on, as a user runs it). For
each run:

- ``seconds``: the whole call, workers' start and model loading included;
- ``images_per_s``: files done per second of the whole call;
- ``steady_images_per_s``: (files − 1) / (last finish − first finish): the rate once every
  worker runs, start-up left out;
- ``worker_seconds``: the mean seconds a worker spent on one file (read, upscale, write).

Every run's outputs are compared byte for byte with the first run's. With ``--local`` the same
batch also runs in this process (one engine, no Ray) for reference. Results merge into
``results/ray_batch.json`` (keyed by device and workers, so a GPU run adds to a CPU one) and
``results/ray_batch.md``.

    python bench/ray_batch.py --workers 1 2 --files 24 --size 128 --local        # CPU, 2 cores
    python bench/ray_batch.py --device cuda --workers 1 2 --files 64 --size 512  # 1 and 2 GPUs
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import tileup
from tileup import FileOutcome, UpscaleSettings

RESULTS = Path(__file__).resolve().parent / "results"


def _inputs(folder: Path, files: int, size: int) -> list[str]:
    from skimage import data

    image = data.astronaut()
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(files):
        side = min(size, image.shape[0])
        top, left = (int(v) for v in rng.integers(0, image.shape[0] - side + 1, 2))
        crop = image[top : top + side, left : left + side]
        if side != size:
            crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.LANCZOS))
        path = folder / f"img{k:04d}.png"
        Image.fromarray(crop).save(path)
        paths.append(str(path))
    return paths


def _machine(device: str) -> dict[str, Any]:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    info: dict[str, Any] = {
        "cpu": fields.get("Model name", platform.processor()).strip(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }
    import ray
    import torch

    info["ray"], info["torch"] = ray.__version__, torch.__version__
    if device != "cpu" and torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _run(
    inputs: list[str], settings: UpscaleSettings, out: Path, workers: int | None
) -> dict[str, Any]:
    """One batch (on Ray with ``workers``; in this process when None) and its timings."""
    finishes: list[float] = []
    seconds: list[float] = []

    def on_outcome(outcome: FileOutcome) -> None:
        finishes.append(time.perf_counter())
        if outcome.seconds is not None:
            seconds.append(outcome.seconds)

    start = time.perf_counter()
    ray: bool | None = True if workers is not None else None
    outcomes = tileup.upscale_files(
        inputs, settings, output=f"{out}/", on_outcome=on_outcome, ray=ray, workers=workers
    )
    total = time.perf_counter() - start
    outcomes.raise_for_errors()
    steady = (len(finishes) - 1) / (finishes[-1] - finishes[0]) if len(finishes) > 1 else None
    return {
        "workers": workers,
        "files": len(outcomes),
        "seconds": round(total, 2),
        "images_per_s": round(len(outcomes) / total, 3),
        "steady_images_per_s": round(steady, 3) if steady else None,
        "worker_seconds": round(float(np.mean(seconds)), 4) if seconds else None,
    }


def _table(entries: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| device | job | workers | files | size | seconds (all) | images/s (all) "
        "| images/s (steady) | s per file in a worker | same bytes as the first run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries.values():
        workers = entry["workers"] if entry["workers"] is not None else "local (no Ray)"
        rows.append(
            f"| {entry['device']} | {entry.get('job', 'pixel')} | {workers} | {entry['files']} | "
            f"{entry['size']}² | "
            f"{entry['seconds']} | {entry['images_per_s']} | {entry['steady_images_per_s']} | "
            f"{entry['worker_seconds']} | {entry['same_bytes']} |"
        )
    return "\n".join(rows)


def _write(results: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Merge ``entries`` into results/ray_batch.json and render ray_batch.md from it."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / "ray_batch.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(entries)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    machines: dict[str, str] = {}
    for e in merged.values():
        m = e["machine"]
        gpus = f", {len(m['gpus'])}× {m['gpus'][0]}" if m.get("gpus") else ""
        load = " · ".join(f"{v:g}" for v in m.get("load_average_at_start", []))
        machines[e["device"]] = (
            f"{m['cpu']} ({m['cores']} cores){gpus}; load average at the start {load} "
            f"(the machine is shared); Ray {m['ray']}, torch {m['torch']}; {e['date']}, "
            f"commit {e['commit']}"
        )
    lines = [
        "# A batch on Ray workers: images per second",
        "",
        "`bench/ray_batch.py`: crops of skimage's astronaut, upscaled 2× by the built-in "
        "Real-ESRGAN model (`upscaler=default`) with `tileup.upscale_files(..., ray=True, "
        "workers=N)` on a local Ray cluster, manifest on; *rediffused* rows also re-diffuse "
        "with `--checkpoint` (fused tiles, 20 steps, the given denoise). *all*: the whole "
        "call (workers started, models loaded); *steady*: between the first and the last file "
        "finished. Raw numbers: `ray_batch.json`.",
        "",
        *(f"- {device}: {text}" for device, text in machines.items()),
        "",
        _table(merged),
        "",
    ]
    (results / "ray_batch.md").write_text("\n".join(lines))
    print(_table(merged))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per worker)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--upscaler", default="default")
    parser.add_argument("--scale", type=float, default=2)
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local cluster")
    parser.add_argument("--checkpoint", default=None, help="re-diffuse with this SD model")
    parser.add_argument("--denoise", type=float, default=0.3, help="with --checkpoint")
    parser.add_argument("--local", action="store_true", help="also run without Ray")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--commit", default=None)
    parser.add_argument("--render", action="store_true", help="only re-render the markdown")
    args = parser.parse_args(argv)
    if args.render:
        _write(args.results, {})
        return 0

    import ray

    settings = UpscaleSettings(
        upscaler=args.upscaler,
        scale=args.scale,
        device=args.device,
        checkpoint=args.checkpoint,
        denoise=args.denoise if args.checkpoint else 0.3,
        seed=1,
    )  # fmt: skip (a fixed seed: every run must give the same bytes)
    job = "rediffused" if args.checkpoint else "pixel"
    work = Path(tempfile.mkdtemp(prefix="tileup-ray-bench-"))
    machine = _machine(args.device)
    commit = (
        args.commit
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    )
    entries: dict[str, dict[str, Any]] = {}
    try:
        inputs = _inputs(work / "in", args.files, args.size)
        cpus = args.cpus or (os.cpu_count() if args.device == "cpu" else max(args.workers) + 1)
        ray.init(
            num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
            log_to_driver=False,
        )  # fmt: skip
        reference: dict[str, bytes] | None = None
        runs: list[int | None] = [*args.workers, *([None] if args.local else [])]
        for workers in runs:
            out = work / f"out-{workers}"
            entry = _run(inputs, settings, out, workers)
            got = _outputs(out)
            reference = reference if reference is not None else got
            entry.update(
                device=args.device, size=args.size, upscaler=args.upscaler, scale=args.scale,
                same_bytes=got == reference, date=args.date, commit=commit, machine=machine,
                job=job, checkpoint=Path(args.checkpoint).name if args.checkpoint else None,
                denoise=args.denoise if args.checkpoint else 0,
            )  # fmt: skip
            key = f"{args.device}-{job}-{'local' if workers is None else workers}"
            entries[key] = entry
            print(json.dumps({key: entry}), flush=True)
            shutil.rmtree(out)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    _write(args.results, entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())

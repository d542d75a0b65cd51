"""Golden hashes of CPU jobs on tiny random-weight checkpoints: the "no behaviour change" check.

Run before and after a refactor and compare the two JSON files; every job must give the same
pixel bytes and the same ``parameters`` text (the version and the model hash excepted: the
tiny checkpoint files are written anew each run). The bytes depend on the machine as well as
the code (another CPU runs other float kernels: an AMD EPYC and an Intel CPU with AMX differ in
every job), so a file from another machine proves nothing; ``--base REV`` computes the
comparison here, running this script of commit REV from a temporary git worktree. Each file
records the CPU and library versions it came from (``_environment``).

    python scripts/golden_hashes.py OUT.json [--compare OTHER.json | --base REV]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TILEUP_NO_PROGRESS", "1")

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from sd_fixtures import make_tiny_components, save_single_file  # noqa: E402

FAST = ["--tile", "64", "--overlap", "16", "--upscaler", "lanczos", "--steps", "4", "--seed", "7"]
FAST += ["--prompt", "a photo of an astronaut", "--quiet", "--scale", "2"]

_IGNORED = ("Version:", "Model hash:")

JOBS: dict[str, tuple[str, list[str]]] = {
    "pixel_default": ("", ["--upscaler", "default", "--quiet"]),
    "fused_sd1": ("sd1", FAST),
    "fused_sd1_dpmpp2m_karras_cfg1": (
        "sd1",
        [*FAST, "--sampler", "DPM++ 2M", "--scheduler", "karras", "--cfg", "1"],
    ),
    "fused_sdxl": ("sdxl", FAST),
    "fused_sd2v": ("sd2-v", FAST),
    "latent_bislerp": ("sd1", [*FAST, "--upscaler", "latent-bislerp", "--denoise", "0.6"]),
    "redraw_linear": ("sd1", [*FAST, "--mode", "redraw"]),
    "redraw_chess_hti": (
        "sd1",
        [*FAST, "--mode", "redraw", "--order", "chess", "--seam-fix", "half-tile+intersections"],
    ),
    "fused_band_wavelet": ("sd1", [*FAST, "--seam-fix", "band", "--color-fix", "wavelet"]),
    "redraw_sdxl_adain": ("sdxl", [*FAST, "--mode", "redraw", "--color-fix", "adain"]),
    "fused_sd1_batch1_alpha": ("sd1", [*FAST, "--tile-batch", "1"]),
}


def _cpu() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


ENVIRONMENT = {"cpu": _cpu(), "torch": torch.__version__, "numpy": np.__version__}
"""What the bytes depend on besides the code."""


def hashes_at(commit: str) -> dict[str, dict[str, str]]:
    """This script's results at ``commit`` on this machine: that commit's tree checked out in a
    temporary git worktree and its own golden_hashes.py run there (its tileup and fixtures)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree, out = Path(tmp) / "tree", Path(tmp) / "base.json"
        git = ["git", "-C", str(REPO)]
        subprocess.run([*git, "worktree", "add", "-q", "--detach", str(tree), commit], check=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(tree)}  # before the installed tileup
            script = tree / "scripts" / "golden_hashes.py"
            subprocess.run([sys.executable, str(script), str(out)], env=env, check=True)
            return dict(json.loads(out.read_text()))
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--compare", help="a JSON file this script wrote")
    choice.add_argument("--base", help="a commit: its hashes, computed on this machine")
    args = parser.parse_args()
    before = None
    if args.base:  # computed here, whatever that commit's script records
        before = {**hashes_at(args.base), "_environment": ENVIRONMENT}
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
    torch.set_num_threads(2)
    from skimage import data

    from tileup.cli import main as cli
    from tileup.imageio import read_parameters

    results: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        photo = data.astronaut()[120:184, 160:240]
        Image.fromarray(photo).save(root / "photo.png")
        rgba = np.dstack([photo, np.linspace(0, 255, photo.size // 3).reshape(photo.shape[:2])])
        Image.fromarray(rgba.astype(np.uint8), "RGBA").save(root / "photo_rgba.png")
        ckpts = {}
        for family in ("sd1", "sdxl", "sd2-v"):
            comps = make_tiny_components(family, seed=0)
            ckpts[family] = save_single_file(comps, root / f"{family}.safetensors", family)
        for name, (family, flags) in JOBS.items():
            src = root / ("photo_rgba.png" if "alpha" in name else "photo.png")
            out = root / f"{name}.png"
            extra = ["--checkpoint", str(ckpts[family])] if family else []
            code = cli([str(src), "-o", str(out), *flags, *extra])
            if code != 0:
                results[name] = {"error": f"exit {code}"}
                continue
            with Image.open(out) as img:
                pixels = np.asarray(img)
                mode = img.mode
            params = read_parameters(out) or ""
            params = "\n".join(
                ", ".join(
                    p for p in line.split(", ") if not p.startswith(("Version:", "Model hash:"))
                )
                for line in params.splitlines()
            )
            results[name] = {
                "mode": mode,
                "shape": str(pixels.shape),
                "pixels": hashlib.sha256(pixels.tobytes()).hexdigest(),
                "parameters": hashlib.sha256(params.encode()).hexdigest(),
                "parameters_text": params,
            }
            print(name, results[name]["pixels"][:16], flush=True)
    Path(args.out).write_text(json.dumps({**results, "_environment": ENVIRONMENT}, indent=1) + "\n")
    if before is not None:
        then_env = before.get("_environment", "not recorded")
        if then_env != ENVIRONMENT:
            print(f"note: the other file's environment ({then_env}) is not this one")
            print(f"      ({ENVIRONMENT}): differences may be the machine's; try --base REV")
        bad = 0
        for name, now in results.items():
            then = before.get(name)
            for key in ("pixels", "parameters"):
                if then is None or then.get(key) != now.get(key):
                    print(f"DIFFERENT: {name} {key}")
                    bad += 1
        print("all identical" if not bad else f"{bad} differences")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

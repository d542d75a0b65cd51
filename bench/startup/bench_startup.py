"""Start-up time of the command line: how long until `tileup --help`, `--version`, `models` and
`samplers` have answered, in fresh interpreters (median of N runs, after one untimed warm-up run
that fills the OS file cache and tileup's model-description cache).

    python bench/startup/bench_startup.py [--runs 7] [--out bench/startup/results]

Writes ``startup.json`` (every run's seconds, the machine, the date) and ``startup.md``.
The goal (issue 13): under 1 s for ``--help`` and ``models``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "--help": ["--help"],
    "--version": ["--version"],
    "models": ["models"],
    "samplers": ["samplers"],
}
GOAL_SECONDS = {"--help": 1.0, "models": 1.0}


def _time(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "tileup.cli", *argv], env=env, check=True, capture_output=True
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache}
        runs: dict[str, list[float]] = {}
        for name, argv in COMMANDS.items():
            _time(argv, env)  # warm-up: file cache, model-description cache
            runs[name] = [_time(argv, env) for _ in range(args.runs)]
    baseline = [_time_python() for _ in range(args.runs)]
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "python_alone_median_s": statistics.median(baseline),
        "runs_s": runs,
        "median_s": {name: statistics.median(values) for name, values in runs.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# CLI start-up ({results['date']}, {results['machine']})",
        "",
        f"Median of {args.runs} fresh interpreters after one warm-up; a bare `python -c pass` "
        f"takes {results['python_alone_median_s']:.3f} s here.",
        "",
        "| command | median s | goal |",
        "|---|---|---|",
    ]
    for name, median in results["median_s"].items():
        goal = GOAL_SECONDS.get(name)
        verdict = "" if goal is None else f"< {goal:g} s: {'met' if median < goal else 'NOT met'}"
        lines.append(f"| `tileup {name}` | {median:.3f} | {verdict} |")
    (args.out / "startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _time_python() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()

"""Runs a script of Triton kernel checks through Triton's interpreter, in a process of its own
(the interpreter must be on before triton is first imported, and the test session may have
imported it for torch.compile), and returns the JSON object it prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tileup


def run_interpreted(script: Path, unset: Iterable[str] = ()) -> dict[str, Any]:
    """``script``'s printed JSON, run under ``TRITON_INTERPRET=1`` with the tileup this session
    imports (installed or a checkout) and without the environment variables ``unset``."""
    root = str(Path(tileup.__file__).resolve().parent.parent)
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    for name in unset:
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result

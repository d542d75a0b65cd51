"""Test-only code for Ray worker processes (``worker_process_setup_hook`` of tests/test_ray_batch).

:func:`slow_first_write`: once ``$TILEUP_TEST_MARKERS/armed`` exists, the first write of an
output named ``slow*`` hangs half-written: the worker writes part of its temporary file, then its
process id to ``$TILEUP_TEST_MARKERS/slow.pid``, and sleeps, so a test can kill it mid-file.
Later writes (the retry) run normally.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def slow_first_write() -> None:
    import tileup.imageio.write as write

    markers = os.environ.get("TILEUP_TEST_MARKERS")
    encode = write.encode

    def slow(fh: Any, *args: Any) -> Any:
        armed = markers and (Path(markers) / "armed").exists()
        if armed and Path(fh.name).name.startswith(".slow"):
            try:
                claim = os.open(Path(markers) / "slow.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return encode(fh, *args)
            os.close(claim)
            fh.write(b"half an image")
            fh.flush()
            temp = Path(markers) / "slow.pid.tmp"
            temp.write_text(str(os.getpid()))
            temp.rename(Path(markers) / "slow.pid")
            time.sleep(60)
        return encode(fh, *args)

    write.encode = slow

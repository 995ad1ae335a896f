"""Test-only fault injection: a process signals itself at a point a test chose, so a fault test
decides what fails and where, not a timer racing the work.

A test writes a point's name (say `segmenter call 2`) into a marker file and names that file in
SPINE_DISCS_TEST_FAULT_MARKER before Ray starts, so every worker inherits it (a Ray Job gets it
through its runtime_env). The marker may be a local path or, for a job on nodes that share no
disk, a URI (`s3://bucket/faults/marker`). The first process that reaches the point deletes the
marker, then signals itself; the marker is gone when Ray restarts it, so the retry runs on. A
local deletion succeeds for one process only; on an object store, name a point that only one
process reaches (a rank-0 point). Without the variable (every real run) a point is one lookup.

A point may also wait for a condition before it fires (say, Ray Train's controller has committed
the previous checkpoint), so where a restart resumes is decided by the test, not by a race.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

MARKER_ENV = "SPINE_DISCS_TEST_FAULT_MARKER"
READY_TIMEOUT_S = 300  # a hang guard: a condition that never holds is a broken test


def point(name: str, signum: int = signal.SIGKILL,
          ready: Callable[[], bool] | None = None) -> None:
    """Send this process `signum` if the test's marker file names this point (once), after
    `ready()` holds when given."""
    marker = os.environ.get(MARKER_ENV)
    if not marker:
        return
    import pyarrow.fs as pafs

    fs, path = (pafs.FileSystem.from_uri(marker) if "://" in marker
                else (pafs.LocalFileSystem(), marker))
    try:
        with fs.open_input_stream(path) as f:
            if f.read().decode().strip() != name:
                return
        fs.delete_file(path)  # the fault happens once: a restarted process finds no marker
    except FileNotFoundError:
        return
    deadline = time.monotonic() + READY_TIMEOUT_S
    while ready is not None and not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"fault point {name!r}: its condition never held")
        time.sleep(0.2)
    os.kill(os.getpid(), signum)

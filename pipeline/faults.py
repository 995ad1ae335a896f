"""Test-only fault injection: a process signals itself at a point a test chose, so a fault test
decides what fails and where, not a timer racing the work.

A test writes a point's name (say `segmenter call 2`) into a marker file and names that file in
SPINE_DISCS_TEST_FAULT_MARKER before Ray starts, so every worker inherits it. The first process
that reaches the point deletes the marker, then signals itself; the marker is gone when Ray
restarts it, so the retry runs on. Without the variable (every real run) a point is one lookup.
"""

from __future__ import annotations

import os
import signal

MARKER_ENV = "SPINE_DISCS_TEST_FAULT_MARKER"


def point(name: str, signum: int = signal.SIGKILL) -> None:
    """Send this process `signum` if the test's marker file names this point (once)."""
    marker = os.environ.get(MARKER_ENV)
    if not marker:
        return
    try:
        with open(marker) as f:
            if f.read().strip() != name:
                return
        os.remove(marker)  # only one process wins the removal: the fault happens once
    except FileNotFoundError:
        return
    os.kill(os.getpid(), signum)

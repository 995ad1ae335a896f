"""Waiting on many Ray tasks from the driver: as each finishes, without a cost per task that
grows with how many are still running."""

from __future__ import annotations

import sys
from collections.abc import Iterator


def ray_is_up() -> bool:
    """Whether this process has joined a Ray cluster (never imports Ray to find out)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def as_completed(refs: list) -> Iterator:
    """Each of `refs` once its task has finished, soonest first. After waiting for the next one,
    a second wait collects every other task finished by then, so a burst of finishes among
    10,000 pending tasks costs two waits, not one per task."""
    import ray

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        if pending:
            more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            ready += more
        yield from ready

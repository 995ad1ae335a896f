"""Progress lines on the driver's console: counts of finished work, and lines from Ray Train
workers.

The job runs Ray with log_to_driver=False (forwarding every worker's output would bury the stage
lines under Ray's own logging), so a training worker's one-line epoch summary travels through a
small queue actor that a driver thread prints from. Works the same on a laptop and a cluster.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def counter(progress: Callable[[str], None] | None, what: str,
            lines: int = 10) -> Callable[[int, int], None]:
    """A `(done, total)` callback that says "what: done/total, seconds" about `lines` times
    however many items there are (60 classification cells or 10,000 patients), and at the end;
    silent without `progress`."""
    started = time.perf_counter()

    def count(done: int, total: int) -> None:
        step = max(1, -(-total // lines))  # ceiling: never more than `lines` lines
        if progress is not None and (done % step == 0 or done == total):
            progress(f"{what}: {done}/{total}, {time.perf_counter() - started:.0f} s")

    return count


class WorkerProgress:
    """Context manager: yields a picklable sink to hand to workers (`send(sink, line)`), and
    prints what they send through `progress` until the block ends."""

    def __init__(self, progress: Callable[[str], None] | None):
        self._progress = progress
        self._queue = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self._progress is None:
            return None
        from ray.util.queue import Queue

        # num_cpus=0: a queue that reserved a CPU would keep a 2-CPU trainer from starting
        self._queue = Queue(actor_options={"num_cpus": 0})
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        return self._queue

    def __exit__(self, *exc) -> None:
        if self._queue is None:
            return
        self._stop.set()
        self._thread.join()
        self._flush(block=False)
        self._queue.shutdown()

    def _drain(self) -> None:
        while not self._stop.is_set():
            self._flush(block=True)

    def _flush(self, block: bool) -> None:
        from ray.util.queue import Empty

        try:
            while True:
                self._progress(self._queue.get(block=block, timeout=0.5 if block else None))
        except Empty:
            pass


def send(sink, line: str) -> None:
    """From a worker: show `line` on the driver (printed locally when there is no sink)."""
    if sink is None:
        print(line, flush=True)
    else:
        sink.put(line)

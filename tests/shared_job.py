"""The tiny job over a corrupted cohort that the fault, bad-input and stale-run tests share
(tests/conftest.py runs it once per session): its settings and what it left behind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests import bad_inputs
from tests.test_end_to_end import TINY


def job_settings() -> list[str]:
    """The shared job's --set items: the end-to-end test's tiny settings, one fold of one epoch,
    and the bad-input corpus's voxel limit."""
    return [*TINY, f"inputs.max_voxels={bad_inputs.MAX_VOXELS}", "segmentation.folds=1",
            "segmentation.epochs=1", "segmentation.patience=1"]


def set_args(settings: list[str]) -> list[str]:
    return [a for item in settings for a in ("--set", item)]


@dataclass(frozen=True)
class SharedJob:
    """The whole job over the corrupted cohort, Ctrl-C'd (a fault point) once extraction has
    written its first series, then run again with the same command until it finished, losing a
    Segmenter actor on the way (another fault point)."""

    out: Path
    args: list[str]  # the job's command line after `jobs/run_pipeline.py`
    interrupted_code: int
    interrupted_output: str
    interrupt_fired: bool
    interrupted_manifest: dict
    code: int  # of the resumed run
    output: str  # what the resumed run printed
    checkpoint: str  # its segmenter, as the manifest recorded it
    segmenter_killed: bool  # a Segmenter actor of the resumed run died on its second series

"""Shared fixtures: one Ray instance per test session, the real SPIDER fixture mask, and one tiny
job over a corrupted cohort that the fault, bad-input and stale-run tests all examine."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import faults
from tests.shared_job import SharedJob, job_settings, set_args

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray Train's controller polls its workers every 2 s: a tiny run would wait that long to learn
# that a checkpoint was reported or that training ended (every Ray started here inherits this)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# Inside the repository (see its README): a test never reads outside the checkout.
SPIDER_MASK = Path(__file__).resolve().parent / "data" / "spider" / "masks" / "1_t1.mha"


@pytest.fixture(scope="session")
def spider_mask_path() -> Path:
    if not SPIDER_MASK.exists():
        pytest.fail(f"the real SPIDER fixture is missing: {SPIDER_MASK}")
    return SPIDER_MASK


@pytest.fixture(scope="session")
def fault_marker(tmp_path_factory) -> Path:
    """Where a fault test writes the point at which a process must signal itself
    (pipeline.faults). Named in the environment before Ray starts, so every Ray worker and
    every job a test starts inherits it; absent, it injects nothing."""
    marker = tmp_path_factory.mktemp("faults") / "marker"
    os.environ[faults.MARKER_ENV] = str(marker)
    return marker


@pytest.fixture(scope="session")
def ray_session(fault_marker):
    """One local Ray for the whole session (start-up costs about 4 s here)."""
    import ray

    if not ray.is_initialized():
        # no dashboard: no test asks it anything, and idle it costs a few % of a core
        ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


ROOT = Path(__file__).resolve().parents[1]
STALE_SERIES = "109_t1"  # a bad series (tests/bad_inputs.py) the shared job finds outputs of


@pytest.fixture(scope="session")
def bad_cohorts(tmp_path_factory) -> dict[str, Path]:
    """A clean six-patient cohort, a corrupted copy (tests/bad_inputs.py) and one whose gradings
    lack required columns."""
    from pipeline.data.synthetic import synthesize
    from tests import bad_inputs

    base = tmp_path_factory.mktemp("bad_cohorts")
    clean = base / "clean"
    synthesize(str(clean), patients=6, seed=0, sequences=("t1",))
    return {"clean": clean,
            "corrupt": bad_inputs.make_corpus(base / "corrupt", clean),
            "no_columns": bad_inputs.gradings_missing_columns(base / "no_columns", clean),
            "base": base}


@pytest.fixture(scope="session")
def shared_job(bad_cohorts, ray_session, fault_marker) -> SharedJob:
    """The first run is a separate process joined to the session's Ray (it is interrupted as a
    user would interrupt it); the resumed run is `run_pipeline.main` in this process, and one of
    its Segmenter actors dies holding its second series' prediction."""
    from jobs import run_pipeline
    from pipeline.segmentation import stream

    out = bad_cohorts["base"] / "job"
    # an earlier run's outputs for a series that is now refused (its disc file is not even
    # Parquet): the job must delete them, not serve them
    for stale in (stream.disc_table_path(str(out), STALE_SERIES),
                  stream.prediction_path(str(out), STALE_SERIES)):
        Path(stale).parent.mkdir(parents=True, exist_ok=True)
        Path(stale).write_text("an earlier run's output")
    args = ["--data", str(bad_cohorts["corrupt"]), "--out", str(out),
            *set_args(job_settings())]
    command = [sys.executable, "jobs/run_pipeline.py", *args,
               "--address", ray_session.get_runtime_context().gcs_address]
    fault_marker.write_text("extraction record 1")
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    try:
        interrupted, _ = job.communicate(timeout=1200)  # a hang guard only
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)  # a job still running at the timeout
        job.wait()
    fired = not fault_marker.exists()
    fault_marker.unlink(missing_ok=True)
    manifest = json.loads((out / "manifest.json").read_text())

    printed = io.StringIO()
    fault_marker.write_text("segmenter call 2")
    try:
        with contextlib.redirect_stdout(printed):
            code = run_pipeline.main(args)
        segmenter_killed = not fault_marker.exists()
    finally:
        fault_marker.unlink(missing_ok=True)
    checkpoint = json.loads((out / "manifest.json").read_text())["stages"]["segtrain"][
        "results"]["folds"][0]["checkpoint"]
    return SharedJob(out, args, job.returncode, interrupted, fired, manifest, code,
                     printed.getvalue(), checkpoint, segmenter_killed)


@pytest.fixture(scope="session")
def clean_extraction(bad_cohorts, shared_job) -> Path:
    """The clean cohort alone through catalog and extraction with the shared job's segmenter,
    uninterrupted: every good series of the job must come out exactly so."""
    from pipeline import config
    from pipeline.data import cohort
    from pipeline.segmentation import stream

    out = bad_cohorts["base"] / "clean_out"
    found = cohort.catalog(str(bad_cohorts["clean"]), sequence="t1", val_fraction=0.2, seed=0,
                           folds=1)
    assert not found.problems
    result = stream.run_extraction(found.series, config.load("demo", job_settings()),
                                    shared_job.checkpoint, str(out), progress=None)
    assert not result.errors
    return out

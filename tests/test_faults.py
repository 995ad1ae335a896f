"""Failures from outside: a write killed half-way, a job interrupted half-way, a training worker
and a Segmenter actor killed mid-run. Each must leave outputs whole and a re-run (or Ray's own
retry) must finish with the same rows, none lost or duplicated.

The job, the training worker and the Segmenter signal themselves at a point the test names in the
session's fault marker (pipeline.faults), so whether and where a fault happens never depends on
how busy the machine is.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import config, faults
from pipeline.data import cohort, storage, tables
from pipeline.data.synthetic import synthesize
from pipeline.segmentation import models as segmodels
from pipeline.segmentation import stream
from pipeline.segmentation.train import train_segmenter
from tests.test_end_to_end import TINY

ROOT = Path(__file__).resolve().parents[1]
FAST = [item for item in TINY if not item.startswith("synthetic.")] + [
    "segmentation.epochs=1", "segmentation.folds=1"]
COLUMNS = tables.DISC_KEYS + tables.GEOMETRY + tables.BULGE + ["match_dice", "disc_status"]


@pytest.fixture(autouse=True)
def _no_fault_left_behind(fault_marker):
    """A fault a test planted but never reached must not fire in a later test."""
    yield
    fault_marker.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """Five synthetic patients (four train, one val by overview.csv's subset) and their series."""
    root = tmp_path_factory.mktemp("faults") / "data"
    synthesize(str(root), patients=5, seed=0, sequences=("t1",))
    series = cohort.catalog(str(root), sequence="t1", val_fraction=0.2, seed=0).series
    assert set(series["split"]) == {"train", "val"}
    return root, series


def _discs(out: Path) -> pd.DataFrame:
    frame = pd.read_parquet(tables.path(str(out), tables.DISCS), columns=COLUMNS)
    order = ["series_id", "mask_source", "ivd_label", "volume_mm3"]
    return frame.sort_values(order, kind="stable").reset_index(drop=True)


WRITER = textwrap.dedent("""
    import sys
    import numpy as np, pandas as pd
    from pipeline.data import storage
    target = sys.argv[1]
    tables = [pd.DataFrame({"value": np.full(3_000_000, float(v))}) for v in (1, 2)]
    print("writing", flush=True)
    for n in range(10_000):
        storage.write_table(tables[n % 2], target)
""")


@pytest.mark.parametrize("delay_s", [0.05, 0.2, 0.45])
def test_a_killed_write_leaves_the_old_file_or_the_new_one(tmp_path, delay_s):
    folder = tmp_path / "discs.parquet"
    target = folder / "1_t1.parquet"
    storage.write_table(pd.DataFrame({"value": [0.0] * 10}), str(target))
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    time.sleep(delay_s)
    writer.kill()
    writer.wait()
    table = pd.read_parquet(folder)  # the folder as a later stage reads it: no partial file
    values = set(table["value"])
    assert len(values) == 1
    assert (values, len(table)) in [({0.0}, 10), ({1.0}, 3_000_000), ({2.0}, 3_000_000)]
    assert [p.name for p in folder.iterdir() if not p.name.startswith(".")] == ["1_t1.parquet"]


def test_a_failed_staged_write_leaves_the_old_table(tmp_path):
    location = str(tmp_path / "latents.parquet")
    with storage.staged_dir(location) as staged:
        storage.write_table(pd.DataFrame({"z0": [1.0]}), storage.join(staged, "part.parquet"))
    with pytest.raises(RuntimeError), storage.staged_dir(location) as staged:
        storage.write_table(pd.DataFrame({"z0": [2.0]}), storage.join(staged, "part.parquet"))
        raise RuntimeError("worker died mid-write")
    assert pd.read_parquet(location)["z0"].tolist() == [1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["latents.parquet"]


def test_a_fault_point_fires_once_and_only_after_its_condition_holds(fault_marker):
    """Where a killed training worker resumes must not depend on how fast the controller
    polls: the point waits until the last checkpoint is committed (its `ready`)."""
    fired, polls = [], []
    previous = signal.signal(signal.SIGUSR1, lambda *_: fired.append(len(polls)))
    try:
        faults.point("segtrain rank 0 epoch 2", signal.SIGUSR1, ready=lambda: True)
        assert not fired, "a point the marker does not name must not fire"
        fault_marker.write_text("segtrain rank 0 epoch 2")
        ready = lambda: polls.append(1) or len(polls) >= 3  # noqa: E731
        faults.point("segtrain rank 0 epoch 2", signal.SIGUSR1, ready=ready)
        assert fired == [3] and not fault_marker.exists()
        faults.point("segtrain rank 0 epoch 2", signal.SIGUSR1, ready=ready)  # a restart
        assert fired == [3]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_an_interrupted_job_resumes_to_the_same_tables(small_cohort, tmp_path, ray_session,
                                                       fault_marker):
    root, _ = small_cohort
    out = tmp_path / "out"
    # The job joins the session's Ray: a second Ray starting on a loaded machine timed out
    # ("The current node timed out during startup") before the job wrote anything.
    command = [sys.executable, "jobs/run_pipeline.py", "--data", str(root), "--out", str(out),
               "--stages", "catalog,segtrain,extract",
               "--address", ray_session.get_runtime_context().gcs_address]
    command += [a for item in FAST for a in ("--set", item)]
    # Ctrl-C once the first of five series is back: the others in flight or not yet read
    fault_marker.write_text("extraction record 1")
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    try:
        output, _ = job.communicate(timeout=1200)  # a hang guard only: catalog, 1 epoch, extract
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)  # a job still running at the timeout
        job.wait()
    assert not fault_marker.exists(), f"the job never reached the fault point:\n{output}"
    assert job.returncode == 130, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["segtrain"]["status"] == "done"
    assert manifest["stages"]["extract"]["status"] == "interrupted"

    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "segtrain   skipped" in rerun.stdout and "catalog    skipped" in rerun.stdout

    # The same checkpoint, uninterrupted: every row (reference and predicted) must agree.
    checkpoint = json.loads((out / "manifest.json").read_text())["stages"]["segtrain"][
        "results"]["folds"][0]["checkpoint"]
    series = pd.read_parquet(tables.path(str(out), tables.SERIES))
    fresh = tmp_path / "fresh"
    stream.run_extraction(series, config.load("demo", FAST), checkpoint, str(fresh),
                           progress=None)
    pd.testing.assert_frame_equal(_discs(out), _discs(fresh))
    catalogued = cohort.catalog(str(root), sequence="t1", val_fraction=0.2, seed=0).series
    pd.testing.assert_frame_equal(series, catalogued)


@pytest.fixture(scope="module")
def killed_training(small_cohort, tmp_path_factory, ray_session, fault_marker) -> dict:
    """Two epochs of segmenter training whose rank-0 worker SIGKILLs itself after training
    epoch 2, before reporting it; FailureConfig restarts the run from epoch 1's checkpoint."""
    _, series = small_cohort
    cfg = config.load("demo", [*FAST, "segmentation.epochs=2", "segmentation.patience=2"])
    storage_path = tmp_path_factory.mktemp("killed_training")
    fault_marker.write_text("segtrain rank 0 epoch 2")
    result = train_segmenter(series, cfg, storage_path=str(storage_path), name="segmenter",
                             progress=lambda line: None)
    metas = [json.loads(p.read_text())
             for p in storage_path.glob("segmenter/checkpoint_*/meta.json")]
    return {"result": result, "killed": not fault_marker.exists(), "cfg": cfg,
            "before": [m for m in metas if m["epoch"] == 1]}


def test_a_killed_training_worker_resumes_from_its_checkpoint(killed_training):
    result, cfg = killed_training["result"], killed_training["cfg"]
    assert killed_training["killed"], "no training worker was killed"
    # One checkpoint per epoch: epoch 1 was not trained again after the kill.
    assert len(killed_training["before"]) == 1
    assert result.epochs_run == cfg.segmentation.epochs
    assert [h["epoch"] for h in result.history] == list(range(1, cfg.segmentation.epochs + 1))
    # Epoch 1 was not trained again after the kill: its record is the checkpoint's, to the bit.
    assert result.history[0] == killed_training["before"][0]["history"][0]
    model, meta = segmodels.load_segmenter(result.checkpoint_path)
    assert meta["epoch"] in (1, 2) and model is not None


def test_a_killed_segmenter_actor_loses_and_duplicates_no_rows(small_cohort, killed_training,
                                                               tmp_path, fault_marker):
    """Ray Data restarts the actor and resubmits its series; per-series files make the retry
    overwrite rather than append."""
    _, series = small_cohort
    out = tmp_path / "killed"
    cfg = config.load("demo", FAST)
    checkpoint = killed_training["result"].checkpoint_path
    fault_marker.write_text("segmenter call 2")  # dies holding the second series' prediction
    result = stream.run_extraction(series, cfg, checkpoint, str(out), progress=None)
    assert not fault_marker.exists(), "no Segmenter actor was killed"
    assert not result.errors
    assert sorted(result.metrics["series_id"]) == sorted(series["series_id"])
    fresh = tmp_path / "fresh"
    stream.run_extraction(series, cfg, checkpoint, str(fresh), progress=None)
    killed_rows, fresh_rows = _discs(out), _discs(fresh)
    # Keys repeat legitimately only for predicted components that are split or unmatched
    # (ivd_label -1); a retried series must not add any other repeat.
    ok = killed_rows[killed_rows.disc_status == "ok"]
    assert not ok.duplicated(tables.DISC_KEYS).any()
    pd.testing.assert_frame_equal(killed_rows, fresh_rows)
    assert np.isfinite(killed_rows.loc[killed_rows.mask_source == "reference",
                                       "volume_mm3"]).all()

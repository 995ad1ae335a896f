"""Failures from outside: a write killed half-way, a job interrupted half-way, a Segmenter actor
killed mid-run in the resumed job (a killed training worker: tests/test_stale.py and the S3 job of
tests/test_end_to_end.py). Each must leave outputs whole and
a re-run (or Ray's own retry) must finish with the same rows, none lost or duplicated.

The job, the training worker and the Segmenter signal themselves at a point the test names in the
session's fault marker (pipeline.faults), so whether and where a fault happens never depends on
how busy the machine is.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest

from pipeline import faults
from pipeline.data import cohort, storage, tables
from tests.local_servers import local_s3

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = tables.DISC_KEYS + tables.GEOMETRY + tables.BULGE + ["match_dice", "disc_status"]


@pytest.fixture(autouse=True)
def _no_fault_left_behind(fault_marker):
    """A fault a test planted but never reached must not fire in a later test."""
    yield
    fault_marker.unlink(missing_ok=True)


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


def test_a_staged_table_replaces_the_old_one_in_a_bucket():
    """On S3 a folder cannot be renamed: the staged files move one by one, over an old folder
    table or an old single-file table, and a failed write leaves the old table."""
    with local_s3("bucket"):
        location = "s3://bucket/run/tables/predictions.parquet"
        storage.write_table(pd.DataFrame({"z0": [0.0]}), location)  # an earlier version's file
        for value in (1.0, 2.0):
            with storage.staged_dir(location) as staged:
                for part in ("a", "b"):
                    storage.write_table(pd.DataFrame({"z0": [value]}),
                                        storage.join(staged, f"{part}.parquet"))
        with pytest.raises(RuntimeError), storage.staged_dir(location) as staged:
            storage.write_table(pd.DataFrame({"z0": [3.0]}), storage.join(staged, "a.parquet"))
            raise RuntimeError("worker died mid-write")
        assert storage.read_table(location)["z0"].tolist() == [2.0, 2.0]
        assert storage.table_files(location) == [storage.join(location, "a.parquet"),
                                                 storage.join(location, "b.parquet")]
        fs, tables_dir = storage.filesystem("s3://bucket/run/tables")
        assert [f.base_name for f in fs.get_file_info(pafs.FileSelector(tables_dir))] == [
            "predictions.parquet"]


def test_a_fault_point_fires_once_and_only_after_its_condition_holds(fault_marker):
    """Where a killed training worker resumes must not depend on how fast the controller
    polls: the point waits until the last checkpoint is committed (its `ready`)."""
    fired, polls = [], []
    previous = signal.signal(signal.SIGUSR1, lambda *_: fired.append(len(polls)))
    try:
        faults.point("segtrain fold 0 rank 0 epoch 2", signal.SIGUSR1, ready=lambda: True)
        assert not fired, "a point the marker does not name must not fire"
        fault_marker.write_text("segtrain fold 0 rank 0 epoch 2")
        ready = lambda: polls.append(1) or len(polls) >= 3  # noqa: E731
        faults.point("segtrain fold 0 rank 0 epoch 2", signal.SIGUSR1, ready=ready)
        assert fired == [3] and not fault_marker.exists()
        faults.point("segtrain fold 0 rank 0 epoch 2", signal.SIGUSR1, ready=ready)  # a restart
        assert fired == [3]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_an_interrupted_job_resumes_to_the_same_tables(shared_job, bad_cohorts,
                                                       clean_extraction):
    """Ctrl-C once the first series is back (the others in flight or not yet read), then the same
    command: finished stages are skipped and every row, reference and predicted, is what an
    uninterrupted extraction of the good series with the same segmenter gives."""
    output = shared_job.interrupted_output
    assert shared_job.interrupt_fired, f"the job never reached the fault point:\n{output}"
    assert shared_job.interrupted_code == 130, output
    stages = shared_job.interrupted_manifest["stages"]
    assert stages["segtrain"]["status"] == "done"
    assert stages["extract"]["status"] == "interrupted"

    assert shared_job.code == 3, shared_job.output[-3000:]  # finished, bad inputs quarantined
    assert "segtrain   skipped" in shared_job.output
    assert "catalog    skipped" in shared_job.output
    pd.testing.assert_frame_equal(_discs(shared_job.out), _discs(clean_extraction))
    series = pd.read_parquet(tables.path(str(shared_job.out), tables.SERIES))
    catalogued = cohort.catalog(str(bad_cohorts["corrupt"]), sequence="t1", val_fraction=0.2,
                                seed=0).series
    pd.testing.assert_frame_equal(series, catalogued)


def test_a_killed_segmenter_actor_loses_and_duplicates_no_rows(shared_job, bad_cohorts,
                                                               clean_extraction):
    """The shared job's resumed run lost a Segmenter actor holding its second series'
    prediction: Ray Data restarts the actor and resubmits the series; per-series files make the
    retry overwrite rather than append."""
    assert shared_job.segmenter_killed, "no Segmenter actor was killed"
    assert shared_job.code == 3, shared_job.output[-3000:]  # finished, bad inputs quarantined
    metrics = pd.read_parquet(tables.path(str(shared_job.out), tables.SEGMENTATION_METRICS))
    good = cohort.catalog(str(bad_cohorts["clean"]), sequence="t1", val_fraction=0.2,
                          seed=0).series
    assert set(good["series_id"]) <= set(metrics["series_id"])
    assert not metrics["series_id"].duplicated().any()  # the retried series scored once
    killed_rows = _discs(shared_job.out)
    # Keys repeat legitimately only for predicted components that are split or unmatched
    # (ivd_label -1); a retried series must not add any other repeat.
    ok = killed_rows[killed_rows.disc_status == "ok"]
    assert not ok.duplicated(tables.DISC_KEYS).any()
    pd.testing.assert_frame_equal(killed_rows, _discs(clean_extraction))
    assert np.isfinite(killed_rows.loc[killed_rows.mask_source == "reference",
                                       "volume_mm3"]).all()

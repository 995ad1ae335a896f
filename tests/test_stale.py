"""No stale model: after a config change the segmentation stage trains a new run from scratch
instead of resuming (or returning) the previous run of the same output folder; and when that new
run's rank-0 worker is killed after training epoch 2, Ray Train restarts it from its own epoch-1
checkpoint, never the old run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs import run_pipeline
from pipeline.data import checkpoints
from pipeline.segmentation import models as segmodels
from tests.shared_job import job_settings, set_args

CHANGED = ["segmentation.lr=1e-4", "segmentation.epochs=2", "segmentation.patience=2"]


@pytest.fixture(scope="module")
def retrained(shared_job, bad_cohorts, tmp_path_factory, ray_session, fault_marker) -> dict:
    """The shared job's output copied, then catalog and segmentation training again with a new
    lr and two epochs, the rank-0 worker killed once after training epoch 2 (pipeline.faults)."""
    out = tmp_path_factory.mktemp("stale") / "out"
    shutil.copytree(shared_job.out, out)
    fault_marker.write_text("segtrain fold 0 rank 0 epoch 2")
    try:
        run_pipeline.main(["--data", str(bad_cohorts["corrupt"]), "--out", str(out),
                           "--stages", "catalog,segtrain",
                           *set_args([*job_settings(), *CHANGED])])
        killed = not fault_marker.exists()
    finally:
        fault_marker.unlink(missing_ok=True)
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["stages"]["segtrain"]["results"]["folds"][0]
    run = Path(record["checkpoint"]).parent
    metas = sorted((json.loads(p.read_text()) for p in run.glob("checkpoint_*/meta.json")),
                   key=lambda meta: meta["epoch"])
    return {"old": shared_job.checkpoint, "record": record, "metas": metas, "killed": killed,
            "statuses": {name: s["status"] for name, s in manifest["stages"].items()}}


def test_a_changed_lr_trains_a_new_run_from_scratch(retrained):
    assert retrained["statuses"]["segtrain"] == "done", retrained["statuses"]
    old, new = retrained["old"], retrained["record"]["checkpoint"]
    assert Path(old).parent.name != Path(new).parent.name, "the new config resumed the old run"
    meta = checkpoints.read_meta(new, "segmenter")
    assert segmodels.config_from_meta(meta).lr == 1e-4  # not the old run's checkpoint
    # trained from scratch: the old run's epoch would show up first in the history
    last = retrained["metas"][-1]
    assert [h["epoch"] for h in last["history"]] == [1, 2]
    old_meta = checkpoints.read_meta(old, "segmenter")
    assert last["history"][0]["train_loss"] != old_meta["history"][0]["train_loss"]


def test_a_killed_training_worker_resumes_from_its_own_checkpoint(retrained):
    assert retrained["killed"], "no training worker was killed"
    assert retrained["record"]["epochs"] == 2
    metas = retrained["metas"]
    # one checkpoint per epoch: epoch 1 was not trained again after the kill ...
    assert [m["epoch"] for m in metas] == [1, 2]
    # ... and the restart's record of it is the checkpoint's, to the bit
    assert metas[-1]["history"][0] == metas[0]["history"][0]
    model, _ = segmodels.load_segmenter(retrained["record"]["checkpoint"])
    assert model is not None

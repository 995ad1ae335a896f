"""No stale model: after a config change the segmentation stage trains a new run from scratch
instead of resuming (or returning) the previous run of the same storage path."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import config
from pipeline.data import checkpoints, storage
from pipeline.data.synthetic import synthesize
from pipeline.run import stages
from pipeline.run.runner import EXIT_OK, Context, run_stages
from pipeline.segmentation import models as segmodels

TINY = ["segmentation.folds=1", "segmentation.epochs=1", "segmentation.patience=1",
        "segmentation.batch_size=1", "segmentation.crops_per_volume=2",
        "segmentation.unet_channels=4,8,16"]


def _segtrain(ctx: Context) -> dict:
    assert run_stages(stages.build(synthesize=False), ctx,
                      selected=["catalog", "segtrain"]) == EXIT_OK
    manifest = json.loads(storage.read_bytes(storage.join(ctx.out, "manifest.json")))
    return manifest["stages"]["segtrain"]["results"]["folds"][0]


def test_a_changed_lr_trains_a_new_run_from_scratch(ray_session, tmp_path):
    data = tmp_path / "data"
    synthesize(str(data), patients=4, seed=5, sequences=("t1",), validation_fraction=0.25)
    ctx = Context(cfg=config.load("demo", TINY), data=str(data), out=str(tmp_path / "out"),
                  progress=lambda line: None)
    first = _segtrain(ctx)
    ctx.cfg.segmentation.lr = 1e-4
    second = _segtrain(ctx)

    runs = {Path(r["checkpoint"]).parent.name for r in (first, second)}
    assert len(runs) == 2, "the new config must not resume the old run"
    meta = checkpoints.read_meta(second["checkpoint"], "segmenter")
    assert segmodels.config_from_meta(meta).lr == 1e-4  # not the old run's checkpoint
    # one epoch trained from scratch: an old run's epoch would show up in the history
    assert second["epochs"] == 1 and [h["epoch"] for h in meta["history"]] == [1]
    old = checkpoints.read_meta(first["checkpoint"], "segmenter")
    assert meta["history"][0]["train_loss"] != old["history"][0]["train_loss"]

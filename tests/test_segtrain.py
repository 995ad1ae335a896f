"""Ray Train learns the disc segmenter on a tiny synthetic cohort and keeps its best checkpoint."""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np
import pytest
import torch

from pipeline import config
from pipeline.data import checkpoints
from pipeline.data.cohort import catalog
from pipeline.data.synthetic import synthesize
from pipeline.segmentation import models as segmodels
from pipeline.segmentation import preprocess, stream
from pipeline.segmentation import train as segtrain


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("spider")
    synthesize(str(root), patients=5, seed=3, sequences=("t1",), validation_fraction=0.2)
    series = catalog(str(root), "t1").series
    assert set(series["split"]) == {"train", "val"}
    return series


def _quick_config() -> config.Config:
    cfg = config.demo()
    cfg.segmentation = dataclasses.replace(
        cfg.segmentation, target_spacing_mm=(3.3, 2.0, 2.0), roi_size=(32, 64, 64),
        epochs=6, patience=6, crops_per_volume=10, batch_size=2, lr=1e-2)
    return cfg


def _val_dice(checkpoint_path: str, series) -> float:
    """Mean Dice on the model grid of the validation series, through the inference path."""
    segmenter = stream.Segmenter(checkpoint_path, overlap=0.25, sw_batch_size=2)
    seg = segmodels.config_from_meta(segmenter.meta)
    scores = []
    for row in series[series["split"] == "val"].to_dict("records"):
        sample = segmenter.segment(stream.load_series(row, seg))
        grid = preprocess.Grid.from_record(sample)
        target = preprocess.preprocess_mask(sample["reference"], grid)
        scores.append(segtrain.dice_iou(sample["probability"] >= 0.5, target)[0])
    return float(np.mean(scores))


def test_training_improves_validation_dice_and_keeps_the_best_checkpoint(
        ray_session, cohort, tmp_path):
    cfg = _quick_config()
    torch.manual_seed(cfg.seed)  # the workers start from these same weights (seed + rank 0)
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    checkpoints.write(str(untrained), segmodels.build_segmenter(cfg.segmentation),
                               {"segmentation": dataclasses.asdict(cfg.segmentation)})

    lines = []
    result = segtrain.train_segmenter(cohort, cfg, str(tmp_path / "runs"),
                                      f"seg-{uuid.uuid4().hex[:8]}", progress=lines.append)

    assert 1 <= result.epochs_run <= cfg.segmentation.epochs
    assert [h["epoch"] for h in result.history] == list(range(1, result.epochs_run + 1))
    best = max(result.history, key=lambda h: h["val_iou"])
    assert result.best_val_iou == pytest.approx(best["val_iou"])
    assert result.best_val_dice == pytest.approx(best["val_dice"])
    meta = checkpoints.read_meta(result.checkpoint_path, "segmenter")
    assert meta["epoch"] == best["epoch"]
    assert segmodels.config_from_meta(meta) == cfg.segmentation
    assert any("train series" in line for line in lines)

    trained_dice = _val_dice(result.checkpoint_path, cohort)
    untrained_dice = _val_dice(str(untrained), cohort)
    assert trained_dice > untrained_dice + 0.1, (trained_dice, untrained_dice)
    # the metric Ray Train reported is the one the inference path reproduces
    assert trained_dice == pytest.approx(result.best_val_dice, abs=0.02)


def test_bad_settings_fail_before_any_training(cohort, tmp_path):
    cfg = _quick_config()
    cfg.segmentation = dataclasses.replace(cfg.segmentation, roi_size=(30, 64, 64))
    with pytest.raises(ValueError, match="roi_size"):
        segtrain.train_segmenter(cohort, cfg, str(tmp_path), "never")
    with pytest.raises(ValueError, match="split"):
        segtrain.train_segmenter(cohort.drop(columns="split"), _quick_config(), str(tmp_path),
                                 "never")


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_each_worker_scores_its_own_part_of_the_validation_set(ray_session, workers):
    """Every validation volume is scored by exactly one worker, even with more workers than
    volumes (Ray Train's equal split would drop the odd ones)."""
    import ray.data

    val = ray.data.from_items([{"series_id": str(i)} for i in range(3)],
                              override_num_blocks=3).materialize()
    parts = segtrain.val_parts(val, workers)
    assert list(parts) == [f"val{rank}" for rank in range(workers)]
    scored = [row["series_id"] for part in parts.values() for row in part.iter_rows()]
    assert sorted(scored) == ["0", "1", "2"]

"""Cross-fitting of the segmenter: patient-grouped, seeded folds; each fold's segmenter trains
and selects only outside its fold; extraction segments a series with its own fold's model; a
finished fold is reused, not trained again. (The out-of-sample property of a whole run, from its
own records, is checked on the end-to-end job in tests/test_end_to_end.py.)"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import config
from pipeline.data import checkpoints
from pipeline.data.cohort import catalog
from pipeline.segmentation import folds as crossfit
from pipeline.segmentation import models as segmodels
from pipeline.segmentation import stream
from pipeline.segmentation import train as segtrain
from tests.test_cohort import spider_root


def _folds(series: pd.DataFrame) -> dict[str, int]:
    by_patient = series.groupby("patient_id")["fold"].agg(set)
    assert (by_patient.map(len) == 1).all(), f"a patient's series sit in two folds: {by_patient}"
    return by_patient.map(lambda s: next(iter(s))).to_dict()


def _series(n_patients: int, n_val: int, folds: int, seed: int = 0) -> pd.DataFrame:
    splits = {str(p): "val" if p <= n_val else "train" for p in range(1, n_patients + 1)}
    from pipeline.data.cohort import assign_folds

    fold_of = assign_folds(splits, folds, seed)
    return pd.DataFrame([{"series_id": f"{p}_{seq}", "patient_id": p, "split": s,
                          "fold": fold_of[p]} for p, s in splits.items() for seq in ("t1", "t2")])


def test_folds_are_patient_grouped_seeded_and_stratified_by_split(tmp_path):
    series_ids = [f"{p}_{seq}" for p in range(1, 21) for seq in ("t1", "t2")]
    root = spider_root(tmp_path, images=series_ids, masks=series_ids, overview=None, gradings=None)
    found = catalog(str(root), sequence=None, seed=3, folds=5).series
    first = _folds(found)
    assert sorted(np.bincount(list(first.values()))) == [4] * 5
    val = found.drop_duplicates("patient_id").query("split == 'val'")
    assert val.fold.nunique() == len(val)  # the 4 val patients are dealt to 4 folds
    assert _folds(catalog(str(root), sequence=None, seed=3, folds=5).series) == first
    assert _folds(catalog(str(root), sequence="t2", seed=3, folds=5).series) == first
    assert _folds(catalog(str(root), sequence=None, seed=4, folds=5).series) != first
    # the split does not move with the number of folds
    assert (catalog(str(root), sequence=None, seed=3, folds=2).series.split == found.split).all()
    assert set(catalog(str(root), sequence=None, seed=3).series.fold) == {0}
    with pytest.raises(ValueError, match="folds"):
        catalog(str(root), folds=0)


@pytest.mark.parametrize("n_patients, n_val, folds", [(20, 4, 5), (6, 1, 2), (7, 0, 3)])
def test_each_fold_trains_and_selects_outside_the_patients_it_segments(n_patients, n_val,
                                                                       folds):
    series = _series(n_patients, n_val, folds)
    plans = crossfit.plan(series, folds, val_fraction=0.2, seed=0)
    assert [p.fold for p in plans] == list(range(folds))
    every = set(series.patient_id)
    assert set().union(*(p.segments for p in plans)) == every
    for p in plans:
        assert set(p.segments) == set(series.patient_id[series.fold == p.fold])
        assert p.training and p.selection and not p.in_sample
        assert not set(p.selection) & set(p.segments)
        assert not set(p.training) & set(p.segments)
        assert not set(p.training) & set(p.selection)
        assert set(p.training) | set(p.selection) | set(p.segments) == every
        roles = crossfit.fold_series(series, p)
        assert set(roles.patient_id[roles.split == "train"]) == set(p.training)
        assert set(roles.patient_id[roles.split == "val"]) == set(p.selection)
        # selection comes from the catalog's val patients where the fold's complement has some
        val = set(series.patient_id[series.split == "val"]) - set(p.segments)
        assert not val or set(p.selection) == val
    assert crossfit.plan(series, folds, val_fraction=0.2, seed=0) == plans


def test_one_fold_is_an_explicit_in_sample_opt_out_and_too_many_folds_fail():
    series = _series(5, 1, 1)
    (only,) = crossfit.plan(series, 1)
    assert only.in_sample and set(only.segments) == set(series.patient_id)
    assert only.selection == ("1",) and set(only.training) == {"2", "3", "4", "5"}
    record = {"fold": 0, "training_patients": list(only.training),
              "selection_patients": list(only.selection), "segmented_patients": list(only.segments)}
    assert crossfit.record_in_sample(record)
    assert not crossfit.out_of_sample(series, [record]).any()
    with pytest.raises(ValueError, match="no patient left to train"):
        crossfit.plan(_series(2, 0, 2), 2)
    with pytest.raises(ValueError, match="beyond segmentation.folds"):
        crossfit.plan(_series(6, 1, 3), 2)
    with pytest.raises(ValueError, match="folds must be at least 1"):
        config.load("demo", ["segmentation.folds=0"])
    assert config.load("demo").segmentation.folds == 2
    assert config.load("paper").segmentation.folds == 5


def _tiny_checkpoint(folder, fold: int, seed: int) -> str:
    seg = dataclasses.replace(config.demo().segmentation, unet_channels=(4, 8, 16))
    torch.manual_seed(seed)
    return checkpoints.write(str(folder), segmodels.build_segmenter(seg),
                             {"segmentation": dataclasses.asdict(seg), "fold": fold,
                              "training_patients": [], "selection_patients": []})


def test_the_segmenter_uses_the_model_of_the_series_fold(tmp_path):
    paths = {k: _tiny_checkpoint(tmp_path / f"fold{k}", k, seed=k) for k in (0, 1)}
    segmenter = stream.Segmenter(paths, overlap=0.25, sw_batch_size=1)
    image = np.random.default_rng(0).normal(size=(32, 64, 64)).astype(np.float32)
    sample = {"series_id": "7_t1", "patient_id": "7", "split": "train", "error": "",
              "image": image}
    out = {k: segmenter.segment({**sample, "fold": k}) for k in (0, 1)}
    assert [out[k]["fold"] for k in (0, 1)] == [0, 1]
    for k in (0, 1):
        alone = stream.Segmenter(paths[k], overlap=0.25, sw_batch_size=1)
        np.testing.assert_array_equal(out[k]["probability"], alone.probability(image))
    assert not np.array_equal(out[0]["probability"], out[1]["probability"])
    with pytest.raises(ValueError, match="no segmenter for fold 2"):
        segmenter.segment({**sample, "fold": 2})


def test_a_finished_fold_is_reused_not_trained_again(tmp_path):
    """A fold whose run finished (its result recorded beside the run) is not fitted again:
    no Ray is started here, so any training would fail."""
    series = _series(6, 1, 2)
    cfg = config.load("demo", ["segmentation.unet_channels=4,8,16"])
    storage_path = tmp_path / "train"
    for plan in crossfit.plan(series, 2):
        run = f"segtrain-abc-fold{plan.fold}"
        path = _tiny_checkpoint(storage_path / run / "checkpoint_0", plan.fold, seed=0)
        result = segtrain.SegmenterResult(
            checkpoint_path=path, best_val_dice=0.5, best_val_iou=0.4, epochs_run=3,
            history=[], wall_s=1.0, fold=plan.fold, training_patients=list(plan.training),
            selection_patients=list(plan.selection))
        (storage_path / f"{run}.json").write_text(json.dumps(dataclasses.asdict(result)))
    lines = []
    results = segtrain.train_folds(series, cfg, str(storage_path), "segtrain-abc", lines.append)
    assert [r.fold for r in results] == [0, 1]
    assert all("not trained again" in line for line in lines if "fold" in line)
    assert sum("not trained again" in line for line in lines) == 2


def test_the_extraction_summary_scores_only_out_of_sample_series():
    metrics = pd.DataFrame({"series_id": [f"{p}_t1" for p in "1234"],
                            "patient_id": list("1234"), "split": ["train", "val"] * 2,
                            "fold": [0, 0, 1, 1], "dice": [0.9, 0.8, 0.7, 0.99],
                            "iou": [0.8, 0.7, 0.6, 0.98], "error": ""})
    records = [{"fold": 0, "training_patients": ["3"], "selection_patients": ["4"]},
               {"fold": 1, "training_patients": ["1", "4"], "selection_patients": ["2"]}]
    summary = stream.score_summary(metrics, records)
    assert summary["split"] == "out-of-sample" and summary["n_series"] == 3  # not 4_t1
    assert summary["dice"] == pytest.approx(0.8)
    assert stream.score_summary(metrics)["split"] == "val"

"""The Ray Data stream segments whole volumes and writes one row per disc (bad inputs: the
shared job, tests/test_reliability.py).

The cohort is synthetic with its images redrawn so discs are bright: a tiny UNet fitted for a
hundred-odd steps then finds every disc, which makes the expected disc rows
predictable while every series still goes through the real Segmenter, sliding-window inference
and the native-grid inverse.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import set_track_meta
from monai.losses import DiceCELoss

from pipeline import config
from pipeline.data import checkpoints, storage, tables, volumes
from pipeline.data.cohort import catalog
from pipeline.data.synthetic import synthesize
from pipeline.segmentation import models as segmodels
from pipeline.segmentation import preprocess, stream

FIT_STEPS = 120  # enough for a tiny UNet to find every bright disc, with no false positives


def _config() -> config.Config:
    cfg = config.demo()
    cfg.segmentation = dataclasses.replace(
        cfg.segmentation, model="unet", unet_channels=(4, 8, 16, 32),
        target_spacing_mm=(3.3, 2.0, 2.0), roi_size=(32, 64, 64))
    return cfg


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("spider")
    synthesize(str(root), patients=3, seed=11, sequences=("t1",))
    series = catalog(str(root), "t1").series
    rng = np.random.default_rng(0)
    for row in series.itertuples():
        mask = volumes.read_volume(row.mask_uri)
        bright = 100.0 + 800.0 * preprocess.disc_target(mask.array)
        image = (bright + rng.normal(0.0, 30.0, bright.shape)).astype(np.float32)
        volumes.write_volume(row.image_uri, image, mask.header)
    return series


@pytest.fixture(scope="module")
def checkpoint(cohort, tmp_path_factory) -> str:
    """A UNet fitted on the bright-disc volumes, saved as a segmenter checkpoint."""
    seg = _config().segmentation
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: small convolutions gain little from two, on a busy
    set_track_meta(False)     # machine they lose a lot
    model = segmodels.build_segmenter(seg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = DiceCELoss(sigmoid=True, batch=True, lambda_dice=0.5, lambda_ce=0.5)
    transform = preprocess.training_transform(seg.roi_size, crops=2, seed=0)
    volumes = []
    for row in cohort.to_dict("records"):
        image, mask = preprocess.read_pair(row["image_uri"], row["mask_uri"])
        grid = preprocess.plan_grid(image.array.shape, image.spacing, seg.target_spacing_mm,
                                    seg.roi_size)
        volumes.append({"image": preprocess.preprocess_image(image.array, grid)[None],
                        "label": preprocess.preprocess_mask(mask.array, grid)[None]})
    for step in range(FIT_STEPS):
        crops = transform(volumes[step % len(volumes)])
        optimizer.zero_grad()
        loss = loss_fn(model(torch.stack([c["image"] for c in crops])),
                       torch.stack([c["label"] for c in crops]).float())
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    set_track_meta(True)
    folder = tmp_path_factory.mktemp("segmenter")
    checkpoints.write(str(folder), model.eval(),
                               {"segmentation": dataclasses.asdict(seg)})
    return str(folder)


def _disc_labels(mask_uri: str) -> set[int]:
    return {int(v) for v in np.unique(volumes.read_volume(mask_uri).array) if v >= 201}


def test_stream_writes_reference_and_matching_predicted_discs(ray_session, cohort, checkpoint,
                                                              tmp_path):
    cfg = _config()
    out = str(tmp_path / "out")
    lines = []
    result = stream.run_extraction(cohort, cfg, checkpoint, out, progress=lines.append)

    assert result.errors == []
    assert lines and lines[-1].startswith("extraction:")
    metrics = storage.read_table(tables.path(out, tables.SEGMENTATION_METRICS))
    assert sorted(metrics["series_id"]) == sorted(cohort["series_id"])
    assert (metrics["dice"] > 0.8).all(), metrics[["series_id", "dice"]]
    val = metrics[metrics["split"] == "val"]
    assert result.summary["split"] == "val" and result.summary["n_series"] == len(val) >= 1
    assert result.summary["dice"] == pytest.approx(val["dice"].mean())

    discs = storage.read_table(result.discs_path)
    assert list(discs.columns) == (tables.DISC_KEYS + ["fold"] + tables.GEOMETRY + tables.BULGE
                                   + ["match_dice", "disc_status", "cube_fits", tables.CUBE])
    assert len(discs) == result.n_discs
    size = cfg.discs.cube_size
    assert tables.stack_cubes(discs[tables.CUBE]).shape == (len(discs), size, size, size)
    for row in cohort.itertuples():
        expected = _disc_labels(row.mask_uri)
        mine = discs[discs["series_id"] == row.series_id]
        reference = mine[mine["mask_source"] == "reference"]
        predicted = mine[mine["mask_source"] == "predicted"]
        assert sorted(reference["ivd_label"]) == sorted(expected)  # one row per reference disc
        assert set(predicted["ivd_label"]) == expected
        assert (predicted["disc_status"] == "ok").all()
        assert (predicted["match_dice"] > 0.6).all()
        assert reference["match_dice"].isna().all() and predicted["bulge_fraction"].isna().all()
        assert (reference["split"] == row.split).all()
        assert set(reference["level"]) == {
            "L5/S1", "L4/L5", "L3/L4", "L2/L3", "L1/L2", "T12/L1"}
        # predicted and reference measure the same discs: heights agree to a few mm
        paired = reference.merge(predicted, on="ivd_label", suffixes=("_ref", "_pred"))
        assert np.allclose(paired["height_mean_mm_ref"], paired["height_mean_mm_pred"], atol=3.0)
        # the prediction is written on the file's own grid, binary
        written = volumes.read_volume(stream.prediction_path(out, row.series_id))
        assert written.array.shape == volumes.read_volume(row.mask_uri).array.shape
        assert set(np.unique(written.array)) == {0, 1}


def test_the_loop_path_gives_what_the_stream_gives(ray_session, cohort, checkpoint, tmp_path):
    cfg = _config()
    row = cohort.iloc[0].to_dict()
    segmenter = stream.Segmenter(checkpoint, cfg.segmentation.inference_overlap, 2)
    looped = stream.process_series(row, segmenter, cfg, str(tmp_path / "loop"))
    streamed = stream.run_extraction(cohort.iloc[:1], cfg, checkpoint, str(tmp_path / "stream"),
                                      progress=None).metrics.iloc[0]
    assert looped["series_id"] == streamed["series_id"]
    assert looped["dice"] == pytest.approx(streamed["dice"], abs=1e-6)
    assert looped["n_predicted_discs"] == streamed["n_predicted_discs"]

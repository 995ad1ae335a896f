"""Smoke tests of the benchmarks at their smallest sizes: they still run, and what they count is
consistent. No timing is asserted (timings belong in bench/results, not in a test)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import set_track_meta

from bench import flops, scale, stream_vs_loop
from bench.convergence_criterion import PaperCriterion
from pipeline import config
from pipeline.data import checkpoints, storage, tables
from pipeline.data.cohort import catalog
from pipeline.data.synthetic import synthesize
from pipeline.segmentation import models as segmodels
from pipeline.shape.model import DiscAutoencoder
from pipeline.shape.train import count_training_discs, fit_epochs
from tests.disc_cubes import disc_cube, one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_cfg() -> config.Config:
    cfg = config.demo()
    cfg.discs = dataclasses.replace(cfg.discs, cube_size=16)
    cfg.autoencoder = dataclasses.replace(cfg.autoencoder, channels=(4, 8))
    cfg.segmentation = dataclasses.replace(cfg.segmentation, unet_channels=(4, 8, 16, 32))
    return cfg


def _cubes(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([disc_cube(16, rng) for _ in range(n)])


def test_flop_counts_are_consistent_and_the_ceiling_is_measured(tmp_path):
    ceiling = flops.ceilings(matmul_size=64, conv_size=8, repeats=1)
    assert ceiling["matmul_gflops"] > 0 and ceiling["conv3d_gflops"] > 0
    cfg = _tiny_cfg()
    cubes = _cubes(4)
    small, large = (flops.AutoencoderStep(cfg, cubes, 2, bf16=False),
                    flops.AutoencoderStep(cfg, cubes, 4, bf16=True))
    step_flops = small.counted_flops()["step"]
    assert large.counted_flops()["step"] == 2 * step_flops  # grows with the batch, exactly
    # counted as the paper's layers compute it: the sub-pixel form does more multiply-adds
    assert 0 < step_flops < flops.flops_of(small)
    phases = small.phases(repeats=1)
    assert (phases["forward"]["gflop"] + phases["backward"]["gflop"]) * flops.GIGA == \
        pytest.approx(step_flops)
    assert phases["optimizer"]["gflop"] == 0 and phases["backward"]["gflop"] > 0
    layers = small.layers(repeats=1)
    assert len(layers) == 2 + 2 + 2  # convs, transposed convs, the two linear layers
    assert sum(r["gflop"] for r in layers) == pytest.approx(phases["forward"]["gflop"])
    assert sum(r["share_of_layer_time"] for r in layers) == pytest.approx(1.0)

    volume = np.random.default_rng(0).normal(size=(32, 64, 96)).astype(np.float32)
    set_track_meta(False)
    try:
        rows = [flops.inference_row(cfg, [volume], str(tmp_path), threads=1, repeats=1,
                                    sw_batch=b) for b in (1, 4)]
    finally:
        set_track_meta(True)
    assert rows[0]["gflop_per_volume"] == pytest.approx(rows[1]["gflop_per_volume"])
    assert all(r["gflops"] > 0 and r["network_share_of_time"] > 0 for r in rows)


def test_the_published_criterion_stops_at_the_first_batch_above_target():
    cubes = torch.as_tensor(_cubes(6))
    torch.manual_seed(0)
    model = DiscAutoencoder(16, (4, 8), 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    paper = PaperCriterion(model, cubes, target=0.0, every=1,  # any overlap beats IoU 0
                           steps_per_epoch=2)
    fit = fit_epochs(model, cubes, optimizer, batch_size=4, max_epochs=3, iou_target=2.0,
                     on_epoch=paper.on_epoch, on_batch=paper.on_batch)
    assert paper.crossing["epoch"] == 1 and paper.crossing["batch"] == 1
    assert paper.batches == 3 * 2  # every step of every epoch reached the hook
    low, mean, high = (paper.crossing[k] for k in ("iou_ci_low", "mean_iou", "iou_ci_high"))
    assert 0 <= low <= mean <= high <= 1
    assert len(fit.history) == 3 and paper.epoch == 3  # the last batch was epoch 3's


def test_stream_stage_breakdown_covers_every_stage(ray_session, tmp_path):
    cfg = config.demo()
    synthesize(str(tmp_path / "spider"), patients=1, seed=5, sequences=("t1",))
    series = catalog(str(tmp_path / "spider"), "t1").series
    checkpoint = tmp_path / "segmenter"
    checkpoint.mkdir()
    torch.manual_seed(0)
    checkpoints.write(str(checkpoint), segmodels.build_segmenter(cfg.segmentation),
                               {"segmentation": dataclasses.asdict(cfg.segmentation)})
    context = ray_session.data.DataContext.get_current()
    per_stage = context.per_stage_map_timing
    try:
        wall_s, stages, began = stream_vs_loop.run_stream(series, cfg, str(checkpoint),
                                                          str(tmp_path / "out"))
    finally:
        context.per_stage_map_timing = per_stage
    assert set(stages) == {"read", "preprocess", "infer", "extract"}
    assert all(0 < seconds < wall_s for seconds in stages.values())
    assert 0 <= began["actors_began_s"] <= began["extract_began_s"] <= wall_s


def test_the_scale_tables_repeat_real_discs_under_new_patients_with_their_gradings(tmp_path):
    cfg = _tiny_cfg()
    per_series, gradings = scale.template(cfg, str(tmp_path / "template"), patients=2)
    assert len(per_series) == 2 and all(t.num_rows >= 4 for t in per_series)
    out = str(tmp_path / "out")
    n = scale.write_discs(per_series, gradings, 25, out)
    discs = storage.read_table(tables.path(out, tables.DISCS), columns=tables.DISC_KEYS)
    assert len(discs) == n and 25 <= n < 25 + max(t.num_rows for t in per_series)
    assert (discs.mask_source == "reference").all()
    assert discs.groupby("series_id").patient_id.nunique().eq(1).all()
    written = storage.read_table(tables.path(out, tables.GRADINGS))
    assert set(written.patient_id) == set(discs.patient_id)
    for patient, grades in written.groupby("patient_id"):  # a copy keeps its original's grades
        original = gradings[gradings.patient_id == patient.split("x", 1)[1]]
        pd.testing.assert_frame_equal(grades.drop(columns="patient_id").reset_index(drop=True),
                                      original.drop(columns="patient_id").reset_index(drop=True))
    usable = storage.read_table(tables.path(out, tables.DISCS), columns=["split", "cube_fits"])
    assert count_training_discs(tables.path(out, tables.DISCS), cfg) == (
        usable.split.isin(cfg.autoencoder.train_splits) & usable.cube_fits).sum()


def test_scale_flatness_compares_the_largest_size_with_the_second_smallest():
    records = [{"discs": d, "stage": "encode", "ms_per_disc": ms, "driver_peak_rss_mib": rss}
               for d, ms, rss in [(1000, 9.0, 500.0), (5000, 2.0, 505.0), (50000, 2.2, 520.0)]]
    assert scale.flatness(records, "discs") == {"encode": {
        "driver_peak_growth": 0.04, "time_per_disc_ratio": 1.1, "from": 5000, "to": 50000}}

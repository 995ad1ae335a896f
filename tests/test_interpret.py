"""Figures: written, valid PNGs, drawn from the right numbers."""

from __future__ import annotations

import io

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from pipeline import stats
from pipeline.analysis import classify, figures
from pipeline.data import storage, tables
from pipeline.data.volumes import make_header, write_volume
from tests.test_classify import fast_config, hand_made_cohort

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CUBE = 16


def ellipsoid_decoder(codes: np.ndarray) -> np.ndarray:
    """A hand-made decoder: z0 sets the left-right semi-axis, z1 the AP one, z2 the height."""
    grid = np.indices((CUBE,) * 3) - (CUBE - 1) / 2
    cubes = []
    for z in np.asarray(codes):
        semi = np.array([5 + 1.0 * z[0], 4 + 1.0 * z[1], 2 + 0.5 * z[2]]).clip(0.5)
        inside = ((grid / semi[:, None, None, None]) ** 2).sum(axis=0) <= 1
        cubes.append(inside.astype(float))
    return np.stack(cubes)


def assert_png(path: str) -> np.ndarray:
    data = storage.read_bytes(path)
    assert data[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.01  # not a blank canvas
    return image


def test_traversal_codes_sweep_one_latent_and_hold_the_others_at_their_mean():
    latents = np.array([[0.0, 10.0], [3.0, 20.0], [6.0, 60.0]])
    codes = figures.traversal_codes(latents)
    assert codes.shape == (2, 4, 2)
    np.testing.assert_allclose(codes[0, :, 0], [0, 2, 4, 6])
    np.testing.assert_allclose(codes[0, :, 1], 30.0)
    np.testing.assert_allclose(codes[1, :, 1], [10, 10 + 50 / 3, 10 + 100 / 3, 60])
    np.testing.assert_allclose(codes[1, :, 0], 3.0)
    with pytest.raises(ValueError, match="finite"):
        figures.traversal_codes(np.array([[np.nan, 1.0]]))


def test_latent_traversal_writes_a_png_and_rejects_a_bad_decoder(tmp_path):
    _, latents, _ = hand_made_cohort(n_patients=6, discs_per_patient=3, k=3)
    codes = latents[["z0", "z1", "z2"]].to_numpy()
    path = figures.latent_traversal(ellipsoid_decoder, codes, str(tmp_path), voxel_mm=2.5)
    assert path == str(tmp_path / "figures" / "latent_traversal.png")
    assert_png(path)
    with pytest.raises(ValueError, match="decoder returned shape"):
        figures.latent_traversal(lambda z: np.zeros((len(z), 4, 4)), codes, str(tmp_path), 2.5)


def test_decoder_from_a_real_autoencoder_checkpoint(tmp_path):
    import torch

    from pipeline.shape.model import DiscAutoencoder, load_model, save_checkpoint

    torch.manual_seed(0)
    model = DiscAutoencoder(cube_size=8, channels=(2,), bottleneck=2)
    checkpoint = save_checkpoint(str(tmp_path / "ckpt"), model, {"epoch": 0})
    decode = figures.decoder_from_model(load_model(checkpoint)[0], batch_size=3)
    probabilities = decode(np.random.default_rng(0).normal(size=(5, 2)))
    assert probabilities.shape == (5, 8, 8, 8)
    assert ((probabilities > 0) & (probabilities < 1)).all()


def test_level_and_correlation_figures(tmp_path):
    discs, latents, _ = hand_made_cohort(n_patients=8, discs_per_patient=5)
    assert_png(figures.latents_by_level(latents, str(tmp_path)))
    assert_png(figures.latent_geometry_correlation(latents, discs, str(tmp_path)))
    with pytest.raises(ValueError, match="no reference-mask rows"):
        figures.latents_by_level(latents[latents.mask_source == "predicted"], str(tmp_path))


def test_roc_curve_ends_at_one_and_matches_sklearn():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    score = np.round(rng.random(40) + 0.4 * y, 1)
    fpr, tpr = stats.roc_curve(y, score, np.ones((1, 40)))
    expected_fpr, expected_tpr, _ = roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr[0], expected_fpr)
    np.testing.assert_allclose(tpr[0], expected_tpr)


def hand_made_predictions(n_patients: int = 12, discs: int = 5) -> pd.DataFrame:
    """Out-of-fold predictions with classify.PREDICTION_COLUMNS; the score's signal grows with
    the feature set's position."""
    rng = np.random.default_rng(0)
    frames = []
    n = n_patients * discs
    patients = np.repeat(np.arange(1, n_patients + 1).astype(str), discs)
    for target in ("disc_bulging", "disc_narrowing"):
        y = rng.integers(0, 2, n)
        for source in ("reference", "predicted"):
            for strength, feature_set in enumerate(classify.FEATURE_SETS):
                frames.append(pd.DataFrame({
                    "patient_id": patients, "series_id": [f"{p}_t1" for p in patients],
                    "ivd_label": np.tile(np.arange(201, 201 + discs), n_patients),
                    "level": "L5/S1", "mask_source": source, "target": target,
                    "feature_set": feature_set, "model": "lightgbm", "y_true": y,
                    "probability": 1 / (1 + np.exp(-(strength * (y - 0.5) + rng.normal(size=n)))),
                    "predicted": y}))
    return pd.concat(frames, ignore_index=True)[classify.PREDICTION_COLUMNS]


def test_roc_figures_one_per_target(tmp_path):
    paths = figures.roc_curves(hand_made_predictions(), str(tmp_path), n_boot=50)
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == ["roc_disc_bulging.png",
                                                          "roc_disc_narrowing.png"]
    for path in paths:
        assert_png(path)


def _write_series(root, series_id: str, shift: int) -> dict:
    """A tiny image, a reference mask with two discs and a prediction shifted by `shift`."""
    shape, spacing = (6, 40, 48), (3.0, 1.0, 1.0)
    header = make_header(shape, spacing, "LPS")
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, shape).astype(np.int16)
    mask = np.zeros(shape, dtype=np.int16)
    mask[1:5, 10:30, 10:16] = 201
    mask[1:5, 10:30, 28:34] = 202
    image[mask > 0] += 200
    predicted = np.roll(mask > 0, shift, axis=2).astype(np.uint8)
    paths = {k: str(root / k / f"{series_id}.mha") for k in ("images", "masks", "predictions")}
    write_volume(paths["images"], image, header)
    write_volume(paths["masks"], mask, header)
    write_volume(paths["predictions"], predicted, header)
    return {"series_id": series_id, "patient_id": series_id.split("_")[0],
            "image_uri": paths["images"], "mask_uri": paths["masks"], "split": "val"}


def test_segmentation_examples_from_volumes_on_disk(tmp_path):
    series = pd.DataFrame([_write_series(tmp_path, "1_t1", 1), _write_series(tmp_path, "2_t1", 2),
                           {"series_id": "3_t1", "patient_id": "3", "image_uri": "missing",
                            "mask_uri": "missing", "split": "train"}])
    metrics = pd.DataFrame({"series_id": ["1_t1", "2_t1"], "dice": [0.9, 0.8]})
    path = figures.segmentation_examples(series, str(tmp_path), metrics=metrics)
    assert_png(path)
    assert figures.segmentation_examples(series.iloc[2:], str(tmp_path)) is None


def test_make_figures_draws_what_the_tables_allow(tmp_path):
    out = str(tmp_path)
    discs, latents, _ = hand_made_cohort(n_patients=10, discs_per_patient=4)
    storage.write_table(latents, tables.path(out, tables.LATENTS))
    storage.write_table(discs, tables.path(out, tables.DISCS))
    storage.write_table(hand_made_predictions(), tables.path(out, classify.PREDICTIONS))
    cfg = fast_config(bootstrap=50)
    paths = figures.make_figures(out, cfg, decode=ellipsoid_decoder)
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["latent_geometry_correlation.png", "latent_traversal.png",
                     "latents_by_level.png", "roc_disc_bulging.png", "roc_disc_narrowing.png"]
    for path in paths:
        assert_png(path)

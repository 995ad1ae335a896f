"""Preprocessing keeps masks binary and maps predictions back onto the native grid exactly."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import validate, volumes
from pipeline.segmentation import preprocess


def _label_map(shape=(20, 60, 80)) -> np.ndarray:
    """Two slab 'discs' (201, 202; 8.4 mm at 0.7 mm) between 'vertebrae' (1, 2) and a canal."""
    label_map = np.zeros(shape, dtype=np.int16)
    label_map[4:16, 20:50, 4:20] = 1
    label_map[5:15, 22:48, 20:32] = 201
    label_map[4:16, 20:50, 32:55] = 2
    label_map[5:15, 22:48, 55:67] = 202
    label_map[8:12, 5:15, 2:78] = 100
    return label_map


def test_disc_target_is_every_disc_label_and_nothing_else():
    target = preprocess.disc_target(_label_map())
    assert target.dtype == np.uint8
    assert set(np.unique(target)) == {0, 1}
    assert target.sum() == np.isin(_label_map(), (201, 202)).sum()


def test_mask_stays_binary_and_keeps_its_physical_volume():
    label_map = _label_map()
    spacing = (3.3, 0.7, 0.7)
    grid = preprocess.plan_grid(label_map.shape, spacing, (3.3, 1.0, 1.0), min_shape=(32, 32, 32))
    mask = preprocess.preprocess_mask(label_map, grid)
    assert mask.shape == grid.padded_shape
    assert all(s % 32 == 0 for s in mask.shape)
    assert set(np.unique(mask)) == {0, 1}
    native_mm3 = preprocess.disc_target(label_map).sum() * np.prod(spacing)
    resampled_mm3 = mask.sum() * np.prod(grid.spacing)
    # nearest-neighbour keeps the volume (linear interpolation + threshold would not)
    assert resampled_mm3 == pytest.approx(native_mm3, rel=0.1)


def test_round_trip_is_exact_when_target_spacing_is_native():
    label_map = _label_map()
    spacing = (3.3, 0.7, 0.7)
    grid = preprocess.plan_grid(label_map.shape, spacing, spacing, min_shape=(32, 64, 64))
    assert grid.resampled_shape == label_map.shape
    back = preprocess.to_native(preprocess.preprocess_mask(label_map, grid), grid)
    np.testing.assert_array_equal(back, preprocess.disc_target(label_map))


def test_round_trip_keeps_shape_and_extent_when_resampled():
    label_map = _label_map()
    spacing = (3.3, 0.7, 0.7)
    grid = preprocess.plan_grid(label_map.shape, spacing, (1.4, 1.2, 1.5), min_shape=(32, 32, 32))
    extent = np.array(label_map.shape) * spacing
    np.testing.assert_allclose(np.array(grid.resampled_shape) * grid.spacing, extent)
    np.testing.assert_allclose(grid.spacing, (1.4, 1.2, 1.5), rtol=0.05)
    back = preprocess.to_native(preprocess.preprocess_mask(label_map, grid), grid)
    assert back.shape == label_map.shape
    target = preprocess.disc_target(label_map).astype(bool)
    dice = 2 * (back.astype(bool) & target).sum() / (back.sum() + target.sum())
    assert dice > 0.85
    # the discs stay where they were: same centre of mass within half a model voxel
    np.testing.assert_allclose(np.argwhere(back).mean(0) * spacing,
                               np.argwhere(target).mean(0) * spacing, atol=0.75)


def test_to_native_refuses_a_prediction_on_another_grid():
    grid = preprocess.plan_grid((20, 60, 80), (3.3, 0.7, 0.7), (2.0, 2.0, 2.0))
    with pytest.raises(ValueError, match="padded grid"):
        preprocess.to_native(np.zeros((10, 10, 10), np.uint8), grid)


def test_image_is_normalised_and_padded_with_its_darkest_value():
    rng = np.random.default_rng(0)
    image = rng.normal(500.0, 80.0, (20, 60, 70)).astype(np.float32)
    image[0, 0, 0] = 1e6  # one hot pixel must not dominate the scale
    grid = preprocess.plan_grid(image.shape, (3.3, 0.7, 0.7), (3.3, 1.5, 1.5), (32, 32, 32))
    out = preprocess.preprocess_image(image, grid)
    rx, ry, rz = grid.resampled_shape
    inside = out[:rx, :ry, :rz]
    assert out.dtype == np.float32 and out.shape == grid.padded_shape
    assert abs(float(inside.mean())) < 0.05 and abs(float(inside.std()) - 1) < 0.05
    assert out[rx:].size and np.all(out[rx:] == inside.min())


def test_training_crops_flip_only_left_right():
    image = np.zeros((1, 32, 64, 64), np.float32)
    label = np.zeros((1, 32, 64, 64), np.uint8)
    image[0, :8] = 1.0  # a marker on the Left-most slices: an L-R flip moves it, nothing else does
    image[0, :, :4] += 2.0
    label[0, 10:20, 20:40, 20:30] = 1
    transform = preprocess.training_transform((32, 32, 32), crops=20, seed=0)
    crops = transform({"image": image, "label": label})
    assert len(crops) == 20
    flipped = 0
    for crop in crops:
        x = np.asarray(crop["image"])[0]
        assert x.shape == (32, 32, 32)
        assert set(np.unique(np.asarray(crop["label"]))) <= {0, 1}
        left, right = x[:8].mean(), x[-8:].mean()
        flipped += right > left
        # the anterior-posterior marker never changes side
        column = x.mean(axis=(0, 2))
        assert column[:4].mean() >= column[-4:].mean() - 0.5
    assert 0 < flipped < 20


def test_a_mismatched_unreadable_or_non_finite_pair_is_refused_naming_the_file(tmp_path):
    header = volumes.make_header((8, 10, 12), (3.0, 1.0, 1.0))
    image = np.ones((8, 10, 12), np.float32)
    volumes.write_volume(str(tmp_path / "image.mha"), image, header)
    volumes.write_volume(str(tmp_path / "mask.mha"), np.zeros((8, 10, 12), np.int16), header)
    other = volumes.make_header((8, 10, 11), (3.0, 1.0, 1.0))
    volumes.write_volume(str(tmp_path / "short.mha"), np.zeros((8, 10, 11), np.int16), other)
    coarse = volumes.make_header((8, 10, 12), (3.0, 2.0, 1.0))
    volumes.write_volume(str(tmp_path / "coarse.mha"), np.zeros((8, 10, 12), np.int16), coarse)
    image[2, 3, 4] = np.nan
    volumes.write_volume(str(tmp_path / "nan.mha"), image, header)
    (tmp_path / "broken.mha").write_bytes(b"not an image")

    def read_and_check(image_uri: str, mask_uri: str) -> None:
        validate.check_series(*preprocess.read_pair(image_uri, mask_uri), image_uri, mask_uri)

    cases = [("image.mha", "short.mha", "short.mha", "mask shape"),
             ("image.mha", "coarse.mha", "coarse.mha", "mask spacing"),
             ("nan.mha", "mask.mha", "nan.mha", "1 NaN/Inf voxels"),
             ("broken.mha", "mask.mha", "broken.mha", "not a readable image")]
    for image_name, mask_name, culprit, reason in cases:
        with pytest.raises(validate.BadInput, match=reason) as caught:
            read_and_check(str(tmp_path / image_name), str(tmp_path / mask_name))
        assert caught.value.file == str(tmp_path / culprit)
        assert culprit in str(caught.value)

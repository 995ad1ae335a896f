"""Disc isolation on the real SPIDER fixture: reference discs, predicted components named by
overlap (merges, splits and specks reported), and the per-disc cube."""

import math

import numpy as np
import pytest
from scipy import ndimage

from pipeline import config
from pipeline.data.volumes import read_volume
from pipeline.discs.isolate import (
    UNMATCHED_LABEL,
    Disc,
    disc_cube,
    predicted_discs,
    reference_discs,
)


@pytest.fixture(scope="module")
def spider(spider_mask_path):
    """The fixture cropped around its discs (a tenth of the volume keeps the tests quick)."""
    volume = read_volume(str(spider_mask_path))
    discs = volume.array >= 201
    box = ndimage.find_objects(discs.astype(np.int8))[0]
    crop = tuple(slice(max(s.start - 4, 0), s.stop + 4) for s in box)
    return volume.array[crop].copy(), volume.spacing


def superior_mm(disc: Disc, spacing) -> float:
    return (np.argwhere(disc.mask)[:, 2].mean() + disc.offset[2]) * spacing[2]


def test_reference_discs_rise_along_s_with_their_levels(spider):
    label_map, spacing = spider
    found = reference_discs(label_map)
    assert [d.ivd_label for d in found] == list(range(201, 208))
    assert [d.level for d in found] == ["L5/S1", "L4/L5", "L3/L4", "L2/L3", "L1/L2", "T12/L1",
                                        "T11/T12"]
    assert np.all(np.diff([superior_mm(d, spacing) for d in found]) > 0)
    for disc in found:
        assert disc.mask.dtype == bool and disc.status == "ok" and math.isnan(disc.match_dice)
        window = tuple(slice(o, o + n) for o, n in zip(disc.offset, disc.mask.shape, strict=True))
        np.testing.assert_array_equal(disc.mask, label_map[window] == disc.ivd_label)
        assert disc.mask.sum() == (label_map == disc.ivd_label).sum()  # the crop holds it all


def test_predicted_components_take_the_reference_labels(spider):
    label_map, spacing = spider
    found, report = predicted_discs(label_map >= 201, spacing, label_map)
    assert [d.ivd_label for d in found] == list(range(201, 208))
    assert [d.match_dice for d in found] == pytest.approx([1.0] * 7)
    assert {d.status for d in found} == {"ok"}
    assert (report.n_found, report.n_expected, report.merged, report.split,
            report.unmatched) == (7, 7, [], [], 0)


def test_without_reference_components_are_numbered_from_the_bottom(spider):
    label_map, spacing = spider
    found, report = predicted_discs((label_map >= 201).astype(np.uint8), spacing)
    assert [d.ivd_label for d in found] == list(range(201, 208))
    assert [d.level for d in found][:2] == ["L5/S1", "L4/L5"]
    assert all(math.isnan(d.match_dice) for d in found)
    assert (report.n_found, report.n_expected) == (7, 0)


def centroid_index(label_map, label):
    return np.round(np.argwhere(label_map == label).mean(axis=0)).astype(int)


def test_merged_discs_are_reported(spider):
    """A bridge of tissue between L3/L4 and L2/L3 makes one component of both."""
    label_map, spacing = spider
    binary = label_map >= 201
    start, stop = centroid_index(label_map, 203), centroid_index(label_map, 204)
    bridge = np.zeros_like(binary)
    for t in np.linspace(0, 1, 200):
        bridge[tuple(np.round(start + t * (stop - start)).astype(int))] = True
    binary |= ndimage.binary_dilation(bridge, iterations=3)
    found, report = predicted_discs(binary, spacing, label_map)
    assert report.merged == [203, 204]
    assert report.n_found == 6 and report.split == []
    merged = [d for d in found if d.status == "merged"]
    assert len(merged) == 1 and merged[0].ivd_label in (203, 204)
    assert {d.ivd_label for d in found if d.status == "ok"} == {201, 202, 205, 206, 207}


def test_split_disc_is_reported(spider):
    """A sagittal cut through L1/L2 leaves two components on one reference disc."""
    label_map, spacing = spider
    binary = label_map >= 201
    middle = centroid_index(label_map, 205)[0]
    binary[middle] &= label_map[middle] != 205
    found, report = predicted_discs(binary, spacing, label_map)
    assert report.split == [205] and report.merged == []
    halves = [d for d in found if d.ivd_label == 205]
    assert len(halves) == 2 and {d.status for d in halves} == {"split"}
    assert all(d.match_dice < 0.9 for d in halves)
    assert [d.ivd_label for d in found] == [201, 202, 203, 204, 205, 205, 206, 207]


def test_specks_are_dropped_and_strays_unmatched(spider):
    label_map, spacing = spider
    binary = label_map >= 201
    binary[1:3, 1:4, 1:4] = True  # 18 voxels, about 19 mm^3: a speck
    binary[1:3, -5:-2, 1:4] = True
    stray = (slice(1, 5), slice(1, 20), slice(-30, -2))  # 2128 voxels, about 2200 mm^3
    assert not (label_map[stray] >= 201).any()
    binary[stray] = True
    found, report = predicted_discs(binary, spacing, label_map, min_volume_mm3=200.0)
    assert report.n_found == 8 and report.unmatched == 1
    stray_disc = [d for d in found if d.status == "unmatched"]
    assert len(stray_disc) == 1 and stray_disc[0].ivd_label == UNMATCHED_LABEL
    assert stray_disc[0].level == "" and math.isnan(stray_disc[0].match_dice)
    assert sorted(d.ivd_label for d in found if d.status == "ok") == list(range(201, 208))


def test_bad_inputs_are_refused(spider):
    label_map, spacing = spider
    with pytest.raises(ValueError, match="boolean or 0/1"):
        predicted_discs(label_map, spacing)
    with pytest.raises(ValueError, match="differs from mask shape"):
        predicted_discs(label_map >= 201, spacing, label_map[1:])
    with pytest.raises(ValueError, match="spacing"):
        predicted_discs(label_map >= 201, (1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="integer"):
        reference_discs(label_map.astype(float))


def test_fixture_cubes_fit_and_keep_the_volume(spider):
    label_map, spacing = spider
    for disc in reference_discs(label_map):
        cube, fits = disc_cube(disc, spacing, 64, 1.25)
        assert fits and cube.shape == (64, 64, 64) and cube.dtype == np.uint8
        assert set(np.unique(cube)) == {0, 1}
        volume_mm3 = disc.mask.sum() * np.prod(spacing)
        assert cube.sum() * 1.25**3 == pytest.approx(volume_mm3, rel=0.04), disc.level
        centre = np.argwhere(cube).mean(axis=0)
        np.testing.assert_allclose(centre, [31.5] * 3, atol=1.5)
        assert not cube[[0, -1]].any() and not cube[:, [0, -1]].any()


def test_cube_keeps_ras_and_mm_on_anisotropic_input():
    """A 30 x 12 x 6 mm box with a 6 mm knob on its Right side, at its anterior-superior edge."""
    spacing = (3.0, 0.5, 0.75)
    mask = np.zeros((20, 60, 30), dtype=bool)
    mask[5:15, 18:42, 11:19] = True  # 30 x 12 x 6 mm
    mask[15:17, 36:42, 17:19] = True  # the knob
    cube, fits = disc_cube(Disc(203, "L3/L4", mask, (0, 0, 0)), spacing, 32, 1.5)
    assert fits
    occupied = [np.flatnonzero(cube.any(axis=tuple(a for a in range(3) if a != axis)))
                for axis in range(3)]
    extent_mm = [np.ptp(o) * 1.5 + 1.5 for o in occupied]
    np.testing.assert_allclose(extent_mm, [36.0, 12.0, 6.0], atol=1.5)
    knob = np.argwhere(cube[occupied[0].max()])  # (A, S) of the rightmost cube slice
    assert knob[:, 0].mean() > 17 and knob[:, 1].mean() > 16  # anterior and superior


def test_a_disc_larger_than_the_cube_is_flagged():
    mask = np.zeros((5, 200, 20), dtype=bool)
    mask[1:4, 10:190, 5:15] = True  # 90 mm along A
    cube, fits = disc_cube(Disc(201, "L5/S1", mask, (0, 0, 0)), (1.0, 0.5, 1.0), 32, 2.5)
    assert not fits and cube.any()


def test_cube_size_comes_from_the_config(spider):
    label_map, spacing = spider
    cfg = config.demo().discs
    cube, fits = disc_cube(reference_discs(label_map)[0], spacing, cfg.cube_size,
                           cfg.cube_spacing_mm)
    assert cube.shape == (32, 32, 32) and fits

"""measure_disc against analytic phantoms of known size, on thick anisotropic grids, and on the
real SPIDER fixture; measure_bulge against phantom spine segments."""

import math

import numpy as np
import pytest

from pipeline.data import tables
from pipeline.data.volumes import read_volume
from pipeline.discs.geometry import measure_bulge, measure_disc
from pipeline.discs.isolate import reference_discs
from tests.phantoms import spine_segment, wedge_disc

THICK = (3.3, 0.6, 0.6)  # sagittal slices: thick along R

# The tolerances; lateral width: one slice thickness.
ABSOLUTE = {
    "height_mean_mm": 0.5, "height_anterior_mm": 0.5, "height_middle_mm": 0.5,
    "height_posterior_mm": 0.5, "sagittal_angle_deg": 2.0, "coronal_angle_deg": 2.0,
    "transverse_angle_deg": 2.0, "wedge_angle_deg": 2.0,
}
RELATIVE = {"ap_width_mm": 0.02, "volume_mm3": 0.03}

PHANTOMS = {
    "flat": dict(height_anterior_mm=9.0, height_posterior_mm=9.0),
    "wedged L5/S1": dict(height_anterior_mm=13.0, height_posterior_mm=7.0, sagittal_deg=-30.0),
    "sagittal +30": dict(sagittal_deg=30.0, exponent=2.5),
    "coronal +30": dict(coronal_deg=30.0, lateral_mm=50.0),
    "coronal -30": dict(coronal_deg=-30.0, exponent=3.0, phase=(0.4, 0.2, -0.3)),
    "both 20/-20": dict(sagittal_deg=20.0, coronal_deg=-20.0, ap_mm=33.0),
    "both 30/30": dict(sagittal_deg=30.0, coronal_deg=30.0, height_anterior_mm=8.0,
                       height_posterior_mm=10.0, phase=(-0.3, 0.45, 0.1)),
    "thin, superelliptic": dict(height_anterior_mm=5.0, height_posterior_mm=3.5, exponent=3.0,
                                sagittal_deg=10.0, coronal_deg=12.0),
    "0.5 mm in-plane": dict(spacing=(3.3, 0.5, 0.5), sagittal_deg=-15.0, coronal_deg=25.0),
    "isotropic 1 mm": dict(spacing=(1.0, 1.0, 1.0), sagittal_deg=25.0, coronal_deg=-10.0),
}


def assert_close_to_truth(got, truth, spacing):
    errors = {}
    for column in tables.GEOMETRY:
        error = got[column] - truth[column]
        if column in RELATIVE:
            error /= truth[column]
            limit = RELATIVE[column]
        elif column == "lateral_width_mm":
            limit = spacing[0]
        else:
            limit = ABSOLUTE[column]
        if abs(error) > limit:
            errors[column] = (round(got[column], 3), round(truth[column], 3))
    assert not errors, f"measured vs true beyond tolerance: {errors}"


@pytest.mark.parametrize("name", list(PHANTOMS))
def test_phantom_geometry_within_tolerance(name):
    kwargs = {"spacing": THICK, **PHANTOMS[name]}
    mask, truth = wedge_disc(**kwargs)
    got = measure_disc(mask, kwargs["spacing"])
    assert list(got) == tables.GEOMETRY
    assert_close_to_truth(got, truth, kwargs["spacing"])


def test_round_disc_axes_follow_ras_not_eigenvalue_order():
    """A round footprint has no preferred in-plane eigenvector: spinning the disc about its
    normal must not move its AP axis, so nothing changes."""
    base = dict(spacing=THICK, lateral_mm=40.0, ap_mm=40.0, height_anterior_mm=9.0,
                height_posterior_mm=9.0, sagittal_deg=15.0, coronal_deg=10.0)
    results = []
    for spin in (0.0, 37.0, 81.0):
        mask, truth = wedge_disc(**base, spin_deg=spin)
        got = measure_disc(mask, THICK)
        assert_close_to_truth(got, truth, THICK)
        results.append(got)
    for column in ("sagittal_angle_deg", "coronal_angle_deg", "transverse_angle_deg"):
        assert max(r[column] for r in results) - min(r[column] for r in results) < 1.0


def test_heights_do_not_depend_on_the_voxel_size():
    shape = dict(height_anterior_mm=11.0, height_posterior_mm=7.0, sagittal_deg=25.0,
                 coronal_deg=20.0)
    thick = measure_disc(*(wedge_disc(spacing=THICK, **shape)[0], THICK))
    fine = measure_disc(*(wedge_disc(spacing=(0.6, 0.6, 0.6), **shape)[0], (0.6, 0.6, 0.6)))
    for column in ("height_mean_mm", "height_anterior_mm", "height_middle_mm",
                   "height_posterior_mm"):
        assert abs(thick[column] - fine[column]) < 0.5, column


def slab(spacing, rise_per_mm_anterior=0.0, rise_per_mm_right=0.0, taller_anteriorly=0.0):
    """A box-footprint slab built by hand (not through the phantom module), whose mid-plane
    rises by the given slopes: a check of the sign conventions."""
    shape = (24, 80, 90)
    r, a, s = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * d for n, d in zip(shape, spacing,
                                                                            strict=True)],
                          indexing="ij", sparse=True)
    half = 4.0 + taller_anteriorly * a
    mid = rise_per_mm_anterior * a + rise_per_mm_right * r
    return (np.abs(r) <= 30) & (np.abs(a) <= 15) & (np.abs(s - mid) <= half)


def test_sign_conventions():
    spacing = (3.3, 0.6, 0.6)
    anterior_up = measure_disc(slab(spacing, rise_per_mm_anterior=math.tan(math.radians(15))),
                               spacing)
    assert anterior_up["sagittal_angle_deg"] == pytest.approx(15, abs=1)
    right_up = measure_disc(slab(spacing, rise_per_mm_right=math.tan(math.radians(10))), spacing)
    assert right_up["coronal_angle_deg"] == pytest.approx(10, abs=1)
    wedged = measure_disc(slab(spacing, taller_anteriorly=0.1), spacing)
    assert wedged["wedge_angle_deg"] > 5
    assert wedged["height_anterior_mm"] > wedged["height_posterior_mm"] + 3


@pytest.mark.parametrize("mask, match", [
    (np.zeros((8, 8, 8), dtype=bool), "empty"),
    (np.pad(np.ones((1, 1, 1), dtype=bool), 3), "single voxel"),
    (np.pad(np.ones((6, 6, 3), dtype=bool), ((0, 2), (2, 2), (2, 2))), "border"),
    (np.pad(np.ones((6, 6, 3), dtype=np.uint8), 2), "boolean"),
    (np.pad(np.ones((6, 6, 3)), 2), "boolean"),
    (np.ones((6, 6), dtype=bool), "3D"),
])
def test_bad_masks_are_refused(mask, match):
    with pytest.raises(ValueError, match=match):
        measure_disc(mask, (1.0, 1.0, 1.0))


def test_bad_spacing_is_refused():
    mask = np.pad(np.ones((6, 6, 3), dtype=bool), 2)
    with pytest.raises(ValueError, match="spacing"):
        measure_disc(mask, (1.0, 0.0, 1.0))


@pytest.fixture(scope="module")
def spider(spider_mask_path):
    volume = read_volume(str(spider_mask_path))
    return volume.array, volume.spacing


def test_fixture_discs_have_plausible_geometry(spider):
    label_map, spacing = spider
    found = reference_discs(label_map)
    assert [d.ivd_label for d in found] == list(range(201, 208))
    rows = {d.ivd_label: measure_disc(d.mask, spacing) for d in found}
    for label, row in rows.items():
        assert all(np.isfinite(v) for v in row.values()), label
        for column in ("height_mean_mm", "height_anterior_mm", "height_middle_mm",
                       "height_posterior_mm"):
            assert 1.5 <= row[column] <= 15, (label, column, row[column])
        assert 20 <= row["ap_width_mm"] <= 60, (label, row["ap_width_mm"])
        assert 25 <= row["lateral_width_mm"] <= 75, (label, row["lateral_width_mm"])
        assert row["volume_mm3"] == pytest.approx(
            (label_map == label).sum() * np.prod(spacing))
        assert abs(row["wedge_angle_deg"]) < 20
    # the small top disc is the thinnest; L5/S1 slopes down anteriorly on the sacrum
    assert rows[207]["height_mean_mm"] == min(r["height_mean_mm"] for r in rows.values())
    assert rows[201]["sagittal_angle_deg"] < -15


def test_bulge_none_inside_the_endplates():
    label_map = spine_segment(disc_radii_mm=(20.0, 13.0), vertebra_radii_mm=(22.0, 15.0))
    assert measure_bulge(label_map, THICK, 203) == {"bulge_fraction": 0.0, "bulge_max_mm": 0.0}


def test_bulge_all_round_with_its_size():
    label_map = spine_segment(disc_radii_mm=(25.0, 18.0), vertebra_radii_mm=(22.0, 15.0),
                              sagittal_deg=20.0)
    bulge = measure_bulge(label_map, THICK, 203)
    assert bulge["bulge_fraction"] > 0.95
    assert bulge["bulge_max_mm"] == pytest.approx(3.14, abs=0.75)  # radial excess on the ellipses


def outermost_radius(angles, radii, shift):
    """Distance from the origin to an ellipse (semi-axes `radii`, centre (0, shift)) along rays."""
    r = np.linspace(0, 40, 8001)
    x, y = np.cos(angles)[:, None] * r, np.sin(angles)[:, None] * r
    inside = (x / radii[0]) ** 2 + ((y - shift) / radii[1]) ** 2 <= 1
    return r[len(r) - 1 - np.argmax(inside[:, ::-1], axis=1)]


@pytest.mark.parametrize("facets", [False, True])
def test_posterior_bulge_fraction_matches_the_geometry(facets):
    """A disc 4 mm posterior of its vertebrae; facets behind the canal must not hide it."""
    radii = (22.0, 15.0)
    label_map = spine_segment(disc_radii_mm=radii, vertebra_radii_mm=radii, disc_shift_mm=-4.0,
                              facets=facets)
    angles = np.linspace(0, 2 * np.pi, 3600, endpoint=False)
    excess = outermost_radius(angles, radii, 0.0) - outermost_radius(angles, radii, 4.0)
    expected = (excess > 0.5 * THICK[0]).mean()  # measure_bulge's noise floor on this grid
    bulge = measure_bulge(label_map, THICK, 203)
    assert bulge["bulge_fraction"] == pytest.approx(expected, abs=0.05)
    assert bulge["bulge_max_mm"] == pytest.approx(excess.max(), abs=0.75)


def test_bulge_uses_whichever_neighbour_exists():
    below_missing = spine_segment(ivd_label=201, disc_radii_mm=(25.0, 18.0))  # no sacrum label
    assert measure_bulge(below_missing, THICK, 201)["bulge_fraction"] > 0.95
    alone = spine_segment(vertebrae=(False, False))
    assert all(math.isnan(v) for v in measure_bulge(alone, THICK, 203).values())
    with pytest.raises(ValueError, match="not in the label map"):
        measure_bulge(alone, THICK, 204)


def test_fixture_bulge_is_defined_for_every_disc(spider):
    label_map, spacing = spider
    for label in range(201, 208):
        bulge = measure_bulge(label_map, spacing, label)
        assert 0.0 <= bulge["bulge_fraction"] <= 1.0, label
        assert bulge["bulge_max_mm"] >= 0.0, label

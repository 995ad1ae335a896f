"""The synthetic cohort: SPIDER's layout, masks that agree with the truth table, determinism, and
cohort statistics (label noise, prevalence, level trends) as configured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data import synthetic, tables
from pipeline.data.cohort import catalog
from pipeline.data.volumes import read_volume

GRADINGS_HEADER = ["Patient", "IVD label", "Modic", "UP endplate", "LOW endplate",
                   "Spondylolisthesis", "Disc herniation", "Disc narrowing", "Disc bulging",
                   "Pfirrman grade"]
BINARY = ["bulging", "narrowing", "herniation", "up_endplate", "low_endplate", "spondylolisthesis"]
LOWER, UPPER = ["L5/S1", "L4/L5"], ["L1/L2", "T12/L1"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    truth = synthetic.synthesize(str(out), patients=2, seed=0)
    return out, truth


@pytest.fixture(scope="module")
def drawn():
    """Many patients' truth without images: cheap enough for statistics."""
    return synthetic.truth_table(synthetic.draw_patients(100, seed=0, label_noise=0.2))


def centroid(array, label):
    return np.argwhere(array == label).mean(axis=0)


def test_spider_layout_and_columns(written):
    out, truth = written
    for folder in ("images", "masks"):
        names = sorted(p.name for p in (out / folder).iterdir())
        assert names == ["1_t1.mha", "1_t2.mha", "2_t1.mha", "2_t2.mha"]
    overview = pd.read_csv(out / "overview.csv")
    assert list(overview.columns[:6]) == ["new_file_name", "subset", "num_vertebrae", "num_discs",
                                          "sex", "age"]
    assert {"Manufacturer", "MagneticFieldStrength", "SliceThickness", "PixelSpacing"} <= set(
        overview.columns)
    assert sorted(overview.new_file_name) == ["1_t1", "1_t2", "2_t1", "2_t2"]
    subsets = overview.assign(patient=overview.new_file_name.str.split("_").str[0])
    assert subsets.groupby("patient").subset.nunique().eq(1).all()
    assert set(overview.subset) == {"training", "validation"}
    gradings = pd.read_csv(out / "radiological_gradings.csv")
    assert list(gradings.columns) == GRADINGS_HEADER
    assert sorted(gradings["IVD label"].unique()) == [1, 2, 3, 4, 5, 6]
    on_disk = pd.read_csv(out / "synthetic_truth.csv", dtype={"patient_id": str})
    assert list(on_disk.columns[:3]) == ["patient_id", "ivd_label", "level"]
    assert set(tables.GEOMETRY + tables.BULGE) <= set(on_disk.columns)
    assert len(on_disk) == len(truth) == 12
    np.testing.assert_allclose(on_disk.volume_mm3, truth.volume_mm3, rtol=1e-6)


def test_the_spider_catalog_reads_it_without_problems(written):
    out, _ = written
    cat = catalog(str(out), sequence="t2")
    assert cat.problems == []
    assert list(cat.series.series_id) == ["1_t2", "2_t2"]
    assert set(cat.series.split) == {"train", "val"}
    assert len(cat.gradings) == 12


def test_mask_reads_back_like_a_spider_mask(written):
    out, _ = written
    mask = read_volume(str(out / "masks" / "1_t1.mha"))
    image = read_volume(str(out / "images" / "1_t1.mha"))
    assert mask.array.dtype == np.int16 and image.array.dtype == np.int16
    assert mask.header.axcodes == "LPS" and image.header.axcodes == "LPS"
    assert mask.array.shape == image.array.shape
    assert 3.0 <= mask.spacing[0] <= 3.6 and 0.6 <= mask.spacing[1] <= 0.9
    assert sorted(np.unique(mask.array)) == [0, 1, 2, 3, 4, 5, 6, 100, *range(201, 207)]
    discs = [centroid(mask.array, label) for label in range(201, 207)]
    assert all(np.diff([c[2] for c in discs]) > 0), "discs must rise along S in label order"
    vertebrae = [centroid(mask.array, label)[2] for label in range(1, 7)]
    assert all(np.diff(vertebrae) > 0)
    assert centroid(mask.array, 100)[1] < np.mean(discs, axis=0)[1], "canal must be posterior"


def test_t2_shows_csf_bright_and_t1_dark(written):
    out, _ = written
    mask = read_volume(str(out / "masks" / "2_t1.mha")).array
    t1 = read_volume(str(out / "images" / "2_t1.mha")).array
    t2 = read_volume(str(out / "images" / "2_t2.mha")).array
    canal, discs = mask == 100, mask >= 201
    assert t2[canal].mean() > 2 * t2[discs].mean()
    assert t1[canal].mean() < t1[discs].mean()


def test_mask_disc_volumes_match_the_truth(written):
    out, truth = written
    for patient in ("1", "2"):
        mask = read_volume(str(out / "masks" / f"{patient}_t1.mha"))
        voxel = np.prod(mask.spacing)
        rows = truth[truth.patient_id == patient]
        measured = np.array([(mask.array == label).sum() * voxel for label in rows.ivd_label])
        np.testing.assert_allclose(measured, rows.volume_mm3, rtol=0.05)
        assert abs(measured.sum() / rows.volume_mm3.sum() - 1) < 0.02


def test_truth_geometry_agrees_with_a_fine_rasterisation():
    patient = synthetic.draw_patients(3, seed=2)[2]
    for disc, truth in zip(patient.discs, patient.geometry, strict=True):
        spacing = np.array([0.4, 0.4, 0.4])
        mask = synthetic.disc_mask(disc, spacing)
        assert mask.sum() * spacing.prod() == pytest.approx(truth["volume_mm3"], rel=0.005)
        points = np.argwhere(mask) * spacing
        centred = points - points.mean(axis=0)
        normal = np.linalg.eigh(centred.T @ centred)[1][:, 0]
        assert abs(normal @ disc.frame[:, 2]) > np.cos(np.radians(0.5))
        ap = centred @ disc.frame[:, 0]
        on_axis = (np.abs(centred @ disc.frame[:, 1]) < 0.4) & (np.abs(centred @ normal) < 0.4)
        assert np.ptp(ap[on_axis]) == pytest.approx(truth["ap_width_mm"], abs=0.6)


def test_same_seed_same_bytes_and_another_seed_differs(written, tmp_path):
    def files(folder):
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file()}

    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        synthetic.synthesize(str(tmp_path / name), patients=1, seed=seed, sequences=("t1",))
    a, b, c = (files(tmp_path / name) for name in "abc")
    assert a == b
    for name in a:
        assert a[name] != c[name], f"{name} did not change with the seed"
    # A patient's volumes depend on the seed and its number only, not on how many were drawn.
    fixture, _ = written
    for name in ("images/1_t1.mha", "masks/1_t1.mha"):
        assert a[Path(name)] == (fixture / name).read_bytes()


def test_a_smaller_cohort_replaces_a_larger_one_and_foreign_folders_are_refused(tmp_path):
    out = tmp_path / "cohort"
    synthetic.synthesize(str(out), patients=2, seed=0, sequences=("t1",))
    synthetic.synthesize(str(out), patients=1, seed=0, sequences=("t1",))
    assert sorted(p.name for p in (out / "images").iterdir()) == ["1_t1.mha"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["1_t1.mha"]
    foreign = tmp_path / "spider"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "7_t1.mha").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="7_t1.mha"):
        synthetic.synthesize(str(foreign), patients=1, sequences=("t1",))
    assert (foreign / "images" / "7_t1.mha").read_bytes() == b"not ours"


def test_label_noise_flips_gradings_at_the_configured_rate(drawn):
    symmetric = [name for name in BINARY if name not in synthetic.SPIDER_PREVALENCE]
    flips = np.mean([(drawn[name] != drawn[f"graded_{name}"]).mean() for name in symmetric])
    assert flips == pytest.approx(0.2, abs=0.03)
    # findings with a SPIDER rate: positives misread at the configured rate, prevalence kept
    for name in synthetic.SPIDER_PREVALENCE:
        positive = drawn[name] == 1
        missed = (drawn[f"graded_{name}"][positive] == 0).mean()
        assert missed == pytest.approx(0.2, abs=0.06), name
        assert drawn[f"graded_{name}"].mean() == pytest.approx(drawn[name].mean(), abs=0.04)
    moved = drawn.pfirrmann != drawn.graded_pfirrmann
    assert moved.mean() == pytest.approx(0.2, abs=0.05)
    assert (drawn.pfirrmann - drawn.graded_pfirrmann).abs().max() == 1


def test_noise_free_gradings_equal_the_truth_and_anatomy_ignores_noise(drawn):
    clean = synthetic.truth_table(synthetic.draw_patients(10, seed=0, label_noise=0.0))
    for name in BINARY + ["pfirrmann"]:
        assert (clean[name] == clean[f"graded_{name}"]).all()
    noisy = drawn[drawn.patient_id.astype(int) <= 10].reset_index(drop=True)
    pd.testing.assert_frame_equal(clean[tables.GEOMETRY + BINARY], noisy[tables.GEOMETRY + BINARY])


def test_bulging_follows_its_definition(drawn):
    by_level = drawn.groupby("level").bulging.mean()
    assert by_level[LOWER].mean() > by_level[UPPER].mean() + 0.1
    bulging = drawn.bulging == 1
    assert (drawn.bulge_fraction[bulging] > 0.25).all()
    assert (drawn.bulge_fraction[~bulging] <= 0.25).all()
    assert drawn.bulge_max_mm[bulging].between(2.0, 6.0).all()
    focal = (drawn.herniation == 1) & ~bulging
    assert focal.any() and drawn.bulge_fraction[focal].between(0.0, 0.25, inclusive="neither").all()
    normal = (drawn.herniation == 0) & ~bulging
    assert (drawn.bulge_fraction[normal] == 0).all() and (drawn.bulge_max_mm[normal] == 0).all()
    # Hung et al.: bulging discs are lower and deeper.
    assert drawn.height_mean_mm[bulging].mean() < drawn.height_mean_mm[~bulging].mean()
    assert drawn.ap_width_mm[bulging].mean() > drawn.ap_width_mm[~bulging].mean()


def test_narrowing_is_height_loss_against_the_level_norm(drawn):
    narrowed = drawn.height_mean_mm < 0.75 * drawn.height_norm_mm
    assert (narrowed.astype(int) == drawn.narrowing).all()


def test_graded_prevalence_by_level_follows_real_spider():
    """Measured on 200 patients at the default label noise, against SPIDER's per-level rates."""
    graded = synthetic.truth_table(synthetic.draw_patients(200, seed=0, label_noise=0.1))
    for name, rates in synthetic.SPIDER_PREVALENCE.items():
        measured = graded.groupby("ivd_label")[f"graded_{name}"].mean()
        for k, rate in enumerate(rates):
            assert measured[201 + k] == pytest.approx(rate, abs=0.08), (name, 201 + k)


def test_level_anatomy(drawn):
    l5s1 = drawn[drawn.level == "L5/S1"]
    assert (l5s1.height_anterior_mm > l5s1.height_posterior_mm + 1.0).all(), "L5/S1 is wedged"
    means = drawn.groupby("level")[["height_mean_mm", "lateral_width_mm"]].mean()
    assert means.height_mean_mm[LOWER].mean() > means.height_mean_mm[UPPER].mean() + 0.5
    widths = means.lateral_width_mm[["T12/L1", "L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"]]
    assert all(np.diff(widths) > 0) and 38 < widths.min() and widths.max() < 60
    angles = drawn.pivot(index="patient_id", columns="level", values="sagittal_angle_deg")
    curve = angles["T12/L1"] - angles["L5/S1"]
    assert curve.between(15, 75).all() and 30 < curve.mean() < 55, "lordotic curve"
    assert drawn.coronal_angle_deg.abs().max() < 15 and drawn.transverse_angle_deg.abs().max() < 15


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="t2_SPACE"):
        synthetic.synthesize(str(tmp_path), patients=1, sequences=("t2_SPACE",))
    with pytest.raises(ValueError, match="patients"):
        synthetic.draw_patients(0)
    with pytest.raises(ValueError, match="label_noise"):
        synthetic.draw_patients(2, label_noise=1.5)


def test_one_ray_task_per_patient_writes_the_same_bytes(ray_session, tmp_path):
    def files(folder):
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
                if p.is_file()}

    counts = []
    on_ray = synthetic.synthesize(str(tmp_path / "ray"), patients=2, seed=4, sequences=("t1",),
                                  progress=lambda done, total: counts.append((done, total)),
                                  on_ray=True)
    local = synthetic.synthesize(str(tmp_path / "local"), patients=2, seed=4,
                                 sequences=("t1",), on_ray=False)
    pd.testing.assert_frame_equal(on_ray, local, check_exact=True)
    written = files(tmp_path / "ray")
    assert written == files(tmp_path / "local")
    assert len(written) == 2 * 2 + 3  # an image and a mask per patient, three tables once
    assert counts == [(1, 2), (2, 2)]

import numpy as np
import pandas as pd
import pytest

from pipeline.data import storage
from pipeline.data.cohort import GRADINGS_COLUMNS, SERIES_COLUMNS, catalog
from pipeline.data.volumes import make_header, read_volume, write_volume

GRADINGS_HEADER = (
    "Patient,IVD label,Modic,UP endplate,LOW endplate,Spondylolisthesis,Disc herniation,"
    "Disc narrowing,Disc bulging,Pfirrman grade"
)
OVERVIEW_HEADER = "new_file_name,subset,num_vertebrae,num_discs,sex,age,Manufacturer,MagneticFieldStrength"
CLEAN_SERIES = ["1_t1", "1_t2", "2_t1", "2_t2_SPACE", "10_t1", "10_t2"]
CLEAN_OVERVIEW = [
    "1_t1,training,7,7,F,45,Philips,1.5",
    "1_t2,training,7,7,F,45,Philips,1.5",
    "2_t1,training,6,6,M,,SIEMENS,3",
    "2_t2_SPACE,training,6,6,M,,SIEMENS,3",
    "10_t1,validation,7,7,F,60,Philips,1.5",
    "10_t2,validation,7,7,F,60,Philips,1.5",
]
CLEAN_GRADINGS = [
    "10,1,2,1,0,0,1,1,1,5",
    "1,2,0,0,0,0,0,0,1,3",
    "1,1,1,0,1,0,0,1,0,4",
    "2,1,0,0,0,1,0,0,0,2",
]


def write_volumes(root, folder, series_ids):
    ras = np.zeros((2, 3, 4), dtype=np.int16)
    for series_id in series_ids:
        write_volume(str(root / folder / f"{series_id}.mha"), ras, make_header(ras.shape, (3.3, 0.6, 0.6)))


def write_csv(path, header, rows):
    path.write_text("\n".join([header, *rows]) + "\n")


def spider_root(tmp_path, images=CLEAN_SERIES, masks=CLEAN_SERIES, overview=CLEAN_OVERVIEW,
                gradings=CLEAN_GRADINGS, overview_header=OVERVIEW_HEADER, gradings_header=GRADINGS_HEADER):
    """A tiny SPIDER-layout root; overview or gradings None leaves that CSV out."""
    root = tmp_path / "spider"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    write_volumes(root, "images", images)
    write_volumes(root, "masks", masks)
    if overview is not None:
        write_csv(root / "overview.csv", overview_header, overview)
    if gradings is not None:
        write_csv(root / "radiological_gradings.csv", gradings_header, gradings)
    return root


def test_clean_cohort_gives_the_expected_tables(tmp_path):
    root = spider_root(tmp_path)
    found = catalog(str(root))

    assert found.problems == []
    expected_series = pd.DataFrame(
        [
            [sid, patient, "t1", str(root / "images" / f"{sid}.mha"), str(root / "masks" / f"{sid}.mha"),
             subset, split, 0, sex, age]
            for sid, patient, subset, split, sex, age in [
                ("1_t1", "1", "training", "train", "F", 45.0),
                ("2_t1", "2", "training", "train", "M", np.nan),
                ("10_t1", "10", "validation", "val", "F", 60.0),
            ]
        ],
        columns=SERIES_COLUMNS,
    )
    pd.testing.assert_frame_equal(found.series, expected_series)

    expected_gradings = pd.DataFrame(
        [
            ["1", 201, "L5/S1", 1, 0, 1, 0, 0, 1, 0, 4],
            ["1", 202, "L4/L5", 0, 0, 0, 0, 0, 0, 1, 3],
            ["2", 201, "L5/S1", 0, 0, 0, 1, 0, 0, 0, 2],
            ["10", 201, "L5/S1", 2, 1, 0, 0, 1, 1, 1, 5],
        ],
        columns=GRADINGS_COLUMNS,
    ).astype({c: "Int64" for c in GRADINGS_COLUMNS[3:]})
    pd.testing.assert_frame_equal(found.gradings, expected_gradings)
    assert found.gradings.ivd_label.dtype == np.int64
    # grades are nullable integers: a blank grade stays blank, never 0 or a float
    assert all(found.gradings[c].dtype == "Int64" for c in GRADINGS_COLUMNS[3:])


@pytest.mark.parametrize(
    ("sequence", "series_ids"),
    [
        ("t1", ["1_t1", "2_t1", "10_t1"]),
        ("t2", ["1_t2", "10_t2"]),
        ("t2_SPACE", ["2_t2_SPACE"]),
        (None, CLEAN_SERIES),
    ],
)
def test_sequence_filter(tmp_path, sequence, series_ids):
    found = catalog(str(spider_root(tmp_path)), sequence=sequence)
    assert found.problems == []
    assert found.series["series_id"].tolist() == series_ids
    space = found.series[found.series["series_id"] == "2_t2_SPACE"]
    if len(space):
        assert space.iloc[0][["patient_id", "sequence"]].tolist() == ["2", "t2_SPACE"]


def test_bad_arguments_raise(tmp_path):
    root = spider_root(tmp_path)
    with pytest.raises(ValueError, match="unknown sequence 'T1'"):
        catalog(str(root), sequence="T1")
    with pytest.raises(ValueError, match="val_fraction"):
        catalog(str(root), val_fraction=1.0)
    with pytest.raises(ValueError, match="dataset root not found"):
        catalog(str(tmp_path / "nowhere"))


def problem_list(found, root):
    """(file relative to root, series_id, reason) per problem, in order."""
    return [
        (p["file"].replace(str(root) + "/", ""), p["series_id"], p["reason"]) for p in found.problems
    ]


def assert_problems(found, root, expected):
    """Exactly one problem per expected (file, series_id, reason fragment), in any order."""
    got = problem_list(found, root)
    assert all(p["stage"] == "catalog" for p in found.problems)
    unmatched = list(got)
    for file, series_id, fragment in expected:
        match = [g for g in unmatched if g[0] == file and g[1] == series_id and fragment in g[2]]
        assert len(match) == 1, f"expected one problem {file, series_id, fragment!r}; got {got}"
        unmatched.remove(match[0])
    assert unmatched == [], f"unexpected problems: {unmatched}"


def test_each_planted_problem_is_reported_once_and_good_rows_are_kept(tmp_path):
    good = ["1_t1", "2_t1"]
    root = spider_root(
        tmp_path,
        images=[*good, "3_t1", "5_t1", "9_t3", "scan"],
        masks=[*good, "4_t1", "5_t1"],
        overview=[
            "1_t1,training,7,7,F,45,Philips,1.5",
            "2_t1,validation,6,6,M,50,Philips,1.5",
            "2_t1,training,6,6,M,50,Philips,1.5",  # duplicate series row
            "3_t1,training,7,7,F,45,Philips,1.5",
            "6_t1,training,7,7,F,45,Philips,1.5",  # names files that do not exist
            "../7_t1,training,7,7,F,45,Philips,1.5",  # escapes the root
            "/etc/8_t1,training,7,7,F,45,Philips,1.5",  # absolute
            "4_t1,training,7,7,F,forty,Philips,1.5",  # unreadable age
        ],
        gradings=[
            "1,1,1,0,1,0,0,1,0,4",
            "1,1,1,0,1,0,0,1,0,4",  # identical duplicate: first kept
            "1,0,0,0,0,0,0,0,0,1",  # IVD label 0
            "1,2,,0,0,0,0,0,1,3",  # missing Modic
            "1,3,0,0,0,0,0,0,yes,3",  # non-numeric Disc bulging
            "2,1,0,0,0,1,0,0,0,2",
            "2,1,1,0,0,1,0,0,0,2",  # conflicting duplicate: both dropped
            "2,2,0,0,0,0,0,0,0,9",  # Pfirrmann out of range
            "2,3,0,0,0,0,0,0,0,2",
        ],
    )
    found = catalog(str(root), sequence="t1")

    assert_problems(found, root, [
        ("images/9_t3.mha", None, "unknown sequence 't3'"),
        ("images/scan.mha", None, "is not <patient>_<sequence>"),
        ("overview.csv", "2_t1", "rows 3 and 4 both describe series 2_t1"),
        ("overview.csv", None, "row 7: new_file_name '../7_t1' is a path"),
        ("overview.csv", None, "row 8: new_file_name '/etc/8_t1' is a path"),
        ("overview.csv", "4_t1", "age 'forty'"),
        ("radiological_gradings.csv", None, "row 4 (patient '1', IVD label '0'): IVD label 0 names no disc"),
        ("radiological_gradings.csv", None, "row 5 (patient '1', IVD label '2'): missing Modic; left blank, the row's other grades kept"),
        ("radiological_gradings.csv", None, "row 6 (patient '1', IVD label '3'): Disc bulging 'yes' is not a whole number; left blank"),
        ("radiological_gradings.csv", None, "row 9 (patient '2', IVD label '2'): Pfirrman grade 9 is outside 1-5; left blank"),
        ("radiological_gradings.csv", None, "rows 2 and 3 grade the same disc (patient 1, IVD label 1), identically; kept row 2"),
        ("radiological_gradings.csv", None, "rows 7 and 8 grade the same disc (patient 2, IVD label 1), differently (Modic 0 vs 1); all of them dropped"),
        ("images/3_t1.mha", "3_t1", "image has no mask"),
        ("masks/4_t1.mha", "4_t1", "mask has no image"),
        ("images/5_t1.mha", "5_t1", "no overview.csv row for series 5_t1"),
        ("overview.csv", "6_t1", "row 6 names series 6_t1, but neither images/ nor masks/ holds it"),
    ])
    series = found.series.set_index("series_id")
    assert series.index.tolist() == ["1_t1", "2_t1", "5_t1"]
    assert series.loc["2_t1", ["subset", "split", "age"]].tolist() == ["validation", "val", 50.0]
    assert series.loc["5_t1", ["subset", "sex", "age"]].isna().all()  # null (pandas shows NaN)
    gradings = found.gradings.set_index(["patient_id", "ivd_label"])
    assert gradings.index.tolist() == [("1", 201), ("1", 202), ("1", 203), ("2", 202), ("2", 203)]
    # a blank or invalid grade empties only that grade
    assert pd.isna(gradings.loc[("1", 202), "modic"]) and gradings.loc[("1", 202), "pfirrman_grade"] == 3
    assert pd.isna(gradings.loc[("1", 203), "disc_bulging"])
    assert gradings.loc[("1", 203), "disc_narrowing"] == 0
    assert pd.isna(gradings.loc[("2", 202), "pfirrman_grade"])


def test_gradings_missing_columns_drop_everything_with_one_problem(tmp_path):
    root = spider_root(tmp_path, gradings_header=GRADINGS_HEADER.replace(",Disc bulging", ",Bulging"))
    found = catalog(str(root))
    assert_problems(found, root, [
        ("radiological_gradings.csv", None, "lacks the column(s) Disc bulging; no gradings kept"),
    ])
    assert found.gradings.empty and found.gradings.columns.tolist() == GRADINGS_COLUMNS
    assert len(found.series) == 3


def test_missing_csvs_give_one_problem_each_and_the_series_still_come(tmp_path):
    root = spider_root(tmp_path, overview=None, gradings=None)
    found = catalog(str(root), sequence=None)
    assert_problems(found, root, [
        ("overview.csv", None, "overview.csv not found"),
        ("radiological_gradings.csv", None, "radiological_gradings.csv not found"),
    ])
    assert found.series["series_id"].tolist() == CLEAN_SERIES
    assert found.series["subset"].isna().all() and found.series["age"].isna().all()
    assert set(found.series["split"]) <= {"train", "val"}
    assert found.gradings.empty


def patient_splits(series):
    by_patient = series.groupby("patient_id")["split"].agg(set)
    assert (by_patient.map(len) == 1).all(), f"a patient is in both splits: {by_patient}"
    return by_patient.map(lambda s: next(iter(s))).to_dict()


def test_seeded_split_is_patient_grouped_and_reproducible(tmp_path):
    series_ids = [f"{p}_{seq}" for p in range(1, 21) for seq in ("t1", "t2")]
    root = spider_root(tmp_path, images=series_ids, masks=series_ids, overview=None, gradings=None)

    first = patient_splits(catalog(str(root), sequence=None, seed=3).series)
    assert list(first.values()).count("val") == 4  # 20% of 20 patients
    assert patient_splits(catalog(str(root), sequence=None, seed=3).series) == first
    assert patient_splits(catalog(str(root), sequence="t1", seed=3).series) == first
    assert patient_splits(catalog(str(root), sequence="t2", seed=3).series) == first
    assert patient_splits(catalog(str(root), sequence=None, seed=4).series) != first
    half = patient_splits(catalog(str(root), sequence=None, val_fraction=0.5, seed=3).series)
    assert list(half.values()).count("val") == 10


def test_subset_wins_and_a_patient_in_both_subsets_goes_to_val(tmp_path):
    series_ids = ["1_t1", "1_t2", "2_t1", "3_t1", "4_t1"]
    root = spider_root(
        tmp_path, images=series_ids, masks=series_ids, gradings=CLEAN_GRADINGS,
        overview=[
            "1_t1,training,7,7,F,45,Philips,1.5",
            "1_t2,validation,7,7,F,45,Philips,1.5",
            "2_t1,validation,7,7,F,45,Philips,1.5",
            "3_t1,,7,7,F,45,Philips,1.5",
            "4_t1,test,7,7,F,45,Philips,1.5",
        ],
    )
    found = catalog(str(root), sequence=None, val_fraction=0.5)
    assert_problems(found, root, [
        ("overview.csv", None, "puts patient 1 in both training and validation; all its series go to val"),
        ("overview.csv", "4_t1", "row 6: unknown subset 'test' (expected training or validation); series split by seed"),
    ])
    splits = patient_splits(found.series)
    assert splits["1"] == "val" and splits["2"] == "val"
    assert sorted([splits["3"], splits["4"]]) == ["train", "val"]  # seeded, half of the undecided


def test_dicom_style_sex_and_age_headers(tmp_path):
    root = spider_root(
        tmp_path, images=["1_t1"], masks=["1_t1"],
        overview_header="new_file_name,subset,PatientSex,PatientAge",
        overview=["1_t1,training,F,045Y"],
    )
    found = catalog(str(root))
    assert found.problems == []
    assert found.series[["sex", "age"]].values.tolist() == [["F", 45.0]]


def test_file_uri_root(tmp_path):
    root = spider_root(tmp_path)
    uri = f"file://{root}"
    found = catalog(uri)
    local = catalog(str(root))
    assert found.problems == []
    assert found.series["image_uri"].tolist() == [storage.join(uri, "images", f"{s}.mha") for s in ("1_t1", "2_t1", "10_t1")]
    assert found.series["mask_uri"].iloc[0] == storage.join(uri, "masks", "1_t1.mha")
    uris = ["image_uri", "mask_uri"]
    pd.testing.assert_frame_equal(found.series.drop(columns=uris), local.series.drop(columns=uris))
    pd.testing.assert_frame_equal(found.gradings, local.gradings)
    assert read_volume(found.series["mask_uri"].iloc[0]).array.shape == (2, 3, 4)

"""Catalog a SPIDER-layout dataset root into a series table, a gradings table and a problems list.

SPIDER keeps `images/<patient>_<seq>.mha`, `masks/<patient>_<seq>.mha`, `overview.csv` (one row per
series: subset, sex, age, scanner) and `radiological_gradings.csv` (one row per patient and disc).
Real releases have gaps (gradings with IVD label 0, series without a mask), so bad data never
raises here: everything left out gets a problem a person can read, and the rest is kept. Only
listings and CSVs are read; whether a volume itself is readable is the reading stage's business.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from pipeline.data import labels, storage
from pipeline.data.volumes import SUFFIXES

SEQUENCES = ("t1", "t2", "t2_SPACE")
IMAGES, MASKS = "images", "masks"
OVERVIEW = "overview.csv"
GRADINGS = "radiological_gradings.csv"

SERIES_COLUMNS = [
    "series_id", "patient_id", "sequence", "image_uri", "mask_uri", "subset", "split", "fold", "sex",
    "age",
]
# SPIDER's grading columns -> (our name, the values a grade may take).
GRADES = {
    "Modic": ("modic", range(0, 4)),
    "UP endplate": ("up_endplate", range(0, 2)),
    "LOW endplate": ("low_endplate", range(0, 2)),
    "Spondylolisthesis": ("spondylolisthesis", range(0, 2)),
    "Disc herniation": ("disc_herniation", range(0, 2)),
    "Disc narrowing": ("disc_narrowing", range(0, 2)),
    "Disc bulging": ("disc_bulging", range(0, 2)),
    "Pfirrman grade": ("pfirrman_grade", range(1, 6)),
}
GRADINGS_COLUMNS = ["patient_id", "ivd_label", "level", *(name for name, _ in GRADES.values())]
_GRADINGS_REQUIRED = ["Patient", "IVD label", *GRADES]

_SUBSET_SPLIT = {"training": "train", "validation": "val"}
# Header spellings accepted for sex and age (compared lower-cased): SPIDER's own plus DICOM's.
_SEX_HEADERS = ("sex", "patientsex", "patient_sex", "gender")
_AGE_HEADERS = ("age", "patientage", "patient_age")
_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*[yY]?$")  # "45", "45.5" or DICOM's "045Y"
_MISSING = {"", "nan", "na", "n/a", "none", "null"}


@dataclass
class Catalog:
    series: pd.DataFrame  # SERIES_COLUMNS, one row per series that has both an image and a mask
    gradings: pd.DataFrame  # GRADINGS_COLUMNS, one row per (patient_id, ivd_label)
    problems: list[dict]  # {"stage": "catalog", "file", "series_id" (or None), "reason"}


def catalog(
    root: str, sequence: str | None = "t1", val_fraction: float = 0.2, seed: int = 0,
    folds: int = 1,
) -> Catalog:
    """Catalog the SPIDER-layout folder or URI `root`.

    `sequence` keeps one of SEQUENCES (None keeps all). `split` follows overview.csv's subset;
    patients without one are split by `seed` with `val_fraction` of them in val. Splits are
    decided over every patient under `root` whatever `sequence` is, so a patient's split is the
    same in a T1 and a T2 catalog. `fold` is the patient's cross-fitting fold (0 to folds-1,
    see assign_folds), decided the same way over every patient.
    """
    if sequence is not None and sequence not in SEQUENCES:
        raise ValueError(f"unknown sequence {sequence!r}: expected one of {', '.join(SEQUENCES)} or None")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if folds < 1:
        raise ValueError(f"folds must be at least 1, got {folds}")
    fs, base = storage.filesystem(root)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise ValueError(f"{root}: dataset root not found (expected {IMAGES}/, {MASKS}/, {OVERVIEW})")
    found = _Found(root, fs, base)
    images = found.volumes(IMAGES)
    masks = found.volumes(MASKS)
    overview = found.overview()
    gradings = found.gradings()
    series = found.series(images, masks, overview, sequence, val_fraction, seed, folds)
    return Catalog(series=series, gradings=gradings, problems=found.problems)


class _Found:
    """What one root holds, and the problems met while reading it."""

    def __init__(self, root: str, fs: pafs.FileSystem, base: str):
        self.root = root if storage.is_uri(root) else storage.absolute(root)
        self.fs, self.base = fs, base.rstrip("/")
        self.problems: list[dict] = []

    def location(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def problem(self, file: str, reason: str, series_id: str | None = None) -> None:
        self.problems.append({"stage": "catalog", "file": file, "series_id": series_id, "reason": reason})

    def volumes(self, folder: str) -> dict[str, str]:
        """series_id -> location of every volume file in `folder` with a well-formed name."""
        path = f"{self.base}/{folder}"
        if self.fs.get_file_info(path).type != pafs.FileType.Directory:
            self.problem(self.location(folder), f"no {folder}/ folder under the dataset root")
            return {}
        found: dict[str, str] = {}
        infos = self.fs.get_file_info(pafs.FileSelector(path))
        for info in sorted(infos, key=lambda i: i.base_name):
            name = info.base_name
            stem = _volume_stem(name)
            # Hidden files include macOS's "._1_t1.mha" copies, which are not volumes.
            if info.type != pafs.FileType.File or stem is None or name.startswith("."):
                continue
            location = self.location(folder, name)
            reason = _series_id_problem(stem)
            if reason:
                self.problem(location, f"{folder}/{name}: {reason}; file ignored")
            elif stem in found:
                self.problem(location, f"a second {folder[:-1]} for series {stem} (also "
                             f"{found[stem].rsplit('/', 1)[-1]}); this one ignored", stem)
            else:
                found[stem] = location
        return found

    def read_csv(self, name: str) -> pd.DataFrame | None:
        """The CSV as strings ('' where empty), or None with a problem when absent or unreadable."""
        path, location = f"{self.base}/{name}", self.location(name)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            self.problem(location, f"{name} not found under the dataset root")
            return None
        try:
            with self.fs.open_input_stream(path) as stream:
                data = stream.read()
            table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            self.problem(location, f"{name} could not be read as CSV ({type(err).__name__}: {err})")
            return None
        table.columns = [str(c).strip() for c in table.columns]
        return table

    def overview(self) -> dict[str, dict] | None:
        """series_id -> {subset, sex, age, line}, or None when overview.csv is unusable."""
        table = self.read_csv(OVERVIEW)
        if table is None:
            return None
        location = self.location(OVERVIEW)
        headers = {c.lower(): c for c in table.columns}
        if "new_file_name" not in headers:
            self.problem(location, f"{OVERVIEW} has no new_file_name column; subset, sex and age "
                         "unknown for every series")
            return None
        subset_column = headers.get("subset")
        if subset_column is None:
            self.problem(location, f"{OVERVIEW} has no subset column; every patient is split by seed")
        sex_column = next((headers[h] for h in _SEX_HEADERS if h in headers), None)
        age_column = next((headers[h] for h in _AGE_HEADERS if h in headers), None)
        rows: dict[str, dict] = {}
        for line, record in enumerate(table.to_dict("records"), start=2):
            name = record[headers["new_file_name"]].strip()
            series_id, reason = _overview_series_id(name)
            if reason:
                self.problem(location, f"{OVERVIEW} row {line}: {reason}; row ignored")
                continue
            if series_id in rows:
                self.problem(location, f"{OVERVIEW} rows {rows[series_id]['line']} and {line} both "
                             f"describe series {series_id}; row {line} ignored", series_id)
                continue
            subset = record[subset_column].strip().lower() if subset_column else ""
            if subset not in _SUBSET_SPLIT and subset not in _MISSING:
                self.problem(location, f"{OVERVIEW} row {line}: unknown subset {subset!r} (expected "
                             "training or validation); series split by seed", series_id)
            sex = record[sex_column].strip() if sex_column else ""
            age_text = record[age_column].strip() if age_column else ""
            age = _age(age_text)
            if age is None:
                self.problem(location, f"{OVERVIEW} row {line}: age {age_text!r} is not a number of "
                             "years; left empty", series_id)
            rows[series_id] = {
                "subset": subset if subset in _SUBSET_SPLIT else None,
                "sex": None if sex.lower() in _MISSING else sex,
                "age": np.nan if age is None else age,
                "line": line,
            }
        return rows

    def gradings(self) -> pd.DataFrame:
        table = self.read_csv(GRADINGS)
        if table is None:
            return _gradings_frame([])
        location = self.location(GRADINGS)
        missing = [c for c in _GRADINGS_REQUIRED if c not in table.columns]
        if missing:
            self.problem(location, f"{GRADINGS} lacks the column(s) {', '.join(missing)}; no "
                         "gradings kept")
            return _gradings_frame([])
        by_key: dict[tuple[str, int], list[tuple[int, dict]]] = {}
        for line, record in enumerate(table.to_dict("records"), start=2):
            row, reason, blanks = _grading(record)
            where = (f"{GRADINGS} row {line} (patient {record['Patient'].strip()!r}, "
                     f"IVD label {record['IVD label'].strip()!r})")
            if reason:
                self.problem(location, f"{where}: {reason}; row dropped")
                continue
            if blanks:
                self.problem(location, f"{where}: {blanks}; left blank, the row's other grades "
                             "kept")
            by_key.setdefault((row["patient_id"], row["ivd_label"]), []).append((line, row))
        kept = []
        for (patient, ivd_label), entries in by_key.items():
            if len(entries) == 1:
                kept.append(entries[0][1])
                continue
            lines = " and ".join(str(line) for line, _ in entries)
            what = f"{GRADINGS} rows {lines} grade the same disc (patient {patient}, IVD label {ivd_label - 200})"
            differ = [
                f"{spider} {' vs '.join(str(row[name]) for _, row in entries)}"
                for spider, (name, _) in GRADES.items()
                if len({row[name] for _, row in entries}) > 1
            ]
            if differ:
                self.problem(location, f"{what}, differently ({'; '.join(differ)}); all of them dropped")
            else:
                self.problem(location, f"{what}, identically; kept row {entries[0][0]}")
                kept.append(entries[0][1])
        return _gradings_frame(kept)

    def series(self, images, masks, overview, sequence, val_fraction, seed, folds
               ) -> pd.DataFrame:
        known = overview or {}
        series_ids = set(images) | set(masks) | set(known)
        splits = self.patient_splits(series_ids, known, val_fraction, seed)
        fold_of = assign_folds(splits, folds, seed)
        rows = []
        for series_id in sorted(series_ids, key=_series_key):
            patient, _, seq = series_id.partition("_")
            if sequence is not None and seq != sequence:
                continue
            image, mask, meta = images.get(series_id), masks.get(series_id), known.get(series_id)
            if image is None and mask is None:
                self.problem(self.location(OVERVIEW), f"{OVERVIEW} row {meta['line']} names series "
                             f"{series_id}, but neither {IMAGES}/ nor {MASKS}/ holds it; row ignored",
                             series_id)
                continue
            if mask is None:
                self.problem(image, f"image has no mask in {MASKS}/: no reference to train or "
                             "evaluate with; series dropped", series_id)
                continue
            if image is None:
                self.problem(mask, f"mask has no image in {IMAGES}/; series dropped", series_id)
                continue
            if overview is not None and meta is None:
                self.problem(image, f"no {OVERVIEW} row for series {series_id}: subset, sex and age "
                             "unknown; series kept", series_id)
            meta = meta or {"subset": None, "sex": None, "age": np.nan}
            rows.append({
                "series_id": series_id, "patient_id": patient, "sequence": seq,
                "image_uri": image, "mask_uri": mask, "subset": meta["subset"],
                "split": splits[patient], "fold": fold_of[patient], "sex": meta["sex"],
                "age": meta["age"],
            })
        return pd.DataFrame(rows, columns=SERIES_COLUMNS).astype({"age": "float64",
                                                                  "fold": "int64"})

    def patient_splits(self, series_ids, overview, val_fraction, seed) -> dict[str, str]:
        """patient_id -> "train" | "val": from overview.csv's subset, else a seeded draw."""
        subsets: dict[str, set[str]] = {}
        for series_id in sorted(series_ids, key=_series_key):
            patient = series_id.partition("_")[0]
            subset = (overview.get(series_id) or {}).get("subset")
            subsets.setdefault(patient, set()).update([subset] if subset else [])
        patients = sorted(subsets, key=_patient_key)
        splits: dict[str, str] = {}
        for patient in patients:
            if len(subsets[patient]) > 1:
                # A patient in both sets would leak; val keeps every one of its series out of training.
                self.problem(self.location(OVERVIEW), f"{OVERVIEW} puts patient {patient} in both "
                             "training and validation; all its series go to val")
                splits[patient] = "val"
            elif subsets[patient]:
                splits[patient] = _SUBSET_SPLIT[next(iter(subsets[patient]))]
        undecided = [p for p in patients if p not in splits]
        n_val = int(round(val_fraction * len(undecided)))
        order = np.random.default_rng(seed).permutation(len(undecided))
        for rank, index in enumerate(order):
            splits[undecided[index]] = "val" if rank < n_val else "train"
        return splits


def assign_folds(splits: dict[str, str], folds: int, seed: int) -> dict[str, int]:
    """patient_id -> cross-fitting fold in 0..folds-1: patient-grouped (a patient is one key, so
    all its series share a fold), deterministic by `seed`, and stratified by split (val patients
    are dealt out round the folds first, then the train patients, continuing the count so fold
    sizes differ by one at most), so every fold's complement keeps some val patients to select
    on whenever there are at least two."""
    rng = np.random.default_rng([seed, 16])  # a stream of its own: the splits' draw is unchanged
    fold_of: dict[str, int] = {}
    dealt = 0
    for split in ("val", "train"):
        group = sorted((p for p, s in splits.items() if s == split), key=_patient_key)
        for index in rng.permutation(len(group)):
            fold_of[group[index]] = dealt % folds
            dealt += 1
    return fold_of


def _volume_stem(name: str) -> str | None:
    lower = name.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _series_id_problem(series_id: str) -> str | None:
    """Why `series_id` is not `<patient>_<sequence>`; the sequence may hold an underscore itself."""
    patient, _, sequence = series_id.partition("_")
    if not patient or not sequence:
        return f"name {series_id!r} is not <patient>_<sequence> (e.g. 1_t1)"
    if sequence not in SEQUENCES:
        return f"unknown sequence {sequence!r} in {series_id!r} (expected {', '.join(SEQUENCES)})"
    return None


def _overview_series_id(name: str) -> tuple[str | None, str | None]:
    """(series_id, None) for a plain series name, else (None, why): a folder, '..' or an
    absolute path in new_file_name could point outside the dataset root."""
    if not name:
        return None, "empty new_file_name"
    if "/" in name or "\\" in name or ".." in name or ":" in name:
        return None, f"new_file_name {name!r} is a path, not a series name inside the dataset root"
    series_id = _volume_stem(name) or name
    reason = _series_id_problem(series_id)
    return (None, f"new_file_name {reason}") if reason else (series_id, None)


def _age(text: str) -> float | None:
    """Age in years; NaN when empty, None when unreadable."""
    if text.lower() in _MISSING:
        return np.nan
    match = _AGE.match(text)
    return float(match.group(1)) if match else None


def _whole_number(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def _grading(record: dict) -> tuple[dict | None, str | None, str | None]:
    """One gradings row in our names, or why it cannot be used; a missing or invalid grade
    leaves only that grade blank (the third value says which and why)."""
    patient = record["Patient"].strip()
    reasons = ["missing Patient"] if patient.lower() in _MISSING else []
    text = record["IVD label"].strip()
    ivd_label = None if text.lower() in _MISSING else _whole_number(text)
    if ivd_label is None:
        reasons.append("missing IVD label" if text.lower() in _MISSING
                       else f"IVD label {text!r} is not a whole number")
    if reasons:
        return None, "; ".join(reasons), None
    if ivd_label == 0:
        return None, "IVD label 0 names no disc", None
    if not labels.is_disc(200 + ivd_label):
        return None, f"IVD label {ivd_label} is outside 1-{labels.DISC_MAX - 200}", None
    row = {"patient_id": patient, "ivd_label": 200 + ivd_label, "level": labels.level_name(200 + ivd_label)}
    blanks = []
    for column, (name, allowed) in GRADES.items():
        text = record[column].strip()
        value = None if text.lower() in _MISSING else _whole_number(text)
        if text.lower() in _MISSING:
            blanks.append(f"missing {column}")
        elif value is None:
            blanks.append(f"{column} {text!r} is not a whole number")
        elif value not in allowed:
            blanks.append(f"{column} {value} is outside {allowed.start}-{allowed.stop - 1}")
            value = None
        row[name] = value
    return row, None, "; ".join(blanks) or None


def _gradings_frame(rows: list[dict]) -> pd.DataFrame:
    rows = sorted(rows, key=lambda r: (_patient_key(r["patient_id"]), r["ivd_label"]))
    integers = {name: "Int64" for name, _ in GRADES.values()}  # nullable: a blank grade stays blank
    return pd.DataFrame(rows, columns=GRADINGS_COLUMNS).astype({"ivd_label": "int64", **integers})


def _patient_key(patient: str) -> tuple:
    """Numeric-aware: patient 2 before patient 10."""
    return (0, int(patient), "") if patient.isascii() and patient.isdigit() else (1, 0, patient)


def _series_key(series_id: str) -> tuple:
    patient, _, sequence = series_id.partition("_")
    return (_patient_key(patient), SEQUENCES.index(sequence) if sequence in SEQUENCES else len(SEQUENCES))

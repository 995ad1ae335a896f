"""K-fold cross-fitting of the segmenter by patient: which patients each fold's segmenter trains
on, selects its checkpoint on, and segments.

The catalog gives every patient a `fold` (cohort.assign_folds). With K >= 2 folds, fold k's
segmenter never sees the patients of fold k: it trains on the other folds' patients and selects
its checkpoint on an inner validation split of them (their catalog split "val": overview.csv's
subset, else the seeded val_fraction draw; a seeded share of them when that leaves none), and it
alone segments fold k. Every predicted mask is then out-of-sample. K = 1 is the explicit opt-out:
one segmenter trained on split "train", selected on split "val", segmenting every patient, its
own training and selection patients included (`in_sample`).

Plain pandas and numpy: no Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.data.cohort import _patient_key


@dataclass(frozen=True)
class FoldPlan:
    fold: int
    segments: tuple[str, ...]  # patients whose series this fold's segmenter segments
    training: tuple[str, ...]  # patients it trains on
    selection: tuple[str, ...]  # patients that select its checkpoint (inner validation)

    @property
    def in_sample(self) -> bool:
        """Whether it segments a patient it trained or selected on (only with folds = 1)."""
        return bool(set(self.segments) & (set(self.training) | set(self.selection)))


def plan(series: pd.DataFrame, folds: int, val_fraction: float = 0.2, seed: int = 0
         ) -> list[FoldPlan]:
    """One FoldPlan per fold that has series to segment, from the series table's `patient_id`,
    `split` and `fold` columns. ValueError when a fold's segmenter would have no training or no
    selection patient."""
    missing = {"patient_id", "split", "fold"} - set(series.columns)
    if missing:
        raise ValueError(f"series table lacks columns {sorted(missing)}: catalog it again")
    patients = series.drop_duplicates("patient_id").assign(patient_id=lambda f: f.patient_id.astype(str))
    if folds == 1:
        return [FoldPlan(0, _sorted(patients.patient_id),
                         _sorted(patients.patient_id[patients.split == "train"]),
                         _sorted(patients.patient_id[patients.split == "val"]))]
    outside = set(patients.fold.astype(int)) - set(range(folds))
    if outside:
        raise ValueError(f"series table has folds {sorted(outside)} beyond segmentation.folds="
                         f"{folds}: catalog it again with the same folds")
    plans = []
    for fold in sorted(set(patients.fold.astype(int))):
        others = patients[patients.fold != fold]
        selection = list(others.patient_id[others.split == "val"])
        if not selection:  # too few val patients to go round: a seeded share of the others
            pool = _sorted(others.patient_id)
            n = max(1, int(round(val_fraction * len(pool))))
            drawn = np.random.default_rng([seed, 16, fold]).permutation(len(pool))[:n]
            selection = [pool[i] for i in drawn]
        training = [p for p in others.patient_id if p not in set(selection)]
        if not training:
            raise ValueError(f"fold {fold}: no patient left to train its segmenter on "
                             f"({len(others)} outside the fold); use fewer segmentation.folds")
        plans.append(FoldPlan(fold, _sorted(patients.patient_id[patients.fold == fold]),
                              _sorted(training), _sorted(selection)))
    return plans


def fold_series(series: pd.DataFrame, fold: FoldPlan) -> pd.DataFrame:
    """The series fold `fold`'s segmenter learns from, `split` set to "train" (its training
    patients) or "val" (its selection patients)."""
    patient = series.patient_id.astype(str)
    role = pd.Series(np.where(patient.isin(fold.training), "train",
                              np.where(patient.isin(fold.selection), "val", "")),
                     index=series.index)
    return series.assign(split=role)[role != ""].reset_index(drop=True)


def out_of_sample(rows: pd.DataFrame, records: list[dict]) -> pd.Series:
    """Per row (with `patient_id` and `fold`): whether the segmenter that made it, as its run
    recorded (`fold`, `training_patients`, `selection_patients`), neither trained nor selected
    on that patient. A row of a fold without a record is not out-of-sample."""
    seen = {int(r["fold"]): set(map(str, r["training_patients"]))
            | set(map(str, r["selection_patients"])) for r in records}
    return pd.Series([int(fold) in seen and str(patient) not in seen[int(fold)]
                      for patient, fold in zip(rows.patient_id, rows.fold, strict=True)],
                     index=rows.index, dtype=bool)


def record_in_sample(record: dict) -> bool:
    """Whether a segmenter's record (the segtrain stage's) has it segment a patient it trained or
    selected on."""
    seen = set(map(str, record["training_patients"])) | set(map(str, record["selection_patients"]))
    return bool(seen & set(map(str, record.get("segmented_patients", []))))


def _sorted(values) -> tuple[str, ...]:
    return tuple(sorted({str(v) for v in values}, key=_patient_key))

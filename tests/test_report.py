"""The report states every section, with numbers when a stage ran and a reason when it did not."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis import classify, report
from pipeline.data import storage, tables
from tests.test_classify import fast_config, hand_made_cohort


def _series(discs: pd.DataFrame) -> pd.DataFrame:
    first = discs.drop_duplicates("series_id")
    return pd.DataFrame({"series_id": first.series_id, "patient_id": first.patient_id,
                         "sequence": "t1", "image_uri": "", "mask_uri": "",
                         "subset": None, "split": first.split, "sex": None, "age": np.nan})


def _segmentation_metrics(series: pd.DataFrame) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = len(series)
    return pd.DataFrame({
        "series_id": series.series_id, "patient_id": series.patient_id, "split": series.split,
        "dice": rng.normal(0.88, 0.02, n), "iou": rng.normal(0.79, 0.03, n),
        "n_expected": 5, "n_found": [5] * (n - 1) + [4], "n_unmatched": 0,
        "merged_ivd_labels": ["202,203"] + [""] * (n - 1), "split_ivd_labels": "",
        "error": "",
    })


def _sweep(converged: bool) -> pd.DataFrame:
    return pd.DataFrame({
        "bottleneck": [8, 4, 3], "mean_iou": [0.9971, 0.9965, 0.71],
        "iou_ci_low": [0.9968, 0.9960, 0.66], "iou_ci_high": [0.9974, 0.9970, 0.76],
        "epochs": [120, 150, 40], "converged": [converged, converged, False],
        "stopped_early": [False, False, True], "wall_s": [300.0, 320.0, 90.0],
        "chosen": [False, True, False], "checkpoint_path": ["a", "b", "c"],
        "note": ["", "", "stopped early: IoU plateaued"],
    })


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    discs, latents, gradings = hand_made_cohort(n_patients=10, discs_per_patient=4)
    result = classify.run_classification(discs, latents, gradings, fast_config(), out)
    series = _series(discs)
    reconstruction = latents[tables.DISC_KEYS].assign(**{tables.RECONSTRUCTION_IOU: np.where(
        latents.mask_source == "reference", 0.99, 0.95)})
    storage.write_bytes(storage.join(out, "figures", "roc_disc_bulging.png"), b"\x89PNG fake")
    storage.write_bytes(storage.join(out, "figures", "latent_traversal.png"), b"\x89PNG fake")
    for name, frame in ((tables.SERIES, series), (tables.GRADINGS, gradings),
                        (tables.DISCS, discs), (tables.SWEEP, _sweep(True)),
                        (tables.LATENTS, reconstruction),
                        (tables.SEGMENTATION_METRICS, _segmentation_metrics(series)),
                        (tables.ERRORS, tables.errors_frame([
                            {"stage": "catalog", "file": "images/9_t1.mha", "series_id": "9_t1",
                             "reason": "mask shape (20, 200, 300) differs from image shape"}]))):
        storage.write_table(frame, tables.path(out, name))
    return out, result


def test_the_report_contains_every_section_with_numbers(full_run):
    out, result = full_run
    cfg = fast_config()
    path = report.write_report(out, report.load_context(out, cfg))
    assert path == storage.join(out, "report.md")
    text = storage.read_bytes(path).decode()
    assert text.startswith(report.TITLE)
    positions = [text.index(section + "\n") for section in report.SECTIONS]
    assert positions == sorted(positions)
    assert "Not available" not in text
    assert "10 patients, 10 series (sequences: t1)" in text
    assert re.search(r"\| val \| 2 \| 2 \| 0\.\d{3} \(95% CI 0\.\d{3} to 0\.\d{3}\)", text)
    assert "| 10/10 | 0 | 0 |" in text and "| 39/40 | 2 | 0 |" in text  # val, then train
    assert "| L5/S1 (n=10) |" in text and "| height_mean_mm |" in text
    assert "Chosen: bottleneck **4**" in text
    assert "| predicted | train | 32 | 8 | 0.9500 (" in text
    assert "| reference | val | 8 | 2 | 0.9900 (" in text
    assert "reference masks 0.9900 (" in text and "predicted masks 0.9500 (" in text
    assert "### Table 1. Reference masks" in text and "### Table 2. Predicted masks" in text
    assert "| geometric+extras | LightGBM |" in text and "Majority class" in text
    assert "![ROC curves: Disc bulging](figures/roc_disc_bulging.png)" in text
    assert "![Latent traversal (the paper's Figure 2)](figures/latent_traversal.png)" in text
    assert "latent + geometric vs geometric: ΔAUC" in text
    assert "mask shape (20, 200, 300)" in text
    lightgbm = result.comparisons[result.comparisons.model == "lightgbm"]
    latent = lightgbm[lightgbm.feature_set_a.str.contains("latent")]
    includes_zero = ((latent.ci_low <= 0) & (latent.ci_high >= 0)).sum()
    assert text.count("so no evidence that the latent code adds information") == includes_zero
    assert text.count("primary comparison, fixed in advance: latent + geometric vs "
                      "geometric") == (lightgbm.feature_set_b == "geometric").sum()
    assert "level + latent vs level: ΔAUC" in text and "level + geometric vs level" in text
    assert "the spinal level alone: AUC" in text and "best LightGBM features" not in text


def test_missing_stages_are_stated_not_omitted(tmp_path):
    text = storage.read_bytes(report.write_report(str(tmp_path), report.ReportContext())).decode()
    for section in report.SECTIONS:
        assert section in text
    for table in ("series.parquet", "discs.parquet", "gradings.parquet",
                  "segmentation_metrics.parquet", "bottleneck_sweep.parquet",
                  "classification.parquet", "errors.parquet", "latents.parquet"):
        assert f"{table} was not" in text, table
    assert "No figures" in text
    assert "Classification: not run." in text


def test_no_converged_bottleneck_is_reported_loudly(tmp_path):
    context = report.ReportContext(sweep=_sweep(converged=False))
    text = storage.read_bytes(report.write_report(str(tmp_path), context)).decode()
    assert "WARNING: NO BOTTLENECK SIZE CONVERGED" in text
    assert "**no bottleneck converged**" in text


def test_findings_word_the_paired_comparison_from_its_ci(tmp_path):
    def findings(low, high):
        comparisons = pd.DataFrame([{
            "target": "disc_bulging", "mask_source": "reference", "model": "lightgbm",
            "feature_set_a": "latent+geometric", "feature_set_b": "geometric", "metric": "auc",
            "value_a": 0.8, "value_b": 0.77, "difference": 0.03, "ci_low": low,
            "ci_high": high, "n_patients": 20, "n_boot": 500}])
        context = report.ReportContext(comparisons=comparisons)
        return storage.read_bytes(report.write_report(str(tmp_path), context)).decode()

    assert ("ΔAUC 0.03 (95% CI \u22120.01 to 0.07); the CI includes 0, so no evidence that the "
            "latent code adds information") in findings(-0.01, 0.07)
    assert "the CI excludes 0: the latent code adds information" in findings(0.01, 0.05)


def test_package_versions():
    versions = report.package_versions()
    assert set(versions) == {"python", *report.PACKAGES}
    assert versions["numpy"] == np.__version__


def _fold_records(series: pd.DataFrame, folds: int) -> list[dict]:
    """Segtrain records: cross-fitted (folds >= 2, fold = patient number mod folds) or the
    in-sample opt-out (folds = 1: one segmenter trained and selected on every patient)."""
    patients = sorted(set(series.patient_id.astype(str)))
    fold_of = {p: int(p) % folds if folds > 1 else 0 for p in patients}
    records = []
    for fold in range(folds):
        mine = [p for p in patients if fold_of[p] == fold]
        others = [p for p in patients if fold_of[p] != fold] if folds > 1 else patients
        records.append({"fold": fold, "checkpoint": f"ckpt{fold}", "training_patients": others[1:],
                        "selection_patients": others[:1], "segmented_patients": mine,
                        "val_dice": 0.951, "val_iou": 0.9, "epochs": 7})
    return records, fold_of


@pytest.mark.parametrize("folds", [1, 2])
def test_segmentation_is_scored_out_of_sample_beside_the_in_sample_selection(full_run, folds):
    out, _ = full_run
    context = report.load_context(out, fast_config())
    records, fold_of = _fold_records(context.series, folds)
    metrics = context.segmentation_metrics
    context.segmentation_metrics = metrics.assign(fold=metrics.patient_id.astype(str).map(fold_of))
    text = storage.read_bytes(report.write_report(out, report.ReportContext(
        **{**context.__dict__, "segmenters": records}))).decode()
    assert "selection Dice (in-sample)" in text
    assert f"| 0 | {4 if folds == 2 else 9} | 1 | {5 if folds == 2 else 10} | 7 | 0.951 |" in text
    if folds == 2:
        assert re.search(r"\| out-of-sample \| 10 \| 10 \| 0\.\d{3} \(95% CI", text)
        assert "| in-sample |" not in text and "IN-SAMPLE PREDICTED MASKS" not in text
        assert "Segmentation, out-of-sample (10 series of 10 patients" in text
        assert "selection Dice each fold's checkpoint was chosen on: 0.951, 0.951" in text
    else:
        assert "| in-sample | 10 | 10 |" in text and "| out-of-sample |" not in text
        assert text.index("IN-SAMPLE PREDICTED MASKS") > text.index("### Table 2.")
        assert "**no out-of-sample score**" in text


def test_write_report_reads_the_tables_itself_given_a_config(full_run):
    out, _ = full_run
    text = storage.read_bytes(report.write_report(out, fast_config())).decode()
    assert "| geometric+extras | LightGBM |" in text and "preset `demo`" in text

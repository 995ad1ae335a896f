"""Pathology classification: grouped CV without leaks, honest metrics, degenerate inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline import config
from pipeline.analysis import classify
from pipeline.data import labels, storage, tables

_HEIGHT_MM = {201: 8.9, 202: 9.3, 203: 8.2, 204: 7.6, 205: 7.0, 206: 6.5}


def hand_made_cohort(n_patients: int = 16, discs_per_patient: int = 5, seed: int = 0, k: int = 4):
    """(discs, latents, gradings) with the contracts' schemas. A patient's degeneration drives
    bulge_fraction, which drives bulging (so geometric+extras should predict it); low height
    defines narrowing; latents mix AP width, height and sagittal angle with noise."""
    rng = np.random.default_rng(seed)
    discs, gradings = [], []
    for p in range(1, n_patients + 1):
        degeneration = rng.normal()
        for ivd in range(201, 201 + discs_per_patient):
            height = _HEIGHT_MM[ivd] - 0.8 * degeneration + rng.normal(0, 0.6)
            ap = 31 - 0.3 * (ivd - 201) + 1.2 * degeneration + rng.normal(0, 1.5)
            bulge = float(np.clip(0.2 + 0.1 * degeneration + 0.06 * rng.normal(), 0, 1))
            bulging = int(rng.random() < 1 / (1 + np.exp(-(25 * (bulge - 0.2) - 0.3))))
            geometry = {
                "height_mean_mm": height, "ap_width_mm": ap,
                "lateral_width_mm": 45 - 0.8 * (ivd - 201) + rng.normal(0, 2),
                "sagittal_angle_deg": 5 * (ivd - 203) + rng.normal(0, 3),
                "coronal_angle_deg": rng.normal(0, 2), "transverse_angle_deg": rng.normal(0, 3),
                "height_anterior_mm": height + 1 + 2 * (ivd == 201),
                "height_middle_mm": height + 0.3, "height_posterior_mm": height - 1,
                "volume_mm3": height * ap * 31, "wedge_angle_deg": 4 + 6 * (ivd == 201),
            }
            for source in ("reference", "predicted"):
                measured = geometry if source == "reference" else {
                    c: v * (1 + rng.normal(0, 0.04)) for c, v in geometry.items()}
                discs.append({
                    "patient_id": str(p), "series_id": f"{p}_t1", "ivd_label": ivd,
                    "level": labels.level_name(ivd), "mask_source": source,
                    "split": "val" if p % 4 == 0 else "train", **measured,
                    "bulge_fraction": bulge if source == "reference" else np.nan,
                    "bulge_max_mm": 3 * bulge if source == "reference" else np.nan,
                    "match_dice": np.nan if source == "reference" else 0.85,
                    "disc_status": "ok", "cube_fits": True,
                })
            gradings.append({
                "patient_id": str(p), "ivd_label": ivd, "level": labels.level_name(ivd),
                "modic": 0, "up_endplate": 0, "low_endplate": 0, "spondylolisthesis": 0,
                "disc_herniation": 0, "disc_narrowing": int(height < _HEIGHT_MM[ivd] - 0.7),
                "disc_bulging": bulging, "pfirrman_grade": 3,
            })
    discs = pd.DataFrame(discs)
    latents = discs[tables.DISC_KEYS].copy()
    mixes = [-(discs.ap_width_mm - 30) / 2, discs.height_mean_mm - 8,
             -discs.sagittal_angle_deg / 5, pd.Series(np.zeros(len(discs)))]
    for i in range(k):
        latents[f"z{i}"] = mixes[i % 4].to_numpy() + rng.normal(0, 0.4, len(discs))
    latents["bottleneck"] = k
    latents["model_id"] = "hand-made"
    return discs, latents, pd.DataFrame(gradings)


def fast_config(**classify_fields) -> config.Config:
    cfg = config.demo()
    fields = {"folds": 3, "repeats": 1, "bootstrap": 200, "n_estimators": 40,
              "inner_folds": 2, "n_jobs": 1, **classify_fields}
    for name, value in fields.items():
        setattr(cfg.classify, name, value)
    return cfg


def test_grouped_splits_never_put_a_patient_on_both_sides():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20).astype(str), 6)
    y = rng.integers(0, 2, len(groups))
    splits = classify.patient_grouped_splits(y, groups, folds=5, repeats=3, seed=0)
    assert len(splits) == 3
    for repeat in splits:
        tested = np.concatenate([test for _, test in repeat])
        assert sorted(tested) == list(range(len(groups)))
        for train, test in repeat:
            assert not set(groups[train]) & set(groups[test])
    # different seeds give different partitions
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(splits[0], splits[1], strict=True))


def test_a_leaking_split_is_refused():
    groups = np.array(["1", "1", "2", "2", "3", "3"])
    leaking = [(np.array([0, 2, 3]), np.array([1, 4, 5])),
               (np.array([1, 4, 5]), np.array([0, 2, 3]))]
    with pytest.raises(ValueError, match="both the training and the test fold"):
        classify.check_patient_grouped(leaking, groups)
    with pytest.raises(ValueError, match="both the training and the test fold"):
        majority = classify.build_model("majority", fast_config().classify)
        classify.cross_validated_predictions(majority, np.zeros((6, 1)), np.array([0, 1] * 3),
                                             groups, [leaking])


def test_patient_identity_does_not_leak_through_the_grouped_cv():
    """Labels belong to patients, and features fingerprint the patient: a model can only score
    by recognising a patient it has seen. Grouped CV must land at chance; splitting by disc
    (each disc its own group) shows the leak this guards against."""
    rng = np.random.default_rng(0)
    patients, discs = 120, 3
    groups = np.repeat(np.arange(patients).astype(str), discs)
    y = np.repeat(rng.integers(0, 2, patients), discs)
    X = np.repeat(rng.normal(size=(patients, 4)), discs, axis=0)
    X += rng.normal(0, 0.05, X.shape)
    model = classify.build_model("lightgbm", fast_config().classify)

    def auc(split_groups):
        splits = classify.patient_grouped_splits(y, split_groups, 3, 1)
        probability, _, _ = classify.cross_validated_predictions(model, X, y, split_groups,
                                                                 splits)
        return classify.stats.roc_auc(y, probability[0])

    assert abs(auc(groups) - 0.5) < 0.12
    assert auc(np.arange(len(y)).astype(str)) > 0.7


def test_best_f1_threshold_on_a_known_case():
    y = np.array([0, 0, 0, 1, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.8, 0.9])
    # p >= 0.35 catches all three positives with one false alarm: F1 = 6/7, the best cut
    assert classify.best_f1_threshold(y, p) == pytest.approx(0.35)
    assert classify.best_f1_threshold(np.zeros(3), p[:3]) == 0.5


def _grouped_signal(n_patients=60, discs=5, seed=0):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_patients).astype(str), discs)
    X = rng.normal(size=(len(groups), 4))
    y = (X[:, 0] + 0.5 * rng.normal(size=len(groups)) > 0.3).astype(int)
    return X, y, groups


@pytest.mark.parametrize("model", ["lightgbm", "logistic"])
def test_real_signal_gives_a_high_auc_and_shuffled_labels_land_near_chance(model):
    X, y, groups = _grouped_signal()
    cfg = fast_config()
    estimator = classify.build_model(model, cfg.classify)
    splits = classify.patient_grouped_splits(y, groups, 3, 1)
    probability, _, _ = classify.cross_validated_predictions(estimator, X, y, groups, splits)
    assert classify.stats.roc_auc(y, probability[0]) > 0.85

    shuffled = np.random.default_rng(5).permutation(y)
    splits = classify.patient_grouped_splits(shuffled, groups, 3, 1)
    probability, _, _ = classify.cross_validated_predictions(estimator, X, shuffled, groups, splits)
    assert abs(classify.stats.roc_auc(shuffled, probability[0]) - 0.5) < 0.1


def test_run_classification_writes_tables_with_cis_and_baselines(tmp_path):
    discs, latents, gradings = hand_made_cohort()
    out = str(tmp_path)
    result = classify.run_classification(discs, latents, gradings, fast_config(), out)
    table = result.table
    assert list(table.columns) == classify.TABLE_COLUMNS
    assert len(table) == 2 * 2 * (len(classify.FEATURE_SETS) * 2 + 1)
    assert storage.read_table(tables.path(out, tables.CLASSIFICATION)).shape == table.shape
    for name in (classify.PREDICTIONS, classify.COMPARISON, *classify.TABLE_FILES.values()):
        assert storage.exists(tables.path(out, name)), name

    ok = table[table.status == "ok"]
    assert (ok.n_patients == 16).all() and (ok.n_discs == 80).all()
    for metric in classify.METRICS:
        assert (ok[f"{metric}_ci_low"] <= ok[metric] + 1e-12).all()
        assert (ok[metric] <= ok[f"{metric}_ci_high"] + 1e-12).all()
    bulging = ok[(ok.target == "disc_bulging") & (ok.mask_source == "reference")].set_index(
        ["feature_set", "model"])
    extras = bulging.loc[("geometric+extras", "lightgbm")]
    assert extras.auc > 0.75 and extras.auc_ci_low > 0.5 and extras.auc_ci_high > extras.auc_ci_low
    assert bulging.loc[("none", "majority")].auc == 0.5
    # bulge columns only exist for reference masks
    predicted = ok[(ok.mask_source == "predicted") & (ok.feature_set == "geometric+extras")]
    assert not predicted.features.str.contains("bulge").any()
    assert "bulge_fraction" in extras.features

    assert len(result.comparisons) == 2 * 2 * 2 * len(classify.COMPARISONS)
    predictions = storage.read_table(result.predictions_path)  # one file per cell that ran
    assert set(predictions.model) == set(classify.MODELS) and len(predictions) == 80 * len(ok)
    assert "| geometric+extras | LightGBM |" in result.markdown["reference"]
    assert "Majority class" in result.markdown["predicted"]
    assert result.markdown["reference"].startswith("**Table 1. Reference masks.**")


def test_degenerate_targets_and_missing_latents_are_skipped_with_a_reason(tmp_path):
    discs, _, gradings = hand_made_cohort(n_patients=8, discs_per_patient=4)
    gradings["disc_herniation"] = 0
    gradings.loc[gradings.index[:2], "spondylolisthesis"] = 1
    cfg = fast_config(targets=("disc_herniation", "spondylolisthesis", "disc_bulging"))
    table = classify.run_classification(discs, None, gradings, cfg, str(tmp_path)).table
    reasons = table.groupby("target").reason.first()
    assert "single class" in reasons["disc_herniation"]
    assert "fewer than the 3 folds" in reasons["spondylolisthesis"]
    bulging = table[table.target == "disc_bulging"]
    latent_rows = bulging[bulging.feature_set.str.contains("latent")]
    assert (latent_rows.status == "skipped").all()
    assert latent_rows.reason.str.contains("no latent codes").all()
    assert (bulging[bulging.feature_set == "geometric"].status == "ok").all()


def test_merged_predicted_discs_are_excluded_and_said_so(tmp_path):
    discs, latents, gradings = hand_made_cohort(n_patients=8, discs_per_patient=4)
    merged = discs.index[(discs.mask_source == "predicted")][:3]
    discs.loc[merged, "disc_status"] = "merged"
    frame, latent_cols, notes = classify.analysis_frame(discs, latents, gradings, ("disc_bulging",))
    assert latent_cols == ["z0", "z1", "z2", "z3"]
    assert (frame.mask_source == "predicted").sum() == 32 - 3
    assert "3 merged/split/unmatched" in notes["predicted"]


def test_bad_inputs_raise_clear_errors():
    discs, latents, gradings = hand_made_cohort(n_patients=4, discs_per_patient=3)
    with pytest.raises(ValueError, match="pfirrman_grade.*0/1"):
        classify.analysis_frame(discs, latents, gradings, ("pfirrman_grade",))
    with pytest.raises(ValueError, match="missing columns"):
        classify.analysis_frame(discs.drop(columns="ap_width_mm"), latents, gradings,
                                ("disc_bulging",))
    mixed = pd.concat([latents, latents.assign(bottleneck=8, mask_source="predicted")])
    with pytest.raises(ValueError, match="several bottleneck sizes"):
        classify.analysis_frame(discs, mixed, gradings, ("disc_bulging",))


def test_a_mask_source_with_nothing_to_evaluate_is_stated_without_an_empty_grid(tmp_path):
    discs, latents, gradings = hand_made_cohort(n_patients=8, discs_per_patient=4)
    discs = discs[discs.mask_source == "reference"]
    result = classify.run_classification(discs, latents, gradings, fast_config(), str(tmp_path))
    predicted = result.markdown["predicted"]
    assert "Nothing could be evaluated" in predicted and "| Features |" not in predicted
    assert "- Disc bulging: Skipped (all analyses): no graded predicted-mask discs." in predicted


def test_the_level_baseline_reaches_the_level_ordering_and_noise_latents_add_nothing(tmp_path):
    """Labels that depend only on the spinal level: `level` alone should score like the true
    per-level prevalence, and noise latents on top of it should show no gain (CI includes 0)."""
    discs, latents, gradings = hand_made_cohort(n_patients=40)
    rng = np.random.default_rng(11)
    prevalence = {201: 0.7, 202: 0.75, 203: 0.6, 204: 0.4, 205: 0.15}
    truth = gradings.ivd_label.map(prevalence).to_numpy()
    gradings["disc_bulging"] = (rng.random(len(gradings)) < truth).astype(int)
    for column in [c for c in latents.columns if c[:1] == "z" and c[1:].isdigit()]:
        latents[column] = rng.normal(size=len(latents))
    result = classify.run_classification(discs, latents, gradings,
                                         fast_config(targets=("disc_bulging",)), str(tmp_path))
    ok = result.table[(result.table.status == "ok") & (result.table.mask_source == "reference")]
    level = ok[(ok.feature_set == "level") & (ok.model == "lightgbm")].iloc[0]
    ordering_auc = classify.stats.roc_auc(gradings.disc_bulging, truth)
    assert level.features.count(classify.LEVEL_PREFIX) == 5
    assert abs(level.auc - ordering_auc) < 0.05, (level.auc, ordering_auc)
    comparison = result.comparisons.set_index(["mask_source", "model", "feature_set_a"]).loc[
        ("reference", "lightgbm", "level+latent")]
    assert comparison.feature_set_b == "level"
    assert comparison.ci_low <= 0 <= comparison.ci_high


def test_discs_larger_than_the_cube_are_excluded_and_counted():
    discs, latents, gradings = hand_made_cohort(n_patients=8, discs_per_patient=4)
    clipped = discs.index[discs.mask_source == "reference"][:2]
    discs.loc[clipped, "cube_fits"] = False
    frame, _, notes = classify.analysis_frame(discs, latents, gradings, ("disc_bulging",))
    assert (frame.mask_source == "reference").sum() == 32 - 2
    assert "2 discs larger than the shape cube (cube_fits false) excluded" in notes["reference"]
    assert "cube_fits" not in notes["predicted"]


def reference_only_cohort():
    """15 cells (one target, the reference masks): the Ray tests stay quick on two cores."""
    discs, latents, gradings = hand_made_cohort(n_patients=10, discs_per_patient=4)
    return (discs[discs.mask_source == "reference"], latents[latents.mask_source == "reference"],
            gradings)


def test_cells_as_ray_tasks_give_exactly_the_in_process_table(ray_session, tmp_path):
    discs, latents, gradings = reference_only_cohort()
    cfg = fast_config(targets=("disc_bulging",), bootstrap=50, n_estimators=10)
    lines = []
    on_ray = classify.run_classification(discs, latents, gradings, cfg, str(tmp_path / "ray"),
                                         progress=lines.append, on_ray=True)
    local = classify.run_classification(discs, latents, gradings, cfg, str(tmp_path / "local"),
                                        on_ray=False)
    assert (on_ray.table.status == "ok").sum() == 2 * len(classify.FEATURE_SETS) + 1
    pd.testing.assert_frame_equal(on_ray.table, local.table, check_exact=True)
    pd.testing.assert_frame_equal(storage.read_table(on_ray.predictions_path),
                                  storage.read_table(local.predictions_path), check_exact=True)
    pd.testing.assert_frame_equal(on_ray.comparisons, local.comparisons, check_exact=True)
    assert on_ray.markdown == local.markdown
    assert lines[-1].startswith("classification cells: 15/15, ")
    assert len(lines) == 8  # cells 2, 4, ..., 14 and the last: not a line per cell


def test_a_failing_cell_gets_a_reason_and_the_other_cells_are_kept(ray_session, tmp_path):
    discs, latents, gradings = reference_only_cohort()
    # LightGBM refuses a negative learning rate: every LightGBM cell fails, in its Ray task
    cfg = fast_config(targets=("disc_bulging",), bootstrap=50, learning_rate=-0.1)
    result = classify.run_classification(discs, latents, gradings, cfg, str(tmp_path),
                                         on_ray=True)
    table = result.table[result.table.mask_source == "reference"]
    failed = table[table.model == "lightgbm"]
    assert (failed.status == "failed").all()
    assert failed.reason.str.startswith("LightGBMError: Check failed: (learning_rate) > (0.0)").all()
    kept = table[table.model != "lightgbm"]
    assert (kept.status == "ok").all() and kept.auc.notna().all()
    assert set(storage.read_table(result.predictions_path).model) == {"logistic", "majority"}
    assert set(result.comparisons.model) == {"logistic"}
    assert "Failed (all" not in result.markdown["reference"]
    assert "Failed (geometric, geometric+extras, latent" in result.markdown["reference"]

"""Confidence intervals on cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from pipeline import stats


def test_t_interval_matches_scipy_and_covers_the_true_mean():
    rng = np.random.default_rng(0)
    values = rng.normal(0.85, 0.05, size=40)
    estimate = stats.mean_ci(values)
    low, high = scipy_stats.t.interval(0.95, 39, loc=values.mean(), scale=scipy_stats.sem(values))
    assert estimate.value == pytest.approx(values.mean())
    assert (estimate.ci_low, estimate.ci_high) == pytest.approx((low, high))
    assert estimate.ci_low < 0.85 < estimate.ci_high


def test_bootstrap_ci_of_a_mean_covers_the_truth_and_shrinks_like_one_over_sqrt_n():
    rng = np.random.default_rng(1)
    widths = {}
    for n in (100, 1600):
        values = rng.normal(2.0, 1.0, size=n)
        estimate = stats.mean_ci(values, groups=np.arange(n), n_boot=2000, seed=3)
        assert estimate.ci_low < 2.0 < estimate.ci_high
        widths[n] = estimate.ci_high - estimate.ci_low
    # 16 times the data: the interval is about 4 times narrower.
    assert 3.0 < widths[100] / widths[1600] < 5.3


def test_all_equal_values_give_a_zero_width_interval():
    for groups in (None, np.repeat(np.arange(5), 2)):
        estimate = stats.mean_ci(np.full(10, 0.9), groups=groups)
        assert (estimate.value, estimate.ci_low, estimate.ci_high) == pytest.approx((0.9, 0.9, 0.9))


def test_mean_ci_drops_nans_and_handles_tiny_inputs():
    assert stats.mean_ci([np.nan, 1.0, 3.0]).n == 2
    assert math.isnan(stats.mean_ci([]).value)
    single = stats.mean_ci([0.7])
    assert single.value == 0.7 and math.isnan(single.ci_low)


def dense(resamples: stats.GroupResamples) -> np.ndarray:
    """Every resample's weights in one matrix, as the chunks never hold them."""
    return np.vstack(list(resamples.chunks()))


def test_group_weights_resample_whole_patients():
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    weights = dense(stats.GroupResamples.of(groups, n_boot=200, seed=0))
    assert weights.shape == (200, 6)
    # rows of one patient always share a weight, and three patients are drawn each time
    assert np.all(weights[:, 0] == weights[:, 1])
    assert np.all(weights[:, 3] == weights[:, 5])
    assert np.all(weights[:, [0, 2, 3]].sum(axis=1) == 3)


def test_weighted_metrics_equal_the_metrics_of_duplicated_rows():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 30)
    score = np.round(rng.random(30), 1)  # ties on purpose
    predicted = (score > 0.5).astype(int)
    w = rng.integers(0, 3, 30)
    w[:2] = 1  # keep both classes
    y[:2] = [0, 1]
    index = np.repeat(np.arange(30), w)
    assert stats.roc_auc(y, score, w) == pytest.approx(roc_auc_score(y[index], score[index]))
    assert stats.f1_positive(y, predicted, w) == pytest.approx(f1_score(y[index], predicted[index]))
    assert stats.balanced_accuracy(y, predicted, w) == pytest.approx(
        balanced_accuracy_score(y[index], predicted[index]))


def test_fast_resampled_metrics_agree_with_the_per_resample_loop():
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(12), 5)
    y = rng.integers(0, 2, 60)
    score = rng.random(60) + 0.3 * y
    resamples = stats.GroupResamples.of(groups, 50, seed=1)

    def slow_auc(y_true, s, sample_weight=None):  # a metric without a fast path
        return stats.roc_auc(y_true, s, sample_weight)

    fast = stats.bootstrap_ci(y, score, groups, stats.roc_auc, resamples=resamples)
    slow = stats.bootstrap_ci(y, score, groups, slow_auc, resamples=resamples)
    assert (fast.ci_low, fast.ci_high) == pytest.approx((slow.ci_low, slow.ci_high))
    assert fast.n_resamples == 50


def test_undefined_metrics_are_nan_not_zero():
    assert math.isnan(stats.roc_auc([1, 1, 1], [0.2, 0.4, 0.9]))
    assert math.isnan(stats.balanced_accuracy([0, 0], [0, 1]))
    assert math.isnan(stats.f1_positive([0, 0], [0, 0]))


def test_positive_class_f1_is_not_accuracy_on_imbalanced_labels():
    y = np.array([0] * 18 + [1] * 2)
    predicted = np.zeros(20, dtype=int)
    predicted[18] = 1  # one of the two positives found, no false alarm
    accuracy = (predicted == y).mean()
    assert accuracy == pytest.approx(0.95)
    assert stats.f1_positive(y, predicted) == pytest.approx(2 / 3)
    assert stats.balanced_accuracy(y, predicted) == pytest.approx(0.75)


def test_paired_difference_is_zero_for_identical_scores_and_positive_for_a_better_one():
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(40), 4)
    y = rng.integers(0, 2, 160)
    noisy = rng.random(160) + 0.2 * y
    sharp = rng.random(160) + 1.5 * y
    same = stats.paired_bootstrap_difference(y, noisy, noisy, groups, stats.roc_auc, n_boot=300)
    assert (same.value, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)
    better = stats.paired_bootstrap_difference(y, sharp, noisy, groups, stats.roc_auc, n_boot=300)
    assert better.ci_low > 0


def test_estimate_text_reads_like_a_paper():
    text = stats.Estimate(-0.012, -0.05, 0.031, 10).text()
    assert text == "\u22120.01 (95% CI \u22120.05 to 0.03)"


def test_one_patient_gives_no_interval():
    """Resampling a single patient only ever redraws that patient: no CI, said so."""
    estimate = stats.mean_ci([0.8, 0.9, 0.85], groups=["7", "7", "7"])
    assert estimate.value == pytest.approx(0.85) and math.isnan(estimate.ci_low)
    assert estimate.text() == "0.85 (no CI: too few patients or classes)"
    auc = stats.bootstrap_ci([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], ["a"] * 4, stats.roc_auc)
    assert auc.value == 1.0 and math.isnan(auc.ci_high)


def _old_dense_roc(y, score, weights):
    """The former n x m implementation of the weighted ROC, kept as the reference."""
    _, inverse = np.unique(-score, return_inverse=True)
    at = np.zeros((len(y), inverse.max() + 1))
    at[np.arange(len(y)), inverse] = 1.0
    tp = np.cumsum((weights * (y == 1)) @ at, axis=1)
    fp = np.cumsum((weights * (y == 0)) @ at, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = tp / tp[:, -1:], fp / fp[:, -1:]
    zeros = np.zeros((len(weights), 1))
    return np.hstack([zeros, fpr]), np.hstack([zeros, tpr])


def test_auc_equals_sklearn_on_tied_scores_with_and_without_weights():
    rng = np.random.default_rng(5)
    for n in (7, 60, 500):
        y = rng.integers(0, 2, n)
        score = np.round(rng.random(n) + 0.3 * y, 1)  # rounding makes many ties
        w = rng.integers(0, 4, n).astype(float)
        assert stats.roc_auc(y, score) == pytest.approx(roc_auc_score(y, score))
        assert stats.roc_auc(y, score, sample_weight=w) == pytest.approx(
            roc_auc_score(y, score, sample_weight=w))


def test_resampled_auc_and_roc_bands_equal_the_row_by_row_and_dense_answers():
    rng = np.random.default_rng(6)
    n = 150
    y = rng.integers(0, 2, n)
    score = np.round(rng.random(n) + 0.5 * y, 2)
    resamples = stats.GroupResamples.of(np.repeat(np.arange(30), 5), 150, seed=1)
    weights = dense(resamples)
    fast = stats._resampled(stats.roc_auc, y, score, resamples)
    slow = [roc_auc_score(y, score, sample_weight=row) if ((row > 0) & (y == 1)).any()
            and ((row > 0) & (y == 0)).any() else math.nan for row in weights]
    np.testing.assert_allclose(fast, slow, equal_nan=True)

    fpr, tpr = stats.roc_curve(y, score, weights)
    old_fpr, old_tpr = _old_dense_roc(y, score, weights.astype(float))
    np.testing.assert_allclose(fpr, old_fpr, equal_nan=True)
    np.testing.assert_allclose(tpr, old_tpr, equal_nan=True)
    grid = np.linspace(0, 1, 101)
    band = stats.roc_band(y, score, resamples, grid)
    old_band = np.array([np.interp(grid, f, t) for f, t in zip(old_fpr, old_tpr, strict=True)
                         if np.isfinite(t).all()])
    np.testing.assert_allclose(band, old_band)


def test_bootstrap_auc_of_many_discs_holds_one_chunk_of_resamples_at_a_time(monkeypatch):
    import tracemalloc

    monkeypatch.setattr(stats, "CHUNK_BYTES", 2 * 2**20)
    rng = np.random.default_rng(7)
    n, n_boot = 10_000, 600  # all resamples' weights at once: 48 MB
    y = rng.integers(0, 2, n)
    score = rng.random(n) + 0.2 * y
    patients = np.arange(n) // 14  # a spine of 14 discs
    resamples = stats.GroupResamples.of(patients, n_boot, seed=0)
    tracemalloc.start()
    estimate = stats.bootstrap_ci(y, score, patients, stats.roc_auc, resamples=resamples)
    band = stats.roc_band(y, score, resamples, np.linspace(0, 1, 101))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert estimate.ci_low < estimate.value < estimate.ci_high
    assert band.shape == (n_boot, 101)
    assert peak < 8 * stats.CHUNK_BYTES, f"peak {peak / 2**20:.1f} MiB"


def test_a_chunk_of_resamples_fits_the_budget_at_any_cohort_size():
    for n_rows in (1, 14, 1000, 60_000, 10**9):
        per_chunk = stats.resamples_per_chunk(n_rows)
        assert per_chunk >= 1
        assert per_chunk == 1 or per_chunk * n_rows * 8 <= stats.CHUNK_BYTES
        assert (per_chunk + 1) * n_rows * 8 > stats.CHUNK_BYTES  # as many as fit
    resamples = stats.GroupResamples.of(np.arange(60_000) // 14, n_boot=1000)
    sizes = [chunk.shape for chunk in resamples.chunks()]
    assert sum(rows for rows, _ in sizes) == 1000
    assert all(rows * cols * 8 <= stats.CHUNK_BYTES for rows, cols in sizes)
    assert len(sizes) > 1  # 480 MB of weights are never made at once


def test_chunked_bootstrap_equals_the_one_chunk_answer_for_the_same_seed(monkeypatch):
    rng = np.random.default_rng(8)
    patients = np.repeat(np.arange(25), 4)
    y = rng.integers(0, 2, 100)
    score = np.round(rng.random(100) + 0.4 * y, 2)
    other = rng.random(100)
    grid = np.linspace(0, 1, 21)

    def everything():
        resamples = stats.GroupResamples.of(patients, 300, seed=5)
        return (dense(resamples),
                stats.bootstrap_ci(y, score, patients, stats.roc_auc, resamples=resamples),
                stats.bootstrap_ci(y, score > 0.7, patients, stats.f1_positive, n_boot=300),
                stats.paired_bootstrap_difference(y, score, other, patients, stats.roc_auc,
                                                  resamples=resamples),
                stats.mean_ci(score, groups=patients, n_boot=300),
                stats.roc_band(y, score, resamples, grid))

    whole = everything()
    assert stats.resamples_per_chunk(100) >= 300  # one chunk by default here
    monkeypatch.setattr(stats, "CHUNK_BYTES", 7 * 100 * 8)  # 7 resamples a chunk: 43 chunks
    chunked = everything()
    np.testing.assert_array_equal(chunked[0], whole[0])
    assert chunked[1:5] == whole[1:5]
    np.testing.assert_array_equal(chunked[5], whole[5])

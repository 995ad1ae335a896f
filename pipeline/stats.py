"""Confidence intervals that respect how the data were sampled: patients, not discs or series.

The discs of one spine are not independent (they share a scanner, an age, a degeneration
pattern), so every bootstrap here resamples whole groups (patients) with replacement. A resample
is expressed as integer weights (how many times each row's patient was drawn), which any metric
taking `sample_weight` evaluates exactly as it would on the duplicated rows, without copying data.
The metrics below return NaN where a resample makes them undefined (e.g. AUC with one class);
those resamples are dropped and counted. Resamples are evaluated a chunk at a time
(`GroupResamples`), so memory stays bounded however many discs and resamples there are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

Metric = Callable[..., float]  # metric(y_true, y_score, sample_weight=None) -> float
# The float64 weights of one chunk of resamples stay under this. All 1,000 resamples of 60,000
# discs at once would be 480 MB per metric call. A call holds at most about seven chunk-sized
# arrays at once (two chunks, one reordered by score, its sums per distinct score, and for ROC
# bands the curves): under 64 MB, at 17 resamples a chunk for 60,000 discs.
CHUNK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a (1 - alpha) interval; `n` counts the units it was estimated from
    (rows), `n_resamples` the bootstrap resamples where the statistic was defined (0 for
    analytic intervals)."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    level: float = 0.95
    n_resamples: int = 0

    def text(self, digits: int = 2) -> str:
        """e.g. '0.78 (95% CI 0.70 to 0.85)', with typeset minus signs."""
        if not math.isfinite(self.value):
            return "n/a"
        value = fmt_value(self.value, digits)
        if not (math.isfinite(self.ci_low) and math.isfinite(self.ci_high)):
            return f"{value} (no CI: too few patients or classes)"
        return (f"{value} ({round(self.level * 100)}% CI {fmt_value(self.ci_low, digits)} to "
                f"{fmt_value(self.ci_high, digits)})")


def fmt_value(x: float, digits: int = 2) -> str:
    """A number with a typeset minus sign (U+2212), as in a paper."""
    return f"{x:.{digits}f}".replace("-", "\u2212")


def resamples_per_chunk(n_rows: int) -> int:
    """How many resamples' weights over `n_rows` rows fit in CHUNK_BYTES (at least one)."""
    return max(1, CHUNK_BYTES // (8 * max(n_rows, 1)))


@dataclass(frozen=True, eq=False)
class GroupResamples:
    """`n_boot` resamples of the distinct groups with replacement, as weights per row (how many
    times the row's group was drawn), made a chunk at a time from one random stream: the same
    seed gives the same resamples whatever the chunk size, and no call holds all of them."""

    codes: np.ndarray  # each row's group, 0 .. n_groups - 1
    n_groups: int
    n_boot: int
    seed: int = 0

    @classmethod
    def of(cls, groups, n_boot: int, seed: int = 0) -> GroupResamples:
        codes, n_groups = _group_codes(groups)
        return cls(codes, n_groups, n_boot, seed)

    def chunks(self) -> Iterator[np.ndarray]:
        """(resamples, rows) float weights, at most resamples_per_chunk(rows) resamples each."""
        rng = np.random.default_rng(self.seed)
        per_chunk = resamples_per_chunk(len(self.codes))
        for first in range(0, self.n_boot, per_chunk):
            size = min(per_chunk, self.n_boot - first)
            drawn = rng.integers(0, self.n_groups, size=(size, self.n_groups))
            slots = (np.arange(size)[:, None] * self.n_groups + drawn).ravel()
            counts = np.bincount(slots, minlength=size * self.n_groups)
            yield counts.reshape(size, self.n_groups).astype(float)[:, self.codes]


def bootstrap_ci(y_true, y_score, groups, metric: Metric, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, resamples: GroupResamples | None = None) -> Estimate:
    """Percentile CI of `metric(y_true, y_score, sample_weight=w)` over group resamples.

    Pass the same `resamples` to compare several predictions on identical resamples.
    """
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    value = float(metric(y_true, y_score))
    if _n_groups(groups) < 2:
        return Estimate(value, math.nan, math.nan, len(y_true), level)
    r = GroupResamples.of(groups, n_boot, seed) if resamples is None else resamples
    return _percentile_estimate(value, _resampled(metric, y_true, y_score, r), len(y_true), level)


def paired_bootstrap_difference(y_true, score_a, score_b, groups, metric: Metric,
                                n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                                resamples: GroupResamples | None = None) -> Estimate:
    """metric(a) - metric(b) with a CI from the SAME group resamples for both, so the
    patient-to-patient variation they share cancels."""
    y_true, score_a, score_b = np.asarray(y_true), np.asarray(score_a), np.asarray(score_b)
    value = float(metric(y_true, score_a) - metric(y_true, score_b))
    if _n_groups(groups) < 2:
        return Estimate(value, math.nan, math.nan, len(y_true), level)
    r = GroupResamples.of(groups, n_boot, seed) if resamples is None else resamples
    draws = np.concatenate([_on_chunk(metric, y_true, score_a, w)
                            - _on_chunk(metric, y_true, score_b, w) for w in r.chunks()])
    return _percentile_estimate(value, draws, len(y_true), level)


def mean_ci(values, groups=None, level: float = 0.95, n_boot: int = 2000,
            seed: int = 0) -> Estimate:
    """Mean of a vector with a CI, NaNs dropped.

    Without groups: Student-t interval (rows independent). With groups (e.g. patient_id for
    per-series Dice when a patient has several series): percentile bootstrap over groups.
    """
    values = np.asarray(values, dtype=float)
    keep = np.isfinite(values)
    values = values[keep]
    n = len(values)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, level)
    mean = float(values.mean())
    if groups is not None:
        groups = np.asarray(groups)[keep]
        if _n_groups(groups) < 2:  # one patient: its variation says nothing about others
            return Estimate(mean, math.nan, math.nan, n, level)
        resamples = GroupResamples.of(groups, n_boot, seed)
        # summed per row, not w @ values, for the reason given in _confusion_resampled
        draws = np.concatenate([(w * values).sum(axis=1) / w.sum(axis=1)
                                for w in resamples.chunks()])
        return _percentile_estimate(mean, draws, n, level)
    if n == 1:
        return Estimate(mean, math.nan, math.nan, 1, level)
    sem = float(values.std(ddof=1)) / math.sqrt(n)
    if sem == 0.0:
        return Estimate(mean, mean, mean, n, level)
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * sem
    return Estimate(mean, mean - half, mean + half, n, level)


def roc_auc(y_true, y_score, sample_weight=None) -> float:
    """ROC-AUC as the (weighted) probability that a positive outscores a negative, ties
    counting one half; NaN when a class is absent."""
    y, s, w = _prepare(y_true, y_score, sample_weight)
    return float(_roc_auc_resampled(y, s, w[None, :])[0])


def roc_curve(y_true, y_score, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr), each (B, m+1), for every row of `weights` (B, n): cuts between the m distinct
    scores, highest first, starting at (0, 0); rows lacking a class come out NaN."""
    y, s, _ = _prepare(y_true, y_score, None)
    pos_at, neg_at = _weight_by_distinct_score(y, -s, weights)
    return _cumulative_share(neg_at), _cumulative_share(pos_at)


def roc_band(y_true, y_score, resamples: GroupResamples, grid: np.ndarray) -> np.ndarray:
    """Each resample's ROC curve as TPR at the FPR values of `grid`: (resamples with both
    classes, len(grid)). Curves are made a chunk of resamples at a time."""
    rows = [row for weights in resamples.chunks()
            for row in _tpr_on_grid(y_true, y_score, weights, grid)]
    return np.array(rows).reshape(len(rows), len(grid))


def f1_positive(y_true, y_pred, sample_weight=None) -> float:
    """F1 of the positive class (not micro-averaged, which equals accuracy); NaN when there is
    no positive in either the truth or the prediction."""
    tp, fp, fn, _ = _confusion(y_true, y_pred, sample_weight)
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator > 0 else math.nan


def balanced_accuracy(y_true, y_pred, sample_weight=None) -> float:
    """Mean of sensitivity and specificity; NaN when a class is absent."""
    tp, fp, fn, tn = _confusion(y_true, y_pred, sample_weight)
    if tp + fn == 0 or tn + fp == 0:
        return math.nan
    return float(0.5 * (tp / (tp + fn) + tn / (tn + fp)))


def _tpr_on_grid(y_true, y_score, weights: np.ndarray, grid: np.ndarray) -> list[np.ndarray]:
    """roc_band for one chunk: its curves are freed before the next chunk is made."""
    fprs, tprs = roc_curve(y_true, y_score, weights)
    return [np.interp(grid, f, t) for f, t in zip(fprs, tprs, strict=True)
            if np.isfinite(t).all() and np.isfinite(f).all()]


def _roc_auc_resampled(y_true, y_score, weights: np.ndarray) -> np.ndarray:
    y, s, _ = _prepare(y_true, y_score, None)
    pos_at, neg_at = _weight_by_distinct_score(y, s, weights)
    total_pos, total_neg = pos_at.sum(axis=1), neg_at.sum(axis=1)
    # negatives scored below each positive, ties counting one half; in place, as the arrays are
    # chunk-sized (exact: whole and half weights)
    neg_below = np.cumsum(neg_at, axis=1)
    neg_at *= 0.5
    neg_below -= neg_at
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.einsum("ij,ij->i", pos_at, neg_below) / (total_pos * total_neg)
    return np.where((total_pos > 0) & (total_neg > 0), auc, np.nan)


def _weight_by_distinct_score(y: np.ndarray, score: np.ndarray, weights: np.ndarray):
    """The positive and the negative weight at each distinct score, ascending, for every row of
    `weights`: two (rows, m) arrays. One sort (O(n log n)) and O(rows x n) sums; no n x n or
    n x m matrix, whatever the number of discs."""
    order = np.argsort(score, kind="stable")
    ranked = score[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    w = np.asarray(weights, dtype=float)[:, order]
    negative_at = np.add.reduceat(w, starts, axis=1)
    w *= y[order] == 1
    positive_at = np.add.reduceat(w, starts, axis=1)
    negative_at -= positive_at  # exact: the weights are whole numbers
    return positive_at, negative_at


def _cumulative_share(at: np.ndarray) -> np.ndarray:
    """(rows, m+1): 0, then each row's running sum over its total (NaN where the total is 0),
    made in one array: a chunk's ROC curves are its largest arrays."""
    share = np.zeros((len(at), at.shape[1] + 1))
    np.cumsum(at, axis=1, out=share[:, 1:])
    with np.errstate(invalid="ignore", divide="ignore"):
        share[:, 1:] /= share[:, -1:]
    return share


def _confusion_resampled(y_true, y_pred, weights: np.ndarray):
    y, p, _ = _prepare(y_true, y_pred, None)
    p, positive = p.astype(bool), y == 1
    # a sum per row, not a matrix product: BLAS may add a row's terms in an order that depends
    # on how many rows the chunk has, and a chunked CI must equal the unchunked one exactly
    return tuple(weights[:, mask].sum(axis=1) for mask in
                 (positive & p, ~positive & p, positive & ~p, ~positive & ~p))


def _f1_positive_resampled(y_true, y_pred, weights: np.ndarray) -> np.ndarray:
    tp, fp, fn, _ = _confusion_resampled(y_true, y_pred, weights)
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def _balanced_accuracy_resampled(y_true, y_pred, weights: np.ndarray) -> np.ndarray:
    tp, fp, fn, tn = _confusion_resampled(y_true, y_pred, weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = 0.5 * (tp / (tp + fn) + tn / (tn + fp))
    return np.where((tp + fn > 0) & (tn + fp > 0), value, np.nan)


# The built-in metrics evaluated on a chunk of resamples at once (array sums, not a loop).
_RESAMPLED = {
    roc_auc: _roc_auc_resampled,
    f1_positive: _f1_positive_resampled,
    balanced_accuracy: _balanced_accuracy_resampled,
}


def _resampled(metric: Metric, y_true, y_score, resamples: GroupResamples) -> np.ndarray:
    """metric on every resample, a chunk at a time."""
    return np.concatenate([_on_chunk(metric, y_true, y_score, w) for w in resamples.chunks()])


def _on_chunk(metric: Metric, y_true, y_score, weights: np.ndarray) -> np.ndarray:
    """metric on every row of one chunk's weights; any sklearn-style metric works, the
    built-ins fast."""
    fast = _RESAMPLED.get(metric)
    if fast is not None:
        return fast(y_true, y_score, weights)
    return np.array([metric(y_true, y_score, sample_weight=row) for row in weights], dtype=float)


def _confusion(y_true, y_pred, sample_weight):
    y, p, w = _prepare(y_true, y_pred, sample_weight)
    p = p.astype(bool)
    positive = y == 1
    return (w[positive & p].sum(), w[~positive & p].sum(), w[positive & ~p].sum(),
            w[~positive & ~p].sum())


def _prepare(y_true, y_other, sample_weight):
    y = np.asarray(y_true).astype(int)
    other = np.asarray(y_other, dtype=float)
    if y.shape != other.shape:
        raise ValueError(f"y_true has shape {y.shape} but predictions have shape {other.shape}")
    if sample_weight is None:
        w = np.ones(len(y))
    else:
        w = np.asarray(sample_weight, dtype=float)
    return y, other, w


def _group_codes(groups) -> tuple[np.ndarray, int]:
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) == 0:
        raise ValueError("groups must be a non-empty 1-D sequence (one group id per row)")
    _, codes = np.unique(groups.astype(str), return_inverse=True)
    return codes, int(codes.max()) + 1


def _n_groups(groups) -> int:
    return len(np.unique(np.asarray(groups).astype(str)))


def _percentile_estimate(value: float, draws: np.ndarray, n: int, level: float) -> Estimate:
    draws = draws[np.isfinite(draws)]
    if len(draws) == 0 or not math.isfinite(value):
        return Estimate(value, math.nan, math.nan, n, level, len(draws))
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return Estimate(value, float(low), float(high), n, level, len(draws))

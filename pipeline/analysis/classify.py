"""Does disc shape predict pathology? LightGBM on latent and geometric features, honestly validated.

For every target grading x mask source (reference, predicted) x feature set, a LightGBM model
(the paper's depth 3, 200 trees, lr 0.1) is compared with a logistic regression on the same
features and a majority-class predictor. What keeps the numbers honest, against the published
code's pitfalls:
- folds are grouped by patient (a spine's discs never sit on both sides of a split; checked on
  every split) and stratified, and the K-fold is repeated with different seeds;
- F1 is the positive class's, with the decision threshold chosen on inner patient-grouped
  out-of-fold predictions of the training folds only;
- the logistic regression's imputer and scaler are fit inside the folds (a Pipeline);
- 95% CIs come from resampling patients, over the out-of-fold predictions (no refitting).
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.dummy import DummyClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from pipeline import resources, stats, tasks
from pipeline.config import ClassifyConfig, Config
from pipeline.data import storage, tables
from pipeline.progress import counter

MASK_SOURCES = ("reference", "predicted")
# `level` knows only which disc it is (one indicator per spinal level): pathology prevalence rises
# steeply toward L4/L5 and the latents mostly encode level, so every other set is read against it.
FEATURE_SETS = ("level", "latent", "geometric", "geometric+extras", "latent+geometric",
                "level+latent", "level+geometric")
LEVEL_PREFIX = "at_level_"  # indicator columns, e.g. at_level_L4/L5
MODELS = ("lightgbm", "logistic", "majority")
NO_FEATURES = "none"  # the majority-class baseline's feature set
# (a, b): AUC(a) - AUC(b) on the same patient resamples. The first is the primary comparison,
# fixed in advance (the paper's: does the latent code add to geometry?); the others ask whether
# latents or geometry add anything beyond the spinal level.
PRIMARY_COMPARISON = ("latent+geometric", "geometric")
COMPARISONS = (PRIMARY_COMPARISON, ("level+latent", "level"), ("level+geometric", "level"))

PREDICTIONS = "classification_predictions.parquet"
COMPARISON = "classification_comparison.parquet"
TABLE_FILES = {"reference": "table1_reference_masks.md", "predicted": "table2_predicted_masks.md"}
TABLE_TITLES = {"reference": "Table 1. Reference masks", "predicted": "Table 2. Predicted masks"}
MODEL_NAMES = {"lightgbm": "LightGBM", "logistic": "Logistic regression",
               "majority": "Majority class"}

METRICS = ("f1", "auc", "balanced_accuracy")
TABLE_COLUMNS = [
    "target", "mask_source", "feature_set", "model", "status", "reason", "note",
    "n_discs", "n_patients", "n_positive", "prevalence",
    "f1", "f1_ci_low", "f1_ci_high", "auc", "auc_ci_low", "auc_ci_high",
    "balanced_accuracy", "balanced_accuracy_ci_low", "balanced_accuracy_ci_high",
    "threshold_mean", "features", "folds", "repeats", "n_boot",
]
PREDICTION_COLUMNS = [
    "patient_id", "series_id", "ivd_label", "level", "mask_source", "target", "feature_set",
    "model", "y_true", "probability", "predicted",
]
COMPARISON_COLUMNS = [
    "target", "mask_source", "model", "feature_set_a", "feature_set_b", "metric", "value_a",
    "value_b", "difference", "ci_low", "ci_high", "n_patients", "n_boot",
]
_JOIN_KEYS = ["patient_id", "series_id", "ivd_label", "mask_source"]


@dataclass
class ClassificationResult:
    table: pd.DataFrame  # TABLE_COLUMNS: a row per target x source x feature set x model
    predictions_path: str  # PREDICTION_COLUMNS, a file per cell: out-of-fold, repeats averaged
    comparisons: pd.DataFrame  # COMPARISON_COLUMNS: paired AUC differences
    markdown: dict[str, str]  # mask_source -> Table 1 / Table 2 in markdown
    seconds: float


@dataclass
class CellResult:
    """One cell's table row and, when it ran, its out-of-fold score and vote per disc."""

    row: dict
    score: np.ndarray | None = None
    vote: np.ndarray | None = None


class F1ThresholdClassifier(ClassifierMixin, BaseEstimator):
    """A probabilistic classifier whose `predict` uses the threshold that maximises positive-class
    F1 on inner patient-grouped out-of-fold predictions of its own training data, so the test
    fold never influences the threshold. Falls back to 0.5 when the training data are too small
    for an inner split."""

    def __init__(self, estimator, inner_folds: int = 3, random_state: int = 0):
        self.estimator = estimator
        self.inner_folds = inner_folds
        self.random_state = random_state

    def fit(self, X, y, groups=None):
        X, y = np.asarray(X, dtype=float), np.asarray(y).astype(int)
        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        n_splits = min(self.inner_folds, len(np.unique(groups)), int(y.sum()), int((1 - y).sum()))
        if n_splits >= 2:
            splitter = StratifiedGroupKFold(n_splits, shuffle=True, random_state=self.random_state)
            splits = list(splitter.split(X, y, groups))
            check_patient_grouped(splits, groups)
            oof = np.empty(len(y))
            for train, test in splits:
                oof[test] = _fit_proba(self.estimator, X[train], y[train], X[test])
            self.threshold_ = best_f1_threshold(y, oof)
        else:
            self.threshold_ = 0.5
        self.estimator_ = clone(self.estimator).fit(X, y)
        self.classes_ = self.estimator_.classes_
        return self

    def predict_proba(self, X):
        return self.estimator_.predict_proba(np.asarray(X, dtype=float))

    def predict(self, X):
        return (self.predict_proba(X)[:, 1] >= self.threshold_).astype(int)


def best_f1_threshold(y_true, probability) -> float:
    """The threshold t (predict positive where p >= t) maximising positive-class F1, placed
    halfway to the next lower score so it does not sit on a training point; 0.5 without
    positives."""
    y, p = np.asarray(y_true).astype(int), np.asarray(probability, dtype=float)
    positives = y.sum()
    if positives == 0:
        return 0.5
    order = np.argsort(-p, kind="mergesort")
    p_sorted, y_sorted = p[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(1 - y_sorted)
    block_end = np.r_[p_sorted[1:] != p_sorted[:-1], True]  # cut only between distinct scores
    f1 = np.where(block_end, 2 * tp / (tp + fp + positives), -1.0)
    best = int(np.argmax(f1))
    if best == len(p_sorted) - 1:
        return 0.0  # calling every disc positive was best
    return float((p_sorted[best] + p_sorted[best + 1]) / 2)


def build_model(name: str, cfg: ClassifyConfig, seed: int = 0, threads: int = 1):
    """The paper's gradient boosting and the two honest baselines, as sklearn estimators;
    LightGBM runs `threads` threads (the CPUs its process was given)."""
    if name == "lightgbm":
        from lightgbm import LGBMClassifier

        booster = LGBMClassifier(
            n_estimators=cfg.n_estimators, max_depth=cfg.max_depth,
            num_leaves=2 ** cfg.max_depth, learning_rate=cfg.learning_rate,
            min_child_samples=cfg.min_child_samples,
            random_state=seed, n_jobs=threads, verbose=-1,
        )
        return F1ThresholdClassifier(booster, inner_folds=cfg.inner_folds, random_state=seed)
    if name == "logistic":
        logistic = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                                 LogisticRegression(max_iter=2000))
        return F1ThresholdClassifier(logistic, inner_folds=cfg.inner_folds, random_state=seed)
    if name == "majority":
        return DummyClassifier(strategy="most_frequent")
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def patient_grouped_splits(y, groups, folds: int, repeats: int,
                           seed: int = 0) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Stratified K-fold by patient, repeated with seeds seed, seed+1, ...; checked for leaks."""
    y, groups = np.asarray(y).astype(int), np.asarray(groups)
    placeholder = np.zeros((len(y), 1))
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer groups than folds; run_classification already
        # refuses targets with fewer discs of a class than folds.
        warnings.filterwarnings("ignore", message="The least populated class")
        splits = [list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed + r)
                       .split(placeholder, y, groups)) for r in range(repeats)]
    for repeat in splits:
        check_patient_grouped(repeat, groups)
    return splits


def check_patient_grouped(splits, groups) -> None:
    """Raise if a patient's discs sit on both sides of a split, or if the test folds of one
    repetition do not cover every disc exactly once."""
    groups = np.asarray(groups)
    tested = np.zeros(len(groups), dtype=int)
    for train, test in splits:
        shared = np.intersect1d(groups[train], groups[test])
        if len(shared):
            raise ValueError(f"patient {shared[0]!r} has discs in both the training and the "
                             f"test fold ({len(shared)} patients leak)")
        tested[test] += 1
    if not np.all(tested == 1):
        raise ValueError("the test folds do not cover every disc exactly once")


def cross_validated_predictions(estimator, X, y, groups, splits):
    """Out-of-fold (probability, predicted class, threshold per fold) for each repetition:
    arrays of shape (repeats, n) and (repeats, folds)."""
    X, y, groups = np.asarray(X, dtype=float), np.asarray(y).astype(int), np.asarray(groups)
    probability = np.empty((len(splits), len(y)))
    predicted = np.empty((len(splits), len(y)), dtype=int)
    thresholds = np.full((len(splits), max(len(s) for s in splits)), np.nan)
    for r, repeat in enumerate(splits):
        check_patient_grouped(repeat, groups)
        for f, (train, test) in enumerate(repeat):
            if len(np.unique(y[train])) < 2:  # a fold whose training patients share one class
                probability[r, test] = predicted[r, test] = y[train][0]
                continue
            model = clone(estimator)
            if isinstance(model, F1ThresholdClassifier):
                model.fit(X[train], y[train], groups=groups[train])
                thresholds[r, f] = model.threshold_
            else:
                model.fit(X[train], y[train])
            probability[r, test] = _positive_proba(model, X[test])
            predicted[r, test] = model.predict(X[test])
    return probability, predicted, thresholds


def analysis_frame(discs: pd.DataFrame, latents: pd.DataFrame | None, gradings: pd.DataFrame,
                   targets) -> tuple[pd.DataFrame, list[str], dict[str, str]]:
    """One row per usable disc and mask source: keys, geometry, latents (z*, NaN where none),
    target gradings. Returns the frame, the latent column names and, per mask source, a note on
    what was left out and why."""
    discs = _normalise_keys(discs, "discs", tables.DISC_KEYS + tables.GEOMETRY)
    gradings = _normalise_keys(gradings, "gradings", ["patient_id", "ivd_label", *targets])
    for target in targets:
        values = pd.to_numeric(gradings[target], errors="coerce")
        bad = sorted(set(values.dropna().unique()) - {0, 1})
        if bad:
            raise ValueError(f"gradings: target {target!r} must be 0/1 to classify, found values "
                             f"{bad[:5]}; choose a binary grading in classify.targets")
        gradings[target] = values.astype(float)
    duplicated = gradings.duplicated(["patient_id", "ivd_label"])
    if duplicated.any():
        first = gradings[duplicated].iloc[0]
        raise ValueError(f"gradings: {int(duplicated.sum())} duplicate rows, e.g. patient "
                         f"{first.patient_id} disc {first.ivd_label}")
    notes: dict[str, list[str]] = {source: [] for source in MASK_SOURCES}

    if "disc_status" in discs.columns:
        bad_status = discs["disc_status"].fillna("ok") != "ok"
        for source, count in discs[bad_status].groupby("mask_source").size().items():
            notes.setdefault(source, []).append(f"{count} merged/split/unmatched discs excluded")
        discs = discs[~bad_status]
    if "cube_fits" in discs.columns:
        # a clipped cube gives a latent code of a cut-off shape; leaving such a disc out of every
        # feature set keeps all of them compared on the same discs
        clipped = discs["cube_fits"].fillna(True) == False  # noqa: E712  (a nullable column)
        for source, count in discs[clipped].groupby("mask_source").size().items():
            notes.setdefault(source, []).append(
                f"{count} discs larger than the shape cube (cube_fits false) excluded")
        discs = discs[~clipped]
    duplicated = discs.duplicated(_JOIN_KEYS, keep=False)
    for source, count in discs[duplicated].groupby("mask_source").size().items():
        notes.setdefault(source, []).append(f"{count} discs sharing a level in one series excluded")
    discs = discs[~duplicated]

    latent_cols: list[str] = []
    if latents is not None and len(latents):
        latents = _normalise_keys(latents, "latents", _JOIN_KEYS)
        if "bottleneck" in latents.columns and latents["bottleneck"].nunique() > 1:
            sizes = sorted(latents.bottleneck.unique())
            raise ValueError(f"latents: several bottleneck sizes {sizes}; pass the latents of "
                             "one model")
        latent_cols = sorted((c for c in latents.columns if c[:1] == "z" and c[1:].isdigit()),
                             key=lambda c: int(c[1:]))
        if not latent_cols:
            raise ValueError("latents: no z0..z{k-1} columns")
        # Split and unmatched predicted discs share a level within a series; they are the
        # discs already excluded above, so their latents are dropped too, never guessed at.
        latents = latents[~latents.duplicated(_JOIN_KEYS, keep=False)]
        frame = discs.merge(latents[_JOIN_KEYS + latent_cols], on=_JOIN_KEYS, how="left")
        for source in frame.mask_source.unique():
            part = frame[frame.mask_source == source]
            missing = int(part[latent_cols[0]].isna().sum())
            if 0 < missing < len(part):
                notes.setdefault(source, []).append(
                    f"{missing} discs without a latent code excluded")
        has_codes = frame.groupby("mask_source")[latent_cols[0]].transform(
            lambda s: s.notna().any())
        frame = frame[~(has_codes & frame[latent_cols[0]].isna())]
    else:
        frame = discs.copy()
    frame = frame.merge(gradings[["patient_id", "ivd_label", *targets]],
                        on=["patient_id", "ivd_label"], how="left")
    for label in sorted(frame.ivd_label.unique()):
        level = frame.loc[frame.ivd_label == label, "level"].iloc[0]
        frame[f"{LEVEL_PREFIX}{level}"] = (frame.ivd_label == label).astype(float)
    return frame.reset_index(drop=True), latent_cols, {k: "; ".join(v) for k, v in notes.items()}


def feature_sets(frame: pd.DataFrame, latent_cols: list[str]) -> dict[str, list[str] | str]:
    """Columns of each feature set for one mask source's rows, or the reason it cannot be used."""
    has_latents = bool(latent_cols) and frame[latent_cols[0]].notna().any()
    no_latents = "no latent codes for these discs (autoencoder/encode stage not run)"
    bulge = [c for c in tables.BULGE if c in frame.columns and frame[c].notna().any()]
    level = [c for c in frame.columns if c.startswith(LEVEL_PREFIX)]
    geometric = list(tables.PUBLISHED_GEOMETRY)
    return {
        "level": level,
        "latent": latent_cols if has_latents else no_latents,
        "geometric": geometric,
        "geometric+extras": list(tables.GEOMETRY) + bulge,
        "latent+geometric": latent_cols + geometric if has_latents else no_latents,
        "level+latent": level + latent_cols if has_latents else no_latents,
        "level+geometric": level + geometric,
    }


def run_classification(discs: pd.DataFrame, latents: pd.DataFrame | None,
                       gradings: pd.DataFrame, cfg: Config, out: str,
                       progress: Callable[[str], None] | None = None,
                       on_ray: bool | None = None) -> ClassificationResult:
    """Cross-validate every target x mask source x feature set x model and write
    `classification.parquet`, the out-of-fold predictions, the paired comparisons and the
    Table 1 / Table 2 markdown under `<out>/tables/`.

    Cells run as Ray tasks when `on_ray` (default: when Ray is initialized), else in local
    processes; both give the same table. A cell that fails gets a row saying why, and the
    others are kept."""
    started = time.perf_counter()
    c = cfg.classify
    if c.folds < 2 or c.repeats < 1 or c.bootstrap < 1 or c.n_jobs < 1:
        raise ValueError(f"classify: need folds >= 2, repeats >= 1, bootstrap >= 1 and "
                         f"n_jobs >= 1, got folds={c.folds}, repeats={c.repeats}, "
                         f"bootstrap={c.bootstrap}, n_jobs={c.n_jobs}")
    frame, latent_cols, notes = analysis_frame(discs, latents, gradings, c.targets)
    analyses = [_plan(frame[(frame.mask_source == source) & frame[target].notna()]
                      .reset_index(drop=True), target, source, latent_cols,
                      notes.get(source, ""), cfg)
                for target in c.targets for source in MASK_SOURCES]
    jobs = [(i, cell) for i, a in enumerate(analyses) for cell in a.cells
            if not isinstance(cell[2], str)]
    evaluated: list[dict] = [{} for _ in analyses]
    count = counter(progress, "classification cells")
    if on_ray is None:
        on_ray = tasks.ray_is_up()
    cells = _cells_on_ray if on_ray else _cells_in_processes
    for done, (k, result) in enumerate(cells(analyses, jobs, cfg), start=1):
        i, (feature_set, model, _) = jobs[k]
        evaluated[i][(feature_set, model)] = result
        count(done, len(jobs))
    rows, comparisons = [], []
    predictions_path = tables.path(out, PREDICTIONS)
    # One file per cell, written as it is summarised: the per-disc predictions of every cell
    # together are discs x cells rows, more than the driver should hold for a large cohort.
    with storage.staged_dir(predictions_path) as folder:
        files = itertools.count()

        def write(frame: pd.DataFrame) -> None:
            storage.write_table(frame, storage.join(folder, f"{next(files):04d}.parquet"))

        for analysis, results in zip(analyses, evaluated, strict=True):
            r, k = analysis.summarise(results, write)
            rows += r
            comparisons += k
        if next(files) == 0:  # no cell ran: the table still has its columns
            write(pd.DataFrame(columns=PREDICTION_COLUMNS))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    comparison_frame = pd.DataFrame(comparisons, columns=COMPARISON_COLUMNS)
    markdown = markdown_tables(table)
    storage.write_table(table, tables.path(out, tables.CLASSIFICATION))
    storage.write_table(comparison_frame, tables.path(out, COMPARISON))
    for source, text in markdown.items():
        storage.write_bytes(tables.path(out, TABLE_FILES[source]), text.encode())
    return ClassificationResult(table, predictions_path, comparison_frame, markdown,
                                time.perf_counter() - started)


def _cells_in_processes(analyses: list[_Analysis], jobs: list[tuple[int, tuple]],
                        cfg: Config) -> Iterator[tuple[int, CellResult]]:
    """(index into `jobs`, result) for every runnable cell, in `classify.n_jobs` local
    processes. Multithreaded BLAS makes fits on ~150 rows ten times slower (thread start-up per
    call), so each process fits single-threaded."""
    return enumerate(Parallel(n_jobs=cfg.classify.n_jobs, return_as="generator")(
        delayed(_evaluate_cell)(analyses[i], cell, cfg, 1) for i, cell in jobs))


def _cells_on_ray(analyses: list[_Analysis], jobs: list[tuple[int, tuple]],
                  cfg: Config) -> Iterator[tuple[int, CellResult]]:
    """As _cells_in_processes, as each finishes, but one Ray task per cell sized by
    resources.classification_cells; each analysis (its discs, splits and resamples) is put in
    the object store once for all of its cells. A task lost to a crashed worker fails its cell
    only."""
    import ray

    layout = resources.classification_cells(len(jobs))
    task = ray.remote(_evaluate_cell).options(num_cpus=layout.cpus)
    shared = [ray.put(analysis) for analysis in analyses]
    refs = {task.remote(shared[i], cell, cfg, layout.threads): k
            for k, (i, cell) in enumerate(jobs)}
    for ref in tasks.as_completed(list(refs)):
        k = refs[ref]
        try:
            yield k, ray.get(ref)
        except ray.exceptions.RayError as err:
            i, (feature_set, model, _) = jobs[k]
            yield k, CellResult(_failed_row(analyses[i].base, feature_set, model, err))


def _evaluate_cell(analysis: _Analysis, cell: tuple, cfg: Config, threads: int) -> CellResult:
    """One cell of one analysis on `threads` threads: the same function locally and in a task."""
    return analysis.evaluate(*cell, cfg, threads)


@dataclass
class _Analysis:
    """One target on one mask source's discs: the data, the shared splits and bootstrap
    resamples (so every feature set and model is compared on the same ones), and the cells
    (feature set, model, columns or the reason the cell cannot run)."""

    part: pd.DataFrame
    y: np.ndarray
    groups: np.ndarray
    base: dict
    cells: list[tuple[str, str, list[str] | str]]
    splits: list | None
    resamples: stats.GroupResamples | None

    def features(self, columns: list[str]) -> np.ndarray:
        if not columns:  # the majority-class baseline looks at no feature
            return np.zeros((len(self.part), 1))
        return self.part[columns].to_numpy(dtype=float)

    def evaluate(self, feature_set: str, model: str, columns: list[str], cfg: Config,
                 threads: int) -> CellResult:
        """Cross-validate one cell and bootstrap its metrics; an error fails this cell only."""
        try:
            with threadpool_limits(limits=threads):
                fitted = cross_validated_predictions(
                    build_model(model, cfg.classify, seed=cfg.seed, threads=threads),
                    self.features(columns), self.y, self.groups, self.splits)
                return self._scored(feature_set, model, columns, *fitted)
        except Exception as err:  # whatever it was, the reason goes in this cell's row
            return CellResult(_failed_row(self.base, feature_set, model, err))

    def _scored(self, feature_set, model, columns, probability, predicted,
                thresholds) -> CellResult:
        """The cell's row with CIs, from out-of-fold predictions averaged over repeats."""
        score = probability.mean(axis=0)
        vote = (predicted.mean(axis=0) >= 0.5).astype(int)
        row = {**self.base, "feature_set": feature_set, "model": model, "status": "ok",
               "reason": "", "features": ",".join(columns),
               "threshold_mean": float(np.nanmean(thresholds))
               if np.isfinite(thresholds).any() else math.nan}
        for metric, function, values in (("f1", stats.f1_positive, vote),
                                         ("auc", stats.roc_auc, score),
                                         ("balanced_accuracy", stats.balanced_accuracy, vote)):
            estimate = stats.bootstrap_ci(self.y, values, self.groups, function,
                                          resamples=self.resamples)
            row.update({metric: estimate.value, f"{metric}_ci_low": estimate.ci_low,
                        f"{metric}_ci_high": estimate.ci_high})
        return CellResult(row, score, vote)

    def summarise(self, evaluated: dict[tuple[str, str], CellResult],
                  write_predictions: Callable[[pd.DataFrame], None]):
        """Table rows and paired comparisons; each cell's per-disc out-of-fold predictions go
        to `write_predictions`."""
        y, groups, r, base = self.y, self.groups, self.resamples, self.base
        rows, scores = [], {}
        for feature_set, model, columns in self.cells:
            if isinstance(columns, str):
                rows.append(_skipped_row(base, feature_set, model, columns))
                continue
            result = evaluated[(feature_set, model)]
            rows.append(result.row)
            if result.score is None:
                continue
            scores[(feature_set, model)] = result.score
            write_predictions(pd.DataFrame({
                **{k: self.part[k].to_numpy()
                   for k in ["patient_id", "series_id", "ivd_label", "level"]},
                "mask_source": base["mask_source"], "target": base["target"],
                "feature_set": feature_set, "model": model, "y_true": y,
                "probability": result.score, "predicted": result.vote,
            }))
        comparisons = []
        for a, b in COMPARISONS:
            for model in ("lightgbm", "logistic"):
                if (a, model) not in scores or (b, model) not in scores:
                    continue
                diff = stats.paired_bootstrap_difference(y, scores[(a, model)], scores[(b, model)],
                                                         groups, stats.roc_auc, resamples=r)
                comparisons.append({
                    "target": base["target"], "mask_source": base["mask_source"],
                    "model": model, "feature_set_a": a, "feature_set_b": b, "metric": "auc",
                    "value_a": stats.roc_auc(y, scores[(a, model)]),
                    "value_b": stats.roc_auc(y, scores[(b, model)]),
                    "difference": diff.value, "ci_low": diff.ci_low, "ci_high": diff.ci_high,
                    "n_patients": base["n_patients"], "n_boot": diff.n_resamples,
                })
        return rows, comparisons


def _plan(part: pd.DataFrame, target: str, source: str, latent_cols: list[str], note: str,
          cfg: Config) -> _Analysis:
    c = cfg.classify
    y = part[target].to_numpy().astype(int)
    groups = part["patient_id"].to_numpy()
    base = {"target": target, "mask_source": source, "note": note, "n_discs": len(part),
            "n_patients": int(part.patient_id.nunique()), "n_positive": int(y.sum()),
            "prevalence": float(y.mean()) if len(y) else math.nan, "folds": c.folds,
            "repeats": c.repeats, "n_boot": c.bootstrap}
    sets = {**feature_sets(part, latent_cols), NO_FEATURES: []}
    grid = [(fs, m) for fs in FEATURE_SETS for m in MODELS if m != "majority"]
    grid.append((NO_FEATURES, "majority"))
    reason = _unusable(y, groups, c.folds, source)
    if reason:
        return _Analysis(part, y, groups, base, [(fs, m, reason) for fs, m in grid], None, None)
    return _Analysis(part, y, groups, base, [(fs, m, sets[fs]) for fs, m in grid],
                     patient_grouped_splits(y, groups, c.folds, c.repeats, seed=cfg.seed),
                     stats.GroupResamples.of(groups, c.bootstrap, seed=cfg.seed))


def _unusable(y: np.ndarray, groups: np.ndarray, folds: int, source: str) -> str:
    if len(y) == 0:
        return f"no graded {source}-mask discs"
    n_patients = len(np.unique(groups))
    if n_patients < folds:
        return f"only {n_patients} patients, fewer than the {folds} folds"
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        return f"a single class: all {len(y)} discs are {'positive' if n_neg == 0 else 'negative'}"
    if min(n_pos, n_neg) < folds:
        return (f"only {min(n_pos, n_neg)} {'positive' if n_pos < n_neg else 'negative'} discs, "
                f"fewer than the {folds} folds")
    pos_patients = len(np.unique(groups[y == 1]))
    if pos_patients < 2:
        return "all positive discs come from one patient"
    return ""


def _skipped_row(base: dict, feature_set: str, model: str, reason: str) -> dict:
    return {**base, "feature_set": feature_set, "model": model, "status": "skipped",
            "reason": reason, "features": ""}


def _failed_row(base: dict, feature_set: str, model: str, err: BaseException) -> dict:
    """A cell that raised: the error's type and the first line of its message (a Ray error's
    message runs to a traceback)."""
    message = str(err).strip().splitlines()
    reason = type(err).__name__ + (f": {message[0][:300]}" if message else "")
    return {**base, "feature_set": feature_set, "model": model, "status": "failed",
            "reason": reason, "features": ""}


def _fit_proba(estimator, X_train, y_train, X_test) -> np.ndarray:
    """Positive-class probability; a training set with one class predicts that class."""
    if len(np.unique(y_train)) < 2:
        return np.full(len(X_test), float(y_train[0]))
    return _positive_proba(clone(estimator).fit(X_train, y_train), X_test)


def _positive_proba(model, X) -> np.ndarray:
    proba = model.predict_proba(X)
    classes = list(model.classes_)
    return proba[:, classes.index(1)] if 1 in classes else np.zeros(len(X))


def _normalise_keys(frame: pd.DataFrame, name: str, required: list[str]) -> pd.DataFrame:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing columns {missing}")
    frame = frame.drop(columns=[tables.CUBE], errors="ignore").copy()
    for key in ("patient_id", "series_id", "mask_source", "level"):
        if key in frame.columns:
            frame[key] = frame[key].astype(str)
    frame["ivd_label"] = pd.to_numeric(frame["ivd_label"], errors="raise").astype(int)
    return frame


# Markdown -------------------------------------------------------------------------------------

def markdown_tables(table: pd.DataFrame) -> dict[str, str]:
    """Table 1 (reference masks) and Table 2 (predicted masks) laid out like the paper's, with
    the baselines, each target's cohort line and any skipped analysis stated."""
    return {source: _markdown_table(table[table.mask_source == source], source)
            for source in MASK_SOURCES if (table.mask_source == source).any()}


def comparison_markdown(comparisons: pd.DataFrame) -> str:
    if comparisons.empty:
        return "_No paired comparison: a feature set it needs was not evaluated._\n"
    lines = ["| Target | Masks | Model | AUC (A) | AUC (B) | ΔAUC A − B (95% CI) |",
             "|---|---|---|---|---|---|"]
    for row in comparisons.itertuples():
        diff = stats.Estimate(row.difference, row.ci_low, row.ci_high, 0)
        lines.append(f"| {target_name(row.target)} | {row.mask_source} | "
                     f"{MODEL_NAMES[row.model]} | {row.value_a:.2f} ({row.feature_set_a}) | "
                     f"{row.value_b:.2f} ({row.feature_set_b}) | {diff.text()} |")
    return "\n".join(lines) + "\n"


def target_name(target: str) -> str:
    return target.replace("_", " ").capitalize()


def _markdown_table(part: pd.DataFrame, source: str) -> str:
    targets = list(dict.fromkeys(part.target))
    first = part.iloc[0]
    repeats = int(first.repeats)
    repeated = f"repeated {repeats} times" if repeats > 1 else "run once"
    header = ["Features", "Model"]
    for target in targets:
        name = target_name(target)
        header += [f"{name} F1", f"{name} AUC", f"{name} bal. acc."]
    lines = [
        f"**{TABLE_TITLES[source]}.** Positive-class F1, ROC-AUC and balanced accuracy with 95% "
        f"CIs ({int(first.n_boot)} bootstrap resamples of patients) from out-of-fold predictions "
        f"of patient-grouped, stratified {int(first.folds)}-fold CV {repeated}; the F1 "
        "threshold is chosen inside the training folds.",
        "",
    ]
    if (part.status == "ok").any():
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        order = [(fs, m) for fs in FEATURE_SETS for m in ("lightgbm", "logistic")]
        order.append((NO_FEATURES, "majority"))
        for feature_set, model in order:
            cells = ["—" if feature_set == NO_FEATURES else feature_set, MODEL_NAMES[model]]
            for target in targets:
                hit = part[(part.target == target) & (part.feature_set == feature_set)
                           & (part.model == model)]
                if hit.empty or hit.iloc[0].status != "ok":
                    cells += ["—"] * 3
                    continue
                cells += [_cell(hit.iloc[0], metric) for metric in METRICS]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    else:
        lines[0] += " **Nothing could be evaluated on these masks:**"
    for target in targets:
        rows = part[part.target == target]
        row = rows.iloc[0]
        sentences = []
        if row.n_discs:
            all_positive_f1 = 2 * row.prevalence / (1 + row.prevalence)
            sentences.append(
                f"{int(row.n_discs)} discs from {int(row.n_patients)} patients, "
                f"{int(row.n_positive)} positive (prevalence {row.prevalence:.2f}); calling every "
                f"disc positive would give F1 {all_positive_f1:.2f}.")
        for status in ("skipped", "failed"):
            for reason, group in rows[rows.status == status].groupby("reason", sort=False):
                what = ("all analyses" if len(group) == len(rows)
                        else ", ".join(sorted(set(group.feature_set))))
                sentences.append(f"{status.capitalize()} ({what}): {reason}.")
        if isinstance(row.note, str) and row.note:
            sentences.append(f"Note: {row.note}.")
        lines.append(f"- {target_name(target)}: " + " ".join(sentences))
    return "\n".join(lines) + "\n"


def _cell(row, metric: str) -> str:
    value, low, high = row[metric], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
    if not np.isfinite(value):
        return "n/a"
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{value:.2f}"
    return f"{value:.2f} ({low:.2f}–{high:.2f})"

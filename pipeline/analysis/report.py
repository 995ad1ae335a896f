"""`report.md`, the run's findings in one readable page, and `manifest.json`, how they were made.

Every section is always present: a stage that did not run is said so in its section, never
silently left out, so a reader can tell "no effect" from "not measured". Numbers carry 95% CIs
that resample patients; the findings are worded from those CIs (an interval that includes the
null is reported as no evidence, not as an effect).
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from pipeline import stats
from pipeline.analysis import classify
from pipeline.config import Config
from pipeline.data import labels, storage, tables
from pipeline.segmentation import folds as crossfit

TITLE = "# Lumbar disc geometry, latent shape codes and pathology: run report"
SECTIONS = (
    "## Cohort",
    "## Segmentation",
    "## Geometry by spinal level (reference masks)",
    "## Bottleneck sweep (autoencoder)",
    "## Pathology classification",
    "## Figures",
    "## Findings",
    "## Quarantined inputs",
)
FIGURE_TITLES = {
    "latent_traversal.png": "Latent traversal (the paper's Figure 2)",
    "latents_by_level.png": "Latent codes by spinal level",
    "latent_geometry_correlation.png": "Latents vs geometric measurements",
    "segmentation_examples.png": "Segmentation examples",
}
PACKAGES = ("ray", "torch", "monai", "lightgbm", "scikit-learn", "numpy", "SimpleITK")


@dataclass
class ReportContext:
    """What the report is written from; None means the stage that makes it did not run."""

    series: pd.DataFrame | None = None
    gradings: pd.DataFrame | None = None
    discs: pd.DataFrame | None = None  # geometry rows (the cube column is not needed)
    segmentation_metrics: pd.DataFrame | None = None
    sweep: pd.DataFrame | None = None
    latents: pd.DataFrame | None = None  # keys + reconstruction_iou (the codes are not needed)
    classification: pd.DataFrame | None = None
    comparisons: pd.DataFrame | None = None
    errors: pd.DataFrame | None = None
    figures: list[str] = field(default_factory=list)  # paths or URIs under <out>/figures/
    targets: tuple[str, ...] = ("disc_bulging", "disc_narrowing")
    iou_target: float = 0.995  # the autoencoder's convergence threshold (mean IoU)
    preset: str = ""
    # the segtrain stage's per-fold records (fold, checkpoint, training_patients,
    # selection_patients, segmented_patients, val_dice, val_iou, epochs); None: not known
    segmenters: list[dict] | None = None


def load_context(out: str, cfg: Config | None = None, segtrain: dict | None = None
                 ) -> ReportContext:
    """A context from whatever tables and figures exist under `out`, and the segtrain stage's
    results (its per-fold records)."""
    disc_columns = tables.DISC_KEYS + tables.GEOMETRY + tables.BULGE + ["disc_status"]
    context = ReportContext(
        series=tables.read_if_present(out, tables.SERIES),
        gradings=tables.read_if_present(out, tables.GRADINGS),
        discs=tables.read_if_present(out, tables.DISCS, columns=disc_columns),
        segmentation_metrics=tables.read_if_present(out, tables.SEGMENTATION_METRICS),
        sweep=tables.read_if_present(out, tables.SWEEP),
        latents=tables.read_if_present(out, tables.LATENTS,
                                columns=tables.DISC_KEYS + [tables.RECONSTRUCTION_IOU]),
        classification=tables.read_if_present(out, tables.CLASSIFICATION),
        comparisons=tables.read_if_present(out, classify.COMPARISON),
        errors=tables.read_if_present(out, tables.ERRORS),
        figures=list_figures(out),
    )
    if cfg is not None:
        context.targets = tuple(cfg.classify.targets)
        context.iou_target = cfg.autoencoder.iou_target
        context.preset = cfg.preset
    if segtrain and segtrain.get("folds"):
        context.segmenters = list(segtrain["folds"])
    return context


def list_figures(out: str) -> list[str]:
    folder = storage.join(out, "figures")
    if not storage.exists(folder):
        return []
    fs, path = storage.filesystem(folder)
    names = sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path))
                   if info.type == pafs.FileType.File and info.base_name.endswith(".png"))
    return [storage.join(folder, name) for name in names]


def write_report(out: str, context: ReportContext | Config, segtrain: dict | None = None) -> str:
    """Write `<out>/report.md` and return its location; given a Config, the context is read
    from the tables under `out` and `segtrain` (load_context)."""
    if isinstance(context, Config):
        context = load_context(out, context, segtrain)
    parts = [
        TITLE,
        f"_Written {time.strftime('%Y-%m-%d %H:%M')}"
        + (f", preset `{context.preset}`" if context.preset else "") + "._",
        SECTIONS[0], _cohort(context),
        SECTIONS[1], _segmentation(context.segmentation_metrics, context.segmenters),
        SECTIONS[2], _geometry(context.discs),
        SECTIONS[3], _sweep(context.sweep, context.iou_target),
        _reconstruction(context.latents),
        SECTIONS[4], _classification(context.classification, context.comparisons,
                                     context.segmenters),
        SECTIONS[5], _figures(context.figures),
        SECTIONS[6], _findings(context),
        SECTIONS[7], _quarantined(context.errors),
    ]
    location = storage.join(out, "report.md")
    storage.write_bytes(location, ("\n\n".join(p.strip() for p in parts) + "\n").encode())
    return location


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide the results (None when absent), and
    Python's, read from package metadata without importing them."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# Sections --------------------------------------------------------------------------------------

def _not_run(what: str, stage: str) -> str:
    return f"_Not available: {what} was not produced (the {stage} stage did not run)._"


def _cohort(c: ReportContext) -> str:
    lines = []
    if c.series is None:
        lines.append(_not_run("series.parquet", "catalog"))
    else:
        series = c.series
        sequences = (f" (sequences: {', '.join(sorted(series.sequence.astype(str).unique()))})"
                     if "sequence" in series.columns else "")
        lines.append(f"{series.patient_id.nunique()} patients, {len(series)} series{sequences}.")
        if "split" in series.columns:
            rows = [[str(split), str(g.patient_id.nunique()), str(len(g))]
                    for split, g in series.groupby(series.split.fillna("none").astype(str))]
            lines += ["", "Patient-grouped split:", "",
                      _table(["split", "patients", "series"], rows)]
    lines.append("")
    if c.discs is None:
        lines.append(_not_run("discs.parquet", "extract"))
    else:
        rows = [[str(source), str(len(g)), str(g.series_id.nunique())]
                for source, g in c.discs.groupby("mask_source")]
        lines += ["Discs isolated per mask source:", "",
                  _table(["mask source", "discs", "series"], rows)]
    lines.append("")
    if c.gradings is None:
        lines.append(_not_run("gradings.parquet", "catalog"))
    else:
        lines += ["Prevalence of each classification target among graded discs:", "",
                  _prevalence(c.gradings, c.series, c.targets)]
    return "\n".join(lines)


def _prevalence(gradings: pd.DataFrame, series: pd.DataFrame | None, targets) -> str:
    gradings = gradings.assign(patient_id=gradings.patient_id.astype(str))
    splits = []
    if series is not None and "split" in series.columns:
        split_of = series.drop_duplicates("patient_id").set_index(
            series.drop_duplicates("patient_id").patient_id.astype(str)).split
        gradings = gradings.assign(split=gradings.patient_id.map(split_of))
        splits = sorted(gradings.split.dropna().astype(str).unique())
    rows = []
    for target in targets:
        if target not in gradings.columns:
            rows.append([classify.target_name(target)] + ["not graded"] * (1 + len(splits)))
            continue
        cells = [classify.target_name(target)]
        for subset in [gradings] + [gradings[gradings.split == s] for s in splits]:
            values = pd.to_numeric(subset[target], errors="coerce").dropna()
            cells.append(f"{int(values.sum())}/{len(values)} ({values.mean():.2f})"
                         if len(values) else "—")
        rows.append(cells)
    return _table(["target", "all: positive/graded (prevalence)", *splits], rows)


def _sample_label(scored: pd.DataFrame, segmenters: list[dict] | None) -> pd.Series:
    """Per scored series, what its score measures: out-of-sample (its segmenter, by that
    segmenter's own record, neither trained nor selected on its patient) or in-sample; without
    records, its split as before cross-fitting."""
    if segmenters is not None and {"fold", "patient_id"} <= set(scored.columns):
        outside = crossfit.out_of_sample(scored, segmenters)
        return pd.Series(np.where(outside, "out-of-sample", "in-sample"), index=scored.index)
    return scored.get("split", pd.Series("all", index=scored.index)).fillna("none").astype(str)


def _segmentation(metrics: pd.DataFrame | None, segmenters: list[dict] | None = None) -> str:
    if metrics is None:
        return _not_run("segmentation_metrics.parquet", "extract")
    failed = metrics.get("error", pd.Series("", index=metrics.index)).fillna("").astype(str) != ""
    scored = metrics[~failed]
    rows = []
    for label, group in scored.groupby(_sample_label(scored, segmenters)):
        groups = group.patient_id if "patient_id" in group.columns else None
        dice = stats.mean_ci(group.dice, groups=groups)
        iou = stats.mean_ci(group.iou, groups=groups)
        rows.append([label, str(len(group)),
                     str(group.patient_id.nunique()) if groups is not None else "—",
                     dice.text(3), iou.text(3),
                     f"{int(group.n_found.sum())}/{int(group.n_expected.sum())}"
                     if {"n_found", "n_expected"} <= set(group.columns) else "—",
                     str(_count(group, "merged_ivd_labels", "merged")),
                     str(_count(group, "split_ivd_labels", "split_discs"))])
    rows.sort(key=lambda r: r[0] not in ("out-of-sample", "val"))
    text = [_table(["scored on", "series", "patients", "Dice, mean (95% CI)",
                    "IoU, mean (95% CI)", "discs found/expected", "merged discs",
                    "split discs"], rows), ""]
    if segmenters is not None:
        text.append(f"{len(segmenters)}-fold cross-fitting by patient: each series is segmented "
                    "by the segmenter of its patient's fold, trained and selected without that "
                    "fold. Out-of-sample means that segmenter, by its own record, neither "
                    "trained on nor selected its checkpoint on the patient: the score a new "
                    "patient would get. In-sample rows (if any) are not held-out scores.")
        text += ["", "For comparison, the **in-sample** selection score: the Dice on the inner "
                 "validation patients that chose each fold's checkpoint (early stopping and "
                 "best-checkpoint selection), optimistic because those patients picked it:", "",
                 _table(["fold", "trained on (patients)", "selected on (patients)",
                         "segments (patients)", "epochs", "selection Dice (in-sample)",
                         "selection IoU (in-sample)"],
                        [[str(f["fold"]), str(len(f["training_patients"])),
                          str(len(f["selection_patients"])),
                          str(len(f.get("segmented_patients", []))), str(f["epochs"]),
                          f"{f['val_dice']:.3f}", f"{f['val_iou']:.3f}"] for f in segmenters]),
                 ""]
    text.append("Per-series Dice and IoU of the binary disc mask on the whole volume (sliding "
                "window, no crop) against the reference mask; CIs resample patients. A merged "
                "disc is one predicted component covering several reference discs; a split disc "
                "is one reference disc broken into several components.")
    if failed.any():
        text.append(f"\n{int(failed.sum())} series could not be scored (see Quarantined inputs).")
    return "\n".join(text)


def in_sample_warning(segmenters: list[dict] | None) -> str:
    """A warning for tables built on predicted masks that are not all out-of-sample."""
    if segmenters is None or not any(crossfit.record_in_sample(f) for f in segmenters):
        return ""
    return ("> **IN-SAMPLE PREDICTED MASKS** (segmentation.folds=1): the segmenter segmented "
            "patients it trained or selected on, so its masks are near-copies of the reference "
            "for them and the predicted-mask numbers are optimistic. Use segmentation.folds >= 2 "
            "for out-of-sample masks.")


def _count(frame: pd.DataFrame, *columns: str) -> int:
    """Number of merged/split discs from a comma-separated label column, a list column or a
    count column, whichever the table has."""
    for column in columns:
        if column not in frame.columns:
            continue
        total = 0
        for value in frame[column]:
            if isinstance(value, str):
                total += len([v for v in value.split(",") if v.strip()])
            elif isinstance(value, (list, tuple, np.ndarray)):
                total += len(value)
            elif value is not None and not pd.isna(value):
                total += int(value)
        return total
    return 0


def _geometry(discs: pd.DataFrame | None) -> str:
    if discs is None:
        return _not_run("discs.parquet", "extract")
    reference = discs[discs.mask_source == "reference"]
    if reference.empty:
        return "_No reference-mask discs were measured._"
    if "disc_status" in reference.columns:
        reference = reference[reference.disc_status.fillna("ok") == "ok"]
    columns = [c for c in tables.GEOMETRY + tables.BULGE
               if c in reference.columns and reference[c].notna().any()]
    levels = sorted(reference.ivd_label.astype(int).unique(), reverse=True)  # cranial first
    counts = reference.ivd_label.value_counts()
    header = ["measure"] + [f"{labels.level_name(label)} (n={int(counts[label])})"
                            for label in levels]
    rows = []
    for column in columns:
        cells = [column]
        for label in levels:
            values = reference.loc[reference.ivd_label == label, column].dropna()
            if values.empty:
                cells.append("—")
                continue
            q1, median, q3 = np.percentile(values, [25, 50, 75])
            cells.append(f"{median:.1f} [{q1:.1f}, {q3:.1f}]")
        rows.append(cells)
    return (_table(header, rows) + "\n\nMedian [interquartile range] per level, cranial to "
            "caudal (L5/S1 last); units in the measure names.")


def _sweep(sweep: pd.DataFrame | None, iou_target: float) -> str:
    if sweep is None or sweep.empty:
        return _not_run("bottleneck_sweep.parquet", "sweep")
    rows = []
    for row in sweep.sort_values("bottleneck", ascending=False).itertuples():
        iou = stats.Estimate(row.mean_iou, row.iou_ci_low, row.iou_ci_high, 0)
        rows.append([f"**{int(row.bottleneck)}**" if row.chosen else str(int(row.bottleneck)),
                     iou.text(4), _integer(row.epochs), "yes" if row.converged else "no",
                     "yes" if row.stopped_early else "no", f"{row.wall_s:.0f}",
                     "**chosen**" if row.chosen else "", str(row.note or "")])
    text = [_table(["bottleneck", "mean IoU (95% CI)", "epochs", "converged", "stopped early",
                    "wall time (s)", "", "note"], rows), "",
            "Mean IoU over every training disc after the last epoch; the CI resamples patients.",
            ""]
    chosen = sweep[sweep.chosen.astype(bool)]
    if not sweep.converged.astype(bool).any():
        pick = f"bottleneck {int(chosen.bottleneck.iloc[0])}" if len(chosen) else "nothing"
        text.append(f"> **WARNING: NO BOTTLENECK SIZE CONVERGED** (none reached a whole-epoch "
                    f"mean IoU of {iou_target}). {pick} was used anyway; its latent codes come "
                    "from an autoencoder that does not reproduce the discs to the paper's "
                    "standard, so read every latent result below with that in mind.")
    elif len(chosen):
        text.append(f"Chosen: bottleneck **{int(chosen.bottleneck.iloc[0])}**, the smallest that "
                    f"converged (whole-epoch mean IoU ≥ {iou_target}).")
    return "\n".join(text)


def reconstruction_iou(latents: pd.DataFrame, by: list[str]) -> list[tuple[tuple, int,
                                                                         stats.Estimate]]:
    """Mean reconstruction IoU of the chosen autoencoder per group of `by` columns: (group
    values, patients, estimate with a 95% CI that resamples patients, whose discs are not
    independent)."""
    return [(values, part["patient_id"].nunique(),
             stats.mean_ci(part[tables.RECONSTRUCTION_IOU], groups=part["patient_id"]))
            for values, part in latents.groupby(by, sort=True)]


def _reconstruction(latents: pd.DataFrame | None) -> str:
    if latents is None or tables.RECONSTRUCTION_IOU not in latents.columns:
        return _not_run("latents.parquet", "encode")
    rows = [[source, split, str(iou.n), str(patients), iou.text(4)]
            for (source, split), patients, iou in
            reconstruction_iou(latents, ["mask_source", "split"])]
    return ("### Reconstruction of every disc by the chosen autoencoder\n\n"
            + _table(["mask source", "split", "discs", "patients", "mean IoU (95% CI)"], rows)
            + "\n\nIoU of the decoded latent code (sigmoid > 0.5) against the disc's own cube. "
            "Only reference-mask discs of the training split were trained on; predicted-mask "
            "discs show how well the code holds the shapes the segmenter actually produces.")


def _classification(table: pd.DataFrame | None, comparisons: pd.DataFrame | None,
                    segmenters: list[dict] | None = None) -> str:
    if table is None or table.empty:
        return _not_run("classification.parquet", "classify")
    markdown = classify.markdown_tables(table)
    text = []
    for source in classify.MASK_SOURCES:
        text.append(f"### {classify.TABLE_TITLES[source]}")
        if source == "predicted" and in_sample_warning(segmenters):
            text.append(in_sample_warning(segmenters))
        elif source == "predicted" and segmenters is not None:
            text.append(f"Predicted masks from {len(segmenters)}-fold cross-fitting: every "
                        "series was segmented by a segmenter that never saw its patient.")
        text.append(markdown.get(source, f"_No {source}-mask analysis in this run._"))
    text.append("### Does the latent code add information?")
    if comparisons is None:
        text.append(_not_run("classification_comparison.parquet", "classify"))
    else:
        text.append("ΔAUC = AUC(latent + geometric) − AUC(geometric, the published six), "
                    "paired: both from the same out-of-fold predictions and the same patient "
                    "resamples.\n")
        text.append(classify.comparison_markdown(comparisons))
    return "\n\n".join(text)


def _figures(figures: list[str]) -> str:
    if not figures:
        return "_No figures: the interpret stage did not run or drew nothing._"
    blocks = []
    for location in figures:
        name = location.replace("\\", "/").rsplit("/", 1)[-1]
        title = FIGURE_TITLES.get(name) or (
            "ROC curves: " + classify.target_name(name[len("roc_"):-len(".png")])
            if name.startswith("roc_") else name)
        blocks.append(f"### {title}\n\n![{title}](figures/{name})")
    return "\n\n".join(blocks)


def _findings(c: ReportContext) -> str:
    bullets = []
    metrics = c.segmentation_metrics
    if metrics is not None and "dice" in metrics.columns:
        bullets.append(_segmentation_finding(metrics, c.segmenters))
    else:
        bullets.append("Segmentation: not measured in this run.")

    if c.sweep is not None and len(c.sweep):
        chosen = c.sweep[c.sweep.chosen.astype(bool)]
        if not c.sweep.converged.astype(bool).any():
            bullets.append("Autoencoder: **no bottleneck converged**; latent results are from an "
                           "unconverged model.")
        elif len(chosen):
            row = chosen.iloc[0]
            iou = stats.Estimate(row.mean_iou, row.iou_ci_low, row.iou_ci_high, 0)
            bullets.append(f"Autoencoder: bottleneck {int(row.bottleneck)} chosen, mean IoU "
                           f"{iou.text(4)}.")
    else:
        bullets.append("Autoencoder: the bottleneck sweep did not run.")
    if c.latents is not None and tables.RECONSTRUCTION_IOU in c.latents.columns:
        parts = [f"{source} masks {iou.text(4)} (n={iou.n})"
                 for (source,), _, iou in reconstruction_iou(c.latents, ["mask_source"])]
        bullets.append("Reconstruction IoU of every disc by the chosen autoencoder: "
                       + "; ".join(parts) + ".")

    table = c.classification
    if table is None or table.empty:
        bullets.append("Classification: not run.")
    else:
        bullets += _classification_findings(table)
    if c.comparisons is not None:
        bullets += _comparison_findings(c.comparisons)
    return "\n".join(f"- {b}" for b in bullets)


def _segmentation_finding(metrics: pd.DataFrame, segmenters: list[dict] | None) -> str:
    """The headline segmentation score: out-of-sample where the segmenters' records say so,
    beside the in-sample selection score the checkpoints were chosen on."""
    scored = metrics[metrics.get("error", pd.Series("", index=metrics.index)).fillna("") == ""]
    labels_ = _sample_label(scored, segmenters)
    if segmenters is None:
        val = scored[labels_ == "val"]
        which = "validation" if len(val) else "all"
        val = val if len(val) else scored
        dice = stats.mean_ci(val.dice, groups=val.get("patient_id"))
        return f"Segmentation ({which} series, n={len(val)}): Dice {dice.text(3)}."
    selection = ", ".join(f"{f['val_dice']:.3f}" for f in segmenters)
    outside = scored[labels_ == "out-of-sample"]
    if outside.empty:
        return ("Segmentation: **no out-of-sample score**: every series was segmented by a "
                "segmenter that trained or selected on its patient (segmentation.folds=1); "
                f"in-sample selection Dice {selection}.")
    dice = stats.mean_ci(outside.dice, groups=outside.patient_id)
    return (f"Segmentation, out-of-sample ({len(outside)} series of "
            f"{outside.patient_id.nunique()} patients, each segmented by the cross-fitted "
            f"segmenter that neither trained on nor selected its patient): Dice {dice.text(3)}. "
            f"In-sample, the selection Dice each fold's checkpoint was chosen on: {selection} "
            "(optimistic: those patients picked the checkpoint).")


def _classification_findings(table: pd.DataFrame) -> list[str]:
    """Per target and mask source: the primary feature set fixed in advance (never the best of
    several) against chance, beside the level-only baseline."""
    primary = classify.PRIMARY_COMPARISON[0]
    bullets = []
    for (target, source), rows in table.groupby(["target", "mask_source"], sort=False):
        name = f"{classify.target_name(target)}, {source} masks"
        ok = rows[(rows.status == "ok") & (rows.model == "lightgbm")].set_index("feature_set")
        if ok.empty:
            reason = rows.reason.iloc[0] or "no model could be fitted"
            bullets.append(f"{name}: not classified ({reason}).")
            continue
        if primary not in ok.index:
            skipped = rows[(rows.feature_set == primary) & (rows.model == "lightgbm")]
            reason = skipped.reason.iloc[0] if len(skipped) else "not evaluated"
            bullets.append(f"{name}: the primary feature set `{primary}` was not evaluated "
                           f"({reason}).")
            continue
        best = ok.loc[primary]
        auc = stats.Estimate(best.auc, best.auc_ci_low, best.auc_ci_high, 0)
        above = ("the CI excludes 0.5: better than chance" if best.auc_ci_low > 0.5
                 else "the CI includes 0.5: no evidence of better than chance")
        baseline = ""
        if "level" in ok.index:
            level = ok.loc["level"]
            level_auc = stats.Estimate(level.auc, level.auc_ci_low, level.auc_ci_high, 0)
            baseline = f"; the spinal level alone: AUC {level_auc.text()}"
        bullets.append(f"{name}: LightGBM on `{primary}` (the primary feature set, fixed in "
                       f"advance) AUC {auc.text()} ({above}), F1 {best.f1:.2f} at prevalence "
                       f"{best.prevalence:.2f}{baseline}.")
    return bullets


def _comparison_findings(comparisons: pd.DataFrame) -> list[str]:
    """Each paired LightGBM comparison worded from its CI: the primary one first, then whether
    latents or geometry add anything beyond the spinal level."""
    bullets = []
    for row in comparisons[comparisons.model == "lightgbm"].itertuples():
        diff = stats.Estimate(row.difference, row.ci_low, row.ci_high, 0)
        added = "the latent code" if "latent" in row.feature_set_a else "geometry"
        beyond = " beyond the spinal level" if row.feature_set_b == "level" else ""
        if not math.isfinite(row.ci_low):
            verdict = "no CI could be computed"
        elif row.ci_low > 0:
            verdict = f"the CI excludes 0: {added} adds information{beyond}"
        elif row.ci_high < 0:
            verdict = f"the CI is below 0: adding {added} made the model worse"
        else:
            verdict = f"the CI includes 0, so no evidence that {added} adds information{beyond}"
        primary = ((row.feature_set_a, row.feature_set_b) == classify.PRIMARY_COMPARISON)
        label = "primary comparison, fixed in advance: " if primary else ""
        pair = f"{row.feature_set_a} vs {row.feature_set_b}".replace("+", " + ")
        bullets.append(f"{classify.target_name(row.target)}, {row.mask_source} masks, LightGBM, "
                       f"{label}{pair}: ΔAUC {diff.text()}; {verdict}.")
    return bullets


def _quarantined(errors: pd.DataFrame | None) -> str:
    if errors is None:
        return "_Not available: errors.parquet was not written (no stage recorded its inputs)._"
    if errors.empty:
        return "No input was quarantined."
    rows = [[str(r.stage), (str(r.series_id) if pd.notna(r.series_id) else ""), str(r.file), str(r.reason)]
            for r in errors.head(50).itertuples()]
    more = f"\n\n…and {len(errors) - 50} more (errors.parquet)." if len(errors) > 50 else ""
    were = "input was" if len(errors) == 1 else "inputs were"
    return (f"{len(errors)} {were} quarantined and left out:\n\n"
            + _table(["stage", "series", "file", "reason"], rows) + more)


# Helpers ---------------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[str]]) -> str:
    def clean(cell: str) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(clean(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _integer(value) -> str:
    return "—" if value is None or pd.isna(value) else str(int(value))

"""Streaming inference and disc extraction with Ray Data: volumes in, per-disc rows out.

Three stages, each a plain function so the same per-series work also runs as a sequential loop
(`process_series`, used by the benchmark and by anyone without Ray):
1. `load_series`: `read_series` reads image and reference mask and refuses bad input, then
   `preprocess_series` brings the image onto the model grid. Two maps, so Ray Data's stats tell
   reading from preprocessing. On CPUs Ray Data fuses both into the Segmenter actors' operator,
   so a volume reaches inference without an object-store hop; GPU actors ask for other resources,
   so reading and preprocessing stay CPU tasks and the GPU actors only infer.
2. `Segmenter` (an actor pool sized by `pipeline.resources`: a GPU each when the run uses GPUs):
   sliding-window inference over the whole volume, never a crop taken from the reference mask.
   With cross-fitting each actor holds the K fold segmenters (loaded on first use) and segments
   a series with the one of its `fold`, the segmenter that never saw its patient: one pass over
   the cohort.
3. `extract_series` (tasks): map the prediction back to the native grid, score it, split
   reference and predicted masks into discs through the same path (crop, measure, cube), write
   `<out>/tables/discs.parquet/<series_id>.parquet` and `<out>/predictions/<series_id>.mha`.

The stream's rows after stage 3 are small per-series records; volumes never reach the driver.
Outputs are per-series files written atomically, so a retried task or a restarted actor
rewrites its own file: nothing is duplicated or lost. Retries are Ray Data 2.60's defaults (a task
whose worker dies is retried up to 3 times; a Segmenter actor that dies is restarted and its
series resubmitted), which passing max_retries/max_restarts explicitly only duplicates: those
arguments are deprecated in 2.60.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import ray
import torch

from pipeline import faults, resources, stats
from pipeline.config import Config, SegmentationConfig
from pipeline.data import checkpoints, storage, tables, validate, volumes
from pipeline.discs import geometry, isolate
from pipeline.segmentation import folds as crossfit
from pipeline.segmentation import lean_monai, preprocess
from pipeline.segmentation import models as segmodels
from pipeline.segmentation.metrics import dice_iou

if TYPE_CHECKING:
    from ray.data._internal.stats import DatasetStatsSummary

PREDICTIONS = "predictions"
THRESHOLD = 0.5  # on the sigmoid probability
METRIC_COLUMNS = [
    "series_id", "patient_id", "split", "fold", "dice", "iou", "n_expected", "n_found",
    "n_unmatched", "merged_ivd_labels", "split_ivd_labels", "n_reference_discs", "n_predicted_discs",
    "skipped_discs", "error", "file",
]
_PASSED = ("series_id", "patient_id", "split")


@dataclass
class ExtractionResult:
    discs_path: str  # the discs.parquet folder
    metrics: pd.DataFrame  # METRIC_COLUMNS, one row per series (quarantined ones included)
    errors: list[dict]  # stage "extract", file, series_id, reason
    n_discs: int  # rows written, reference and predicted
    summary: dict = field(default_factory=dict)  # mean val Dice/IoU with 95% CIs
    # Ray Data's per-operator timings of the stream (Dataset.get_stats_summary), for benchmarks
    stats: DatasetStatsSummary | None = None


def read_series(row: dict, max_voxels: int = volumes.MAX_VOXELS) -> dict:
    """Stage 1a: one series -> its native image and reference mask, and what is needed to write
    a prediction back in the file's own orientation. Bad input -> the same keys, empty arrays
    and `error`/`file` filled in."""
    base = {**{key: str(row[key]) for key in _PASSED}, "fold": int(row.get("fold", 0))}
    try:
        image, mask = preprocess.read_usable_pair(row, max_voxels)
    except validate.BadInput as err:
        return {**base, "error": str(err), "file": err.file,
                "image": np.zeros((0, 0, 0), np.float32), "spacing": np.ones(3, np.float64),
                "reference": np.zeros((0, 0, 0), np.int16), "affine": np.eye(4),
                "stored_shape": np.zeros(3, np.int64)}
    return {**base, "error": "", "file": "",
            "image": image.array, "spacing": np.asarray(image.spacing, dtype=np.float64),
            "reference": mask.array.astype(np.int16, copy=False),
            "affine": np.asarray(mask.header.affine, dtype=np.float64),
            "stored_shape": np.asarray(mask.header.stored_shape, dtype=np.int64)}


def preprocess_series(sample: dict, seg: SegmentationConfig) -> dict:
    """Stage 1b: a stage-1a row -> the same row with the image preprocessed onto the model grid
    and the grid recorded (native spacing included) in place of `spacing`."""
    out = {k: v for k, v in sample.items() if k not in ("image", "spacing")}
    if sample["error"]:
        empty = preprocess.Grid((0, 0, 0), (1.0, 1.0, 1.0), (0, 0, 0), (0, 0, 0))
        return {**out, "image": np.zeros((0, 0, 0), np.float32), **empty.to_record()}
    image = np.asarray(sample["image"])
    spacing = tuple(float(v) for v in np.asarray(sample["spacing"]))
    grid = preprocess.plan_grid(image.shape, spacing, seg.target_spacing_mm, seg.roi_size)
    return {**out, "image": preprocess.preprocess_image(image, grid), **grid.to_record()}


def load_series(row: dict, seg: SegmentationConfig, max_voxels: int = volumes.MAX_VOXELS
                ) -> dict:
    """Stage 1: one series -> the preprocessed image, the native reference mask and what is
    needed to map a prediction back and write it (read_series, then preprocess_series)."""
    return preprocess_series(read_series(row, max_voxels), seg)


class Segmenter:
    """Stage 2, a Ray Data callable class: loads each model once per actor (on first use), then
    runs MONAI sliding-window inference on whole preprocessed volumes (one per batch).

    checkpoints: one checkpoint for every series, or {fold: checkpoint} (cross-fitting), where
    a series is segmented by the checkpoint of its `fold` and nothing else. `meta` is the first
    checkpoint's; all share its preprocessing (run_extraction checks)."""

    def __init__(self, checkpoints: str | Mapping[int, str], overlap: float,
                 sw_batch_size: int, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = resources.torch_device()
        self.paths = ({None: checkpoints} if isinstance(checkpoints, str)
                      else {int(k): str(v) for k, v in checkpoints.items()})
        self.models: dict = {}
        first = next(iter(self.paths))
        self.model, self.meta = self._model(first)
        self.roi_size = tuple(segmodels.config_from_meta(self.meta).roi_size)
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.calls = 0  # batches segmented by this actor process, for the fault tests

    def _model(self, key) -> tuple[torch.nn.Module, dict]:
        if key not in self.models:
            model, meta = segmodels.load_segmenter(self.paths[key])
            self.models[key] = (model.to(self.device), meta)
        return self.models[key]

    def model_for(self, fold) -> tuple[torch.nn.Module, dict]:
        """The model (and its meta) that segments a series of `fold`."""
        if None in self.paths:
            return self._model(None)
        if int(fold) not in self.paths:
            raise ValueError(f"no segmenter for fold {fold} (have folds {sorted(self.paths)}): "
                             "the series table and the segmentation stage disagree; re-run both")
        return self._model(int(fold))

    def probability(self, image: np.ndarray, model: torch.nn.Module | None = None) -> np.ndarray:
        """Disc probability (float32) on the padded model grid of one preprocessed volume."""
        # MONAI only where it infers: the reading, preprocessing and extraction workers that
        # import this module would otherwise each import all of MONAI (segmodels says why)
        lean_monai.load()
        from monai.inferers import sliding_window_inference

        with torch.inference_mode():
            volume = torch.tensor(image, dtype=torch.float32)[None, None].to(self.device)
            logits = sliding_window_inference(volume, self.roi_size, self.sw_batch_size,
                                              self.model if model is None else model,
                                              overlap=self.overlap,
                                              mode="gaussian")
            return torch.sigmoid(logits)[0, 0].float().cpu().numpy()

    def segment(self, sample: dict) -> dict:
        """A stage-1 row -> the same row with `probability` in place of `image`, and `fold` the
        fold of the segmenter that made it (as its checkpoint records it, where it does)."""
        out = {k: v for k, v in sample.items() if k != "image"}
        image = np.asarray(sample["image"])
        if sample["error"]:
            out["probability"] = np.zeros((0, 0, 0), np.float32)
            return out
        model, meta = self.model_for(sample.get("fold", 0))
        out["probability"] = self.probability(image, model)
        if meta.get("fold") is not None:
            out["fold"] = int(meta["fold"])
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.segment({k: v[i] for k, v in batch.items()})
                for i in range(len(batch["series_id"]))]
        self.calls += 1
        faults.point(f"segmenter call {self.calls}")  # dies with the batch's result unsent
        return {k: _column([r[k] for r in rows]) for k in rows[0]}


def _column(values: list) -> np.ndarray:
    """A batch column from per-row values (an object array when shapes differ)."""
    if isinstance(values[0], np.ndarray) and len({v.shape for v in values}) > 1:
        column = np.empty(len(values), dtype=object)
        column[:] = values
        return column
    return np.stack(values) if isinstance(values[0], np.ndarray) else np.asarray(values)


def prediction_path(out: str, series_id: str) -> str:
    return storage.join(out, PREDICTIONS, f"{series_id}.mha")


def disc_table_path(out: str, series_id: str) -> str:
    return storage.join(tables.path(out, tables.DISCS), f"{series_id}.parquet")


def disc_rows(found: list, source: str, sample: dict, label_map: np.ndarray | None,
               spacing, cfg: Config, skipped: list[str]) -> tuple[list[dict], list[np.ndarray]]:
    """Measure and cube discs of one mask source; a disc that cannot be measured is skipped with
    its reason appended to `skipped`."""
    rows, cubes = [], []
    for disc in found:
        try:
            measured = geometry.measure_disc(disc.mask, spacing)
            bulge = (geometry.measure_bulge(label_map, spacing, disc.ivd_label)
                     if label_map is not None else dict.fromkeys(tables.BULGE, math.nan))
        except ValueError as err:
            skipped.append(f"{source} disc {disc.ivd_label} ({disc.level or disc.status}): {err}")
            continue
        cube, fits = isolate.disc_cube(disc, spacing, cfg.discs.cube_size, cfg.discs.cube_spacing_mm)
        rows.append({"patient_id": sample["patient_id"], "series_id": sample["series_id"],
                     "ivd_label": int(disc.ivd_label), "level": disc.level,
                     "mask_source": source, "split": sample["split"], "fold": sample["fold"],
                     **measured, **bulge,
                     "match_dice": float(disc.match_dice), "disc_status": disc.status,
                     "cube_fits": bool(fits)})
        cubes.append(cube)
    return rows, cubes


def disc_table(rows: list[dict], cubes: list[np.ndarray], cube_size: int) -> pa.Table:
    """One series' discs as a Parquet-ready table with a fixed-shape uint8 cube column."""
    columns = tables.DISC_KEYS + ["fold"] + tables.GEOMETRY + tables.BULGE + [
        "match_dice", "disc_status", "cube_fits"]
    frame = pd.DataFrame(rows, columns=columns).astype(
        {"ivd_label": "int64", "fold": "int64", "match_dice": "float64", "cube_fits": "bool",
         **dict.fromkeys(tables.GEOMETRY + tables.BULGE, "float64")})
    table = pa.Table.from_pandas(frame, preserve_index=False)
    stacked = (np.stack(cubes) if cubes
               else np.zeros((0, cube_size, cube_size, cube_size), np.uint8))
    return table.append_column(tables.CUBE, tables.cube_array(stacked))


def extract_series(sample: dict, cfg: Config, out: str) -> dict:
    """Stage 3: a segmented row -> per-disc rows written to its own Parquet file, the predicted
    mask written beside the tables, and a small record (METRIC_COLUMNS) for the driver."""
    record = {key: sample[key] for key in _PASSED} | {
        "fold": int(sample["fold"]), "dice": math.nan, "iou": math.nan, "n_expected": 0, "n_found": 0, "n_unmatched": 0,
        "merged_ivd_labels": "", "split_ivd_labels": "", "n_reference_discs": 0,
        "n_predicted_discs": 0, "skipped_discs": "", "error": str(sample["error"]),
        "file": str(sample["file"])}
    if record["error"]:
        # an earlier run's outputs for files that are now refused must not linger
        for stale in (disc_table_path(out, record["series_id"]),
                      prediction_path(out, record["series_id"])):
            if storage.exists(stale):
                fs, path = storage.filesystem(stale)
                fs.delete_file(path)
        return record
    grid = preprocess.Grid.from_record(sample)
    spacing = grid.native_spacing
    probability = np.asarray(sample["probability"])
    predicted = preprocess.to_native((probability >= THRESHOLD).astype(np.uint8), grid)
    reference = np.asarray(sample["reference"])
    header = volumes.Header(affine=np.asarray(sample["affine"]),
                       stored_shape=tuple(int(s) for s in sample["stored_shape"]))
    volumes.write_volume(prediction_path(out, record["series_id"]), predicted, header)
    record["dice"], record["iou"] = dice_iou(predicted, preprocess.disc_target(reference))

    skipped: list[str] = []
    reference_found = isolate.reference_discs(reference)
    predicted_found, report = isolate.predicted_discs(
        predicted.astype(bool), spacing, reference, min_volume_mm3=cfg.discs.min_component_mm3)
    ref_rows, ref_cubes = disc_rows(reference_found, "reference", record, reference, spacing,
                                     cfg, skipped)
    pred_rows, pred_cubes = disc_rows(predicted_found, "predicted", record, None, spacing, cfg,
                                       skipped)
    storage.write_table(disc_table(ref_rows + pred_rows, ref_cubes + pred_cubes,
                                   cfg.discs.cube_size),
                        disc_table_path(out, record["series_id"]))
    record.update(
        n_expected=int(report.n_expected), n_found=int(report.n_found),
        n_unmatched=int(report.unmatched),
        merged_ivd_labels=",".join(str(v) for v in report.merged),
        split_ivd_labels=",".join(str(v) for v in report.split),
        n_reference_discs=len(ref_rows), n_predicted_discs=len(pred_rows),
        skipped_discs="; ".join(skipped))
    return record


def process_series(row: dict, segmenter: Segmenter, cfg: Config, out: str) -> dict:
    """All three stages for one series in this process: the sequential path."""
    seg = segmodels.config_from_meta(segmenter.meta)
    return extract_series(segmenter.segment(load_series(row, seg, cfg.inputs.max_voxels)), cfg,
                          out)


def score_summary(metrics: pd.DataFrame, records: list[dict] | None = None) -> dict:
    """Mean Dice and IoU with 95% CIs that resample patients. Given the segmenters' own records
    (fold, training_patients, selection_patients), over the series whose segmenter neither
    trained nor selected on their patient ("out-of-sample"); without them, over the validation
    series (all series when none is val)."""
    scored = metrics[metrics["error"] == ""]
    if records is not None:
        split = "out-of-sample"
        scored = scored[crossfit.out_of_sample(scored, records)]
    else:
        split = "val" if (scored["split"] == "val").any() else "all"
        if split == "val":
            scored = scored[scored["split"] == "val"]
    summary = {"split": split, "n_series": int(len(scored)),
               "n_patients": int(scored["patient_id"].nunique())}
    for name in ("dice", "iou"):
        estimate = stats.mean_ci(scored[name], groups=scored["patient_id"])
        summary.update({name: estimate.value, f"{name}_ci_low": estimate.ci_low,
                        f"{name}_ci_high": estimate.ci_high})
    return summary


def _remove_stale(out: str, keep: set[str]) -> None:
    """Drop per-series disc files of series no longer in the cohort (an earlier run's)."""
    folder = tables.path(out, tables.DISCS)
    if not storage.exists(folder):
        return
    fs, path = storage.filesystem(folder)
    for info in fs.get_file_info(pafs.FileSelector(path)):
        name = info.base_name
        if name.endswith(".parquet") and name[: -len(".parquet")] not in keep:
            fs.delete_file(info.path)


def _preprocessing(segmenters: str | Mapping[int, str]) -> SegmentationConfig:
    """The segmentation settings the segmenters were trained with; all of them must share the
    preprocessing, which runs once per series before the fold's model is known."""
    paths = [segmenters] if isinstance(segmenters, str) else list(segmenters.values())
    configs = [segmodels.config_from_meta(checkpoints.read_meta(p, "segmenter")) for p in paths]
    grids = {(tuple(c.target_spacing_mm), tuple(c.roi_size)) for c in configs}
    if len(grids) > 1:
        raise ValueError(f"the fold segmenters were trained on different grids {sorted(grids)}: "
                         "train them with one config")
    return configs[0]


def run_extraction(series: pd.DataFrame, cfg: Config, segmenters: str | Mapping[int, str],
                   out: str, strict: bool = False,
                   progress: Callable[[str], None] | None = print,
                   segmenter_records: list[dict] | None = None) -> ExtractionResult:
    """Segment every series and extract its discs, streaming with Ray Data.

    segmenters: one checkpoint for every series, or {fold: checkpoint} from cross-fitting, where
    each series is segmented by the checkpoint of its `fold` column. segmenter_records: the
    segmenters' own records (fold, training_patients, selection_patients) for the out-of-sample summary.
    Writes `<out>/tables/discs.parquet/<series_id>.parquet`, `<out>/predictions/*.mha` and
    `<out>/tables/segmentation_metrics.parquet`. A series whose files are unusable is
    quarantined (an error, no disc rows) and the rest complete; `strict` raises ValueError on
    the first one instead. Preprocessing follows the checkpoints' own settings.
    """
    missing = {*_PASSED, "image_uri", "mask_uri"} - set(series.columns)
    if not isinstance(segmenters, str) and "fold" not in series.columns:
        missing.add("fold")
    if missing:
        raise ValueError(f"series table lacks columns {sorted(missing)}")
    seg = _preprocessing(segmenters)
    data_context = ray.data.DataContext.get_current()
    if progress is not None:
        data_context.enable_progress_bars = False
        data_context.print_on_execution_start = False
    layout = resources.segmenter_pool(cfg.resources)
    rows = series[[*_PASSED, "image_uri", "mask_uri"]].astype(str).assign(
        fold=series["fold"].astype(int) if "fold" in series.columns else 0).to_dict("records")
    stream = (
        ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
        .map(read_series, fn_kwargs={"max_voxels": cfg.inputs.max_voxels})
        .map(preprocess_series, fn_kwargs={"seg": seg})
        .map_batches(
            Segmenter, batch_size=1,
            fn_constructor_kwargs={"checkpoints": segmenters,
                                   "overlap": cfg.segmentation.inference_overlap,
                                   "sw_batch_size": cfg.segmentation.inference_batch_size,
                                   "threads": layout.threads},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=layout.count),
            num_gpus=1 if layout.gpu else 0, num_cpus=layout.cpus)
        .map(extract_series, fn_kwargs={"cfg": cfg, "out": out})
    )
    started = time.perf_counter()
    records, errors = [], []
    for record in stream.iter_rows():
        record = {k: record[k] for k in METRIC_COLUMNS}
        if record["error"]:
            if strict:
                raise ValueError(record["error"])
            errors.append({"stage": "extract", "file": record["file"],
                           "series_id": record["series_id"], "reason": record["error"]})
        records.append(record)
        faults.point(f"extraction record {len(records)}", signal.SIGINT)  # as Ctrl-C would
        if progress is not None and (len(records) % 5 == 0 or len(records) == len(rows)):
            progress(f"extraction: {len(records)}/{len(rows)} series, "
                     f"{time.perf_counter() - started:.0f} s")
    metrics = pd.DataFrame(records, columns=METRIC_COLUMNS).sort_values("series_id")
    metrics = metrics.reset_index(drop=True)
    storage.write_table(metrics, tables.path(out, tables.SEGMENTATION_METRICS))
    _remove_stale(out, set(metrics.loc[metrics["error"] == "", "series_id"]))
    summary = score_summary(metrics, segmenter_records)
    if progress is not None:
        progress(f"extraction: {summary['split']} Dice {summary['dice']:.3f} "
                 f"({summary['dice_ci_low']:.3f}-{summary['dice_ci_high']:.3f}), IoU "
                 f"{summary['iou']:.3f} over {summary['n_series']} series; "
                 f"{len(errors)} quarantined")
    return ExtractionResult(
        discs_path=tables.path(out, tables.DISCS), metrics=metrics, errors=errors,
        n_discs=int(metrics["n_reference_discs"].sum() + metrics["n_predicted_discs"].sum()),
        summary=summary, stats=stream.get_stats_summary())

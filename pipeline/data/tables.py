"""Names of the tables every stage writes under `<out>/tables/`, and of their shared columns.

One place for the contracts between stages, so a column renamed in one stage cannot silently
break another. Units are in the column names.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.data import storage

SERIES = "series.parquet"
GRADINGS = "gradings.parquet"
ERRORS = "errors.parquet"
DISCS = "discs.parquet"  # a folder of Parquet files written by Ray Data
SEGMENTATION_METRICS = "segmentation_metrics.parquet"
LATENTS = "latents.parquet"
SWEEP = "bottleneck_sweep.parquet"
CLASSIFICATION = "classification.parquet"

# Every per-disc row carries these keys.
DISC_KEYS = ["patient_id", "series_id", "ivd_label", "level", "mask_source", "split"]

# The published method's six "standard geometric features".
PUBLISHED_GEOMETRY = [
    "height_mean_mm",
    "ap_width_mm",
    "lateral_width_mm",
    "sagittal_angle_deg",
    "coronal_angle_deg",
    "transverse_angle_deg",
]
# All of measure_disc's columns: the published six plus our extras.
GEOMETRY = PUBLISHED_GEOMETRY + [
    "height_anterior_mm",
    "height_middle_mm",
    "height_posterior_mm",
    "volume_mm3",
    "wedge_angle_deg",
]
# measure_bulge's columns: null for predicted masks (no vertebrae to compare with).
BULGE = ["bulge_fraction", "bulge_max_mm"]

# errors.parquet: one row per quarantined input.
ERROR_COLUMNS = ["stage", "file", "series_id", "reason"]

# latents.parquet: IoU of the decoded code (sigmoid > 0.5) against the disc's own cube
RECONSTRUCTION_IOU = "reconstruction_iou"

CUBE = "cube"  # uint8 tensor column, shape (cube_size,) * 3, RAS axis order
DATASET_BLOCK_BYTES = 64 * 2**20  # in memory, per read task of discs_dataset


def path(out: str, name: str) -> str:
    return storage.join(out, "tables", name)


def read_if_present(out: str, name: str, columns: list[str] | None = None) -> pd.DataFrame | None:
    """A table under `<out>/tables/` (file or folder), None when it was not written; `columns`
    that the table lacks are ignored."""
    location = path(out, name)
    if not storage.exists(location):
        return None
    if columns is not None:
        fs, local = storage.filesystem(location)
        available = set(pq.ParquetDataset(local, filesystem=fs).schema.names)
        columns = [c for c in columns if c in available]
    return storage.read_table(location, columns=columns)


def require_discs(discs_path: str) -> None:
    """Refuse a missing discs.parquet with the stage that makes it (autoencoder, sweep, encoding
    all start from it)."""
    if not storage.exists(discs_path):
        raise ValueError(f"discs table {discs_path} does not exist: run disc extraction first")


def discs_dataset(discs_path: str, columns: list[str], filters=None,
                  block_bytes: int = DATASET_BLOCK_BYTES):
    """A Ray Dataset of `columns` of the discs table's rows (optionally `filters`, pyarrow's
    form), read as tasks of whole files holding about `block_bytes` in memory each.

    Not ray.data.read_parquet: Ray Data 2.60 packs files into read tasks by their sizes in
    Parquet, where binary cubes take 23x less room than in memory, so the 8,334 files of 50,000
    discs became one read task that never produced its first block (bench/scale.py). Here the
    first file's in-memory size sets how many files a task reads."""
    import ray.data

    require_discs(discs_path)
    files = storage.table_files(discs_path)
    if not files:
        raise ValueError(f"discs table {discs_path} holds no Parquet files")
    per_file = max(1, storage.read_arrow(files[0], columns).nbytes)
    step = max(1, block_bytes // per_file)
    groups = [{"files": files[i:i + step]} for i in range(0, len(files), step)]
    return ray.data.from_items(groups, override_num_blocks=len(groups)).map_batches(
        _read_files, fn_kwargs={"columns": columns, "filters": filters}, batch_size=1,
        batch_format="pyarrow")


def _read_files(batch, columns: list[str], filters):
    import pyarrow as pa

    files = batch.column("files")[0].as_py()
    return pa.concat_tables(list(storage.iter_files(files, columns, filters)),
                            promote_options="permissive")


def count_rows(location: str, filters=None) -> int:
    """Rows of a table (file or folder), counted file by file on its keys."""
    return sum(t.num_rows for t in storage.iter_tables(location, ["series_id"], filters))


def latent_columns(bottleneck: int) -> list[str]:
    return [f"z{i}" for i in range(bottleneck)]


def stack_cubes(column) -> np.ndarray:
    """(N, S, S, S) uint8 array from a cube column read by pandas, Ray or pyarrow."""
    import ray.data  # noqa: F401  registers Ray's tensor extension type with pyarrow

    if hasattr(column, "to_numpy"):
        array = column.to_numpy()
        if array.dtype != object:
            return array.astype(np.uint8, copy=False)
        column = list(array)
    return np.stack([np.asarray(c, dtype=np.uint8) for c in column])


def cube_array(cubes: np.ndarray):
    """A fixed-shape tensor column (Ray's ArrowTensorTypeV2, what Ray Data itself writes) from an
    (N, S, S, S) array, so files written per series and by Ray Data read back the same way."""
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(np.ascontiguousarray(cubes, dtype=np.uint8))


def errors_frame(rows: list[dict]) -> pd.DataFrame:
    """errors.parquet: string columns even when empty (an empty frame would store nulls)."""
    return pd.DataFrame(rows, columns=ERROR_COLUMNS).astype("string")

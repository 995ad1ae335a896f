"""Disc-like cubes and tiny discs.parquet folders for the autoencoder, sweep and encoder tests.

Each cube holds one rasterised superellipsoid shaped like a lumbar disc (wide laterally, deep
antero-posteriorly, thin cranio-caudally), of varied size, squareness and sagittal/coronal tilt,
in RAS axis order (0 lateral, 1 AP, 2 height). Written in the discs.parquet contract: one file
per series, DISC_KEYS + a few geometry columns + the tensor cube column.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from pipeline.data import storage, tables


@pytest.fixture()
def one_torch_thread():
    """Tiny convolutions on a busy 2-core machine ran ~100x slower on 2 torch threads than on 1
    (threads spinning against other processes); the tests that train in-process use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def driver_never_reads_cubes(monkeypatch):
    """Training cubes are read by the processes that train on them, each its own part: in the
    test's process (the driver), reading a cube column fails the test."""
    def refuse(*_, **__):
        raise AssertionError("the driver read training cubes")

    monkeypatch.setattr(tables, "stack_cubes", refuse)


LEVELS = {201: "L5/S1", 202: "L4/L5", 203: "L3/L4", 204: "L2/L3", 205: "L1/L2"}


def disc_cube(size: int, rng: np.random.Generator, spacing_mm: float = 2.5) -> np.ndarray:
    """One (size,)*3 uint8 cube of a disc-like superellipsoid with random size and tilt."""
    half_mm = np.array([rng.uniform(20, 27), rng.uniform(14, 17), rng.uniform(3.5, 5.5)])
    half = half_mm / spacing_mm * size / 32  # in voxels, scaled so discs fill any cube alike
    exponent = rng.uniform(2.0, 4.0)
    sagittal, coronal = np.deg2rad(rng.uniform(-20, 20)), np.deg2rad(rng.uniform(-6, 6))
    c_s, s_s, c_c, s_c = np.cos(sagittal), np.sin(sagittal), np.cos(coronal), np.sin(coronal)
    tilt_ap = np.array([[1, 0, 0], [0, c_s, -s_s], [0, s_s, c_s]])
    tilt_lat = np.array([[c_c, 0, -s_c], [0, 1, 0], [s_c, 0, c_c]])
    grid = np.stack(np.meshgrid(*[np.arange(size) - (size - 1) / 2] * 3, indexing="ij"), -1)
    local = grid @ (tilt_ap @ tilt_lat)  # voxel offsets in the disc's own frame
    inside = (np.abs(local[..., 0] / half[0]) ** exponent
              + np.abs(local[..., 1] / half[1]) ** exponent) ** (2 / exponent) \
        + (local[..., 2] / half[2]) ** 2 <= 1.0
    return inside.astype(np.uint8)


def disc_rows(n_series: int, size: int, seed: int = 0, discs_per_series: int = 5,
              with_predicted: bool = True) -> list[tuple[pd.DataFrame, np.ndarray]]:
    """(rows, cubes) per series: reference discs (and a predicted copy of each)."""
    rng = np.random.default_rng(seed)
    frames = []
    for s in range(n_series):
        patient = str(s + 1)
        split = "val" if s % 4 == 3 else "train"
        rows, cubes = [], []
        for label in list(LEVELS)[:discs_per_series]:
            cube = disc_cube(size, rng)
            for source in ("reference", "predicted") if with_predicted else ("reference",):
                rows.append({"patient_id": patient, "series_id": f"{patient}_t1",
                             "ivd_label": label, "level": LEVELS[label], "mask_source": source,
                             "split": split, "height_mean_mm": float(cube.sum(2).max()) * 2.5,
                             "volume_mm3": float(cube.sum()) * 2.5**3,
                             "match_dice": np.nan if source == "reference" else 0.9,
                             "disc_status": "ok", "cube_fits": True})
                cubes.append(cube)
        frames.append((pd.DataFrame(rows), np.stack(cubes)))
    return frames


def write_discs(folder, n_series: int = 4, size: int = 16, seed: int = 0,
                discs_per_series: int = 5, with_predicted: bool = True) -> str:
    """A discs.parquet folder in the contract's layout; returns its path."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    for frame, cubes in disc_rows(n_series, size, seed, discs_per_series, with_predicted):
        table = pa.Table.from_pandas(frame, preserve_index=False)
        table = table.append_column(tables.CUBE, tables.cube_array(cubes))
        storage.write_table(table, os.path.join(folder, f"{frame.series_id.iloc[0]}.parquet"))
    return folder

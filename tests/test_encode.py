"""Latent codes: the Encoder callable, and latents.parquet with one row per discs.parquet row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data import storage, tables
from pipeline.shape.encode import Encoder, encode_discs
from pipeline.shape.model import DiscAutoencoder, as_input, model_id, save_checkpoint
from tests.disc_cubes import disc_cube, one_torch_thread, write_discs  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def checkpoint(tmp_path) -> str:
    torch.manual_seed(0)
    model = DiscAutoencoder(16, (4, 8), 3)
    with torch.no_grad():
        model(torch.rand(6, 1, 16, 16, 16))  # non-trivial BatchNorm running statistics
    return save_checkpoint(str(tmp_path / "ckpt"), model.eval(), {"epochs": 1})


def test_encoder_maps_cubes_to_the_models_latents(checkpoint):
    rng = np.random.default_rng(0)
    cubes = np.stack([disc_cube(16, rng) for _ in range(3)])
    batch = {"patient_id": np.array(["1", "1", "2"], dtype=object),
             "series_id": np.array(["1_t1", "1_t1", "2_t1"], dtype=object),
             "ivd_label": np.array([201, 202, 201]), "level": np.array(["L5/S1"] * 3, object),
             "mask_source": np.array(["reference", "predicted", "reference"], dtype=object),
             "split": np.array(["train"] * 3, dtype=object), tables.CUBE: cubes}
    encoder = Encoder(checkpoint)
    out = encoder(batch)
    model = encoder.model
    with torch.no_grad():
        expected = model.encode(as_input(cubes)).numpy()
        reconstruction = model.reconstruct(as_input(cubes)) > 0.5
    z = np.stack([out[c] for c in tables.latent_columns(3)], axis=1)
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-6)
    # the decoded code scored against the disc's own cube, voxel by voxel
    truth = torch.as_tensor(cubes > 0)
    iou = ((reconstruction[:, 0] & truth).sum((1, 2, 3))
           / (reconstruction[:, 0] | truth).sum((1, 2, 3))).numpy()
    np.testing.assert_allclose(out[tables.RECONSTRUCTION_IOU], iou, rtol=1e-6)
    assert ((iou > 0) & (iou < 1)).all()
    assert tables.CUBE not in out and list(out["ivd_label"]) == [201, 202, 201]
    assert set(out["model_id"]) == {model_id(checkpoint)} and set(out["bottleneck"]) == {3}
    batch[tables.CUBE] = np.zeros((3, 8, 8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="trained on 16³ cubes"):
        encoder(batch)


def test_latents_have_one_row_per_disc(tmp_path, checkpoint, ray_session):
    discs_path = write_discs(tmp_path / "discs.parquet", n_series=3, size=16, discs_per_series=4)
    discs = pd.read_parquet(discs_path, columns=tables.DISC_KEYS)
    out = str(tmp_path / "out")
    location = encode_discs(discs_path, checkpoint, out, progress=lambda _: None)
    assert location == tables.path(out, tables.LATENTS)
    latents = storage.read_table(location)
    assert list(latents.columns) == tables.DISC_KEYS + tables.latent_columns(3) + [
        tables.RECONSTRUCTION_IOU, "bottleneck", "model_id"]
    assert latents[tables.RECONSTRUCTION_IOU].between(0, 1).all()
    assert len(latents) == len(discs) == 24  # reference and predicted discs alike
    keys = ["series_id", "ivd_label", "mask_source"]
    assert not latents.duplicated(keys).any()
    merged = discs.merge(latents, on=keys, how="outer", indicator=True, suffixes=("", "_z"))
    assert (merged["_merge"] == "both").all()
    assert latents[tables.latent_columns(3)].notna().all().all()
    assert (latents.model_id == model_id(checkpoint)).all() and (latents.bottleneck == 3).all()
    # a reference disc and its predicted copy have the same cube here, so the same code
    pair = latents[latents.series_id == "1_t1"].set_index(["ivd_label", "mask_source"])
    np.testing.assert_allclose(pair.loc[(201, "reference"), "z0"],
                               pair.loc[(201, "predicted"), "z0"])
    with pytest.raises(ValueError, match="does not exist"):
        encode_discs(str(tmp_path / "missing"), checkpoint, out, progress=lambda _: None)


def test_discs_are_read_in_tasks_sized_by_their_memory(tmp_path, ray_session):
    """Read tasks hold whole files, as many as fit the in-memory budget (Ray's own Parquet
    reader sizes them by the cubes' far smaller encoded size), and filters apply in them."""
    discs_path = write_discs(tmp_path / "discs.parquet", n_series=6, size=16, discs_per_series=4)
    columns = ["series_id", "mask_source", tables.CUBE]
    per_file = storage.read_arrow(storage.table_files(discs_path)[0], columns).nbytes
    dataset = tables.discs_dataset(discs_path, columns, block_bytes=2 * per_file)
    read = dataset.materialize()
    assert read.num_blocks() == 3 and read.count() == 6 * 4 * 2
    reference = tables.discs_dataset(discs_path, columns, [("mask_source", "=", "reference")])
    rows = reference.to_pandas()
    assert len(rows) == 6 * 4 and set(rows["mask_source"]) == {"reference"}
    assert tables.stack_cubes(rows[tables.CUBE]).shape == (24, 16, 16, 16)
    assert tables.count_rows(discs_path, [("mask_source", "=", "predicted")]) == 24

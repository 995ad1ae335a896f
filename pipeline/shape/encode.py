"""Latent shape codes for every disc: an `Encoder` actor pool on Ray Data writes latents.parquet.

Every row of discs.parquet (reference and predicted masks alike) is encoded by the same trained
autoencoder in eval mode, so the classifier compares both mask sources on one latent space. Each
code is also decoded: its per-disc reconstruction IoU says how faithfully k numbers hold that
disc's shape, and whether predicted-mask discs (never seen in training) are held as well as
reference ones.
The table is written a file per block as the encoder's blocks arrive, so the driver never holds
every disc's code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from pipeline import resources
from pipeline.config import ResourcesConfig
from pipeline.data import storage, tables
from pipeline.shape.model import as_input, disc_iou, load_model, model_id

ENCODE_BATCH = 64


class Encoder:
    """Ray Data callable class: loads the autoencoder once per actor, then maps a batch of discs
    (DISC_KEYS + cube) to DISC_KEYS + z0..z{k-1} + reconstruction_iou + bottleneck + model_id."""

    def __init__(self, checkpoint_path: str, threads: int = 1):
        torch.set_num_threads(threads)
        self.device = resources.torch_device()
        model, _ = load_model(checkpoint_path)
        self.model = model.to(self.device).eval()
        self.model_id = model_id(checkpoint_path)
        self.columns = tables.latent_columns(model.bottleneck)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cubes = np.asarray(batch[tables.CUBE])
        if cubes.shape[1:] != (self.model.cube_size,) * 3:
            raise ValueError(f"disc cubes of shape {cubes.shape[1:]} do not fit an autoencoder "
                             f"trained on {self.model.cube_size}³ cubes")
        with torch.inference_mode():
            x = as_input(cubes, self.device)
            code = self.model.encode(x)
            iou = disc_iou(self.model.decode(code), x, logits=True).cpu().numpy()
        z = code.cpu().numpy().astype(np.float64)
        out = {key: batch[key] for key in tables.DISC_KEYS}
        out.update({name: z[:, i] for i, name in enumerate(self.columns)})
        out[tables.RECONSTRUCTION_IOU] = iou.astype(np.float64)
        out["bottleneck"] = np.full(len(cubes), self.model.bottleneck, dtype=np.int64)
        out["model_id"] = np.full(len(cubes), self.model_id, dtype=object)
        return out


def encode_discs(discs_path: str, checkpoint_path: str, out: str,
                 progress: Callable[[str], None] = print,
                 res: ResourcesConfig | None = None) -> str:
    """Encode every disc of discs.parquet; write tables.path(out, LATENTS), a folder (one row per
    discs.parquet row) and return its location. `res` decides GPU use (default: "auto")."""
    import ray
    import ray.data

    discs = tables.discs_dataset(discs_path, tables.DISC_KEYS + [tables.CUBE])
    n_discs = tables.count_rows(discs_path)
    if n_discs == 0:
        raise ValueError(f"{discs_path} holds no discs to encode")
    layout = resources.encoder_pool(res or ResourcesConfig(), -(-n_discs // ENCODE_BATCH))
    progress(f"encoding {n_discs} discs with {layout.count} Encoder actor(s) on "
             f"{'GPU' if layout.gpu else 'CPU'}")
    latents = discs.map_batches(
        Encoder, fn_constructor_kwargs={"checkpoint_path": checkpoint_path,
                                        "threads": layout.threads},
        batch_size=ENCODE_BATCH, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=layout.count),
        num_gpus=1 if layout.gpu else 0, num_cpus=layout.cpus,
    )
    location = tables.path(out, tables.LATENTS)
    written, bottleneck = 0, None
    with storage.staged_dir(location) as folder:
        blocks = latents.iter_batches(batch_format="pandas", batch_size=None)
        for i, block in enumerate(b for b in blocks if len(b)):
            storage.write_table(_typed(block), storage.join(folder, f"{i:05d}.parquet"))
            written, bottleneck = written + len(block), int(block["bottleneck"].iloc[0])
        if written != n_discs:
            raise RuntimeError(f"encoded {written} discs but {discs_path} has {n_discs}")
    progress(f"wrote {written} latent codes (k={bottleneck}) to {location}")
    return location


def _typed(latents: pd.DataFrame) -> pd.DataFrame:
    string_keys = [k for k in tables.DISC_KEYS if k != "ivd_label"]
    return latents.astype({**{k: "string" for k in string_keys}, "ivd_label": "int64",
                           "bottleneck": "int64", "model_id": "string"})

"""The one checkpoint layout both models use: a folder (local or URI) with model.pt (a
state_dict), meta.json (whatever rebuilds and describes the model) and optionally optimizer.pt.

Loading reads tensors only (`weights_only=True`), so a planted model.pt cannot run code.
"""

from __future__ import annotations

import io
import json
import os

import torch

from pipeline.data import storage

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
OPTIMIZER_FILE = "optimizer.pt"


def write(folder: str, model: torch.nn.Module, meta: dict,
          optimizer: torch.optim.Optimizer | None = None) -> str:
    """Write a checkpoint into a local folder (Ray Train uploads it); returns the folder."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    os.makedirs(folder, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(folder, MODEL_FILE))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), os.path.join(folder, OPTIMIZER_FILE))
    with open(os.path.join(folder, META_FILE), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    return folder


def location(checkpoint, storage_path: str) -> str:
    """A Ray Train or Tune checkpoint's folder as a path or URI that round-trips.

    `Checkpoint.path` drops the scheme (`bucket/run/...` for `s3://bucket/run/...`): written to a
    table or manifest like that, the next stage would read it as a local path. The scheme comes
    back from the storage path the run was given.
    """
    if storage.is_uri(storage_path):
        return f"{str(storage_path).split('://', 1)[0]}://{checkpoint.path.lstrip('/')}"
    return checkpoint.path


def read_meta(location: str, kind: str) -> dict:
    """meta.json of a checkpoint; a folder without one is not a `kind` checkpoint."""
    path = storage.join(str(location), META_FILE)
    if not storage.exists(path):
        article = "an" if kind[:1] in "aeiou" else "a"
        raise ValueError(f"{location} is not {article} {kind} checkpoint: no {META_FILE}")
    return json.loads(storage.read_bytes(path))


def read_state(location: str, name: str = MODEL_FILE) -> dict:
    """A state_dict from a checkpoint folder, tensors only: never unpickles arbitrary objects."""
    data = storage.read_bytes(storage.join(str(location), name))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

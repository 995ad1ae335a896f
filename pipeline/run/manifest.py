"""The run manifest: what each stage consumed and produced, so a re-run can skip finished stages.

A stage is skipped when the config it reads, its input fingerprints and the code match the last
successful run and its outputs still exist. Input fingerprints use file sizes and modification
times (cheap on S3 too), not content hashes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

import pyarrow.fs as pafs

import pipeline
import tune
from pipeline.data import storage


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the project's source (every .py file of pipeline/ and tune/, as imported): after
    a bug fix a re-run re-makes the tables instead of serving those of the old code."""
    digest = hashlib.sha256()
    for package in (pipeline, tune):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root.parent).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(location: str) -> str:
    """Size and modification time of a file, or of every file below a folder."""
    fs, path = storage.filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return "missing"
    if info.type == pafs.FileType.File:
        entries = [("", info.size, info.mtime_ns)]
    else:
        selector = pafs.FileSelector(path, recursive=True)
        entries = sorted(
            (i.path[len(path):], i.size, i.mtime_ns)
            for i in fs.get_file_info(selector)
            if i.type == pafs.FileType.File and ".tmp-" not in i.path
        )
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


class Manifest:
    """`<out>/manifest.json`, rewritten atomically after every stage."""

    def __init__(self, out: str):
        self.location = storage.join(out, "manifest.json")
        self.data: dict = {"stages": {}}
        if storage.exists(self.location):
            self.data = json.loads(storage.read_bytes(self.location))
            self.data.setdefault("stages", {})

    def stage(self, name: str) -> dict | None:
        return self.data["stages"].get(name)

    def is_current(self, name: str, key: dict) -> bool:
        record = self.stage(name)
        if not record or record.get("status") != "done" or record.get("key") != key:
            return False
        return all(storage.exists(o) for o in record.get("outputs", []))

    def record(self, name: str, **fields) -> None:
        self.data["stages"][name] = {**fields, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.save()

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        text = json.dumps(self.data, indent=2, default=_plain)
        storage.write_bytes(self.location, text.encode())


def _plain(value):
    """JSON for numpy scalars (stage counts are often numpy), text for anything else."""
    return value.item() if hasattr(value, "item") else str(value)

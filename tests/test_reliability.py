"""Bad inputs and unsafe data: the whole job over a corrupted cohort quarantines every bad input
with a readable reason and leaves the good series exactly as a clean run makes them; --strict
stops at the first one; checkpoints and CSV paths cannot execute code or escape the dataset root.
"""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from jobs import run_pipeline
from pipeline import config
from pipeline.data import checkpoints, cohort, storage, tables
from pipeline.segmentation import preprocess, stream
from tests import bad_inputs
from tests.shared_job import job_settings, set_args

ROOT = Path(__file__).resolve().parents[1]
GOOD_SERIES = [f"{p}_t1" for p in range(1, 7)]
PLANTED = ["113_t1", "114_t1", "115_t1"]  # headers pointing outside the corpus, or oversized


@pytest.fixture(scope="module")
def corrupt_run(shared_job) -> tuple[Path, int]:
    """The whole job over the corrupted cohort (tests/conftest.py; interrupted once and resumed,
    which tests/test_faults.py examines)."""
    return shared_job.out, shared_job.code


def _errors(out: Path) -> pd.DataFrame:
    return pd.read_parquet(tables.path(str(out), tables.ERRORS))


def test_whole_job_over_bad_inputs_is_partial(corrupt_run):
    out, code = corrupt_run
    assert code == 3
    assert (out / "report.md").exists()


@pytest.mark.parametrize("case", bad_inputs.CASES, ids=lambda c: c.name)
def test_every_bad_input_is_quarantined_with_a_readable_reason(corrupt_run, bad_cohorts, case):
    out, _ = corrupt_run
    errors = _errors(out)
    location = str(bad_cohorts["corrupt"] / case.file)
    rows = errors[(errors["file"] == location) & (errors["stage"] == case.stage)]
    matching = [r for r in rows["reason"] if all(w in r.lower() for w in case.words)]
    assert matching, f"{case.name}: no {case.stage} error for {location} saying {case.words}; " \
                     f"errors were:\n{errors.to_string()}"
    if case.series_id:
        assert case.series_id in set(rows["series_id"])


def test_good_series_come_out_as_they_do_alone(clean_extraction, corrupt_run):
    out, _ = corrupt_run
    columns = tables.DISC_KEYS + tables.GEOMETRY + tables.BULGE
    clean = pd.read_parquet(tables.path(str(clean_extraction), tables.DISCS), columns=columns)
    corrupt = pd.read_parquet(tables.path(str(out), tables.DISCS), columns=columns)
    assert set(corrupt["series_id"]) <= set(GOOD_SERIES)
    assert set(clean["series_id"]) == set(corrupt["series_id"]) == set(GOOD_SERIES)
    order = ["series_id", "ivd_label"]

    def reference(frame):
        return (frame[frame["mask_source"] == "reference"].sort_values(order)
                .reset_index(drop=True))

    pd.testing.assert_frame_equal(reference(clean), reference(corrupt))
    latents = pd.read_parquet(tables.path(str(out), tables.LATENTS), columns=["series_id"])
    assert set(latents["series_id"]) <= set(GOOD_SERIES)


def test_bad_volumes_have_no_metrics_or_predictions(corrupt_run):
    out, _ = corrupt_run
    metrics = pd.read_parquet(tables.path(str(out), tables.SEGMENTATION_METRICS))
    bad = metrics[metrics["series_id"].isin(bad_inputs.BAD_SERIES)]
    assert len(bad) and (bad["error"] != "").all() and bad["dice"].isna().all()
    predicted = {p.stem.removesuffix(".mha") for p in (out / "predictions").glob("*.mha")}
    assert predicted == set(GOOD_SERIES)  # the planted stale prediction is gone too
    discs = {p.stem for p in Path(tables.path(str(out), tables.DISCS)).glob("*.parquet")}
    assert discs == set(GOOD_SERIES), discs  # and the stale disc file (tests/conftest.py)


def test_planted_headers_leak_nothing_into_the_outputs(corrupt_run):
    """The files the planted headers point to are never read into a table, a prediction, a log
    line or a checkpoint."""
    out, _ = corrupt_run
    for name in (tables.DISCS, tables.LATENTS):
        found = pd.read_parquet(tables.path(str(out), name), columns=["series_id"])
        assert not set(found["series_id"]) & set(PLANTED), name
    metrics = pd.read_parquet(tables.path(str(out), tables.SEGMENTATION_METRICS))
    planted = metrics[metrics["series_id"].isin(PLANTED)]
    assert sorted(planted["series_id"]) == PLANTED and planted["dice"].isna().all()
    assert not [p for p in (out / "predictions").iterdir() if p.stem in PLANTED]
    leaked = [p for p in out.rglob("*") if p.is_file() and bad_inputs.SECRET in p.read_bytes()]
    assert not leaked


def test_training_loader_skips_bad_volumes_with_the_reason(bad_cohorts):
    root = bad_cohorts["corrupt"]
    seg = config.demo().segmentation
    for series_id, file, words in [("107_t1", "masks/107_t1.mha", "no disc labels"),
                                   ("110_t1", "images/110_t1.mha", "constant"),
                                   ("108_t1", "masks/108_t1.mha", "does not define")]:
        row = {"series_id": series_id, "split": "train",
               "image_uri": str(root / "images" / f"{series_id}.mha"),
               "mask_uri": str(root / "masks" / f"{series_id}.mha")}
        record = preprocess.load_training_volume(row, seg.target_spacing_mm, seg.roi_size)
        assert record["image"].size == 0
        assert record["file"] == str(root / file)
        assert words in record["error"]


def test_strict_stops_at_the_first_bad_input(bad_cohorts, tmp_path, capsys, ray_session):
    capsys.readouterr()
    code = run_pipeline.main(["--data", str(bad_cohorts["corrupt"]), "--out", str(tmp_path / "out"),
                              "--strict", *set_args(job_settings())])
    printed = capsys.readouterr().out
    assert code == 1
    failed = [line for line in printed.splitlines() if "FAILED" in line]
    assert failed and "--strict" in failed[0]
    assert str(bad_cohorts["corrupt"]) in failed[0]  # names the file
    assert not storage.exists(tables.path(str(tmp_path / "out"), tables.DISCS))


def test_strict_extraction_names_the_bad_volume(shared_job, bad_cohorts, tmp_path):
    """Past the catalog, --strict stops at a volume that reads but cannot be measured."""
    root = bad_cohorts["corrupt"]
    series = pd.DataFrame([
        {"series_id": sid, "patient_id": sid.split("_")[0], "split": "val",
         "image_uri": str(root / "images" / f"{sid}.mha"),
         "mask_uri": str(root / "masks" / f"{sid}.mha")} for sid in ("1_t1", "107_t1")])
    with pytest.raises(ValueError, match=r"107_t1\.mha: mask has no disc labels"):
        stream.run_extraction(series, config.load("demo", job_settings()), shared_job.checkpoint,
                               str(tmp_path), strict=True, progress=None)


def test_gradings_without_required_columns_are_quarantined(bad_cohorts, tmp_path, ray_session):
    out = tmp_path / "out"
    code = run_pipeline.main(["--data", str(bad_cohorts["no_columns"]), "--out", str(out),
                              "--stages", "catalog", *set_args(job_settings())])
    assert code == 3
    errors = _errors(out)
    [reason] = errors.loc[errors["file"].str.endswith("radiological_gradings.csv"), "reason"]
    assert "lacks the column(s) Modic, Disc bulging" in reason
    assert pd.read_parquet(tables.path(str(out), tables.GRADINGS)).empty


def test_csv_paths_cannot_escape_the_dataset_root(bad_cohorts):
    root = bad_cohorts["corrupt"]
    found = cohort.catalog(str(root), sequence=None, val_fraction=0.2, seed=0)
    for uri in pd.concat([found.series["image_uri"], found.series["mask_uri"]]):
        assert Path(uri).resolve().is_relative_to(root.resolve()), uri
    reasons = " ".join(p["reason"] for p in found.problems)
    assert "'../1_t1' is a path" in reasons and "'/etc/passwd' is a path" in reasons


class _RunsCode:
    """A pickle that runs a shell command when unpickled: what a hostile model.pt would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_model_pt_is_refused(tmp_path):
    read_state = checkpoints.read_state
    marker = tmp_path / "code-ran"
    with open(tmp_path / "model.pt", "wb") as f:
        pickle.dump({"weight": _RunsCode(marker)}, f)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        read_state(str(tmp_path))
    assert not marker.exists()
    torch.save({"weight": torch.ones(2)}, tmp_path / "model.pt")  # plain tensors still load
    assert np.array_equal(read_state(str(tmp_path))["weight"].numpy(), np.ones(2))


def test_every_torch_load_is_weights_only():
    calls = []
    for folder in ("pipeline", "tune", "jobs", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "load"
                        and getattr(node.func.value, "id", None) == "torch"):
                    safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                               for k in node.keywords)
                    calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", safe))
    assert calls, "expected the checkpoint readers' torch.load calls"
    assert [where for where, safe in calls if not safe] == []

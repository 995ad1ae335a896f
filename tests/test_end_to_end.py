"""The whole job on a tiny synthetic cohort: every table, figure and report section, then a re-run
that skips every stage."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from jobs import run_pipeline
from pipeline import storage, tables

# Small enough for CI on 2 cores: a handful of patients, tiny models, a few epochs.
TINY = [
    "synthetic.patients=6",
    "synthetic.sequences=t1",
    "segmentation.epochs=2",
    "segmentation.patience=2",
    "segmentation.unet_channels=4,8,16",
    "autoencoder.channels=4,8,16,32",
    "sweep.bottlenecks=4,3",
    "sweep.max_epochs=3",
    "classify.repeats=1",
    "classify.folds=2",
    "classify.bootstrap=50",
]

REPORT_SECTIONS = ["Cohort", "Segmentation", "Geometry", "Bottleneck sweep", "Table 1",
                   "Table 2", "Findings", "Figures"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("e2e") / "out"
    args = ["--out", str(out)] + [a for item in TINY for a in ("--set", item)]
    code = run_pipeline.main(args)
    return out, args, code


def test_every_output_is_written(finished_run):
    out, _, code = finished_run
    assert code == 0
    for name in [tables.SERIES, tables.GRADINGS, tables.ERRORS, tables.DISCS,
                 tables.SEGMENTATION_METRICS, tables.SWEEP, tables.LATENTS,
                 tables.CLASSIFICATION]:
        assert storage.exists(tables.path(str(out), name)), name
    discs = pd.read_parquet(tables.path(str(out), tables.DISCS), columns=tables.DISC_KEYS)
    latents = pd.read_parquet(tables.path(str(out), tables.LATENTS))
    assert len(latents) == len(discs)
    assert set(discs.mask_source) == {"reference", "predicted"}
    figures = list((out / "figures").glob("*.png"))
    assert len(figures) >= 5 and all(f.stat().st_size > 1000 for f in figures)
    report = (out / "report.md").read_text()
    for section in REPORT_SECTIONS:
        assert section in report, section
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())


def test_rerun_skips_every_stage(finished_run, capsys):
    out, args, _ = finished_run
    capsys.readouterr()
    assert run_pipeline.main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert lines and all("skipped" in line for line in lines), lines

"""The runner's bookkeeping: skipping current stages, re-running stale ones, exit codes."""

import json
import os

import pandas as pd
import pytest

from pipeline import config
from pipeline.data import storage, tables
from pipeline.run import runner, stages
from pipeline.run.runner import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTIAL,
    Context,
    Stage,
    StageOutcome,
    run_stages,
)


def make_stages(calls, fail=False, errors=()):
    def first(ctx):
        calls.append("first")
        storage.write_table(pd.DataFrame({"x": [1, 2]}), ctx.table("a.parquet"))
        return StageOutcome(results={"value": 2}, counts={"rows": 2}, errors=list(errors))

    def second(ctx):
        calls.append("second")
        if fail:
            raise RuntimeError("the model diverged")
        rows = storage.read_table(ctx.table("a.parquet"))
        storage.write_table(rows * ctx.results["first"]["value"], ctx.table("b.parquet"))
        return StageOutcome(counts={"rows": len(rows)})

    return [
        Stage("first", "make a", first, inputs=lambda c: [],
              outputs=lambda c: [c.table("a.parquet")], config_sections=("classify",)),
        Stage("second", "double a", second, inputs=lambda c: [c.table("a.parquet")],
              outputs=lambda c: [c.table("b.parquet")], depends_on=("first",)),
    ]


@pytest.fixture
def ctx(tmp_path):
    lines = []
    context = Context(cfg=config.demo(), data=str(tmp_path / "data"), out=str(tmp_path / "out"),
                      progress=lines.append)
    context.lines = lines
    return context


def test_rerun_skips_current_stages(ctx):
    calls = []
    assert run_stages(make_stages(calls), ctx) == EXIT_OK
    assert calls == ["first", "second"]
    assert run_stages(make_stages(calls), ctx) == EXIT_OK
    assert calls == ["first", "second"], "nothing changed, nothing should run again"
    assert sum("skipped" in line for line in ctx.lines) == 2
    manifest = json.loads(storage.read_bytes(storage.join(ctx.out, "manifest.json")))
    assert manifest["stages"]["first"]["counts"] == {"rows": 2}


def test_config_change_and_force_rerun(ctx):
    calls = []
    run_stages(make_stages(calls), ctx)
    ctx.cfg.classify.folds = 7
    run_stages(make_stages(calls), ctx)
    # first re-ran for its config; its rewritten output makes second stale too
    assert calls == ["first", "second", "first", "second"]
    run_stages(make_stages(calls), ctx, force=("second",))
    assert calls[-1] == "second" and len(calls) == 5


def test_missing_output_reruns(ctx):
    calls = []
    run_stages(make_stages(calls), ctx)
    os.remove(ctx.table("b.parquet"))
    run_stages(make_stages(calls), ctx)
    assert calls == ["first", "second", "second"]


def test_failure_and_partial_exit_codes(ctx):
    calls = []
    assert run_stages(make_stages(calls, fail=True), ctx) == EXIT_FAILED
    assert any("FAILED" in line and "diverged" in line for line in ctx.lines)
    bad = [{"stage": "first", "file": "x.mha", "series_id": "1_t1", "reason": "truncated"}]
    ctx.cfg.classify.folds = 9
    assert run_stages(make_stages([], errors=bad), ctx) == EXIT_PARTIAL
    errors = storage.read_table(ctx.table(tables.ERRORS))
    assert errors.to_dict("records") == bad


def test_unknown_stage_is_rejected(ctx):
    with pytest.raises(ValueError, match="unknown stage"):
        run_stages(make_stages([]), ctx, selected=["nope"])


def test_code_change_reruns_every_stage(ctx, monkeypatch):
    calls = []
    run_stages(make_stages(calls), ctx)
    monkeypatch.setattr(runner, "code_fingerprint", lambda: "a bug fix later")
    run_stages(make_stages(calls), ctx)
    assert calls == ["first", "second", "first", "second"]


def test_a_stage_key_holds_every_config_field_the_stage_reads(ctx):
    catalog = next(s for s in stages.build(synthesize=False) if s.name == "catalog")
    key = runner.stage_key(catalog, ctx)
    ctx.cfg.segmentation.val_fraction = 0.3
    assert runner.stage_key(catalog, ctx) != key


def test_run_names_resume_only_an_identical_run(ctx):
    """A training stage's run name: the same after an interruption, new after a config change
    or --force (Ray Train resumes any run with the same storage path and name)."""
    names = []

    def training(c):
        names.append(c.run_name)
        if len(names) == 1:
            raise RuntimeError("interrupted")
        return StageOutcome()

    stage = [Stage("train", "train", training, inputs=lambda c: [], outputs=lambda c: [],
                   config_sections=("segmentation",))]
    assert run_stages(stage, ctx) == EXIT_FAILED
    assert run_stages(stage, ctx) == EXIT_OK
    assert names[1] == names[0], "an interrupted identical run must resume"
    run_stages(stage, ctx, force=("train",))
    ctx.cfg.segmentation.lr = 0.5
    run_stages(stage, ctx)
    assert len(set(names[1:])) == 3, names
    assert all(name.startswith("train-") for name in names)

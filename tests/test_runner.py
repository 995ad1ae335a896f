"""The runner's bookkeeping: skipping current stages, re-running stale ones, exit codes."""

import json
import os

import pandas as pd
import pytest

from pipeline import config
from pipeline.data import storage, tables
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

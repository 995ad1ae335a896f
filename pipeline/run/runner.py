"""Runs the pipeline's stages in order, skipping those whose inputs and config are unchanged.

Each stage is a small function in `pipeline.stages`; this module only decides what runs, records
what each stage consumed and produced in the manifest, collects quarantined inputs into
`errors.parquet`, and turns the outcome into an exit code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.config import Config
from pipeline.data import storage, tables
from pipeline.run.manifest import Manifest, code_fingerprint, fingerprint

EXIT_OK, EXIT_FAILED, EXIT_PARTIAL = 0, 1, 3
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C


class StageError(RuntimeError):
    """A stage could not produce its outputs; the message says why, for a person."""


@dataclass
class StageOutcome:
    results: dict = field(default_factory=dict)  # JSON-able values later stages need
    counts: dict = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)


@dataclass
class Context:
    cfg: Config
    data: str
    out: str
    strict: bool = False
    progress: Callable[[str], None] = print
    results: dict = field(default_factory=dict)
    run_name: str = ""  # the running stage's name for its Ray Train/Tune run (see run_name)

    def table(self, name: str) -> str:
        return tables.path(self.out, name)

    def work(self, *parts: str) -> str:
        """Where Ray Train and Tune keep their runs: absolute or a URI, as they require."""
        return storage.absolute(storage.join(self.out, "work", *parts))


@dataclass(frozen=True)
class Stage:
    name: str
    describe: str
    run: Callable[[Context], StageOutcome]
    inputs: Callable[[Context], list[str]]
    outputs: Callable[[Context], list[str]]
    config_sections: tuple[str, ...] = ()  # sections or `section.field`s: all the stage reads
    depends_on: tuple[str, ...] = ()


def stage_key(stage: Stage, ctx: Context) -> dict:
    """What decides whether a finished stage is still current: the config it reads, its inputs,
    its upstream results and the code. (`resources` is left out: it moves work between devices,
    it does not change what the work computes.)"""
    return {
        "config": ctx.cfg.section_json(*stage.config_sections) if stage.config_sections else "",
        "inputs": {loc: fingerprint(loc) for loc in stage.inputs(ctx)},
        "upstream": {d: ctx.results.get(d, {}) for d in stage.depends_on},
        "code": code_fingerprint(),
    }


def run_name(stage: Stage, key: dict) -> str:
    """A training stage's Ray run name, from its key. Ray resumes any run with the same storage
    path and name: a changed config, input or code must start a new run (not restore the old
    weights and optimizer), while an interrupted identical run resumes."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
    return f"{stage.name}-{digest.hexdigest()[:12]}"


@contextlib.contextmanager
def _keeping_sigint():
    """Put the SIGINT handler back after a stage. Ray Train's `fit` installs its own (abort the
    training run) and leaves it behind, after which Ctrl-C would no longer stop the job."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def run_stages(
    stages: list[Stage],
    ctx: Context,
    selected: list[str] | None = None,
    force: tuple[str, ...] = (),
    run_info: dict | None = None,
) -> int:
    manifest = Manifest(ctx.out)
    manifest.update(config=ctx.cfg.to_dict(), data=ctx.data, out=ctx.out, **(run_info or {}))
    names = [s.name for s in stages]
    for name in list(selected or []) + list(force):
        if name not in names:
            raise ValueError(f"unknown stage {name!r}; stages are: {', '.join(names)}")
    for stage in stages:
        previous = manifest.stage(stage.name) or {}
        if previous.get("status") == "done":
            ctx.results[stage.name] = previous.get("results", {})
    errors: dict[str, list[dict]] = {
        name: (manifest.stage(name) or {}).get("errors", []) for name in names
    }
    total = len(stages)
    for number, stage in enumerate(stages, start=1):
        label = f"[{number}/{total}] {stage.name:<10}"
        if selected and stage.name not in selected:
            continue
        key = stage_key(stage, ctx)
        if stage.name not in force and manifest.is_current(stage.name, key):
            ctx.progress(f"{label} skipped: inputs and config unchanged since the last run")
            continue
        ctx.progress(f"{label} {stage.describe}")
        # --force means train anew: a forced stage's run never resumes the finished one
        ctx.run_name = run_name(stage, key) + (f"-{uuid.uuid4().hex[:6]}"
                                               if stage.name in force else "")
        started = time.time()
        try:
            with _keeping_sigint():
                outcome = stage.run(ctx)
        except KeyboardInterrupt:
            manifest.record(stage.name, status="interrupted", key=key,
                            seconds=time.time() - started)
            ctx.progress(f"{label} INTERRUPTED after {time.time() - started:.0f} s: the same "
                         "command resumes it")
            raise
        except Exception as err:
            manifest.record(stage.name, status="failed", key=key, reason=str(err),
                            traceback=traceback.format_exc(), seconds=time.time() - started)
            ctx.progress(f"{label} FAILED after {time.time() - started:.0f} s: {err}")
            return EXIT_FAILED
        seconds = time.time() - started
        ctx.results[stage.name] = outcome.results
        errors[stage.name] = outcome.errors
        # errors.parquet is written before the stage's key is taken: the report reads it, and a
        # rewrite after the key would make the report look stale on every re-run.
        all_errors = [row for name in names for row in errors.get(name, [])]
        storage.write_table(tables.errors_frame(all_errors), ctx.table(tables.ERRORS))
        manifest.record(
            stage.name, status="done", key=stage_key(stage, ctx), seconds=round(seconds, 2),
            results=outcome.results, counts=outcome.counts, errors=outcome.errors,
            outputs=stage.outputs(ctx),
        )
        counts = ", ".join(f"{k} {v}" for k, v in outcome.counts.items())
        quarantined = f", {len(outcome.errors)} quarantined" if outcome.errors else ""
        ctx.progress(f"{label} done in {seconds:.0f} s ({counts}{quarantined})")
    all_errors = [row for name in names for row in errors.get(name, [])]
    manifest.update(quarantined=all_errors, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return EXIT_PARTIAL if all_errors else EXIT_OK

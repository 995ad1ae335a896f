"""The bottleneck sweep: the selection rule, resource planning, and both trial modes on Tune."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline import config
from pipeline.data import storage, tables
from pipeline.resources import plan_trials
from pipeline.shape.model import load_model
from tests.disc_cubes import driver_never_reads_cubes, write_discs  # noqa: F401
from tune.bottleneck_sweep import (
    COLUMNS,
    choose_bottleneck,
    experiment_name,
    run_sweep,
    spare_cpus_scheduler,
)


def _trials(rows: list[tuple[int, float, bool, str | None]]) -> pd.DataFrame:
    return pd.DataFrame([
        {"bottleneck": k, "mean_iou": iou, "iou_ci_low": iou - 0.01, "iou_ci_high": iou + 0.01,
         "epochs": 100, "converged": conv, "stopped_early": False, "wall_s": 1.0,
         "chosen": False, "checkpoint_path": path, "note": ""}
        for k, iou, conv, path in rows], columns=COLUMNS)


def test_chooses_the_smallest_bottleneck_that_converged():
    table = choose_bottleneck(_trials([
        (64, 0.9981, True, "/c64"), (8, 0.9983, True, "/c8"), (4, 0.9984, True, "/c4"),
        (3, 0.72, False, "/c3")]), 0.995)
    assert table.loc[table.chosen, "bottleneck"].tolist() == [4]
    assert "smallest bottleneck that converged" in table.loc[table.chosen, "note"].iloc[0]
    # a better IoU does not beat a smaller converged bottleneck
    table = choose_bottleneck(_trials([(8, 0.999, True, "/c8"), (4, 0.996, True, "/c4")]), 0.995)
    assert table.loc[table.chosen, "bottleneck"].tolist() == [4]


def test_without_convergence_chooses_the_best_iou_and_says_so():
    table = choose_bottleneck(_trials([
        (8, 0.97, False, "/c8"), (4, 0.98, False, "/c4"), (3, 0.99, False, None)]), 0.995)
    chosen = table[table.chosen]
    assert chosen.bottleneck.tolist() == [4]  # bottleneck 3 failed: no checkpoint
    assert "WITHOUT CONVERGENCE" in chosen.note.iloc[0]
    assert table.chosen.sum() == 1
    with pytest.raises(ValueError, match="no sweep trial produced a checkpoint"):
        choose_bottleneck(_trials([(4, math.nan, False, None)]), 0.995)


def test_trial_plan_fits_the_cluster():
    plain = plan_trials({"CPU": 2.0}, n_trials=3, nested=False)
    assert plain.concurrency == 3 and plain.threads == 1
    assert plain.trial_resources["cpu"] * plain.concurrency <= 2.0
    nested = plan_trials({"CPU": 2.0}, n_trials=3, nested=True, num_workers=1)
    assert nested.trial_resources == {"cpu": 0.01} and nested.concurrency == 2
    # workers of the trials at once leave a CPU for each trial's Ray Data read
    assert nested.cpus_per_worker * nested.concurrency + 0.02 <= 1.0 + 1e-9
    gpu = plan_trials({"CPU": 16.0, "GPU": 2.0}, n_trials=4, nested=False)
    assert gpu.concurrency == 2 and gpu.trial_resources["gpu"] == 1
    big = plan_trials({"CPU": 64.0}, n_trials=4, nested=False)
    assert big.concurrency == 4 and big.threads == 16
    # a trial runs on one node: three 4-CPU nodes give two trials 4 CPUs each, not 6
    nodes = plan_trials({"CPU": 12.0}, n_trials=2, nested=False, node_cpus=4.0)
    assert nodes.trial_resources == {"cpu": 4.0} and nodes.node_cpus == 4.0
    with pytest.raises(ValueError, match="0 CPUs"):
        plan_trials({"CPU": 0.0}, n_trials=2, nested=False)


def test_experiment_name_follows_the_discs_and_the_config(tmp_path):
    discs = write_discs(tmp_path / "discs.parquet", n_series=2, size=16, discs_per_series=1)
    cfg = config.demo()
    name = experiment_name(discs, cfg)
    assert experiment_name(discs, config.demo()) == name  # a re-run resumes the same sweep
    cfg.sweep.bottlenecks = (4,)
    assert experiment_name(discs, cfg) != name
    write_discs(tmp_path / "discs.parquet", n_series=3, size=16, discs_per_series=1)
    assert experiment_name(discs, config.demo()) != name  # re-extracted discs: a new sweep


def _short_and_long_trial(params: dict) -> None:
    """The short trial reports once and ends; the long one reports (with a checkpoint, as sweep
    trials do) until the CPUs the short one held reach it, each time continuing from its own
    last checkpoint. Waiting decides only how long this takes, not what happens."""
    import tempfile

    from ray import tune

    from tune.trials import trial_threads

    threads = trial_threads(1)
    restored = tune.get_checkpoint()
    epoch = 0
    if restored is not None:
        with restored.as_directory() as folder:
            epoch = int((Path(folder) / "epoch").read_text())
    while True:
        epoch += 1
        done = params["role"] == "short" or threads > 1 or epoch >= 600
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "epoch").write_text(str(epoch))
            tune.report({"epochs": epoch, "threads": threads, "converged": done,
                         "resumed_at": 0 if restored is None else epoch - 1},
                        checkpoint=tune.Checkpoint.from_directory(folder))
        if done:
            return
        time.sleep(0.1)


def test_cpus_of_a_finished_trial_go_to_the_running_one(tmp_path, ray_session):
    from ray import tune

    plan = plan_trials({"CPU": 2.0}, n_trials=2, nested=False)
    assert plan.threads == 1  # each trial starts on its half of the 2 CPUs
    tuner = tune.Tuner(
        tune.with_resources(_short_and_long_trial, plan.trial_resources),
        param_space={"role": tune.grid_search(["short", "long"])},
        tune_config=tune.TuneConfig(max_concurrent_trials=plan.concurrency, reuse_actors=False,
                                    scheduler=spare_cpus_scheduler(plan, max_epochs=1000)),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0))
    results = {r.config["role"]: r.metrics for r in tuner.fit()}
    assert results["short"]["epochs"] == 1 and results["short"]["threads"] == 1
    long = results["long"]
    # restarted once, on both CPUs, from the checkpoint of the report that freed them
    assert long["threads"] == 2 and long["converged"] and long["epochs"] < 600
    assert long["resumed_at"] == long["epochs"] - 1 > 0


def _tiny_sweep_cfg(nested: bool, max_epochs: int):
    cfg = config.demo()
    cfg.autoencoder.channels = (4, 8)
    cfg.autoencoder.checkpoint_every = 2
    cfg.sweep.bottlenecks = (4, 2)
    cfg.sweep.max_epochs = max_epochs
    cfg.sweep.nested_train = nested
    return cfg


def _check_table(out: str, result) -> pd.DataFrame:
    table = storage.read_table(tables.path(out, tables.SWEEP))
    assert list(table.columns) == COLUMNS
    assert sorted(table.bottleneck) == [2, 4] and table.chosen.sum() == 1
    assert result.chosen_bottleneck == int(table.loc[table.chosen, "bottleneck"].iloc[0])
    model, _ = load_model(result.chosen_checkpoint)
    assert model.bottleneck == result.chosen_bottleneck
    return table


@pytest.mark.slow
@pytest.mark.usefixtures("driver_never_reads_cubes")
def test_plain_sweep_finishes_writes_the_table_and_resumes(tmp_path, ray_session):
    discs = write_discs(tmp_path / "discs.parquet", n_series=2, size=16, discs_per_series=3)
    cfg = _tiny_sweep_cfg(nested=False, max_epochs=3)
    out, ray_storage = str(tmp_path / "out"), str(tmp_path / "ray")
    result = run_sweep(discs, cfg, ray_storage, out, progress=lambda _: None)
    table = _check_table(out, result)
    assert (table.epochs == 3).all() and not table.converged.any()
    assert not result.any_converged and "WITHOUT CONVERGENCE" in " ".join(table.note)
    # Same data, config and storage: the finished experiment is restored, not re-trained.
    messages = []
    again = run_sweep(discs, cfg, ray_storage, out, progress=messages.append)
    assert any("resuming" in m for m in messages)
    assert again.table[["bottleneck", "mean_iou", "epochs"]].equals(
        result.table[["bottleneck", "mean_iou", "epochs"]])


INTERRUPTED = ["autoencoder.channels=4,8", "autoencoder.checkpoint_every=10", "sweep.max_epochs=300",
               "sweep.bottlenecks=4,2", "sweep.early_stop=false"]


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_from_its_checkpoints(tmp_path, ray_session):
    """Ctrl-C part-way (the sweep's CLI in its own process, on the same cluster), then the same
    sweep again: unfinished trials continue from their last checkpoints instead of restarting,
    and no table is written from half-trained trials."""
    discs = write_discs(tmp_path / "discs.parquet", n_series=2, size=16, discs_per_series=3)
    out, ray_storage = str(tmp_path / "out"), str(tmp_path / "ray")
    cfg = config.load("demo", INTERRUPTED)
    experiment = Path(ray_storage) / experiment_name(discs, cfg)
    command = [sys.executable, "-m", "tune.bottleneck_sweep", "--discs", discs, "--out", out,
               "--storage", ray_storage, "--address",
               ray_session.get_runtime_context().gcs_address]
    for item in INTERRUPTED:
        command += ["--set", item]
    sweep = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Interrupt once every trial has reported twice: Tune then holds a checkpoint of each.
    deadline = time.monotonic() + 120
    while sweep.poll() is None and not (
            len(reports := _trial_reports(experiment)) == 2
            and all(len(r) >= 2 for r in reports.values())):
        assert time.monotonic() < deadline, "the trials did not report within 120 s"
        time.sleep(0.1)
    sweep.send_signal(signal.SIGINT)
    log = sweep.communicate(timeout=120)[0]
    assert sweep.returncode != 0, log
    assert "SweepInterrupted" in log and "resume" in log, log
    assert not storage.exists(tables.path(out, tables.SWEEP))

    messages = []
    result = run_sweep(discs, cfg, ray_storage, out, progress=messages.append)
    assert any("resuming" in m for m in messages)
    table = _check_table(out, result)
    assert (table.epochs == 300).all()
    for reports in _trial_reports(experiment).values():
        resumed = [r for r in reports if r["pid"] != reports[0]["pid"]]
        # the resumed process continued after a checkpoint: it never reported epoch 10 again
        assert resumed and resumed[0]["epochs"] > 10 and resumed[-1]["epochs"] == 300, reports


def _trial_reports(experiment: Path) -> dict[str, list[dict]]:
    """Each trial's reports so far (Tune's result.json: one JSON line per report; a line still
    being written is left out)."""
    return {path.parent.name: [json.loads(line) for line in path.read_text().split("\n")[:-1]]
            for path in experiment.glob("*/result.json")}


@pytest.mark.slow
def test_nested_train_sweep_finishes_on_two_cpus(tmp_path, ray_session):
    discs = write_discs(tmp_path / "discs.parquet", n_series=2, size=16, discs_per_series=3)
    cfg = _tiny_sweep_cfg(nested=True, max_epochs=2)
    out = str(tmp_path / "out")
    result = run_sweep(discs, cfg, str(tmp_path / "ray"), out, progress=lambda _: None)
    table = _check_table(out, result)
    assert (table.epochs == 2).all()
    runs = {Path(p).parent.name for p in table.checkpoint_path}  # one Train run per trial
    assert len(runs) == 2 and all(r.startswith("bottleneck-sweep-") for r in runs)
    # Every trial's Train placement group is released (a reported "done" metric once made Tune
    # kill trials mid-shutdown, leaking them and hanging the next stage on 2 CPUs).
    for _ in range(50):
        if _train_groups_left(ray_session) == 0:
            break
        time.sleep(0.2)
    assert _train_groups_left(ray_session) == 0


def _train_groups_left(ray) -> int:
    from ray.util import placement_group_table

    return sum(v["state"] == "CREATED" and any(b.get("CPU", 0) > 0.01 for b in
                                               v["bundles"].values())
               for v in placement_group_table().values())

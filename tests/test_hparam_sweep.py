"""User hyperparameter sweeps (tune.sweep): the search space, a tiny segmenter sweep that ASHA
prunes and MLflow tracks, its best config loaded back into a run, and an interrupted resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.run_pipeline import load_config, parse_args
from pipeline import config
from pipeline.data import storage
from pipeline.data.synthetic import synthesize
from tests.disc_cubes import driver_never_reads_cubes, write_discs  # noqa: F401
from tune import space, sweep_outputs
from tune.sweep import SweepSpec, experiment_name, run_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY_SEGMENTER = ["segmentation.epochs=2", "segmentation.patience=2",
                  "segmentation.batch_size=1", "segmentation.crops_per_volume=2",
                  "segmentation.unet_channels=4,8,16", "segmentation.roi_size=16,32,32",
                  "segmentation.target_spacing_mm=6.6,3,3"]


def test_space_expressions_parse_and_name_real_fields():
    parsed = space.from_items(["segmentation.lr=loguniform(1e-4, 1e-2)",
                               "segmentation.roi_size=choice((32,64,64), (48,64,64))",
                               "autoencoder.batch_size=randint(2, 9)",
                               "autoencoder.schedule=grid(constant, onecycle)"])
    assert parsed["segmentation.lr"].values == (1e-4, 1e-2)
    assert parsed["segmentation.roi_size"].values == ("32,64,64", "48,64,64")
    assert parsed["autoencoder.batch_size"].upper() == 8
    assert space.overrides({"segmentation.roi_size": "48,64,64", "segmentation.lr": 0.003}) == [
        "segmentation.lr=0.003", "segmentation.roi_size=48,64,64"]
    from_yaml = space.from_yaml("segmentation:\n  lr: loguniform(1e-4, 1e-2)\n")
    assert from_yaml["segmentation.lr"] == parsed["segmentation.lr"]


@pytest.mark.parametrize("item, message", [
    ("segmentation.lrate=loguniform(1e-4,1e-2)", "'segmentation.lrate' is not a config field"),
    ("segmentation=uniform(0,1)", "'segmentation' is not a config field"),
    ("segmentation.lr=normal(0,1)", r"segmentation.lr=normal\(0,1\): expected one of"),
    ("segmentation.lr=loguniform(0,1e-2)", "low > 0"),
    ("segmentation.model=uniform(0,1)", "needs a numeric field"),
    ("segmentation.epochs=choice(5,many)", "bad value for segmentation.epochs"),
    ("segmentation.lr", "must look like section.field=expression"),
])
def test_a_bad_space_is_refused_naming_the_key(item, message):
    with pytest.raises(ValueError, match=message):
        space.from_items([item])


def test_sweep_settings_are_checked_before_any_trial():
    lr = space.from_items(["segmentation.lr=grid(1e-3,1e-2)"])
    with pytest.raises(ValueError, match="need --search grid or random"):
        SweepSpec("segmentation", lr)  # TPE cannot run a grid
    with pytest.raises(ValueError, match="not 'mean_iou'"):
        SweepSpec("segmentation", lr, metric="mean_iou", search="grid")
    spec = SweepSpec("autoencoder", space.from_items(["autoencoder.lr=loguniform(1e-3,1e-2)"]),
                     metric="epochs_to_converge")
    assert spec.mode == "min"


@pytest.fixture(scope="module")
def segmenter_sweep(ray_session, tmp_path_factory):
    """One tiny segmenter sweep, trials one after another so ASHA's order is fixed: lr 1e-3,
    then lr 1e30, whose first step overflows the weights (validation Dice exactly 0), so at
    the epoch-1 rung it falls below the first trial and ASHA stops it."""
    root = tmp_path_factory.mktemp("segsweep")
    synthesize(str(root / "data"), patients=3, seed=5, sequences=("t1",),
               validation_fraction=0.34)
    spec = SweepSpec("segmentation", space.from_items(["segmentation.lr=grid(1e-3, 1e30)"]),
                     samples=1, search="grid", concurrency=1, grace_epochs=1,
                     overrides=tuple(TINY_SEGMENTER))
    lines = []
    outcome = run_sweep(str(root / "data"), config.load("demo", TINY_SEGMENTER), spec,
                        str(root / "out"), progress=lines.append)
    return outcome, lines, spec


@pytest.mark.slow
def test_tiny_segmenter_sweep_writes_its_table_and_asha_stops_the_bad_lr(segmenter_sweep,
                                                                       ray_session):
    outcome, lines, _ = segmenter_sweep
    table = storage.read_table(storage.join(outcome.folder, sweep_outputs.TABLE))
    print("\n" + table.to_string())
    by_lr = table.set_index("segmentation.lr")
    assert by_lr.loc[1e-3, "status"] == sweep_outputs.COMPLETED and by_lr.loc[1e-3, "epochs"] == 2
    assert by_lr.loc[1e30, "status"] == sweep_outputs.STOPPED and by_lr.loc[1e30, "epochs"] == 1
    assert by_lr.loc[1e30, "val_dice"] == 0.0 and by_lr.loc[1e-3, "best"]
    assert sum(line.startswith("trial ") and line.endswith("stopped early (ASHA)")
               for line in lines) == 1
    for name in ("metric_vs_segmentation.lr.png", "trial_curves.png"):
        assert storage.read_bytes(storage.join(outcome.folder, "figures", name))[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_best_config_loads_into_a_run(segmenter_sweep):
    outcome, _, _ = segmenter_sweep
    best_yaml = storage.join(outcome.folder, sweep_outputs.BEST_YAML)
    cfg = load_config(parse_args(["--config", best_yaml]))
    assert cfg.segmentation.lr == 1e-3 and cfg.segmentation.roi_size == (16, 32, 32)
    line = Path(outcome.folder, sweep_outputs.BEST_SET).read_text().split()
    assert load_config(parse_args(line)) == cfg  # the --set line is the same config
    # --set wins over the YAML
    assert load_config(parse_args(["--config", best_yaml, "--set",
                                   "segmentation.lr=0.5"])).segmentation.lr == 0.5


@pytest.mark.slow
def test_mlflow_holds_one_run_per_trial(segmenter_sweep):
    mlflow = pytest.importorskip("mlflow")
    outcome, _, _ = segmenter_sweep
    client = mlflow.MlflowClient("sqlite:///" + storage.join(outcome.folder, "mlflow.db"))
    experiment = client.get_experiment_by_name(Path(outcome.folder).name)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(float(r.data.params["segmentation.lr"]) for r in runs) == [1e-3, 1e30]
    for run in runs:
        epochs = {m.step for m in client.get_metric_history(run.info.run_id, "val_dice")}
        assert epochs and "val_iou" in run.data.metrics
        assert storage.exists(run.data.tags["checkpoint_path"])


AUTOENCODER = ["autoencoder.channels=4,8", "autoencoder.checkpoint_every=2",
               "autoencoder.max_epochs=6", "autoencoder.eval_every=2"]


@pytest.mark.slow
@pytest.mark.usefixtures("driver_never_reads_cubes")
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(
        tmp_path, ray_session, fault_marker):
    """The sweep's CLI on the session's cluster interrupts itself (SIGINT, pipeline.faults) as
    the first trial finishes; the same sweep again runs the rest and leaves that trial alone."""
    discs = write_discs(tmp_path / "discs.parquet", n_series=2, size=16, discs_per_series=3)
    out = str(tmp_path / "out")
    items = ["autoencoder.lr=loguniform(1e-3,1e-2)"]
    command = [sys.executable, "-m", "tune.sweep", "--target", "autoencoder", "--data", discs,
               "--out", out, "--samples", "2", "--concurrency", "1", "--grace-epochs", "6",
               "--address", ray_session.get_runtime_context().gcs_address]
    for item in items:
        command += ["--space", item]
    for item in AUTOENCODER:
        command += ["--set", item]
    fault_marker.write_text("sweep trial finished")
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 130 and "run it again" in run.stderr, run.stdout + run.stderr
    assert not fault_marker.exists()

    spec = SweepSpec("autoencoder", space.from_items(items), samples=2, concurrency=1,
                     grace_epochs=6, overrides=tuple(AUTOENCODER))
    cfg = config.load("demo", AUTOENCODER)
    experiment = Path(out, "ray", experiment_name(discs, cfg, spec))
    before = _results(experiment)
    finished = [t for t, reports in before.items() if reports[-1].get("trial_finished")]
    assert len(finished) == 1, before
    lines = []
    outcome = run_sweep(discs, cfg, spec, out, progress=lines.append)
    assert any("resuming" in line for line in lines)
    after = _results(experiment)
    assert len(after) == 2 and after[finished[0]] == before[finished[0]]  # not run again
    assert (outcome.table.status == sweep_outputs.COMPLETED).all()
    assert (outcome.table.epochs == 6).all()


def _results(experiment: Path) -> dict[str, list[dict]]:
    """Each trial's reports (Tune's result.json, one JSON line per report)."""
    return {path.parent.name: [json.loads(line) for line in path.read_text().splitlines()]
            for path in experiment.glob("*/result.json")}

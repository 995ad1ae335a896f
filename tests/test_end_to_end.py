"""The whole job on a tiny synthetic cohort, submitted as a real Ray Job to a two-node local
cluster, reading its cohort from and writing everything to S3 (a local S3-protocol server, moto):
the Jobs API, a working directory and shared storage, as on a cluster. Every table, figure and
report section lands in the bucket; the two cross-fitting folds train at once, one trainer per
node, and fold 0's worker, killed once after epoch 2, resumes from its S3 checkpoint; a re-run
skips every stage."""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from ray.cluster_utils import Cluster
from ray.job_submission import JobStatus, JobSubmissionClient

from jobs import run_pipeline
from pipeline import faults
from pipeline.data import storage, tables
from pipeline.data.synthetic import synthesize
from tests.local_servers import free_port, local_s3

REPO = Path(__file__).resolve().parents[1]
FINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}

# Small enough for CI on 2 cores: a handful of patients, tiny models, a few epochs.
TINY = [
    "synthetic.patients=6",
    "synthetic.sequences=t1",
    # ~40 optimizer steps per fold, one worker each, so on the two-node cluster the two folds
    # train at once: the segmenter learns little (val Dice ~0.02-0.1), so the test checks that
    # every predicted component is accounted for, not that whole discs were found
    "segmentation.num_workers=1",
    "segmentation.epochs=4",
    "segmentation.patience=4",
    "segmentation.batch_size=1",
    "segmentation.unet_channels=4,8,16",
    "autoencoder.channels=4,8,16,32",
    "sweep.bottlenecks=4,3",
    "sweep.max_epochs=3",
    "classify.repeats=1",
    "classify.folds=2",
    "classify.bootstrap=50",
]

BUCKET = "spine"
STAGES = ["catalog", "segtrain", "extract", "sweep", "encode", "classify", "interpret", "report"]
# Ray core's line for any restartable actor with a reference among its constructor arguments;
# Ray Data's pool actors always have one (README, Troubleshooting; ray-project/ray#53727).
KNOWN_RAY_ERROR = "has constructor arguments in the object store and max_restarts > 0"
# Python logging's "ERROR" and Ray core's glog lines "[date time E pid tid] file.cc:line: ..."
ERROR_LINE = re.compile(r"\bERROR\b|^\[[^\]]* [EF] \d+ \d+\]")

REPORT_SECTIONS = ["Cohort", "Segmentation", "Geometry", "Bottleneck sweep", "Table 1",
                   "Table 2", "Findings", "Figures"]


@pytest.fixture(scope="module")
def two_node_cluster():
    """Head and worker node on this machine, each with its own temp dir and agent port as on
    real machines. (Sharing a temp dir, the worker node's agent re-unpacks the job's working_dir
    over the driver's current directory and the driver dies with "Intel oneMKL FATAL ERROR:
    Cannot load libtorch_cpu.so", getcwd() failing; sharing the default agent port 52365 with
    the test session's Ray, the head has no job agent: "No available agent to submit job".)
    A short temp path: Ray's socket paths must stay under 108 bytes."""
    port = free_port()
    node_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_port": port,
        "dashboard_agent_listen_port": free_port()})
    cluster.add_node(num_cpus=1, temp_dir=node_dir, dashboard_agent_listen_port=free_port())
    yield f"http://127.0.0.1:{port}"
    cluster.shutdown()
    shutil.rmtree(node_dir, ignore_errors=True)


def submit(client: JobSubmissionClient, **job) -> str:
    """Submit, retrying while the head's job agent is still starting (it answers "No available
    agent" for a few seconds after the dashboard is up)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 server in this process, with a bucket holding a tiny synthetic cohort."""
    with local_s3(BUCKET) as (env, bucket_fs):
        local = tmp_path_factory.mktemp("cohort")
        synthesize(str(local), patients=6, seed=0, sequences=("t1",))
        pafs.copy_files(str(local), f"{BUCKET}/data", destination_filesystem=bucket_fs)
        yield env


FAULT_MARKER = f"s3://{BUCKET}/faults/marker"  # in the bucket: the nodes share no disk
FAULT_POINT = "segtrain fold 0 rank 0 epoch 2"  # killed before epoch 2's checkpoint is reported


@pytest.fixture(scope="module")
def finished_run(s3, two_node_cluster):
    """The tiny job through `ray job submit`'s API, S3 in and out, with fold 0's training worker
    killed once after training epoch 2 (pipeline.faults): (out, its arguments, final status,
    logs)."""
    out = f"s3://{BUCKET}/run"
    args = ["--data", f"s3://{BUCKET}/data", "--out", out] + [
        a for item in TINY for a in ("--set", item)]
    storage.write_bytes(FAULT_MARKER, FAULT_POINT.encode())
    client = JobSubmissionClient(two_node_cluster)
    job = submit(client, entrypoint=" ".join([sys.executable, "jobs/run_pipeline.py", *args]),
                 runtime_env={"working_dir": str(REPO),
                              "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                                           faults.MARKER_ENV: FAULT_MARKER, **s3}})
    deadline = time.monotonic() + 900
    while client.get_job_status(job) not in FINAL:
        assert time.monotonic() < deadline, "the job did not finish in 15 minutes"
        time.sleep(2)
    return out, args, client.get_job_status(job), client.get_job_logs(job)


def _manifest(out: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(out, "manifest.json")))


@pytest.mark.slow
def test_the_job_runs_as_a_ray_job_on_two_nodes(finished_run):
    out, _, status, logs = finished_run
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "2 node(s)" in logs, "the job must have joined the two-node cluster"
    assert f"[{len(STAGES)}/{len(STAGES)}] report" in logs
    assert f"report: {out}/report.md" in logs


@pytest.mark.slow
def test_the_console_shows_no_traceback_and_no_error_but_the_known_one(finished_run):
    _, _, status, logs = finished_run
    assert status == JobStatus.SUCCEEDED
    assert "Traceback" not in logs, logs[-3000:]
    errors = [line for line in logs.splitlines()
              if ERROR_LINE.search(line) and KNOWN_RAY_ERROR not in line]
    assert not errors, "\n".join(errors)


@pytest.mark.slow
def test_every_output_is_written(finished_run):
    out, _, status, _ = finished_run
    assert status == JobStatus.SUCCEEDED
    for name in [tables.SERIES, tables.GRADINGS, tables.ERRORS, tables.DISCS,
                 tables.SEGMENTATION_METRICS, tables.SWEEP, tables.LATENTS,
                 tables.CLASSIFICATION]:
        assert storage.exists(tables.path(out, name)), name
    discs = storage.read_table(tables.path(out, tables.DISCS), columns=tables.DISC_KEYS)
    latents = storage.read_table(tables.path(out, tables.LATENTS))
    assert len(latents) == len(discs)
    sources = set(discs.mask_source)
    assert "reference" in sources and sources <= {"reference", "predicted"}
    # The predicted path ran on every series: each component the segmenter found became a
    # predicted disc row or a recorded skip. (Whether a 4-epoch tiny segmenter finds whole discs
    # is chance; tests/test_extract.py checks the predicted discs of a trained model.)
    series = storage.read_table(tables.path(out, tables.SERIES), columns=["series_id"])
    metrics = storage.read_table(tables.path(out, tables.SEGMENTATION_METRICS))
    assert sorted(metrics.series_id) == sorted(series.series_id)
    assert metrics.dice.notna().all()
    predicted = discs[discs.mask_source == "predicted"].groupby("series_id").size()
    for row in metrics.itertuples():
        skipped = [s for s in row.skipped_discs.split("; ") if s.startswith("predicted disc")]
        assert row.n_predicted_discs == predicted.get(row.series_id, 0), row.series_id
        assert row.n_predicted_discs + len(skipped) == row.n_found, row.series_id
    fs, folder = storage.filesystem(storage.join(out, "figures"))
    figures = [f for f in fs.get_file_info(pafs.FileSelector(folder)) if f.path.endswith(".png")]
    assert len(figures) >= 5 and all(f.size > 1000 for f in figures)
    report = storage.read_bytes(storage.join(out, "report.md")).decode()
    for section in REPORT_SECTIONS:
        assert section in report, section
    manifest = _manifest(out)
    print("S3 run stages:", {name: s["status"] for name, s in manifest["stages"].items()})
    assert list(manifest["stages"]) == STAGES
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    # every model location a later stage read is a URI into the bucket, not a bare path
    for result in [manifest["stages"]["sweep"]["results"],
                   *manifest["stages"]["segtrain"]["results"]["folds"]]:
        assert result["checkpoint"].startswith(f"s3://{BUCKET}/")
    sweep = storage.read_table(tables.path(out, tables.SWEEP))
    assert sweep.checkpoint_path.str.startswith(f"s3://{BUCKET}/").all()


@pytest.mark.slow
def test_segmentation_training_resumed_from_its_s3_checkpoint(finished_run):
    out, _, status, logs = finished_run
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert not storage.exists(FAULT_MARKER), "the fault never fired"
    assert "segmentation fold 0 of 2: trains on 2 patients, selects on 1, segments 3 (2 folds " \
        "at once)" in logs, logs[-3000:]
    segtrain = _manifest(out)["stages"]["segtrain"]["results"]["folds"][0]
    run = segtrain["checkpoint"].rsplit("/", 1)[0]
    resumed = re.findall(r"segmentation: resuming after epoch (\d+) from (\S+)", logs)
    assert len(resumed) == 1, logs[-3000:]
    epoch, checkpoint = resumed[0]
    assert epoch == "1" and checkpoint.startswith(run + "/checkpoint_"), (resumed, run)
    epochs = int(next(i.split("=")[1] for i in TINY if i.startswith("segmentation.epochs=")))
    assert segtrain["epochs"] == epochs


@pytest.mark.slow
def test_no_predicted_mask_comes_from_a_segmenter_that_saw_its_patient(finished_run):
    """Cross-fitting, checked from the run's own records: each fold's checkpoint meta.json says
    which patients trained and selected it; no predicted row (nor segmentation score) of a
    fold belongs to one of them, and every patient was segmented."""
    out, _, status, _ = finished_run
    assert status == JobStatus.SUCCEEDED
    folds = _manifest(out)["stages"]["segtrain"]["results"]["folds"]
    assert len(folds) == 2  # the demo preset's segmentation.folds
    seen = {}
    for record in folds:
        meta = json.loads(storage.read_bytes(storage.join(record["checkpoint"], "meta.json")))
        assert meta["fold"] == record["fold"]
        assert meta["training_patients"] and meta["selection_patients"]
        assert not set(meta["training_patients"]) & set(meta["selection_patients"])
        seen[meta["fold"]] = set(meta["training_patients"]) | set(meta["selection_patients"])
    discs = storage.read_table(tables.path(out, tables.DISCS),
                               columns=["patient_id", "fold", "mask_source"])
    metrics = storage.read_table(tables.path(out, tables.SEGMENTATION_METRICS))
    for rows in (discs[discs.mask_source == "predicted"], metrics):
        assert rows.fold.isin(list(seen)).all()
        leaked = [(p, f) for p, f in zip(rows.patient_id, rows.fold, strict=True)
                  if p in seen[f]]
        assert not leaked, leaked
    series = storage.read_table(tables.path(out, tables.SERIES), columns=["patient_id"])
    assert set(metrics.patient_id) == set(series.patient_id)
    report = storage.read_bytes(storage.join(out, "report.md")).decode()
    assert "| out-of-sample |" in report and "in-sample" in report


@pytest.mark.slow
def test_rerun_skips_every_stage(finished_run, ray_session, capsys):
    out, args, _, _ = finished_run
    capsys.readouterr()
    assert run_pipeline.main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == len(STAGES) and all("skipped" in line for line in lines), lines

"""A real Ray Job: a two-node local cluster, the tiny job submitted through the Jobs API with a
working directory, outputs written to an absolute path. The closest thing to a cluster here."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
from ray.cluster_utils import Cluster
from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline import storage, tables
from tests.test_end_to_end import TINY

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_node_cluster():
    port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_port": port})
    cluster.add_node(num_cpus=1)
    yield f"http://127.0.0.1:{port}"
    cluster.shutdown()


def test_tiny_job_runs_as_a_ray_job(two_node_cluster, tmp_path):
    out = tmp_path / "job-out"
    client = JobSubmissionClient(two_node_cluster)
    overrides = " ".join(f"--set {item}" for item in TINY)
    job = client.submit_job(
        entrypoint=f"{sys.executable} jobs/run_pipeline.py --out {out} {overrides}",
        runtime_env={"working_dir": str(REPO),
                     "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}},
    )
    deadline = time.time() + 900
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                               JobStatus.STOPPED}:
        assert time.time() < deadline, "the job did not finish in 15 minutes"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "2 node(s)" in logs, "the job must have joined the two-node cluster"
    assert storage.exists(tables.path(str(out), tables.CLASSIFICATION))
    assert (out / "report.md").exists()

"""GPU intent on a real autoscaling cluster: Ray's fake_multinode provider, a CPU-only head and a
GPU node type with min_workers 0 (RAY_NOTES: "A local autoscaler, as it works here").

With resources.gpu=auto the extraction runs on CPUs and asks for no GPU; with require the
Segmenter actors ask for one, the autoscaler launches the GPU node type, and they run there (on
its CPU, saying once that CUDA is missing), while reading and preprocessing stay CPU tasks. Ray
Train workers asking for a GPU run on that node too, training on its CPU over gloo.

The cluster is its own Ray (GCS on 6379, where the fake nodes join; its own temp dir), driven by
a subprocess, apart from the session's shared Ray. Every process it starts inherits a marker in
its environment, and teardown kills only those (`ray stop` would kill every Ray on the machine;
not every one of them names the temp dir on its command line).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.local_servers import free_port

REPO = Path(__file__).resolve().parents[1]
GCS_PORT = 6379
GPU_NODE_TYPE = "gpu_node"
CLUSTER = {
    "cluster_name": "fake-gpu",
    "max_workers": 1,
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 5,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True},
    "head_node_type": "ray.head.default",  # the name fake_multinode gives the head it runs on
    "available_node_types": {
        # two CPUs: one Segmenter actor plus the read and extract tasks that feed it
        "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0,
                 "max_workers": 0},
        GPU_NODE_TYPE: {"resources": {"CPU": 1, "GPU": 1}, "node_config": {},
                        "min_workers": 0, "max_workers": 1},
    },
    **{key: {} for key in ("auth", "docker", "file_mounts")},
    **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter",
                           "initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands",
                           "worker_start_ray_commands")},
    "file_mounts_sync_continuously": False,
}
TINY = ["segmentation.unet_channels=4,8,16", "resources.cpus_per_gpu_worker=1",
        "resources.gpu_wait_s=120", "autoencoder.channels=4,8,16,32",
        "autoencoder.train_splits=train,val"]


MARKER = "SPINE_DISCS_FAKE_CLUSTER"


def _ours(temp_dir: str) -> list[int]:
    """Pids of the processes this cluster started: their environment carries MARKER=temp_dir."""
    tag = f"{MARKER}={temp_dir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if tag in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def autoscaling_cluster():
    """The head of a fake_multinode autoscaling cluster: its GCS address."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", GCS_PORT)) == 0:
            pytest.fail(f"port {GCS_PORT} is taken: the fake cluster's nodes join a GCS there")
    temp_dir = tempfile.mkdtemp(prefix="ras", dir="/tmp")  # Ray's socket paths stay short
    config = Path(temp_dir, "cluster.yaml")
    config.write_text(yaml.safe_dump(CLUSTER))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           MARKER: temp_dir}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    try:
        started = subprocess.run(
            [ray_bin, "start", "--head", "--num-cpus=2", "--node-ip-address=127.0.0.1",
             f"--port={GCS_PORT}", f"--autoscaling-config={config}", f"--temp-dir={temp_dir}",
             f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"],
            env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr[-3000:]
        yield f"127.0.0.1:{GCS_PORT}", ray_bin
    finally:
        for pid in _ours(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _ours(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _ours(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the fake cluster outlived it: {left}"


def _new_actors(address: str, seen: set[str], name: str) -> list[dict]:
    from ray.util.state import list_actors

    return [{"node_id": a.node_id, "resources": a.required_resources}
            for a in list_actors(address=address, detail=True, limit=10_000)
            if a.actor_id not in seen and name in f"{a.repr_name} {a.class_name}"]


def drive(address: str, out: str) -> None:
    """Run in a subprocess joined to the fake cluster: extraction of a two-patient cohort with an
    untrained segmenter under "auto", then "require", then two epochs of autoencoder training
    on the discs found under "require"; print what ran where as JSON."""
    import dataclasses
    import logging

    import ray
    from ray.util.state import list_actors

    from pipeline import config, resources
    from pipeline.data import checkpoints, tables
    from pipeline.data.cohort import catalog
    from pipeline.data.synthetic import synthesize
    from pipeline.segmentation import models as segmodels
    from pipeline.segmentation import stream
    from pipeline.shape.train import train_autoencoder

    ray.init(address=address, log_to_driver=False)
    synthesize(f"{out}/data", patients=2, seed=0, sequences=("t1",))
    series = catalog(f"{out}/data", "t1").series
    cfg = config.load("demo", TINY)
    checkpoint = checkpoints.write(f"{out}/untrained", segmodels.build_segmenter(
        cfg.segmentation), {"segmentation": dataclasses.asdict(cfg.segmentation)})

    def operators(summary) -> list[str]:
        return [name for parent in summary.parents for name in operators(parent)] + [
            op.operator_name for op in summary.operators_stats]

    report = {}
    for intent in ("auto", "require"):
        cfg.resources.gpu = intent
        seen = {a.actor_id for a in list_actors(address=address, limit=10_000)}
        result = stream.run_extraction(series, cfg, checkpoint, f"{out}/{intent}", progress=None)
        report[intent] = {
            "series": len(result.metrics), "errors": len(result.errors),
            "operators": operators(result.stats),
            "segmenters": _new_actors(address, seen, "Segmenter")}

    # Ray Train on the fake GPU: NCCL cannot start without CUDA, so the workers must train on
    # the GPU node's CPU over gloo, and the driver says why.
    said = []
    handler = logging.Handler()
    handler.emit = said.append
    logging.getLogger("pipeline.resources").addHandler(handler)
    seen = {a.actor_id for a in list_actors(address=address, limit=10_000)}
    trained = train_autoencoder(tables.path(f"{out}/require", tables.DISCS), cfg, bottleneck=3,
                                storage_path=f"{out}/autoencoder", name="k3", progress=None,
                                max_epochs=2)
    report["training"] = {"epochs": trained.epochs,
                          "workers": _new_actors(address, seen, "RayTrainWorker"),
                          "said": [record.getMessage() for record in said]}

    @ray.remote(num_gpus=1)
    def device_twice() -> tuple[list[str], list[str]]:
        said = []
        handler = logging.Handler()
        handler.emit = said.append
        logging.getLogger("pipeline.resources").addHandler(handler)
        devices = [str(resources.torch_device()) for _ in range(2)]
        return devices, [record.getMessage() for record in said]

    report["devices"], report["said"] = ray.get(device_twice.remote())
    report["nodes"] = [{"node_id": n["NodeID"], "resources": n["Resources"]}
                       for n in ray.nodes() if n["Alive"]]
    print("REPORT " + json.dumps(report), flush=True)


@pytest.mark.slow
def test_require_launches_a_gpu_node_and_the_segmenters_run_there(autoscaling_cluster,
                                                                  tmp_path):
    address, ray_bin = autoscaling_cluster
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.test_autoscaling import drive; "
         "drive(*sys.argv[1:])", address, str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(next(line for line in run.stdout.splitlines()
                             if line.startswith("REPORT "))[len("REPORT "):])
    status = subprocess.run([ray_bin, "status", f"--address={address}"], env=env,
                            capture_output=True, text=True, timeout=60).stdout
    print(json.dumps(report, indent=1), status, sep="\n")
    active = status.split("Active:", 1)[1].split("Pending:", 1)[0]
    assert f"1 {GPU_NODE_TYPE}" in active, status  # the node type the autoscaler launched
    gpu_nodes = {n["node_id"] for n in report["nodes"] if n["resources"].get("GPU")}
    head = {n["node_id"] for n in report["nodes"] if not n["resources"].get("GPU")}
    assert len(gpu_nodes) == 1, "the autoscaler must have launched the GPU node type"

    auto, require = report["auto"], report["require"]
    for outcome in (auto, require):
        assert outcome["series"] == 2 and outcome["errors"] == 0
        assert outcome["segmenters"], "no Segmenter actor found"
    assert all("GPU" not in a["resources"] for a in auto["segmenters"])
    assert {a["node_id"] for a in auto["segmenters"]} <= head | gpu_nodes
    assert all(a["resources"].get("GPU") == 1 for a in require["segmenters"])
    assert {a["node_id"] for a in require["segmenters"]} == gpu_nodes
    # with GPU actors, reading and preprocessing are CPU tasks of their own, not fused in
    segmenter_ops = [op for op in require["operators"] if "Segmenter" in op]
    assert segmenter_ops and not any("read_series" in op for op in segmenter_ops)
    assert any("read_series" in op for op in require["operators"])
    training = report["training"]
    assert training["epochs"] == 2
    # a Train worker's resources are its placement group's: GPU_group_<id>
    assert training["workers"] and all(
        any(k.startswith("GPU") and v == 1 for k, v in w["resources"].items())
        for w in training["workers"])
    assert {w["node_id"] for w in training["workers"]} == gpu_nodes
    assert any("no usable CUDA" in line for line in training["said"]), training["said"]
    # the fake GPU has no CUDA behind it: CPU, said once
    assert report["devices"] == ["cpu", "cpu"]
    assert len(report["said"]) == 1 and "CUDA is not available" in report["said"][0]

"""Training workers are sized from the cluster's shape, not from the CPUs free this instant."""

import time

import ray

from pipeline import resources
from pipeline.config import ResourcesConfig


def worker_layout(num_workers: int) -> tuple[int, bool, float]:
    layout = resources.training(ResourcesConfig(), num_workers)
    return layout.count, layout.gpu, layout.cpus


@ray.remote(num_cpus=1)
class CpuHolder:
    def ready(self) -> bool:
        return True


def _node_cpus() -> list[float]:
    return [n["Resources"]["CPU"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]


def test_layout_ignores_a_cpu_held_a_moment_longer(ray_session):
    """A task or actor still holding a CPU (Ray Data's, just finishing) must not shrink the
    trainer's share: that gave the autoencoder's worker one torch thread instead of two."""
    (cpus,) = _node_cpus()  # the session's Ray is one node
    holder = CpuHolder.remote()
    try:
        ray.get(holder.ready.remote())
        deadline = time.monotonic() + 10  # the free-CPU view itself lags
        while ray.available_resources().get("CPU", 0) > cpus - 1:
            assert time.monotonic() < deadline, "the held CPU never showed as taken"
            time.sleep(0.1)
        assert worker_layout(1) == (1, False, cpus)
    finally:
        ray.kill(holder)


def test_layout_shares_the_smallest_node_among_workers(ray_session):
    cpus = _node_cpus()
    workers, use_gpu, per_worker = worker_layout(2 * len(cpus))
    assert (workers, use_gpu) == (2 * len(cpus), False)
    assert per_worker == max(1.0, min(cpus) // 2)
    assert worker_layout(0)[0] == len(cpus)  # 0: one worker per node

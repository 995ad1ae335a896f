"""How many Ray Train workers a run gets, and how many CPUs (or a GPU) each, from the cluster.

Sized from the nodes' total resources, never from `ray.available_resources()`, which lags the
release of CPUs that Ray Data tasks held a moment earlier. Sized from it, the autoencoder's one
worker on a 2-CPU laptop got 1 CPU (so 1 torch thread) instead of 2 in some runs and trained
~1.4x slower per epoch. Stages run one after another, so the CPUs are free when a trainer asks.
"""

from __future__ import annotations

import math


def worker_layout(num_workers: int) -> tuple[int, bool, float]:
    """(workers, use_gpu, CPUs per worker): one worker per GPU when there are GPUs (or
    `num_workers` of them); otherwise `num_workers` (0: one per node), sharing the CPUs of the
    smallest node, at most a whole node each."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return (num_workers or gpus), True, 1.0
    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes()
                 if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
    if not node_cpus:
        raise ValueError("the Ray cluster has no CPUs to train on")
    workers = num_workers or len(node_cpus)
    per_worker = max(1.0, math.floor(min(node_cpus) * len(node_cpus) / workers))
    return workers, False, float(min(per_worker, max(node_cpus)))

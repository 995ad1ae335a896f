"""Who gets which CPUs and GPUs: the one place that sizes training workers, the inference actor
pools and the sweep's trials, from the config's GPU intent and the cluster's shape.

- GPU intent (`resources.gpu`). "auto" uses GPUs only if the cluster has some. "require" makes
  every training worker, Segmenter and Encoder ask for a GPU even while the cluster has none (an
  autoscaler's GPU workers start at `min_workers: 0`): it asks the autoscaler for a GPU node and
  fails with a clear message if none joins within `resources.gpu_wait_s`.
- A GPU worker asks for `resources.cpus_per_gpu_worker` CPUs (at most what a GPU node has), for
  its data loading; one CPU per GPU starves it.
- Sized from the nodes' total resources, never from `ray.available_resources()`, which lags the
  release of CPUs that Ray Data tasks held a moment earlier. Sized from it, the autoencoder's one
  worker on a 2-CPU laptop got 1 CPU (so 1 torch thread) instead of 2 in some runs and trained
  ~1.4x slower per epoch. Stages run one after another, so the CPUs are free when a stage asks.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

from pipeline.config import ResourcesConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """What a stage's training workers, or the actors of its pool, are and ask for."""

    count: int  # training workers, or the most actors of a pool
    gpu: bool  # each asks for one GPU
    cpus: float  # CPUs each asks for
    threads: int  # torch threads each runs

    def resources(self) -> dict:
        return {"CPU": self.cpus, **({"GPU": 1} if self.gpu else {})}


@dataclass
class TrialPlan:
    """How the sweep's trials share the cluster."""

    concurrency: int  # trials at once
    trial_resources: dict  # what each Tune trial reserves
    threads: int  # torch threads per training process
    cpus_per_worker: float  # nested only: each TorchTrainer worker's CPU share
    node_cpus: float = 0.0  # the largest node's CPUs: no plain trial can hold more


def _nodes() -> list[dict]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _gpus() -> int:
    return int(sum(n.get("GPU", 0) for n in _nodes()))


def _cpus() -> float:
    return float(sum(n.get("CPU", 0) for n in _nodes()))


def wait_for_gpu(timeout_s: float) -> None:
    """Wait until a GPU node has joined, holding a one-GPU placement group meanwhile: a pending
    demand the autoscaler answers with a GPU node (Ray Data overwrites `request_resources`).
    RuntimeError after `timeout_s`: a cluster that can never start one would otherwise hang."""
    if _gpus():
        return
    from ray.util.placement_group import placement_group, remove_placement_group

    logger.warning("resources.gpu=require: waiting up to %g s for a GPU node to join", timeout_s)
    demand = placement_group([{"GPU": 1}])
    try:
        if not demand.wait(timeout_seconds=timeout_s):
            raise RuntimeError(
                f"resources.gpu=require, but no GPU node joined the Ray cluster within "
                f"{timeout_s:g} s: give the cluster a GPU node type the autoscaler can "
                f"launch (cluster.yaml's gpu_worker), or run with --set resources.gpu=auto "
                f"to train on CPUs")
    finally:
        remove_placement_group(demand)  # the stage's own GPU requests keep the node busy


def use_gpus(res: ResourcesConfig) -> bool:
    """Whether the stage's workers ask for GPUs; under "require", once a GPU node is up."""
    if res.gpu == "require":
        wait_for_gpu(res.gpu_wait_s)
        return True
    return _gpus() > 0


def _gpu_worker_cpus(res: ResourcesConfig) -> float:
    """CPUs per GPU worker: the configured count, at most what the smallest GPU node has."""
    gpu_node_cpus = [n.get("CPU", 0) for n in _nodes() if n.get("GPU", 0) >= 1]
    return float(min(res.cpus_per_gpu_worker, *gpu_node_cpus))


def training(res: ResourcesConfig, num_workers: int, trainers: int = 1) -> Layout:
    """Ray Train workers: one per GPU (or `num_workers` of them) when GPUs are used; otherwise
    `num_workers` (0: one per node) sharing the CPUs of the smallest node, at most a whole node
    each. `trainers`: trainers running at once (cross-fitted folds) that split the CPUs, so
    2 folds on one 2-CPU node get a 1-CPU worker each."""
    if use_gpus(res):
        cpus = _gpu_worker_cpus(res)
        return Layout(num_workers or _gpus(), True, cpus, max(1, int(cpus)))
    node_cpus = [n.get("CPU", 0) for n in _nodes() if n.get("CPU", 0) >= 1]
    if not node_cpus:
        raise ValueError("the Ray cluster has no CPUs to train on")
    workers = num_workers or max(1, len(node_cpus) // trainers)
    per_worker = max(1.0, math.floor(min(node_cpus) * len(node_cpus) / (workers * trainers)))
    cpus = float(min(per_worker, max(node_cpus)))
    return Layout(workers, False, cpus, max(1, int(cpus)))


def segmenter_pool(res: ResourcesConfig) -> Layout:
    """Segmenter actors: one per GPU; on CPUs, one single-threaded actor per two CPUs (at least
    one), leaving the rest to the read and extract tasks that keep the actors fed."""
    if use_gpus(res):
        cpus = _gpu_worker_cpus(res)
        return Layout(_gpus(), True, cpus, max(1, int(cpus)))
    return Layout(max(1, int(_cpus()) // 2), False, 1.0, 1)


def encoder_pool(res: ResourcesConfig, n_batches: int) -> Layout:
    """Encoder actors: one per GPU; on CPUs one single-threaded actor per CPU less one for
    reading; never more than there are batches."""
    if use_gpus(res):
        cpus = _gpu_worker_cpus(res)
        return Layout(max(1, min(_gpus(), n_batches)), True, cpus, max(1, int(cpus)))
    return Layout(max(1, min(int(_cpus()) - 1, n_batches)), False, 1.0, 1)


def classification_cells(n_cells: int) -> Layout:
    """Classification cells as Ray tasks: the cluster's CPUs shared among the cells, one CPU
    each at least and at most the smallest node's; LightGBM runs one thread per CPU of its task,
    so a cell never oversubscribes the share it asked for."""
    node_cpus = [n.get("CPU", 0) for n in _nodes() if n.get("CPU", 0) >= 1]
    if not node_cpus:
        raise ValueError("the Ray cluster has no CPUs to classify on")
    cpus = float(min(max(1, math.floor(sum(node_cpus) / max(n_cells, 1))), min(node_cpus)))
    return Layout(n_cells, False, cpus, int(cpus))


def sweep(res: ResourcesConfig, n_trials: int, nested: bool, num_workers: int = 1) -> TrialPlan:
    """The sweep's trial plan for this cluster (see plan_trials)."""
    node_cpus = max(n.get("CPU", 0) for n in _nodes())
    if use_gpus(res):
        return plan_trials({"CPU": _cpus(), "GPU": _gpus()}, n_trials, nested, num_workers,
                           gpu_trial_cpus=_gpu_worker_cpus(res), node_cpus=node_cpus)
    return plan_trials({"CPU": _cpus()}, n_trials, nested, num_workers, node_cpus=node_cpus)


def plan_trials(resources: dict, n_trials: int, nested: bool, num_workers: int = 1,
                gpu_trial_cpus: float = 1.0, node_cpus: float | None = None) -> TrialPlan:
    """Size trial concurrency from the cluster's resources.

    Plain trials train in the trial itself and reserve their real share: a GPU and
    `gpu_trial_cpus` CPUs each where there are GPUs, else the CPUs split among the trials that
    run at once, up to two trials per CPU (3 single-threaded trials on 2 CPUs finish in 1.5
    trial-times, not 2 with one core idle at the end). Nested trials reserve almost nothing ({"cpu": 0.01}: a trial reserving a whole
    CPU beside its trainer's workers never starts on 2 CPUs) and give their workers fractional
    CPUs, leaving a CPU for Ray Data. A trial runs on one node: its share is at most `node_cpus`
    (the largest node's; None: the cluster is one node).
    """
    cpus, gpus = float(resources.get("CPU", 0.0)), int(resources.get("GPU", 0))
    node_cpus = cpus if node_cpus is None else float(node_cpus)
    if cpus < 0.5:
        raise ValueError(f"the cluster has {cpus:g} CPUs: not enough for a sweep trial")
    if not nested:
        concurrency = min(n_trials, gpus if gpus else max(1, int(2 * cpus)))
        share = min(cpus / concurrency, node_cpus)
        if gpus:
            return TrialPlan(concurrency, {"cpu": gpu_trial_cpus, "gpu": 1},
                             max(1, int(gpu_trial_cpus)), 0.0, node_cpus)
        return TrialPlan(concurrency, {"cpu": share}, max(1, int(share)), 0.0, node_cpus)
    slots = gpus // num_workers if gpus else int(cpus // num_workers)
    concurrency = max(1, min(n_trials, slots))
    trial_cpu = 0.01
    spare = min(1.0, cpus / 2)  # for the Ray Data read of each trial's training cubes
    per_worker = max(0.1, (cpus - spare - trial_cpu * concurrency) / (concurrency * num_workers))
    return TrialPlan(concurrency, {"cpu": trial_cpu}, max(1, int(per_worker)), per_worker,
                     node_cpus)


def torch_backend(layout: Layout) -> str:
    """The process group backend for a training layout: NCCL only for GPU workers that can use
    CUDA. A one-GPU probe task asks a GPU node: a granted GPU without CUDA behind it (a test
    cluster's fake GPU, a broken driver) would fail NCCL's start-up, so such workers train on
    their CPUs over gloo (and say so, see torch_device)."""
    if not layout.gpu:
        return "gloo"
    import ray

    return _gpu_backend(ray.get_runtime_context().gcs_address)


@functools.cache
def _gpu_backend(cluster: str) -> str:
    """torch_backend's probe, asked once per cluster (a job trains one segmenter per fold)."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def has_cuda() -> bool:
        import torch

        return torch.cuda.is_available()

    if ray.get(has_cuda.remote()):
        return "nccl"
    logger.warning("the cluster's GPU nodes have no usable CUDA: training on their CPUs")
    return "gloo"


def step_autocast(device, bf16: bool):
    """The context a training step's forward pass runs in (call it: `with step_autocast(d,
    True)():`): bfloat16 autocast where asked and `device` computes bf16 natively, else a
    disabled autocast (float32). Losses, weights, optimizers and evaluation stay float32."""
    import torch

    device_type = torch.device(device).type
    return functools.partial(torch.autocast, device_type, dtype=torch.bfloat16,
                             enabled=bf16 and native_bf16(device_type))


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether `device_type` computes bfloat16 natively (AVX-512 BF16 or AMX CPUs, Ampere and
    later GPUs); elsewhere autocast would emulate it, slower than float32."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch build without oneDNN
            return False
    return False


_said_no_cuda = False


def torch_device(train_worker: bool = False):
    """CUDA when this process has it, else the CPU. A process Ray granted a GPU where CUDA is
    unavailable (a test cluster's fake GPU, a broken driver) runs on the CPU and says so once.
    A Ray Train worker (`train_worker`) takes its own GPU among those its node's workers share."""
    import ray
    import torch

    global _said_no_cuda
    if torch.cuda.is_available():
        # Ray Train shows a worker all of its node's training GPUs (for NCCL) and picks the
        # local rank's; any other actor sees only the GPU Ray granted it, as cuda:0.
        if train_worker:
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cuda")
    if not _said_no_cuda and ray.is_initialized() and ray.get_gpu_ids():
        _said_no_cuda = True
        logger.warning("granted GPU %s by Ray, but CUDA is not available here: running on CPU",
                       ray.get_gpu_ids())
    return torch.device("cpu")

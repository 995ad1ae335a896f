"""Training the disc autoencoder: one epoch loop, run plainly or on Ray Train.

`fit_epochs` is the whole training procedure (BCE alone, or BCE or a focal loss plus soft Dice,
on logits; Adam at a constant or one-cycle learning rate; and every `eval_every` epochs an
eval-mode pass over ALL training discs whose mean IoU decides convergence). The Ray Train loop,
the sweep's laptop path and the benchmark all call it, so they train the same way.

`train_autoencoder` runs it on Ray Train: reference-mask cubes of training patients are read with
Ray Data into the object store and cut into one part per worker; each worker streams only its own
part, once, and keeps it in memory packed eight voxels to a byte (`packed`; hundreds of epochs
must not restart a data pipeline each), unpacking a batch at a time onto its device. No process
holds the whole training set, the driver none of it. Checkpoints go through `ray.train.report`,
and re-running with the same storage_path and name resumes from the last one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline import resources
from pipeline.config import Config, SweepConfig
from pipeline.data import checkpoints, storage, tables
from pipeline.progress import WorkerProgress, send
from pipeline.shape.model import (
    DiscAutoencoder,
    as_input,
    disc_iou,
    has_converged,
    iou_summary,
    out_of_reach,
    plateaued,
    save_checkpoint,
)
from pipeline.shape.packed import PackedCubes, packed

EVAL_BATCH = 32
LOAD_BATCH = 256  # cubes unpacked at once while reading: 64 MiB of 64³ cubes
LOSSES = ("bce", "bce+dice", "focal+dice")
FOCAL_GAMMA = 2.0  # the focal term's (1 - p_t)^gamma: Lin et al.'s default
FOCAL_WEIGHT = 4.0  # against the Dice term: (1 - p_t)^2 makes the voxel mean small
ONE_CYCLE_WARMUP = 0.3  # the share of a one-cycle run that climbs to its peak learning rate
SCHEDULES = ("constant", "onecycle")


@dataclass
class EpochStats:
    epoch: int  # epochs trained so far (1 after the first)
    loss: float  # mean training loss over the epochs since the previous entry
    mean_iou: float  # eval-mode mean over ALL training discs after this epoch
    iou_ci_low: float  # 95% CI resampling patients (discs when their patients are not known)
    iou_ci_high: float
    n_discs: int
    seconds: float
    converged: bool  # has_converged on this epoch's per-disc IoUs


@dataclass
class Fit:
    history: list[EpochStats]
    converged: bool = False
    stopped_early: bool = False  # the stop rule ended training before convergence
    done: bool = False  # converged, stopped early, or max_epochs reached

    @property
    def last(self) -> EpochStats:
        return self.history[-1]


def _gather_local(value):
    return [value]


def one_cycle_lr(step: int, total_steps: int, max_lr: float, warmup: float = ONE_CYCLE_WARMUP,
                 start_div: float = 25.0, final_div: float = 1e4) -> float:
    """The one-cycle learning rate at optimizer step `step` (0-based) of `total_steps`: cosine
    up from max_lr/start_div to max_lr over the first `warmup` of the run, then cosine down to
    max_lr/final_div (torch's OneCycleLR, as a function of the step so a resumed run continues
    on the same curve without scheduler state)."""
    peak = max(1, round(warmup * total_steps))
    if step < peak:
        start, end, t = max_lr / start_div, max_lr, step / peak
    else:
        start, end = max_lr, max_lr / final_div
        t = min(1.0, (step - peak) / max(1, total_steps - peak))
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def reconstruction_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The voxel loss on logits, plus (but for "bce") a soft Dice term per disc: BCE alone is
    dominated by the background voxels of a cube and stalls short of IoU 0.995 at small
    bottlenecks.

    "focal+dice" weighs each voxel's BCE by (1 - p_t)^2 (focal loss): the voxels still on the
    wrong side of 0.5, the ones IoU counts, carry the gradient once most are right. k=4 reached
    IoU 0.995 at epochs 220-240 of a 300-epoch cycle, where BCE + Dice needed 275-280 of a
    350-epoch one (bench/convergence_criterion.py's discs).
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown autoencoder loss {kind!r}; choose from {', '.join(LOSSES)}")
    if kind == "bce":
        return nn.functional.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    if kind == "bce+dice":
        voxel = nn.functional.binary_cross_entropy_with_logits(logits, target)
    else:
        bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_wrong = torch.where(target > 0.5, 1 - p, p)  # 1 - p_t
        voxel = FOCAL_WEIGHT * (p_wrong ** FOCAL_GAMMA * bce).mean()
    p, t = p.flatten(1), target.flatten(1)
    dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return voxel + (1 - dice).mean()


def fit_epochs(model: nn.Module, cubes: PackedCubes | torch.Tensor | np.ndarray,
               optimizer: torch.optim.Optimizer, *, batch_size: int, max_epochs: int,
               iou_target: float, history: Sequence[EpochStats] = (), seed: int = 0,
               device: torch.device | str = "cpu",
               stop_rule: Callable[[list[float]], bool] | None = None,
               on_epoch: Callable[[Fit], None] | None = None,
               on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
               gather: Callable[[object], list] = _gather_local, loss: str = "bce",
               lr_at: Callable[[int, int], float] | None = None, eval_every: int = 1,
               groups: Sequence | np.ndarray | None = None, bf16: bool = False) -> Fit:
    """Train until the whole-set mean IoU reaches `iou_target`, `stop_rule` fires on the list
    of measured mean IoUs, or `max_epochs` epochs are done (counting those in `history`, so a
    resumed run continues where it stopped).

    cubes: the binary cubes this process trains on: PackedCubes, or (N, S, S, S) to pack
        (held packed, unpacked a batch at a time onto `device`).
    loss: "bce", "bce+dice" or "focal+dice" (`reconstruction_loss`).
    lr_at(step, total_steps) -> learning rate of each optimizer step over the max_epochs run
        (a function of the step, so a resumed run continues on the same schedule); None keeps
        the optimizer's own.
    eval_every: epochs between the eval-mode passes over every training disc (the last epoch is
        always measured); convergence is only ever judged on such a pass. One history entry per
        pass.
    on_epoch(fit): called after every measured epoch with the run so far (report, checkpoint).
    on_batch(x, logits): called after every optimizer step with the batch and its train-mode
        logits (detached): what the published code judged convergence on (the benchmark
        compares that criterion with the whole-epoch one).
    gather(obj) -> one obj per process: combines the per-disc IoUs and step counts of data-
        parallel workers (all_gather_object under Ray Train); every process then takes the same
        decisions, and all run the same number of steps per epoch.
    groups: the patient of each of this process's cubes: the mean IoU's CI then resamples
        patients (None: discs).
    bf16: forward passes of training steps in bfloat16 autocast where `device` computes bf16
        natively (`resources.native_bf16`); the loss, weights, optimizer and eval passes stay
        float32.
    """
    if batch_size < 1 or max_epochs < 1 or eval_every < 1:
        raise ValueError(f"batch_size, max_epochs and eval_every must be at least 1; got "
                         f"{batch_size}, {max_epochs}, {eval_every}")
    data = packed(cubes)
    n_local = len(data)
    n_max = max(gather(n_local))
    if n_local == 0:
        raise ValueError("no training discs for this worker")
    steps = math.ceil(n_max / batch_size)
    if groups is not None and len(groups) != n_local:
        raise ValueError(f"{len(groups)} patient ids for {n_local} cubes")
    # every process's patients, in the order gather returns their IoUs
    patients = None if groups is None else np.concatenate(
        [np.asarray(g, dtype=object) for g in gather(list(groups))])
    net = getattr(model, "module", model)  # eval on the unwrapped model: no DDP collectives
    fit = Fit(list(history))
    autocast = resources.step_autocast(device, bf16)

    def epochs_done() -> int:
        return fit.history[-1].epoch if fit.history else 0

    def judge() -> None:
        ious = [s.mean_iou for s in fit.history]
        fit.converged = bool(fit.history) and fit.history[-1].converged
        fit.stopped_early = (not fit.converged and stop_rule is not None and bool(ious)
                             and stop_rule(ious))
        fit.done = fit.converged or fit.stopped_early or epochs_done() >= max_epochs

    judge()
    while not fit.done:
        start = time.perf_counter()
        model.train()
        first = epochs_done()
        block = min(eval_every - first % eval_every, max_epochs - first)
        loss_sum = 0.0
        for epoch in range(first, first + block):
            # seeded per epoch, so a resumed run shuffles as an uninterrupted one would
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(n_local, generator=generator)
            order = order.repeat(math.ceil(steps * batch_size / n_local))[: steps * batch_size]
            for step in range(steps):
                if lr_at is not None:
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(epoch * steps + step, max_epochs * steps)
                x = as_input(data.take(order[step * batch_size:(step + 1) * batch_size]),
                             device)
                optimizer.zero_grad(set_to_none=True)
                with autocast():
                    logits = model(x).float()
                batch_loss = reconstruction_loss(logits, x, loss)
                batch_loss.backward()
                optimizer.step()
                loss_sum += float(batch_loss.detach())
                if on_batch is not None:
                    on_batch(x, logits.detach())
        # Data-parallel workers' BatchNorm running statistics drift apart on their own last
        # batches: every worker evaluates with rank 0's, the model that gets checkpointed.
        reference = gather({k: b.detach().cpu() for k, b in net.named_buffers()})[0]
        with torch.no_grad():
            for name, buffer in net.named_buffers():
                buffer.copy_(reference[name])
        ious = np.concatenate(gather(evaluate_ious(net, data, device)))  # every training disc
        mean, low, high = iou_summary(ious, patients)
        fit.history.append(EpochStats(
            first + block, float(np.mean(gather(loss_sum / (steps * block)))), mean, low, high,
            int(ious.size), time.perf_counter() - start, has_converged(ious, iou_target)))
        judge()
        if on_epoch is not None:
            on_epoch(fit)
    return fit


@torch.inference_mode()
def evaluate_ious(model: nn.Module, cubes: PackedCubes | torch.Tensor | np.ndarray,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """Per-disc IoU of the eval-mode reconstruction (sigmoid > 0.5) against each input cube."""
    data = packed(cubes)
    was_training = model.training
    model.eval()
    # Written into one array: a small tensor kept per batch pins each batch's freed megabytes
    # in glibc's heap (+2.7 GiB resident over 16,668 discs after training; bench/scale.py).
    ious = np.empty(len(data))
    for i in range(0, len(data), EVAL_BATCH):
        x = as_input(data.take(np.arange(i, min(i + EVAL_BATCH, len(data)))), device)
        ious[i:i + len(x)] = disc_iou(model(x), x, logits=True).cpu().numpy()
    model.train(was_training)
    return ious


@dataclass(frozen=True)
class EarlyStop:
    """When a sweep trial that will not reach the IoU target stops (SweepConfig's fields)."""

    plateau_epochs: int  # the best mean IoU has not risen by plateau_min_delta in this many
    plateau_min_delta: float
    reach_window: int = 0  # out of reach at the pace of this many epochs (0: rule off)

    @classmethod
    def from_config(cls, sweep: SweepConfig) -> EarlyStop | None:
        if not sweep.early_stop:
            return None
        return cls(sweep.plateau_epochs, sweep.plateau_min_delta, sweep.reach_window)


@dataclass(frozen=True)
class TrainSpec:
    """Everything one training process needs (picklable: it travels to Ray workers)."""

    channels: tuple[int, ...]
    bottleneck: int
    lr: float
    batch_size: int
    max_epochs: int
    iou_target: float
    checkpoint_every: int
    seed: int = 0
    early_stop: EarlyStop | None = None
    loss: str = "bce"
    schedule: str = "constant"
    eval_every: int = 1
    bf16: bool = False
    adam_beta2: float = 0.999

    @classmethod
    def from_config(cls, cfg: Config, bottleneck: int, max_epochs: int | None = None,
                    early_stop: EarlyStop | None = None) -> TrainSpec:
        ae = cfg.autoencoder
        return cls(tuple(ae.channels), int(bottleneck), ae.lr, ae.batch_size,
                   int(max_epochs or ae.max_epochs), ae.iou_target, ae.checkpoint_every,
                   cfg.seed, early_stop, ae.loss, ae.schedule, ae.eval_every, ae.bf16,
                   ae.adam_beta2)

    def optimizer(self, model: nn.Module) -> torch.optim.Adam:
        """Adam for `model`'s parameters (on their device): fused into one kernel on CPUs and
        GPUs (on this 2-core CPU, 0.7 ms a step against 1.4 for torch's per-tensor loop)."""
        fused = next(model.parameters()).device.type in ("cpu", "cuda")
        return torch.optim.Adam(model.parameters(), lr=self.lr, betas=(0.9, self.adam_beta2),
                                fused=fused)

    def stop_rule(self) -> Callable[[list[float]], bool] | None:
        """The early stop on the measured mean IoUs (one every eval_every epochs): a plateau,
        or, once a one-cycle schedule's learning rate has fallen to a quarter of its peak, a
        target out of reach at the recent pace."""
        if self.early_stop is None:
            return None
        stop, every = self.early_stop, self.eval_every

        def entries(epochs: int) -> int:  # history entries, not epochs
            return max(1, math.ceil(epochs / every))

        tail = self.decay_tail()

        def rule(ious: list[float]) -> bool:
            if plateaued(ious, entries(stop.plateau_epochs), stop.plateau_min_delta):
                return True
            epoch = min(len(ious) * every, self.max_epochs)
            return (bool(stop.reach_window) and tail is not None and epoch >= tail
                    and out_of_reach(ious, entries(stop.reach_window),
                                     math.ceil((self.max_epochs - epoch) / every),
                                     self.iou_target))

        return rule

    def decay_tail(self) -> int | None:
        """The first epoch past a one-cycle schedule's peak whose learning rate is at most a
        quarter of the peak (None for a constant rate, which never decays)."""
        if self.schedule != "onecycle":
            return None
        peak = round(ONE_CYCLE_WARMUP * self.max_epochs)
        return next(e for e in range(peak, self.max_epochs + 1)
                    if one_cycle_lr(e, self.max_epochs, 1.0) <= 0.25)

    def lr_at(self) -> Callable[[int, int], float] | None:
        """The learning rate per step: constant `lr`, or one cycle peaking at `lr`."""
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown autoencoder schedule {self.schedule!r}; choose from "
                             f"{', '.join(SCHEDULES)}")
        if self.schedule == "constant":
            return None
        return lambda step, total: one_cycle_lr(step, total, self.lr)


def fit_summary(fit: Fit) -> dict:
    """The metrics every report carries (and a sweep trial's result). No "done" key: Tune reads
    it as "stop this trial now" and would kill a nested TorchTrainer before it releases its
    placement group."""
    last = fit.last
    return {"epochs": last.epoch, "loss": last.loss, "mean_iou": last.mean_iou,
            "iou_ci_low": last.iou_ci_low, "iou_ci_high": last.iou_ci_high,
            "n_discs": last.n_discs, "converged": fit.converged,
            "stopped_early": fit.stopped_early}


def train_cubes(cubes: PackedCubes | np.ndarray | torch.Tensor, spec: TrainSpec, *,
                report: Callable[[dict, str | None], None], restore_dir: str | None = None,
                device: torch.device | str = "cpu",
                prepare: Callable[[nn.Module], nn.Module] | None = None,
                gather: Callable[[object], list] = _gather_local, rank: int = 0,
                groups: Sequence | np.ndarray | None = None) -> Fit:
    """Build (or restore) the model and optimizer and run fit_epochs, checkpointing every
    `spec.checkpoint_every` epochs and at the end through `report(metrics, checkpoint_dir)`
    (ray.train.report or ray.tune.report). Only rank 0 writes the checkpoint folder."""
    torch.manual_seed(spec.seed)
    cubes = packed(cubes)
    model = DiscAutoencoder(cubes.side, spec.channels, spec.bottleneck)
    history: list[EpochStats] = []
    optimizer_state = None
    if restore_dir is not None:
        meta = checkpoints.read_meta(restore_dir, "autoencoder")
        if meta["architecture"] != model.architecture:
            raise ValueError(f"checkpoint {restore_dir} holds {meta['architecture']}, not "
                             f"{model.architecture}: use a new run name for a new model")
        model.load_state_dict(checkpoints.read_state(restore_dir))
        optimizer_state = checkpoints.read_state(restore_dir, checkpoints.OPTIMIZER_FILE)
        history = [EpochStats(**h) for h in meta["history"]]
    model = prepare(model) if prepare is not None else model.to(device)
    optimizer = spec.optimizer(model)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    def checkpoint(fit: Fit) -> None:
        previous = fit.history[-2].epoch if len(fit.history) > 1 else 0
        if not (fit.done or fit.last.epoch // spec.checkpoint_every
                > previous // spec.checkpoint_every):
            return
        metrics = fit_summary(fit)
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                meta = {**metrics, "iou_target": spec.iou_target, "spec": asdict(spec),
                        "history": [asdict(s) for s in fit.history]}
                save_checkpoint(folder, model, meta, optimizer)
            report(metrics, folder if rank == 0 else None)

    return fit_epochs(model, cubes, optimizer, batch_size=spec.batch_size,
                      max_epochs=spec.max_epochs, iou_target=spec.iou_target, history=history,
                      seed=spec.seed, device=device, stop_rule=spec.stop_rule(),
                      on_epoch=checkpoint, gather=gather, loss=spec.loss, lr_at=spec.lr_at(),
                      eval_every=spec.eval_every, groups=groups, bf16=spec.bf16)


def _training_filter(cfg: Config) -> list[tuple[str, str, object]]:
    """Reference-mask discs of the training splits whose cube held the whole disc (a clipped
    cube would teach the autoencoder a cut-off shape), as pyarrow filters."""
    return [("mask_source", "=", "reference"), ("split", "in", list(cfg.autoencoder.train_splits)),
            ("cube_fits", "=", True)]


def _no_training_discs(discs_path: str, cfg: Config) -> ValueError:
    return ValueError(f"{discs_path} has no reference cubes that hold their whole disc in "
                      f"splits {tuple(cfg.autoencoder.train_splits)}")


def _pack_batches(batches) -> tuple[PackedCubes, np.ndarray] | None:
    """(cubes, patient ids) batches -> all of them packed as they arrive, and the patients;
    None when there were none."""
    cubes, patients = [], []
    for block, ids in batches:
        if len(block):
            cubes.append(PackedCubes.pack(block))
            patients.append(np.asarray(ids, dtype=object))
    return (PackedCubes.concat(cubes), np.concatenate(patients)) if cubes else None


def count_training_discs(discs_path: str, cfg: Config) -> int:
    """How many discs the autoencoder trains on; none is an error that names the table."""
    tables.require_discs(discs_path)
    n = tables.count_rows(discs_path, _training_filter(cfg))
    if n == 0:
        raise _no_training_discs(discs_path, cfg)
    return n


def load_training_cubes(discs_path: str, cfg: Config, with_patients: bool = False):
    """PackedCubes of the reference-mask discs of the training splits, read from the table a
    batch at a time and packed as read (a sweep trial's own copy, the benchmark's; Ray Train
    workers each read their part with Ray Data instead); with_patients: (cubes, the patient_id
    of each)."""
    import ray.data  # noqa: F401  registers the tensor type of the cube column

    tables.require_discs(discs_path)
    files = storage.iter_tables(discs_path, [tables.CUBE, "patient_id"], _training_filter(cfg))
    loaded = _pack_batches(
        (tables.stack_cubes(batch.column(tables.CUBE)), batch.column("patient_id").to_pylist())
        for table in files for batch in table.to_batches(max_chunksize=LOAD_BATCH))
    if loaded is None:
        raise _no_training_discs(discs_path, cfg)
    return loaded if with_patients else loaded[0]


def training_dataset(discs_path: str, cfg: Config):
    """Ray Dataset of the cube and patient_id columns of reference-mask discs of the training
    splits."""
    return tables.discs_dataset(discs_path, [tables.CUBE, "patient_id"], _training_filter(cfg))


@dataclass
class AutoencoderResult:
    checkpoint_path: str
    bottleneck: int
    mean_iou: float  # whole-training-set mean IoU after the last epoch
    iou_ci_low: float  # 95% CI resampling patients
    iou_ci_high: float
    epochs: int  # to convergence, to the early stop, or max_epochs
    converged: bool
    stopped_early: bool
    wall_s: float
    threads_per_worker: int  # torch threads each worker trained with, as it reported
    discs_per_worker: list[int]  # the training discs each worker read and held, by rank
    history: list[dict] = field(default_factory=list)  # one EpochStats dict per epoch


def training_parts(dataset, workers: int) -> dict:
    """The training discs cut into one part per worker (`train0`, `train1`, ...), row-exact: each
    disc lands on exactly one worker, parts differ by at most one disc, and a worker reads only
    its own. (Ray Train's streaming split would drop up to workers-1 discs from the convergence
    test to make the shards equal.)"""
    n = dataset.count()
    parts = dataset.split_at_indices([n * rank // workers for rank in range(1, workers)]) \
        if workers > 1 else [dataset]
    return {f"train{rank}": part for rank, part in enumerate(parts)}


def _worker_cubes(part, rank: int) -> tuple[PackedCubes, np.ndarray]:
    """This worker's part of the training discs, packed as it streams in, and their patients."""
    loaded = _pack_batches((np.asarray(batch[tables.CUBE]), batch["patient_id"]) for batch in
                           part.iter_batches(batch_size=LOAD_BATCH, batch_format="numpy"))
    if loaded is None:
        raise ValueError(f"training worker {rank} got no discs")
    return loaded


def _all_gather(value) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _train_loop_per_worker(config: dict) -> dict:
    import ray.train
    import ray.train.torch

    spec: TrainSpec = config["spec"]
    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cubes, patients = _worker_cubes(ray.train.get_dataset_shard(f"train{rank}"), rank)
    gather = _gather_local if world == 1 else _all_gather
    held = gather(len(cubes))

    def report(metrics: dict, folder: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if rank == 0:
            send(config.get("progress"), f"autoencoder k={spec.bottleneck}: epoch "
                 f"{metrics['epochs']}/{spec.max_epochs}, loss {metrics['loss']:.4f}, "
                 f"mean IoU {metrics['mean_iou']:.4f}")

    restored = ray.train.get_checkpoint()
    device = resources.torch_device(train_worker=True)
    with restored.as_directory() if restored else contextlib.nullcontext() as folder:
        fit = train_cubes(cubes, spec, report=report, restore_dir=folder, device=device,
                          prepare=functools.partial(ray.train.torch.prepare_model,
                                                    move_to_device=device),
                          gather=gather, rank=rank, groups=patients)
    return {**fit_summary(fit), "history": [asdict(s) for s in fit.history],
            "threads": torch.get_num_threads(), "discs_per_worker": held}


def train_autoencoder(discs_path: str, cfg: Config, bottleneck: int, storage_path: str,
                      name: str, progress: Callable[[str], None] | None = print,
                      callbacks=None, *,
                      max_epochs: int | None = None, early_stop: EarlyStop | None = None,
                      cpus_per_worker: float | None = None) -> AutoencoderResult:
    """Train the autoencoder on Ray Train (TorchTrainer, cfg.autoencoder.num_workers workers,
    a GPU each when the cluster has GPUs) on the reference-mask cubes of training patients.

    A run with the same storage_path and name resumes from its last checkpoint (a finished
    run returns at once). max_epochs and early_stop override the config for sweeps;
    cpus_per_worker defaults to resources.training's share. progress=None prints nothing (a
    sweep's trials report through Tune instead).
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    spec = TrainSpec.from_config(cfg, bottleneck, max_epochs, early_stop)
    storage_path = storage.absolute(storage_path)
    say = progress or (lambda _: None)
    workers = cfg.autoencoder.num_workers
    if workers < 1:
        raise ValueError(f"autoencoder.num_workers must be at least 1; got {workers}")
    dataset = training_dataset(discs_path, cfg).materialize()
    n_discs = dataset.count()
    if n_discs < workers:
        raise ValueError(f"{discs_path} has {n_discs} training reference discs, fewer than the "
                         f"{workers} workers")
    layout = resources.training(cfg.resources, workers)
    if cpus_per_worker is not None:
        layout = dataclasses.replace(layout, cpus=cpus_per_worker,
                                     threads=max(1, int(cpus_per_worker)))
    say(f"autoencoder k={bottleneck}: {n_discs} training discs, {layout.count} worker(s) on "
        f"{'a GPU and ' if layout.gpu else ''}{layout.cpus:g} CPU each, "
        f"up to {spec.max_epochs} epochs")
    with WorkerProgress(progress) as sink:
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config={"spec": spec, "threads": layout.threads, "progress": sink},
            scaling_config=ScalingConfig(num_workers=layout.count, use_gpu=layout.gpu,
                                         resources_per_worker=layout.resources()),
            torch_config=TorchConfig(backend=resources.torch_backend(layout)),
            run_config=RunConfig(name=name, storage_path=storage_path,
                                 callbacks=callbacks,
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 failure_config=FailureConfig(max_failures=2)),
            datasets=training_parts(dataset, layout.count),
            dataset_config=DataConfig(datasets_to_split=[],
                                      execution_options=ExecutionOptions(preserve_order=True)),
        )
        start = time.perf_counter()
        result = trainer.fit()
    wall_s = time.perf_counter() - start
    if result.error is not None:
        raise result.error
    summary = result.return_value
    if result.checkpoint is None or summary is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint")
    outcome = AutoencoderResult(
        checkpoint_path=checkpoints.location(result.checkpoint, storage_path), bottleneck=int(bottleneck),
        mean_iou=summary["mean_iou"], iou_ci_low=summary["iou_ci_low"],
        iou_ci_high=summary["iou_ci_high"], epochs=summary["epochs"],
        converged=summary["converged"], stopped_early=summary["stopped_early"], wall_s=wall_s,
        history=summary["history"], threads_per_worker=summary["threads"],
        discs_per_worker=summary["discs_per_worker"])
    say(f"autoencoder k={bottleneck}: mean IoU {outcome.mean_iou:.4f} "
        f"({outcome.iou_ci_low:.4f}-{outcome.iou_ci_high:.4f}) after {outcome.epochs} epochs, "
        f"{'converged' if outcome.converged else 'not converged'}, {wall_s:.0f} s")
    return outcome

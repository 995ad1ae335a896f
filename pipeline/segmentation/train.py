"""Train the disc segmenter with Ray Train: the same loop on one CPU or many GPUs.

Ray Data reads and preprocesses every series once (in parallel, before training starts) and the
result is materialised, so the training workers never wait on, or compete for CPUs with, data
tasks. Each epoch every worker draws fresh random crops from its shard of training volumes;
validation runs sliding-window inference over whole validation volumes on the model grid, split
across workers and summed with an all-reduce so every worker takes the same early-stopping
decision. Each epoch reports a checkpoint (model.pt, optimizer.pt, meta.json with the whole
training state), so a restarted run with the same storage_path and name resumes where it was;
Ray keeps the best by validation IoU plus the latest. The epoch loop (`train_epochs`) is the
same in a Ray Train worker and in a hyperparameter sweep's trial (tune.trials), which runs it in
the trial itself on volumes preprocessed once (`preprocessed_volumes`).

`train_folds` cross-fits: one such run per fold of patients (pipeline.segmentation.folds), each
trained and selected without the patients it will segment, and each checkpoint's meta.json
records its fold and the patients it trained and selected on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray
import ray.train
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig, TorchTrainer, prepare_model
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

from pipeline import faults, resources
from pipeline.config import Config, SegmentationConfig
from pipeline.data import checkpoints, storage
from pipeline.progress import WorkerProgress, send
from pipeline.segmentation import folds as crossfit
from pipeline.segmentation import lean_monai, preprocess
from pipeline.segmentation import models as segmodels
from pipeline.segmentation.metrics import dice_iou

SCORE = "val_iou"  # early stopping and checkpoint selection, as in the paper
CROP_POOL_VOLUMES = 4  # crops of this many volumes are shuffled together into batches


@dataclass
class SegmenterResult:
    checkpoint_path: str  # the best checkpoint folder (path or URI): model.pt + meta.json
    best_val_dice: float  # in-sample: on the selection patients that chose this checkpoint
    best_val_iou: float
    epochs_run: int
    history: list[dict]  # one dict per epoch: epoch, train_loss, val_dice, val_iou, seconds
    wall_s: float
    skipped: list[dict] = dataclasses.field(default_factory=list)  # unreadable series: file, reason
    # As the checkpoint's meta.json records them: the cross-fitting fold (None outside
    # cross-fitting) and the patients of the series it trained on and selected on.
    fold: int | None = None
    training_patients: list[str] = dataclasses.field(default_factory=list)
    selection_patients: list[str] = dataclasses.field(default_factory=list)


def _usable(dataset) -> Iterator[dict]:
    """The rows of volumes that were read: an unreadable series stays in its split's dataset
    as an empty row (filtering would copy every volume) and is skipped here."""
    return (row for row in dataset.iter_rows() if not row["error"])


def _crop_batches(shard, transform, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random crops of the shard's volumes, shuffled within a small pool, in batches."""
    pool: list[dict] = []

    def drain(pool):
        random.shuffle(pool)
        for start in range(0, len(pool), batch_size):
            chunk = pool[start:start + batch_size]
            yield (torch.stack([c["image"] for c in chunk]),
                   torch.stack([c["label"] for c in chunk]).float())

    for n, row in enumerate(_usable(shard), start=1):
        sample = {"image": np.array(row["image"])[None], "label": np.array(row["label"])[None]}
        pool.extend(transform(sample))
        if n % CROP_POOL_VOLUMES == 0:
            yield from drain(pool)
            pool = []
    yield from drain(pool)


def _validate(model, val_part, seg: SegmentationConfig, device, world_size: int
              ) -> dict[str, float]:
    """Mean Dice and IoU over whole validation volumes (model grid): each worker scores its own
    part of the validation set (`val_parts`), and the sums are all-reduced."""
    lean_monai.load()
    from monai.inferers import sliding_window_inference

    network = getattr(model, "module", model)  # DDP's forward would wait for the other ranks
    network.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    with torch.inference_mode():
        for row in _usable(val_part):
            image = torch.from_numpy(np.array(row["image"]))[None, None].to(device)
            logits = sliding_window_inference(image, seg.roi_size, seg.batch_size, network,
                                              overlap=seg.inference_overlap, mode="gaussian")
            dice, iou = dice_iou((logits[0, 0] > 0).cpu().numpy(), row["label"])
            totals += torch.tensor([dice, iou, 1.0], dtype=torch.float64)
    if world_size > 1:
        reduced = totals.to(device)
        torch.distributed.all_reduce(reduced)
        totals = reduced.cpu()
    count = max(float(totals[2]), 1.0)
    return {"val_dice": float(totals[0]) / count, "val_iou": float(totals[1]) / count}


def _resume_state(model, optimizer, restored: str | None) -> dict:
    """Training state from a checkpoint folder to resume from, else a fresh one."""
    if restored is None:
        return {"epoch": 0, "best_epoch": 0, "best_val_iou": -1.0, "best_val_dice": -1.0,
                "history": []}
    getattr(model, "module", model).load_state_dict(checkpoints.read_state(restored))
    optimizer.load_state_dict(checkpoints.read_state(restored, checkpoints.OPTIMIZER_FILE))
    meta = checkpoints.read_meta(restored, "segmenter")
    return {key: meta[key] for key in ("epoch", "best_epoch", "best_val_iou", "best_val_dice",
                                       "history")}


def finished(state: dict, seg: SegmentationConfig) -> bool:
    """Training ends at segmentation.epochs, or after `patience` epochs without a better IoU."""
    return state["epoch"] >= seg.epochs or state["epoch"] - state["best_epoch"] >= seg.patience


@dataclass
class Loop:
    """Where one run of the epoch loop (`train_epochs`) gets its data and sends its epochs: a
    Ray Train worker (its dataset shards, ray.train.report) or a sweep trial (whole datasets,
    tune.report)."""

    rank: int
    world_size: int
    train: object  # anything with iter_rows(): a Ray Train shard or a materialised Dataset
    val: object
    device: torch.device
    restored: str | None  # a checkpoint folder to resume from
    report: Callable[[dict, dict, str | None], None]  # (state, metrics, checkpoint folder)
    prepare: Callable = lambda model, device: model.to(device)  # prepare_model under Train


def train_epochs(config: dict, loop: Loop) -> dict:
    """The epoch loop. config: segmentation (asdict of SegmentationConfig), seed, threads (torch
    threads for this process's CPU share), progress (a WorkerProgress sink or None), identity
    (recorded in each checkpoint's meta). Each epoch writes a checkpoint on rank 0 (model.pt,
    optimizer.pt, meta.json with the whole training state) and hands it to loop.report."""
    lean_monai.load()
    from monai.data import set_track_meta
    from monai.losses import DiceCELoss

    seg = segmodels.config_from_meta(config)
    torch.set_num_threads(config["threads"])
    set_track_meta(False)  # plain tensors out of MONAI transforms
    rank = loop.rank
    torch.manual_seed(config["seed"] + rank)
    random.seed(config["seed"] + rank)
    model = loop.prepare(segmodels.build_segmenter(seg), loop.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=seg.lr)
    loss_fn = DiceCELoss(sigmoid=True, batch=True, lambda_dice=0.5, lambda_ce=0.5)
    autocast = resources.step_autocast(loop.device, seg.bf16)
    state = _resume_state(model, optimizer, loop.restored)
    transform = preprocess.training_transform(seg.roi_size, seg.crops_per_volume,
                                              seed=config["seed"] + 1000 * state["epoch"] + rank)
    while not finished(state, seg):
        started = time.perf_counter()
        model.train()
        losses = []
        for images, targets in _crop_batches(loop.train, transform, seg.batch_size):
            optimizer.zero_grad()
            with autocast():
                logits = model(images.to(loop.device)).float()
            loss = loss_fn(logits, targets.to(loop.device))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        metrics = _validate(model, loop.val, seg, loop.device, loop.world_size)
        state["epoch"] += 1
        if metrics[SCORE] > state["best_val_iou"]:
            state.update(best_epoch=state["epoch"], best_val_iou=metrics["val_iou"],
                         best_val_dice=metrics["val_dice"])
        metrics.update(epoch=state["epoch"], train_loss=float(np.mean(losses)) if losses else math.nan,
                       seconds=time.perf_counter() - started)
        state["history"].append(metrics)
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                meta = {"segmentation": config["segmentation"], **config.get("identity", {}),
                        **state, **metrics}
                checkpoints.write(folder, model, meta, optimizer)
                send(config.get("progress"),
                     f"segmentation epoch {state['epoch']}/{seg.epochs}: loss "
                     f"{metrics['train_loss']:.3f}, val Dice {metrics['val_dice']:.3f}, IoU "
                     f"{metrics['val_iou']:.3f} (best {state['best_val_iou']:.3f} at epoch "
                     f"{state['best_epoch']}), {metrics['seconds']:.1f} s")
            loop.report(state, metrics, folder if rank == 0 else None)
    return state


def _committed_epoch(storage_path: str) -> int:
    """The epoch of the newest checkpoint Ray Train's controller has committed for this run (0
    if none): the one a restart resumes from. The controller registers a reported checkpoint
    when it next polls the workers, and then writes this snapshot."""
    run = storage.join(storage_path, ray.train.get_context().get_experiment_name())
    try:
        snapshot = json.loads(storage.read_bytes(
            storage.join(run, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)))
    except (FileNotFoundError, ValueError):  # none yet, or caught mid-write
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {"metrics": {"epoch": 0}}
    return int(latest["metrics"]["epoch"])


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train worker loop: train_epochs on this worker's shards, resuming from the checkpoint
    Ray hands a restarted run. config: train_epochs' and storage_path (the run's, to name the
    checkpoint a restart resumes from)."""
    context = ray.train.get_context()
    rank = context.get_world_rank()
    fold = config.get("identity", {}).get("fold")

    def report(state: dict, metrics: dict, folder: str | None) -> None:
        # dies with this epoch's checkpoint unreported, once the last one is committed: the
        # restart resumes from it (a point per fold: folds may train at once)
        faults.point(f"segtrain fold {fold} rank {rank} epoch {state['epoch']}", ready=lambda: (
            _committed_epoch(config["storage_path"]) >= state["epoch"] - 1))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if folder else None)

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as restored:
        if restored and rank == 0:
            epoch = checkpoints.read_meta(restored, "segmenter")["epoch"]
            send(config.get("progress"), f"segmentation: resuming after epoch {epoch} from "
                 f"{checkpoints.location(checkpoint, config['storage_path'])}")
        return train_epochs(config, Loop(
            rank, context.get_world_size(), ray.train.get_dataset_shard("train"),
            ray.train.get_dataset_shard(f"val{rank}"),
            resources.torch_device(train_worker=True), restored, report, prepare_model))


def val_parts(val, workers: int) -> dict:
    """The validation set cut into one part per training worker (`val0`, `val1`, ...) without a
    copy, so each worker reads only the volumes it scores. (Ray Train's own split would drop
    rows to make the parts equal, and with fewer volumes than workers, all of them.)"""
    parts = val.split(workers) if workers > 1 else [val]
    return {f"val{rank}": part for rank, part in enumerate(parts)}


def preprocessed_volumes(series: pd.DataFrame, cfg: Config, progress: Callable[[str], None]
                         ) -> tuple[dict, list[dict]]:
    """The "train" and "val" series read and preprocessed once by Ray Data and held once
    (materialised): {split: Dataset}, and the series that could not be read (series_id, file,
    reason), each said to `progress`. Raises if a split has no usable series."""
    seg = cfg.segmentation
    volumes, skipped = {}, []
    for split in ("train", "val"):  # preprocessed once, held once: one dataset per split
        rows = series.loc[series["split"] == split,
                          ["series_id", "image_uri", "mask_uri", "split"]].to_dict("records")
        no_usable = ValueError(f"no usable {split!r} series to train the segmenter with")
        if not rows:
            raise no_usable
        volumes[split] = (
            ray.data.from_items(rows, override_num_blocks=len(rows))
            .map(preprocess.load_training_volume,
                 fn_kwargs={"target_spacing_mm": tuple(seg.target_spacing_mm),
                            "roi_size": tuple(seg.roi_size),
                            "max_voxels": cfg.inputs.max_voxels})
            .materialize()
        )
        status = volumes[split].select_columns(["series_id", "error", "file"]).to_pandas()
        bad = status[status["error"] != ""]
        for row in bad.itertuples():
            progress(f"segmentation: skipping {row.series_id}: {row.error}")
            skipped.append({"series_id": row.series_id, "file": row.file, "reason": row.error})
        usable = len(status) - len(bad)
        if not usable:
            raise no_usable
        progress(f"segmentation: {usable} {split} series preprocessed")
    return volumes, skipped


def train_segmenter(series: pd.DataFrame, cfg: Config, storage_path: str, name: str,
                    progress: Callable[[str], None] = print,
                    fold: int | None = None, trainers: int = 1) -> SegmenterResult:
    """Train on the series with split "train", select on split "val" (patient-grouped upstream).

    storage_path: a folder or URI for Ray Train's run directory (multi-node clusters need shared
    storage); re-running with the same storage_path and name resumes that run. Every checkpoint's
    meta.json records `fold` and the patients of the train and val series.
    """
    seg = cfg.segmentation
    segmodels.build_segmenter(seg)  # fail on bad settings before any Ray work
    missing = {"series_id", "patient_id", "image_uri", "mask_uri", "split"} - set(series.columns)
    if missing:
        raise ValueError(f"series table lacks columns {sorted(missing)}")
    identity = {"fold": fold, **{
        key: sorted(set(series.loc[series["split"] == split, "patient_id"].astype(str)))
        for key, split in (("training_patients", "train"), ("selection_patients", "val"))}}
    started = time.perf_counter()
    layout = resources.training(cfg.resources, seg.num_workers, trainers)
    volumes, skipped = preprocessed_volumes(series, cfg, progress)
    datasets = {"train": volumes["train"], **val_parts(volumes["val"], layout.count)}
    progress(f"segmentation: training {seg.model} on {layout.count} worker(s), "
             f"{'a GPU and ' if layout.gpu else ''}{layout.cpus:g} CPU each")
    with WorkerProgress(progress) as sink:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"segmentation": dataclasses.asdict(seg), "seed": cfg.seed,
                               "threads": layout.threads, "progress": sink,
                               "identity": identity,
                               "storage_path": storage.absolute(storage_path)},
            scaling_config=ScalingConfig(num_workers=layout.count, use_gpu=layout.gpu,
                                         resources_per_worker=layout.resources()),
            torch_config=TorchConfig(backend=resources.torch_backend(layout)),
            run_config=RunConfig(
                name=name, storage_path=storage.absolute(storage_path),
                checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=SCORE,
                                                   checkpoint_score_order="max"),
                failure_config=FailureConfig(max_failures=2),
            ),
            datasets=datasets,
            dataset_config=DataConfig(datasets_to_split=["train"]),  # val: val_parts
        )
        result = trainer.fit()
    state = result.return_value
    best, _ = max(result.best_checkpoints, key=lambda pair: pair[1][SCORE])
    path = checkpoints.location(best, storage.absolute(storage_path))
    meta = checkpoints.read_meta(path, "segmenter")
    summary = SegmenterResult(
        checkpoint_path=path, best_val_dice=float(meta["val_dice"]),
        best_val_iou=float(meta["val_iou"]), epochs_run=int(state["epoch"]),
        history=state["history"], wall_s=time.perf_counter() - started,
        skipped=skipped,
        fold=meta.get("fold"), training_patients=list(meta.get("training_patients", [])),
        selection_patients=list(meta.get("selection_patients", [])),
    )
    progress(f"segmentation: best val Dice {summary.best_val_dice:.3f}, IoU "
             f"{summary.best_val_iou:.3f} after {summary.epochs_run} epochs, "
             f"{summary.wall_s:.0f} s")
    return summary


def train_folds(series: pd.DataFrame, cfg: Config, storage_path: str, name: str,
                progress: Callable[[str], None] = print) -> list[SegmenterResult]:
    """Cross-fitting: one segmenter per fold (pipeline.segmentation.folds), each a Ray Train run
    of its own named `<name>-fold<k>` under `storage_path`, so an interrupted fold resumes from
    its last checkpoint. A finished fold's result is kept beside its run (`<run>.json`) and
    reused, not trained again, by a re-run with the same name. Folds train one after another,
    or several at once when the cluster holds that many trainers (fold_concurrency)."""
    seg = cfg.segmentation
    segmodels.build_segmenter(seg)  # fail on bad settings before any Ray work
    plans = crossfit.plan(series, seg.folds, seg.val_fraction, cfg.seed)
    results: dict[int, SegmenterResult] = {}
    todo = []
    for plan in plans:
        run = f"{name}-fold{plan.fold}"
        if plan.in_sample:
            progress("segmentation: segmentation.folds=1, no cross-fitting: the segmenter will "
                     "segment the patients it trained and selected on (in-sample)")
        finished = _finished_fold(storage_path, run)
        if finished is not None:
            progress(f"segmentation fold {plan.fold}: finished in an earlier run, not trained "
                     f"again ({finished.checkpoint_path})")
            results[plan.fold] = finished
        else:
            todo.append((plan, run))
    concurrency = fold_concurrency(cfg, len(todo))
    for plan, _ in todo:
        progress(f"segmentation fold {plan.fold} of {len(plans)}: trains on "
                 f"{len(plan.training)} patients, selects on {len(plan.selection)}, segments "
                 f"{len(plan.segments)}" + (f" ({concurrency} folds at once)"
                                           if concurrency > 1 else ""))
    if concurrency <= 1:
        for plan, run in todo:
            results[plan.fold] = _train_fold(series, cfg, storage_path, run, plan, progress)
    else:
        results.update(_train_concurrently(series, cfg, storage_path, todo, concurrency,
                                           progress))
    return [results[plan.fold] for plan in plans]


def fold_concurrency(cfg: Config, n_folds: int) -> int:
    """How many fold trainers run at once. On GPUs, as many as the GPUs hold, each with its
    workers (pipeline.resources.training). On CPUs with the default workers the folds share
    the CPUs, one trainer per CPU at most: folds are independent, so running them side by side
    scales better than giving one fold more threads or workers, and each fold's start-up,
    preprocessing and validation overlap another's training (2 folds on a 2-CPU laptop: 154 s
    instead of 197 s). With segmentation.num_workers set, as many as the CPUs hold. A fold's
    Ray Data preprocessing finishes before its trainer asks for its workers, so it runs on the
    CPUs those workers will take and needs none of its own."""
    if n_folds <= 1:
        return n_folds
    workers = cfg.segmentation.num_workers
    layout = resources.training(cfg.resources, workers)
    total = ray.cluster_resources()
    if layout.gpu:
        fits = int(total.get("GPU", 0)) // layout.count
    elif workers == 0:
        fits = int(total.get("CPU", 0))
    else:
        fits = int(total.get("CPU", 0) // (layout.count * layout.cpus))
    return max(1, min(n_folds, fits))


def _record_path(storage_path: str, run: str) -> str:
    return storage.join(storage.absolute(storage_path), f"{run}.json")


def _finished_fold(storage_path: str, run: str) -> SegmenterResult | None:
    """The result a finished run of this name recorded, if its checkpoint is still there."""
    path = _record_path(storage_path, run)
    if not storage.exists(path):
        return None
    result = SegmenterResult(**json.loads(storage.read_bytes(path)))
    if not storage.exists(storage.join(result.checkpoint_path, checkpoints.META_FILE)):
        return None
    return result


def _train_fold(series: pd.DataFrame, cfg: Config, storage_path: str, run: str,
                plan: crossfit.FoldPlan, progress: Callable[[str], None],
                trainers: int = 1) -> SegmenterResult:
    result = train_segmenter(crossfit.fold_series(series, plan), cfg, storage_path, run,
                             progress, fold=plan.fold, trainers=trainers)
    storage.write_bytes(_record_path(storage_path, run),
                        json.dumps(dataclasses.asdict(result), default=str).encode())
    return result


def _train_concurrently(series, cfg, storage_path, todo, concurrency, progress
                        ) -> dict[int, SegmenterResult]:
    """Each fold's trainer driven from a Ray task of its own (no CPU reserved: its workers and
    data tasks ask for theirs), at most `concurrency` at once; their lines reach `progress`."""
    task = ray.remote(num_cpus=0)(_train_fold)
    results: dict[int, SegmenterResult] = {}
    running: dict = {}
    queue = list(todo)
    with WorkerProgress(progress) as sink:
        try:
            while queue or running:
                while queue and len(running) < concurrency:
                    plan, run = queue.pop(0)
                    ref = task.remote(series, cfg, storage_path, run, plan,
                                      lambda line, sink=sink: send(sink, line), concurrency)
                    running[ref] = plan.fold
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    results[running.pop(ref)] = ray.get(ref)
        except BaseException:
            for ref in running:
                ray.cancel(ref)
            raise
    return results

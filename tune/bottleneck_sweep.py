"""The bottleneck sweep: one autoencoder training per latent size on Ray Tune, then the choice.

As in the paper, the chosen size is the smallest bottleneck whose whole-epoch mean IoU reached
the target. If none did, the best mean IoU is chosen and the table's `note` says so loudly.

Each trial is either the plain `fit_epochs` loop inside the Tune function trainable
(cfg.sweep.nested_train=False: laptops; about 5x faster on 2 cores, each trial reads the cubes
from the discs table itself) or a TorchTrainer per trial (nested_train=True: clusters,
multi-worker/GPU trials).
Trials stop early (cfg.sweep.early_stop: an IoU plateau, or the target out of reach in the tail of
the schedule) from inside the training loop, so a nested trial's Train run ends cleanly and never
leaks its placement group (RAY_NOTES: ASHA).
The CPUs a finished plain trial held go to the trials still running (`SpareCpus`): on a laptop
the last trial would otherwise train on one thread beside idle cores.
An interrupted sweep resumes: the same config and storage_path give the same experiment name,
and Tuner.restore picks up unfinished trials from their last checkpoints.

    python -m tune.bottleneck_sweep --discs OUT/tables/discs.parquet --out OUT [--preset demo]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
from ray import tune
from ray.tune.execution.placement_groups import PlacementGroupFactory
from ray.tune.schedulers import ResourceChangingScheduler

from pipeline import config as config_module
from pipeline import connect, resources
from pipeline.config import Config
from pipeline.data import checkpoints, storage, tables
from pipeline.shape.train import (
    EarlyStop,
    TrainSpec,
    count_training_discs,
    train_autoencoder,
)
from tune.trials import report_cubes

COLUMNS = ["bottleneck", "mean_iou", "iou_ci_low", "iou_ci_high", "epochs", "converged",
           "stopped_early", "wall_s", "chosen", "checkpoint_path", "note"]


@dataclass
class SweepResult:
    table: pd.DataFrame  # one row per bottleneck, COLUMNS
    chosen_bottleneck: int
    chosen_checkpoint: str
    any_converged: bool


def choose_bottleneck(table: pd.DataFrame, iou_target: float) -> pd.DataFrame:
    """Mark the `chosen` row: the smallest bottleneck that converged, as the paper chose; if none
    converged, the best mean IoU, with a note that says so."""
    table = table.copy()
    table["chosen"] = False
    table["note"] = table["note"].fillna("").astype(str)
    usable = table[table["checkpoint_path"].notna() & table["mean_iou"].notna()]
    if usable.empty:
        raise ValueError("no sweep trial produced a checkpoint: nothing to choose from")
    converged = usable[usable["converged"].astype(bool)]
    if len(converged):
        pick = converged["bottleneck"].idxmin()
        why = "chosen: smallest bottleneck that converged"
    else:
        pick = usable["mean_iou"].idxmax()
        why = (f"chosen WITHOUT CONVERGENCE: no bottleneck reached mean IoU {iou_target}; "
               f"this is the best mean IoU ({usable.loc[pick, 'mean_iou']:.4f})")
    table.loc[pick, "chosen"] = True
    table.loc[pick, "note"] = "; ".join(n for n in (why, table.loc[pick, "note"]) if n)
    return table


def experiment_name(discs_path: str, cfg: Config) -> str:
    """Same discs files + settings -> same name, so a re-run resumes (or returns) the same
    sweep, while re-extracted discs or a changed config start a new one."""
    key = cfg.section_json("autoencoder", "sweep", "seed") + storage.fingerprint(discs_path)
    return f"bottleneck-sweep-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def trial_spec(cfg: Config, bottleneck: int) -> TrainSpec:
    return TrainSpec.from_config(cfg, bottleneck, cfg.sweep.max_epochs,
                                 EarlyStop.from_config(cfg.sweep))


def _plain_trial(params: dict, discs_path: str, cfg: Config, threads: int) -> None:
    bottleneck = int(params["bottleneck"])
    report_cubes(discs_path, cfg, trial_spec(cfg, bottleneck), threads,
                 extra=lambda _: {"bottleneck": bottleneck})


def _nested_trial(params: dict, discs_path: str, cfg: Config, storage_path: str,
                  experiment: str, cpus_per_worker: float) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    bottleneck = int(params["bottleneck"])
    spec = trial_spec(cfg, bottleneck)
    result = train_autoencoder(
        discs_path, cfg, bottleneck, storage_path,
        name=f"{experiment}-{tune.get_context().get_trial_id()}", progress=None,
        callbacks=[TuneReportCallback()], max_epochs=spec.max_epochs, early_stop=spec.early_stop,
        cpus_per_worker=cpus_per_worker)
    tune.report({"bottleneck": bottleneck, "epochs": result.epochs,
                 "mean_iou": result.mean_iou, "iou_ci_low": result.iou_ci_low,
                 "iou_ci_high": result.iou_ci_high, "converged": result.converged,
                 "stopped_early": result.stopped_early,
                 "checkpoint_path": result.checkpoint_path})


class SpareCpus:
    """ResourceChangingScheduler's allocation: the sweep's CPUs split evenly among the trials
    still live (at most a node's CPUs each), so those of a finished trial go to the ones still
    training. A trial is only given more when that buys it another torch thread: each change
    restarts it from the checkpoint it has just reported (trials report only with a
    checkpoint, so no epoch is lost)."""

    def __init__(self, cpus: float, node_cpus: float, max_epochs: int):
        self.cpus, self.node_cpus, self.max_epochs = cpus, node_cpus, max_epochs

    def __call__(self, controller, trial, result: dict, scheduler) -> PlacementGroupFactory | None:
        if result.get("converged") or result.get("stopped_early") or \
                int(result.get("epochs", 0)) >= self.max_epochs:
            return None  # its last report: the trial is ending, not to be restarted
        share = min(self.cpus / max(1, len(controller.get_live_trials())), self.node_cpus)
        held = trial.placement_group_factory.required_resources.get("CPU", 0.0)
        if int(share) <= max(1, int(held)):
            return None
        return PlacementGroupFactory([{"CPU": share}])


def _not_reuse_actors_warning(record: logging.LogRecord) -> bool:
    """Ray's ResourceChangingScheduler reads the controller's _reuse_actors, which Ray's own
    controller then warns about ("...is being restricted"): noise on every sweep, not ours."""
    return "_reuse_actors" not in record.getMessage()


def spare_cpus_scheduler(plan: resources.TrialPlan, max_epochs: int
                         ) -> ResourceChangingScheduler:
    """Tune's scheduler that hands the CPUs of finished plain trials to running ones."""
    logging.getLogger("ray.tune.execution.tune_controller").addFilter(_not_reuse_actors_warning)
    cpus = plan.concurrency * plan.trial_resources["cpu"]
    return ResourceChangingScheduler(
        resources_allocation_function=SpareCpus(cpus, plan.node_cpus, max_epochs))


class TrialProgress(tune.Callback):
    """One line on the driver per trial report (every checkpoint_every epochs)."""

    def __init__(self, progress: Callable[[str], None], max_epochs: int):
        self.progress, self.max_epochs = progress, max_epochs

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "mean_iou" in result:
            self.progress(f"sweep k={trial.config['bottleneck']}: epoch "
                          f"{result.get('epochs', '?')}/{self.max_epochs}, mean IoU "
                          f"{result['mean_iou']:.4f} ({result.get('threads', '?')} threads)")


def run_sweep(discs_path: str, cfg: Config, storage_path: str, out: str,
              progress: Callable[[str], None] = print, name: str | None = None) -> SweepResult:
    """Train one autoencoder per cfg.sweep.bottlenecks on Ray Tune, choose one, and write
    tables.path(out, SWEEP). `name`: the experiment's (default experiment_name); the same name
    and storage_path resume it."""

    bottlenecks = list(dict.fromkeys(int(b) for b in cfg.sweep.bottlenecks))
    if not bottlenecks or min(bottlenecks) < 1:
        raise ValueError(f"sweep.bottlenecks must be positive sizes; got {cfg.sweep.bottlenecks}")
    nested = cfg.sweep.nested_train
    plan = resources.sweep(cfg.resources, len(bottlenecks), nested, cfg.autoencoder.num_workers)
    tables.require_discs(discs_path)
    storage_path = storage.absolute(storage_path)
    name = name or experiment_name(discs_path, cfg)
    if nested:
        trainable = tune.with_parameters(
            _nested_trial, discs_path=discs_path, cfg=cfg, storage_path=storage_path,
            experiment=name, cpus_per_worker=plan.cpus_per_worker)
    else:
        count_training_discs(discs_path, cfg)  # none: refused here, not in every trial
        trainable = tune.with_parameters(_plain_trial, discs_path=discs_path, cfg=cfg,
                                         threads=plan.threads)
    trainable = tune.with_resources(trainable, plan.trial_resources)
    # CPUs freed by finished trials go to running ones; a GPU trial cannot use another GPU
    scheduler = None if nested or "gpu" in plan.trial_resources else spare_cpus_scheduler(
        plan, cfg.sweep.max_epochs)
    experiment_path = storage.join(storage_path, name)
    mode = "a TorchTrainer per trial" if nested else "a plain loop per trial"
    progress(f"bottleneck sweep {bottlenecks} ({mode}), {plan.concurrency} at once, "
             f"{plan.trial_resources} each")
    start = time.perf_counter()
    if tune.Tuner.can_restore(experiment_path):
        progress(f"resuming the sweep in {experiment_path}")
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"bottleneck": tune.grid_search(bottlenecks)},
            tune_config=tune.TuneConfig(max_concurrent_trials=plan.concurrency,
                                        scheduler=scheduler, reuse_actors=False),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[TrialProgress(progress, cfg.sweep.max_epochs)],
                failure_config=tune.FailureConfig(max_failures=2)),
        )
    grid = tuner.fit()
    rows = _trial_rows(grid, cfg.sweep.max_epochs, storage_path)
    unfinished = rows[~rows.pop("finished")]
    if len(unfinished):
        # Tune answers Ctrl-C by saving its state and returning normally: a table of half-trained
        # trials must not be mistaken for the sweep's result.
        raise SweepInterrupted(
            f"the sweep stopped before bottleneck(s) {sorted(unfinished.bottleneck)} finished "
            f"(interrupted?); run it again with the same discs, config and storage to resume "
            f"them from their last checkpoints in {experiment_path}")
    table = choose_bottleneck(rows, cfg.autoencoder.iou_target)
    storage.write_table(table, tables.path(out, tables.SWEEP))
    chosen = table[table["chosen"]].iloc[0]
    any_converged = bool(table["converged"].any())
    progress(f"bottleneck sweep done in {time.perf_counter() - start:.0f} s:\n"
             + table[COLUMNS[:9]].to_string(index=False))
    if not any_converged:
        progress(f"WARNING: no bottleneck converged to mean IoU {cfg.autoencoder.iou_target}; "
                 f"using the best IoU, bottleneck {int(chosen['bottleneck'])}")
    return SweepResult(table, int(chosen["bottleneck"]), str(chosen["checkpoint_path"]),
                       any_converged)


class SweepInterrupted(RuntimeError):
    """Some trials neither finished nor failed: the sweep was stopped part-way."""


def _trial_rows(grid, max_epochs: int, storage_path: str) -> pd.DataFrame:
    """COLUMNS plus `finished`: the trial failed, converged, stopped early or used its epochs."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        finished = result.error is not None or any(metrics.get(k, False) for k in (
            "converged", "stopped_early")) or int(metrics.get("epochs", 0)) >= max_epochs
        checkpoint = metrics.get("checkpoint_path") or (
            checkpoints.location(result.checkpoint, storage_path) if result.checkpoint else None)
        note = ""
        if result.error is not None:
            note = f"trial failed: {str(result.error).strip().splitlines()[-1][:200]}"
        elif metrics.get("stopped_early"):
            note = (f"stopped early at epoch {metrics.get('epochs')}: its IoU had plateaued, or "
                    f"at its recent pace could not reach the target in its epoch budget")
        elif not metrics.get("converged", False):
            note = "reached max_epochs without converging"
        rows.append({
            "bottleneck": int(result.config["bottleneck"]),
            "mean_iou": metrics.get("mean_iou", math.nan),
            "iou_ci_low": metrics.get("iou_ci_low", math.nan),
            "iou_ci_high": metrics.get("iou_ci_high", math.nan),
            "epochs": int(metrics.get("epochs", 0)),
            "converged": bool(metrics.get("converged", False)),
            "stopped_early": bool(metrics.get("stopped_early", False)),
            "wall_s": float(metrics.get("time_total_s", math.nan)),
            "chosen": False, "checkpoint_path": checkpoint, "note": note,
            "finished": finished})
    table = pd.DataFrame(rows, columns=[*COLUMNS, "finished"])
    return table.sort_values("bottleneck", ascending=False, ignore_index=True)


def main(argv: list[str] | None = None) -> SweepResult:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--discs", required=True, help="discs.parquet folder (path or URI)")
    parser.add_argument("--out", required=True, help="output root; writes tables/" + tables.SWEEP)
    parser.add_argument("--storage", help="Ray Tune/Train storage (default OUT/ray)")
    parser.add_argument("--preset", default="demo", choices=sorted(config_module.PRESETS))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="section.field=value")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    args = parser.parse_args(argv)
    cfg = config_module.load(args.preset, args.overrides)
    connect.connect_ray(args.address or os.environ.get("RAY_ADDRESS"))
    storage_path = args.storage or storage.join(storage.absolute(args.out), "ray")
    return run_sweep(args.discs, cfg, storage_path, args.out)


if __name__ == "__main__":
    main()

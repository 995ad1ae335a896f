"""A hyperparameter sweep over any config fields, for the segmenter or the autoencoder.

Optuna's TPE proposes trials (through Ray Tune's OptunaSearch; `random` and `grid` search are
Tune's own), ASHA stops poor trials between epochs, and trials are sized from the cluster by
pipeline.resources, as the bottleneck sweep's are. An interrupted sweep resumes: the same data,
config, space and settings give the same experiment name, and Tuner.restore continues it.
Writes OUT/sweeps/NAME/: trials.parquet, best.yaml (load it with `jobs/run_pipeline.py
--config`), best_set.txt (the same as --set options), figures/*.png, and with MLflow installed
an MLflow run per trial (mlflow.db, or the --tracking-uri server).

    python -m tune.sweep --target segmentation --data DATA --out OUT \\
        --space 'segmentation.lr=loguniform(1e-4,1e-2)' --samples 8
    python -m tune.sweep --target autoencoder --data OUT/tables/discs.parquet --out OUT \\
        --space-file space.yaml --metric epochs_to_converge

--data: the SPIDER-layout cohort (segmentation; as run_pipeline's --data) or a run's
discs.parquet (autoencoder).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from ray import tune

from pipeline import config as config_module
from pipeline import connect, faults, resources
from pipeline.config import Config
from pipeline.data import storage
from tune import space as space_module
from tune import sweep_outputs, tracking
from tune.bottleneck_sweep import SweepInterrupted
from tune.trials import FINISHED, TARGETS, autoencoder_trial, segmentation_trial

SEARCHES = ("tpe", "random", "grid")


@dataclass
class SweepSpec:
    """What to sweep and how; everything that names the experiment."""

    target: str  # a key of tune.trials.TARGETS
    space: dict[str, space_module.Param]
    samples: int = 8  # trials (per grid point, as Tune counts them)
    metric: str | None = None  # default: the target's first metric
    mode: str | None = None  # default: the metric's natural mode
    search: str = "tpe"
    concurrency: int | None = None  # at most this many trials at once (default: what fits)
    grace_epochs: int | None = None  # epochs before ASHA may stop a trial (default max/4)
    preset: str = "demo"
    overrides: tuple[str, ...] = ()  # the sweep's --set, part of every trial's config

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"unknown sweep target {self.target!r}; choose from "
                             f"{', '.join(TARGETS)}")
        metrics = TARGETS[self.target].metrics
        self.metric = self.metric or next(iter(metrics))
        if self.metric not in metrics:
            raise ValueError(f"{self.target} sweeps report {', '.join(metrics)}; not "
                             f"{self.metric!r}")
        self.mode = self.mode or metrics[self.metric]
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be max or min; got {self.mode!r}")
        if self.search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}; got {self.search!r}")
        kinds = {p.kind for p in self.space.values()}
        if self.search == "tpe" and "grid" in kinds:
            raise ValueError("grid(...) values need --search grid or random: TPE samples")
        if self.search == "grid" and kinds - {"grid", "choice"}:
            raise ValueError("--search grid runs grid(...) and choice(...) values only")
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1; got {self.samples}")

    def param_space(self) -> dict:
        grid = self.search == "grid"
        return {key: (tune.grid_search(list(p.values)) if grid else p.to_tune())
                for key, p in self.space.items()}

    def trial_count(self) -> int:
        grid = space_module.grid_size(self.space) if self.search != "grid" else (
            space_module.grid_size({k: space_module.Param(k, "grid", p.values)
                                    for k, p in self.space.items()}))
        return self.samples * grid

    def key(self) -> str:
        return json.dumps({"target": self.target, "space": {k: [p.kind, list(p.values)] for
                                                            k, p in self.space.items()},
                           "samples": self.samples, "metric": self.metric, "mode": self.mode,
                           "search": self.search, "grace": self.grace_epochs}, sort_keys=True)


def experiment_name(data: str, cfg: Config, spec: SweepSpec) -> str:
    """Same data files, config and sweep -> same name, so a re-run resumes the same sweep."""
    key = cfg.to_json() + spec.key() + storage.fingerprint(data)
    return f"{spec.target}-sweep-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _searcher(spec: SweepSpec, seed: int):
    if spec.search != "tpe":
        return None  # Tune's BasicVariantGenerator: random samples, grid axes crossed
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=seed)


def _scheduler(spec: SweepSpec, max_epochs: int):
    """ASHA in the target's epochs. It never stops a trial for reaching max_t: a trial ends by
    itself, its own last report saying it finished (trials.FINISHED)."""
    from ray.tune.schedulers import ASHAScheduler

    grace = spec.grace_epochs or max(1, max_epochs // 4)
    return ASHAScheduler(time_attr=TARGETS[spec.target].time_attr, max_t=max(max_epochs, grace),
                         grace_period=grace, reduction_factor=2, stop_last_trials=False)


def _trainable(data: str, cfg: Config, spec: SweepSpec, progress: Callable[[str], None]):
    """The target's trainable with its data read once and bound, sized by pipeline.resources
    as the bottleneck sweep's plain trials are."""
    plan = resources.sweep(cfg.resources, spec.trial_count(), nested=False)
    concurrency = min(plan.concurrency, spec.concurrency or plan.concurrency)
    if spec.target == "segmentation":
        from pipeline.data.cohort import catalog
        from pipeline.segmentation.train import preprocessed_volumes

        series = catalog(data, sequence=cfg.sequence, val_fraction=cfg.segmentation.val_fraction,
                         seed=cfg.seed).series
        splits = set(series["split"]) if len(series) else set()
        if not {"train", "val"} <= splits:
            raise ValueError(f"{data}: a segmentation sweep needs patients in splits train and "
                             f"val; found {sorted(splits) or 'no usable series'}")
        volumes, _ = preprocessed_volumes(series, cfg, progress)
        trainable = tune.with_parameters(segmentation_trial, volumes=volumes, cfg=cfg,
                                         threads=plan.threads)
    else:
        from pipeline.shape.train import count_training_discs

        count_training_discs(data, cfg)  # none: refused here, not in every trial
        trainable = tune.with_parameters(autoencoder_trial, discs_path=data, cfg=cfg,
                                         threads=plan.threads)
    progress(f"{spec.target} sweep: {spec.trial_count()} trials ({spec.search} search, ASHA), "
             f"{concurrency} at once, {plan.trial_resources} each")
    return tune.with_resources(trainable, plan.trial_resources), concurrency


class TrialLines(tune.Callback):
    """One line per finished, stopped or failed trial."""

    def __init__(self, progress: Callable[[str], None], spec: SweepSpec):
        self.progress, self.spec = progress, spec

    def _line(self, trial, status: str) -> None:
        result = trial.last_result or {}
        value = result.get(self.spec.metric)
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in sorted(trial.config.items()))
        self.progress(f"trial {trial.trial_id} ({params}): {self.spec.metric} "
                      f"{'?' if value is None else f'{value:.4f}'} after "
                      f"{result.get(TARGETS[self.spec.target].time_attr, 0)} epochs, {status}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trial, sweep_outputs.COMPLETED if (trial.last_result or {}).get(FINISHED)
                   else sweep_outputs.STOPPED)
        # a test interrupts the sweep here, once a trial has finished (pipeline.faults)
        faults.point("sweep trial finished", signal.SIGINT)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trial, sweep_outputs.FAILED)


def run_sweep(data: str, cfg: Config, spec: SweepSpec, out: str, storage_path: str | None = None,
              tracking_uri: str | None = None, progress: Callable[[str], None] = print,
              name: str | None = None) -> sweep_outputs.SweepOutcome:
    """Run (or resume) the sweep and write its outputs under OUT/sweeps/NAME/. `cfg` is the
    config every trial starts from (spec.preset and spec.overrides applied)."""
    out = storage.absolute(out)
    storage_path = storage.absolute(storage_path or storage.join(out, "ray"))
    name = name or experiment_name(data, cfg, spec)
    folder = storage.join(out, "sweeps", name)
    max_epochs = TARGETS[spec.target].max_epochs(cfg, spec.space)
    trainable, concurrency = _trainable(data, cfg, spec, progress)
    experiment_path = storage.join(storage_path, name)
    started = time.perf_counter()
    if tune.Tuner.can_restore(experiment_path):
        progress(f"resuming the sweep in {experiment_path}")
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    else:
        callbacks = [TrialLines(progress, spec)]
        logger = tracking.logger(tracking_uri, folder, name, storage_path, progress)
        if logger is not None:
            callbacks.append(logger)
        tuner = tune.Tuner(
            trainable, param_space=spec.param_space(),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.samples,
                search_alg=_searcher(spec, cfg.seed), scheduler=_scheduler(spec, max_epochs),
                max_concurrent_trials=concurrency, reuse_actors=True),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, verbose=0, callbacks=callbacks,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
        )
    grid = tuner.fit()
    table = sweep_outputs.trial_table(grid, spec, storage_path)
    unfinished = table[table["status"] == sweep_outputs.UNFINISHED]
    if len(unfinished) or len(table) < spec.trial_count():
        # Tune answers Ctrl-C by saving its state and returning normally, with trials unfinished
        # or (a searcher proposes them one by one) not yet created
        raise SweepInterrupted(
            f"the sweep stopped with {len(table) - len(unfinished)} of {spec.trial_count()} "
            f"trials finished (interrupted?); run it again with the same data, config and "
            f"sweep to resume it in {experiment_path}")
    outcome = sweep_outputs.write(table, grid, spec, folder)
    progress(f"{spec.target} sweep done in {time.perf_counter() - started:.0f} s:\n"
             + sweep_outputs.printable(table, spec))
    progress(f"best: {outcome.best_set}\nwrote {folder}")
    return outcome


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, choices=sorted(TARGETS))
    parser.add_argument("--data", required=True, help="segmentation: the SPIDER-layout cohort; "
                        "autoencoder: a discs.parquet (path or URI)")
    parser.add_argument("--out", required=True, help="output root; writes sweeps/NAME/")
    parser.add_argument("--space", action="append", default=[], metavar="SECTION.FIELD=EXPR",
                        help="loguniform(a,b) | uniform(a,b) | randint(a,b) | choice(v,...) | "
                        "grid(v,...)")
    parser.add_argument("--space-file", help="a YAML of section.field: expression")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--metric", help="segmentation: val_dice (default), val_iou; "
                        "autoencoder: mean_iou (default), epochs_to_converge")
    parser.add_argument("--mode", choices=("max", "min"), help="default: the metric's own")
    parser.add_argument("--search", default="tpe", choices=SEARCHES)
    parser.add_argument("--concurrency", type=int, help="at most this many trials at once")
    parser.add_argument("--grace-epochs", type=int, help="epochs before ASHA may stop a trial")
    parser.add_argument("--preset", default="demo", choices=sorted(config_module.PRESETS))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="fixed for every trial")
    parser.add_argument("--storage", help="Ray Tune/Train storage (default OUT/ray)")
    parser.add_argument("--name", help="experiment name (default: from the data and settings)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default, with MLflow "
                        "installed: OUT/sweeps/NAME/mlflow.db)")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    return parser.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    items = dict(space_module.from_yaml(storage.read_bytes(args.space_file).decode(),
                                        args.preset)) if args.space_file else {}
    if args.space:
        items.update(space_module.from_items(args.space, args.preset))
    return SweepSpec(args.target, space_module.checked(items, args.preset), args.samples,
                     args.metric, args.mode, args.search, args.concurrency, args.grace_epochs,
                     args.preset, tuple(args.overrides))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = spec_from_args(args)
        cfg = config_module.load(spec.preset, list(spec.overrides))
        if args.tracking_uri:
            tracking.require_mlflow()
        # no address: an embedded Ray, never a stale local cluster's
        connect.connect_ray(args.address or os.environ.get("RAY_ADDRESS"))
        run_sweep(args.data, cfg, spec, args.out, args.storage, args.tracking_uri,
                  progress=lambda line: print(line, flush=True), name=args.name)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SweepInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

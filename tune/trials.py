"""What one sweep trial trains, per target, and the metrics it reports to Tune each epoch.

- segmentation: the pipeline's segmenter, its epoch loop (pipeline.segmentation.train.
  train_epochs, the loop Ray Train's workers run) in the trial itself, trained on split "train"
  and scored each epoch on the patients of split "val", whom it never trains on (`val_dice`,
  `val_iou`), so ASHA can stop a poor trial between epochs. A plain trial, not Tune over Train:
  a trial ASHA stops is Tune's to clean up, and a sweep's parallelism is its trials.
- autoencoder: the autoencoder's training (pipeline.shape.train.train_cubes) as a plain loop in
  the trial (the bottleneck sweep's laptop path), on training cubes the trial reads from the
  discs table itself (the driver never holds them), reporting every checkpoint_every epochs:
  `mean_iou` (whole training set) and `epochs_to_converge`.

Each trial's config is the sweep's config with the trial's sampled values applied as
`section.field=value` overrides, the same path a run's `--set` takes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass

import torch
from ray import tune

from pipeline import config as config_module
from pipeline import resources
from pipeline.config import Config
from tune import space

# In a trial's own last report: it ran to its end. Tune marks a trial that ASHA stopped "done"
# as well, so this is how a stopped trial is told from a finished one.
FINISHED = "trial_finished"


@dataclass(frozen=True)
class Target:
    metrics: dict[str, str]  # metric -> its natural mode ("max" | "min"); the first is the default
    time_attr: str  # the reported counter ASHA's rungs are measured in
    epochs_field: str  # the config field that caps a trial's epochs

    def max_epochs(self, cfg: Config, params: dict[str, space.Param]) -> int:
        """The most epochs any trial can run: the config's, or the space's largest."""
        section, name = self.epochs_field.split(".")
        base = int(getattr(getattr(cfg, section), name))
        swept = params.get(self.epochs_field)
        return max(base, int(swept.upper())) if swept is not None else base


TARGETS = {
    "segmentation": Target({"val_dice": "max", "val_iou": "max"}, "epoch",
                           "segmentation.epochs"),
    "autoencoder": Target({"mean_iou": "max", "epochs_to_converge": "min"}, "epochs",
                          "autoencoder.max_epochs"),
}


def trial_config(cfg: Config, params: dict) -> Config:
    """The sweep's config with one trial's sampled values applied."""
    return config_module.apply_overrides(copy.deepcopy(cfg), space.overrides(params))


def segmentation_trial(params: dict, volumes: dict, cfg: Config, threads: int) -> None:
    """Tune function trainable: the segmenter's epoch loop (pipeline.segmentation.train.
    train_epochs) in the trial itself, on the volumes the driver preprocessed once, each epoch
    reported and checkpointed through Tune; a restored trial continues from its last
    checkpoint."""
    from pipeline.segmentation.train import Loop, finished, train_epochs

    trial_cfg = trial_config(cfg, params)

    def report(state: dict, metrics: dict, folder: str | None) -> None:
        tune.report({**metrics, FINISHED: finished(state, trial_cfg.segmentation)},
                    checkpoint=tune.Checkpoint.from_directory(folder))

    restored = tune.get_checkpoint()
    with restored.as_directory() if restored else contextlib.nullcontext() as folder:
        train_epochs({"segmentation": dataclasses.asdict(trial_cfg.segmentation),
                      "seed": trial_cfg.seed, "threads": threads, "progress": None},
                     Loop(0, 1, volumes["train"], volumes["val"], resources.torch_device(),
                          folder, report))


def epochs_to_converge(metrics: dict, max_epochs: int) -> float:
    """Epochs to reach autoencoder.iou_target; a trial not (yet) converged counts as
    max_epochs·(2 − mean IoU), so it ranks after every converged trial, and by its IoU among
    the unconverged: one number that ASHA and the searcher can both minimise at every report."""
    if metrics["converged"]:
        return float(metrics["epochs"])
    return max_epochs * (2.0 - float(metrics["mean_iou"]))


def autoencoder_trial(params: dict, discs_path: str, cfg: Config, threads: int) -> None:
    """Tune function trainable: the autoencoder's training loop in the trial itself,
    checkpointing through Tune; a restored trial continues from its last checkpoint."""
    from pipeline.shape.train import TrainSpec

    trial_cfg = trial_config(cfg, params)
    spec = TrainSpec.from_config(trial_cfg, trial_cfg.autoencoder.bottleneck)
    report_cubes(discs_path, trial_cfg, spec, threads, extra=lambda m: {
        "epochs_to_converge": epochs_to_converge(m, spec.max_epochs),
        FINISHED: bool(m["converged"]) or m["epochs"] >= spec.max_epochs})


def trial_threads(planned: int) -> int:
    """Torch threads for this trial: as planned, or more where the scheduler has since given
    the trial more CPUs (tune.bottleneck_sweep.SpareCpus)."""
    held = tune.get_context().get_trial_resources().required_resources.get("CPU", 0.0)
    return max(planned, int(held))


def report_cubes(discs_path: str, cfg: Config, spec, threads: int,
                 extra=lambda metrics: {}) -> None:
    """train_cubes inside a Tune trial, on the training cubes of `discs_path` that the trial
    reads itself: reports and checkpoints go to Tune (metrics, the torch threads, and
    `extra(metrics)`), and a restored trial continues from Tune's checkpoint, on more threads
    where the scheduler has since given it more CPUs."""
    from pipeline.shape.train import load_training_cubes, train_cubes

    threads = trial_threads(threads)
    torch.set_num_threads(threads)
    cubes, patients = load_training_cubes(discs_path, cfg, with_patients=True)

    def report(metrics: dict, folder: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(folder) if folder else None
        tune.report({**metrics, "threads": threads, **extra(metrics)}, checkpoint=checkpoint)

    restored = tune.get_checkpoint()
    with restored.as_directory() if restored else contextlib.nullcontext() as folder:
        train_cubes(cubes, spec, report=report, restore_dir=folder,
                    device=resources.torch_device(), groups=patients)

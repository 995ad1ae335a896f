"""One typed configuration with named presets; any field can be overridden as `section.field=value`.

The config is written next to every run's outputs so any table can be traced to its settings.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field


@dataclass
class SyntheticConfig:
    patients: int = 24
    seed: int = 0
    label_noise: float = 0.1
    sequences: tuple[str, ...] = ("t1", "t2")


@dataclass
class InputConfig:
    # A volume whose header declares more voxels is refused before its pixels are allocated
    # (2**30: 4 GiB as float32, far above any MRI series).
    max_voxels: int = 2**30


@dataclass
class SegmentationConfig:
    model: str = "unet"  # "unet" (CPU demo) | "swinunetr" (paper, SwinUNETR-V2)
    feature_size: int = 48  # SwinUNETR only; must be divisible by 12
    unet_channels: tuple[int, ...] = (8, 16, 32, 64)
    target_spacing_mm: tuple[float, float, float] = (1.4, 1.2, 1.5)  # LR, AP, SI (RAS order)
    roi_size: tuple[int, int, int] = (64, 64, 64)  # training crops and sliding window, voxels
    epochs: int = 200
    patience: int = 15
    batch_size: int = 4
    crops_per_volume: int = 2
    lr: float = 1e-3
    val_fraction: float = 0.2  # used only when the cohort has no `subset` column
    # K-fold cross-fitting by patient: K segmenters, fold k's trained and selected without the
    # patients of fold k, which it alone segments, so every predicted mask is out-of-sample.
    # 1 is an explicit opt-out: one segmenter segments the patients it trained on, and the
    # report flags its predicted rows as in-sample.
    folds: int = 5
    num_workers: int = 0  # 0: as many as the cluster can hold
    inference_batch_size: int = 1
    inference_overlap: float = 0.25
    # Training steps' forward passes in bfloat16 autocast where the device computes bf16
    # natively (the demo UNet's step: 1.65x faster on this CPU); the loss, weights, optimizer,
    # validation and every predicted mask stay float32.
    bf16: bool = True


@dataclass
class DiscConfig:
    cube_size: int = 64
    cube_spacing_mm: float = 1.25  # isotropic spacing of the per-disc cube
    min_component_mm3: float = 200.0  # predicted components smaller than this are specks


@dataclass
class AutoencoderConfig:
    channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    bottleneck: int = 4
    lr: float = 1e-3
    batch_size: int = 4
    max_epochs: int = 1000
    iou_target: float = 0.995
    train_splits: tuple[str, ...] = ("train",)
    num_workers: int = 1
    checkpoint_every: int = 25  # epochs between checkpoints (and one at the end)
    # The recipe: focal loss + soft Dice with a one-cycle schedule peaking at `lr` converges
    # several times faster than the paper's BCE at a constant lr (which stalls near IoU 0.94 at
    # k=4 on the demo), and in about 230 epochs where BCE + soft Dice needed 280 (README,
    # "time to converge"); the whole-set eval pass every few epochs (not every one) is the
    # other saving.
    loss: str = "focal+dice"  # "bce" (the paper's) | "bce+dice" | "focal+dice"
    schedule: str = "onecycle"  # "constant" (the paper's) | "onecycle", over max_epochs
    eval_every: int = 5  # epochs between whole-set eval passes that judge convergence
    # Training steps in bfloat16 autocast where the device computes bf16 natively (CPUs with
    # AVX-512 BF16 or AMX, recent GPUs); weights, the optimizer and every eval pass that judges
    # convergence stay float32. The architecture is the paper's either way.
    bf16: bool = True
    # Adam's second-moment decay. torch's 0.999 remembers squared gradients for ~1,000 steps
    # (~100 epochs of the demo's discs); as the one-cycle rate falls and gradients shrink, that
    # stale memory damps the very steps that take the IoU from 0.99 to 0.995. With BCE + Dice
    # and 0.95, k=4 on bench/convergence_criterion.py's 150 discs converged at epoch 265 of a
    # 300-epoch cycle (three seeds); with 0.999 that cycle ended at 0.991 and 400 needed 325-335.
    adam_beta2: float = 0.95


@dataclass
class SweepConfig:
    bottlenecks: tuple[int, ...] = (64, 8, 4, 3)
    max_epochs: int = 1000
    early_stop: bool = True  # stop trials whose IoU plateaus far below the target
    plateau_epochs: int = 100  # early stop when the best whole-epoch mean IoU has not risen
    plateau_min_delta: float = 0.001  # by this much within plateau_epochs epochs
    # Once a one-cycle learning rate has fallen to a quarter of its peak, early stop when the
    # IoU, still gaining at its pace of the last reach_window epochs, would end short of the
    # target (0: off). In every trial measured, the pace only slowed as the rate decayed.
    reach_window: int = 40
    nested_train: bool = False  # each trial a TorchTrainer (clusters) vs a plain loop (laptops)


@dataclass
class ClassifyConfig:
    targets: tuple[str, ...] = ("disc_bulging", "disc_narrowing")
    folds: int = 5
    repeats: int = 3
    n_estimators: int = 200
    max_depth: int = 3
    learning_rate: float = 0.1
    # LightGBM's default (20) barely lets a depth-3 tree split ~100 training discs
    min_child_samples: int = 5
    bootstrap: int = 1000  # resamples of patients for every 95% CI
    inner_folds: int = 3  # patient-grouped folds inside each training fold that pick the F1 threshold
    n_jobs: int = 2  # processes fitting models in parallel (each model single-threaded)


GPU_INTENTS = ("auto", "require")


@dataclass
class ResourcesConfig:
    """Where stages run: read by pipeline.resources, never part of a stage's skip key (it moves
    work between devices, not what the work computes)."""

    gpu: str = "auto"  # "auto": GPUs only if the cluster has some; "require": ask for them
    cpus_per_gpu_worker: int = 4  # per GPU worker or actor: its data loading, not just 1
    gpu_wait_s: float = 900.0  # "require": fail when no GPU node has joined after this long


@dataclass
class Config:
    preset: str = "paper"
    seed: int = 0
    sequence: str = "t1"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    inputs: InputConfig = field(default_factory=InputConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    discs: DiscConfig = field(default_factory=DiscConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def section_json(self, *names: str) -> str:
        """A stable text of some sections or single fields (`section.field`), for deciding
        whether a stage's result is stale."""
        values = {}
        for name in names:
            value = self
            for part in name.split("."):
                value = getattr(value, part)
            values[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return json.dumps(values, sort_keys=True)


def paper() -> Config:
    """The published method's settings: SPIDER T1, SwinUNETR-V2, 64³ cubes. For a GPU cluster."""
    return Config(
        preset="paper",
        segmentation=SegmentationConfig(model="swinunetr", roi_size=(96, 96, 96)),
        resources=ResourcesConfig(gpu="require"),
    )


def demo() -> Config:
    """Small enough to run end to end on a 2-core laptop in minutes, on the synthetic cohort."""
    return Config(
        preset="demo",
        # 20 patients (96 training discs for the autoencoder) keep `make demo` within 8 minutes
        # on 2 cores with the install; 24 took 8 min 34 s, the sweep 241 s of it (20: 180 s).
        synthetic=SyntheticConfig(patients=20),
        # Sagittal slices stay ~3.3 mm thick (upsampling L-R adds voxels, not information);
        # in-plane 1.5 mm keeps a perfect mask at Dice ~0.94 back on the native grid. lr 1e-2
        # gets the UNet past its all-background plateau in ~100 steps instead of ~1000.
        segmentation=SegmentationConfig(
            model="unet",
            unet_channels=(16, 32, 64, 128),
            target_spacing_mm=(3.3, 1.5, 1.5),
            roi_size=(32, 64, 64),
            epochs=20,
            # A fold's UNet can sit on the all-background plateau for several epochs (one first
            # found discs at epoch 7): patience 10 never stops it there at Dice 0.
            patience=10,
            batch_size=2,
            crops_per_volume=4,
            lr=1e-2,
            inference_batch_size=4,  # 4 windows per forward pass: half the CPU time of 1
            # Two folds: each segmenter trains on the other half of the patients (half the
            # steps per epoch), so the pair should cost about one segmenter on every patient
            # plus one more trainer start-up; more folds would each train on more patients.
            folds=2,
        ),
        discs=DiscConfig(cube_size=32, cube_spacing_mm=2.5),
        # 32³ cubes, 4 stages (flatten 128·2³). Focal loss + soft Dice over one 300-epoch
        # cycle peaking at lr 2e-2, batch 16, Adam beta2 0.95. On bench/convergence_criterion.py's
        # 150 discs k=4 reached 0.995 at epochs 220-240 (four runs); with BCE + Dice a 300-epoch
        # cycle sat on the edge (265, or 0.9946-0.9949 after small changes) and 350 epochs took
        # 275-280. The paper's BCE at a constant lr had not passed 0.92 by epoch 120. Batch 16
        # trains a disc 1.4x faster than batch 8 on one thread in about as many epochs; batch
        # 32 needed more.
        autoencoder=AutoencoderConfig(
            channels=(16, 32, 64, 128), batch_size=16, max_epochs=300, lr=2e-2,
            checkpoint_every=20,
        ),
        sweep=SweepConfig(bottlenecks=(8, 4, 3), max_epochs=300),
        classify=ClassifyConfig(repeats=3, bootstrap=500),
    )


PRESETS = {"demo": demo, "paper": paper}


def _coerce(value: str, target: typing.Any):
    origin = typing.get_origin(target)
    if target is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if origin is tuple:
        item = typing.get_args(target)[0]
        parts = [p for p in value.strip("()[] ").split(",") if p.strip()]
        return tuple(_coerce(p.strip(), item) for p in parts)
    if target in (int, float, str):
        return target(value)
    raise ValueError(f"cannot set a field of type {target}")


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply `section.field=value` (or `field=value` for top-level fields) overrides in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, value = item.split("=", 1)
        *path, name = key.strip().split(".")
        target = config
        for part in path:
            if not hasattr(target, part) or not dataclasses.is_dataclass(getattr(target, part)):
                raise ValueError(f"unknown config section {part!r} in {item!r}")
            target = getattr(target, part)
        hints = typing.get_type_hints(type(target))
        if name not in hints:
            known = ", ".join(sorted(hints))
            raise ValueError(f"unknown config field {key!r}; {type(target).__name__} has: {known}")
        try:
            setattr(target, name, _coerce(value, hints[name]))
        except ValueError as err:
            raise ValueError(f"bad value for {key}: {err}") from err
    return config


def override(key: str, value) -> str:
    """`key=value` as apply_overrides reads it back: sequences comma-joined, booleans as words."""
    if isinstance(value, (list, tuple)):
        text = ",".join(str(v) for v in value)
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    return f"{key}={text}"


def overrides_from_yaml(text: str) -> list[str]:
    """A YAML mapping of `section.field: value` (what a sweep writes as best.yaml) as
    overrides, so a run loads it through the same path as `--set`."""
    import yaml

    mapping = yaml.safe_load(text) or {}
    if not isinstance(mapping, dict):
        raise ValueError("a config YAML must be a mapping of section.field: value")
    return [override(str(key), value) for key, value in mapping.items()]


def load(preset: str = "demo", overrides: list[str] | None = None) -> Config:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = apply_overrides(PRESETS[preset](), overrides or [])
    if cfg.resources.gpu not in GPU_INTENTS:
        raise ValueError(f"resources.gpu must be one of {', '.join(GPU_INTENTS)}; "
                         f"got {cfg.resources.gpu!r}")
    if cfg.segmentation.folds < 1:
        raise ValueError(f"segmentation.folds must be at least 1 (1: no cross-fitting, predicted "
                         f"masks in-sample); got {cfg.segmentation.folds}")
    return cfg

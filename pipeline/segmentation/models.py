"""The disc segmenters; their checkpoints are `data.checkpoints` folders.

Two architectures, both MONAI, both one logit channel (disc vs everything else):
- "swinunetr": SwinUNETR-V2 (the paper's model). Inputs must be divisible by 32 on every side,
  feature_size by 12; MONAI >= 1.5 infers the image size at run time.
- "unet": a small residual UNet for CPU runs; inputs divisible by 2 ** (len(channels) - 1).

A checkpoint's meta.json holds the whole SegmentationConfig it was trained with, so inference
rebuilds the same network and the same preprocessing grid without the caller's config.
"""

from __future__ import annotations

import dataclasses

import torch

from pipeline.config import SegmentationConfig
from pipeline.data import checkpoints
from pipeline.segmentation import lean_monai

MODELS = ("unet", "swinunetr")


def input_divisor(cfg: SegmentationConfig) -> int:
    """Every spatial side of an input window must be a multiple of this."""
    if cfg.model == "swinunetr":
        return 32
    if cfg.model == "unet":
        return 2 ** (len(cfg.unet_channels) - 1)
    raise ValueError(f"unknown segmentation model {cfg.model!r}; choose from {', '.join(MODELS)}")


def build_segmenter(cfg: SegmentationConfig) -> torch.nn.Module:
    """A fresh segmenter. Args: cfg.model, cfg.feature_size (SwinUNETR), cfg.unet_channels (UNet),
    cfg.roi_size (checked against the network's divisor). Input (B, 1, X, Y, Z) float, output
    (B, 1, X, Y, Z) logits."""
    # Imported here: MONAI's __init__ imports all of MONAI (4 s of CPU per process, lean_monai),
    # which the CPU-only Ray workers that read, preprocess and measure volumes never need.
    lean_monai.load()
    from monai.networks.nets import SwinUNETR, UNet

    divisor = input_divisor(cfg)
    if len(cfg.roi_size) != 3 or any(int(s) <= 0 or int(s) % divisor for s in cfg.roi_size):
        raise ValueError(
            f"roi_size {tuple(cfg.roi_size)} must be three positive multiples of {divisor} "
            f"for model {cfg.model!r}"
        )
    if cfg.model == "swinunetr":
        if cfg.feature_size <= 0 or cfg.feature_size % 12:
            raise ValueError(f"SwinUNETR feature_size must be a positive multiple of 12, "
                             f"got {cfg.feature_size}")
        if all(int(s) == 32 for s in cfg.roi_size):
            raise ValueError("SwinUNETR cannot train on 32^3 windows: its 1-voxel bottleneck has "
                             "nothing to instance-normalise; make one side of roi_size 64 or more")
        return SwinUNETR(in_channels=1, out_channels=1, feature_size=cfg.feature_size,
                         use_v2=True, spatial_dims=3)
    channels = tuple(int(c) for c in cfg.unet_channels)
    if len(channels) < 2 or any(c <= 0 for c in channels):
        raise ValueError(f"UNet needs at least two positive channel counts, got {channels}")
    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=channels,
                strides=(2,) * (len(channels) - 1), num_res_units=1)


def config_from_meta(meta: dict) -> SegmentationConfig:
    """The SegmentationConfig a checkpoint was trained with (lists back to tuples)."""
    fields = {f.name for f in dataclasses.fields(SegmentationConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v
              for k, v in meta["segmentation"].items() if k in fields}
    return SegmentationConfig(**values)


def load_segmenter(checkpoint_path: str) -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained segmenter (eval mode, CPU) and its meta from a checkpoint folder."""
    meta = checkpoints.read_meta(checkpoint_path, "segmenter")
    model = build_segmenter(config_from_meta(meta))
    model.load_state_dict(checkpoints.read_state(checkpoint_path))
    return model.eval(), meta

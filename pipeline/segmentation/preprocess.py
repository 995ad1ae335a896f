"""Bring a RAS volume onto the segmenter's grid and a prediction back onto the native grid.

The model sees every volume at one spacing (`SegmentationConfig.target_spacing_mm`, RAS order),
intensity-normalised per volume and padded so each side is a multiple of 32 (SwinUNETR needs
that; the UNet's pooling needs less). A `Grid` records the three shapes involved so a prediction
can be mapped back exactly: crop the padding, then resample nearest-neighbour to the native
shape. Images are resampled linearly, masks nearest-neighbour only (linear interpolation of masks
grew discs by ~47% in the published code).

Inputs come from `pipeline.data.volumes.read_volume`, already canonical RAS, so no orientation transform
appears here. Pure functions first; `training_transform` wraps MONAI's random transforms for the
training crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data import labels, validate, volumes
from pipeline.segmentation import lean_monai

PAD_MULTIPLE = 32
PERCENTILES = (0.5, 99.5)  # robust to the bright fat and dark air that dominate an MR volume


def read_pair(image_uri: str, mask_uri: str, max_voxels: int = volumes.MAX_VOXELS
              ) -> tuple[volumes.Volume, volumes.Volume]:
    """Read an image and its reference mask into RAS; an unreadable or refused file (a header
    pointing at other files, too many voxels) is a BadInput naming it. Whether the pair is fit
    to use is `validate.check_series`'s question."""
    pair = []
    for uri in (image_uri, mask_uri):
        try:
            pair.append(volumes.read_volume(uri, max_voxels))
        except ValueError as err:
            raise validate.BadInput(uri, str(err)) from err
    image, mask = pair
    return image, mask


def read_usable_pair(row: dict, max_voxels: int = volumes.MAX_VOXELS
                     ) -> tuple[volumes.Volume, volumes.Volume]:
    """A series row's image and mask, read (read_pair) and checked fit to use
    (`validate.check_series`); either refusal is a BadInput naming the file."""
    image, mask = read_pair(row["image_uri"], row["mask_uri"], max_voxels)
    validate.check_series(image, mask, row["image_uri"], row["mask_uri"])
    return image, mask


@dataclass(frozen=True)
class Grid:
    """Where the model's grid sits relative to the native one.

    The native volume (`native_shape` voxels of `native_spacing` mm) is resampled so its physical
    extent is kept: `resampled_shape` voxels of `spacing` mm (close to the target spacing;
    exactly extent / shape). Padding is appended at the far end of each axis up to
    `padded_shape`, so `array[:rx, :ry, :rz]` is the resampled volume again.
    """

    native_shape: tuple[int, int, int]
    native_spacing: tuple[float, float, float]
    resampled_shape: tuple[int, int, int]
    padded_shape: tuple[int, int, int]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(
            float(n * s / r)
            for n, s, r in zip(self.native_shape, self.native_spacing, self.resampled_shape,
                               strict=True)
        )

    def to_record(self) -> dict[str, np.ndarray]:
        """Numeric arrays, for carrying a grid through a Ray Data row."""
        return {
            "native_shape": np.asarray(self.native_shape, dtype=np.int64),
            "native_spacing": np.asarray(self.native_spacing, dtype=np.float64),
            "resampled_shape": np.asarray(self.resampled_shape, dtype=np.int64),
            "padded_shape": np.asarray(self.padded_shape, dtype=np.int64),
        }

    @classmethod
    def from_record(cls, record: dict) -> Grid:
        ints = lambda key: tuple(int(v) for v in np.asarray(record[key]))  # noqa: E731
        return cls(
            native_shape=ints("native_shape"),
            native_spacing=tuple(float(v) for v in np.asarray(record["native_spacing"])),
            resampled_shape=ints("resampled_shape"),
            padded_shape=ints("padded_shape"),
        )


def plan_grid(
    native_shape: tuple[int, ...],
    native_spacing: tuple[float, ...],
    target_spacing_mm: tuple[float, ...],
    min_shape: tuple[int, ...] = (1, 1, 1),
    multiple: int = PAD_MULTIPLE,
) -> Grid:
    """The grid a volume is resampled and padded to; `min_shape` (the training/inference ROI)
    guarantees a window always fits."""
    if len(native_shape) != 3 or len(native_spacing) != 3 or len(target_spacing_mm) != 3:
        raise ValueError("shape, spacing and target spacing must each have three (RAS) entries")
    if any(float(t) <= 0 for t in target_spacing_mm):
        raise ValueError(f"target spacing must be positive, got {tuple(target_spacing_mm)} mm")
    resampled = tuple(
        max(1, round(n * s / t)) for n, s, t in zip(native_shape, native_spacing, target_spacing_mm, strict=True)
    )
    padded = tuple(
        multiple * math.ceil(max(r, m) / multiple) for r, m in zip(resampled, min_shape, strict=True)
    )
    return Grid(
        native_shape=tuple(int(n) for n in native_shape),
        native_spacing=tuple(float(s) for s in native_spacing),
        resampled_shape=resampled,
        padded_shape=padded,
    )


def resample(array: np.ndarray, shape: tuple[int, int, int], is_mask: bool) -> np.ndarray:
    """Resample a 3D array to `shape`, keeping its physical extent (voxel edges map to edges).

    Masks use nearest-neighbour ("nearest-exact": voxel centres, so an unchanged shape is the
    identity) and keep their dtype; images use trilinear interpolation and come back float32.
    """
    shape = tuple(int(s) for s in shape)
    if tuple(array.shape) == shape:
        return array.copy() if is_mask else array.astype(np.float32)
    mode = "nearest-exact" if is_mask else "trilinear"
    source = torch.from_numpy(array.astype(np.float32, copy=False))[None, None]
    # what MONAI's Resize does with these arguments, to the bit (align_corners unset)
    resized = torch.nn.functional.interpolate(source, size=shape, mode=mode)
    out = resized[0, 0].numpy()
    return out.astype(array.dtype) if is_mask else out


def normalize_intensity(image: np.ndarray, percentiles=PERCENTILES) -> np.ndarray:
    """Clip to robust percentiles, then z-score: scanner gain and outliers stop mattering."""
    low, high = np.percentile(image, percentiles)
    clipped = np.clip(image.astype(np.float32, copy=False), low, high)
    std = float(clipped.std())
    if std == 0.0:
        return np.zeros_like(clipped)
    return ((clipped - float(clipped.mean())) / std).astype(np.float32)


def pad_to(array: np.ndarray, shape: tuple[int, int, int], value: float = 0) -> np.ndarray:
    """Append `value` at the far end of each axis up to `shape`."""
    widths = [(0, int(t) - int(s)) for s, t in zip(array.shape, shape, strict=True)]
    if any(after < 0 for _, after in widths):
        raise ValueError(f"cannot pad shape {array.shape} to a smaller {tuple(shape)}")
    return np.pad(array, widths, mode="constant", constant_values=value)


def disc_target(label_map: np.ndarray) -> np.ndarray:
    """The segmentation target: 1 on disc voxels (SPIDER labels 201-225), 0 elsewhere."""
    return ((label_map >= labels.DISC_MIN) & (label_map <= labels.DISC_MAX)).astype(np.uint8)


def preprocess_image(image: np.ndarray, grid: Grid) -> np.ndarray:
    """Native RAS image -> normalised float32 on the padded model grid. The padding takes the
    volume's darkest normalised value, like air around the body."""
    if tuple(image.shape) != grid.native_shape:
        raise ValueError(f"image shape {image.shape} does not match the grid's {grid.native_shape}")
    normalised = normalize_intensity(resample(image, grid.resampled_shape, is_mask=False))
    return pad_to(normalised, grid.padded_shape, value=float(normalised.min()))


def preprocess_mask(label_map: np.ndarray, grid: Grid) -> np.ndarray:
    """Native SPIDER label map -> binary disc target (uint8) on the padded model grid."""
    if tuple(label_map.shape) != grid.native_shape:
        raise ValueError(
            f"mask shape {label_map.shape} does not match the grid's {grid.native_shape}"
        )
    return pad_to(resample(disc_target(label_map), grid.resampled_shape, is_mask=True),
                  grid.padded_shape)


def to_native(prediction: np.ndarray, grid: Grid) -> np.ndarray:
    """A label prediction on the padded model grid -> the native grid: crop the padding, then
    resample nearest-neighbour back to the native shape (dtype kept)."""
    if tuple(prediction.shape) != grid.padded_shape:
        raise ValueError(
            f"prediction shape {prediction.shape} is not the padded grid {grid.padded_shape}"
        )
    rx, ry, rz = grid.resampled_shape
    return resample(prediction[:rx, :ry, :rz], grid.native_shape, is_mask=True)


def load_training_volume(row: dict, target_spacing_mm, roi_size,
                         max_voxels: int = volumes.MAX_VOXELS) -> dict:
    """Ray Data map: one series -> its preprocessed image and disc target on the model grid, or
    empty arrays and the reason when its files are unusable."""
    base = {"series_id": row["series_id"], "split": row["split"]}
    try:
        image, mask = read_usable_pair(row, max_voxels)
    except validate.BadInput as err:
        return {**base, "error": str(err), "file": err.file,
                "image": np.zeros((0, 0, 0), np.float32), "label": np.zeros((0, 0, 0), np.uint8)}
    grid = plan_grid(image.array.shape, image.spacing, target_spacing_mm, roi_size)
    return {**base, "error": "", "file": "",
            "image": preprocess_image(image.array, grid),
            "label": preprocess_mask(mask.array, grid)}


def training_transform(roi_size: tuple[int, int, int], crops: int, seed: int | None = None):
    """Random training crops with light, anatomically plausible augmentation.

    Crops are centred on disc or background voxels half the time each (discs are a few percent
    of a volume). Only left-right flips: a spine mirrored L-R is still a spine, mirrored A-P or
    S-I it is not. Small intensity scale/shift mimic scanner gain differences. Takes and returns
    dicts of channel-first arrays {"image": (1, X, Y, Z) float32, "label": (1, X, Y, Z) uint8}.
    """
    # Imported here: only training workers crop, and MONAI's __init__ imports all of MONAI
    # (4 s of CPU per process, lean_monai) into every Ray worker that preprocesses a volume.
    lean_monai.load()
    from monai.transforms import (
        Compose,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    transform = Compose([
        RandCropByPosNegLabeld(
            keys=("image", "label"), label_key="label", spatial_size=tuple(roi_size),
            pos=1.0, neg=1.0, num_samples=crops,
        ),
        RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=0),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ])
    if seed is not None:
        transform.set_random_state(seed=seed)
    return transform

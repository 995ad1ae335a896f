"""Split a disc mask into single discs, name each by its level, and cut it into a fixed cube.

Reference label maps name their discs (label 200+k is the k-th disc from the bottom). A predicted
binary mask does not: its connected components are ordered along S and, when a reference is at
hand, each takes the label of the reference disc it overlaps most. A component spanning two
reference discs ("merged"), a reference disc shared by two components ("split") and a component
on no reference disc ("unmatched") are flagged on the disc and in a DiscMatchReport, never
passed off as a well-identified level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from pipeline.data import labels, volumes

# Voxels kept around a disc's bounding box in Disc.mask (clipped at the volume border).
MARGIN_VOXELS = 2
# A component "covers" a reference disc when it holds at least this share of it. Segmentation
# boundaries at Dice 0.85-0.9 move about a tenth of a disc's volume; a quarter is a real claim.
COVER_FRACTION = 0.25
# ivd_label and level of a predicted component that overlaps no reference disc: no SPIDER
# label is negative, so such a disc never joins a grading (SPIDER's invalid gradings use 0).
UNMATCHED_LABEL = -1
UNMATCHED_LEVEL = ""


@dataclass
class Disc:
    ivd_label: int
    level: str
    mask: np.ndarray  # bool, the disc's bounding box plus MARGIN_VOXELS, clipped at the border
    offset: tuple[int, int, int]  # index of mask[0, 0, 0] in the full volume
    match_dice: float = math.nan  # Dice with the reference disc it is named after; NaN if none
    status: str = "ok"  # "ok" | "merged" | "split" | "unmatched"


@dataclass
class DiscMatchReport:
    n_found: int  # components kept (specks dropped)
    n_expected: int  # reference discs; 0 when there is no reference
    merged: list[int] = field(default_factory=list)  # reference labels spanned by one component
    split: list[int] = field(default_factory=list)  # reference labels shared by components
    unmatched: int = 0  # components on no reference disc


def _check_volume(array: np.ndarray, what: str) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != 3:
        shape = getattr(array, "shape", type(array).__name__)
        raise ValueError(f"{what} must be a 3D numpy array, got {shape}")


def _crop(box: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - MARGIN_VOXELS, 0), min(s.stop + MARGIN_VOXELS, n))
                 for s, n in zip(box, shape, strict=True))


def _offset(crop: tuple[slice, ...]) -> tuple[int, int, int]:
    return tuple(int(s.start) for s in crop)


def reference_discs(label_map: np.ndarray) -> list[Disc]:
    """One Disc per disc label present (201, 202, ...), in label order, i.e. bottom to top."""
    _check_volume(label_map, "label map")
    if not np.issubdtype(label_map.dtype, np.integer) or label_map.dtype == bool:
        raise ValueError(f"label map must hold integer SPIDER labels, got {label_map.dtype}")
    if label_map.size and label_map.min() < 0:
        raise ValueError(f"label map holds a negative label ({label_map.min()})")
    found = []
    boxes = ndimage.find_objects(np.where(label_map >= labels.DISC_MIN, label_map, 0))
    for ivd_label in range(labels.DISC_MIN, labels.DISC_MAX + 1):
        if ivd_label > len(boxes) or boxes[ivd_label - 1] is None:
            continue
        crop = _crop(boxes[ivd_label - 1], label_map.shape)
        found.append(Disc(ivd_label=ivd_label, level=labels.level_name(ivd_label),
                          mask=label_map[crop] == ivd_label, offset=_offset(crop)))
    return found


def predicted_discs(
    binary: np.ndarray,
    spacing: Sequence[float],
    reference: np.ndarray | None = None,
    min_volume_mm3: float = 200.0,
) -> tuple[list[Disc], DiscMatchReport]:
    """Connected components of a binary disc mask as Discs, ordered from the bottom (along S).

    Components use full 3D connectivity (26 neighbours). On 3.3 mm sagittal slices a thin disc
    tilted by a coronal angle b steps 3.3 * tan(b) mm up from one slice to the next; once the
    step exceeds its thickness the slices touch only along edges or corners, and 6-connectivity
    would cut one disc into several (it already detaches a voxel of the fixture's top disc).
    Neighbouring discs are ~25 mm of vertebral body apart, so a corner contact between two
    of them is no real risk, and a true leak is reported as "merged" anyway. Components under
    `min_volume_mm3` are specks and dropped.

    With `reference` (a SPIDER label map of the same shape), each component takes the label of
    the reference disc it overlaps most (match_dice = Dice with that disc). A component covering
    COVER_FRACTION of more than one reference disc is "merged"; a reference disc that several
    components take as theirs or cover is "split" (status of those components); a component on
    no reference disc is "unmatched" (ivd_label UNMATCHED_LABEL, level ""). Without a reference,
    components are numbered 201, 202, ... from the bottom.
    """
    _check_volume(binary, "binary mask")
    if binary.dtype != bool:
        if not np.issubdtype(binary.dtype, np.integer) or binary.min() < 0 or binary.max() > 1:
            raise ValueError(f"binary mask must be boolean or 0/1, got {binary.dtype} values "
                             f"from {binary.min()} to {binary.max()}")
        binary = binary.astype(bool)
    spacing = volumes.check_spacing(spacing)
    if reference is not None:
        _check_volume(reference, "reference")
        if reference.shape != binary.shape:
            raise ValueError(f"reference shape {reference.shape} differs from mask shape "
                             f"{binary.shape}")
        if not np.issubdtype(reference.dtype, np.integer) or reference.dtype == bool:
            raise ValueError(f"reference must hold integer SPIDER labels, got {reference.dtype}")

    components, count = ndimage.label(binary, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    voxel_mm3 = float(np.prod(spacing))
    boxes = ndimage.find_objects(components)
    kept = []
    for k in range(1, count + 1):
        if sizes[k] * voxel_mm3 < min_volume_mm3:
            continue
        crop = _crop(boxes[k - 1], binary.shape)
        mask = components[crop] == k
        height = (np.argwhere(mask)[:, 2].mean() + crop[2].start) * spacing[2]
        kept.append((height, crop, mask))
    kept.sort(key=lambda item: item[0])

    if reference is None:
        if len(kept) > labels.DISC_MAX - labels.DISC_MIN + 1:
            raise ValueError(f"{len(kept)} disc components, more than there are disc labels")
        found = [Disc(ivd_label=labels.DISC_MIN + i, level=labels.level_name(labels.DISC_MIN + i),
                      mask=mask, offset=_offset(crop)) for i, (_, crop, mask) in enumerate(kept)]
        return found, DiscMatchReport(n_found=len(found), n_expected=0)
    return _match(kept, reference)


def _match(kept: list, reference: np.ndarray) -> tuple[list[Disc], DiscMatchReport]:
    """Name components after the reference discs they overlap; flag merges and splits."""
    in_disc = (reference >= labels.DISC_MIN) & (reference <= labels.DISC_MAX)
    reference_sizes = np.bincount(reference[in_disc].astype(np.intp) - labels.DISC_MIN,
                                  minlength=labels.DISC_MAX - labels.DISC_MIN + 1)
    expected = [labels.DISC_MIN + i for i in np.flatnonzero(reference_sizes)]
    overlaps = []  # per component: {reference label: voxels shared}
    for _, crop, mask in kept:
        under = reference[crop][mask]
        under = under[(under >= labels.DISC_MIN) & (under <= labels.DISC_MAX)]
        values, counts = np.unique(under, return_counts=True)
        overlaps.append(dict(zip(values.tolist(), counts.tolist(), strict=True)))

    best = [max(o, key=o.get) if o else None for o in overlaps]
    covers = []
    for o, b in zip(overlaps, best, strict=True):
        covered = {r for r, n in o.items() if n >= COVER_FRACTION * reference_sizes[r - labels.DISC_MIN]}
        covers.append(covered | ({b} if b is not None else set()))
    merged = sorted({r for c in covers if len(c) > 1 for r in c})
    claims = {r: sum(r in c for c in covers) for r in expected}
    split = sorted(r for r, n in claims.items() if n > 1)

    found = []
    for (_, crop, mask), o, b, c in zip(kept, overlaps, best, covers, strict=True):
        if b is None:
            found.append(Disc(UNMATCHED_LABEL, UNMATCHED_LEVEL, mask, _offset(crop),
                              status="unmatched"))
            continue
        dice = 2.0 * o[b] / (mask.sum() + reference_sizes[b - labels.DISC_MIN])
        status = "merged" if len(c) > 1 else "split" if b in split else "ok"
        found.append(Disc(b, labels.level_name(b), mask, _offset(crop), float(dice), status))
    report = DiscMatchReport(n_found=len(found), n_expected=len(expected), merged=merged,
                             split=split, unmatched=sum(b is None for b in best))
    return found, report


def disc_cube(disc: Disc, spacing: Sequence[float], cube_size: int,
              cube_spacing_mm: float) -> tuple[np.ndarray, bool]:
    """The disc in a (cube_size,)*3 uint8 cube of isotropic `cube_spacing_mm`, RAS axes kept.

    The cube is centred on the disc's centre of mass (mm); each cube voxel centre takes the
    value of the disc voxel it falls in (nearest neighbour: masks are never interpolated), which
    handles anisotropic input. `fits` is False when any disc voxel reaches outside the cube's
    field of view: that disc is truncated in the cube, and says so.
    """
    spacing = volumes.check_spacing(spacing)
    if int(cube_size) != cube_size or cube_size < 1 or not cube_spacing_mm > 0:
        raise ValueError(f"cube size {cube_size} and spacing {cube_spacing_mm} mm must be positive")
    points = np.argwhere(disc.mask)
    if len(points) == 0:
        raise ValueError(f"disc {disc.ivd_label} has an empty mask")
    centre_mm = points.mean(axis=0) * spacing
    half_fov = cube_size * cube_spacing_mm / 2
    grid = (np.arange(cube_size) - (cube_size - 1) / 2) * cube_spacing_mm
    index, valid = [], []
    for axis in range(3):
        i = np.floor((centre_mm[axis] + grid) / spacing[axis] + 0.5).astype(np.intp)
        valid.append((i >= 0) & (i < disc.mask.shape[axis]))
        index.append(np.clip(i, 0, disc.mask.shape[axis] - 1))
    cube = (disc.mask[np.ix_(*index)] & valid[0][:, None, None] & valid[1][None, :, None]
            & valid[2][None, None, :])
    low = (points.min(axis=0) - 0.5) * spacing - centre_mm
    high = (points.max(axis=0) + 0.5) * spacing - centre_mm
    fits = bool(np.all(low >= -half_fov - 1e-9) and np.all(high <= half_fov + 1e-9))
    return cube.astype(np.uint8), fits

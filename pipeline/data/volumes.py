"""Read and write `.mha`, `.nii` and `.nii.gz` volumes as canonical RAS arrays.

This is the only module that touches direction matrices or affines. Every array it returns has
axis 0 pointing Right, axis 1 Anterior and axis 2 Superior, with the spacing in mm in the same
order; a `Header` keeps what is needed to write a result back in the file's own orientation.
Oblique directions are snapped to the nearest axes (no resampling), as TorchIO's ToCanonical does.

A MetaImage header names the file its pixels live in (`ElementDataFile`) and SimpleITK follows
it, so a hostile `.mha` could load any file the job can read as voxels and write it back out as a
prediction. Every header is therefore checked before SimpleITK opens it: a `.mha` must hold its
own pixels, a `.mhd` may name only one file in its own folder, and no volume may declare more
voxels than `max_voxels` (checked before any pixel buffer is allocated).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import nibabel.orientations as nio
import numpy as np
import SimpleITK as sitk

from pipeline.config import InputConfig
from pipeline.data import storage

SUFFIXES = (".mha", ".mhd", ".nii", ".nii.gz")
MAX_VOXELS = InputConfig.max_voxels  # the readers' default; jobs pass the config's
_META_HEADER_BYTES = 65536  # real MetaImage headers are well under 1 KiB
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


@dataclass(frozen=True)
class Header:
    """Where a stored volume sits in space.

    `affine` maps stored (x, y, z) voxel indices to RAS mm; `ornt` is nibabel's orientation of the
    stored axes relative to RAS (what `read_volume` applied to reach canonical RAS).
    """

    affine: np.ndarray
    stored_shape: tuple[int, int, int]

    @property
    def ornt(self) -> np.ndarray:
        return nio.io_orientation(self.affine)

    @property
    def axcodes(self) -> str:
        return "".join(nio.aff2axcodes(self.affine))

    @property
    def ras_affine(self) -> np.ndarray:
        """Affine of the canonical RAS array: voxel index -> RAS mm."""
        return self.affine @ nio.inv_ornt_aff(self.ornt, self.stored_shape)


@dataclass(frozen=True)
class Volume:
    array: np.ndarray
    spacing: tuple[float, float, float]
    header: Header


def _suffix(path: str) -> str:
    name = PurePosixPath(str(path)).name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")


def check_spacing(spacing: Sequence[float]) -> np.ndarray:
    """Voxel spacing as three positive, finite mm values (RAS order), or a ValueError."""
    spacing = np.asarray(spacing, dtype=float)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing must be three positive mm values, got {tuple(np.ravel(spacing))}")
    return spacing


def make_header(
    ras_shape: tuple[int, ...],
    spacing: tuple[float, ...],
    axcodes: str = "LPS",
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Header:
    """A header that stores a RAS array with its index axes pointing along `axcodes`.

    `axcodes="LPS"` is ITK's identity direction, the way SPIDER stores its volumes.
    """
    target = nio.axcodes2ornt(tuple(axcodes))
    to_stored = nio.ornt_transform(_RAS, target)
    stored_shape = tuple(int(s) for s in np.asarray(ras_shape)[to_stored[:, 0].astype(int).argsort()])
    stored_spacing = np.empty(3)
    for ras_axis, (stored_axis, _flip) in enumerate(to_stored):
        stored_spacing[int(stored_axis)] = spacing[ras_axis]
    rotation = np.zeros((3, 3))
    for stored_axis, (ras_axis, sign) in enumerate(target):
        rotation[int(ras_axis), stored_axis] = sign * stored_spacing[stored_axis]
    affine = np.eye(4)
    affine[:3, :3] = rotation
    affine[:3, 3] = origin
    return Header(affine=affine, stored_shape=stored_shape)


def _element_data_file(path: str, head: bytes) -> str:
    """Where a MetaImage header says its pixels are: the value of its first ElementDataFile
    line (MetaIO stops reading the header there, and the pixel data, if local, begins)."""
    for line in head.decode("latin-1").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() == "elementdatafile":
            return value.strip()
    raise ValueError(f"{path}: not a readable image (no ElementDataFile line in the first "
                     f"{_META_HEADER_BYTES} bytes of its MetaImage header)")


def _companion(path: str, suffix: str, target: str) -> str | None:
    """The file beside a `.mhd` that holds its pixels (None: they follow the header), or a
    ValueError naming the file and where its header points when that is anywhere else."""
    if target in ("LOCAL", "Local", "local"):  # the spellings MetaIO takes for "right here"
        return None
    if suffix == ".mha":
        raise ValueError(f"{path}: refused: its header's ElementDataFile points to {target!r}; "
                         "a .mha must hold its own pixels (ElementDataFile = LOCAL)")
    if target.upper().startswith("LIST") or " " in target or "%" in target:
        raise ValueError(f"{path}: refused: its header's ElementDataFile names a list or "
                         f"pattern of files ({target!r}); a .mhd may name one file beside it")
    if "/" in target or "\\" in target or target in ("", ".", ".."):
        raise ValueError(f"{path}: refused: its header's ElementDataFile points to {target!r}, "
                         "outside its own folder; a .mhd may name only a file beside it")
    return target


def _read_head(path: str) -> bytes:
    fs, location = storage.filesystem(path)
    with fs.open_input_stream(location) as f:
        return f.read(_META_HEADER_BYTES)


@contextlib.contextmanager
def _checked_local_copy(path: str, suffix: str) -> Iterator[str]:
    """A local path SimpleITK may open: a MetaImage's header is checked first for where its
    pixels live, and a `.mhd` read from a URI comes with its pixel file."""
    companion = None
    if suffix in (".mha", ".mhd"):
        companion = _companion(path, suffix, _element_data_file(path, _read_head(path)))
    if companion is None or not storage.is_uri(path):
        with storage.local_copy(path, suffix) as local:
            yield local
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "volume" + suffix)
        sibling = storage.join(path.rsplit("/", 1)[0], companion)
        for source, target in ((path, local), (sibling, os.path.join(tmp, companion))):
            with open(target, "wb") as f:
                f.write(storage.read_bytes(source))
        yield local


def read_volume(path: str, max_voxels: int = MAX_VOXELS) -> Volume:
    """Read a volume from a local path or URI into canonical RAS.

    Raises ValueError naming the file for anything that is not a readable 3D image with a
    positive, finite spacing, for a MetaImage header that points at any file but its own pixels,
    and for a volume of more than `max_voxels` voxels (before its pixels are allocated).
    """
    suffix = _suffix(path)
    try:
        with _checked_local_copy(str(path), suffix) as local:
            reader = sitk.ImageFileReader()
            reader.SetFileName(local)
            reader.ReadImageInformation()  # the header alone: no pixel buffer yet
            size = reader.GetSize()
            if math.prod(size) > max_voxels:
                raise ValueError(f"{path}: refused: its header declares {math.prod(size)} voxels "
                                 f"(size {size}), more than the limit of {max_voxels} "
                                 "(inputs.max_voxels)")
            image = reader.Execute()
    except (RuntimeError, OSError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines()]
        # ITK's own reason ("ITK ERROR: MetaImageIO(0x...): ..."), not the C++ source location.
        detail = next((line for line in lines if "ERROR" in line), lines[0] if lines else "")
        detail = re.sub(r"^(sitk::|ITK )?ERROR: (\w+\(0x[0-9a-fA-F]+\): )?", "", detail)
        raise ValueError(f"{path}: not a readable image ({detail.strip() or type(err).__name__})") from err
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{path}: expected a 3D scalar volume, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    spacing = np.array(image.GetSpacing(), dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"{path}: absurd voxel spacing {tuple(spacing)} mm (must be positive)")
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = image.GetOrigin()
    stored = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    header = Header(affine=_LPS_TO_RAS @ lps, stored_shape=tuple(int(s) for s in stored.shape))
    ornt = header.ornt
    ras = np.ascontiguousarray(nio.apply_orientation(stored, ornt))
    ras_spacing = [0.0, 0.0, 0.0]
    for stored_axis, (ras_axis, _flip) in enumerate(ornt):
        ras_spacing[int(ras_axis)] = float(spacing[stored_axis])
    return Volume(array=ras, spacing=tuple(ras_spacing), header=header)


def write_volume(path: str, array: np.ndarray, header: Header) -> None:
    """Write a canonical RAS array in the orientation `header` describes (local path or URI)."""
    suffix = _suffix(path)
    to_stored = nio.ornt_transform(_RAS, header.ornt)
    stored = nio.apply_orientation(np.asarray(array), to_stored)
    if tuple(stored.shape) != tuple(header.stored_shape):
        raise ValueError(f"{path}: array shape {array.shape} does not match the header's grid")
    lps = _LPS_TO_RAS @ header.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(stored.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(d) for d in (lps[:3, :3] / spacing).ravel()))
    image.SetOrigin(tuple(float(o) for o in lps[:3, 3]))
    if storage.is_uri(path):
        with tempfile.TemporaryDirectory() as tmp:
            local = f"{tmp}/volume{suffix}"
            sitk.WriteImage(image, local, useCompression=True)
            storage.upload(local, path)
    else:
        storage.makedirs(str(PurePosixPath(storage.absolute(path)).parent))
        sitk.WriteImage(image, str(path), useCompression=True)

"""A corpus of bad inputs: a synthetic SPIDER-layout cohort plus corrupted copies of its files.

`make_corpus(root, clean)` copies the clean cohort and adds, as new patients 101+, one series per
way a file can be wrong, plus bad rows in overview.csv and radiological_gradings.csv. Good
patients keep their files, overview rows (subset included, so the patient split is unchanged) and
gradings, so every good series must come out exactly as it does from the clean cohort.
`CASES` says, per bad input, which stage must quarantine it, which file it must name and words
the reason must contain.

Three headers are planted as an attacker would: an image whose ElementDataFile is an absolute path
and a mask whose ElementDataFile climbs out with `../`, both to valid pixel data of the right size
outside the corpus (SimpleITK, left alone, reads it and the job segments it), and an image whose
DimSize declares more voxels than the run's `inputs.max_voxels` (MAX_VOXELS).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from pipeline.data import labels, volumes


@dataclass(frozen=True)
class Case:
    name: str
    stage: str  # the stage whose errors hold it
    file: str  # relative to the corpus root
    words: tuple[str, ...]  # the reason contains all of these (case-insensitive)
    series_id: str | None = None


SOURCE = "1_t1"  # the good series the bad volumes are made from
OUTSIDE = "outside"  # beside the corpus root: where the planted headers point
SECRET = b"PLANTED-SECRET-3f9c2a71d8e64b05"  # starts the pixel file outside the corpus
MAX_VOXELS = 10_000_000  # the run's inputs.max_voxels; the synthetic volumes hold ~2.7 million
OVERSIZED = "400 400 400"  # the DimSize planted in 115_t1: 64 million voxels
CASES = [
    Case("truncated .mha", "extract", "images/101_t1.mha", ("not a readable image",), "101_t1"),
    Case("not an image at all", "extract", "images/102_t1.mha", ("not a readable image",), "102_t1"),
    Case("image with no mask", "catalog", "images/103_t1.mha", ("no mask",), "103_t1"),
    Case("mask with no image", "catalog", "masks/104_t1.mha", ("no image",), "104_t1"),
    Case("mask shape differs from image", "extract", "masks/105_t1.mha",
         ("mask shape", "differs from image shape"), "105_t1"),
    Case("mask spacing differs from image", "extract", "masks/106_t1.mha",
         ("mask spacing", "differs from image spacing"), "106_t1"),
    Case("mask with no disc labels", "extract", "masks/107_t1.mha", ("no disc labels",), "107_t1"),
    Case("mask with unknown label values", "extract", "masks/108_t1.mha",
         ("label value(s) 150, 300",), "108_t1"),
    Case("NaN/Inf intensities", "extract", "images/109_t1.mha", ("nan/inf",), "109_t1"),
    Case("constant image", "extract", "images/110_t1.mha", ("constant",), "110_t1"),
    Case("zero spacing in the image header", "extract", "images/111_t1.mha",
         ("not a readable image", "zero-valued spacing"), "111_t1"),
    # MetaIO reads a negative spacing as a flipped axis: the mask then lies elsewhere in space.
    Case("negative spacing in the mask header", "extract", "masks/112_t1.mha",
         ("mask lies elsewhere in space",), "112_t1"),
    Case("ElementDataFile is an absolute path", "extract", "images/113_t1.mha",
         ("refused", "elementdatafile points to '/", f"{OUTSIDE}/113_t1_image.raw'",
          "must hold its own pixels"), "113_t1"),
    Case("ElementDataFile climbs out with ../", "extract", "masks/114_t1.mha",
         ("refused", f"elementdatafile points to '../../{OUTSIDE}/114_t1_mask.raw'"), "114_t1"),
    Case("DimSize over inputs.max_voxels", "extract", "images/115_t1.mha",
         ("refused", "declares 64000000 voxels", f"limit of {MAX_VOXELS}"), "115_t1"),
    Case("overview.csv names files that don't exist", "catalog", "overview.csv",
         ("names series 120_t1", "neither"), "120_t1"),
    Case("overview.csv name with ../", "catalog", "overview.csv",
         ("'../1_t1'", "is a path")),
    Case("overview.csv absolute name", "catalog", "overview.csv",
         ("'/etc/passwd'", "is a path")),
    Case("gradings: non-numeric value", "catalog", "radiological_gradings.csv",
         ("modic 'abc' is not a whole number",)),
    Case("gradings: IVD label 0", "catalog", "radiological_gradings.csv",
         ("ivd label 0 names no disc",)),
    Case("gradings: duplicate keys", "catalog", "radiological_gradings.csv",
         ("grade the same disc", "patient 101, ivd label 2")),
]
BAD_SERIES = sorted({c.series_id for c in CASES if c.series_id})


def make_corpus(root: Path, clean: Path) -> Path:
    """Copy the clean cohort to `root` and add every case of CASES; returns `root`."""
    shutil.copytree(clean, root)
    image = volumes.read_volume(str(clean / "images" / f"{SOURCE}.mha"))
    mask = volumes.read_volume(str(clean / "masks" / f"{SOURCE}.mha"))
    images, masks = root / "images", root / "masks"

    def write(folder: Path, series_id: str, array: np.ndarray, spacing=None) -> Path:
        spacing = image.spacing if spacing is None else spacing
        path = folder / f"{series_id}.mha"
        volumes.write_volume(str(path), array, volumes.make_header(array.shape, spacing, "LPS"))
        return path

    def pair(series_id: str, image_array=None, mask_array=None) -> None:
        write(images, series_id, image.array if image_array is None else image_array)
        write(masks, series_id, mask.array if mask_array is None else mask_array)

    pair("101_t1")
    data = (images / "101_t1.mha").read_bytes()
    (images / "101_t1.mha").write_bytes(data[: len(data) // 2])
    pair("102_t1")
    (images / "102_t1.mha").write_text("patient,notes\n102,this is a spreadsheet, not a volume\n")
    write(images, "103_t1", image.array)
    write(masks, "104_t1", mask.array)
    write(images, "105_t1", image.array)
    write(masks, "105_t1", mask.array[:, :, :-3])
    write(images, "106_t1", image.array)
    write(masks, "106_t1", mask.array, spacing=tuple(2 * s for s in image.spacing))
    no_discs = np.where(mask.array >= labels.DISC_MIN, 0, mask.array).astype(mask.array.dtype)
    pair("107_t1", mask_array=no_discs)
    unknown = mask.array.copy()
    unknown[0, 0, 0], unknown[-1, -1, -1] = 150, 300
    pair("108_t1", mask_array=unknown)
    non_finite = image.array.astype(np.float32)
    non_finite[5, 5, 5], non_finite[6, 6, 6] = np.nan, np.inf
    pair("109_t1", image_array=non_finite)
    pair("110_t1", image_array=np.full_like(image.array, 7))
    pair("111_t1")
    _patch_header(images / "111_t1.mha", "ElementSpacing", lambda s: ["0", *s[1:]])
    pair("112_t1")
    _patch_header(masks / "112_t1.mha", "ElementSpacing", lambda s: [s[0], f"-{s[1]}", s[2]])
    outside = root.parent / OUTSIDE
    pair("113_t1")
    point_pixels_elsewhere(images / "113_t1.mha", str(outside / "113_t1_image.raw"),
                           outside / "113_t1_image.raw", marker=SECRET)
    pair("114_t1")
    point_pixels_elsewhere(masks / "114_t1.mha", f"../../{OUTSIDE}/114_t1_mask.raw",
                           outside / "114_t1_mask.raw")
    pair("115_t1")
    _patch_header(images / "115_t1.mha", "DimSize", lambda _: OVERSIZED.split())

    overview = pd.read_csv(root / "overview.csv", dtype=str, keep_default_na=False)
    template = overview.iloc[0].to_dict()
    subsets = {"101": "validation", "105": "validation"}  # most bad series would be trained on
    extra = [{**template, "new_file_name": sid, "subset": subsets.get(sid.split("_")[0], "training")}
             for sid in BAD_SERIES]
    extra += [{**template, "new_file_name": name} for name in ("../1_t1", "/etc/passwd")]
    pd.concat([overview, pd.DataFrame(extra)]).to_csv(root / "overview.csv", index=False)

    gradings = pd.read_csv(root / "radiological_gradings.csv", dtype=str, keep_default_na=False)
    row = {**gradings.iloc[0].to_dict(), "Patient": "101"}
    bad_rows = [
        {**row, "IVD label": "1", "Modic": "abc"},
        {**row, "IVD label": "0"},
        {**row, "IVD label": "2", "Disc bulging": "0"},
        {**row, "IVD label": "2", "Disc bulging": "1"},
    ]
    pd.concat([gradings, pd.DataFrame(bad_rows)]).to_csv(root / "radiological_gradings.csv",
                                                         index=False)
    return root


def gradings_missing_columns(root: Path, clean: Path) -> Path:
    """A copy of the clean cohort whose gradings CSV lacks two columns."""
    shutil.copytree(clean, root)
    path = root / "radiological_gradings.csv"
    pd.read_csv(path, dtype=str).drop(columns=["Disc bulging", "Modic"]).to_csv(path, index=False)
    return root


def point_pixels_elsewhere(path: Path, data_file: str, pixels_at: Path, marker: bytes = b""
                           ) -> None:
    """Rewrite a .mha so that its header's ElementDataFile is `data_file`, and move its pixel
    bytes (uncompressed, the first ones replaced by `marker`) to `pixels_at`, where `data_file`
    leads: a reader that follows the header loads a valid volume from outside the dataset."""
    sitk.WriteImage(sitk.ReadImage(str(path)), str(path), useCompression=False)
    data = path.read_bytes()
    local = b"ElementDataFile = LOCAL\n"
    start = data.index(local) + len(local)
    pixels_at.parent.mkdir(parents=True, exist_ok=True)
    pixels_at.write_bytes(marker + data[start + len(marker):])
    path.write_bytes(data[: data.index(local)] + f"ElementDataFile = {data_file}\n".encode())


def _patch_header(path: Path, key: str, change) -> None:
    """Rewrite one `key = values` line of a .mha header in place (the header is plain text):
    `change` maps the list of value strings to the new one."""
    data = path.read_bytes()
    head_end = data.index(b"ElementDataFile")
    head = data[:head_end].decode()
    old = re.search(rf"{key} = ([^\n]*)", head)
    new = " ".join(change(old.group(1).split()))
    head = head[: old.start(1)] + new + head[old.end(1):]
    path.write_bytes(head.encode() + data[head_end:])

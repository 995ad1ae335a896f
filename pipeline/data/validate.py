"""Checks on an image/mask pair that reads fine but would give wrong or empty numbers.

`preprocess.read_pair` refuses what cannot be read; this module refuses what is readable but
wrong for disc geometry: a mask on another grid or elsewhere in space than its image, NaN/Inf or
constant intensities, a mask with values SPIDER's label map does not define or without a disc
label. Both the segmentation training loader and the extraction stage call it, so a bad volume
is neither trained on nor measured; each problem is a `BadInput` naming the file.
"""

from __future__ import annotations

import numpy as np

from pipeline.data import labels, volumes

MAX_LISTED = 5  # unknown label values named in a message


class BadInput(ValueError):
    """A series the pipeline cannot use; `file` names the offending file."""

    def __init__(self, file: str, reason: str):
        super().__init__(reason)
        self.file = str(file)


def check_series(image: volumes.Volume, mask: volumes.Volume, image_uri: str, mask_uri: str) -> None:
    """Raise BadInput (naming the file and the problem) unless the pair is fit to segment and
    measure: same grid, finite and non-constant intensities, a SPIDER label map with discs."""
    if image.array.shape != mask.array.shape:
        raise BadInput(mask_uri, f"{mask_uri}: mask shape {mask.array.shape} differs from image "
                                 f"shape {image.array.shape} (RAS order)")
    if not np.allclose(image.spacing, mask.spacing, rtol=1e-3, atol=1e-4):
        raise BadInput(mask_uri, f"{mask_uri}: mask spacing {_mm(mask.spacing)} mm differs from "
                                 f"image spacing {_mm(image.spacing)} mm")
    # Same grid but elsewhere in space (a flipped axis, a shifted origin): the mask would label
    # the wrong voxels. Half a voxel of slack keeps rounding in real headers acceptable.
    tolerance = 0.5 * min(image.spacing)
    if not np.allclose(image.header.ras_affine, mask.header.ras_affine, rtol=0, atol=tolerance):
        raise BadInput(mask_uri, f"{mask_uri}: mask lies elsewhere in space than its image "
                                 f"(orientation {mask.header.axcodes} vs {image.header.axcodes}, "
                                 "or origin more than half a voxel apart)")
    intensities = image.array
    bad = int(np.count_nonzero(~np.isfinite(intensities)))
    if bad:
        raise BadInput(image_uri, f"{image_uri}: image has {bad} NaN/Inf voxels")
    if intensities.size and intensities.min() == intensities.max():
        raise BadInput(image_uri, f"{image_uri}: image is constant (every voxel "
                                  f"{intensities.flat[0].item()}): nothing to segment")
    values = np.unique(mask.array)
    if not np.issubdtype(values.dtype, np.integer) and not np.all(values == np.round(values)):
        raise BadInput(mask_uri, f"{mask_uri}: mask holds non-integer values; a label map "
                                 "must be whole numbers")
    unknown = [int(v) for v in values if not labels.is_known(int(v))]
    if unknown:
        listed = ", ".join(str(v) for v in unknown[:MAX_LISTED])
        more = f" and {len(unknown) - MAX_LISTED} more" if len(unknown) > MAX_LISTED else ""
        raise BadInput(mask_uri, f"{mask_uri}: mask holds label value(s) {listed}{more} that "
                                 "SPIDER's label map does not define (0, 1-25, 100, 101-125, "
                                 "201-225)")
    if not any(labels.is_disc(int(v)) for v in values):
        raise BadInput(mask_uri, f"{mask_uri}: mask has no disc labels "
                                 f"({labels.DISC_MIN}-{labels.DISC_MAX}); nothing to measure")


def _mm(spacing) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in spacing)

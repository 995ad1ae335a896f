"""Disc geometry in millimetres from a boolean disc mask, in a PCA frame fixed to RAS.

Everything is measured in physical mm: voxel index i sits at i * spacing along each axis, so thick
sagittal slices (3.3 mm along R) and fine in-plane voxels are handled alike.

The disc frame:
- centre c: the mean of the voxel centres (mm).
- normal n: the axis of least extent of the voxel cloud (PCA of the voxel centres, each voxel's
  own extent, spacing**2 / 12 per axis, added to the covariance so thick slices are not
  under-weighted), signed to point Superior.
- AP axis a: RAS Anterior projected onto the disc plane, normalised. Not PCA's eigenvalue order:
  for a nearly round footprint the in-plane eigenvectors are arbitrary. One consequence: a
  rotation of the disc about its own normal is not measured; the transverse angle below only
  reflects how the normal leans.
- lateral axis l = a x n, which points Right (l, a, n is right-handed like R, A, S).
- frame coordinates of a point p: u = (p - c).l, v = (p - c).a, w = (p - c).n.
- mid-surface: the quadratic w = m(u, v) through the midpoints of the lines along n that cross
  the disc. Real disc masks are thin and curved (SPIDER's are 3-8 mm thick and follow the
  endplates' concavity): a plane through the centre leaves them well before their rim.

Nothing is measured by counting voxels along a tilted line. The mask is sampled nearest-neighbour
at points of the disc frame, a fraction of the smallest voxel apart. For a mask rasterised by
voxel-centre inclusion that puts each boundary half-way between an inside and an outside voxel
centre, so lengths are unbiased whatever the tilt; each estimate then averages many lines that
cut the voxel grid at different phases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.data import labels, tables, volumes

# Positions of the three heights along the mid-sagittal AP chord, from posterior (0) to anterior (1).
HEIGHT_FRACTIONS = {"height_posterior_mm": 0.15, "height_middle_mm": 0.50, "height_anterior_mm": 0.85}
# Vertebral bone closer than this to the disc counts as its endplate (measure_bulge): deep
# enough for the rounded rim of the vertebral body, which curves away from a thin disc mask.
ENDPLATE_DEPTH_MM = 5.0
# Rays from the disc centre that sample the mid-surface circumference (measure_bulge).
BULGE_RAYS = 360
BULGE_SMOOTHING_DEG = 15.0


@dataclass(frozen=True)
class DiscFrame:
    centre: np.ndarray  # mm, in the mask's own index frame
    lateral: np.ndarray
    anterior: np.ndarray
    normal: np.ndarray
    spacing: np.ndarray
    bounds: np.ndarray  # extents of the voxel centres along (l, a, n), mm from c: rows min, max
    mid_surface: np.ndarray  # coefficients of 1, u, v, u^2, uv, v^2
    rim_thickness_mm: float  # 20th percentile of the thickness along n over the footprint

    def lookup(self, volume: np.ndarray, u, v, w) -> np.ndarray:
        """Nearest-neighbour values of `volume` at frame coordinates (mm); 0 outside the array."""
        padded = np.pad(volume, 1)  # indices clipped into the zero border read 0 outside
        flat = 0
        for axis in range(3):
            scale = 1.0 / self.spacing[axis]
            position = (self.centre[axis] * scale + 1.5 + u * (self.lateral[axis] * scale)
                        + v * (self.anterior[axis] * scale) + w * (self.normal[axis] * scale))
            index = np.clip(np.floor(position).astype(np.intp), 0, padded.shape[axis] - 1)
            flat = flat * padded.shape[axis] + index
        return padded.ravel()[flat]

    def mid(self, u, v) -> np.ndarray:
        """w of the mid-surface above (u, v)."""
        c = self.mid_surface
        return c[0] + c[1] * u + c[2] * v + c[3] * u * u + c[4] * u * v + c[5] * v * v

    def w_samples(self, step: float, pad: float = 0.0) -> np.ndarray:
        """Levels along n, `step` apart, covering the disc (and `pad` mm beyond it)."""
        pad = pad + float(self.spacing.max())
        return np.arange(self.bounds[0, 2] - pad, self.bounds[1, 2] + pad + step, step)


def _check_disc_mask(mask: np.ndarray) -> None:
    if not isinstance(mask, np.ndarray) or mask.dtype != bool:
        kind = mask.dtype if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"disc mask must be a boolean numpy array, got {kind}")
    if mask.ndim != 3:
        raise ValueError(f"disc mask must be 3D, got shape {mask.shape}")
    if not mask.any():
        raise ValueError("disc mask is empty")
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        if present[0] == present[-1]:
            raise ValueError(
                f"disc mask spans a single voxel along axis {axis} ({mask.sum()} voxels): "
                "too small to measure as a 3D disc"
            )
        if present[0] == 0 or present[-1] == mask.shape[axis] - 1:
            raise ValueError(
                f"disc mask touches the volume border along axis {axis}: the disc may be cut off"
            )


def _columns(mask, frame, u, v, dw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For lines along n through the points (u, v): top and bottom surface w (each half a step
    beyond the outermost inside sample) and the length inside; NaN surfaces where none."""
    w = frame.w_samples(dw)
    inside = frame.lookup(mask, u[..., None], v[..., None], w).astype(bool)
    crossing = inside.any(axis=-1)
    top = w[len(w) - 1 - np.argmax(inside[..., ::-1], axis=-1)] + dw / 2
    bottom = w[np.argmax(inside, axis=-1)] - dw / 2
    length = inside.sum(axis=-1) * dw
    return np.where(crossing, top, np.nan), np.where(crossing, bottom, np.nan), length


def disc_frame(mask: np.ndarray, spacing: Sequence[float]) -> DiscFrame:
    """The disc frame of a boolean mask, with its mid-surface (see the module docstring)."""
    spacing = volumes.check_spacing(spacing)
    points = np.argwhere(mask) * spacing
    centre = points.mean(axis=0)
    offsets = points - centre
    covariance = offsets.T @ offsets / len(points) + np.diag(spacing**2 / 12.0)
    _, vectors = np.linalg.eigh(covariance)
    normal = vectors[:, 0] if vectors[2, 0] >= 0 else -vectors[:, 0]
    anterior = np.array([0.0, 1.0, 0.0]) - normal[1] * normal
    if np.linalg.norm(anterior) < 1e-6:
        raise ValueError("disc mask's thinnest axis points Anterior: no AP direction in its plane")
    anterior /= np.linalg.norm(anterior)
    lateral = np.cross(anterior, normal)
    coordinates = offsets @ np.stack([lateral, anterior, normal], axis=1)
    bounds = np.stack([coordinates.min(axis=0), coordinates.max(axis=0)])
    flat = DiscFrame(centre, lateral, anterior, normal, spacing, bounds, np.zeros(6), 0.0)

    step = max(1.0, float(spacing.min()))
    u, v = np.meshgrid(np.arange(bounds[0, 0], bounds[1, 0] + step, step),
                       np.arange(bounds[0, 1], bounds[1, 1] + step, step), indexing="ij")
    top, bottom, length = _columns(mask, flat, u.ravel(), v.ravel(), float(spacing.min()) / 4)
    crossing = np.isfinite(top)
    if crossing.sum() < 6:
        raise ValueError(f"disc mask too small to measure ({mask.sum()} voxels)")
    u, v = u.ravel()[crossing], v.ravel()[crossing]
    design = np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=1)
    mid_surface = np.linalg.lstsq(design, (top + bottom)[crossing] / 2, rcond=None)[0]
    rim = float(np.percentile(length[crossing], 20))
    return DiscFrame(centre, lateral, anterior, normal, spacing, bounds, mid_surface, rim)


@dataclass(frozen=True)
class _Sections:
    """Sections of the disc by its mid-surface and by parallel surfaces `levels` mm from it,
    on square (u, v) grids, each level's grid shifted by a further 1/len(levels) of a step so
    that the grid's own quantisation averages out.

    A thin disc on thick tilted slices is a staircase that a smooth surface can slip through
    between steps, leaving gaps narrower than a voxel in the section. They are closed along
    the direction being measured only: closing a line along itself fills its gaps without
    moving its ends, while closing across it would carry the farthest-reaching slice of the
    staircase over to its neighbours.
    """

    u: np.ndarray
    v: np.ndarray
    shifts: np.ndarray  # per level, added to u and v
    images: np.ndarray  # (level, u, v) uint8
    gap: int  # closing length, grid steps

    @classmethod
    def cut(cls, mask, frame: DiscFrame, step: float, levels=(0.0,)) -> _Sections:
        pad = 2 * float(frame.spacing.max())
        u = np.arange(frame.bounds[0, 0] - pad, frame.bounds[1, 0] + pad + step, step)
        v = np.arange(frame.bounds[0, 1] - pad, frame.bounds[1, 1] + pad + step, step)
        shifts = np.arange(len(levels)) / len(levels) * step
        images = []
        for level, shift in zip(levels, shifts, strict=True):
            uu, vv = u[:, None] + shift, v[None, :] + shift
            images.append(frame.lookup(mask, uu, vv, frame.mid(uu, vv) + level))
        gap = 2 * int(np.ceil(0.5 * frame.spacing.max() / step)) + 1
        return cls(u, v, shifts, np.stack(images).astype(np.uint8), gap)

    def closed(self, *axes: int) -> np.ndarray:
        """The sections as booleans, gaps closed along the given axes (1: u, 2: v)."""
        return _close_gaps(self.images, self.gap, axes)

    def area(self) -> float:
        """Footprint area: mean over the levels, gaps closed both ways."""
        step = self.u[1] - self.u[0]
        return float(self.closed(1, 2).sum(axis=(1, 2)).mean() * step**2)

    def chord(self, axis: str, half_band: float) -> tuple[float, float]:
        """Ends of the chord through the centre (u = 0 or v = 0) along `axis` ('u' or 'v').

        One line's ends are only known to half a voxel, and on thick slices a line reads voxels
        whose centres lie up to half a slice beside it. So the ends (half a grid step beyond the
        longest inside run) are read on every grid line within `half_band` across the chord and
        on every level, where the voxel grid cuts the rim at other phases, and a quadratic in
        the offset across, which follows the rim's curvature, is fitted to each end.
        """
        along, across = (self.u, self.v) if axis == "u" else (self.v, self.u)
        step = along[1] - along[0]
        lines = np.flatnonzero(np.abs(across) <= max(half_band, step))
        if axis == "v":
            images = self.closed(2)[:, lines, :]
        else:
            images = self.closed(1)[:, :, lines].transpose(0, 2, 1)
        has, first, last = _longest_runs(images.reshape(-1, len(along)))
        shift = np.repeat(self.shifts, len(lines))[has]
        offsets = np.tile(across[lines], len(self.images))[has] + shift
        ends = np.stack([along[first[has]] - step / 2, along[last[has]] + step / 2], axis=1)
        ends += shift[:, None]
        if len(np.unique(offsets)) < 3:
            raise ValueError("the disc's mid-surface misses its own centre: not a disc-shaped mask")
        design = np.stack([np.ones_like(offsets), offsets, offsets**2], axis=1)
        fitted = np.linalg.lstsq(design, ends, rcond=None)[0][0]
        return float(fitted[0]), float(fitted[1])


def _close_gaps(images: np.ndarray, length: int, axes: Sequence[int]) -> np.ndarray:
    """Binary closing along each of `axes` in turn by a line `length` pixels long."""
    images = images.astype(np.uint8)
    for axis in axes:
        images = ndimage.maximum_filter1d(images, length, axis=axis, mode="constant")
        images = ndimage.minimum_filter1d(images, length, axis=axis, mode="constant")
    return images.astype(bool)


def _longest_runs(inside: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of a 2D boolean array: whether it has a True, and the first and last index
    of its longest run of True."""
    edges = np.diff(np.pad(inside.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    row, start = np.nonzero(edges == 1)
    stop = np.nonzero(edges == -1)[1]
    order = np.lexsort((start - stop, row))  # per row, the longest run first
    rows, first = np.unique(row[order], return_index=True)
    has = np.zeros(len(inside), dtype=bool)
    has[rows] = True
    starts = np.zeros(len(inside), dtype=np.intp)
    lasts = np.full(len(inside), -1, dtype=np.intp)
    starts[rows] = start[order][first]
    lasts[rows] = stop[order][first] - 1
    return has, starts, lasts


def _wedge_deg(mask, frame, lateral_ends, ap_ends, dw) -> float:
    """Planes w = c0 + c1 u + c2 v fitted to the top and bottom surfaces over the central half
    of the footprint (the rim is rounded, not planar); degrees(atan(c2_top) - atan(c2_bottom))."""
    half_u = 0.5 * min(-lateral_ends[0], lateral_ends[1])
    ap = ap_ends[1] - ap_ends[0]
    step = max(0.5, float(frame.spacing.min()))
    u, v = np.meshgrid(np.arange(-half_u, half_u + 1e-9, step),
                       np.arange(ap_ends[0] + 0.25 * ap, ap_ends[1] - 0.25 * ap + 1e-9, step),
                       indexing="ij")
    top, bottom, _ = _columns(mask, frame, u.ravel(), v.ravel(), dw)
    crossing = np.isfinite(top)
    if crossing.sum() < 3:
        raise ValueError("too few lines cross the disc to fit its surfaces")
    u, v = u.ravel()[crossing], v.ravel()[crossing]
    design = np.stack([np.ones_like(u), u, v], axis=1)
    top_slope = np.linalg.lstsq(design, top[crossing], rcond=None)[0][2]
    bottom_slope = np.linalg.lstsq(design, bottom[crossing], rcond=None)[0][2]
    return float(np.degrees(np.arctan(top_slope) - np.arctan(bottom_slope)))


def measure_disc(mask: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Geometry of one disc: a dict with exactly the columns of `tables.GEOMETRY`.

    Args:
        mask: boolean (X, Y, Z) array in RAS holding one disc, not touching the array border.
        spacing: voxel size in mm along R, A, S.

    Definitions, in the frame (c, l, a, n) and on the mid-surface of the module docstring:
    - volume_mm3: voxel count times voxel volume.
    - ap_width_mm: length, along a, of the disc's mid-surface chord through c (mid-sagittal);
      lateral_width_mm: the same along l (mid-transverse).
    - height_mean_mm: mean thickness along n over the footprint = volume / footprint area, the
      footprint being the mid-surface section projected on the disc plane (for a rim that runs
      along n, the same as the disc's shadow; the shadow of the voxels themselves would be
      widened by their staircase).
    - height_posterior_mm / height_middle_mm / height_anterior_mm: thickness along n at 15% /
      50% / 85% of the AP chord from its posterior end, averaged over a patch 5% of the chord
      long and near the mid-sagittal plane (|u| <= a quarter of the lateral half-width, and at
      least 1.5 voxels) so the voxel grid's phase averages out.
    - sagittal_angle_deg = degrees(atan2(a.S, a.A)): positive when the anterior end is higher.
    - coronal_angle_deg = degrees(atan2(l.S, l.R)): positive when the right side is higher.
    - transverse_angle_deg = degrees(atan2(a.R, a.A)).
    - wedge_angle_deg: angle between the upper and lower surfaces in the disc's sagittal plane:
      planes w = c0 + c1 u + c2 v fitted to the top and bottom surface points over the central
      half of the footprint, wedge = degrees(atan(c2_top) - atan(c2_bottom)); positive when the
      disc opens anteriorly (anterior taller, as at L5/S1).

    Raises ValueError for a non-boolean, empty, single-voxel-thick or border-touching mask.
    """
    _check_disc_mask(mask)
    frame = disc_frame(mask, spacing)
    fine = float(frame.spacing.min())
    grid_step, dw = fine / 2, fine / 4
    near_midline = max(0.25 * min(-frame.bounds[0, 0], frame.bounds[1, 0]),
                       1.5 * float(frame.spacing.max()))
    # Levels off the mid-surface add grid phases; a quarter of the rim's half-thickness keeps
    # them inside a thin, wedged rim.
    spread = frame.rim_thickness_mm / 8
    sections = _Sections.cut(mask, frame, grid_step, np.linspace(-spread, spread, 5))
    ap_ends = sections.chord("v", near_midline)
    ap_width = ap_ends[1] - ap_ends[0]
    lateral_ends = sections.chord("u", 0.1 * ap_width)
    volume = float(mask.sum() * np.prod(frame.spacing))

    u = np.arange(-near_midline, near_midline + 1e-9, grid_step)
    half_v = 0.025 * ap_width
    heights = {}
    for column, fraction in HEIGHT_FRACTIONS.items():
        centre_v = ap_ends[0] + fraction * ap_width
        v = np.arange(centre_v - half_v, centre_v + half_v + 1e-9, grid_step / 2)
        uu, vv = np.meshgrid(u, v, indexing="ij")
        heights[column] = float(_columns(mask, frame, uu, vv, dw)[2].mean())

    a, lat = frame.anterior, frame.lateral
    result = {
        "height_mean_mm": volume / sections.area(),
        "ap_width_mm": ap_width,
        "lateral_width_mm": lateral_ends[1] - lateral_ends[0],
        "sagittal_angle_deg": np.degrees(np.arctan2(a[2], a[1])),
        "coronal_angle_deg": np.degrees(np.arctan2(lat[2], lat[0])),
        "transverse_angle_deg": np.degrees(np.arctan2(a[0], a[1])),
        **heights,
        "volume_mm3": volume,
        "wedge_angle_deg": _wedge_deg(mask, frame, lateral_ends, ap_ends, dw),
    }
    return {column: float(result[column]) for column in tables.GEOMETRY}


def measure_bulge(label_map: np.ndarray, spacing: Sequence[float], ivd_label: int) -> dict[str, float]:
    """How far a disc reaches beyond the endplates of its vertebrae: tables.BULGE columns.

    The disc's mid-surface section (frame of `measure_disc`) is compared with the endplate
    footprint: bone of the bounding vertebrae (`labels.vertebrae_of_disc`; whichever are
    labelled: the sacrum below 201 is not) lying within ENDPLATE_DEPTH_MM of the disc,
    projected along n onto the disc plane. Only the parts of that footprint over the disc
    count, so facets and other posterior elements, across the canal, do not widen it. Along
    BULGE_RAYS rays from the disc centre, the radial excess is r_disc - r_endplate (outermost
    boundaries on the ray), as a running median over BULGE_SMOOTHING_DEG of rays; a ray bulges
    when its excess exceeds the rasterisation noise, max(1 mm, half the largest voxel). When
    both vertebrae are labelled, a ray bulges only beyond both endplates.
    - bulge_fraction: fraction of rays (of the mid-surface circumference, by angle) that bulge.
      The radiological "bulging disc" is more than 0.25 (Fardon et al. 2014).
    - bulge_max_mm: the largest excess among bulging rays, 0 if none.
    Both are NaN when no bounding vertebra is labelled near the disc.
    """
    if not isinstance(label_map, np.ndarray) or label_map.ndim != 3 or not np.issubdtype(
            label_map.dtype, np.integer):
        raise ValueError("label_map must be a 3D integer numpy array of SPIDER labels")
    spacing = volumes.check_spacing(spacing)
    if not labels.is_disc(ivd_label):
        raise ValueError(f"{ivd_label} is not a disc label")
    box = ndimage.find_objects((label_map == ivd_label).astype(np.int8))
    if not box or box[0] is None:
        raise ValueError(f"disc label {ivd_label} is not in the label map")
    if any(s.start == 0 or s.stop == n for s, n in zip(box[0], label_map.shape, strict=True)):
        raise ValueError(f"disc {ivd_label} touches the volume border: the disc may be cut off")
    margin = np.ceil(ENDPLATE_DEPTH_MM / spacing).astype(int) + 1
    crop = tuple(slice(max(s.start - m, 0), min(s.stop + m, n))
                 for s, m, n in zip(box[0], margin, label_map.shape, strict=True))
    local = label_map[crop]
    disc = local == ivd_label
    _check_disc_mask(disc)

    near_disc = ndimage.distance_transform_edt(~disc, sampling=spacing) <= ENDPLATE_DEPTH_MM
    bounding = [v for v in labels.vertebrae_of_disc(ivd_label) if v > 0]
    endplate = np.isin(local, bounding) & near_disc
    if not endplate.any():
        return {"bulge_fraction": float("nan"), "bulge_max_mm": float("nan")}

    frame = disc_frame(disc, spacing)
    step = max(float(spacing.min()) / 2, 0.25)
    section = _Sections.cut(disc, frame, step)
    u, v = section.u, section.v
    footprint = np.zeros(section.images[0].shape, dtype=np.uint8)
    for w in frame.w_samples(step, pad=ENDPLATE_DEPTH_MM):  # a plane at a time: 2D memory
        footprint |= frame.lookup(endplate, u[:, None], v[None, :], w).astype(np.uint8)
    footprint = _close_gaps(footprint, section.gap, (0, 1))
    disc_section = section.closed(1, 2)[0]
    # Only bone that lies over the disc counts: the endplates, not a stray process nearby.
    parts, _ = ndimage.label(footprint)
    touching = np.unique(parts[footprint & disc_section])
    footprint = ndimage.binary_fill_holes(np.isin(parts, touching[touching > 0]))

    angles = np.linspace(0, 2 * np.pi, BULGE_RAYS, endpoint=False)
    radii = np.arange(0, max(abs(u[0]), abs(u[-1]), abs(v[0]), abs(v[-1])), step / 2)
    iu = np.clip(np.floor((np.cos(angles)[:, None] * radii - u[0]) / step + 0.5).astype(int),
                 0, len(u) - 1)
    iv = np.clip(np.floor((np.sin(angles)[:, None] * radii - v[0]) / step + 0.5).astype(int),
                 0, len(v) - 1)

    def outermost(image):
        hit = image[iu, iv]
        last = len(radii) - 1 - np.argmax(hit[:, ::-1], axis=1)
        return np.where(hit.any(axis=1), radii[last] + step / 2, 0.0)

    # Each boundary is only known to about a voxel along a single ray: a running median over
    # BULGE_SMOOTHING_DEG of rays keeps a noisy ray from posing as the largest bulge.
    window = int(round(BULGE_SMOOTHING_DEG / 360 * BULGE_RAYS)) | 1
    excess = ndimage.median_filter(outermost(disc_section) - outermost(footprint), size=window,
                                   mode="wrap")
    bulging = excess > max(1.0, 0.5 * float(spacing.max()))
    return {
        "bulge_fraction": float(bulging.mean()),
        "bulge_max_mm": float(excess[bulging].max()) if bulging.any() else 0.0,
    }

"""Analytic disc phantoms with known geometry, rasterised by voxel-centre inclusion.

A phantom is a superelliptic slab in its own frame (x lateral, y AP, z normal):
|2x/W|^p + |2y/D|^p <= 1 and |z| <= h(y)/2, with the thickness h linear in y and symmetric about
the mid-plane (so PCA's normal is the slab's). Its heights are given where measure_disc reads
them: at 15% and 85% of the AP chord. A voxel is inside when its centre is: that is what a
careful segmentation of a smooth shape does at 50% partial volume.

The frame is tilted by a sagittal angle (anterior end up) and a coronal angle (right side up),
keeping the lateral axis free of any anterior component, so the phantom's AP axis is RAS Anterior
projected onto its plane, as measure_disc defines it.
"""

from __future__ import annotations

import math

import numpy as np


def tilted_frame(sagittal_deg: float, coronal_deg: float) -> np.ndarray:
    """Columns l, a, n (RAS unit vectors) with the given sagittal and coronal angles."""
    alpha, beta = math.radians(sagittal_deg), math.radians(coronal_deg)
    lateral = np.array([math.cos(beta), 0.0, math.sin(beta)])
    anterior = np.array([-math.sin(alpha) * math.tan(beta), math.cos(alpha), math.sin(alpha)])
    anterior /= np.linalg.norm(anterior)
    return np.stack([lateral, anterior, np.cross(lateral, anterior)], axis=1)


def superellipse_area(width: float, depth: float, exponent: float) -> float:
    return width * depth * math.gamma(1 + 1 / exponent) ** 2 / math.gamma(1 + 2 / exponent)


def wedge_disc(
    spacing=(3.3, 0.6, 0.6),
    lateral_mm: float = 45.0,
    ap_mm: float = 30.0,
    height_anterior_mm: float = 11.0,
    height_posterior_mm: float = 8.0,
    sagittal_deg: float = 0.0,
    coronal_deg: float = 0.0,
    exponent: float = 2.0,
    spin_deg: float = 0.0,
    phase=(0.0, 0.0, 0.0),
) -> tuple[np.ndarray, dict[str, float]]:
    """(boolean RAS mask, true geometry with tables.GEOMETRY keys).

    `spin_deg` rotates the slab about its own normal before tilting (only meaningful, and only
    allowed, for a round untapered disc, whose geometry it leaves unchanged). `phase` shifts the
    centre by that fraction of a voxel, to vary how the grid cuts the shape.
    """
    if spin_deg and (lateral_mm != ap_mm or height_anterior_mm != height_posterior_mm):
        raise ValueError("spin only for a round, untapered disc")
    spacing = np.asarray(spacing, dtype=float)
    frame = tilted_frame(sagittal_deg, coronal_deg)
    spin = math.radians(spin_deg)
    in_plane = np.array([[math.cos(spin), -math.sin(spin), 0.0],
                         [math.sin(spin), math.cos(spin), 0.0], [0.0, 0.0, 1.0]])
    body = frame @ in_plane
    slope = (height_anterior_mm - height_posterior_mm) / (0.7 * ap_mm)
    middle = (height_anterior_mm + height_posterior_mm) / 2
    max_height = middle + abs(slope) * ap_mm / 2
    radius = math.hypot(lateral_mm / 2, ap_mm / 2, max_height / 2) + 2 * spacing.max()
    shape = np.ceil(2 * radius / spacing).astype(int) + 1
    centre = (shape - 1) / 2 * spacing + np.asarray(phase) * spacing
    axes = [np.arange(n) * s - c for n, s, c in zip(shape, spacing, centre, strict=True)]
    r, a, s = np.meshgrid(*axes, indexing="ij", sparse=True)
    x = body[0, 0] * r + body[1, 0] * a + body[2, 0] * s
    y = body[0, 1] * r + body[1, 1] * a + body[2, 1] * s
    z = body[0, 2] * r + body[1, 2] * a + body[2, 2] * s
    footprint = np.abs(2 * x / lateral_mm) ** exponent + np.abs(2 * y / ap_mm) ** exponent <= 1
    mask = footprint & (np.abs(z) <= (middle + slope * y) / 2)

    # The centroid sits anterior of the slab's centre when the anterior end is taller: the
    # lateral chord through it is a touch shorter than W.
    ys = np.linspace(-ap_mm / 2, ap_mm / 2, 20001)
    half_x = lateral_mm / 2 * np.clip(1 - np.abs(2 * ys / ap_mm) ** exponent, 0, None) ** (1 / exponent)
    weight = (middle + slope * ys) * half_x
    y_centroid = float((ys * weight).sum() / weight.sum())
    lateral_chord = lateral_mm * (1 - abs(2 * y_centroid / ap_mm) ** exponent) ** (1 / exponent)
    l_axis, a_axis = frame[:, 0], frame[:, 1]
    truth = {
        "height_mean_mm": middle,
        "ap_width_mm": ap_mm,
        "lateral_width_mm": lateral_chord,
        "sagittal_angle_deg": math.degrees(math.atan2(a_axis[2], a_axis[1])),
        "coronal_angle_deg": math.degrees(math.atan2(l_axis[2], l_axis[0])),
        "transverse_angle_deg": math.degrees(math.atan2(a_axis[0], a_axis[1])),
        "height_anterior_mm": height_anterior_mm,
        "height_middle_mm": middle,
        "height_posterior_mm": height_posterior_mm,
        "volume_mm3": middle * superellipse_area(lateral_mm, ap_mm, exponent),
        "wedge_angle_deg": math.degrees(2 * math.atan(slope / 2)),
    }
    return mask, truth


def spine_segment(
    ivd_label: int = 203,
    spacing=(3.3, 0.6, 0.6),
    disc_radii_mm=(22.0, 15.0),
    vertebra_radii_mm=(22.0, 15.0),
    disc_shift_mm: float = 0.0,
    disc_height_mm: float = 8.0,
    sagittal_deg: float = 0.0,
    vertebrae=(True, True),
    facets: bool = False,
) -> np.ndarray:
    """An int16 SPIDER label map: an elliptic-cylinder disc between the elliptic-cylinder
    bodies of its vertebrae (lower, upper: `labels.vertebrae_of_disc`), all tilted by a sagittal
    angle. `disc_shift_mm` moves the disc along its AP axis (negative: posteriorly). `facets`
    adds posterior elements of the upper vertebra at the disc's level, behind a canal."""
    from pipeline.data.labels import vertebrae_of_disc

    spacing = np.asarray(spacing, dtype=float)
    frame = tilted_frame(sagittal_deg, 0.0)
    body_height = 25.0
    radius = math.hypot(max(disc_radii_mm[0], vertebra_radii_mm[0]) + 2,
                        max(disc_radii_mm[1], vertebra_radii_mm[1]) + 20,
                        disc_height_mm / 2 + body_height) + 2 * spacing.max()
    shape = np.ceil(2 * radius / spacing).astype(int) + 1
    centre = (shape - 1) / 2 * spacing + 0.3 * spacing
    axes = [np.arange(n) * s - c for n, s, c in zip(shape, spacing, centre, strict=True)]
    r, a, s = np.meshgrid(*axes, indexing="ij", sparse=True)
    x = frame[0, 0] * r + frame[1, 0] * a + frame[2, 0] * s
    y = frame[0, 1] * r + frame[1, 1] * a + frame[2, 1] * s
    z = frame[0, 2] * r + frame[1, 2] * a + frame[2, 2] * s

    def ellipse(radii, shift=0.0):
        return (x / radii[0]) ** 2 + ((y - shift) / radii[1]) ** 2 <= 1

    label_map = np.zeros(shape, dtype=np.int16)
    half = disc_height_mm / 2
    lower, upper = vertebrae_of_disc(ivd_label)
    if vertebrae[0] and lower > 0:
        label_map[ellipse(vertebra_radii_mm) & (z < -half) & (z >= -half - body_height)] = lower
    if vertebrae[1]:
        label_map[ellipse(vertebra_radii_mm) & (z > half) & (z <= half + body_height)] = upper
        if facets:
            behind = vertebra_radii_mm[1] + 12  # the canal lies between body and facets
            label_map[(np.abs(x) <= 12) & (y <= -behind) & (y >= -behind - 8)
                      & (np.abs(z) <= half + 4)] = upper
    label_map[ellipse(disc_radii_mm, disc_shift_mm) & (np.abs(z) <= half)] = ivd_label
    return label_map

"""A synthetic SPIDER-layout cohort whose true disc geometry and pathology are known.

The demo runs on this instead of SPIDER, and the geometry stage is checked against it: every disc
is drawn from a closed-form model, so its heights, widths, angles, volume and bulge are exact
numbers (`synthetic_truth.csv`), not measurements.

Anatomy (RAS mm). The spine is a chain built upward from the sacral endplate: each disc is a
superelliptic footprint (AP depth, lateral width) whose thickness varies linearly from posterior
to anterior (a wedge), tilted by the lordosis accumulated below it; each vertebral body fills the
slab between the surfaces of the discs around it, its cross-section blending their endplate
footprints. Endplate footprints are a margin larger than a normal disc, so a normal disc stays
inside them. A bulging disc spills past them by 2-5 mm over more than 25% of its outline (Fardon
et al. 2014); a herniation is a focal posterior protrusion over less than 25%. Narrowing is
height more than 25% below the level's norm. Level norms follow Hung et al. 2021 (see
REFERENCE.md); degeneration grows with age and toward L5/S1 and drives Pfirrmann grade, height
loss and bulging together, so bulging goes with lower and deeper discs as in Hung et al.

Files match SPIDER's layout: `images/` and `masks/<patient>_<seq>.mha` (int16, identity ITK
direction), `overview.csv`, `radiological_gradings.csv` (the true findings with each binary one
misread with probability `label_noise`, prevalence-preserving for bulging, narrowing and
herniation, whose per-level rates follow real SPIDER; Pfirrmann moved one grade with that
probability and Modic kept, as real gradings are noisy). The labels are defined from disc
geometry, so a geometric classifier is expected to do well here: a synthetic run proves the
machinery, not the clinical claim. Vertebrae 1-6 are L5..T12, discs 201-206 L5/S1..T12/L1, 100 the canal;
the sacrum is drawn in the image but not labelled, as in SPIDER. Images are T1/T2 contrasts of the
same tissues with partial volume across the thick sagittal slices, a smooth bias field and Rician
noise. The same seed writes byte-identical files, whether a cohort is written in one process or
by one Ray task per patient.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
from scipy import ndimage

from pipeline import tasks
from pipeline.data import labels, storage, tables
from pipeline.data.volumes import make_header, write_volume

SEQUENCES = ("t1", "t2")
LEVELS = 6  # discs 201 (L5/S1) .. 206 (T12/L1); vertebrae 1 (L5) .. 6 (T12)
BULGE_THRESHOLD = 0.25  # fraction of the outline past the endplates that makes a bulge
NARROWING_LOSS = 0.25  # height loss against the level norm that makes a narrowing

# Per disc level, L5/S1 first. Heights are healthy means (degeneration lowers them toward Hung's).
_HEIGHT_MM = np.array([10.7, 11.0, 9.2, 8.6, 8.0, 7.2])
_DEPTH_MM = np.array([28.0, 29.6, 30.0, 29.8, 29.2, 28.4])
_WIDTH_MM = np.array([50.0, 48.5, 46.5, 44.5, 42.5, 40.5])
_WEDGE_DEG = np.array([14.0, 11.0, 8.0, 6.0, 4.0, 2.0])
_WEDGE_SD_DEG = np.array([3.0, 2.5, 2.0, 2.0, 1.5, 1.5])
_WEDGE_MIN_DEG = np.array([6.0, 2.0, 0.0, -1.0, -2.0, -3.0])
# Graded prevalence by level (L5/S1 .. T12/L1) in real SPIDER: pathology concentrates at the
# lower levels, so level alone predicts much of it. The per-level degeneration (which drives
# height loss, hence narrowing) and the bulging and herniation intercepts below were tuned so the
# anatomy-defined truth comes out at these rates (tests/test_synthetic.py: within 0.08 per level
# on 200 patients).
SPIDER_PREVALENCE = {
    "bulging": np.array([0.69, 0.75, 0.69, 0.60, 0.38, 0.17]),
    "narrowing": np.array([0.58, 0.59, 0.45, 0.36, 0.23, 0.13]),
    "herniation": np.array([0.13, 0.13, 0.03, 0.02, 0.01, 0.0]),
}
_DEGENERATION = np.array([1.08, 1.11, 0.62, 0.59, 0.08, -0.30])
_BULGING_LOGIT = np.array([0.30, 0.35, 0.37, -0.13, -0.49, -1.87])
_HERNIATION_LOGIT = np.array([-2.81, -3.38, -4.03, -4.73, -4.89, -4.53])
# Per vertebral body, L5 first: centre height and wedge (positive: anterior taller).
_BODY_HEIGHT_MM = np.array([27.5, 27.5, 27.0, 26.5, 25.5, 24.0])
_BODY_WEDGE_DEG = np.array([3.0, 1.0, 0.0, -1.0, -2.5, -3.0])
_PFIRRMANN_EDGES = np.array([-1.5, -0.3, 0.7, 1.5])

_SPLIT_STREAM, _ANATOMY_STREAM, _GRADING_STREAM = 7, 0, 9
_IMAGE_STREAM = {"t1": 1, "t2": 2}
_TEXTURE_STREAM = 5
_SUBSLICES = np.array([-1.0, 0.0, 1.0]) / 3.0  # partial-volume samples across a slice thickness
_OUTLINE_SAMPLES = 2048
_FLOAT = "%.5f"
TRUTH_FILE = "synthetic_truth.csv"
# Ray tasks pay off from this many patients. Measured on 2 cores (t1 and t2, Ray already up,
# its workers cold as in a job's first stage): in this process 0.9 s a patient; as tasks about
# 3.5 s of worker start-up, then 0.45 s a patient. 2 patients: 2.0 s vs 4.2 s; 4: 3.6 vs 5.4;
# 8: 7.4 vs 6.8; 16: 14.0 vs 11.0.
RAY_FROM_PATIENTS = 8

TRUTH_PATHOLOGY = ["bulging", "narrowing", "herniation", "pfirrmann", "modic", "up_endplate",
                   "low_endplate", "spondylolisthesis"]
TRUTH_COLUMNS = (["patient_id", "ivd_label", "level"] + tables.GEOMETRY + tables.BULGE
                 + ["height_norm_mm"] + TRUTH_PATHOLOGY
                 + [f"graded_{name}" for name in TRUTH_PATHOLOGY])
GRADINGS_COLUMNS = ["Patient", "IVD label", "Modic", "UP endplate", "LOW endplate",
                    "Spondylolisthesis", "Disc herniation", "Disc narrowing", "Disc bulging",
                    "Pfirrman grade"]
_GRADED = {"Modic": "modic", "UP endplate": "up_endplate", "LOW endplate": "low_endplate",
           "Spondylolisthesis": "spondylolisthesis", "Disc herniation": "herniation",
           "Disc narrowing": "narrowing", "Disc bulging": "bulging", "Pfirrman grade": "pfirrmann"}
# SPIDER's overview.csv columns: ours, then the DICOM attributes it lists per series.
OVERVIEW_COLUMNS = [
    "new_file_name", "subset", "num_vertebrae", "num_discs", "sex", "age", "Manufacturer",
    "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions", "EchoNumbers", "EchoTime",
    "EchoTrainLength", "FlipAngle", "ImagedNucleus", "ImagingFrequency",
    "InPlanePhaseEncodingDirection", "MRAcquisitionType", "MagneticFieldStrength",
    "NumberOfPhaseEncodingSteps", "PercentPhaseFieldOfView", "PercentSampling",
    "PhotometricInterpretation", "PixelBandwidth", "PixelSpacing", "RepetitionTime", "SAR",
    "SamplesPerPixel", "ScanningSequence", "SequenceName", "SeriesDescription", "SliceThickness",
    "SpacingBetweenSlices", "SpecificCharacterSet", "TransmitCoilName", "WindowCenter",
    "WindowWidth",
]
_SCANNERS = [  # (manufacturer, model, field strength T, software)
    ("SIEMENS", "Avanto", 1.5, "syngo MR B17"),
    ("SIEMENS", "Skyra", 3.0, "syngo MR E11"),
    ("Philips Medical Systems", "Ingenia", 1.5, "5.3.1"),
    ("Philips Healthcare", "Achieva dStream", 3.0, "5.4.0"),
]

# Tissue classes of the image model; labels come from the geometry, intensities from these.
AIR, FAT, MUSCLE, ABDOMEN, CSF, CORD, MARROW, CORTEX, ANNULUS = range(9)
MODIC = {1: 9, 2: 10, 3: 11}
NUCLEUS = {grade: 11 + grade for grade in range(1, 6)}
_INTENSITY = {  # per class: T1, T2 (arbitrary units, roughly a 1.5 T scanner's range)
    "t1": [0, 950, 420, 520, 180, 420, 680, 120, 330, 380, 900, 150, 380, 370, 350, 320, 290],
    "t2": [0, 650, 260, 480, 1150, 480, 420, 90, 230, 800, 620, 130, 1000, 800, 560, 360, 240],
}
_TEXTURE = np.array([0.0, 0.05, 0.06, 0.25, 0.03, 0.03, 0.08, 0.03, 0.04, 0.05, 0.05, 0.05,
                     0.04, 0.04, 0.04, 0.04, 0.04], dtype=np.float32)


# --------------------------------------------------------------------------------- anatomy ----

@dataclass(frozen=True)
class Bump:
    """A smooth outward swelling of a disc outline, `excess_mm` past the endplate on its plateau."""

    centre_rad: float  # direction in the disc plane, 0 = anterior, pi/2 = right
    plateau_rad: float  # half-width of the full-height part
    taper_rad: float  # raised-cosine shoulder on each side
    excess_mm: float

    def weight(self, phi: np.ndarray) -> np.ndarray:
        delta = np.abs((phi - self.centre_rad + np.pi) % (2 * np.pi) - np.pi) - self.plateau_rad
        shoulder = np.cos(0.5 * np.pi * np.clip(delta, 0.0, self.taper_rad) / self.taper_rad) ** 2
        return np.where(delta <= 0.0, 1.0, np.where(delta < self.taper_rad, shoulder, 0.0))


def _superellipse_radius(phi: np.ndarray, semi_ap: float, semi_lat: float, exponent: float):
    c = np.abs(np.cos(phi)) / semi_ap
    s = np.abs(np.sin(phi)) / semi_lat
    return (c**exponent + s**exponent) ** (-1.0 / exponent)


@dataclass(frozen=True)
class DiscShape:
    """One disc in RAS mm.

    Local coordinates about `centre`: u along the AP axis a (anterior), v along the lateral axis l
    (right), w along the normal n (superior); `frame` holds a, l, n as columns. The footprint is a
    superellipse plus bumps; the thickness is `height_mm + slope * u`, symmetric about w = 0.
    """

    ivd_label: int
    centre: np.ndarray
    frame: np.ndarray
    height_mm: float
    slope: float
    semi_ap_mm: float
    semi_lat_mm: float
    exponent: float
    margin_mm: float  # endplate footprint semi-axes exceed the normal disc's by this
    bumps: tuple[Bump, ...]

    def normal_radius(self, phi):
        return _superellipse_radius(phi, self.semi_ap_mm, self.semi_lat_mm, self.exponent)

    def endplate_radius(self, phi):
        return _superellipse_radius(phi, self.semi_ap_mm + self.margin_mm,
                                    self.semi_lat_mm + self.margin_mm, self.exponent)

    def radius(self, phi):
        base = self.normal_radius(phi)
        if not self.bumps:
            return base
        reach = self.endplate_radius(phi) - base
        swell = np.max([b.weight(phi) * (reach + b.excess_mm) for b in self.bumps], axis=0)
        return base + swell

    def thickness(self, u):
        return self.height_mm + self.slope * u


@dataclass(frozen=True)
class Plate:
    """One end of a vertebral body: the plane it stops at and the endplate footprint there.

    The footprint is tested in the projection frame (centre, ap, lat): for a plate against a disc
    that is the disc's mid-plane, so the footprint is exactly the disc's endplate outline.
    """

    point: np.ndarray
    normal: np.ndarray
    centre: np.ndarray
    ap: np.ndarray
    lat: np.ndarray
    semi_ap_mm: float
    semi_lat_mm: float
    exponent: float


@dataclass(frozen=True)
class Grid:
    """The sagittal voxel grid of a patient's series (RAS axis order; T1 and T2 share it)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: np.ndarray  # RAS mm of voxel (0, 0, 0)
    slice_thickness_mm: float

    def axis(self, i: int) -> np.ndarray:
        return self.origin[i] + self.spacing[i] * np.arange(self.shape[i])


@dataclass(frozen=True)
class Canal:
    """The spinal canal: an elliptic tube through control points behind the bodies and discs."""

    z: np.ndarray  # control points along the spine, increasing
    x: np.ndarray
    y: np.ndarray
    ap_stretch: np.ndarray  # 1 / cos(sagittal tilt): an oblique tube's axial cut is longer in AP
    width_mm: float
    depth_mm: float
    conus_z: float  # the cord ends here; below it the sac holds only CSF


@dataclass(frozen=True)
class SyntheticPatient:
    patient_id: str
    subset: str
    sex: str
    age: int
    discs: tuple[DiscShape, ...]  # 201 first
    bodies: tuple[tuple[Plate, Plate], ...]  # (lower, upper); sacrum first (unlabelled), then L5..
    canal: Canal
    grid: Grid
    skin_mm: float
    fat_mm: float
    height_norm_mm: np.ndarray
    pathology: tuple[dict, ...]  # true findings per disc
    graded: tuple[dict, ...]  # what the radiologist wrote
    geometry: tuple[dict, ...]  # disc_truth of each disc
    scanner: tuple


def _local_rotation(sagittal: float, coronal: float, transverse: float) -> np.ndarray:
    """Rotation in a frame's own (a, l, n) coordinates, angles in radians: sagittal raises the
    anterior end, coronal the right end, transverse turns the AP axis toward the right."""
    cs, ss = math.cos(sagittal), math.sin(sagittal)
    cc, sc = math.cos(coronal), math.sin(coronal)
    ct, st = math.cos(transverse), math.sin(transverse)
    rs = np.array([[cs, 0, -ss], [0, 1, 0], [ss, 0, cs]])
    rc = np.array([[1, 0, 0], [0, cc, -sc], [0, sc, cc]])
    rt = np.array([[ct, -st, 0], [st, ct, 0], [0, 0, 1]])
    return rt @ rc @ rs


def _sagittal_frame(angle: float) -> np.ndarray:
    a = np.array([0.0, math.cos(angle), math.sin(angle)])
    l_axis = np.array([1.0, 0.0, 0.0])
    return np.column_stack([a, l_axis, _cross(l_axis, a)])


def _cross(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.array([p[1] * q[2] - p[2] * q[1], p[2] * q[0] - p[0] * q[2],
                     p[0] * q[1] - p[1] * q[0]])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _disc_plates(disc: DiscShape) -> tuple[Plate, Plate]:
    """The plates of the bodies below and above a disc: its lower and upper surface planes."""
    a, l_axis, n = disc.frame.T
    half = disc.height_mm / 2
    semi = (disc.semi_ap_mm + disc.margin_mm, disc.semi_lat_mm + disc.margin_mm, disc.exponent)
    below = Plate(disc.centre - half * n, _unit(n + disc.slope / 2 * a), disc.centre, a, l_axis,
                  *semi)
    above = Plate(disc.centre + half * n, _unit(n - disc.slope / 2 * a), disc.centre, a, l_axis,
                  *semi)
    return below, above


def _virtual_plate(point, frame, semi_ap, semi_lat, exponent) -> Plate:
    return Plate(point, frame[:, 2].copy(), point, frame[:, 0].copy(), frame[:, 1].copy(),
                 semi_ap, semi_lat, exponent)


def _bump_for(target_fraction: float, excess: float, margin: float, centre: float, taper: float):
    """A bump whose outline past the endplate spans about `target_fraction` of the angles."""
    crossing = 2 * taper / np.pi * math.acos(math.sqrt(margin / (margin + excess)))
    plateau = max(target_fraction * np.pi - crossing, 0.01)
    return Bump(centre, plateau, taper, excess)


def _pathology_draws(rng, age: int, patient_effect: float):
    degeneration = 0.035 * (age - 50) + _DEGENERATION + patient_effect + rng.normal(0, 0.8, LEVELS)
    depth_z = rng.normal(0, 1, LEVELS)
    loss = np.clip(0.22 * (degeneration + 0.1) + rng.normal(0, 0.04, LEVELS), 0.0, 0.5)
    lower = (np.arange(LEVELS) < 2).astype(float)
    bulging = rng.random(LEVELS) < _logistic(_BULGING_LOGIT + 1.1 * degeneration + 0.8 * depth_z)
    herniation = rng.random(LEVELS) < _logistic(_HERNIATION_LOGIT + 0.8 * degeneration)
    pfirrmann = 1 + np.searchsorted(_PFIRRMANN_EDGES, degeneration)
    modic_present = rng.random(LEVELS) < _logistic(-2.6 + 0.8 * degeneration)
    modic = np.where(modic_present, rng.choice([1, 2, 3], LEVELS, p=[0.3, 0.6, 0.1]), 0)
    up = rng.random(LEVELS) < _logistic(-2.3 + 0.5 * degeneration)
    low = rng.random(LEVELS) < _logistic(-2.3 + 0.5 * degeneration)
    spondylolisthesis = rng.random(LEVELS) < np.where(lower > 0, 0.06, 0.02)
    return dict(depth_z=depth_z, loss=loss, bulging=bulging, herniation=herniation,
                pfirrmann=pfirrmann, modic=modic, up_endplate=up, low_endplate=low,
                spondylolisthesis=spondylolisthesis)


def _logistic(x):
    return 1.0 / (1.0 + np.exp(-x))


def _draw_bumps(rng, bulging: bool, herniation: bool, margin: float) -> tuple[Bump, ...]:
    bumps = []
    if bulging:
        bumps.append(_bump_for(rng.uniform(0.45, 0.85), rng.uniform(2.0, 5.0), margin,
                               np.pi + rng.normal(0, math.radians(25)), math.radians(25)))
    if herniation:
        bumps.append(_bump_for(rng.uniform(0.04, 0.13), rng.uniform(2.5, 6.0), margin,
                               np.pi + rng.uniform(-1, 1) * math.radians(35), math.radians(8)))
    return tuple(bumps)


def _draw_patient(index: int, seed: int, subset: str) -> dict:
    """Anatomy and true findings of one patient; independent of label noise and of the split."""
    rng = np.random.default_rng([seed, index, _ANATOMY_STREAM])
    sex = "F" if rng.random() < 0.55 else "M"
    age = int(rng.integers(20, 81))
    size = rng.normal(1.0, 0.04) * (1.04 if sex == "M" else 0.97)
    lordosis = rng.uniform(0.9, 1.3)
    exponent = rng.uniform(2.3, 3.0)
    draws = _pathology_draws(rng, age, rng.normal(0, 0.5))
    height_norm = _HEIGHT_MM * size
    heights = height_norm * (1 + rng.normal(0, 0.07, LEVELS)) * (1 - draws["loss"])
    depths = _DEPTH_MM * size * (1 + 0.045 * draws["depth_z"])
    widths = _WIDTH_MM * size * (1 + rng.normal(0, 0.04, LEVELS))
    wedges = np.radians(np.maximum(_WEDGE_DEG * lordosis + rng.normal(0, _WEDGE_SD_DEG),
                                   _WEDGE_MIN_DEG))
    margins = rng.uniform(1.0, 2.0, LEVELS)
    body_heights = _BODY_HEIGHT_MM * size * (1 + rng.normal(0, 0.03, LEVELS))
    body_tilts = np.radians(np.column_stack([
        _BODY_WEDGE_DEG + rng.normal(0, 1.0, LEVELS), rng.normal(0, 0.8, LEVELS),
        rng.normal(0, 0.7, LEVELS)]))

    # The chain, from the sacral endplate up. Sacral slope: its anterior edge is lower.
    frame = _sagittal_frame(-math.radians(rng.uniform(30, 42))) @ _local_rotation(
        0.0, math.radians(rng.normal(0, 1.5)), math.radians(rng.normal(0, 1.0)))
    point = np.array([rng.normal(0, 2.0), 0.0, 0.0])
    sacrum_top = (point, frame)
    discs, bodies = [], []
    for k in range(LEVELS):
        bumps = _draw_bumps(rng, bool(draws["bulging"][k]), bool(draws["herniation"][k]), margins[k])
        shape = _keep_positive_thickness(DiscShape(
            201 + k, point, frame, float(heights[k]), 2 * math.tan(wedges[k] / 2),
            float(depths[k] / 2), float(widths[k] / 2), exponent, float(margins[k]), bumps))
        # The disc's lower surface lies on the endplate below: tilt by half the wedge, lift by
        # half the height.
        half_wedge = math.atan(shape.slope / 2)
        disc_frame = frame @ _local_rotation(half_wedge, 0.0, 0.0)
        disc = dataclasses.replace(shape, frame=disc_frame,
                                   centre=point + shape.height_mm / 2 * disc_frame[:, 2])
        discs.append(disc)
        upper = disc.frame @ _local_rotation(half_wedge, 0.0, 0.0)
        lower_point = disc.centre + disc.height_mm / 2 * disc.frame[:, 2]
        mid = upper @ _local_rotation(*(body_tilts[k] / 2))
        frame = upper @ _local_rotation(*body_tilts[k])
        point = lower_point + body_heights[k] * mid[:, 2]
    plates = [_disc_plates(d) for d in discs]
    last = discs[-1]
    top = _virtual_plate(point, frame, 0.98 * (last.semi_ap_mm + last.margin_mm),
                         0.98 * (last.semi_lat_mm + last.margin_mm), exponent)
    first = discs[0]
    sacral_point, sacral_frame = sacrum_top
    bottom_frame = sacral_frame @ _local_rotation(math.radians(-8), 0.0, 0.0)
    bottom = _virtual_plate(sacral_point - 28.0 * size * sacral_frame[:, 2], bottom_frame,
                            0.85 * (first.semi_ap_mm + first.margin_mm),
                            0.9 * (first.semi_lat_mm + first.margin_mm), exponent)
    bodies = [(bottom, plates[0][0])]
    bodies += [(plates[k][1], plates[k + 1][0]) for k in range(LEVELS - 1)]
    bodies.append((plates[-1][1], top))
    pathology = tuple(
        {name: int(draws[name][k]) for name in ("bulging", "herniation", "pfirrmann", "modic",
                                                 "up_endplate", "low_endplate",
                                                 "spondylolisthesis")}
        for k in range(LEVELS))
    canal = _canal(rng, discs, bodies, size)
    grid, skin, fat = _grid(rng, discs, bodies, canal)
    scanner = _SCANNERS[int(rng.integers(len(_SCANNERS)))]
    return dict(patient_id=patient_id(index), subset=subset, sex=sex, age=age, discs=tuple(discs),
                bodies=tuple(bodies), canal=canal, grid=grid, skin_mm=skin, fat_mm=fat,
                height_norm_mm=height_norm, pathology=pathology, scanner=scanner)


def _keep_positive_thickness(disc: DiscShape) -> DiscShape:
    """Flatten a wedge whose thin end would vanish past a bulge (keeps it >= 2 mm thick)."""
    phi = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    thinnest = disc.thickness(disc.radius(phi) * np.cos(phi)).min()
    if thinnest >= 2.0:
        return disc
    slope = disc.slope * (disc.height_mm - 2.0) / (disc.height_mm - thinnest)
    return dataclasses.replace(disc, slope=float(slope))


def _body_centre(lower: Plate, upper: Plate):
    return (lower.point + upper.point) / 2, _unit(lower.ap + upper.ap), (
        lower.semi_ap_mm + upper.semi_ap_mm) / 2


def _canal(rng, discs, bodies, size) -> Canal:
    """A tube behind the bodies and discs, following their posterior margins."""
    width, depth, gap = rng.uniform(18, 24) * size, rng.uniform(14, 18) * size, rng.uniform(2, 3.5)
    points = []
    structures = [_body_centre(*bodies[0])]
    for disc, body in zip(discs, bodies[1:], strict=True):
        structures.append((disc.centre, disc.frame[:, 0], disc.semi_ap_mm + disc.margin_mm))
        structures.append(_body_centre(*body))
    for centre, ap, semi in structures:
        points.append((centre - (semi + gap + depth / 2) * ap, 1.0 / max(math.sqrt(1 - ap[2] ** 2), 0.5)))
    points.sort(key=lambda p: p[0][2])
    z = np.array([p[0][2] for p in points])
    conus = discs[4].centre[2] + rng.uniform(-10, 10)
    return Canal(z=z, x=np.array([p[0][0] for p in points]), y=np.array([p[0][1] for p in points]),
                 ap_stretch=np.array([p[1] for p in points]), width_mm=float(width),
                 depth_mm=float(depth), conus_z=float(conus))


def _outline_points(disc: DiscShape, n: int = 96) -> np.ndarray:
    phi = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = disc.radius(phi)
    u, v = r * np.cos(phi), r * np.sin(phi)
    pts = []
    for side in (-0.5, 0.5):
        w = side * disc.thickness(u)
        pts.append(disc.centre + np.outer(u, disc.frame[:, 0]) + np.outer(v, disc.frame[:, 1])
                   + np.outer(w, disc.frame[:, 2]))
    return np.concatenate(pts)


def _plate_points(plate: Plate, n: int = 48) -> np.ndarray:
    phi = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = _superellipse_radius(phi, plate.semi_ap_mm, plate.semi_lat_mm, plate.exponent)
    flat = plate.centre + np.outer(r * np.cos(phi), plate.ap) + np.outer(r * np.sin(phi), plate.lat)
    # Lift onto the plate's plane along the projection normal.
    n_proj = _cross(plate.ap, plate.lat)
    lift = ((plate.point - flat) @ plate.normal) / (n_proj @ plate.normal)
    return flat + np.outer(lift, n_proj)


def _grid(rng, discs, bodies, canal) -> tuple[Grid, float, float]:
    """A sagittal grid around the spine: ~3.3 mm slices, 0.6-0.9 mm in-plane, FOV ~180 x 240 mm."""
    in_plane = round(float(rng.uniform(0.6, 0.9)), 4)
    slice_spacing = round(float(rng.uniform(3.0, 3.6)), 4)
    thickness = round(slice_spacing * float(rng.choice([1.0, 0.9])), 4)
    labelled = np.concatenate([_outline_points(d) for d in discs]
                              + [_plate_points(p) for body in bodies[1:] for p in body])
    centre_lr = (labelled[:, 0].min() + labelled[:, 0].max()) / 2 + rng.uniform(-3, 3)
    half_lr = np.abs(labelled[:, 0] - centre_lr).max() + 5.0
    nx = max(int(rng.integers(20, 25)), math.ceil(2 * half_lr / slice_spacing) + 1)

    canal_back = (canal.y - canal.depth_mm / 2 * canal.ap_stretch).min()
    front = labelled[:, 1].max()
    span_ap = front - canal_back
    fov_ap = max(rng.uniform(160, 200), span_ap + 90)
    back_margin = rng.uniform(0.55, 0.7) * (fov_ap - span_ap)
    sacrum = bodies[0][1].point[2]
    top = labelled[:, 2].max()
    below, above = rng.uniform(25, 45), rng.uniform(6, 20)
    fov_si = max(rng.uniform(220, 260), top - sacrum + below + above)
    below += rng.uniform(0.3, 0.7) * (fov_si - (top - sacrum + below + above))
    shape = (nx, math.ceil(fov_ap / in_plane), math.ceil(fov_si / in_plane))
    origin = np.array([centre_lr - (nx - 1) / 2 * slice_spacing, canal_back - back_margin,
                       sacrum - below])
    grid = Grid(shape, (slice_spacing, in_plane, in_plane), origin, thickness)
    return grid, float(rng.uniform(4, 12)), float(rng.uniform(8, 25))


def _grades(rng, true: dict, label_noise: float, level: int) -> dict:
    """A rater's grades: each binary finding misread with probability `label_noise`. For the
    findings with a SPIDER rate, a negative is misread as positive in proportion to that rate
    (prevalence-preserving noise), so rare findings stay rare in the gradings."""
    graded = dict(true)
    for name in ("bulging", "narrowing", "herniation", "up_endplate", "low_endplate",
                 "spondylolisthesis"):
        flip = label_noise
        if name in SPIDER_PREVALENCE and not true[name]:
            rate = SPIDER_PREVALENCE[name][level]
            flip = label_noise * rate / (1 - rate)
        if rng.random() < flip:
            graded[name] = 1 - true[name]
    step = rng.choice([-1, 1])
    if rng.random() < label_noise:
        grade = true["pfirrmann"]
        graded["pfirrmann"] = int(grade + step if 1 <= grade + step <= 5 else grade - step)
    return graded


def draw_patients(patients: int, seed: int = 0, label_noise: float = 0.1,
                  validation_fraction: float = 0.2) -> list[SyntheticPatient]:
    """Every patient's anatomy, true findings and gradings, without drawing an image.

    Cheap (tens of milliseconds per patient), so the cohort's statistics can be checked on
    many patients. The anatomy depends only on `seed` and the patient's number, not on
    `label_noise` or the split.
    """
    return [draw_patient(index, seed, label_noise, subset) for index, subset in
            enumerate(subsets(patients, seed, label_noise, validation_fraction))]


def subsets(patients: int, seed: int = 0, label_noise: float = 0.1,
            validation_fraction: float = 0.2) -> list[str]:
    """Each patient's subset ("training" or "validation"), checking the cohort's arguments."""
    if patients < 1:
        raise ValueError(f"patients must be at least 1, got {patients}")
    if not 0.0 <= label_noise <= 0.5:
        raise ValueError(f"label_noise must be a probability in [0, 0.5], got {label_noise}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    # At least one validation patient whenever there is a split to make, never all of them.
    n_val = int(round(validation_fraction * patients))
    if validation_fraction > 0 and patients > 1:
        n_val = min(max(n_val, 1), patients - 1)
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(patients)
    validation = set(order[:n_val].tolist())
    return ["validation" if index in validation else "training" for index in range(patients)]


def patient_id(index: int) -> str:
    """Patient number `index` (0-based) as overview.csv and the file names call it."""
    return str(index + 1)


def draw_patient(index: int, seed: int, label_noise: float, subset: str) -> SyntheticPatient:
    """Patient number `index` (0-based): anatomy, true findings and noisy gradings."""
    drawn = _draw_patient(index, seed, subset)
    grading_rng = np.random.default_rng([seed, index, _GRADING_STREAM])
    pathology, graded, geometries = [], [], []
    for k, disc in enumerate(drawn["discs"]):
        true = dict(drawn["pathology"][k])
        geometry = disc_truth(disc)
        geometries.append(geometry)
        true["bulging"] = int(geometry["bulge_fraction"] > BULGE_THRESHOLD)
        norm = float(drawn["height_norm_mm"][k])
        true["narrowing"] = int(geometry["height_mean_mm"] < (1 - NARROWING_LOSS) * norm)
        pathology.append(true)
        graded.append(_grades(grading_rng, true, label_noise, k))
    drawn.update(pathology=tuple(pathology), graded=tuple(graded), geometry=tuple(geometries))
    return SyntheticPatient(**drawn)


# ------------------------------------------------------------------------------------ truth ----

def _chord(along: np.ndarray, across: np.ndarray, level: float) -> tuple[float, float]:
    """Where the closed outline (along, across) crosses the line across == level: (min, max)."""
    nxt_along, nxt_across = np.roll(along, -1), np.roll(across, -1)
    d0, d1 = across - level, nxt_across - level
    hits = (d0 <= 0) != (d1 <= 0)
    t = d0[hits] / (d0[hits] - d1[hits])
    crossings = along[hits] + t * (nxt_along[hits] - along[hits])
    return float(crossings.min()), float(crossings.max())


def disc_truth(disc: DiscShape) -> dict[str, float]:
    """The exact geometry of a disc, with tables.GEOMETRY and tables.BULGE keys.

    Definitions (the geometry stage measures the same): the centre is the disc's centroid; the
    AP width is the extent along the AP axis through it and the lateral width along the lateral
    axis, bulges included; heights are thicknesses along the normal at 15/50/85% of the AP extent
    (posterior to anterior) in the mid-sagittal plane; the mean height is volume / footprint
    area; the bulge fraction is the share of the outline's length outside the endplate
    footprint, and the bulge max the largest excess past it along a ray from the footprint's
    origin (the centre of the normal disc).
    """
    fine = np.linspace(0, 2 * np.pi, 2 * _OUTLINE_SAMPLES, endpoint=False)
    dphi = 2 * np.pi / _OUTLINE_SAMPLES
    radius, endplate = disc.radius(fine), disc.endplate_radius(fine)
    phi, r = fine[::2], radius[::2]
    c, s = np.cos(phi), np.sin(phi)
    h0, k = disc.height_mm, disc.slope
    volume = np.sum(h0 * r**2 / 2 + k * r**3 * c / 3) * dphi
    area = np.sum(r**2 / 2) * dphi
    u_bar = np.sum(h0 * r**3 * c / 3 + k * r**4 * c**2 / 4) * dphi / volume
    v_bar = np.sum(h0 * r**3 * s / 3 + k * r**4 * c * s / 4) * dphi / volume
    u, v = r * c, r * s
    posterior, anterior = _chord(u, v, v_bar)
    right_lo, right_hi = _chord(v, u, u_bar)
    heights = {f: disc.thickness(posterior + f * (anterior - posterior)) for f in (0.15, 0.5, 0.85)}
    a, l_axis, _ = disc.frame.T

    outside = radius[1::2] > endplate[1::2]  # judged at each outline segment's middle
    segment = np.hypot(np.roll(u, -1) - u, np.roll(v, -1) - v)
    excess = radius - endplate
    return {
        "height_mean_mm": float(volume / area),
        "ap_width_mm": anterior - posterior,
        "lateral_width_mm": right_hi - right_lo,
        "sagittal_angle_deg": math.degrees(math.atan2(a[2], a[1])),
        "coronal_angle_deg": math.degrees(math.atan2(l_axis[2], l_axis[0])),
        "transverse_angle_deg": math.degrees(math.atan2(a[0], a[1])),
        "height_anterior_mm": float(heights[0.85]),
        "height_middle_mm": float(heights[0.5]),
        "height_posterior_mm": float(heights[0.15]),
        "volume_mm3": float(volume),
        "wedge_angle_deg": math.degrees(2 * math.atan(k / 2)),
        "bulge_fraction": float(segment[outside].sum() / segment.sum()),
        "bulge_max_mm": float(max(excess.max(), 0.0)),
    }


def truth_table(cohort: Sequence[SyntheticPatient]) -> pd.DataFrame:
    """One row per disc: true geometry, true findings and what was graded (TRUTH_COLUMNS)."""
    rows = []
    for patient in cohort:
        for k, disc in enumerate(patient.discs):
            row = {"patient_id": patient.patient_id, "ivd_label": disc.ivd_label,
                   "level": labels.level_name(disc.ivd_label), **patient.geometry[k],
                   "height_norm_mm": float(patient.height_norm_mm[k])}
            row.update({name: patient.pathology[k][name] for name in TRUTH_PATHOLOGY})
            row.update({f"graded_{name}": patient.graded[k][name] for name in TRUTH_PATHOLOGY})
            rows.append(row)
    return pd.DataFrame(rows, columns=TRUTH_COLUMNS)


# ---------------------------------------------------------------------------- rasterising ----

def _box(coords: Sequence[np.ndarray], points: np.ndarray, margin: float):
    """Index slices of the grid axes covering `points` (+ margin), or None when outside."""
    lo, hi = points.min(axis=0) - margin, points.max(axis=0) + margin
    slices = []
    for axis, values in enumerate(coords):
        start = int(np.searchsorted(values, lo[axis]))
        stop = int(np.searchsorted(values, hi[axis], side="right"))
        if start >= stop:
            return None
        slices.append(slice(start, stop))
    return tuple(slices)


def _project(coords, box, direction, origin) -> np.ndarray:
    """(x - origin) . direction over a box of the grid, as a broadcast float32 array."""
    x, y, z = (values[s] for values, s in zip(coords, box, strict=True))
    return (np.float32(direction[0]) * (x - origin[0]).astype(np.float32)[:, None, None]
            + np.float32(direction[1]) * (y - origin[1]).astype(np.float32)[None, :, None]
            + np.float32(direction[2]) * (z - origin[2]).astype(np.float32)[None, None, :])


def _plate_norm(coords, box, plate: Plate) -> np.ndarray:
    u = _project(coords, box, plate.ap, plate.centre) / plate.semi_ap_mm
    v = _project(coords, box, plate.lat, plate.centre) / plate.semi_lat_mm
    return (np.abs(u) ** plate.exponent + np.abs(v) ** plate.exponent) ** (1 / plate.exponent)


def _draw_body(coords, tissue, label_map, lower: Plate, upper: Plate, label: int,
               modic_below: int, modic_above: int) -> None:
    points = np.concatenate([_plate_points(lower), _plate_points(upper)])
    box = _box(coords, points, margin=2.0)
    if box is None:
        return
    d_lo = _project(coords, box, lower.normal, lower.point)
    d_hi = -_project(coords, box, upper.normal, upper.point)
    slab = (d_lo >= 0) & (d_hi >= 0)
    t = np.clip(d_lo / np.maximum(d_lo + d_hi, 1e-6), 0, 1)
    rho = (1 - t) * _plate_norm(coords, box, lower) + t * _plate_norm(coords, box, upper)
    inside = slab & (rho <= 1 - 0.06 * np.sin(np.pi * t))
    semi = min(lower.semi_ap_mm, upper.semi_ap_mm)
    cortex = (rho > 1 - 1.2 / semi) | (d_lo < 1.0) | (d_hi < 1.0)
    kind = np.where(cortex, CORTEX, MARROW).astype(np.uint8)
    if modic_below:
        kind[(d_lo < 5.0) & ~cortex] = MODIC[modic_below]
    if modic_above:
        kind[(d_hi < 5.0) & ~cortex] = MODIC[modic_above]
    tissue[box][inside] = kind[inside]
    label_map[box][inside] = label


def _draw_disc(coords, tissue, label_map, disc: DiscShape, pfirrmann: int) -> None:
    box = _box(coords, _outline_points(disc), margin=1.0)
    if box is None:
        return
    a, l_axis, n = disc.frame.T
    u = _project(coords, box, a, disc.centre)
    w = _project(coords, box, n, disc.centre)
    slab = np.abs(w) <= 0.5 * disc.thickness(u)
    v = _project(coords, box, l_axis, disc.centre)
    phi = np.arctan2(v[slab], u[slab])
    r2 = u[slab] ** 2 + v[slab] ** 2
    inside = slab.copy()
    inside[slab] = r2 <= disc.radius(phi) ** 2
    nucleus = np.zeros_like(slab)
    nucleus[slab] = (r2 <= (0.5 * disc.normal_radius(phi)) ** 2) & (
        np.abs(w[slab]) <= 0.3 * disc.thickness(u[slab]))
    kind = np.where(nucleus, NUCLEUS[pfirrmann], ANNULUS).astype(np.uint8)
    tissue[box][inside] = kind[inside]
    label_map[box][inside] = disc.ivd_label


def disc_mask(disc: DiscShape, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """The disc alone as a boolean RAS mask on a grid of `spacing` mm (voxel centres sampled),
    with a voxel or more of background around it: a shape of known geometry (disc_truth)."""
    points = _outline_points(disc)
    step = np.asarray(spacing, dtype=float)
    lo = np.floor(points.min(axis=0) / step) * step - 2 * step
    counts = np.ceil((points.max(axis=0) + 2 * step - lo) / step).astype(int) + 1
    coords = [lo[i] + step[i] * np.arange(counts[i]) for i in range(3)]
    tissue = np.zeros(tuple(counts), dtype=np.uint8)
    label_map = np.zeros(tuple(counts), dtype=np.int16)
    _draw_disc(coords, tissue, label_map, disc, pfirrmann=1)
    return label_map == disc.ivd_label


def _draw_canal(coords, tissue, label_map, canal: Canal) -> None:
    x, y, z = coords
    xc = np.interp(z, canal.z, canal.x)
    yc = np.interp(z, canal.z, canal.y)
    half_ap = canal.depth_mm / 2 * np.interp(z, canal.z, canal.ap_stretch)
    ys = slice(int(np.searchsorted(y, (yc - half_ap).min())),
               int(np.searchsorted(y, (yc + half_ap).max(), side="right")))
    dx = ((x[:, None] - xc[None, :]) / (canal.width_mm / 2)) ** 2  # (x, z)
    dy = ((y[ys, None] - yc[None, :]) / half_ap[None, :]) ** 2  # (y, z)
    ellipse = dx[:, None, :] + dy[None, :, :]
    inside = ellipse <= 1.0
    cord = (ellipse <= 0.3) & (z > canal.conus_z)[None, None, :]
    tissue[:, ys][inside] = np.where(cord, CORD, CSF)[inside]
    label_map[:, ys][inside] = labels.CANAL


def _background(coords, patient: SyntheticPatient) -> np.ndarray:
    """Air, fat, paraspinal muscle and abdomen in the (AP, SI) plane."""
    _, y, z = coords
    grid = patient.grid
    skin = grid.origin[1] + patient.skin_mm + 3.0 * np.sin(z / 37.0)
    front = np.interp(z, *_anterior_line(patient))
    plane = np.full((y.size, z.size), ABDOMEN, dtype=np.uint8)
    plane[y[:, None] < front[None, :] + 8.0] = MUSCLE
    plane[y[:, None] < skin[None, :] + patient.fat_mm] = FAT
    plane[y[:, None] < skin[None, :]] = AIR
    return plane


def _anterior_line(patient: SyntheticPatient) -> tuple[np.ndarray, np.ndarray]:
    points = np.concatenate([_plate_points(p) for body in patient.bodies for p in body])
    order = np.argsort(points[:, 2])
    z, y = points[order, 2], points[order, 1]
    bins = np.linspace(z[0], z[-1], 24)
    which = np.digitize(z, bins)
    zs = np.array([z[which == b].mean() for b in np.unique(which)])
    ys = np.array([y[which == b].max() for b in np.unique(which)])
    return zs, ys


def rasterise(patient: SyntheticPatient) -> tuple[np.ndarray, np.ndarray]:
    """(tissue classes on sub-slices, label map): the RAS label map samples slice centres; the
    tissue map has len(_SUBSLICES) samples across each slice's thickness for partial volume."""
    grid = patient.grid
    x = grid.axis(0)
    fine_x = (x[:, None] + _SUBSLICES[None, :] * grid.slice_thickness_mm).ravel()
    coords = (fine_x, grid.axis(1), grid.axis(2))
    fine_shape = (fine_x.size, *grid.shape[1:])
    tissue = np.empty(fine_shape, dtype=np.uint8)
    tissue[:] = _background(coords, patient)[None]
    label_map = np.zeros(fine_shape, dtype=np.int16)
    _draw_canal(coords, tissue, label_map, patient.canal)
    modic = [p["modic"] for p in patient.pathology] + [0]
    for j, (lower, upper) in enumerate(patient.bodies):
        _draw_body(coords, tissue, label_map, lower, upper, j,
                   modic[j - 1] if j > 0 else 0, modic[j])
    for disc, findings in zip(patient.discs, patient.pathology, strict=True):
        _draw_disc(coords, tissue, label_map, disc, findings["pfirrmann"])
    centre = len(_SUBSLICES) // 2
    return tissue, np.ascontiguousarray(label_map[centre::len(_SUBSLICES)])


def _smooth_field(rng, grid: Grid, step_mm: float = 8.0) -> np.ndarray:
    """A random field with unit variance that varies over about `step_mm`: normal weights on a
    coarse lattice spread by separable Gaussian kernels (three matrix products, no resampling)."""
    kernels = []
    for axis in range(3):
        step = max(step_mm, grid.spacing[axis])
        position = np.arange(grid.shape[axis]) * grid.spacing[axis]
        centres = np.arange(-step, position[-1] + 2 * step, step)
        kernel = np.exp(-0.5 * ((position[:, None] - centres[None, :]) / step) ** 2)
        kernels.append((kernel / np.linalg.norm(kernel, axis=1, keepdims=True)).astype(np.float32))
    coarse = rng.standard_normal(tuple(k.shape[1] for k in kernels)).astype(np.float32)
    field = np.tensordot(coarse, kernels[2], axes=([2], [1]))  # (cx, cy, nz)
    field = np.matmul(kernels[1], field)  # (cx, ny, nz)
    return np.tensordot(kernels[0], field, axes=([1], [0]))  # (nx, ny, nz)


def _slice_average(values: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """Per-class `values` over the sub-slice tissue map, averaged across each slice thickness."""
    sub = len(_SUBSLICES)
    total = values[tissue[0::sub]]
    for s in range(1, sub):
        total += values[tissue[s::sub]]
    return total / np.float32(sub)


def texture(tissue: np.ndarray, patient: SyntheticPatient, seed: int, index: int) -> np.ndarray:
    """Multiplicative tissue texture, shared by every sequence of a patient (it is anatomy)."""
    rng = np.random.default_rng([seed, index, _TEXTURE_STREAM])
    return 1 + _slice_average(_TEXTURE, tissue) * _smooth_field(rng, patient.grid)


def render(tissue: np.ndarray, tissue_texture: np.ndarray, patient: SyntheticPatient,
           sequence: str, seed: int, index: int) -> np.ndarray:
    """An int16 image of one sequence: tissue contrast averaged over the slice thickness (partial
    volume), texture, in-plane blur, a multiplicative bias field and Rician noise."""
    rng = np.random.default_rng([seed, index, _IMAGE_STREAM[sequence]])
    shape = patient.grid.shape
    lut = np.asarray(_INTENSITY[sequence], dtype=np.float32) * np.float32(rng.uniform(0.8, 1.25))
    image = _slice_average(lut, tissue) * tissue_texture
    image = ndimage.gaussian_filter(image, sigma=(0, 0.6, 0.6))
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in shape)
    c = rng.normal(0, 0.12, 6).astype(np.float32)
    # Receive coils sit behind the patient: the back is brighter.
    bias = ((c[0] * x)[:, None, None] + (c[1] * y - 0.25 * y + c[2] * y**2)[None, :, None]
            + (c[3] * z + c[4] * z**2)[None, None, :] + (c[5] * np.outer(y, z))[None])
    image *= np.exp(bias)
    sigma = np.float32(rng.uniform(0.02, 0.04) * 1000)
    real = image + sigma * rng.standard_normal(shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(shape, dtype=np.float32)
    return np.clip(np.rint(np.hypot(real, imaginary)), 0, 32767).astype(np.int16)


# ---------------------------------------------------------------------------------- files ----

def _overview_row(patient: SyntheticPatient, sequence: str, seed: int, index: int) -> dict:
    manufacturer, model, field, software = patient.scanner
    grid = patient.grid
    t1 = sequence == "t1"
    rng = np.random.default_rng([seed, index, 10 + _IMAGE_STREAM[sequence]])
    echo = rng.uniform(8, 14) if t1 else rng.uniform(90, 115)
    repetition = rng.uniform(450, 700) if t1 else rng.uniform(3000, 4500)
    return {
        "new_file_name": f"{patient.patient_id}_{sequence}",
        "subset": patient.subset,
        "num_vertebrae": LEVELS,
        "num_discs": LEVELS,
        "sex": patient.sex,
        "age": patient.age,
        "Manufacturer": manufacturer,
        "ManufacturerModelName": model,
        "DeviceSerialNumber": str(40000 + _SCANNERS.index(patient.scanner) * 731),
        "SoftwareVersions": software,
        "EchoNumbers": 1,
        "EchoTime": f"{echo:.2f}",
        "EchoTrainLength": int(rng.integers(3, 6)) if t1 else int(rng.integers(15, 26)),
        "FlipAngle": 90 if t1 else int(rng.choice([90, 150])),
        "ImagedNucleus": "1H",
        "ImagingFrequency": f"{42.577478 * field:.6f}",
        "InPlanePhaseEncodingDirection": "ROW",
        "MRAcquisitionType": "2D",
        "MagneticFieldStrength": f"{field:.1f}",
        "NumberOfPhaseEncodingSteps": int(round(grid.shape[1] * 0.8)),
        "PercentPhaseFieldOfView": "100.0",
        "PercentSampling": "80.0",
        "PhotometricInterpretation": "MONOCHROME2",
        "PixelBandwidth": f"{rng.uniform(130, 260):.1f}",
        "PixelSpacing": f"[{grid.spacing[1]:.4f}, {grid.spacing[2]:.4f}]",
        "RepetitionTime": f"{repetition:.1f}",
        "SAR": f"{rng.uniform(0.3, 2.5):.4f}",
        "SamplesPerPixel": 1,
        "ScanningSequence": "SE",
        "SequenceName": "*tse2d1_3" if t1 else "*tse2d1_17",
        "SeriesDescription": "t1_tse_sag" if t1 else "t2_tse_sag",
        "SliceThickness": f"{grid.slice_thickness_mm:.4f}",
        "SpacingBetweenSlices": f"{grid.spacing[0]:.4f}",
        "SpecificCharacterSet": "ISO_IR 100",
        "TransmitCoilName": "Body",
        "WindowCenter": 600 if t1 else 500,
        "WindowWidth": 1200 if t1 else 1000,
    }


def _write_csv(location: str, frame: pd.DataFrame) -> None:
    storage.write_bytes(location, frame.to_csv(index=False, float_format=_FLOAT,
                                               lineterminator="\n").encode("utf-8"))


def _remove_stale_volumes(out_dir: str, keep: set[str]) -> None:
    """Delete volumes an earlier, larger synthetic cohort left in `out_dir`, so the catalog never
    mixes two cohorts; refuse to touch a folder whose volumes synthesize did not write."""
    fs, base = storage.filesystem(out_dir)
    stale = []
    for folder in ("images", "masks"):
        path = f"{base.rstrip('/')}/{folder}"
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            continue
        for info in fs.get_file_info(pafs.FileSelector(path)):
            if info.type == pafs.FileType.File and f"{folder}/{info.base_name}" not in keep:
                stale.append(info.path)
    if not stale:
        return
    if not storage.exists(storage.join(out_dir, TRUTH_FILE)):
        raise ValueError(f"{out_dir}: holds volumes that no synthetic cohort wrote (such as "
                         f"{stale[0]}); write the synthetic cohort to another folder")
    for path in stale:
        fs.delete_file(path)


def write_patient(out_dir: str, index: int, seed: int, label_noise: float, subset: str,
                  sequences: Sequence[str]) -> SyntheticPatient:
    """Draw patient `index` and write its images and masks: the unit of work, in this process
    or as one Ray task. Depends on the seed and the patient's number only."""
    patient = draw_patient(index, seed, label_noise, subset)
    tissue, label_map = rasterise(patient)
    tissue_texture = texture(tissue, patient, seed, index)
    header = make_header(label_map.shape, patient.grid.spacing, "LPS")
    for sequence in sequences:
        name = f"{patient.patient_id}_{sequence}.mha"
        image = render(tissue, tissue_texture, patient, sequence, seed, index)
        write_volume(storage.join(out_dir, "images", name), image, header)
        write_volume(storage.join(out_dir, "masks", name), label_map, header)
    return patient


def _patients_in_process(out_dir: str, seed: int, label_noise: float, subsets: list[str],
                         sequences: Sequence[str]) -> Iterator[tuple[int, SyntheticPatient]]:
    for index, subset in enumerate(subsets):
        yield index, write_patient(out_dir, index, seed, label_noise, subset, sequences)


def _patients_on_ray(out_dir: str, seed: int, label_noise: float, subsets: list[str],
                     sequences: Sequence[str]) -> Iterator[tuple[int, SyntheticPatient]]:
    """(index, patient) as each patient's Ray task finishes: one single-CPU task per patient,
    writing its own volumes; only the drawn patients (kilobytes) come back."""
    import ray

    task = ray.remote(write_patient)
    refs = {task.remote(out_dir, index, seed, label_noise, subset, sequences): index
            for index, subset in enumerate(subsets)}
    for ref in tasks.as_completed(list(refs)):
        yield refs[ref], ray.get(ref)


def synthesize(
    out_dir: str,
    patients: int = 24,
    seed: int = 0,
    label_noise: float = 0.1,
    sequences: Sequence[str] = SEQUENCES,
    validation_fraction: float = 0.2,
    progress: Callable[[int, int], None] | None = None,
    on_ray: bool | None = None,
) -> pd.DataFrame:
    """Write a SPIDER-layout cohort under `out_dir` (path or URI) and return its truth table.

    Writes images/, masks/, overview.csv, radiological_gradings.csv and synthetic_truth.csv
    (TRUTH_COLUMNS); volumes left by an earlier synthetic cohort in the same folder are removed.
    Patients are written by one Ray task each when `on_ray` (default: when Ray is initialized
    and there are at least RAY_FROM_PATIENTS), else in this process; the bytes are the same.
    The driver writes the three tables once. `progress(done, total)` is called after each
    patient.
    """
    unknown = [s for s in sequences if s not in _IMAGE_STREAM]
    if unknown or not sequences:
        raise ValueError(f"synthetic sequences must be some of {', '.join(_IMAGE_STREAM)}; "
                         f"got {list(sequences)}")
    cohort_subsets = subsets(patients, seed, label_noise, validation_fraction)
    _remove_stale_volumes(out_dir, {f"{folder}/{patient_id(index)}_{sequence}.mha"
                                    for index in range(patients) for sequence in sequences
                                    for folder in ("images", "masks")})
    if on_ray is None:
        on_ray = patients >= RAY_FROM_PATIENTS and tasks.ray_is_up()
    written = _patients_on_ray if on_ray else _patients_in_process
    cohort: list[SyntheticPatient | None] = [None] * patients
    for done, (index, patient) in enumerate(
            written(out_dir, seed, label_noise, cohort_subsets, sequences), start=1):
        cohort[index] = patient
        if progress is not None:
            progress(done, patients)
    overview = [_overview_row(patient, sequence, seed, index)
                for index, patient in enumerate(cohort) for sequence in sequences]
    gradings = [{"Patient": int(patient.patient_id), "IVD label": disc.ivd_label - 200,
                 **{spider: int(graded[ours]) for spider, ours in _GRADED.items()}}
                for patient in cohort
                for disc, graded in zip(patient.discs, patient.graded, strict=True)]
    truth = truth_table(cohort)
    _write_csv(storage.join(out_dir, "overview.csv"), pd.DataFrame(overview, columns=OVERVIEW_COLUMNS))
    _write_csv(storage.join(out_dir, "radiological_gradings.csv"),
               pd.DataFrame(gradings, columns=GRADINGS_COLUMNS))
    _write_csv(storage.join(out_dir, TRUTH_FILE), truth)
    return truth

"""Procedural, SYNTHETIC CT-like thorax phantom (generated with numpy + scipy.ndimage only).

Everything here is drawn from simple geometric shapes (ellipses, ellipsoids, paraboloid domes,
tubes) with random parameters. It is not derived from, and does not depict, any real person's
scan; it exists so that the project runs without downloading medical data and so that tests have
exact ground truth (structure labels, lung-nodule masks, nodule centres and diameters).

Conventions
-----------
* Arrays have axes (z, y, x): axial slices first. Array index k = 0 is the most inferior slice.
* The 4x4 `affine` maps a homogeneous array index [k, j, i, 1] to world millimetres
  [x, y, z, 1] in an LPS-like frame: world x grows toward the patient's left, y toward
  posterior, z toward superior (head). Columns of `affine[:3, :3]` are (0, 0, sz), (0, sy, 0),
  (sx, 0, 0) for array axes z, y, x. The volume is centred near world 0 (plus a small random
  "table" offset).
* Anatomy is built in a continuous patient frame (mm; same axes as world, origin mid-chest) that
  is rotated by a few degrees and shifted by up to ~10 mm inside the scanner grid, so sizes are
  physical and independent of the voxel spacing; the affine stays the scanner's.
* Every random draw comes from `np.random.default_rng([seed, index])`.

Run `python -m isimed.data.phantom --preview --out preview.png` for a picture,
`--montage docs/phantom_montage.png` for one subject's slices with labels, and `--hu_table
--num_subjects 16` for the HU of every structure (docs/results.md's table).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from isimed.data import structures

# Nodule types and placements, indexed by the subject's "nodule_types" / "nodule_placements".
NODULE_TYPES = ("solid", "part_solid", "ground_glass")
NODULE_PLACEMENTS = ("isolated", "juxta_vascular", "juxta_pleural")
SOLID_HU = (0.0, 60.0)
GROUND_GLASS_HU = (-700.0, -300.0)

HU_MIN, HU_MAX = -1024.0, 3071.0
_N_RIBS = 12
# Nodules are kept this far (plus one voxel diagonal) from the lung boundary and from each other,
# so each nodule is a separate connected component surrounded by lung.
_NODULE_CLEARANCE_MM = 1.0
_NODULE_TRIES = 200
_HALO_MM = 4.0  # soft tissue kept between lungs and mediastinal tubes
_SLAB_VOXELS = 32768


@dataclasses.dataclass(frozen=True)
class PhantomSpec:
    """Grid and content of the synthetic phantom. Lengths in mm, intensities in HU."""

    shape: tuple[int, int, int] = (64, 96, 96)  # array axes (z, y, x): axial slices first
    spacing: tuple[float, float, float] = (5.0, 3.5, 3.5)  # mm along array axes (z, y, x)
    nodule_probability: float = 0.75  # share of subjects with >= 1 lung nodule
    max_nodules: int = 3
    nodule_diameter_mm: tuple[float, float] = (4.0, 30.0)  # log-uniform: small nodules are common
    nodule_type_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)  # as NODULE_TYPES
    nodule_placement_weights: tuple[float, float, float] = (0.4, 0.3, 0.3)  # as NODULE_PLACEMENTS
    noise_hu: float = 20.0
    blur_mm: float = 1.5  # partial-volume blur (Gaussian sigma in mm, converted per axis)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or not all(isinstance(n, (int, np.integer)) and n >= 8 for n in self.shape):
            raise ValueError(f"PhantomSpec.shape must be 3 integers >= 8 (z, y, x), got {self.shape}")
        if len(self.spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in self.spacing):
            raise ValueError(
                f"PhantomSpec.spacing must be 3 finite values > 0 mm (z, y, x), got {self.spacing}"
            )
        if not 0.0 <= self.nodule_probability <= 1.0:
            raise ValueError(
                f"PhantomSpec.nodule_probability must be in [0, 1], got {self.nodule_probability}"
            )
        if self.max_nodules < 0:
            raise ValueError(f"PhantomSpec.max_nodules must be >= 0, got {self.max_nodules}")
        lo, hi = self.nodule_diameter_mm
        if not 0 < lo <= hi:
            raise ValueError(
                f"PhantomSpec.nodule_diameter_mm must satisfy 0 < min <= max, got {self.nodule_diameter_mm}"
            )
        for name in ("nodule_type_weights", "nodule_placement_weights"):
            weights = getattr(self, name)
            if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(
                    f"PhantomSpec.{name} must be 3 weights >= 0 with a positive sum, got {weights}"
                )
        if self.noise_hu < 0 or self.blur_mm < 0:
            raise ValueError(
                f"PhantomSpec.noise_hu and blur_mm must be >= 0, got {self.noise_hu}, {self.blur_mm}"
            )


@dataclasses.dataclass(frozen=True)
class _Anatomy:
    """One subject's shape parameters in the patient frame (mm) and tissue intensities (HU)."""

    rotation: np.ndarray  # (3, 3) patient -> world directions
    shift: np.ndarray  # (3,) patient origin relative to the volume centre, world mm
    table_offset: np.ndarray  # (3,) world position of the volume centre
    # Body: rounded-rectangle ellipse, narrowing toward the head.
    body_a: float
    body_b: float
    body_square: float
    taper: float
    fat_lat: float
    fat_ap: float
    # Thoracic (and upper abdominal) cavity: ellipse inside the body wall.
    cav_a: float
    cav_b: float
    cav_yc: float
    # Lungs: paraboloid apices, mediastinal gap, two diaphragm domes (right higher).
    apex_z: float
    apex_depth: float
    mediastinum_half: float
    dome_right_z: float
    dome_left_z: float
    dome_depth: float
    dome_tilt: float
    # Heart: ellipsoid rotated in the axial plane, long axis toward anterior-left.
    heart_centre: tuple[float, float, float]
    heart_axes: tuple[float, float, float]
    heart_angle: float
    # Aorta: ascending tube, arch (half torus), descending tube drifting anteriorly/medially.
    aorta_radius: float
    ascending_xy: tuple[float, float]
    descending_xy: tuple[float, float]
    descending_drift: tuple[float, float]
    arch_z: float
    # Trachea and main bronchi.
    trachea_xy: tuple[float, float]
    trachea_radius: float
    carina_z: float
    bronchus_right_end: tuple[float, float, float]
    bronchus_left_end: tuple[float, float, float]
    # Spine: vertebral bodies with discs, canal, posterior arch.
    spine_y: float
    vertebra_radius: float
    canal_radius: float
    vertebra_pitch: float
    vertebra_phase: float
    # Ribs: arcs just outside the cavity, falling anteriorly.
    rib_top_z: float
    rib_pitch: float
    rib_drop: float
    rib_offset: float
    rib_half_width: float
    rib_half_height: float
    rib_front: float
    # Liver: below the right dome, left lobe reaching across the midline anteriorly.
    liver_edge_x: float
    liver_bottom_z: float
    # Intensities.
    hu: np.ndarray  # (len(structures.STRUCTURES),) HU per label
    lung_gradient_hu: float  # dependent (posterior) lung is denser


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    """One subject's anatomy from `rng`.

    The order of the draws defines the phantom: changing it changes every subject of every seed
    (and the nodules and noise drawn after it). The helpers below are called in that order, and
    the keyword arguments of the final `_Anatomy(...)` are evaluated left to right, so their order
    is part of it too.
    """

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    size = u(0.85, 1.15)
    sx, sy, sz = size * u(0.95, 1.05), size * u(0.93, 1.07), size * u(0.95, 1.05)
    trunk = _draw_trunk(u, size, sx, sy)
    organs = _draw_organs(u, size, sx, sz, trunk["cav_yc"], trunk["cav_b"])
    apex_z = u(95, 120) * sz
    vertebra_pitch = u(22, 28) * sz
    hu = _draw_tissue_hu(u)
    return _Anatomy(
        rotation=_rotation(*np.deg2rad(rng.uniform(-4, 4, size=3))),
        shift=rng.uniform(-10, 10, size=3),
        table_offset=rng.uniform(-5, 5, size=3),
        body_square=u(0.15, 0.45),
        taper=u(0.03, 0.09),
        **trunk,
        **organs,
        apex_z=apex_z,
        apex_depth=u(60, 80) * sz,
        mediastinum_half=u(6, 12),
        dome_left_z=organs["dome_right_z"] - u(8, 25),
        dome_depth=u(35, 50) * sz,
        dome_tilt=u(10, 25),
        heart_angle=math.radians(u(25, 45)),
        descending_drift=(u(0.04, 0.1), u(0.03, 0.08)),
        canal_radius=u(6, 8) * size,
        vertebra_pitch=vertebra_pitch,
        vertebra_phase=u(0, vertebra_pitch),
        rib_top_z=apex_z - u(0, 10),
        rib_pitch=u(22, 27) * sz,
        rib_drop=u(40, 70) * sz,
        rib_offset=u(4, 7),
        rib_half_width=u(3, 4.5),
        rib_half_height=u(4, 6),
        rib_front=u(0.7, 0.85),
        liver_edge_x=u(-10, 10),
        liver_bottom_z=organs["dome_right_z"] - u(110, 150) * sz,
        hu=hu,
        lung_gradient_hu=u(20, 50),
    )


def _draw_trunk(u: Callable[[float, float], float], size: float, sx: float, sy: float) -> dict:
    """Body outline, subcutaneous fat and the cavity inside the body wall (`_Anatomy` fields).

    The cavity is what is left of the body after fat and a muscle wall that is thicker at the
    back (paraspinal muscles), so its centre `cav_yc` sits anterior of the body's.
    """
    body_a, body_b = 135.0 * sx, 100.0 * sy
    fat_lat = u(5.0, 20.0) * size
    fat_ap = fat_lat * u(0.6, 1.0)
    wall_lat, wall_ant, wall_post = u(12, 18) * size, u(12, 18) * size, u(28, 38) * size
    return {
        "body_a": body_a,
        "body_b": body_b,
        "fat_lat": fat_lat,
        "fat_ap": fat_ap,
        "cav_a": body_a - fat_lat - wall_lat,
        "cav_b": body_b - fat_ap - 0.5 * (wall_ant + wall_post),
        "cav_yc": 0.5 * (wall_ant - wall_post),
    }


def _draw_organs(
    u: Callable[[float, float], float], size: float, sx: float, sz: float, cav_yc: float, cav_b: float
) -> dict:
    """Diaphragm height, heart, spine, aorta and airways (`_Anatomy` fields).

    Drawn as a chain so the organs stay in anatomical contact: the heart sits on the right dome,
    the aortic arch above the heart, the descending aorta beside the vertebrae, the trachea in
    front of the spine with the carina at the height of the arch.
    """
    dome_right_z = u(-60, -25) * sz
    heart_axes = (u(55, 68) * size, u(42, 52) * size, u(45, 55) * sz)
    heart_z = dome_right_z - 15.0 + heart_axes[2] * u(0.85, 1.0)
    heart_centre = (u(10, 30) * sx, cav_yc - u(0.25, 0.4) * cav_b, heart_z)

    vertebra_radius = u(14, 18) * size
    spine_y = cav_yc + cav_b - u(12, 20)
    aorta_radius = u(10, 13) * size
    descending_xy = (
        vertebra_radius + aorta_radius + u(0, 6),
        spine_y - vertebra_radius * u(0.3, 0.7),
    )
    ascending_xy = (u(-4, 4), heart_centre[1] + u(0, 10))
    arch_z = heart_z + heart_axes[2] * u(0.6, 0.9)

    trachea_radius = u(7, 10) * size
    trachea_xy = (u(-6, -1), spine_y - vertebra_radius - u(14, 20))
    carina_z = arch_z + u(-10, 5)
    tx, ty = trachea_xy
    bronchus_right_end = (tx - u(30, 40) * size, ty + 5.0, carina_z - u(20, 30))
    bronchus_left_end = (tx + u(40, 50) * size, ty + 8.0, carina_z - u(35, 45))
    return {
        "dome_right_z": dome_right_z,
        "heart_centre": heart_centre,
        "heart_axes": heart_axes,
        "aorta_radius": aorta_radius,
        "ascending_xy": ascending_xy,
        "descending_xy": descending_xy,
        "arch_z": arch_z,
        "trachea_xy": trachea_xy,
        "trachea_radius": trachea_radius,
        "carina_z": carina_z,
        "bronchus_right_end": bronchus_right_end,
        "bronchus_left_end": bronchus_left_end,
        "spine_y": spine_y,
        "vertebra_radius": vertebra_radius,
    }


def _draw_tissue_hu(u: Callable[[float, float], float]) -> np.ndarray:
    """HU per label (indexed by structures.STRUCTURES); both lungs share one value. Nodules get their own
    HU each when they are placed, so the nodule entry stays 0."""
    lung_hu = u(-870, -830)
    tissue_hu = {
        "background": -1000.0,  # air
        "body": u(35, 50),
        "fat": u(-115, -85),
        "lung_left": lung_hu,
        "lung_right": lung_hu,
        "heart": u(35, 50),
        "aorta": u(35, 55),  # unenhanced blood, as in the pulmonary vessels
        "trachea": u(-1000, -980),
        "spine": u(650, 750),
        "ribs": u(450, 550),
        "liver": u(55, 65),
    }
    hu = np.zeros(max(structures.STRUCTURES.values()) + 1, np.float32)
    for name, value in tissue_hu.items():
        hu[structures.STRUCTURES[name]] = value
    hu[structures.STRUCTURES["vessel"]] = tissue_hu[
        "aorta"
    ]  # one blood pool: a vessel is as bright as a nodule
    return hu


def _affine(spec: PhantomSpec, table_offset: np.ndarray) -> np.ndarray:
    sz, sy, sx = spec.spacing
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2] = sz, sy, sx
    affine[3, 3] = 1.0
    centre_index = (np.asarray(spec.shape, np.float64) - 1.0) / 2.0
    affine[:3, 3] = table_offset - affine[:3, :3] @ centre_index
    return affine


def _patient_grid(
    affine: np.ndarray, anatomy: _Anatomy, shape: tuple[int, int, int], k0: int, k1: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient-frame (X, Y, Z) mm of the voxel centres of slices k0:k1, float32 (z, y, x)."""
    return _patient_box(affine, anatomy, (k0, 0, 0), (k1, shape[1], shape[2]))


def _patient_box(
    affine: np.ndarray, anatomy: _Anatomy, lo: tuple[int, ...], hi: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient-frame (X, Y, Z) mm of the voxel centres of the box lo:hi, float32 (z, y, x)."""
    centre = anatomy.table_offset + anatomy.shift
    # The affine is a scaled permutation, so each world axis depends on one array axis only and
    # the rotated coordinates are sums of three broadcast 1D terms (no 3D index grid needed).
    dx = affine[0, 3] + affine[0, 2] * np.arange(lo[2], hi[2]) - centre[0]
    dy = affine[1, 3] + affine[1, 1] * np.arange(lo[1], hi[1]) - centre[1]
    dz = affine[2, 3] + affine[2, 0] * np.arange(lo[0], hi[0]) - centre[2]
    rot = anatomy.rotation
    grid = []
    for axis in range(3):  # patient = rotation^T @ (world - centre)
        grid.append(
            (rot[0, axis] * dx).astype(np.float32)[None, None, :]
            + (rot[1, axis] * dy).astype(np.float32)[None, :, None]
            + (rot[2, axis] * dz).astype(np.float32)[:, None, None]
        )
    return grid[0], grid[1], grid[2]


def _segment_dist2(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, p0: tuple[float, ...], p1: tuple[float, ...]
) -> np.ndarray:
    """Squared distance (mm^2) to the segment p0-p1: a capsule is `dist2 <= radius^2`."""
    d = np.subtract(p1, p0)
    rx, ry, rz = x - p0[0], y - p0[1], z - p0[2]
    t = np.clip((rx * d[0] + ry * d[1] + rz * d[2]) * (1.0 / float(d @ d)), 0.0, 1.0)
    rx -= t * d[0]
    ry -= t * d[1]
    rz -= t * d[2]
    return rx * rx + ry * ry + rz * rz


def _arch_dist2(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: _Anatomy) -> np.ndarray:
    """Squared distance to the aortic arch: the upper half of a circle in the vertical plane
    through the ascending and descending aorta, joining both tubes at `arch_z`."""
    (x0, y0), (x1, y1) = a.ascending_xy, a.descending_xy
    mx, my = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    length = math.hypot(x1 - x0, y1 - y0)
    ex, ey = (x1 - x0) / length, (y1 - y0) / length
    along = (x - mx) * ex + (y - my) * ey
    across = (y - my) * ex - (x - mx) * ey
    up = np.maximum(z - a.arch_z, 0.0)
    radial = np.sqrt(along * along + up * up) - 0.5 * length
    dist2 = radial * radial + across * across
    dist2[z < a.arch_z] = np.inf
    return dist2


def _capsules(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    z_range: tuple[float, float],
    capsules: list[tuple[tuple[float, float, float], tuple[float, float, float], float]],
) -> tuple[np.ndarray, np.ndarray]:
    """Union of capsules (p0, p1, radius): (inside, within _HALO_MM of the surface) masks."""
    inside = np.zeros(x.shape, bool)
    halo = np.zeros(x.shape, bool)
    for p0, p1, radius in capsules:
        reach = radius + _HALO_MM
        # Skip capsules that cannot reach this slab: the distance field is the costliest step.
        if min(p0[2], p1[2]) - reach > z_range[1] or max(p0[2], p1[2]) + reach < z_range[0]:
            continue
        dist2 = _segment_dist2(x, y, z, p0, p1)
        inside |= dist2 <= radius * radius
        halo |= dist2 <= reach * reach
    return inside, halo


def _render_labels(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: _Anatomy) -> np.ndarray:
    """Structure label map; later structures overwrite earlier ones where they overlap."""
    labels = np.zeros(x.shape, np.uint8)
    taper = 1.0 - a.taper * z * (1.0 / 150.0)  # narrower toward the head
    _paint_body_wall(labels, x, y, taper, a)

    cav_a, cav_b = a.cav_a * taper, a.cav_b * taper
    cav_r2 = np.square(x / cav_a) + np.square((y - a.cav_yc) / cav_b)
    cavity = cav_r2 <= 1.0
    diaphragm = _diaphragm_z(x, y, a)
    thorax = cavity & (z > diaphragm)
    labels[thorax] = structures.STRUCTURES["fat"]  # mediastinal fat between the organs painted below

    heart_q = _heart_quadric(x, y, z, a)
    heart = (heart_q <= 1.0) & (z > diaphragm + 3.0) & (cav_r2 <= 0.92)
    # Aorta and airways are unions of capsules (plus the arch), with a 4 mm halo kept free of lung.
    z_range = (float(z.min()), float(z.max()))
    aorta, aorta_halo = _aorta(x, y, z, z_range, a)
    trachea, trachea_halo = _airways(x, y, z, z_range, a)
    spine_r2 = np.square(x) + np.square(y - a.spine_y)

    # Lungs fill the thorax above the diaphragm and below the apices, except a soft-tissue margin
    # around the mediastinal organs (so lungs never touch heart, vessels or airways directly).
    lung = (
        thorax
        & _below_apices(x, y, z, a)
        & (np.abs(x) > a.mediastinum_half)
        & (heart_q > 1.25)  # ~10% larger ellipsoid: 5-6 mm of pericardial fat
        & ~aorta_halo
        & ~trachea_halo
        & (spine_r2 > (a.vertebra_radius + 3.0) ** 2)
    )
    labels[lung & (x > 0)] = structures.STRUCTURES["lung_left"]
    labels[lung & (x < 0)] = structures.STRUCTURES["lung_right"]

    liver = (
        cavity & (z < diaphragm - 5.0) & (z > a.liver_bottom_z) & (x < a.liver_edge_x - 0.5 * (y - a.cav_yc))
    )
    labels[liver] = structures.STRUCTURES["liver"]
    labels[heart] = structures.STRUCTURES["heart"]
    labels[aorta] = structures.STRUCTURES["aorta"]
    labels[trachea] = structures.STRUCTURES["trachea"]

    _paint_spine(labels, x, y, z, spine_r2 <= a.vertebra_radius**2, a)
    _paint_ribs(labels, x, y, z, cav_r2, a)
    return labels


def _paint_body_wall(
    labels: np.ndarray, x: np.ndarray, y: np.ndarray, taper: np.ndarray, a: _Anatomy
) -> None:
    """Subcutaneous fat, then the soft tissue inside it, as two nested rounded ellipses."""

    def rounded_ellipse(half_a: np.ndarray, half_b: np.ndarray) -> np.ndarray:
        # u^2 + v^2 - k u^2 v^2 <= 1 squares the corners of an ellipse (k = 1 is a rectangle)
        # without the cost of a superellipse's fractional powers.
        u2 = np.square(x / half_a)
        v2 = np.square(y / half_b)
        return u2 + v2 - a.body_square * u2 * v2 <= 1.0

    outer_a, outer_b = a.body_a * taper, a.body_b * taper
    labels[rounded_ellipse(outer_a, outer_b)] = structures.STRUCTURES["fat"]
    labels[rounded_ellipse(outer_a - a.fat_lat, outer_b - a.fat_ap)] = structures.STRUCTURES["body"]


def _diaphragm_z(x: np.ndarray, y: np.ndarray, a: _Anatomy) -> np.ndarray:
    """Height (patient z, mm) of the diaphragm surface above each (x, y).

    Two downward-opening paraboloid domes, deeper posteriorly; the surface is their upper
    envelope, so the right (X < 0) dome is higher where dome_right_z > dome_left_z.
    """
    dome_x, dome_rx = 0.45 * a.cav_a, 0.65 * a.cav_a
    dome_y, dome_ry = a.cav_yc - 0.15 * a.cav_b, 1.2 * a.cav_b
    v = (y - dome_y) * (1.0 / dome_ry)
    dome_common = a.dome_depth * v * v + a.dome_tilt * v
    diaphragm = np.maximum(
        a.dome_right_z - a.dome_depth * np.square((x + dome_x) * (1.0 / dome_rx)),
        a.dome_left_z - a.dome_depth * np.square((x - dome_x) * (1.0 / dome_rx)),
    )
    diaphragm -= dome_common
    return diaphragm


def _below_apices(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: _Anatomy) -> np.ndarray:
    """Voxels below the lung apices.

    Each apex is a paraboloid dome over the lung's cross-section; outside that footprint the
    lung top is flat at the dome's rim, so the apex never trims the lower lung.
    """
    apex_r2 = np.square((np.abs(x) - 0.45 * a.cav_a) * (1.0 / (0.6 * a.cav_a))) + np.square(
        (y - a.cav_yc - 0.1 * a.cav_b) * (1.0 / a.cav_b)
    )
    return z < a.apex_z - a.apex_depth * np.minimum(apex_r2, 1.0)


def _heart_quadric(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: _Anatomy) -> np.ndarray:
    """The heart ellipsoid's quadratic form: <= 1 inside. Returned rather than a mask because the
    lungs keep clear of a slightly larger level set of it (the pericardial fat)."""
    hx, hy, hz = a.heart_centre
    ha, hb, hc = a.heart_axes
    cos_h, sin_h = math.cos(a.heart_angle), math.sin(a.heart_angle)
    dxh, dyh = x - hx, y - hy
    return (
        np.square((cos_h * dxh - sin_h * dyh) * (1.0 / ha))
        + np.square((sin_h * dxh + cos_h * dyh) * (1.0 / hb))
        + np.square((z - hz) * (1.0 / hc))
    )


def _aorta(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, z_range: tuple[float, float], a: _Anatomy
) -> tuple[np.ndarray, np.ndarray]:
    """(aorta, within _HALO_MM of it) masks: ascending and descending capsules plus the arch,
    which is only evaluated on slabs that reach up to it."""
    r_a = a.aorta_radius
    (ax0, ay0), (dx0, dy0) = a.ascending_xy, a.descending_xy
    kx, ky = a.descending_drift
    drop = 400.0  # beyond any field of view
    aorta, aorta_halo = _capsules(
        x,
        y,
        z,
        z_range,
        [
            ((dx0, dy0, a.arch_z), (dx0 - kx * drop, dy0 - ky * drop, a.arch_z - drop), r_a),
            ((ax0, ay0, a.heart_centre[2]), (ax0, ay0, a.arch_z), r_a),
        ],
    )
    if z_range[1] >= a.arch_z:
        arch_d2 = _arch_dist2(x, y, z, a)
        aorta |= arch_d2 <= r_a**2
        aorta_halo |= arch_d2 <= (r_a + _HALO_MM) ** 2
    return aorta, aorta_halo


def _airways(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, z_range: tuple[float, float], a: _Anatomy
) -> tuple[np.ndarray, np.ndarray]:
    """(trachea and main bronchi, within _HALO_MM of them) masks, as capsules from the carina."""
    r_t = a.trachea_radius
    carina = (a.trachea_xy[0], a.trachea_xy[1], a.carina_z)
    # The trachea runs slightly anteriorly on its way up to the neck.
    trachea_top = (a.trachea_xy[0], a.trachea_xy[1] - 20.0, a.carina_z + 300.0)
    return _capsules(
        x,
        y,
        z,
        z_range,
        [
            (carina, trachea_top, r_t),
            (carina, a.bronchus_right_end, 0.75 * r_t),
            (carina, a.bronchus_left_end, 0.7 * r_t),
        ],
    )


def _paint_spine(
    labels: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    vertebral_body: np.ndarray,
    a: _Anatomy,
) -> None:
    phase = (z - a.vertebra_phase) * (1.0 / a.vertebra_pitch)
    disc = np.abs(phase - np.round(phase)) * a.vertebra_pitch < 2.5
    canal_y = a.spine_y + a.vertebra_radius + a.canal_radius + 2.0
    r_c = a.canal_radius
    canal = np.square(x) + np.square(y - canal_y) <= r_c * r_c
    arch = np.square(x * (1.0 / (r_c + 6.0))) + np.square((y - canal_y) * (1.0 / (r_c + 5.0)))
    arch = arch <= 1.0
    # Processes belong to one vertebra each (gaps between levels); spinous processes also slope
    # downward going posteriorly.
    level = phase - np.floor(phase)
    spinous_phase = phase + (y - canal_y) * (0.6 / a.vertebra_pitch)
    spinous_level = spinous_phase - np.floor(spinous_phase)
    spinous = np.square(x * 0.25) + np.square((y - canal_y - r_c - 12.0) * (1.0 / 14.0))
    spinous = (spinous <= 1.0) & (np.abs(spinous_level - 0.5) < 0.25)
    transverse = np.square(x * (1.0 / (a.vertebra_radius + 14.0)))
    transverse += np.square((y - canal_y + 2.0) * 0.2)
    transverse = (transverse <= 1.0) & (np.abs(level - 0.5) < 0.25)
    labels[vertebral_body | arch | spinous | transverse] = structures.STRUCTURES["spine"]
    labels[canal | (vertebral_body & disc)] = structures.STRUCTURES["body"]


def _paint_ribs(
    labels: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, cav_r2: np.ndarray, a: _Anatomy
) -> None:
    # Distance outside the cavity along the ray from its centre: |p| (1 - 1 / rho).
    yr = y - a.cav_yc
    dist = np.sqrt(np.square(x) + np.square(yr))
    rho = np.sqrt(cav_r2)
    shell = np.abs(dist * (1.0 - 1.0 / np.maximum(rho, 1e-3)) - a.rib_offset) < a.rib_half_width
    # The rest only on the thin shell: arccos is costly on the full grid.
    zs, ys, ds = z[shell], yr[shell], dist[shell]
    # Fraction of the half-turn from the back (0) to the front (1).
    along = np.arccos(np.clip(ys / np.maximum(ds, 1e-3), -1.0, 1.0)) * (1.0 / math.pi)
    # Ribs descend from the spine to the front, so shift anterior points up by the drop.
    u = (a.rib_top_z - zs - a.rib_drop * along) * (1.0 / a.rib_pitch)
    n = np.round(u)
    rib = (np.abs(u - n) * a.rib_pitch < a.rib_half_height) & (n >= 0) & (n < _N_RIBS)
    rib &= along < a.rib_front  # no costal cartilage or sternum
    idx = np.flatnonzero(shell)[rib]
    labels.reshape(-1)[idx] = structures.STRUCTURES["ribs"]


# --------------------------------------------------------------------------------------------
# Pulmonary vessels: a tree of tapering capsules from each hilum, grown level by level and
# stopped where it would leave the lung.

_VESSEL_LEVELS = 7
_VESSEL_MIN_RADIUS_MM = 0.5
_VESSEL_RETRIES = 3


def _in_lung(points: np.ndarray, a: _Anatomy) -> np.ndarray:
    """Whether patient-frame points `(n, 3)` mm fall in a lung (the label map at those points)."""
    if len(points) == 0:
        return np.zeros(0, bool)
    x, y, z = (points[:, i].astype(np.float32) for i in range(3))
    return np.isin(_render_labels(x, y, z, a), structures.LUNGS)


def _draw_vessels(rng: np.random.Generator, a: _Anatomy) -> dict[str, np.ndarray]:
    """Vessel segments in the patient frame: {"p0", "p1": (n, 3) mm, "r0", "r1": (n,) radius
    at each end (mm), "level": (n,) 0 for the trunks leaving a hilum}.

    Six trunks per hilum (upper, posterior, lateral, anterior, lower posterior, lower anterior)
    branch in two at every level, each child 0.7-0.85 as long and as thick as its parent (close to
    Murray's law, r_child = r / 2^(1/3)) and turned 20-40 degrees away from it. A segment whose
    end would leave the lung is turned (up to `_VESSEL_RETRIES` times), then halved, then dropped;
    the tree ends below `_VESSEL_MIN_RADIUS_MM` or after `_VESSEL_LEVELS` levels.
    """
    starts, dirs, lengths, radii = [], [], [], []
    for side, end in ((-1.0, a.bronchus_right_end), (1.0, a.bronchus_left_end)):
        hilum = np.asarray(end) + np.array([0.0, rng.uniform(-10, -4), rng.uniform(-5, 5)])
        trunks = np.array(
            [
                [0.35 * side, -0.1, 1.0],
                [0.5 * side, 0.6, 0.4],
                [side, 0.0, 0.15],
                [0.8 * side, -0.5, -0.2],
                [0.4 * side, 0.5, -1.0],
                [0.45 * side, -0.6, -0.8],
            ]
        )
        trunks += rng.normal(0.0, 0.15, size=trunks.shape)
        for direction in trunks:
            starts.append(hilum)
            dirs.append(direction / np.linalg.norm(direction))
            lengths.append(rng.uniform(25, 35))
            radii.append(rng.uniform(4.5, 6.0))
    start, direction = np.asarray(starts), np.asarray(dirs)
    length, radius = np.asarray(lengths), np.asarray(radii)
    segments: dict[str, list[np.ndarray]] = {k: [] for k in ("p0", "p1", "r0", "r1", "level")}
    for level in range(_VESSEL_LEVELS):
        full = _in_lung(start + direction * length[:, None], a)
        for _ in range(_VESSEL_RETRIES):  # Turn segments that leave the lung and try again.
            turned = _turn(rng, direction[~full], 20.0, 50.0)
            ok = _in_lung(start[~full] + turned * length[~full, None], a)
            direction[np.flatnonzero(~full)[ok]] = turned[ok]
            full[np.flatnonzero(~full)[ok]] = True
        half = _in_lung(start + direction * 0.5 * length[:, None], a)
        length = np.where(full, length, np.where(half, 0.5 * length, 0.0))
        keep = length > 0
        r_end = radius * rng.uniform(0.85, 0.95, size=len(radius))
        segments["p0"].append(start[keep])
        segments["p1"].append((start + direction * length[:, None])[keep])
        segments["r0"].append(radius[keep])
        segments["r1"].append(r_end[keep])
        segments["level"].append(np.full(int(keep.sum()), level))
        # Only segments that reached their full length branch on.
        grow = full & (r_end * 0.85 >= _VESSEL_MIN_RADIUS_MM)
        n = int(grow.sum())
        if n == 0 or level == _VESSEL_LEVELS - 1:
            break
        parent = direction[grow]
        # A unit vector perpendicular to the parent: the two children turn apart in its plane.
        turn = _perpendicular(rng, parent)
        angle = np.deg2rad(rng.uniform(20, 40, size=(2, n, 1)))
        children = [
            np.cos(angle[0]) * parent + np.sin(angle[0]) * turn,
            np.cos(angle[1]) * parent - np.sin(angle[1]) * turn,
        ]
        end = (start + direction * length[:, None])[grow]
        start = np.concatenate([end, end])
        direction = np.concatenate(children)
        length = np.tile(length[grow], 2) * rng.uniform(0.7, 0.85, size=2 * n)
        radius = np.tile(r_end[grow], 2) * rng.uniform(0.7, 0.85, size=2 * n)
    return {k: np.concatenate(v) for k, v in segments.items()}


def _perpendicular(rng: np.random.Generator, direction: np.ndarray) -> np.ndarray:
    """A random unit vector perpendicular to each row of the unit vectors `direction (n, 3)`."""
    normal = np.cross(direction, rng.normal(size=direction.shape))
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-9
    return np.cross(normal, direction)


def _turn(rng: np.random.Generator, direction: np.ndarray, lo_deg: float, hi_deg: float) -> np.ndarray:
    """Unit vectors `direction (n, 3)` each turned by a random angle in [lo, hi] degrees."""
    angle = np.deg2rad(rng.uniform(lo_deg, hi_deg, size=(len(direction), 1)))
    return np.cos(angle) * direction + np.sin(angle) * _perpendicular(rng, direction)


def _tapered_dist(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float
) -> tuple[np.ndarray, np.ndarray]:
    """(distance to the segment's axis, the tapered radius at the nearest axis point), mm."""
    d = p1 - p0
    rx, ry, rz = x - p0[0], y - p0[1], z - p0[2]
    t = np.clip((rx * d[0] + ry * d[1] + rz * d[2]) * (1.0 / max(float(d @ d), 1e-9)), 0.0, 1.0)
    dist = np.sqrt(np.square(rx - t * d[0]) + np.square(ry - t * d[1]) + np.square(rz - t * d[2]))
    return dist, r0 + t * (r1 - r0)


def _paint_vessels(
    labels: np.ndarray,
    image: np.ndarray,
    spec: PhantomSpec,
    affine: np.ndarray,
    grid: tuple[np.ndarray, np.ndarray, np.ndarray],
    a: _Anatomy,
    vessels: dict[str, np.ndarray],
) -> None:
    """Paints the vessel tree into lung voxels (the trunks also into the hilar soft tissue).

    `grid`: the patient-frame (X, Y, Z) mm of every voxel. The label is "vessel" where a voxel
    centre lies inside a capsule; the image mixes blood into
    the lung by a linear partial-volume coverage over one mean voxel width, so vessels thinner
    than a voxel still show as faint, bright lines.
    """
    spacing = np.asarray(spec.spacing)
    width = float(spacing.mean())
    world_to_index = np.linalg.inv(affine)
    centre = a.table_offset + a.shift
    coverage = np.zeros(spec.shape, np.float32)
    vessel = np.zeros(spec.shape, bool)
    lungs = np.isin(labels, structures.LUNGS)
    hilar = lungs | (labels == structures.STRUCTURES["fat"]) | (labels == structures.STRUCTURES["body"])
    for p0, p1, r0, r1, level in zip(
        vessels["p0"], vessels["p1"], vessels["r0"], vessels["r1"], vessels["level"]
    ):
        ends = np.stack([p0, p1]) @ a.rotation.T + centre  # patient -> world
        index = (world_to_index[:3, :3] @ ends.T).T + world_to_index[:3, 3]  # (2, 3) (k, j, i)
        margin = (max(r0, r1) + width) / spacing
        lo = np.maximum(np.floor(index.min(axis=0) - margin).astype(int), 0)
        hi = np.minimum(np.ceil(index.max(axis=0) + margin).astype(int) + 1, spec.shape)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(int(l0), int(h0)) for l0, h0 in zip(lo, hi))
        dist, r = _tapered_dist(*(g[box] for g in grid), p0, p1, r0, r1)
        np.maximum(coverage[box], np.clip((r - dist) * (1.0 / width) + 0.5, 0.0, 1.0), out=coverage[box])
        vessel[box] |= (dist <= r) & (hilar[box] if level == 0 else lungs[box])
    mix = lungs | vessel
    c = coverage[mix]
    image[mix] = image[mix] * (1.0 - c) + a.hu[structures.STRUCTURES["vessel"]] * c
    labels[vessel] = structures.STRUCTURES["vessel"]


# --------------------------------------------------------------------------------------------
# Nodules.


def _nodule_candidate(
    placement: str,
    rng: np.random.Generator,
    pools: dict[str, np.ndarray],
    labels: np.ndarray,
    spacing: np.ndarray,
    radius: float,
) -> np.ndarray | None:
    """A continuous centre (array index) for a nodule of `placement`; None when its pool of
    voxels is empty.

    isolated: a random lung voxel; juxta_vascular: `radius * [0.4, 0.9]` from a random vessel
    voxel (so the sphere swallows part of the vessel); juxta_pleural: `radius * [0.2, 0.6]`
    inward from a random pleural voxel, along the direction to the local lung centroid.
    """
    pool = pools[placement]
    if pool.size == 0:
        return None
    voxel = np.array(np.unravel_index(pool[rng.integers(pool.size)], labels.shape), np.float64)
    if placement == "isolated":
        return voxel
    if placement == "juxta_vascular":
        direction = rng.normal(size=3)
        offset_mm = direction / np.linalg.norm(direction) * radius * rng.uniform(0.4, 0.9)
        return voxel + offset_mm / spacing
    lo = np.maximum(voxel.astype(int) - 2, 0)
    hi = voxel.astype(int) + 3
    near = np.argwhere(np.isin(labels[tuple(slice(a, b) for a, b in zip(lo, hi))], structures.LUNGS)) + lo
    inward_mm = (near.mean(axis=0) - voxel) * spacing
    norm = float(np.linalg.norm(inward_mm))
    if norm < 1e-6:  # no lung side to move to: the fit test below rejects the voxel itself
        return voxel
    return voxel + inward_mm / norm * radius * rng.uniform(0.2, 0.6) / spacing


def _nodule_fits(
    placement: str, region: np.ndarray, sphere: np.ndarray, inner: np.ndarray, centre_label: int
) -> np.ndarray | None:
    """The voxels (of the box) a nodule paints, or None where it does not fit its placement.

    Every nodule lies in one lung (vessels allowed) with a clearance shell free of other
    nodules and mediastinum; juxta-vascular ones must touch a vessel outside the sphere;
    juxta-pleural ones cover only lung (and vessel) voxels and must reach the chest wall.
    """
    if centre_label not in (*structures.LUNGS, structures.STRUCTURES["vessel"]):
        return None
    present = set(np.unique(region[inner]).tolist())
    lungs_present = present & set(structures.LUNGS)
    if len(lungs_present) != 1:
        return None
    parenchyma = lungs_present | {structures.STRUCTURES["vessel"]}
    if placement == "juxta_pleural":
        if not present <= parenchyma | {structures.STRUCTURES["body"], structures.STRUCTURES["ribs"]}:
            return None
        wall = np.isin(region, (structures.STRUCTURES["body"], structures.STRUCTURES["ribs"]))
        if not np.any(sphere & wall):
            return None
        return sphere & np.isin(region, list(parenchyma))
    if not present <= parenchyma:
        return None
    if placement == "juxta_vascular" and not np.any(
        inner & ~sphere & (region == structures.STRUCTURES["vessel"])
    ):
        return None
    return sphere


def _place_nodules(
    labels: np.ndarray, spec: PhantomSpec, affine: np.ndarray, rng: np.random.Generator
) -> list[dict]:
    """Paints nodules into `labels`; returns one dict per nodule: box, painted mask, dist2 (mm^2
    from the centre, over the box), centre (world mm), diameter (mm), type, placement (indices)."""
    spacing = np.asarray(spec.spacing)
    count = 0
    if spec.max_nodules > 0 and rng.random() < spec.nodule_probability:
        count = int(rng.integers(1, spec.max_nodules + 1))
    # One voxel diagonal of clearance keeps nodules apart as 26-connected components.
    clearance = float(np.linalg.norm(spacing)) + _NODULE_CLEARANCE_MM
    pools = {
        "isolated": np.flatnonzero(np.isin(labels, structures.LUNGS)),
        "juxta_vascular": np.flatnonzero(labels == structures.STRUCTURES["vessel"]),
        "juxta_pleural": np.flatnonzero(structures.pleura_mask(labels)),
    }
    type_p = np.asarray(spec.nodule_type_weights) / sum(spec.nodule_type_weights)
    place_p = np.asarray(spec.nodule_placement_weights) / sum(spec.nodule_placement_weights)
    log_lo, log_hi = np.log(spec.nodule_diameter_mm)
    nodules = []
    for _ in range(count):
        diameter = float(np.exp(rng.uniform(log_lo, log_hi)))
        kind = int(rng.choice(3, p=type_p))
        placement = int(rng.choice(3, p=place_p))
        radius = 0.5 * diameter
        # Sub-voxel jitter small enough that the voxel holding the centre stays inside the
        # sphere, so even the smallest nodule owns at least one mask voxel.
        max_jitter = np.minimum(0.5 * spacing, 0.4 * radius / math.sqrt(3.0))
        reach = radius + clearance
        half = np.ceil(reach / spacing).astype(int)
        for _ in range(_NODULE_TRIES):
            target = _nodule_candidate(NODULE_PLACEMENTS[placement], rng, pools, labels, spacing, radius)
            if target is None:
                break
            voxel = np.rint(target).astype(int)
            centre = voxel + rng.uniform(-1.0, 1.0, size=3) * max_jitter / spacing
            lo, hi = voxel - half, voxel + half + 1
            if np.any(lo < 0) or np.any(hi > np.asarray(spec.shape)):
                continue
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            axes = [(np.arange(a, b) - c) * s for a, b, c, s in zip(lo, hi, centre, spacing)]
            dist2 = np.square(axes[0])[:, None, None] + np.square(axes[1])[None, :, None]
            dist2 = dist2 + np.square(axes[2])[None, None, :]
            region = labels[box]
            painted = _nodule_fits(
                NODULE_PLACEMENTS[placement],
                region,
                dist2 <= radius * radius,
                dist2 <= reach * reach,
                int(labels[tuple(voxel)]),
            )
            if painted is None or not painted.any():
                continue
            region[painted] = structures.STRUCTURES["nodule"]
            nodules.append(
                {
                    "box": box,
                    "painted": painted,
                    "dist2": dist2,
                    "centre": (affine @ np.append(centre, 1.0))[:3],
                    "diameter": diameter,
                    "type": kind,
                    "placement": placement,
                }
            )
            break
    return nodules


def _paint_nodule_hu(image: np.ndarray, nodule: dict, rng: np.random.Generator) -> float:
    """Writes one nodule's intensity; returns its solid HU (solid, part-solid) or its ground-glass
    HU (ground glass). Part-solid: a solid core of 0.3-0.6 of the radius in ground glass."""
    solid_hu = float(rng.uniform(*SOLID_HU))
    glass_hu = float(rng.uniform(*GROUND_GLASS_HU))
    core = float(rng.uniform(0.3, 0.6)) * 0.5 * nodule["diameter"]
    box, painted = nodule["box"], nodule["painted"]
    kind = NODULE_TYPES[nodule["type"]]
    if kind == "solid":
        image[box][painted] = solid_hu
        return solid_hu
    image[box][painted] = glass_hu
    if kind == "part_solid":
        image[box][painted & (nodule["dist2"] <= core * core)] = solid_hu
        return solid_hu
    return glass_hu


def generate_subject(spec: PhantomSpec, seed: int, index: int) -> dict[str, np.ndarray]:
    """One synthetic subject; bit-identical for the same (spec, seed, index).

    Returns {"image": int16 HU (z, y, x), "mask": uint8 nodule mask (z, y, x) with 1 = nodule
    voxel, "labels": uint8 structure labels (z, y, x) using structures.STRUCTURES, "affine": float64 (4, 4)
    array index [k, j, i, 1] -> world mm [x, y, z, 1], "has_nodule": bool scalar array,
    "nodule_centres_mm": float32 (n, 3) world [x, y, z], "nodule_diameters_mm": float32 (n,),
    "nodule_types" and "nodule_placements": int8 (n,) indices into NODULE_TYPES and
    NODULE_PLACEMENTS, "nodule_hu": float32 (n,) the solid HU (solid, part-solid) or the
    ground-glass HU (ground glass) before blur and noise}.
    """
    rng = np.random.default_rng([seed, index])
    anatomy = _draw_anatomy(rng)
    affine = _affine(spec, anatomy.table_offset)
    labels = np.empty(spec.shape, np.uint8)
    image = np.empty(spec.shape, np.float32)
    grid = tuple(np.empty(spec.shape, np.float32) for _ in range(3))  # patient mm, for the vessels
    # Render a few slices at a time: the many elementwise steps then run on cache-sized
    # temporaries, which is several times faster than whole-volume temporaries.
    step = max(1, _SLAB_VOXELS // (spec.shape[1] * spec.shape[2]))
    for k0 in range(0, spec.shape[0], step):
        k1 = min(k0 + step, spec.shape[0])
        x, y, z = _patient_grid(affine, anatomy, spec.shape, k0, k1)
        for full, part in zip(grid, (x, y, z)):
            full[k0:k1] = part
        slab = _render_labels(x, y, z, anatomy)
        labels[k0:k1] = slab
        image[k0:k1] = anatomy.hu[slab]
        lung = (slab == structures.STRUCTURES["lung_left"]) | (slab == structures.STRUCTURES["lung_right"])
        gradient = anatomy.lung_gradient_hu / anatomy.cav_b
        image[k0:k1][lung] += gradient * (y[lung] - anatomy.cav_yc)
    _paint_vessels(labels, image, spec, affine, grid, anatomy, _draw_vessels(rng, anatomy))
    nodules = _place_nodules(labels, spec, affine, rng)
    mask = (labels == structures.STRUCTURES["nodule"]).astype(np.uint8)
    nodule_hu = [_paint_nodule_hu(image, nodule, rng) for nodule in nodules]

    if spec.blur_mm > 0:
        sigma = [spec.blur_mm / s for s in spec.spacing]
        image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")
    if spec.noise_hu > 0:
        image += rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(spec.noise_hu)
    image = np.rint(np.clip(image, HU_MIN, HU_MAX)).astype(np.int16)
    return {
        "image": image,
        "mask": mask,
        "labels": labels,
        "affine": affine,
        "has_nodule": np.array(len(nodules) > 0),
        "nodule_centres_mm": np.asarray([n["centre"] for n in nodules], np.float32).reshape(-1, 3),
        "nodule_diameters_mm": np.asarray([n["diameter"] for n in nodules], np.float32),
        "nodule_types": np.asarray([n["type"] for n in nodules], np.int8),
        "nodule_placements": np.asarray([n["placement"] for n in nodules], np.int8),
        "nodule_hu": np.asarray(nodule_hu, np.float32),
    }


def project_coronal(subject: dict) -> dict[str, np.ndarray]:
    """X-ray-like 2D view: mean HU and max nodule mask along the anterior-posterior axis (y).

    Returns {"image": int16 (z, x), "mask": uint8 (z, x), "affine": float64 (3, 3) mapping
    [k, i, 1] -> world [x_mm, z_mm, 1], "has_nodule": bool scalar array}.
    """
    image = np.rint(subject["image"].astype(np.float32).mean(axis=1)).astype(np.int16)
    mask = subject["mask"].max(axis=1).astype(np.uint8)
    a3 = np.asarray(subject["affine"], np.float64)
    # Keep the world x and z rows and the array z and x columns (plus the translation).
    affine = np.eye(3)
    affine[:2, :] = a3[np.ix_([0, 2], [0, 2, 3])]
    return {
        "image": image,
        "mask": mask,
        "affine": affine,
        "has_nodule": np.array(bool(mask.any())),
    }


def save_preview(spec: PhantomSpec, seed: int, num_subjects: int, out_path: str) -> None:
    """PNG of axial, coronal and sagittal mid-slices and the coronal projection per subject."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sz, sy, sx = spec.spacing
    window = {"cmap": "gray", "vmin": -1000, "vmax": 600, "interpolation": "nearest"}
    fig, axes = plt.subplots(num_subjects, 4, figsize=(14, 3.6 * num_subjects), squeeze=False)
    for index in range(num_subjects):
        subject = generate_subject(spec, seed, index)
        projection = project_coronal(subject)
        image = subject["image"]
        nz, ny, nx = image.shape
        # Radiological display: anterior up (axial), head up (coronal/sagittal), patient's left
        # on the image right; aspect = row spacing / column spacing keeps millimetres square.
        panels = [
            ("axial", image[nz // 2], {"aspect": sy / sx}),
            ("coronal", image[:, ny // 2], {"aspect": sz / sx, "origin": "lower"}),
            ("sagittal", image[:, :, nx // 2], {"aspect": sz / sy, "origin": "lower"}),
        ]
        for ax, (name, data, kwargs) in zip(axes[index], panels):
            ax.imshow(data, **window, **kwargs)
            ax.set_title(f"subject {index}: {name} mid-slice", fontsize=9)
        ax = axes[index, 3]
        ax.imshow(projection["image"], cmap="gray", vmin=-1000, vmax=0, aspect=sz / sx, origin="lower")
        if projection["mask"].any():
            ax.contour(projection["mask"], levels=[0.5], colors="red", linewidths=0.8)
        n = len(subject["nodule_diameters_mm"])
        ax.set_title(f"coronal projection ({n} nodule{'s' * (n != 1)}, red)", fontsize=9)
        for ax in axes[index]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"ISImed synthetic phantom (procedural, not patient data), seed {seed}, "
        f"shape {spec.shape}, spacing {spec.spacing} mm, HU window [-1000, 600]"
    )
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def structure_hu(spec: PhantomSpec, seed: int, num_subjects: int) -> dict[str, tuple[float, float, int]]:
    """{structure or nodule type: (mean HU, std HU, voxels)} over `num_subjects` generated volumes
    (blur and noise included; nodule voxels split by their nodule's type)."""
    values: dict[str, list[np.ndarray]] = {}
    for index in range(num_subjects):
        s = generate_subject(spec, seed, index)
        for name, label in structures.STRUCTURES.items():
            if name != "nodule":
                values.setdefault(name, []).append(s["image"][s["labels"] == label])
        components, _ = ndimage.label(s["mask"], structure=np.ones((3, 3, 3)))
        for centre, kind in zip(s["nodule_centres_mm"], s["nodule_types"]):
            voxel = np.rint(np.linalg.solve(s["affine"], np.append(centre, 1.0))[:3]).astype(int)
            name = f"nodule ({NODULE_TYPES[kind].replace('_', '-')})"
            values.setdefault(name, []).append(s["image"][components == components[tuple(voxel)]])
    out = {}
    for name, parts in values.items():
        v = np.concatenate(parts).astype(np.float64)
        if v.size:
            out[name] = (float(v.mean()), float(v.std()), int(v.size))
    return out


def save_montage(spec: PhantomSpec, seed: int, index: int, out_path: str, slices: int = 5) -> None:
    """PNG of one subject: axial slices from base to apex, HU on top, structure labels below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colors

    s = generate_subject(spec, seed, index)
    lung = np.isin(s["labels"], (structures.STRUCTURES["lung_left"], structures.STRUCTURES["lung_right"]))
    ks = np.flatnonzero(lung.any(axis=(1, 2)))
    if s["mask"].any():  # one slice through a nodule
        nodule_k = int(np.argmax(s["mask"].sum(axis=(1, 2))))  # the slice with most nodule
        ks = np.unique(np.append(np.linspace(ks[0], ks[-1], slices - 1).round(), nodule_k))
    else:
        ks = np.linspace(ks[0], ks[-1], slices).round()
    names = list(structures.STRUCTURES)
    palette = {
        "background": "black",
        "body": "#c8a07a",
        "fat": "#f2dc8c",
        "lung_left": "#9ecae1",
        "lung_right": "#6baed6",
        "heart": "#b2182b",
        "aorta": "#ef6548",
        "trachea": "#4d4d4d",
        "spine": "white",
        "ribs": "#d9d9d9",
        "liver": "#8c510a",
        "nodule": "#00ff00",
        "vessel": "#e7298a",
    }
    cmap = colors.ListedColormap([palette.get(name, "grey") for name in names])
    sz, sy, sx = spec.spacing
    fig, axes = plt.subplots(2, len(ks), figsize=(3.2 * len(ks), 6.8), squeeze=False)
    for col, k in enumerate(ks.astype(int)):
        axes[0, col].imshow(s["image"][k], cmap="gray", vmin=-1000, vmax=400, aspect=sy / sx)
        axes[0, col].set_title(f"slice {k} (z index), HU [-1000, 400]", fontsize=8)
        axes[1, col].imshow(
            s["labels"][k],
            cmap=cmap,
            vmin=-0.5,
            vmax=len(names) - 0.5,
            aspect=sy / sx,
            interpolation="nearest",
        )
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [matplotlib.patches.Patch(color=cmap(i), label=name) for i, name in enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=7, fontsize=8)
    kinds = [
        f"{NODULE_TYPES[t]} {NODULE_PLACEMENTS[p]} {d:.0f} mm"
        for t, p, d in zip(s["nodule_types"], s["nodule_placements"], s["nodule_diameters_mm"])
    ]
    fig.suptitle(
        f"Synthetic phantom (procedural, not patient data), seed {seed}, subject {index}, "
        f"shape {spec.shape}, spacing {spec.spacing} mm; nodules: {', '.join(kinds) or 'none'}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(out_path, dpi=90)
    plt.close(fig)


def _main(argv: list[str]) -> None:
    from absl import flags

    del argv
    cfg = flags.FLAGS
    spec = PhantomSpec()
    start = time.perf_counter()
    for index in range(cfg.num_subjects):
        subject = generate_subject(spec, cfg.seed, index)
        print(
            f"subject {index}: nodules {len(subject['nodule_diameters_mm'])}, "
            f"diameters {np.round(subject['nodule_diameters_mm'], 1).tolist()} mm"
        )
    elapsed = time.perf_counter() - start
    print(f"{cfg.num_subjects / elapsed:.1f} volumes/s at shape {spec.shape}")
    if cfg.preview:
        save_preview(spec, cfg.seed, cfg.num_subjects, cfg.out)
        print(f"wrote {cfg.out}")
    if cfg.montage:
        save_montage(spec, cfg.seed, cfg.montage_index, cfg.montage)
        print(f"wrote {cfg.montage}")
    if cfg.hu_table:
        print("| structure | mean HU | std HU | voxels |\n|---|---|---|---|")
        for name, (mean, std, n) in structure_hu(spec, cfg.seed, cfg.num_subjects).items():
            print(f"| {name} | {mean:.0f} | {std:.0f} | {n} |")


if __name__ == "__main__":
    from absl import app
    from absl import flags

    flags.DEFINE_bool("preview", False, "Write a PNG of mid-slices and projections.")
    flags.DEFINE_string("out", "phantom_preview.png", "Path of the preview PNG.")
    flags.DEFINE_integer("num_subjects", 3, "Number of subjects to generate.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_string("montage", None, "Path of a PNG of one subject's axial slices and labels.")
    flags.DEFINE_integer("montage_index", 0, "Subject shown by --montage.")
    flags.DEFINE_bool("hu_table", False, "Print mean and std HU per structure over the subjects.")
    app.run(_main)

"""Voxel <-> world-millimetre geometry, crop boxes and pairwise distances.

Conventions: an image array has `ndim` spatial axes (2 or 3) in array order. Its affine is an
`(ndim + 1, ndim + 1)` homogeneous matrix mapping an array index `[i_0, ..., i_{ndim-1}, 1]` to
world millimetres, as in NIfTI (`img.affine`) and DICOM (direction * spacing, origin). A voxel
index refers to the voxel *centre*, so a crop starting at `s` with size `c` has its centre at
index `s + (c - 1) / 2`.

All functions here are pure numpy so that they can be tested against brute force and used inside
grain workers; `isimed.losses` owns the jnp distances used in the training step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def affine_from_spacing(
    spacing: Sequence[float],
    origin: Sequence[float] | None = None,
    direction: np.ndarray | None = None,
) -> np.ndarray:
    """Homogeneous affine from per-axis spacing (mm), origin (mm) and a direction-cosine matrix.

    `direction[:, a]` is the unit world vector of array axis `a` (DICOM/ITK convention).
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    check_spacing(spacing)
    ndim = spacing.shape[0]
    direction = np.eye(ndim) if direction is None else np.asarray(direction, np.float64)
    origin = np.zeros(ndim) if origin is None else np.asarray(origin, np.float64)
    if direction.shape != (ndim, ndim) or origin.shape != (ndim,):
        raise ValueError(
            f"direction {direction.shape} and origin {origin.shape} do not match {ndim} spacings"
        )
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = direction * spacing[None, :]
    affine[:ndim, ndim] = origin
    return affine


def check_spacing(spacing: Sequence[float] | np.ndarray, where: str = "image") -> None:
    """Raises ValueError unless every spacing is finite and > 0."""
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.ndim != 1 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"{where}: voxel spacing must be finite and > 0 mm, got {spacing.tolist()}")


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    """Per-array-axis voxel size in mm: the lengths of the affine's columns."""
    affine = np.asarray(affine, dtype=np.float64)
    ndim = affine.shape[0] - 1
    return np.linalg.norm(affine[:ndim, :ndim], axis=0)


def check_affine(affine: np.ndarray, ndim: int, where: str = "image") -> None:
    """Raises ValueError for a malformed or singular affine (zero spacing, NaN)."""
    affine = np.asarray(affine)
    if affine.shape != (ndim + 1, ndim + 1):
        raise ValueError(f"{where}: affine must be {(ndim + 1, ndim + 1)}, got {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise ValueError(f"{where}: affine has non-finite entries")
    check_spacing(spacing_from_affine(affine), where)
    if abs(np.linalg.det(affine[:ndim, :ndim])) < 1e-12:
        raise ValueError(f"{where}: affine is singular (collinear axes)")


def voxel_to_world(index: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Array indices `(..., ndim)` (fractional allowed) -> world millimetres `(..., ndim)`."""
    index = np.asarray(index, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    ndim = affine.shape[0] - 1
    return index @ affine[:ndim, :ndim].T + affine[:ndim, ndim]


def world_to_voxel(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World millimetres `(..., ndim)` -> fractional array indices `(..., ndim)`."""
    points = np.asarray(points, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    ndim = affine.shape[0] - 1
    return np.linalg.solve(affine[:ndim, :ndim], (points - affine[:ndim, ndim]).T).T


def check_crop_fits(image_shape: Sequence[int], crop_shape: Sequence[int], where: str = "image") -> None:
    """Raises ValueError naming both sizes when a crop does not fit inside the image."""
    if len(image_shape) != len(crop_shape):
        raise ValueError(
            f"{where}: crop {tuple(crop_shape)} has {len(crop_shape)} axes but the image "
            f"{tuple(image_shape)} has {len(image_shape)}"
        )
    if any(c > s for c, s in zip(crop_shape, image_shape)) or any(c < 1 for c in crop_shape):
        raise ValueError(
            f"{where}: crop size {tuple(crop_shape)} does not fit in image of size {tuple(image_shape)}"
        )


def box_fractions(mask: np.ndarray, crop_shape: Sequence[int]) -> np.ndarray:
    """Fraction of `mask` voxels inside every valid crop position.

    Returns an array of shape `image_shape - crop_shape + 1` whose entry at `s` is the mean of
    `mask` over the crop starting at `s`. One summed-area table makes this O(voxels), so crops can
    be drawn exactly uniformly over all positions that satisfy a foreground constraint.
    """
    mask = np.asarray(mask, dtype=np.float64)
    check_crop_fits(mask.shape, crop_shape)
    table = np.pad(mask, [(1, 0)] * mask.ndim)
    for axis in range(mask.ndim):
        table = np.cumsum(table, axis=axis)
    ndim = mask.ndim
    total = np.zeros([s - c + 1 for s, c in zip(mask.shape, crop_shape)])
    # Inclusion-exclusion over the 2^ndim corners of each box.
    for corner in np.ndindex(*([2] * ndim)):
        sl = tuple(
            slice(c, c + n) if bit else slice(0, n) for bit, c, n in zip(corner, crop_shape, total.shape)
        )
        sign = (-1) ** (ndim - sum(corner))
        total += sign * table[sl]
    return total / float(np.prod(crop_shape))


def sample_crop_starts(
    rng: np.random.Generator,
    image_shape: Sequence[int],
    crop_shape: Sequence[int],
    num_crops: int,
    foreground: np.ndarray | None = None,
    min_foreground: float = 0.0,
    where: str = "image",
) -> np.ndarray:
    """Draws `num_crops` crop start indices `(num_crops, ndim)` uniformly over valid positions.

    With `foreground` (a boolean mask of the image) and `min_foreground > 0`, only positions whose
    crop contains at least that fraction of foreground voxels are eligible, and each eligible
    position is equally likely. Crops are drawn with replacement.
    """
    image_shape = tuple(int(s) for s in image_shape)
    crop_shape = tuple(int(c) for c in crop_shape)
    check_crop_fits(image_shape, crop_shape, where)
    ranges = np.array([s - c + 1 for s, c in zip(image_shape, crop_shape)])
    if foreground is None or min_foreground <= 0:
        return rng.integers(0, ranges, size=(num_crops, len(ranges)))
    fractions = box_fractions(foreground, crop_shape)
    eligible = np.flatnonzero(fractions.ravel() >= min_foreground - 1e-9)
    if eligible.size == 0:
        raise ValueError(
            f"{where}: no {crop_shape} crop contains >= {min_foreground:.0%} foreground "
            f"(best: {fractions.max():.0%}); lower min_foreground or check the foreground mask"
        )
    chosen = rng.choice(eligible, size=num_crops, replace=True)
    return np.stack(np.unravel_index(chosen, fractions.shape), axis=-1)


def crop_centres_index(starts: np.ndarray, crop_shape: Sequence[int]) -> np.ndarray:
    """Fractional array index of each crop's centre."""
    return np.asarray(starts, np.float64) + (np.asarray(crop_shape, np.float64) - 1.0) / 2.0


def crop_centres_mm(starts: np.ndarray, crop_shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World-millimetre centre `(n, ndim)` of each crop starting at `starts`."""
    return voxel_to_world(crop_centres_index(starts, crop_shape), affine)


def extract_crops(image: np.ndarray, starts: np.ndarray, crop_shape: Sequence[int]) -> np.ndarray:
    """Crops `(n, *crop_shape)` of `image` starting at `starts` `(n, ndim)`."""
    crop_shape = tuple(int(c) for c in crop_shape)
    out = np.empty((len(starts), *crop_shape), dtype=image.dtype)
    for n, start in enumerate(starts):
        out[n] = image[tuple(slice(s, s + c) for s, c in zip(start, crop_shape))]
    return out


def rotation(degrees: Sequence[float] | np.ndarray) -> np.ndarray:
    """Rotation matrix of angles in degrees: one angle (2D), or angles about the x, y, z axes
    (3D, R = Rz Ry Rx)."""
    a = np.deg2rad(np.asarray(degrees, np.float64).reshape(-1))
    c, s = np.cos(a), np.sin(a)
    if len(a) == 1:
        return np.array([[c[0], -s[0]], [s[0], c[0]]])
    if len(a) != 3:
        raise ValueError(f"rotation takes 1 (2D) or 3 (3D) angles, got {len(a)}")
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotated_crops(
    image: np.ndarray,
    starts: np.ndarray,
    crop_shape: Sequence[int],
    affine: np.ndarray,
    rotations: np.ndarray,
) -> np.ndarray:
    """Crops `(n, *crop_shape)` float32 of `image`, each rotated in world mm about its centre:
    crop voxel j (at world p_j when unrotated, crop centre c) shows the image at c + R (p_j - c),
    linearly interpolated, the nearest edge voxel outside the image. The centre stays where it is,
    so `crop_centres_mm` still holds; anisotropic voxels and the affine's directions are honoured.

    Args:
      rotations: `(n, ndim, ndim)` world-frame rotation matrices (`rotation`).
    """
    from scipy import ndimage  # Only the rotation augmentation needs it.

    crop = np.asarray(crop_shape, np.float64)
    ndim = len(crop)
    linear = np.asarray(affine, np.float64)[:ndim, :ndim]
    # In index space the rotation is M^-1 R M (M: the affine's linear part), about the centre.
    in_index = np.linalg.inv(linear) @ np.asarray(rotations, np.float64) @ linear  # (n, d, d)
    offsets = np.stack(np.meshgrid(*[np.arange(c) for c in crop], indexing="ij"), -1).reshape(-1, ndim)
    offsets = offsets - (crop - 1.0) / 2.0  # (m, d) about the crop centre
    centres = crop_centres_index(starts, crop_shape)  # (n, d)
    coords = centres[:, None, :] + np.einsum("nij,mj->nmi", in_index, offsets)  # (n, m, d)
    values = ndimage.map_coordinates(
        np.asarray(image, np.float32), coords.reshape(-1, ndim).T, order=1, mode="nearest"
    )
    return values.reshape(len(centres), *crop_shape).astype(np.float32)


def pairwise_distances(points: np.ndarray) -> np.ndarray:
    """Euclidean distance matrix `(n, n)` of points `(n, d)` (float64 numpy reference)."""
    points = np.asarray(points, dtype=np.float64)
    diff = points[:, None, :] - points[None, :, :]
    return np.sqrt(np.sum(diff * diff, axis=-1))

"""Readers for real medical images: NIfTI, NRRD, DICOM series and MedMNIST npz.

Every reader returns an image array and an affine, with one set of conventions whatever the format:

- **Array order.** The spatial axes are in the file's own index order, as nibabel gives them:
  NIfTI `(i, j, k)`, NRRD in its header's axis order (fastest first), and DICOM
  `(column, row, slice)` -- a slice's pixel `(row r, column c)` is voxel `[c, r, k]`, as in
  nibabel and dcm2niix -- with slices sorted along the slice normal.
- **Affine.** `(ndim + 1, ndim + 1)` float64 mapping an array index (voxel centre) to world
  millimetres in nibabel's **RAS+** frame (+x towards the patient's Right, +y Anterior,
  +z Superior). DICOM and NRRD files in LPS are converted by negating the first two world axes,
  so one image stored as NIfTI, NRRD or DICOM gets the same world coordinates.
- **Dtype.** The stored type in native byte order, after the file's intensity scaling: NIfTI
  scl_slope/inter as nibabel applies it, DICOM RescaleSlope/Intercept (int16/int32 when the
  scaling is integral, e.g. CT HU, else float32).
- **2D.** `ndim=2` accepts a file with one slice (e.g. shape `(X, Y, 1)`) and returns a 2D array
  whose 3x3 affine gives in-plane millimetre coordinates: the slice plane's own orthonormal
  frame, so distances between pixels are exact whatever the slice orientation.

Bad input (unreadable or truncated file, a header declaring more data than the file holds, wrong
rank (a 2D file where 3D is expected, several volumes), NaN voxels, zero, negative or non-finite
spacing, nearly collinear axes, mask not matching its image) raises ValueError naming the file and
the problem; running out of memory raises MemoryError naming the file. No reader ever unpickles.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
import zipfile
import zlib

import numpy as np

from isimed import geometry

# Negating world x and y turns DICOM/ITK's LPS frame into nibabel's RAS frame (and back).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm",)
MEDMNIST_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}
# |det| of the affine's axes over the product of their lengths: 1 for perpendicular axes, the
# product of sines for oblique ones (a 30 degree gantry tilt: 0.87). Below this the grid is
# nearly flat (axes within ~0.6 degrees of a plane): a corrupt orientation, not a real scan.
MIN_AXES_VOLUME = 1e-2
# Deflate (gzip) never compresses more than 1032:1, so a .nii.gz header declaring more data than
# that is corrupt; refusing it up front avoids allocating what the header claims.
GZIP_MAX_RATIO = 1032


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; compare fields instead.
class Volume:
    """An image with its geometry.

    image:  spatial array in the file's array-index order (see the module docstring), native dtype.
    affine: `(ndim + 1, ndim + 1)` float64, array index -> world millimetres, RAS+ (nibabel's
            convention; LPS sources are converted).
    source: the file or folder the image came from (used in error messages).
    mask:   optional label array of the same shape and on the same grid as `image` (its own dtype,
            label values as stored).
    """

    image: np.ndarray
    affine: np.ndarray
    source: str
    mask: np.ndarray | None = None


# ---------------------------------------------------------------------------------------------
# Dispatch


def read_image(path: str, *, ndim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """`(array, affine)` of one image file or DICOM folder, dispatched on the name.

    `.nii`/`.nii.gz`: nibabel; `.nrrd`/`.nhdr`: pynrrd; a directory: one DICOM series; `.dcm`: a
    single DICOM slice. The affine is RAS+ (see the module docstring).
    """
    path = os.fspath(path)
    _check_ndim(ndim)
    try:
        if os.path.isdir(path):
            return _finish(*read_dicom_series(path), ndim=ndim, path=path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or folder")
        lower = path.lower()
        if lower.endswith(NIFTI_SUFFIXES):
            return read_nifti(path, ndim=ndim)
        if lower.endswith(NRRD_SUFFIXES):
            return read_nrrd(path, ndim=ndim)
        if lower.endswith(DICOM_SUFFIXES):
            return _finish(*read_dicom_series(path), ndim=ndim, path=path)
    except MemoryError as e:  # A bare MemoryError names nothing.
        raise MemoryError(f"{path}: not enough memory to read this image ({e or 'allocation failed'})") from e
    raise ValueError(
        f"{path}: unknown image format; supported: {', '.join(NIFTI_SUFFIXES + NRRD_SUFFIXES)}, "
        f"{', '.join(DICOM_SUFFIXES)} files and folders of DICOM files"
    )


def read_volume(image_path: str, mask_path: str | None = None, *, ndim: int = 3) -> Volume:
    """Reads an image and optionally its label mask, checking that both lie on the same grid.

    The mask must have the image's shape and an affine equal to the image's within 1e-3 mm.
    """
    image, affine = read_image(image_path, ndim=ndim)
    mask = None
    if mask_path is not None:
        mask, mask_affine = read_image(mask_path, ndim=ndim)
        if mask.shape != image.shape:
            raise ValueError(
                f"mask {mask_path} has shape {mask.shape} but image {image_path} has {image.shape}"
            )
        if not np.allclose(mask_affine, affine, rtol=0.0, atol=1e-3):
            raise ValueError(
                f"mask {mask_path} is not on the grid of image {image_path}: affines differ by up "
                f"to {np.max(np.abs(mask_affine - affine)):.4g} mm\nimage:\n{affine}\nmask:\n{mask_affine}"
            )
    return Volume(image=image, affine=affine, source=os.fspath(image_path), mask=mask)


def _check_ndim(ndim: int) -> None:
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")


def _finish(array: np.ndarray, affine: np.ndarray, *, ndim: int, path: str):
    """3D array + 4x4 affine -> the requested `ndim`, validated."""
    array, affine = _to_ndim(array, affine, ndim, path)
    if not array.dtype.isnative:  # Big-endian files: downstream code expects native byte order.
        array = array.astype(array.dtype.newbyteorder("="))
    _validate(array, affine, path)
    return array, affine


def _to_ndim(array: np.ndarray, affine: np.ndarray, ndim: int, path: str):
    """Squeezes trailing singleton axes down to `ndim` spatial axes.

    `affine` describes the first three axes of `array`. Axes beyond the third must be singletons
    (a 4D series with several volumes is refused rather than silently taking one volume).
    """
    _check_ndim(ndim)
    shape = array.shape
    if ndim == 3 and array.ndim < 3:
        raise ValueError(
            f"{path}: expected a 3D image but the file holds a {array.ndim}D image of shape {shape}; "
            "read 2D images with ndim=2 (prepare: --ndim=2)"
        )
    while array.ndim < 3:  # A 2D file is a one-slice volume in its own frame.
        array = array[..., None]
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim > 3:
        raise ValueError(
            f"{path}: expected a {ndim}D image but the file holds shape {shape} "
            f"({int(np.prod(shape[3:]))} volumes); split it into 3D files first"
        )
    if ndim == 3:
        return array, np.asarray(affine, np.float64)
    if array.shape[2] != 1:
        raise ValueError(f"{path}: expected a 2D image (one slice) but the file holds shape {shape}")
    return array[:, :, 0], _in_plane_affine(affine, path)


def _in_plane_affine(affine: np.ndarray, path: str) -> np.ndarray:
    """3x3 affine of the plane k = 0 in its own orthonormal frame.

    Axis 0 of the 2D world runs along array axis 0; axis 1 is perpendicular to it within the slice
    plane, on the side of array axis 1. The origin is the slice origin projected into that frame,
    so slices of one series (same orientation) share one 2D frame.
    """
    cols = np.asarray(affine, np.float64)[:3, :2]
    geometry.check_spacing(np.linalg.norm(cols, axis=0), path)
    basis, upper = np.linalg.qr(cols)
    basis = basis * np.sign(np.diag(upper))[None, :]  # Make the frame follow the array axes.
    out = np.eye(3)
    out[:2, :2] = basis.T @ cols
    out[:2, 2] = basis.T @ np.asarray(affine, np.float64)[:3, 3]
    return out


def check_axes(affine: np.ndarray, where: str) -> None:
    """ValueError unless the affine's axes span a proper grid (see MIN_AXES_VOLUME): on a nearly
    flat grid voxels far apart in the array lie almost on top of each other in the world, so the
    physical distances the training targets are made of would be nonsense."""
    ndim = np.asarray(affine).shape[0] - 1
    geometry.check_affine(affine, ndim, where)
    axes = np.asarray(affine, np.float64)[:ndim, :ndim]
    volume = abs(np.linalg.det(axes)) / np.prod(np.linalg.norm(axes, axis=0))
    if volume < MIN_AXES_VOLUME:
        raise ValueError(
            f"{where}: the affine's axes are nearly collinear (|det| / product of spacings = "
            f"{volume:.2g}, at least {MIN_AXES_VOLUME:g} expected): a corrupt orientation; "
            f"axes (columns): {np.round(axes, 6).tolist()}"
        )


def _validate(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    """Zero/non-finite spacing, (nearly) singular axes, empty arrays and NaN voxels -> ValueError."""
    check_axes(affine, path)
    if array.size == 0:
        raise ValueError(f"{path}: image is empty, shape {array.shape}")
    if np.issubdtype(array.dtype, np.inexact):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise ValueError(f"{path}: image has {bad} NaN/inf voxels out of {array.size}")


# ---------------------------------------------------------------------------------------------
# NIfTI


def read_nifti(path: str, *, ndim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """`(array, affine)` of a `.nii` / `.nii.gz` file via nibabel.

    The affine is `img.affine` (sform or qform as nibabel resolves them; already RAS+). Header
    scaling (scl_slope/inter) is applied; without it the stored dtype is kept. Trailing singleton
    axes are dropped, e.g. `(X, Y, Z, 1)` -> `(X, Y, Z)`.
    """
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    path = os.fspath(path)
    errors = (OSError, EOFError, zlib.error, ValueError, ImageFileError, HeaderDataError)
    try:
        img = nib.load(path, mmap=False)  # The header only; the data is read below.
    except FileNotFoundError:
        raise
    except errors as e:
        raise _nifti_error(path, e) from e
    _check_declared_size(img, path)
    try:
        array = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, np.float64)
    except errors as e:
        raise _nifti_error(path, e) from e
    return _finish(array, affine, ndim=ndim, path=path)


def _nifti_error(path: str, e: Exception) -> ValueError:
    return ValueError(f"{path}: cannot read NIfTI (truncated or corrupt file?): {type(e).__name__}: {e}")


def _check_declared_size(img, path: str) -> None:
    """ValueError when the header declares more data than the file can hold: a truncated file or
    a corrupt header, found before nibabel allocates what the header claims."""
    shape = tuple(int(n) for n in img.shape)
    dtype = np.dtype(img.get_data_dtype())
    declared = math.prod(shape) * dtype.itemsize
    size = os.path.getsize(path)
    if path.lower().endswith(".gz"):
        if declared > GZIP_MAX_RATIO * size:
            raise ValueError(
                f"{path}: header declares shape {shape} of {dtype} ({_bytes(declared)}), more than a "
                f"{_bytes(size)} gzip file can hold (at most {GZIP_MAX_RATIO}:1): a corrupt header"
            )
        return
    # The proxy keeps the file's data offset (the loaded header's own is reset to 0).
    available = size - int(getattr(img.dataobj, "offset", img.header["vox_offset"]))
    if declared > available:
        raise ValueError(
            f"{path}: header declares shape {shape} of {dtype} ({_bytes(declared)}) but the file "
            f"holds {_bytes(max(available, 0))} of image data: truncated file or corrupt header"
        )


def _bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# ---------------------------------------------------------------------------------------------
# NRRD

# `space` values whose world frame is LPS-like; their first two axes are negated to get RAS.
_NRRD_SPACE_FLIPS = {
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
}


def read_nrrd(path: str, *, ndim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """`(array, affine)` of a `.nrrd` / `.nhdr` file via pynrrd.

    Axes are in the header's order (pynrrd's default Fortran index order, the same as nibabel's).
    The affine's columns are the `space directions` of the spatial axes and its translation the
    `space origin` (zero if absent). `space` left-posterior-superior (LPS, what Slicer and ITK
    write) and left-anterior-superior are converted to RAS by negating the flipped world axes;
    RAS is kept; other spaces (scanner-xyz, 3D-right-handed, ...) are taken as they are. Without
    `space directions`, per-axis `spacings` give a diagonal affine. Non-spatial axes (direction
    `none`, e.g. a vector or list axis) must have size 1.
    """
    import nrrd

    path = os.fspath(path)
    try:
        data, header = nrrd.read(path)
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error, ValueError, nrrd.NRRDError) as e:
        raise ValueError(
            f"{path}: cannot read NRRD (truncated or corrupt file?): {type(e).__name__}: {e}"
        ) from e
    data = np.asarray(data)
    spatial, affine = _nrrd_geometry(header, data.ndim, path)
    others = [a for a in range(data.ndim) if a not in spatial]
    if any(data.shape[a] != 1 for a in others):
        raise ValueError(
            f"{path}: expected a {ndim}D image but the file holds shape {data.shape} with "
            f"non-spatial axes {others} (no spacing or direction: NaN; kinds {header.get('kinds')})"
        )
    array = data.transpose(spatial + others).reshape([data.shape[a] for a in spatial])
    return _finish(array, affine, ndim=ndim, path=path)


def _nrrd_geometry(header: dict, rank: int, path: str) -> tuple[list[int], np.ndarray]:
    """(spatial axes, 4x4 RAS+ affine over them) from a pynrrd header.

    A 2D image becomes a one-slice volume whose third column is the unit slice normal, so that
    all formats reach `_finish` as 3D.
    """
    # NaN (pynrrd's "none") marks a non-spatial axis; any other non-finite value is an error.
    directions = header.get("space directions")
    if directions is not None:
        directions = np.asarray(directions, np.float64)
        spatial = [a for a in range(rank) if not np.all(np.isnan(directions[a]))]
        matrix = directions[spatial].T  # Column a: world step of spatial axis a.
        if not np.all(np.isfinite(matrix)):
            raise ValueError(f"{path}: bad 'space directions' {directions.tolist()} (non-finite)")
    elif header.get("spacings") is not None:
        spacings = np.asarray(header["spacings"], np.float64)
        spatial = [a for a in range(rank) if not np.isnan(spacings[a])]
        # A spacing is a size: negative or infinite is an error, not a flip (directions flip).
        geometry.check_spacing(spacings[spatial], path)
        matrix = np.diag(spacings[spatial])
    else:
        raise ValueError(
            f"{path}: NRRD header has neither 'space directions' nor 'spacings'; the voxel "
            f"spacing is unknown (header keys: {sorted(header)})"
        )
    space_dim, n = matrix.shape
    if n not in (2, 3) or space_dim not in (n, 3):
        raise ValueError(f"{path}: {n} spatial axes in a {space_dim}D space are not supported")
    origin = np.asarray(header.get("space origin", np.zeros(space_dim)), np.float64)
    if origin.shape != (space_dim,) or not np.all(np.isfinite(origin)):
        raise ValueError(f"{path}: bad 'space origin' {origin.tolist()}")
    geometry.check_spacing(np.linalg.norm(matrix, axis=0), path)
    affine = np.eye(4)
    affine[:space_dim, :n] = matrix
    affine[:space_dim, 3] = origin
    if n == 2:
        normal = np.cross(affine[:3, 0], affine[:3, 1])
        affine[:3, 2] = normal / max(np.linalg.norm(normal), 1e-12)
    space = str(header.get("space", "")).lower()
    if space in _NRRD_SPACE_FLIPS:
        affine = np.diag([*_NRRD_SPACE_FLIPS[space], 1.0]) @ affine
    return spatial, affine


# ---------------------------------------------------------------------------------------------
# DICOM


def read_dicom_series(path_or_dir: str, *, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(array, affine)` of one DICOM series: a folder of single-frame slices, or one `.dcm` file.

    Array order `(column, row, slice)`: pixel `(r, c)` of the k-th slice is voxel `[c, r, k]`.
    Slices are sorted by ImagePositionPatient projected on the slice normal (the cross product of
    the two ImageOrientationPatient rows). The slice spacing comes from those positions, never
    from SliceThickness (which is the slab width, not the distance between slices); the gaps must
    be uniform within 1%. RescaleSlope/Intercept is applied per slice (PET often varies it). The
    affine is built from ImageOrientationPatient, PixelSpacing and ImagePositionPatient in LPS and
    returned in RAS+. Its slice column is the mean step between slice positions, so every slice's
    position is reproduced exactly (also for tilted-gantry series).

    A folder: every file in it (not its subfolders) is tried; files that are not DICOM and DICOM
    files without pixel data (DICOMDIR, reports) are skipped, and the count is reported with a
    warning. Several SeriesInstanceUIDs -> ValueError listing them unless `series_uid` picks one.

    A single `.dcm` file (or a folder with one slice) gives a one-slice volume; only there the
    third axis spacing is SliceThickness (1 mm if absent: it does not affect any distance within
    the slice), and a missing orientation/position (e.g. a radiograph) defaults to identity/zero.
    """
    import pydicom  # noqa: F401  (fail early with a clear ImportError)

    path = os.fspath(path_or_dir)
    if os.path.isdir(path):
        slices = _read_series_folder(path, series_uid)
    elif os.path.isfile(path):
        from pydicom.errors import InvalidDicomError

        try:
            slices = [_read_dicom_file(path)]
        except InvalidDicomError as e:
            raise ValueError(f"{path}: not a DICOM file ({e})") from e
    else:
        raise FileNotFoundError(f"{path}: no such DICOM file or folder")
    array, affine = _assemble_series(slices, path)
    _validate(array, affine, path)
    return array, affine


def _read_dicom_file(path: str, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, force=False, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path}: cannot read DICOM (truncated or corrupt file?): {type(e).__name__}: {e}"
        ) from e
    if not stop_before_pixels:
        _check_complete(ds, path)
    return ds


def _check_complete(ds, path: str) -> None:
    """ValueError for a file cut short. pydicom reads such a file without complaint: a value cut
    off comes back short, and a cut inside (or right before) an element's header simply ends the
    data set, so without this check a truncated slice reports a missing attribute instead."""
    from pydicom.dataelem import RawDataElement

    size, end = os.path.getsize(path), None
    for elem in ds.elements():  # Raw elements: not yet converted, they keep their file position.
        if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
            end = None  # Position unknown (converted or undefined-length element).
            continue
        if elem.value is not None and len(elem.value) < elem.length:
            raise ValueError(
                f"{path}: truncated DICOM file ({size} bytes): element {elem.tag} declares "
                f"{elem.length} bytes, the file holds {len(elem.value)}"
            )
        end = elem.value_tell + elem.length
    meta = getattr(ds, "file_meta", None)
    deflated = meta is not None and getattr(meta.get("TransferSyntaxUID"), "is_deflated", False)
    if end is not None and end < size and not deflated and _nonzero_tail(path, end):
        # (Deflated: positions are not file offsets. Zero bytes: padding, not a cut element.)
        raise ValueError(
            f"{path}: truncated DICOM file ({size} bytes): {size - end} stray bytes after the last "
            f"complete element (byte {end})"
        )
    if _is_image_storage(ds) and "PixelData" not in ds:
        kind = ds.file_meta.MediaStorageSOPClassUID.name
        raise ValueError(
            f"{path}: truncated or incomplete DICOM file ({size} bytes): a {kind} file without pixel data"
        )


def _nonzero_tail(path: str, start: int) -> bool:
    with open(path, "rb") as f:
        f.seek(start)
        return any(f.read(1 << 16))


def _is_image_storage(ds) -> bool:
    """Whether the file meta says the file is an image (e.g. "CT Image Storage")."""
    meta = getattr(ds, "file_meta", None)
    uid = None if meta is None else meta.get("MediaStorageSOPClassUID")
    return uid is not None and "Image Storage" in getattr(uid, "name", "")


def _read_series_folder(folder: str, series_uid: str | None) -> list:
    from pydicom.errors import InvalidDicomError

    files = sorted(
        os.path.join(folder, n) for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))
    )
    series: dict[str, list[str]] = {}
    not_dicom, no_pixels = [], []
    for f in files:
        try:  # Headers first: other series' pixel data is never decoded.
            ds = _read_dicom_file(f, stop_before_pixels=True)
        except InvalidDicomError:
            not_dicom.append(os.path.basename(f))
            continue
        if "Rows" not in ds:
            if _is_image_storage(ds):  # An image file without image attributes: cut short?
                _read_dicom_file(f)  # Raises if truncated (a full read of a small file).
            no_pixels.append(os.path.basename(f))
            continue
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(f)
    if not_dicom or no_pixels:
        warnings.warn(
            f"{folder}: skipped {len(not_dicom)} non-DICOM file(s) {not_dicom[:5]} and "
            f"{len(no_pixels)} DICOM file(s) without image data {no_pixels[:5]}",
            stacklevel=3,
        )
    if not series:
        raise ValueError(
            f"{folder}: no DICOM image files found ({len(files)} files, {len(not_dicom)} not DICOM, "
            f"{len(no_pixels)} without pixel data)"
        )
    if series_uid is None and len(series) > 1:
        listing = ", ".join(f"{uid or '<none>'} ({len(fs)} files)" for uid, fs in sorted(series.items()))
        raise ValueError(f"{folder}: holds {len(series)} DICOM series; pass series_uid= one of: {listing}")
    if series_uid is not None and series_uid not in series:
        raise ValueError(f"{folder}: no series {series_uid!r}; present: {sorted(series)}")
    chosen = series[series_uid] if series_uid is not None else next(iter(series.values()))
    return [_read_dicom_file(f) for f in chosen]


def _floats(ds, keyword: str, count: int, default=None) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise ValueError(f"{ds.filename}: DICOM attribute {keyword} is missing")
        return np.asarray(default, np.float64)
    values = np.asarray([float(v) for v in value], np.float64)
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise ValueError(f"{ds.filename}: bad DICOM {keyword} {list(values)}")
    return values


def _slice_geometry(ds, single: bool):
    """(orientation (6,), position (3,), (row spacing, column spacing)) of one slice, LPS mm."""
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{ds.filename}: multi-frame DICOM ({ds.NumberOfFrames} frames) is not supported")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(
            f"{ds.filename}: colour DICOM (SamplesPerPixel={ds.SamplesPerPixel}) is not supported"
        )
    orientation = _floats(ds, "ImageOrientationPatient", 6, [1, 0, 0, 0, 1, 0] if single else None)
    position = _floats(ds, "ImagePositionPatient", 3, [0, 0, 0] if single else None)
    keyword = "PixelSpacing" if "PixelSpacing" in ds or not single else "ImagerPixelSpacing"
    spacing = _floats(ds, keyword, 2)
    geometry.check_spacing(spacing, ds.filename)
    return orientation, position, spacing


def _pixels(ds) -> np.ndarray:
    """The slice's modality values (e.g. HU), transposed to (column, row)."""
    if "ModalityLUTSequence" in ds:
        raise ValueError(f"{ds.filename}: DICOM Modality LUT Sequence is not supported")
    try:
        pixels = ds.pixel_array
    except Exception as e:  # pydicom raises many types for missing codecs and bad data.
        raise ValueError(f"{ds.filename}: cannot decode DICOM pixel data: {type(e).__name__}: {e}") from e
    if pixels.ndim != 2:
        raise ValueError(f"{ds.filename}: expected one 2D frame, got pixel array {pixels.shape}")
    return pixels.T


def _rescale(stack: list[np.ndarray], slices: list) -> np.ndarray:
    """Applies RescaleSlope/Intercept per slice, keeping integers when the scaling is integral."""
    slopes = np.array([float(ds.get("RescaleSlope", 1) or 1) for ds in slices])
    intercepts = np.array([float(ds.get("RescaleIntercept", 0) or 0) for ds in slices])
    raw = np.stack(stack, axis=-1)
    if np.all(slopes == 1) and np.all(intercepts == 0):
        return raw
    if (
        np.issubdtype(raw.dtype, np.integer)
        and np.all(slopes == np.round(slopes))
        and np.all(intercepts == np.round(intercepts))
    ):
        values = raw.astype(np.int64) * slopes.astype(np.int64) + intercepts.astype(np.int64)
        for dtype in (np.int16, np.int32):  # HU fit in int16: half the memory of float32.
            if np.iinfo(dtype).min <= values.min() and values.max() <= np.iinfo(dtype).max:
                return values.astype(dtype)
        return values
    return (raw.astype(np.float64) * slopes + intercepts).astype(np.float32)


def _assemble_series(slices: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    single = len(slices) == 1
    geoms = [_slice_geometry(ds, single) for ds in slices]
    orientation, _, spacing = geoms[0]
    shape = (int(slices[0].Rows), int(slices[0].Columns))
    for ds, (o, _, s) in zip(slices, geoms):
        if not np.allclose(o, orientation, atol=1e-4) or not np.allclose(s, spacing, rtol=1e-4):
            raise ValueError(
                f"{where}: {ds.filename} has orientation {o.tolist()} / pixel spacing {s.tolist()} "
                f"but {slices[0].filename} has {orientation.tolist()} / {spacing.tolist()}"
            )
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise ValueError(f"{where}: {ds.filename} is {ds.Rows}x{ds.Columns}, others {shape}")
    # Stored cosines are rounded decimal strings; renormalise so spacings stay exact.
    row_dir = orientation[:3] / np.linalg.norm(orientation[:3])
    col_dir = orientation[3:] / np.linalg.norm(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 0.9:  # Rows and columns must be (nearly) perpendicular.
        raise ValueError(f"{where}: bad ImageOrientationPatient {orientation.tolist()}")
    normal = normal / np.linalg.norm(normal)
    positions = np.array([p for _, p, _ in geoms])
    order = np.argsort(positions @ normal, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    step = _slice_step(slices, positions, normal, where)
    lps = np.eye(4)
    # PixelSpacing is (between rows, between columns); array axis 0 walks along a row.
    lps[:3, 0] = row_dir * spacing[1]
    lps[:3, 1] = col_dir * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    array = _rescale([_pixels(ds) for ds in slices], slices)
    return array, LPS_TO_RAS @ lps


def _slice_step(slices: list, positions: np.ndarray, normal: np.ndarray, where: str) -> np.ndarray:
    """World vector from one slice to the next, checked for uniform spacing."""
    if len(slices) == 1:
        thickness = float(slices[0].get("SliceThickness", 0) or 0)
        return normal * (thickness if thickness > 0 else 1.0)
    gaps = np.diff(positions @ normal)
    if np.any(gaps <= 1e-3):
        dup = [slices[i].filename for i in np.flatnonzero(gaps <= 1e-3)[:3]]
        raise ValueError(
            f"{where}: several slices share one position (e.g. {dup}); a series with repeated "
            f"positions (echoes, time points) is not one volume"
        )
    irregular = np.flatnonzero(np.abs(gaps - np.median(gaps)) > 1e-2 * np.median(gaps))
    if irregular.size:
        raise ValueError(
            f"{where}: slice gaps are not uniform (missing slices?): median gap "
            f"{np.median(gaps):.4g} mm, but gaps {np.round(gaps[irregular[:10]], 3).tolist()} mm "
            f"after sorted slices {irregular[:10].tolist()} (of {len(slices)})"
        )
    return (positions[-1] - positions[0]) / (len(positions) - 1)


# ---------------------------------------------------------------------------------------------
# MedMNIST


def read_medmnist(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`(images, labels)` of one split of a MedMNIST `.npz`.

    images: uint8 `(N, S, S)` (2D) or `(N, S, S, S)` (3D), array order as stored.
    labels: `(N, L)`; a 1D label vector becomes `(N, 1)`.
    `split` is "train", "validation" (stored as "val") or "test". Loaded with
    `allow_pickle=False`: a file holding object arrays is refused.
    """
    path = os.fspath(path)
    if split not in MEDMNIST_SPLITS:
        raise ValueError(f"unknown MedMNIST split {split!r}; use one of train, validation, test")
    keys = [f"{MEDMNIST_SPLITS[split]}_images", f"{MEDMNIST_SPLITS[split]}_labels"]
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise ValueError(f"{path}: missing keys {missing}; keys present: {sorted(npz.files)}")
            images, labels = (npz[k] for k in keys)
    except ValueError as e:
        if str(e).startswith(path):
            raise
        if "Object arrays" in str(e):
            raise ValueError(
                f"{path}: holds object arrays (pickled data), which are never loaded; "
                f"re-save {keys} as plain numeric arrays"
            ) from e
        raise ValueError(f"{path}: not an npz of plain arrays: {e}") from e
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read npz (truncated?): {type(e).__name__}: {e}") from e
    return _check_medmnist(images, labels, path, keys)


def _check_medmnist(images: np.ndarray, labels: np.ndarray, path: str, keys) -> tuple[np.ndarray, np.ndarray]:
    if images.ndim not in (3, 4) or len(set(images.shape[1:])) != 1:
        raise ValueError(
            f"{path}: {keys[0]} has shape {images.shape}; expected (N, S, S) or (N, S, S, S) "
            f"(colour MedMNIST sets are not supported)"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: {keys[0]} has dtype {images.dtype}, expected uint8")
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2:
        raise ValueError(f"{path}: {keys[1]} has shape {labels.shape}; expected (N, L)")
    if len(images) != len(labels):
        raise ValueError(f"{path}: {len(images)} {keys[0]} but {len(labels)} {keys[1]}")
    return images, labels


def medmnist_affine(size: int, ndim: int, spacing_mm: float) -> np.ndarray:
    """Diagonal `(ndim + 1, ndim + 1)` affine with the nominal pixel size, pixel 0 at world 0.

    MedMNIST stores no geometry; `spacing_mm` is the caller's nominal spacing for images of
    `size` pixels per side (e.g. a ~350 mm chest film / size). `size` is only validated.
    """
    _check_ndim(ndim)
    if int(size) < 1:
        raise ValueError(f"MedMNIST image size must be >= 1, got {size}")
    geometry.check_spacing([float(spacing_mm)] * ndim, "medmnist_affine")
    return np.diag([float(spacing_mm)] * ndim + [1.0])


__all__ = [
    "LPS_TO_RAS",
    "Volume",
    "medmnist_affine",
    "read_dicom_series",
    "read_image",
    "read_medmnist",
    "read_nifti",
    "read_nrrd",
    "read_volume",
]

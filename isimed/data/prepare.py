"""Prepare real data once: read -> [crop to foreground] -> [resample] -> normalise -> records.

  python -m isimed.data.prepare --layout=brats --root=RAW --out=PREPARED --modality=t1 \
      --splits=brats2021_t1 [--spacing=1.5] [--crop_foreground] [--skip_bad]
  python -m isimed.data.prepare --layout=medmnist --root=chestmnist_64.npz --out=P --spacing=6.5

Output (read back with `isimed.data.prepared.data_source`): one file per volume,
`OUT/<split>/<case>.isimed` (`--storage=mapped`, the default: uncompressed, memory-mapped when
read) or `OUT/<split>/<case>.array_record` (`--storage=array_record`: zstd, ~7x smaller, readable
from gs://), MedMNIST in array_record shards of many images; plus `OUT/prepared.json`. See
`isimed.data.prepared` for the record fields and the trade-off.

Conventions:
* Geometry: every stored affine maps the STORED array's indices to the same world mm (RAS) as the
  source did, so cropping and resampling never move anatomy. Resampling keeps the source's axis
  directions and first voxel centre and changes only the step per axis (linear interpolation for
  images, nearest for masks, no anti-aliasing prefilter); the last voxel is the last grid point
  inside the source, so nothing is extrapolated.
* Intensities end in [-1, 1] (clipped): CT (`ct`): a HU window [lo, hi]; MRI (`mri`): the 5th and
  95th percentiles of the foreground voxels; MedMNIST (`uint8`): [0, 255]. Foreground: CT voxels
  above -500 HU (body, not air); MRI voxels above the image minimum (the skull-stripped background
  of BraTS is exactly 0; with a noisy background every voxel counts).
* Images are stored as float16: half the disk and read cost of float32, and its 11-bit mantissa
  resolves ~1e-3 near +-1 (about 1 HU in a 2000 HU window), far below CT/MRI noise.
* `bbox` is the foreground box [start, stop) in the source file's array indices, before cropping
  or resampling.
* Only one volume is in memory at a time; normalisation and resampling run in slabs of planes so
  the float32 intermediates stay small.
* Resumable: files are written to a temporary name then renamed, so a file that exists is complete;
  rerunning skips them. A rerun with other settings, on a changed set of cases, or into a folder
  written in another record format version (`prepared.FORMAT_VERSION`), is refused. A rerun after a
  kill (even kill -9) gives the folder one uninterrupted run would have.
* Bad input files stop the run with a message naming the file, or with `--skip_bad` are skipped and
  listed. A failed write (disk full, no permission) is never the input's fault: it always stops the
  run (`OutputError`), leaving prepared.json "incomplete" for a rerun to resume.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tqdm
from scipy import ndimage

from isimed import geometry
from isimed import paths
from isimed.data import layouts
from isimed.data import prepared
from isimed.data import readers

VOLUME_LAYOUTS = ("brats", "nnunet", "autopet", "glob", "dicom")
LAYOUTS = VOLUME_LAYOUTS + ("medmnist",)
INTENSITIES = ("ct", "mri", "uint8")
DEFAULT_INTENSITY = {"brats": "mri", "autopet": "ct", "medmnist": "uint8"}
CT_FOREGROUND_HU = -500.0
LAYOUT_FLAGS = (
    "modality",
    "channel",
    "image",
    "image_pattern",
    "mask_pattern",
    "subset",
    "file_pattern",
    "require_mask",
)
SLAB_VOXELS = 1 << 22  # ~16 MB of float32 per slab.
CHESTMNIST_LABELS = (
    "atelectasis",
    "cardiomegaly",
    "effusion",
    "infiltration",
    "mass",
    "nodule",
    "pneumonia",
    "pneumothorax",
    "consolidation",
    "edema",
    "emphysema",
    "fibrosis",
    "pleural",
    "hernia",
)


class PrepareError(ValueError):
    """A bad input file or an inconsistent output directory; the message names the file."""


class OutputError(OSError):
    """Writing the output failed (disk full, no permission, ...): never a bad input, so it stops
    preparation even with --skip_bad, and prepared.json stays "incomplete"."""


def _output_error(path: str, e: Exception) -> OutputError:
    reason = getattr(e, "strerror", None) or " ".join(str(e).split())
    return OutputError(
        f"cannot write {path}: {reason}; preparation stopped, the output stays incomplete "
        "(fix the cause, e.g. free disk space, and rerun the same command to resume)"
    )


# ------------------------------------------------------------------------------------------------
# One volume.


def _slabs(n: int, plane_voxels: int) -> Iterator[tuple[int, int]]:
    step = max(1, SLAB_VOXELS // max(1, plane_voxels))
    for a in range(0, n, step):
        yield a, min(n, a + step)


def foreground_box(
    image: np.ndarray, threshold: float, *, collect_values: bool = False
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Box (2, ndim) [start, stop) of voxels > threshold (None if there are none), and optionally
    those voxels' values. Runs slab by slab so no full-size boolean array is made."""
    plane = int(np.prod(image.shape[1:]))
    axis0 = np.zeros(image.shape[0], bool)
    rest = np.zeros(image.shape[1:], bool)
    values = []
    for a, b in _slabs(image.shape[0], plane):
        fg = image[a:b] > threshold
        axis0[a:b] = fg.reshape(b - a, -1).any(axis=1)
        rest |= fg.any(axis=0)
        if collect_values:
            values.append(image[a:b][fg])
    if not axis0.any():
        return None, None
    ranges = [axis0] + [rest.any(axis=tuple(i for i in range(rest.ndim) if i != k)) for k in range(rest.ndim)]
    box = np.array(
        [[np.flatnonzero(r)[0] for r in ranges], [np.flatnonzero(r)[-1] + 1 for r in ranges]], np.int64
    )
    return box, (np.concatenate(values) if collect_values else None)


def resampled_grid(
    shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, tuple[int, ...], np.ndarray]:
    """(step per axis in source voxels, output shape, output affine) for a target spacing in mm."""
    affine = np.asarray(affine, np.float64)
    factor = np.asarray(spacing, np.float64) / geometry.spacing_from_affine(affine)
    # The small epsilon keeps an exactly aligned last source voxel.
    out_shape = tuple(int(math.floor((n - 1) / f + 1e-6)) + 1 for n, f in zip(shape, factor))
    out_affine = affine.copy()
    out_affine[:-1, :-1] = affine[:-1, :-1] * factor[None, :]
    return factor, out_shape, out_affine


def _resample_slab(image, factor, a: int, b: int, out_shape, order: int, dtype) -> np.ndarray:
    offset = np.zeros(image.ndim)
    offset[0] = factor[0] * a
    # A diagonal matrix: output index i reads source index factor * i (+ the slab offset).
    return ndimage.affine_transform(
        image,
        factor,
        offset=offset,
        output_shape=(b - a, *out_shape[1:]),
        order=order,
        mode="nearest",
        output=dtype,
    )


def _to_unit(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    x = np.asarray(x, np.float32) - np.float32(lo)
    x *= np.float32(2.0 / (hi - lo))
    x -= 1.0
    return np.clip(x, -1.0, 1.0, out=x)


def process_volume(
    image: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray | None,
    *,
    intensity: str,
    window: Sequence[float] = (-1000.0, 1000.0),
    spacing: Sequence[float] | None = None,
    crop_foreground: bool = False,
    where: str = "image",
) -> dict[str, np.ndarray]:
    """One volume -> record fields `image` (float16, [-1, 1]), `affine`, `bbox`, `mask` (uint8).

    Raises PrepareError (naming `where`) for NaN/inf voxels, a bad affine, a mask of another
    shape or with values outside 0..255, no foreground, or a constant foreground.
    """
    image, affine, mask = _checked_volume(image, affine, mask, where)
    lo, hi, bbox = _intensity_range(image, intensity, window, where)
    if crop_foreground:
        image, affine, mask = _crop(image, affine, mask, bbox)
    if spacing is None:
        out = np.empty(image.shape, np.float16)
        for a, b in _slabs(image.shape[0], int(np.prod(image.shape[1:]))):
            out[a:b] = _to_unit(image[a:b], lo, hi)
    else:
        factor, out_shape, affine = resampled_grid(image.shape, affine, spacing)
        out = np.empty(out_shape, np.float16)
        for a, b in _slabs(out_shape[0], int(np.prod(out_shape[1:]))):
            out[a:b] = _to_unit(_resample_slab(image, factor, a, b, out_shape, 1, np.float32), lo, hi)
        if mask is not None:
            mask = _resample_slab(mask, factor, 0, out_shape[0], out_shape, 0, np.uint8)
    return {"image": out, "affine": affine, "bbox": bbox, "mask": mask}


def _checked_volume(
    image: np.ndarray, affine: np.ndarray, mask: np.ndarray | None, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(image, float64 affine, uint8 mask or None), refusing what would corrupt a record silently:
    a bad affine, NaN/inf voxels (they would spread through interpolation), and a mask that is
    not on the image grid or whose values would wrap around in uint8."""
    image = np.asarray(image)
    affine = np.asarray(affine, np.float64)
    try:
        geometry.check_affine(affine, image.ndim, where)
        readers.check_axes(affine, where)  # Also nearly collinear axes.
    except ValueError as e:
        raise PrepareError(str(e)) from None
    if np.issubdtype(image.dtype, np.floating):
        bad = sum(
            int(np.sum(~np.isfinite(image[a:b])))
            for a, b in _slabs(image.shape[0], int(np.prod(image.shape[1:])))
        )
        if bad:
            raise PrepareError(f"{where}: {bad} NaN/inf voxels")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise PrepareError(f"{where}: mask shape {mask.shape} != image shape {image.shape}")
        if mask.size and (
            mask.min() < 0 or mask.max() > 255 or (mask.dtype.kind == "f" and np.any(mask != np.round(mask)))
        ):
            raise PrepareError(f"{where}: mask values must be integers in 0..255")
        mask = mask.astype(np.uint8, copy=False)
    return image, affine, mask


def _intensity_range(
    image: np.ndarray, intensity: str, window: Sequence[float], where: str
) -> tuple[float, float, np.ndarray]:
    """(lo, hi) mapped to [-1, 1], and the foreground box; both come from one pass over the
    volume because MRI takes its range from the foreground voxels' percentiles."""
    if intensity == "ct":
        lo, hi = float(window[0]), float(window[1])
        if not hi > lo:
            raise PrepareError(f"CT window must have hi > lo, got {tuple(window)}")
        threshold = CT_FOREGROUND_HU
    elif intensity == "mri":
        threshold = float(image.min())
    elif intensity == "uint8":
        lo, hi, threshold = 0.0, 255.0, 0.0
    else:
        raise PrepareError(f"unknown intensity {intensity!r}; use one of {INTENSITIES}")
    bbox, values = foreground_box(image, threshold, collect_values=intensity == "mri")
    if bbox is None:
        raise PrepareError(f"{where}: no foreground voxels (none above {threshold:g})")
    if intensity == "mri":
        lo, hi = (float(v) for v in np.percentile(values, (5.0, 95.0)))
        del values
        if not hi > lo:
            raise PrepareError(f"{where}: foreground intensities are constant ({lo:g}); cannot normalise")
    return lo, hi, bbox


def _crop(
    image: np.ndarray, affine: np.ndarray, mask: np.ndarray | None, bbox: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The foreground box of image and mask, as views (no copy). The affine's translation moves
    to the box's first voxel, so every voxel keeps its world position."""
    box = tuple(slice(s, e) for s, e in bbox.T)
    ndim = image.ndim
    shift = np.eye(ndim + 1)
    shift[:ndim, ndim] = bbox[0]
    return image[box], affine @ shift, None if mask is None else mask[box]


# ------------------------------------------------------------------------------------------------
# Output directory: manifest, atomic writes, progress.


def safe_name(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", case_id).strip("._") or "case"


def _write_records(path: str, records: Sequence[bytes]) -> None:
    """Writes to a temporary name and renames, so an interrupted run never leaves a partial file.
    A `.isimed` path gets the one record's bytes as they are; any other an array_record file."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    try:
        if path.endswith(prepared.MAPPED_SUFFIX):
            (data,) = records
            with open(tmp, "wb") as f:
                f.write(data)
        else:
            from array_record.python import array_record_module

            writer = array_record_module.ArrayRecordWriter(tmp, prepared.WRITER_OPTIONS)
            try:
                for data in records:
                    writer.write(data)
            finally:
                writer.close()
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # array_record's writer reports ENOSPC as RuntimeError.
        if os.path.exists(tmp):
            os.remove(tmp)
        raise _output_error(path, e) from e


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        raise _output_error(path, e) from e


def _start(out: str, settings: dict, plan: dict, split_names: Sequence[str]) -> None:
    """Creates OUT or checks that an existing OUT was started with the same settings and cases."""
    path = os.path.join(out, prepared.MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("format") != prepared.FORMAT:
            raise PrepareError(f"{path}: not written by isimed.data.prepare")
        version = prepared.manifest_format_version(old)
        if version != prepared.FORMAT_VERSION:  # Never two record formats in one folder.
            raise PrepareError(
                f"{out} holds records of prepared format version {version}; this prepare writes "
                f"version {prepared.FORMAT_VERSION} and does not mix versions in one folder: "
                "use a new --out (or delete this one)"
            )
        # Folders started before `storage` existed hold array_record files.
        old_settings = {"storage": "array_record", **old["settings"]}
        if old_settings != settings:
            diff = {
                k: (old_settings.get(k), settings.get(k))
                for k in set(old_settings) | set(settings)
                if old_settings.get(k) != settings.get(k)
            }
            raise PrepareError(
                f"{out} was prepared with other settings (existing, requested): {diff}; "
                "use a new --out or the same settings"
            )
        if old["plan"] != plan:
            raise PrepareError(
                f"{out}: the cases found under the raw root (or their split assignment) changed "
                "since this directory was started; use a new --out"
            )
    elif os.path.isdir(out) and set(os.listdir(out)) - {prepared.MANIFEST + ".tmp"}:
        # (A lone prepared.json.tmp: a first run killed while writing its manifest.)
        raise PrepareError(f"{out} is not empty and has no {prepared.MANIFEST}; use a new --out")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise _output_error(out, e) from e
    # The manifest before anything else, so a folder killed at any moment is one a rerun accepts.
    _write_json(
        path,
        {
            "format": prepared.FORMAT,
            "format_version": prepared.FORMAT_VERSION,
            "status": "incomplete",
            "settings": settings,
            "plan": plan,
        },
    )
    try:
        for split in split_names:
            split_dir = os.path.join(out, split)
            os.makedirs(split_dir, exist_ok=True)
            for name in os.listdir(split_dir):  # Leftovers of an interrupted write.
                if name.endswith(".tmp"):
                    os.remove(os.path.join(split_dir, name))
    except OSError as e:
        raise _output_error(out, e) from e


def _progress(total: int, label: str, enabled: bool, unit: str) -> tqdm.tqdm:
    """A tqdm bar (count, rate, ETA) on stderr; shown only when stderr is a terminal."""
    return tqdm.tqdm(total=total, desc=label, unit=unit, disable=None if enabled else True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------------
# Whole data sets.


def _resolve_splits(splits) -> dict[str, list[str]] | None:
    if isinstance(splits, Mapping):
        return {k: list(v) for k, v in splits.items()}
    if splits in (None, "fractions"):
        return None
    if str(splits).endswith(".json"):
        with open(os.path.expanduser(splits)) as f:
            return {k: list(v) for k, v in json.load(f).items()}
    return layouts.load_splits(splits)


def prepare(
    layout: str,
    root: str,
    out: str,
    *,
    options: Mapping[str, Any] | None = None,
    intensity: str | None = None,
    window: Sequence[float] = (-1000.0, 1000.0),
    spacing: Sequence[float] | float | None = None,
    crop_foreground: bool = False,
    splits: str | Mapping[str, Sequence[str]] | None = "fractions",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    ndim: int = 3,
    skip_bad: bool = False,
    shard_size: int = 4096,
    storage: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepares a raw data set into `out` and returns the final manifest (also in prepared.json).

    Args:
      layout: one of LAYOUTS; `options` go to `layouts.find_cases` (modality, channel, image,
        image_pattern, mask_pattern).
      intensity: "ct", "mri" or "uint8"; default by layout (brats mri, autopet ct, medmnist uint8).
      window: CT HU window mapped to [-1, 1].
      spacing: target mm per axis (one number: isotropic), None keeps each volume's own grid.
        MedMNIST: required, the pixel size the images are given (they are never resampled).
      crop_foreground: store only the foreground box (the affine keeps world mm in place).
      splits: "fractions" (random `fractions` with `seed`), a split-list name for
        `layouts.load_splits`, a JSON file {split: [case ids]}, or such a dict. MedMNIST: its own.
      skip_bad: skip unreadable/invalid volumes (listed in prepared.json); else raise on the first.
      shard_size: MedMNIST images per array_record file.
      storage: volumes as "mapped" (default: uncompressed `.isimed` files, memory-mapped when read:
        fastest) or "array_record" (zstd: ~7x smaller on disk, readable from gs://, but every read
        decompresses the whole volume). MedMNIST: array_record shards only.
      progress: a progress bar on stderr (shown only when stderr is a terminal).
    """
    if paths.is_uri(out):  # os.path would make "gs://b/x" a local folder named "gs:".
        raise PrepareError(
            f"--out={out}: prepare writes to a local folder only; to train from an object store, "
            "prepare with --storage=array_record (memory-mapped .isimed files, the default for "
            "volumes, cannot be read from a URI) into a local folder, then copy it to the bucket "
            "(gcloud storage cp -r OUT gs://...)"
        )
    out = os.path.abspath(os.path.expanduser(out))
    root = os.path.expanduser(root)
    settings = _settings(
        layout, options, intensity, window, spacing, crop_foreground, splits, fractions, seed, ndim, storage
    )
    start = time.time()
    if layout == "medmnist":
        manifest = _prepare_medmnist(root, out, settings, shard_size, progress)
    else:
        manifest = _prepare_volumes(root, out, settings, _resolve_splits(splits), ndim, skip_bad, progress)
    manifest["report"] = {
        "out": out,
        "seconds": round(time.time() - start, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **manifest.pop("_report"),
    }
    manifest["status"] = "complete"
    _write_json(os.path.join(out, prepared.MANIFEST), manifest)
    return manifest


def _settings(
    layout, options, intensity, window, spacing, crop_foreground, splits, fractions, seed, ndim, storage
) -> dict[str, Any]:
    """The validated, JSON-ready settings stored in prepared.json; a rerun into the same OUT must
    produce the same dict (see `_start`), so every value is normalised to plain types here."""
    if layout not in LAYOUTS:
        raise PrepareError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    intensity = intensity or DEFAULT_INTENSITY.get(layout)
    if intensity not in INTENSITIES:
        raise PrepareError(f"layout {layout!r} needs --intensity=ct or --intensity=mri")
    if spacing is not None:
        spacing = [float(s) for s in np.atleast_1d(np.asarray(spacing, np.float64))]
        geometry.check_spacing(spacing, "--spacing")
        if len(spacing) == 1 and layout != "medmnist":
            spacing = spacing * ndim  # One number: isotropic.
        if layout != "medmnist" and len(spacing) != ndim:
            raise PrepareError(f"--spacing needs 1 or {ndim} values, got {spacing}")
    storage = storage or ("array_record" if layout == "medmnist" else "mapped")
    if storage not in prepared.STORAGES or (layout == "medmnist" and storage != "array_record"):
        raise PrepareError(
            f"--storage={storage}: use one of {prepared.STORAGES} (MedMNIST: array_record shards only)"
        )
    return {
        "layout": layout,
        "options": dict(options or {}),
        "intensity": intensity,
        "window": [float(w) for w in window] if intensity == "ct" else None,
        "spacing": spacing,
        "crop_foreground": bool(crop_foreground),
        "splits": splits if isinstance(splits, str) or splits is None else "explicit",
        "fractions": [float(f) for f in fractions],
        "seed": int(seed),
        "ndim": None if layout == "medmnist" else int(ndim),  # MedMNIST: from the file.
        "storage": storage,
    }


def _normalisation(settings: dict) -> dict[str, Any]:
    text = {
        "ct": f"HU window {settings['window']} -> [-1, 1], clipped",
        "mri": "foreground (voxels > image minimum) percentiles 5..95 -> [-1, 1], clipped",
        "uint8": "[0, 255] -> [-1, 1]",
    }[settings["intensity"]]
    return {
        "intensity": settings["intensity"],
        "window": settings["window"],
        "description": text,
        "dtype": "float16",
    }


def _manifest(
    settings, plan, root, ndim, *, has_mask, label_names, splits_out, skipped, counts, **extra
) -> dict[str, Any]:
    """prepared.json's content (still "incomplete"; `prepare` adds the report and completes it).
    `extra` keys go after the common ones; the key order is the file's."""
    return {
        "format": prepared.FORMAT,
        "format_version": prepared.FORMAT_VERSION,
        "status": "incomplete",
        "settings": settings,
        "plan": plan,
        "root": os.path.abspath(root),
        "ndim": ndim,
        "spacing": settings["spacing"],
        "normalisation": _normalisation(settings),
        "has_mask": has_mask,
        "label_names": label_names,
        "splits": splits_out,
        "counts": {s: v["count"] for s, v in splits_out.items()},
        "skipped": skipped,
        **extra,
        "_report": counts,
    }


def _plan_volumes(root, settings, split_lists):
    """(split assignment, {split: cases sorted by id}, {split: case ids}) of a volume layout.

    The plan (ids per split) is stored in prepared.json: a rerun on a changed raw folder is
    refused rather than mixing two different sets of cases in one output.
    """
    cases = layouts.find_cases(settings["layout"], root, **settings["options"])
    if not cases:
        raise PrepareError(f"no {settings['layout']} cases found under {root}")
    # AutoPET has several studies per patient: a patient must stay in one split.
    group = (lambda case_id: case_id.split("/")[0]) if settings["layout"] == "autopet" else None
    assignment = layouts.assign_splits(
        cases, split_lists, fractions=tuple(settings["fractions"]), seed=settings["seed"], group=group
    )
    if split_lists is None:
        _refuse_empty_splits(len(cases), assignment, settings)
    assigned = {s: sorted(c, key=lambda case: case.case_id) for s, c in assignment.items()}
    plan = {s: [c.case_id for c in cs] for s, cs in assigned.items()}
    for split, cs in assigned.items():
        names = [safe_name(c.case_id) for c in cs]
        if len(set(names)) != len(names):
            raise PrepareError(f"case ids of split {split!r} collide after making them file names")
    return assignment, assigned, plan


def _refuse_empty_splits(n_cases: int, assignment, settings) -> None:
    """PrepareError when `fractions` give a split a share but no case: training would stop at
    that split after building the model; better to say so before a case is read."""
    shares = zip(assignment, settings["fractions"])  # Split names in fraction order.
    empty = [split for split, share in shares if share > 0 and not assignment[split]]
    if empty:
        fractions = ",".join(f"{f:g}" for f in settings["fractions"])
        raise PrepareError(
            f"{n_cases} case(s) split by --fractions={fractions} (--seed={settings['seed']}) leave "
            f"{' and '.join(empty)} empty; training needs at least one case in each (fractions hold "
            "only on average): add cases, or change --fractions or --seed"
        )


def _prepare_volumes(root, out, settings, split_lists, ndim, skip_bad, progress) -> dict:
    assignment, assigned, plan = _plan_volumes(root, settings, split_lists)
    _start(out, settings, plan, list(plan))

    bar = _progress(sum(len(c) for c in assigned.values()), "prepare", progress, "case")
    splits_out, skipped, counts = {}, [], {"done": 0, "resumed": 0, "skipped": 0}
    has_mask = False
    suffix = prepared.MAPPED_SUFFIX if settings["storage"] == "mapped" else ".array_record"
    for split, split_cases in assigned.items():
        entries = []
        for index, case in enumerate(split_cases):
            name = safe_name(case.case_id) + suffix
            path = os.path.join(out, split, name)
            has_mask |= case.mask is not None
            if os.path.exists(path):  # Written by an earlier run: files appear only when complete.
                reason = None
                counts["resumed"] += 1
            else:
                reason = _prepare_case(case, index, path, ndim, settings, skip_bad)
                counts["done" if reason is None else "skipped"] += 1
            bar.update()
            if reason is None:
                # The stored shape, so training checks its crop size without reading any volume.
                shape = list(prepared.file_image_shape(path))
                entries.append(
                    {"id": index, "case_id": case.case_id, "file": name, "records": 1, "shape": shape}
                )
            else:
                skipped.append(
                    {
                        "split": split,
                        "case_id": case.case_id,
                        "image": case.image,
                        "mask": case.mask,
                        "reason": reason,
                    }
                )
        splits_out[split] = {"count": len(entries), "files": entries}
    bar.close()
    return _manifest(
        settings,
        plan,
        root,
        ndim,
        has_mask=has_mask,
        label_names=None,
        splits_out=splits_out,
        skipped=skipped,
        counts=counts,
        # Split lists vs cases found: cases in no list, listed ids without a case.
        unassigned=[c.case_id for c in getattr(assignment, "unassigned", [])],
        missing={k: len(v) for k, v in getattr(assignment, "missing", {}).items()},
    )


def _prepare_case(case, index: int, path: str, ndim: int, settings: dict, skip_bad: bool):
    """Reads, processes and writes one case; None on success, else the reason it was skipped
    (with `skip_bad`; without it the failure is raised, naming the case and its file). A failed
    write is not the input's fault: OutputError, whatever `skip_bad` says."""
    try:
        data = _case_record(case, index, ndim, settings)
    except Exception as e:  # noqa: BLE001 - every failure is reported or re-raised.
        reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        if not skip_bad:
            where = "" if case.image in reason else f" ({case.image})"
            raise PrepareError(f"case {case.case_id}{where}: {reason}") from e
        return reason
    _write_records(path, [data])
    return None


def _case_record(case, index: int, ndim: int, settings: dict) -> bytes:
    """One case read, checked, processed and serialised (errors here are the input's)."""
    volume = readers.read_volume(case.image, case.mask, ndim=ndim)
    if volume.image.ndim != ndim or 1 in volume.image.shape:
        raise PrepareError(
            f"{case.image}: expected a {ndim}D image, got shape {volume.image.shape}"
            + (" (a single slice: prepare 2D images with --ndim=2)" if ndim == 3 else "")
        )
    fields = process_volume(
        volume.image,
        volume.affine,
        volume.mask,
        intensity=settings["intensity"],
        window=settings["window"] or (0, 1),
        spacing=settings["spacing"],
        crop_foreground=settings["crop_foreground"],
        where=case.image,
    )
    del volume  # Only one volume in memory: free the source before serialising.
    return prepared.serialize(
        {
            "id": np.int32(index),
            "case_id": np.str_(case.case_id),
            **{k: v for k, v in fields.items() if v is not None},
        }
    )


def _prepare_medmnist(root, out, settings, shard_size, progress) -> dict:
    if settings["spacing"] is None or len(set(settings["spacing"])) != 1:
        raise PrepareError(
            f"{root}: MedMNIST images carry no pixel size; pass one --spacing in mm (e.g. ChestMNIST "
            "radiographs span roughly 420 mm, so about 420/S mm for size S)"
        )
    if settings["crop_foreground"]:
        raise PrepareError("--crop_foreground does not apply to MedMNIST images")
    images, labels = readers.read_medmnist(root, "train")
    ndim = images.ndim - 1
    settings["spacing"] = [settings["spacing"][0]] * ndim
    affine = readers.medmnist_affine(images.shape[1], ndim, settings["spacing"][0])
    stem = safe_name(os.path.basename(root).split(".")[0])
    label_names = (
        list(CHESTMNIST_LABELS)
        if stem.startswith("chestmnist") and labels.shape[1] == 14
        else [f"label_{j}" for j in range(labels.shape[1])]
    )
    # The npz is the only input: a different file (name or size) is a different plan.
    plan = {"file": os.path.basename(root), "bytes": os.path.getsize(root)}
    _start(out, settings, plan, layouts.SPLIT_NAMES)
    splits_out, counts = {}, {"done": 0, "resumed": 0, "skipped": 0}
    bbox = np.array([[0] * ndim, list(images.shape[1:])], np.int64)
    for split in layouts.SPLIT_NAMES:
        if split != "train":
            images, labels = readers.read_medmnist(root, split)
        n = len(images)
        shards = math.ceil(n / shard_size)
        entries = []
        bar = _progress(n, f"prepare {split}", progress, "image")
        for s in range(shards):
            a, b = s * shard_size, min(n, (s + 1) * shard_size)
            name = f"{stem}-{s:05d}-of-{shards:05d}.array_record"
            entries.append(
                {
                    "id": a,
                    "case_id": f"{split}_{a:06d}",
                    "file": name,
                    "records": b - a,
                    "shape": list(images.shape[1:]),
                }
            )
            path = os.path.join(out, split, name)
            if os.path.exists(path):
                counts["resumed"] += b - a
            else:
                _write_records(
                    path, [_medmnist_record(images, labels, i, split, affine, bbox) for i in range(a, b)]
                )
                counts["done"] += b - a
            bar.update(b - a)
        bar.close()
        splits_out[split] = {"count": n, "files": entries}
        del images, labels
    return _manifest(
        settings,
        plan,
        root,
        ndim,
        has_mask=False,
        label_names=label_names,
        splits_out=splits_out,
        skipped=[],
        counts=counts,
    )


def _medmnist_record(images, labels, i: int, split: str, affine, bbox) -> bytes:
    """Image i of a MedMNIST split as a serialised record. MedMNIST has no case names, so the
    case id is the split and index."""
    return prepared.serialize(
        {
            "id": np.int32(i),
            "case_id": np.str_(f"{split}_{i:06d}"),
            "image": _to_unit(images[i], 0.0, 255.0).astype(np.float16),
            "affine": affine,
            "bbox": bbox,
            "labels": np.asarray(labels[i], np.float32),
        }
    )


# ------------------------------------------------------------------------------------------------
# Command line.


def format_report(manifest: dict[str, Any]) -> str:
    r = manifest["report"]
    lines = [
        f"prepared {manifest['settings']['layout']} -> {r['out']}",
        f"  counts per split: {manifest['counts']}",
        f"  written {r['done']}, already done {r['resumed']}, skipped {r['skipped']} "
        f"in {r['seconds']:.1f} s; peak RSS {r['peak_rss_mb']:.0f} MB",
    ]
    if manifest.get("unassigned") or any(manifest.get("missing", {}).values()):
        lines.append(
            f"  split lists: {len(manifest['unassigned'])} case(s) in no list (left out), "
            f"listed ids without a case per split: {manifest['missing']}"
        )
    lines += [f"  skipped {s['case_id']} ({s['image']}): {s['reason']}" for s in manifest["skipped"]]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    from absl import flags

    f = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    # Only the options given on the command line: each layout has its own defaults.
    options = {k: f[k].value for k in LAYOUT_FLAGS if f[k].present}
    try:
        manifest = prepare(
            f.layout,
            f.root,
            f.out,
            options=options,
            intensity=f.intensity,
            window=[float(w) for w in f.window],
            spacing=[float(s) for s in f.spacing] if f.spacing else None,
            crop_foreground=f.crop_foreground,
            splits=f.splits,
            fractions=[float(x) for x in f.fractions],
            seed=f.seed,
            ndim=f.ndim,
            skip_bad=f.skip_bad,
            shard_size=f.shard_size,
            storage=f.storage,
            progress=True,
        )
    # Bad input or a failed write: a message, no traceback.
    except (ValueError, FileNotFoundError, TypeError, OutputError) as e:
        sys.stderr.write(f"\nerror: {e}\n")
        raise SystemExit(1) from None
    print(format_report(manifest))


def define_flags() -> None:
    """The command line's flags (absl), for `python -m isimed.data.prepare` and `isimed-prepare`."""
    from absl import flags

    flags.DEFINE_enum("layout", None, list(LAYOUTS), "How the raw data is organised.")
    flags.DEFINE_string("root", None, "Raw data folder (MedMNIST: the .npz file).")
    flags.DEFINE_string("out", None, "Output folder for prepared.json and <split>/<case> files.")
    flags.DEFINE_string("modality", "t1", "brats: which modality (t1, t1ce, t2, flair).")
    flags.DEFINE_integer("channel", 0, "nnunet: which _000C channel.")
    flags.DEFINE_string("image", "CTres", "autopet: which image (CTres, SUV, PET).")
    flags.DEFINE_string("image_pattern", None, "glob: image file pattern under --root.")
    flags.DEFINE_string("mask_pattern", None, "glob: mask file pattern (optional).")
    flags.DEFINE_string("subset", "Tr", "nnunet: imagesTr or imagesTs.")
    flags.DEFINE_string("file_pattern", "*.dcm", "dicom: which files are slices ('*': all).")
    flags.DEFINE_bool("require_mask", False, "A case without its mask file is an error.")
    flags.DEFINE_enum(
        "intensity",
        None,
        list(INTENSITIES),
        "ct (HU window) | mri (foreground percentiles 5..95) | uint8; default by layout.",
    )
    flags.DEFINE_list("window", ["-1000", "1000"], "CT HU window lo,hi mapped to [-1, 1].")
    flags.DEFINE_list(
        "spacing",
        None,
        "Target spacing in mm (one value: isotropic); "
        "default: keep each volume's grid. MedMNIST: the pixel size, required.",
    )
    flags.DEFINE_bool("crop_foreground", False, "Store only the foreground bounding box.")
    flags.DEFINE_string(
        "splits", "fractions", "fractions | brats2021_t1 | autopet_ctres | a JSON file {split: [ids]}."
    )
    flags.DEFINE_list("fractions", ["0.8", "0.1", "0.1"], "train,validation,test shares.")
    flags.DEFINE_integer("seed", 0, "Seed of the fractions split.")
    flags.DEFINE_integer("ndim", 3, "Spatial dimensions of the volumes.")
    flags.DEFINE_bool(
        "skip_bad",
        False,
        "Skip (and list) bad input files instead of stopping (a failed write always stops).",
    )
    flags.DEFINE_integer("shard_size", 4096, "MedMNIST: images per array_record file.")
    flags.DEFINE_enum(
        "storage",
        None,
        ["mapped", "array_record"],
        "Volumes as uncompressed memory-mapped files (mapped, the default: fastest reads) or zstd "
        "array_record (~7x smaller, readable from gs://). MedMNIST: array_record only.",
    )
    flags.mark_flags_as_required(["layout", "root", "out"])


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)

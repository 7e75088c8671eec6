"""Folder layouts of real data sets -> lists of cases, and train/validation/test splits.

`find_cases(layout, root, **options)` lists the cases of a data set a user has downloaded; the
readers in `isimed.data.readers` load them. Case ids use "/" as separator on every platform and
are unique within a data set; lists come back sorted by case id. Layouts:

  brats    root/NAME/NAME_{modality}.nii.gz, mask NAME_seg.nii.gz (BraTS 2021: NAME=BraTS2021_00000)
  nnunet   root/images{Tr,Ts}/ID_{channel:04d}.nii.gz, mask root/labels{Tr,Ts}/ID.nii.gz
  autopet  root/PATIENT/STUDY/{CTres,SUV,CT,PET}.nii.gz, mask SEG.nii.gz, case id "PATIENT/STUDY"
  glob     any files or folders matching a glob pattern, masks by a name template
  dicom    every leaf folder holding DICOM files is one case (no masks)

Splits: `load_splits` gives the authors' published BraTS/AutoPET id lists (shipped as package
data), `assign_splits` distributes cases by such lists or by a stable hash of the case id.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import glob
import hashlib
import importlib.resources
import inspect
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence

from isimed.data import readers

# The standard splits, in this order: the published split lists, splits by fractions, MedMNIST
# and the TFDS phantom use them (explicit split lists passed to `prepare` may name others).
SPLIT_NAMES = ("train", "validation", "test")
SPLITS_RESOURCE = ("isimed.data", "splits", "isimed_splits.json")
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
AUTOPET_IMAGES = ("CTres", "SUV", "CT", "PET")
# The formats `readers` reads, plus MedMNIST's npz. ".nii.gz" is listed whole, so "a.nii.gz" loses
# ".nii.gz" where os.path.splitext would strip only ".gz".
IMAGE_SUFFIXES = readers.NIFTI_SUFFIXES + readers.NRRD_SUFFIXES + readers.DICOM_SUFFIXES + (".npz",)


@dataclasses.dataclass(frozen=True)
class Case:
    """One image of a data set: its id, the image path (a file or a DICOM folder), its mask."""

    case_id: str
    image: str
    mask: str | None = None


def find_cases(layout: str, root: str, **options) -> list[Case]:
    """Cases of the data set at `root` in folder `layout`, sorted by case id.

    Options by layout (all layouts take `require_mask=False`; with True a case whose mask file is
    missing is an error naming that file, with False its mask is None):
      brats:   modality in {t1, t1ce, t2, flair} (default t1)
      nnunet:  channel (default 0), subset "Tr" or "Ts" (default "Tr"), file_ending (".nii.gz")
      autopet: image in {CTres, SUV, CT, PET} (default CTres)
      glob:    image_pattern (required), mask_pattern (optional); see `_glob_cases`
      dicom:   file_pattern (default "*.dcm"; "*" for files without extension)
    """
    finders: dict[str, Callable[..., list[Case]]] = {
        "brats": _brats_cases,
        "nnunet": _nnunet_cases,
        "autopet": _autopet_cases,
        "glob": _glob_cases,
        "dicom": _dicom_cases,
    }
    if layout not in finders:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(finders)}")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data root {root} does not exist or is not a folder")
    finder = finders[layout]
    params = {n: p for n, p in inspect.signature(finder).parameters.items() if n != "root"}
    unknown = sorted(set(options) - set(params))
    missing = sorted(n for n, p in params.items() if p.default is p.empty and n not in options)
    if unknown or missing:
        raise TypeError(
            f"layout {layout!r}: unknown option(s) {unknown}, missing option(s) {missing}; "
            f"it accepts {list(params)}"
        )
    cases = finder(root, **options)
    dup = sorted(i for i, n in collections.Counter(c.case_id for c in cases).items() if n > 1)
    if dup:
        raise ValueError(f"{root}: case ids are not unique in layout {layout!r}: {dup[:5]}")
    return sorted(cases, key=lambda c: c.case_id)


def _no_cases(root: str, pattern: str) -> ValueError:
    return ValueError(f"{root}: no cases found; looked for {os.path.join(root, pattern)}")


def _mask_or_none(mask: str, image: str, require_mask: bool) -> str | None:
    if os.path.exists(mask):
        return mask
    if require_mask:
        raise FileNotFoundError(f"label file {mask} is missing (image {image}; require_mask=True)")
    return None


def _subdirs(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))


def _brats_cases(root: str, modality: str = "t1", require_mask: bool = False) -> list[Case]:
    if modality not in BRATS_MODALITIES:
        raise ValueError(f"BraTS modality must be one of {BRATS_MODALITIES}, got {modality!r}")
    cases = []
    for name in _subdirs(root):
        folder = os.path.join(root, name)
        image = os.path.join(folder, f"{name}_{modality}.nii.gz")
        if not os.path.exists(image):
            # A case folder lacking this modality is an incomplete download, not a non-case.
            if glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(name)}_*.nii.gz")):
                raise FileNotFoundError(f"{image} is missing (the folder holds other BraTS files)")
            continue
        mask = os.path.join(folder, f"{name}_seg.nii.gz")
        cases.append(Case(name, image, _mask_or_none(mask, image, require_mask)))
    if not cases:
        raise _no_cases(root, f"*/<folder name>_{modality}.nii.gz")
    return cases


def _nnunet_cases(
    root: str,
    channel: int = 0,
    subset: str = "Tr",
    file_ending: str = ".nii.gz",
    require_mask: bool = False,
) -> list[Case]:
    if subset not in ("Tr", "Ts"):
        raise ValueError(f"nnU-Net subset must be 'Tr' or 'Ts', got {subset!r}")
    images_dir = os.path.join(root, f"images{subset}")
    suffix = f"_{int(channel):04d}{file_ending}"
    pattern = os.path.join(f"images{subset}", f"*{suffix}")
    if not os.path.isdir(images_dir):
        raise _no_cases(root, pattern)
    cases = []
    for name in sorted(os.listdir(images_dir)):
        if not name.endswith(suffix):
            continue
        case_id = name[: -len(suffix)]
        mask = os.path.join(root, f"labels{subset}", case_id + file_ending)
        image = os.path.join(images_dir, name)
        cases.append(Case(case_id, image, _mask_or_none(mask, image, require_mask)))
    if not cases:
        raise _no_cases(root, pattern)
    return cases


def _autopet_cases(root: str, image: str = "CTres", require_mask: bool = False) -> list[Case]:
    if image not in AUTOPET_IMAGES:
        raise ValueError(f"AutoPET image must be one of {AUTOPET_IMAGES}, got {image!r}")
    cases = []
    for patient in _subdirs(root):
        for study in _subdirs(os.path.join(root, patient)):
            folder = os.path.join(root, patient, study)
            path = os.path.join(folder, f"{image}.nii.gz")
            if not os.path.exists(path):
                continue
            mask = os.path.join(folder, "SEG.nii.gz")
            cases.append(Case(f"{patient}/{study}", path, _mask_or_none(mask, path, require_mask)))
    if not cases:
        raise _no_cases(root, f"PATIENT/STUDY/{image}.nii.gz")
    return cases


def strip_suffix(path: str) -> str:
    """`path` without its image extension (".nii.gz" as one extension)."""
    lower = path.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return path[: -len(suffix)]
    return os.path.splitext(path)[0]


def _glob_cases(
    root: str,
    image_pattern: str,
    mask_pattern: str | None = None,
    require_mask: bool = False,
) -> list[Case]:
    """Cases from glob patterns relative to `root` ("**" recurses).

    case id: the image path relative to root, "/"-separated, without its extension.
    mask_pattern: a template filled per image with `{id}` (the case id), `{stem}` (the image's file
    name without extension) and `{parent}` (the image's folder relative to root, "." at the top),
    giving a path relative to root; e.g. "{parent}/mask.nii.gz", "labels/{stem}.nrrd",
    "{id}_seg.nii.gz". If the filled template holds glob characters it must match exactly one
    file. Files that are some case's mask are never taken as images, so "*.nii.gz" with
    "{id}_seg.nii.gz" works in one folder.
    """
    images = sorted(glob.glob(os.path.join(glob.escape(root), image_pattern), recursive=True))
    candidates = []  # (case id, image, mask path that the template names)
    for image in images:
        case_id = strip_suffix(os.path.relpath(image, root).replace(os.sep, "/"))
        mask = None
        if mask_pattern is not None:
            parent, _, stem = case_id.rpartition("/")
            filled = mask_pattern.format(id=case_id, stem=stem, parent=parent or ".")
            mask = _resolve(root, filled, image)
            if os.path.normpath(mask) == os.path.normpath(image):
                raise ValueError(f"mask pattern {mask_pattern!r} names the image itself: {image}")
        candidates.append((case_id, image, mask))
    # Only now is it known which matches are other cases' masks.
    masks = {os.path.normpath(m) for _, _, m in candidates if m is not None}
    cases = [
        Case(case_id, image, None if mask is None else _mask_or_none(mask, image, require_mask))
        for case_id, image, mask in candidates
        if os.path.normpath(image) not in masks
    ]
    if not cases:
        raise _no_cases(root, image_pattern)
    return cases


def _resolve(root: str, relative: str, image: str) -> str:
    """The one path a (possibly glob) mask template names; a non-match returns the literal path."""
    path = os.path.normpath(os.path.join(root, relative))
    if not glob.has_magic(relative):
        return path
    matches = sorted(glob.glob(os.path.join(glob.escape(root), relative), recursive=True))
    if len(matches) > 1:
        raise ValueError(
            f"mask pattern {relative!r} for image {image} matches {len(matches)} files: {matches[:5]}"
        )
    return matches[0] if matches else path


def _dicom_cases(root: str, file_pattern: str = "*.dcm", require_mask: bool = False) -> list[Case]:
    if require_mask:
        raise ValueError(f"{root}: the dicom layout has no masks (require_mask=True)")
    cases = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if dirs or not any(fnmatch.fnmatch(f, file_pattern) for f in files):
            continue  # Only leaf folders: a parent holding a DICOMDIR is not itself a series.
        rel = os.path.relpath(folder, root).replace(os.sep, "/")
        cases.append(Case(rel, folder))
    if not cases:
        raise _no_cases(root, f"**/{file_pattern} in leaf folders")
    return cases


# ---------------------------------------------------------------------------------------------
# Splits


def _split_file() -> dict:
    package, folder, name = SPLITS_RESOURCE
    resource = importlib.resources.files(package) / folder / name
    with resource.open("r", encoding="utf-8") as f:
        return json.load(f)


def load_splits(name: str) -> dict[str, list[str]]:
    """The authors' published split of a data set as case-id lists {train, validation, test}.

    "brats2021_t1": BraTS 2021 ids, e.g. "BraTS2021_00000" (750 / 251 / 250 cases).
    "autopet_ctres": AutoPET ids "PATIENT/STUDY" (515 / 172 / 163 studies; patients do not cross
    splits). Ids match `find_cases("brats" | "autopet", ...)`.
    """
    data = _split_file()
    converters: dict[str, Callable[[object], str]] = {
        "brats2021_t1": lambda entry: f"BraTS2021_{entry}",
        "autopet_ctres": lambda entry: f"{entry['patient']}/{entry['study']}",
    }
    if name not in converters:
        raise ValueError(f"unknown split list {name!r}; known: {sorted(converters)}")
    return {split: [converters[name](e) for e in data[name][split]] for split in SPLIT_NAMES}


class SplitAssignment(dict):
    """{split: [Case, ...]} plus what did not match: `unassigned` (cases in no list) and `missing`
    ({split: ids listed there with no case})."""

    unassigned: list[Case]
    missing: dict[str, list[str]]


def assign_splits(
    cases: Iterable[Case],
    splits: dict[str, list[str]] | None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    *,
    group: Callable[[str], str] | None = None,
) -> SplitAssignment:
    """Distributes cases over splits, keeping each split's cases in case-id order.

    With `splits` (id lists, e.g. from `load_splits`): a case goes to the list holding its id.
    Cases in no list are left out (`result.unassigned`) and ids with no case are counted
    (`result.missing`); both give a warning, since a partial download silently shrinks a split.
    An id in two lists is an error.

    Without lists: split names `train, validation, test` (as many as `fractions`, which must sum
    to 1). Each case goes by a SHA-256 hash of `seed` and its group key (`group(case_id)`, default
    the case id itself), so the assignment of a case never changes when others are added or
    removed. Fractions hold only on average. For data with several images per patient pass a
    group, e.g. `group=lambda cid: cid.split("/")[0]` for AutoPET, so a patient stays in one split.
    """
    cases = sorted(cases, key=lambda c: c.case_id)
    if splits is not None:
        return _assign_by_lists(cases, splits)
    fractions = [float(f) for f in fractions]
    if not 1 <= len(fractions) <= len(SPLIT_NAMES) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be 1 to 3 non-negative numbers summing to 1, got {fractions}")
    names = SPLIT_NAMES[: len(fractions)]
    result = SplitAssignment({n: [] for n in names})
    bounds = [sum(fractions[: i + 1]) for i in range(len(fractions))]
    for case in cases:
        u = stable_uniform(group(case.case_id) if group else case.case_id, seed)
        index = next((i for i, b in enumerate(bounds) if u < b), len(names) - 1)
        result[names[index]].append(case)
    result.unassigned, result.missing = [], {n: [] for n in names}
    return result


def stable_uniform(key: str, seed: int = 0) -> float:
    """A number in [0, 1) fixed by (seed, key) across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _assign_by_lists(cases: list[Case], splits: dict[str, list[str]]) -> SplitAssignment:
    owner: dict[str, str] = {}
    for split, ids in splits.items():
        for case_id in ids:
            if owner.setdefault(case_id, split) != split:
                raise ValueError(f"case id {case_id!r} is in both split {owner[case_id]!r} and {split!r}")
    result = SplitAssignment({split: [] for split in splits})
    result.unassigned = []
    for case in cases:
        if case.case_id in owner:
            result[owner[case.case_id]].append(case)
        else:
            result.unassigned.append(case)
    found = {c.case_id for c in cases}
    result.missing = {split: [i for i in ids if i not in found] for split, ids in splits.items()}
    n_missing = sum(len(v) for v in result.missing.values())
    if result.unassigned or n_missing:
        warnings.warn(
            f"split lists vs cases found: {len(result.unassigned)} case(s) in no list (e.g. "
            f"{[c.case_id for c in result.unassigned[:3]]}), {n_missing} listed id(s) with no case "
            f"({ {s: len(v) for s, v in result.missing.items()} })",
            stacklevel=3,
        )
    return result


__all__ = [
    "Case",
    "SplitAssignment",
    "assign_splits",
    "find_cases",
    "load_splits",
    "stable_uniform",
    "strip_suffix",
]

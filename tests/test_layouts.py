"""Folder layouts (BraTS, nnU-Net, AutoPET, glob, DICOM) and split assignment."""

import copy
import os
import shutil
import warnings

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pydicom.data
import pytest

from isimed.data import layouts
from isimed.data import readers
from isimed.data.layouts import Case


def _nifti(path, value=0, shape=(4, 5, 6)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.full(shape, value, np.int16), np.diag([1.0, 1.0, 2.0, 1.0])), str(path))


def _brats(root, ids=("00000", "00003", "00005"), modalities=("t1", "t2"), seg=True):
    for i in ids:
        name = f"BraTS2021_{i}"
        for m in modalities:
            _nifti(os.path.join(root, name, f"{name}_{m}.nii.gz"))
        if seg:
            _nifti(os.path.join(root, name, f"{name}_seg.nii.gz"), 1)


def test_brats(tmp_path):
    root = str(tmp_path / "brats")
    _brats(root)
    os.remove(os.path.join(root, "BraTS2021_00005", "BraTS2021_00005_seg.nii.gz"))
    cases = layouts.find_cases("brats", root)
    assert [c.case_id for c in cases] == ["BraTS2021_00000", "BraTS2021_00003", "BraTS2021_00005"]
    assert cases[0].image.endswith("BraTS2021_00000/BraTS2021_00000_t1.nii.gz")
    assert cases[0].mask.endswith("BraTS2021_00000_seg.nii.gz") and cases[2].mask is None
    assert layouts.find_cases("brats", root, modality="t2")[1].image.endswith("_t2.nii.gz")

    volume = readers.read_volume(cases[0].image, cases[0].mask)
    assert volume.image.shape == volume.mask.shape == (4, 5, 6)

    with pytest.raises(FileNotFoundError, match=r"BraTS2021_00005_seg\.nii\.gz.*missing"):
        layouts.find_cases("brats", root, require_mask=True)
    with pytest.raises(FileNotFoundError, match=r"BraTS2021_00000_flair\.nii\.gz is missing"):
        layouts.find_cases("brats", root, modality="flair")
    with pytest.raises(ValueError, match="modality"):
        layouts.find_cases("brats", root, modality="T1w")
    with pytest.raises(TypeError, match=r"unknown option.*modalty.*accepts"):
        layouts.find_cases("brats", root, modalty="t1")
    with pytest.raises(TypeError, match=r"missing option.*image_pattern"):
        layouts.find_cases("glob", root)


def test_empty_and_missing_root(tmp_path):
    (tmp_path / "empty").mkdir()
    for layout, pattern in [
        ("brats", "_t1.nii.gz"),
        ("nnunet", "imagesTr"),
        ("autopet", "CTres"),
        ("dicom", r"\*\.dcm"),
    ]:
        with pytest.raises(ValueError, match=rf"empty.*no cases found.*{pattern}"):
            layouts.find_cases(layout, str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"empty.*no cases found.*\*/image\.nii\.gz"):
        layouts.find_cases("glob", str(tmp_path / "empty"), image_pattern="*/image.nii.gz")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        layouts.find_cases("brats", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown layout"):
        layouts.find_cases("kaggle", str(tmp_path))


def test_nnunet(tmp_path):
    root = tmp_path / "Dataset001"
    for case in ("lung_001", "lung_002"):
        for channel in (0, 1):
            _nifti(root / "imagesTr" / f"{case}_{channel:04d}.nii.gz")
    _nifti(root / "labelsTr" / "lung_001.nii.gz", 1)
    _nifti(root / "imagesTs" / "lung_009_0000.nii.gz")
    cases = layouts.find_cases("nnunet", str(root))
    assert [c.case_id for c in cases] == ["lung_001", "lung_002"]
    assert cases[0].mask.endswith("labelsTr/lung_001.nii.gz") and cases[1].mask is None
    assert layouts.find_cases("nnunet", str(root), channel=1)[0].image.endswith("lung_001_0001.nii.gz")
    assert [c.case_id for c in layouts.find_cases("nnunet", str(root), subset="Ts")] == ["lung_009"]
    with pytest.raises(FileNotFoundError, match=r"labelsTr/lung_002\.nii\.gz"):
        layouts.find_cases("nnunet", str(root), require_mask=True)


def test_autopet(tmp_path):
    root = tmp_path / "autopet"
    study = "09-13-2001-NA-PET-CT Ganzkoerper  primaer mit KM-68547"  # Spaces as in the real data.
    for patient in ("PETCT_0117d7f11f", "PETCT_0143bab87a"):
        for name in ("CTres", "SUV", "SEG"):
            _nifti(root / patient / study / f"{name}.nii.gz")
    _nifti(root / "PETCT_0143bab87a" / "other-study" / "SUV.nii.gz")  # No CTres: not a CTres case.
    cases = layouts.find_cases("autopet", str(root))
    assert [c.case_id for c in cases] == [f"PETCT_0117d7f11f/{study}", f"PETCT_0143bab87a/{study}"]
    assert all(c.mask.endswith("SEG.nii.gz") for c in cases)
    assert len(layouts.find_cases("autopet", str(root), image="SUV")) == 3
    split = layouts.load_splits("autopet_ctres")
    assert cases[0].case_id in split["train"]  # Ids match the published lists.


def test_glob(tmp_path):
    per_folder = tmp_path / "per_folder"
    for case in ("a", "b"):
        _nifti(per_folder / case / "image.nii.gz")
    _nifti(per_folder / "a" / "mask.nii.gz", 1)
    cases = layouts.find_cases(
        "glob", str(per_folder), image_pattern="*/image.nii.gz", mask_pattern="{parent}/mask.nii.gz"
    )
    assert [(c.case_id, c.mask is not None) for c in cases] == [("a/image", True), ("b/image", False)]

    flat = tmp_path / "flat"
    flat.mkdir()
    for case in ("c1", "c2"):
        nrrd.write(str(flat / f"{case}.nrrd"), np.zeros((3, 3, 3), np.int16), {"spacings": [1.0] * 3})
        nrrd.write(str(flat / f"{case}_seg.nrrd"), np.ones((3, 3, 3), np.uint8), {"spacings": [1.0] * 3})
    cases = layouts.find_cases(
        "glob", str(flat), image_pattern="*.nrrd", mask_pattern="{id}_seg.nrrd", require_mask=True
    )
    assert [c.case_id for c in cases] == ["c1", "c2"]  # Masks are not taken as images.
    assert readers.read_volume(cases[0].image, cases[0].mask).mask.dtype == np.uint8

    split_dirs = tmp_path / "split_dirs"
    _nifti(split_dirs / "images" / "x.nii.gz")
    _nifti(split_dirs / "labels" / "x.nii.gz", 1)
    cases = layouts.find_cases(
        "glob", str(split_dirs), image_pattern="images/*.nii.gz", mask_pattern="labels/{stem}.nii.gz"
    )
    assert cases == [
        Case(
            "images/x",
            str(split_dirs / "images" / "x.nii.gz"),
            os.path.normpath(str(split_dirs / "labels" / "x.nii.gz")),
        )
    ]
    with pytest.raises(FileNotFoundError, match=r"labels/y\.nii\.gz is missing"):
        _nifti(split_dirs / "images" / "y.nii.gz")
        layouts.find_cases(
            "glob",
            str(split_dirs),
            image_pattern="images/*.nii.gz",
            mask_pattern="labels/{stem}.nii.gz",
            require_mask=True,
        )


def test_dicom_leaf_folders(tmp_path):
    ct_small = pydicom.data.get_testdata_file("CT_small.dcm")
    root = tmp_path / "lidc"
    for series in ("p1/s1", "p1/s2", "p2/s1"):
        folder = root / series
        folder.mkdir(parents=True)
        for k in range(2):
            ds = copy.deepcopy(pydicom.dcmread(ct_small))
            ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.save_as(str(folder / f"{k}.dcm"), enforce_file_format=True)
    shutil.copy(ct_small, root / "p1" / "index.dcm")  # Not a leaf folder: not a case.
    cases = layouts.find_cases("dicom", str(root))
    assert [c.case_id for c in cases] == ["p1/s1", "p1/s2", "p2/s1"]
    assert all(c.mask is None for c in cases)
    array, affine = readers.read_image(cases[0].image)
    assert array.shape == (128, 128, 2) and affine[2, 2] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no masks"):
        layouts.find_cases("dicom", str(root), require_mask=True)


def test_load_splits():
    brats = layouts.load_splits("brats2021_t1")
    assert {k: len(v) for k, v in brats.items()} == {"train": 750, "validation": 251, "test": 250}
    assert brats["train"][0] == "BraTS2021_00000"
    autopet = layouts.load_splits("autopet_ctres")
    assert {k: len(v) for k, v in autopet.items()} == {"train": 515, "validation": 172, "test": 163}
    for split in (brats, autopet):
        ids = [i for v in split.values() for i in v]
        assert len(ids) == len(set(ids))
    patients = {k: {i.split("/")[0] for i in v} for k, v in autopet.items()}
    assert not patients["train"] & patients["test"]
    with pytest.raises(ValueError, match="unknown split list"):
        layouts.load_splits("lidc")


def _cases(ids):
    return [Case(i, f"/data/{i}.nii.gz") for i in ids]


def test_assign_splits_with_lists():
    lists = {"train": ["a", "b", "gone"], "validation": ["c"], "test": ["d"]}
    with pytest.warns(UserWarning, match=r"1 case\(s\) in no list.*1 listed id"):
        result = layouts.assign_splits(_cases(["d", "c", "b", "a", "extra"]), lists)
    assert {k: [c.case_id for c in v] for k, v in result.items()} == {
        "train": ["a", "b"],
        "validation": ["c"],
        "test": ["d"],
    }
    assert [c.case_id for c in result.unassigned] == ["extra"]
    assert result.missing == {"train": ["gone"], "validation": [], "test": []}
    with pytest.raises(ValueError, match="'a' is in both"):
        layouts.assign_splits(_cases(["a"]), {"train": ["a"], "test": ["a"]})

    brats = layouts.load_splits("brats2021_t1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # A complete download matches without warnings.
        full = layouts.assign_splits(_cases([i for v in brats.values() for i in v]), brats)
    assert {k: len(v) for k, v in full.items()} == {"train": 750, "validation": 251, "test": 250}


def test_assign_splits_by_hash_is_stable():
    ids = [f"case_{i:04d}" for i in range(300)]
    first = layouts.assign_splits(_cases(ids), None)
    assert set(first) == {"train", "validation", "test"}
    assert sum(len(v) for v in first.values()) == 300
    assert 0.7 < len(first["train"]) / 300 < 0.9
    more = layouts.assign_splits(_cases(ids + [f"new_{i}" for i in range(100)]), None)
    for split in first:
        kept = [c.case_id for c in more[split] if c.case_id.startswith("case_")]
        assert kept == [c.case_id for c in first[split]]  # Adding cases moves no existing case.
    assert layouts.assign_splits(_cases(ids), None) == first
    assert layouts.assign_splits(_cases(ids), None, seed=1) != first
    two = layouts.assign_splits(_cases(ids), None, fractions=(0.5, 0.5))
    assert set(two) == {"train", "validation"}
    with pytest.raises(ValueError, match="fractions"):
        layouts.assign_splits(_cases(ids), None, fractions=(0.8, 0.1))


def test_assign_splits_groups_patients():
    ids = [f"PETCT_{p:03d}/study{s}" for p in range(60) for s in range(3)]
    result = layouts.assign_splits(_cases(ids), None, group=lambda cid: cid.split("/")[0])
    owner = {}
    for split, cases in result.items():
        for c in cases:
            assert owner.setdefault(c.case_id.split("/")[0], split) == split

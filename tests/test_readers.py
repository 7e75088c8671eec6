"""Readers on real files shipped with nibabel, pydicom and nilearn, and on broken inputs."""

import ast
import copy
import io
import os
import pathlib
import random
import re
import shutil
import warnings

import nibabel as nib
import nibabel.affines
import nibabel.testing
import nrrd
import numpy as np
import pydicom
import pydicom.data
import pydicom.uid
import pytest
from pydicom.pixels import apply_modality_lut

from isimed import geometry
from isimed.data import prepare
from isimed.data import readers

NIB_DATA = nibabel.testing.data_path
CT_SMALL = pydicom.data.get_testdata_file("CT_small.dcm")


def _save_nifti(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def _oblique_affine():
    """An affine with rotation, anisotropic spacing and an offset (no axis-aligned shortcuts)."""
    c, s = np.cos(0.3), np.sin(0.3)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.array([0.8, 1.1, 2.5])
    affine[:3, 3] = [-40.0, 12.5, 7.0]
    return affine


# --- NIfTI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["anatomical.nii", "standard.nii.gz", "reoriented_anat_moved.nii"])
def test_nibabel_files_world_coordinates(name):
    path = os.path.join(NIB_DATA, name)
    img = nib.load(path)
    array, affine = readers.read_image(path)
    expected = np.asarray(img.dataobj)
    expected = expected.reshape(expected.shape[:3])  # Trailing singletons are dropped.
    np.testing.assert_array_equal(array, expected)
    assert array.dtype.isnative  # anatomical.nii is big-endian on disk.
    assert affine.dtype == np.float64 and affine.shape == (4, 4)
    ijk = np.array([[0, 0, 0], [1, 2, 3], [s - 1 for s in array.shape], [3, 0, 1]])
    np.testing.assert_allclose(
        geometry.voxel_to_world(ijk, affine), nibabel.affines.apply_affine(img.affine, ijk)
    )


@pytest.mark.parametrize(
    "name, shape",
    [
        ("example4d.nii.gz", (128, 96, 24, 2)),
        ("example_nifti2.nii.gz", (32, 20, 12, 2)),
        ("functional.nii", (17, 21, 3, 20)),
    ],
)
def test_4d_file_where_3d_expected(name, shape):
    with pytest.raises(ValueError, match=re.escape(name) + ".*" + re.escape(str(shape))):
        readers.read_image(os.path.join(NIB_DATA, name), ndim=3)


def test_trailing_singleton_squeezed(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6, 1)
    path = _save_nifti(tmp_path / "a.nii.gz", data, _oblique_affine())
    array, affine = readers.read_image(path)
    assert array.shape == (4, 5, 6) and array.dtype == np.int16
    np.testing.assert_allclose(affine, _oblique_affine(), atol=1e-5)


def test_2d_from_one_slice_keeps_in_plane_distances(tmp_path):
    affine3 = _oblique_affine()
    path = _save_nifti(tmp_path / "slice.nii.gz", np.ones((6, 7, 1), np.float32), affine3)
    array, affine = readers.read_image(path, ndim=2)
    assert array.shape == (6, 7) and affine.shape == (3, 3)
    ij = np.array([[0, 0], [5, 0], [0, 6], [3, 4]])
    in_plane = geometry.voxel_to_world(ij, affine)
    world = geometry.voxel_to_world(np.c_[ij, np.zeros(len(ij))], affine3)
    np.testing.assert_allclose(
        geometry.pairwise_distances(in_plane), geometry.pairwise_distances(world), atol=1e-4
    )
    with pytest.raises(ValueError, match=r"a\.nii\.gz.*2D"):
        readers.read_image(_save_nifti(tmp_path / "a.nii.gz", np.ones((3, 3, 2), np.float32)), ndim=2)


def test_mni152_template(tmp_path):
    datasets = pytest.importorskip("nilearn.datasets")
    img = datasets.load_mni152_template()
    path = str(tmp_path / "mni152.nii.gz")
    img.to_filename(path)
    array, affine = readers.read_image(path)
    assert array.shape == img.shape
    np.testing.assert_allclose(affine, img.affine)
    # MNI origin (the anterior commissure) lies inside the volume, at world (0, 0, 0).
    origin_voxel = geometry.world_to_voxel(np.zeros(3), affine)
    assert np.all(origin_voxel > 0) and np.all(origin_voxel < np.array(array.shape) - 1)
    np.testing.assert_allclose(geometry.voxel_to_world(origin_voxel, affine), 0.0, atol=1e-9)


def test_truncated_nifti(tmp_path):
    path = _save_nifti(tmp_path / "cut.nii.gz", np.random.default_rng(0).random((20, 20, 20)))
    blob = open(path, "rb").read()
    for cut in (len(blob) // 2, 100):
        with open(path, "wb") as f:
            f.write(blob[:cut])
        with pytest.raises(ValueError, match=r"cut\.nii\.gz.*cannot read NIfTI"):
            readers.read_image(path)


def test_zero_spacing(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((3, 4, 5))
    header.set_sform(np.diag([1.0, 0.0, 2.0, 1.0]), code="aligned")  # nibabel refuses it as affine=
    path = str(tmp_path / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), None, header=header), path)
    with pytest.raises(ValueError, match=r"flat\.nii\.gz.*spacing"):
        readers.read_image(path)


def test_nan_voxels(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[0, 0, :3] = np.nan
    path = _save_nifti(tmp_path / "holes.nii.gz", data)
    with pytest.raises(ValueError, match=r"holes\.nii\.gz.*3 NaN"):
        readers.read_image(path)


def test_real_file_with_nan_voxels():
    """nibabel's resampled_anat_moved.nii fills the outside of its field of view with NaN."""
    with pytest.raises(ValueError, match=r"resampled_anat_moved\.nii.*153 NaN"):
        readers.read_image(os.path.join(NIB_DATA, "resampled_anat_moved.nii"))


def test_read_volume_and_mask_checks(tmp_path):
    affine = _oblique_affine()
    image = _save_nifti(tmp_path / "img.nii.gz", np.zeros((4, 5, 6), np.int16), affine)
    good = _save_nifti(tmp_path / "seg.nii.gz", np.ones((4, 5, 6), np.uint8), affine)
    volume = readers.read_volume(image, good)
    assert volume.image.shape == volume.mask.shape == (4, 5, 6) and volume.source == image
    assert volume.mask.dtype == np.uint8

    small = _save_nifti(tmp_path / "small_seg.nii.gz", np.ones((4, 5, 5), np.uint8), affine)
    with pytest.raises(ValueError, match=r"small_seg\.nii\.gz.*\(4, 5, 5\).*img\.nii\.gz.*\(4, 5, 6\)"):
        readers.read_volume(image, small)
    shifted_affine = affine.copy()
    shifted_affine[0, 3] += 0.5
    shifted = _save_nifti(tmp_path / "shifted_seg.nii.gz", np.ones((4, 5, 6), np.uint8), shifted_affine)
    with pytest.raises(ValueError, match=r"shifted_seg\.nii\.gz.*img\.nii\.gz"):
        readers.read_volume(image, shifted)


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "x.mha").write_bytes(b"")
    with pytest.raises(ValueError, match=r"x\.mha.*unknown image format"):
        readers.read_image(str(tmp_path / "x.mha"))
    with pytest.raises(FileNotFoundError, match="nothere.nii"):
        readers.read_image(str(tmp_path / "nothere.nii"))


# --- NRRD -----------------------------------------------------------------------------------


def test_nrrd_lps_converted_to_ras(tmp_path):
    lps = readers.LPS_TO_RAS @ _oblique_affine()  # The same geometry written the way ITK does.
    data = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    path = str(tmp_path / "a.nrrd")
    nrrd.write(
        path,
        data,
        {
            "space": "left-posterior-superior",
            "space directions": lps[:3, :3].T,  # One row per array axis.
            "space origin": lps[:3, 3],
            "kinds": ["domain"] * 3,
        },
    )
    array, affine = readers.read_image(path)
    np.testing.assert_array_equal(array, data)
    np.testing.assert_allclose(affine, _oblique_affine(), atol=1e-9)


def test_nrrd_ras_spacings_and_missing_geometry(tmp_path):
    ras = str(tmp_path / "ras.nrrd")
    nrrd.write(
        ras,
        np.zeros((2, 3, 4), np.uint8),
        {
            "space": "right-anterior-superior",
            "space directions": np.diag([1.0, 2.0, 3.0]),
            "space origin": np.array([5.0, 6.0, 7.0]),
        },
    )
    np.testing.assert_allclose(readers.read_image(ras)[1][:3, 3], [5, 6, 7])
    spaced = str(tmp_path / "spacings.nrrd")
    nrrd.write(spaced, np.zeros((2, 3, 4), np.uint8), {"spacings": [0.5, 0.7, 2.0]})
    np.testing.assert_allclose(readers.read_image(spaced)[1], np.diag([0.5, 0.7, 2.0, 1.0]))
    bare = str(tmp_path / "bare.nrrd")
    nrrd.write(bare, np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(ValueError, match=r"bare\.nrrd.*neither 'space directions' nor 'spacings'"):
        readers.read_image(bare)


def test_nrrd_non_spatial_axis(tmp_path):
    directions = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [np.nan] * 3])
    header = {
        "space": "left-posterior-superior",
        "space directions": directions,
        "kinds": ["domain"] * 3 + ["list"],
    }
    one = str(tmp_path / "one.nrrd")
    nrrd.write(one, np.zeros((2, 3, 4, 1), np.float32), header)
    assert readers.read_image(one)[0].shape == (2, 3, 4)
    many = str(tmp_path / "many.nrrd")
    nrrd.write(many, np.zeros((2, 3, 4, 3), np.float32), header)
    with pytest.raises(ValueError, match=r"many\.nrrd.*\(2, 3, 4, 3\)"):
        readers.read_image(many)


def test_nifti_to_nrrd_round_trip(tmp_path):
    """An image written by nibabel, converted to an LPS NRRD, reads back identically."""
    data = np.random.default_rng(1).integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    nifti = _save_nifti(tmp_path / "ct.nii.gz", data, _oblique_affine())
    array, affine = readers.read_image(nifti)
    lps = readers.LPS_TO_RAS @ affine
    path = str(tmp_path / "ct.nrrd")
    nrrd.write(path, array, {"space": "LPS", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]})
    array2, affine2 = readers.read_image(path)
    np.testing.assert_array_equal(array2, data)
    np.testing.assert_allclose(affine2, affine, atol=1e-9)


# --- DICOM ----------------------------------------------------------------------------------


def _ras(point_lps):
    return np.asarray(point_lps, np.float64) * np.array([-1.0, -1.0, 1.0])


def _write_series(
    folder, positions, *, orientation=None, pixel_spacing=None, slope=None, series_uid=None, name_prefix="im"
):
    """Copies of CT_small.dcm at `positions` (LPS), each with pixels offset by 10*index, written
    in shuffled order under random names. SliceThickness is deliberately wrong (1 mm)."""
    os.makedirs(folder, exist_ok=True)
    template = pydicom.dcmread(CT_SMALL)
    series_uid = series_uid or pydicom.uid.generate_uid()
    order = list(range(len(positions)))
    random.Random(len(positions)).shuffle(order)
    written = []
    for index in order:
        ds = copy.deepcopy(template)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in positions[index]]
        ds.InstanceNumber = index + 1
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesInstanceUID = series_uid
        ds.SliceThickness = 1.0
        if orientation is not None:
            ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        if pixel_spacing is not None:
            ds.PixelSpacing = list(pixel_spacing)
        if slope is not None:
            ds.RescaleSlope = slope
        ds.PixelData = (template.pixel_array + 10 * index).astype(np.int16).tobytes()
        path = os.path.join(folder, f"{name_prefix}{random.Random(index).randrange(10**6):06d}_{index}")
        ds.save_as(path, enforce_file_format=True)
        written.append((index, path))
    return series_uid, dict(written)


def _oblique_orientation():
    c, s = np.cos(0.5), np.sin(0.5)
    row = np.array([c, s, 0.0])
    col = np.array([-s * 0.6, c * 0.6, -0.8])  # Unit length and perpendicular to row.
    return np.r_[row, col]


def test_dicom_single_file_ct_small():
    ds = pydicom.dcmread(CT_SMALL)
    array, affine = readers.read_image(CT_SMALL)
    assert array.shape == (ds.Columns, ds.Rows, 1)
    np.testing.assert_array_equal(array[:, :, 0], apply_modality_lut(ds.pixel_array, ds).T)
    np.testing.assert_allclose(geometry.voxel_to_world([0, 0, 0], affine), _ras(ds.ImagePositionPatient))
    spacing = geometry.spacing_from_affine(affine)
    # The one place SliceThickness is used: the third axis of a one-slice volume.
    np.testing.assert_allclose(spacing, [ds.PixelSpacing[1], ds.PixelSpacing[0], ds.SliceThickness])


def test_dicom_single_file_as_2d():
    ds = pydicom.dcmread(CT_SMALL)
    array, affine = readers.read_image(CT_SMALL, ndim=2)
    assert array.shape == (128, 128) and affine.shape == (3, 3)
    np.testing.assert_allclose(geometry.spacing_from_affine(affine), np.float64(ds.PixelSpacing)[::-1])


def test_dicom_series_order_spacing_hu_and_affine(tmp_path):
    orientation = _oblique_orientation()
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.array([-120.0, 30.0, 55.0])
    gap = 2.5
    positions = [origin + k * gap * normal for k in range(5)]
    folder = str(tmp_path / "series")
    _, files = _write_series(folder, positions, orientation=orientation, pixel_spacing=[0.5, 0.8])
    (tmp_path / "series" / "README.txt").write_text("not a DICOM file")
    with pytest.warns(UserWarning, match="skipped 1 non-DICOM"):
        array, affine = readers.read_image(folder)

    assert array.shape == (128, 128, 5)
    np.testing.assert_allclose(geometry.spacing_from_affine(affine), [0.8, 0.5, gap], rtol=1e-6)
    for k in range(5):
        ds = pydicom.dcmread(files[k])
        np.testing.assert_array_equal(array[:, :, k], apply_modality_lut(ds.pixel_array, ds).T)
        # DICOM PS3.3 C.7.6.2.1.1: P(r, c) = IPP + c * row_dir * dx + r * col_dir * dy.
        for r, c in [(0, 0), (7, 3), (127, 0), (0, 127)]:
            lps = positions[k] + c * orientation[:3] * 0.8 + r * orientation[3:] * 0.5
            np.testing.assert_allclose(geometry.voxel_to_world([c, r, k], affine), _ras(lps), atol=1e-4)


def test_dicom_rescale_float_slope(tmp_path):
    folder = str(tmp_path / "pet")
    _, files = _write_series(folder, [[0, 0, z] for z in (0.0, 3.0, 6.0)], slope=0.37)
    array, _ = readers.read_image(folder)
    assert np.issubdtype(array.dtype, np.floating)
    ds = pydicom.dcmread(files[1])
    np.testing.assert_allclose(array[:, :, 1], apply_modality_lut(ds.pixel_array, ds).T, rtol=1e-6)


def test_nibabel_mr_pair_spacing_from_positions(tmp_path):
    """Real MR slices 3 mm apart with SliceThickness 2.5 mm: the spacing must come from positions."""
    for name in ("0.dcm", "1.dcm"):
        shutil.copy(os.path.join(NIB_DATA, name), tmp_path / name)
    array, affine = readers.read_image(str(tmp_path))
    first, second = (pydicom.dcmread(os.path.join(NIB_DATA, n)) for n in ("0.dcm", "1.dcm"))
    assert float(first.SliceThickness) == 2.5 and array.shape == (256, 256, 2)
    normal = np.cross(
        np.array(first.ImageOrientationPatient[:3], float), np.array(first.ImageOrientationPatient[3:], float)
    )
    gap = np.dot(np.subtract(second.ImagePositionPatient, first.ImagePositionPatient, dtype=float), normal)
    assert gap == pytest.approx(3.0, abs=1e-3)
    for k, ds in enumerate((first, second)):
        np.testing.assert_allclose(geometry.voxel_to_world([0, 0, k], affine), _ras(ds.ImagePositionPatient))
        np.testing.assert_array_equal(array[:, :, k], ds.pixel_array.T)


def test_dicom_bad_series(tmp_path):
    gaps = str(tmp_path / "gaps")
    _write_series(gaps, [[0, 0, z] for z in (0.0, 2.5, 5.0, 10.0)])
    with pytest.raises(ValueError, match=r"gaps.*not uniform.*5\.0"):
        readers.read_image(gaps)

    dup = str(tmp_path / "dup")
    _write_series(dup, [[0, 0, z] for z in (0.0, 2.5, 2.5)])
    with pytest.raises(ValueError, match=r"dup.*share one position"):
        readers.read_image(dup)

    two = str(tmp_path / "two")
    uid_a, _ = _write_series(two, [[0, 0, z] for z in (0.0, 2.0)], name_prefix="a")
    uid_b, _ = _write_series(two, [[0, 0, z] for z in (0.0, 3.0, 6.0)], name_prefix="b")
    a, b = sorted([re.escape(uid_a), re.escape(uid_b)])
    with pytest.raises(ValueError, match=rf"two.*2 DICOM series.*{a}.*{b}"):
        readers.read_dicom_series(two)
    array, affine = readers.read_dicom_series(two, series_uid=uid_b)
    assert array.shape[2] == 3 and geometry.spacing_from_affine(affine)[2] == pytest.approx(3.0)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"empty.*no DICOM image files"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        readers.read_image(str(empty))

    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\0" * 300)
    with pytest.raises(ValueError, match=r"fake\.dcm.*not a DICOM"):
        readers.read_image(str(fake))


# --- MedMNIST -------------------------------------------------------------------------------


def _medmnist(path, shape, n=(6, 2, 3), labels=14):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (count, labels), dtype=np.uint8)
    np.savez(path, **arrays)
    return str(path), arrays


@pytest.mark.parametrize("shape", [(28, 28), (8, 8, 8)])
def test_medmnist(tmp_path, shape):
    path, arrays = _medmnist(tmp_path / "chestmnist.npz", shape)
    images, labels = readers.read_medmnist(path, "validation")
    np.testing.assert_array_equal(images, arrays["val_images"])
    np.testing.assert_array_equal(labels, arrays["val_labels"])
    assert readers.read_medmnist(path, "train")[0].shape == (6, *shape)
    affine = readers.medmnist_affine(shape[0], len(shape), 1.5)
    np.testing.assert_array_equal(affine, np.diag([1.5] * len(shape) + [1.0]))


def test_medmnist_bad_files(tmp_path):
    path, arrays = _medmnist(tmp_path / "ok.npz", (4, 4))
    partial = str(tmp_path / "partial.npz")
    np.savez(partial, train_images=arrays["train_images"])
    with pytest.raises(ValueError, match=r"partial\.npz.*train_labels.*present.*train_images"):
        readers.read_medmnist(partial, "train")
    uneven = str(tmp_path / "uneven.npz")
    np.savez(uneven, test_images=arrays["test_images"], test_labels=arrays["train_labels"])
    with pytest.raises(ValueError, match=r"uneven\.npz.*3 test_images but 6 test_labels"):
        readers.read_medmnist(uneven, "test")
    objects = str(tmp_path / "objects.npz")
    np.savez(
        objects,
        train_images=np.array([arrays["train_images"], None], dtype=object),
        train_labels=arrays["train_labels"],
    )
    with pytest.raises(ValueError, match=r"objects\.npz.*object arrays.*never loaded"):
        readers.read_medmnist(objects, "train")
    with pytest.raises(ValueError, match="unknown MedMNIST split"):
        readers.read_medmnist(path, "holdout")
    with pytest.raises(ValueError, match="spacing"):
        readers.medmnist_affine(28, 2, 0.0)


# --- No pickle -------------------------------------------------------------------------------

REPO = pathlib.Path(__file__).resolve().parents[1]
UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve"}
UNPICKLING_CALLS = ("read_pickle", "torch.load")


def _pickle_uses(source, name):
    """Places in `source` that could unpickle: an import of a pickle-family module, any
    `allow_pickle=` other than the literal False, `np.load` without an explicit
    `allow_pickle=False`, and pandas/torch loaders that unpickle."""
    problems = []
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            problems += [
                f"{name}:{node.lineno}: import {m}" for m in modules if m.split(".")[0] in UNPICKLING_MODULES
            ]
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            keywords = {kw.arg: kw.value for kw in node.keywords}
            flag = keywords.get("allow_pickle")
            if "allow_pickle" in keywords and not (isinstance(flag, ast.Constant) and flag.value is False):
                problems.append(f"{name}:{node.lineno}: {func}(allow_pickle={ast.unparse(flag)})")
            elif func in ("np.load", "numpy.load") and "allow_pickle" not in keywords:
                problems.append(f"{name}:{node.lineno}: {func} without allow_pickle=False")
            if func.endswith(UNPICKLING_CALLS):
                problems.append(f"{name}:{node.lineno}: {func}")
    return problems


def test_pickle_check_finds_unpickling_code():
    bad = (
        "import pickle\nfrom joblib import load\nnp.load(f)\nnp.load(f, allow_pickle=True)\n"
        "numpy.load(f, allow_pickle=flag)\npd.read_pickle(f)\n"
    )
    assert len(_pickle_uses(bad, "bad.py")) == 6
    assert _pickle_uses("np.load(f, allow_pickle=False)\nnib.load(f)\n", "good.py") == []


def test_no_pickle_in_source():
    """No module of the package, the entry points or the configs can unpickle."""
    files = [
        *REPO.glob("isimed/**/*.py"),
        REPO / "main.py",
        REPO / "linear_eval.py",
        *REPO.glob("configs/*.py"),
    ]
    problems, loads = [], 0
    for path in files:
        source = path.read_text()
        problems += _pickle_uses(source, str(path.relative_to(REPO)))
        loads += len(re.findall(r"np\.load\(.*allow_pickle=False", source))
    assert not problems, "code that could unpickle:\n" + "\n".join(problems)
    # Not vacuous: the scan saw the package and its npz loader (readers).
    assert REPO / "isimed" / "data" / "readers.py" in files and loads >= 1


class _RunsCodeWhenUnpickled:
    """An object whose unpickling calls `_unpickled`, as a malicious file's would run its code."""

    def __reduce__(self):
        return _unpickled, ()


UNPICKLED = []


def _unpickled():
    UNPICKLED.append(True)


def test_object_arrays_are_refused_without_running_code(tmp_path):
    from isimed.data import prepared

    payload = np.array([_RunsCodeWhenUnpickled(), None], dtype=object)  # np.savez pickles it.
    buf = io.BytesIO()
    np.savez(buf, id=np.int32(0), case_id=np.str_("x"), image=payload)
    record = buf.getvalue()
    UNPICKLED.clear()
    with np.load(io.BytesIO(record), allow_pickle=True) as npz:
        npz["image"]  # The payload is live: loading it with pickle runs its code.
    assert UNPICKLED == [True]

    UNPICKLED.clear()
    with pytest.raises(ValueError, match=r"example\.array_record: a record in the old npz format"):
        prepared.deserialize(record, where="example.array_record")
    labels = np.zeros((2, 1), np.uint8)
    np.savez(tmp_path / "objects.npz", train_images=payload, train_labels=labels)
    with pytest.raises(ValueError, match=r"objects\.npz.*object arrays.*never loaded"):
        readers.read_medmnist(str(tmp_path / "objects.npz"), "train")
    np.savez(
        tmp_path / "extra.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=labels, notes=payload
    )
    readers.read_medmnist(str(tmp_path / "extra.npz"), "train")  # Keys not read are not decoded.
    assert UNPICKLED == []


# --- Truncated and corrupt files, declared sizes, degenerate grids ---------------------------


@pytest.mark.parametrize("cut", [400, 1000, 2000, 20000, -10])
def test_truncated_dicom_says_truncated(tmp_path, cut):
    """pydicom reads a cut file without complaint (a short last value, or a data set that simply
    ends); it must be named truncated, not "PixelSpacing is missing", alone or in a series."""
    data = pathlib.Path(CT_SMALL).read_bytes()
    (tmp_path / "series").mkdir()
    path = tmp_path / "series" / "cut.dcm"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=r"cut\.dcm: truncated"):
        readers.read_image(str(path))
    shutil.copy(CT_SMALL, tmp_path / "series" / "whole.dcm")
    with pytest.raises(ValueError, match=r"cut\.dcm: truncated"):
        readers.read_image(str(tmp_path / "series"))


def test_pydicom_truncated_files_are_refused_and_whole_ones_are_not(tmp_path):
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        with pytest.raises(ValueError, match=re.escape(name) + r": truncated DICOM file"):
            readers._read_dicom_file(pydicom.data.get_testdata_file(name))
    for name in (
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "rtplan.dcm",
    ):
        readers._read_dicom_file(pydicom.data.get_testdata_file(name))
    padded = tmp_path / "padded.dcm"  # Zero bytes after the data set: padding, not a cut element.
    padded.write_bytes(pathlib.Path(CT_SMALL).read_bytes() + bytes(3))
    readers._read_dicom_file(str(padded))


def test_declared_size_is_checked_before_reading(tmp_path):
    # All zeros: gzip's best case, still within its 1032:1 bound, so the file reads.
    path = _save_nifti(tmp_path / "zeros.nii.gz", np.zeros((96, 96, 96), np.int16))
    assert os.path.getsize(path) * readers.GZIP_MAX_RATIO >= 96**3 * 2
    assert readers.read_image(path)[0].shape == (96, 96, 96)
    # An uncompressed file one voxel short: refused from its size, nothing allocated.
    path = _save_nifti(tmp_path / "short.nii", np.ones((4, 5, 6), np.float32))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(
        ValueError, match=r"short\.nii: header declares shape \(4, 5, 6\) of float32 \(480 bytes\) "
    ):
        readers.read_image(path)


def test_out_of_memory_names_the_file(tmp_path, monkeypatch):
    path = _save_nifti(tmp_path / "big.nii.gz", np.ones((4, 5, 6), np.float32))

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(readers, "_finish", no_memory)
    with pytest.raises(MemoryError, match=r"big\.nii\.gz: not enough memory to read this image"):
        readers.read_image(path)


def test_axes_must_span_a_volume():
    tilted = np.eye(4)
    tilted[:3, 2] = [0.0, np.sin(np.radians(30)), np.cos(np.radians(30))]  # 30 degree gantry tilt.
    readers.check_axes(tilted, "tilted")
    for eps in (1e-3, 1e-5):
        sheared = np.diag([0.7, 0.7, 2.0, 1.0])
        sheared[:3, 1] = 0.7 * np.array([1.0, eps, 0.0]) / np.linalg.norm([1.0, eps, 0.0])
        with pytest.raises(ValueError, match=r"sheared: the affine's axes are nearly collinear"):
            readers.check_axes(sheared, "sheared")
    with pytest.raises(ValueError, match=r"nearly collinear"):  # The same check when preparing.
        prepare.process_volume(np.ones((4, 4, 4)), sheared, None, intensity="uint8", where="x")


def test_2d_file_where_3d_expected_and_nrrd_axes(tmp_path):
    path = str(tmp_path / "plane.nrrd")
    nrrd.write(path, np.ones((5, 6), np.float32), {"spacings": [0.5, 0.5]})
    with pytest.raises(ValueError, match=r"plane\.nrrd: expected a 3D image but the file holds a 2D image"):
        readers.read_image(path)
    assert readers.read_image(path, ndim=2)[0].shape == (5, 6)
    # NaN spacing marks a non-spatial axis (of size 1 here: dropped); -1 and inf are errors.
    nrrd.write(path, np.ones((5, 6, 7, 1), np.float32), {"spacings": [1.0, 1.0, 1.0, np.nan]})
    assert readers.read_image(path)[0].shape == (5, 6, 7)
    for bad in (-1.0, np.inf):
        nrrd.write(path, np.ones((5, 6, 7), np.float32), {"spacings": [1.0, bad, 1.0]})
        with pytest.raises(ValueError, match=r"plane\.nrrd: voxel spacing must be finite and > 0"):
            readers.read_image(path)

"""docs/errors.md checked against the messages the code produces.

One registry, `TRIGGERS`: the checkpoint and config side (from tests/test_checkpoints.py) and the
data side (readers, layouts, prepare, prepared folders, below). Each documented row has a trigger
that makes its bad input, and each trigger a row: the table cannot drift from the code.
"""

import copy
import gzip
import json
import os
import re
import shutil
import struct
from pathlib import Path

import ml_collections
import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pydicom.data
import pytest
from test_checkpoints import TRIGGERS as CHECKPOINT_TRIGGERS
from test_finetune import TRIGGERS as FINETUNE_TRIGGERS
from test_locate import TRIGGERS as LOCATE_TRIGGERS

from isimed.data import layouts
from isimed.data import pipeline
from isimed.data import prepare
from isimed.data import prepared
from isimed.data import readers

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "errors.md"
CT_SMALL = pydicom.data.get_testdata_file("CT_small.dcm")


def _doc_rows() -> dict[str, str]:
    """`{id: message pattern}` of the table in docs/errors.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] == "id" or set(cells[0]) <= set("-: "):
            continue
        pattern = re.fullmatch(r"`(.*)`", cells[4])
        assert pattern, f"docs/errors.md row {cells[0]}: the pattern must be in backticks"
        assert cells[0] not in rows, f"docs/errors.md: duplicate id {cells[0]}"
        rows[cells[0]] = pattern.group(1)
    return rows


class Trigger:
    """What a trigger gets: `tmp_path`, `monkeypatch`, `message(fn)` (what `fn()` makes the user
    see: the exception's message, else the warnings logged and the lines printed) and, built only
    when a trigger asks, copies of the `pretrained` workdir (checkpoints at steps 50, 100, 150)
    and the matching config."""

    def __init__(self, request, tmp_path, monkeypatch, caplog, capsys):
        self.request, self.tmp_path = request, tmp_path
        self.monkeypatch, self.caplog, self.capsys = monkeypatch, caplog, capsys

    @property
    def pretrained_dir(self) -> Path:
        return Path(self.request.getfixturevalue("pretrained")[0])

    @property
    def config(self):
        return self.request.getfixturevalue("test_config")

    def workdir(self) -> Path:
        copy_dir = self.tmp_path / f"copy{len(list(self.tmp_path.iterdir()))}"
        shutil.copytree(self.pretrained_dir, copy_dir, ignore=shutil.ignore_patterns("*.png", "tensorboard"))
        return copy_dir

    def message(self, fn) -> str:
        self.capsys.readouterr()
        self.caplog.clear()
        with self.caplog.at_level("WARNING"):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - the message is what is checked
                return f"{type(e).__name__}: {e}"
        return self.caplog.text + self.capsys.readouterr().out

    def start(self, workdir: Path, **changes):
        """`train_and_evaluate` up to the first step (nothing trained or compiled), with `changes`
        ({"optim.learning_rate": 1e-3, ...}) applied to the config."""
        from isimed import train

        self.monkeypatch.setattr(train, "_train", lambda run, state, start, summary: (state, True))
        config = self.config.copy_and_resolve_references()
        for key, value in changes.items():
            *parents, leaf = key.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[leaf] = value
        return lambda: train.train_and_evaluate(config, str(workdir))


# ---------------------------------------------------------------------------------------------
# Data side: tiny files written per trigger.


def _nifti(path: Path, data=None, affine=None) -> str:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) + 1 if data is None else data
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _cut(path: str, size: int) -> str:
    with open(path, "r+b") as f:
        f.truncate(size)
    return path


def _read(path: str, **kwargs):
    return lambda: readers.read_image(path, **kwargs)


def _nrrd(t: "Trigger", name: str, header: dict, shape=(4, 5, 6)) -> str:
    path = str(t.tmp_path / name)
    nrrd.write(path, np.ones(shape, np.float32), header)
    return path


def _huge_nifti(t: "Trigger", suffix: str) -> str:
    """A header declaring 30000^3 float32 voxels (98 TiB) in front of 64 voxels."""
    path = _nifti(t.tmp_path / "huge.nii", np.ones((4, 4, 4), np.float32))
    data = bytearray(Path(path).read_bytes())
    data[42:48] = struct.pack("<3h", 30000, 30000, 30000)  # dim[1:4] of the NIfTI-1 header.
    out = t.tmp_path / f"huge{suffix}"
    out.write_bytes(gzip.compress(bytes(data)) if suffix == ".nii.gz" else bytes(data))
    return str(out)


def _nan_voxels(t: "Trigger"):
    data = np.ones((4, 5, 6), np.float32)
    data[0, 0, :3] = np.nan
    return _read(_nifti(t.tmp_path / "holes.nii.gz", data))


def _written(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _collinear(t: "Trigger"):
    affine = np.eye(4)
    affine[:3, 1] = [1.0, 1e-5, 0.0]  # Axis 1 almost along axis 0: |det| 1e-5 of a proper grid.
    return _read(_nifti(t.tmp_path / "sheared.nii.gz", affine=affine))


def _sform(t: "Trigger", name: str, affine: np.ndarray) -> str:
    """A NIfTI whose sform is `affine` (nibabel refuses such affines as `affine=`)."""
    header = nib.Nifti1Header()
    header.set_data_shape((4, 5, 6))
    header.set_sform(affine, code="aligned")
    path = str(t.tmp_path / name)
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), None, header=header), path)
    return path


def _dicom(t: "Trigger", name: str, **changes) -> str:
    ds = pydicom.dcmread(CT_SMALL)
    for key, value in changes.items():
        setattr(ds, key, value)
    path = str(t.tmp_path / name)
    ds.save_as(path, enforce_file_format=True)
    return path


def _series(t: "Trigger", name: str, zs, uid=None) -> str:
    folder = t.tmp_path / name
    folder.mkdir(exist_ok=True)
    template = pydicom.dcmread(CT_SMALL)
    uid = uid or pydicom.uid.generate_uid()
    for k, z in enumerate(zs):
        ds = copy.deepcopy(template)
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesInstanceUID = uid
        ds.save_as(str(folder / f"{uid[-6:]}_{k}.dcm"), enforce_file_format=True)
    return str(folder)


def _two_series(t: "Trigger"):
    _series(t, "two", [0.0, 2.0], uid="1.2.3.4")
    return _read(_series(t, "two", [0.0, 3.0, 6.0], uid="1.2.3.5"))


def _mask_off_grid(t: "Trigger"):
    image = _nifti(t.tmp_path / "img.nii.gz")
    affine = np.eye(4)
    affine[0, 3] = 0.5
    mask = _nifti(t.tmp_path / "seg.nii.gz", np.ones((4, 5, 6), np.uint8), affine)
    return lambda: readers.read_volume(image, mask)


def _medmnist_pickled(t: "Trigger"):
    path = str(t.tmp_path / "pickled.npz")
    images = np.empty(2, object)
    np.savez(path, train_images=images, train_labels=np.zeros((2, 1)))
    return lambda: readers.read_medmnist(path, "train")


def _raw(t: "Trigger", cases: dict) -> Path:
    """A BraTS-style raw folder: {name: image array or a path-writing function}."""
    root = t.tmp_path / "raw"
    for name, image in cases.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        _nifti(root / name / f"{name}_t1.nii.gz", image)
    return root


def _good(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 500, (6, 5, 4)).astype(np.int16)


def _prepare(root, out, **kwargs):
    kwargs = {"splits": {"train": sorted(os.listdir(root))}, "progress": False, **kwargs}
    return lambda: prepare.prepare("brats", str(root), str(out), **kwargs)


def _empty_splits(t: "Trigger"):
    root = _raw(t, {f"c{i}": _good(i) for i in range(3)})
    return _prepare(root, t.tmp_path / "out", splits="fractions")


def _disk_full(t: "Trigger"):
    """The case files written to /dev/full: ENOSPC, as on a full disk."""

    def full_disk(path, mode="r", *args, **kwargs):
        if str(path).endswith(prepared.MAPPED_SUFFIX + ".tmp"):
            path = "/dev/full"
        return open(path, mode, *args, **kwargs)

    t.monkeypatch.setattr(prepare, "open", full_disk, raising=False)
    root = _raw(t, {"c0": _good(0), "c1": _good(1)})
    return _prepare(root, t.tmp_path / "out", skip_bad=True)


def _prepare_other_settings(t: "Trigger"):
    root = _raw(t, {"c0": _good()})
    _prepare(root, t.tmp_path / "out")()
    return _prepare(root, t.tmp_path / "out", spacing=2.0)


def _prepare_other_cases(t: "Trigger"):
    root = _raw(t, {"c0": _good(0), "c1": _good(1)})
    _prepare(root, t.tmp_path / "out")()
    shutil.rmtree(root / "c1")
    return _prepare(root, t.tmp_path / "out")


def _prepare_not_empty(t: "Trigger"):
    (t.tmp_path / "out").mkdir()
    (t.tmp_path / "out" / "notes.txt").write_text("mine")
    return _prepare(_raw(t, {"c0": _good()}), t.tmp_path / "out")


def _prepare_unwritable(t: "Trigger"):
    (t.tmp_path / "a_file").write_text("")
    return _prepare(_raw(t, {"c0": _good()}), t.tmp_path / "a_file" / "out")


def _prepared(t: "Trigger", storage: str = "mapped") -> Path:
    """A prepared folder of three tiny cases (c0, c1, c2) in split train."""
    out = t.tmp_path / "prepared"
    _prepare(_raw(t, {f"c{i}": _good(i) for i in range(3)}), out, storage=storage)()
    return out


def _manifest_edit(t: "Trigger", edit):
    out = _prepared(t)
    manifest = json.loads((out / prepared.MANIFEST).read_text())
    edit(manifest)
    (out / prepared.MANIFEST).write_text(json.dumps(manifest))
    return lambda: prepared.data_source(str(out), "train")


def _escape(manifest):
    manifest["splits"]["train"]["files"][1]["file"] = "../../x.array_record"


def _record_truncated(t: "Trigger"):
    out = _prepared(t)
    source = prepared.data_source(str(out), "train")
    good = prepared.serialize(source[1])
    prepare._write_records(str(out / "train" / "c1.isimed"), [good[:-5]])
    return lambda: prepared.data_source(str(out), "train")[1]


def _record_overwritten(t: "Trigger"):
    out = _prepared(t)
    path = out / "train" / "c1.isimed"
    data = bytearray(path.read_bytes())
    image_offset = int.from_bytes(data[16 + 2 * 80 + 24 : 16 + 2 * 80 + 32], "little")  # Entry 3.
    data[image_offset] ^= 0xFF  # A valid layout, a wrong voxel: only the checksum can tell.
    path.write_bytes(bytes(data))
    return lambda: prepared.data_source(str(out), "train")[1]


def _file_truncated(t: "Trigger"):
    out = _prepared(t, storage="array_record")
    _cut(str(out / "train" / "c1.array_record"), 10)
    return lambda: prepared.data_source(str(out), "train")[1]


def _crops_fit(out: Path, crop_size):
    data = ml_collections.ConfigDict({"name": "prepared", "dir": str(out), "crop_size": crop_size})
    return lambda: pipeline.check_crops_fit(data, ["train"])


def _crop_too_large(t: "Trigger"):
    out = t.tmp_path / "prepared"
    _prepare(_raw(t, {"c0": _good(0), "c1": _good(1)[:5]}), out)()  # c1: 5 x 5 x 4 voxels.
    return _crops_fit(out, (6, 5, 4))


def _incomplete(t: "Trigger"):
    return _manifest_edit(t, lambda m: m.update(status="incomplete"))


def _old_format(t: "Trigger"):
    def edit(manifest):
        del manifest["format_version"]
        manifest["version"] = 1

    return _manifest_edit(t, edit)


DATA_TRIGGERS = {
    "input.nifti_truncated": lambda t: _read(_cut(_nifti(t.tmp_path / "cut.nii.gz", _good()), 200)),
    "input.nrrd_truncated": lambda t: _read(
        _cut(_nrrd(t, "cut.nrrd", {"spacings": [1.0, 1.0, 1.0], "encoding": "raw"}, (20, 20, 20)), 4000)
    ),
    "input.dicom_truncated": lambda t: _read(_cut(_dicom(t, "cut.dcm"), 400)),
    "input.dicom_cut_value": lambda t: _read(_cut(_dicom(t, "cut.dcm"), 20000)),
    "input.not_dicom": lambda t: _read(_written(t.tmp_path / "fake.dcm", bytes(300))),
    "input.unknown_format": lambda t: _read(_written(t.tmp_path / "x.mha", b"")),
    "input.missing": lambda t: _read(str(t.tmp_path / "nothere.nii.gz")),
    "input.2d_as_3d": lambda t: _read(_nifti(t.tmp_path / "slice.nii.gz", np.ones((5, 6), np.float32))),
    "input.4d_as_3d": lambda t: _read(
        _nifti(t.tmp_path / "series.nii.gz", np.ones((4, 5, 6, 2), np.float32))
    ),
    "input.3d_as_2d": lambda t: _read(_nifti(t.tmp_path / "vol.nii.gz"), ndim=2),
    "input.spacing_zero": lambda t: _read(_sform(t, "flat.nii.gz", np.diag([1.0, 0.0, 2.0, 1.0]))),
    "input.spacing_negative": lambda t: _read(_nrrd(t, "neg.nrrd", {"spacings": [1.0, -0.5, 1.0]})),
    "input.spacing_nonfinite": lambda t: _read(_nrrd(t, "inf.nrrd", {"spacings": [1.0, np.inf, 1.0]})),
    "input.dicom_spacing": lambda t: _read(_dicom(t, "neg.dcm", PixelSpacing=[0.5, -0.5])),
    "input.affine_nonfinite": lambda t: _read(_sform(t, "nan.nii.gz", np.diag([1.0, np.nan, 1.0, 1.0]))),
    "input.collinear": _collinear,
    "input.huge_header": lambda t: _read(_huge_nifti(t, ".nii")),
    "input.huge_header_gz": lambda t: _read(_huge_nifti(t, ".nii.gz")),
    "input.nan_voxels": _nan_voxels,
    "input.nrrd_no_geometry": lambda t: _read(_nrrd(t, "bare.nrrd", {})),
    "input.nrrd_extra_axis": lambda t: _read(
        _nrrd(
            t,
            "vector.nrrd",
            {"space directions": np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [np.nan] * 3])},
            (4, 5, 6, 3),
        )
    ),
    "input.mask_shape": lambda t: (
        lambda: readers.read_volume(
            _nifti(t.tmp_path / "img.nii.gz"), _nifti(t.tmp_path / "seg.nii.gz", np.ones((4, 5, 5), np.uint8))
        )
    ),
    "input.mask_grid": _mask_off_grid,
    "input.dicom_gaps": lambda t: _read(_series(t, "gaps", [0.0, 2.5, 5.0, 10.0])),
    "input.dicom_duplicates": lambda t: _read(_series(t, "dup", [0.0, 2.5, 2.5])),
    "input.dicom_two_series": _two_series,
    "input.medmnist_pickled": _medmnist_pickled,
    "layout.no_cases": lambda t: lambda: layouts.find_cases("brats", str(t.tmp_path)),
    "layout.mask_missing": lambda t: (
        lambda: layouts.find_cases("brats", str(_raw(t, {"c0": _good()})), require_mask=True)
    ),
    "prepare.no_foreground": lambda t: _prepare(
        _raw(t, {"c0": _good(), "blank": np.zeros((6, 5, 4), np.int16)}), t.tmp_path / "out"
    ),
    "prepare.single_slice": lambda t: _prepare(
        _raw(t, {"c0": np.ones((6, 5, 1), np.int16) + np.eye(6, 5, dtype=np.int16)[..., None]}),
        t.tmp_path / "out",
    ),
    "prepare.skip_bad": lambda t: (
        lambda: print(
            prepare.format_report(
                _prepare(
                    _raw(t, {"c0": _good(), "blank": np.zeros((6, 5, 4), np.int16)}),
                    t.tmp_path / "o",
                    skip_bad=True,
                )()
            )
        )
    ),
    "prepare.disk_full": _disk_full,
    "prepare.unwritable": _prepare_unwritable,
    "prepare.other_settings": _prepare_other_settings,
    "prepare.other_cases": _prepare_other_cases,
    "prepare.not_empty": _prepare_not_empty,
    "prepare.empty_splits": _empty_splits,
    "prepared.missing": lambda t: lambda: prepared.data_source(str(t.tmp_path), "train"),
    "prepared.incomplete": _incomplete,
    "prepared.old_format": _old_format,
    "prepared.outside_folder": lambda t: _manifest_edit(t, _escape),
    "prepared.record_truncated": _record_truncated,
    "prepared.file_truncated": _file_truncated,
    "prepared.record_overwritten": _record_overwritten,
    "prepared.no_split": lambda t: lambda: prepared.data_source(str(_prepared(t)), "val"),
    "prepared.crop_too_large": _crop_too_large,
    "prepared.crop_rank": lambda t: _crops_fit(_prepared(t), (4, 4)),
    "prepare.uri_out": lambda t: lambda: prepare.prepare("brats", str(t.tmp_path), "gs://my-bucket/prep"),
}

TRIGGERS = {**CHECKPOINT_TRIGGERS, **DATA_TRIGGERS, **LOCATE_TRIGGERS, **FINETUNE_TRIGGERS}


def test_every_documented_error_has_a_trigger():
    rows = _doc_rows()
    assert len(rows) >= 30
    assert not set(CHECKPOINT_TRIGGERS) & set(DATA_TRIGGERS), "one id, two triggers"
    assert sorted(set(rows) - set(TRIGGERS)) == [], "docs/errors.md rows without a trigger"
    assert sorted(set(TRIGGERS) - set(rows)) == [], "triggers without a docs/errors.md row"


@pytest.mark.parametrize("row", sorted(_doc_rows()))
def test_errors_table(row, request, tmp_path, monkeypatch, caplog, capsys):
    """The message each bad input of docs/errors.md gets matches the documented pattern."""
    t = Trigger(request, tmp_path, monkeypatch, caplog, capsys)
    message = t.message(TRIGGERS[row](t))
    assert re.search(_doc_rows()[row], message), f"{row}: the message was\n{message}"

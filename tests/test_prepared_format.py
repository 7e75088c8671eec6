"""The prepared record format (version 2): read without `ast`, safe in threads, clear errors.

Issue 14: training crashed at random with `SystemError: AST constructor recursion depth mismatch`
raised while numpy parsed an npz record's header with `ast.literal_eval` in a grain reader thread
(CPython 3.11 before 3.11.8 keeps that depth in one per-interpreter counter; a garbage collection
inside the AST constructor runs Python code, such as the gc callback `import jax` installs, and
lets another thread parse at the same time).
"""

import ast
import builtins
import gc
import io
import json
import mmap
import os
import re
import shutil
import struct
import sys
import threading
import zlib

import nibabel as nib
import numpy as np
import pytest

from isimed.data import prepare
from isimed.data import prepared
from isimed.data import readers

CASES = {"c0": (12, 10, 8), "c1": (9, 11, 7), "c2": (14, 6, 10), "c3": (8, 8, 8)}


def _no_ast(*args, **kwargs):
    raise AssertionError("ast used while reading a prepared record")


@pytest.fixture(scope="module", params=prepared.STORAGES)
def folder(tmp_path_factory, request):
    """(prepared directory, {case_id: expected record}) of four small 3D cases with masks, in each
    storage; the expected fields come from `prepare.process_volume` on the raw files, not from
    any reader."""
    root = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    for i, (name, shape) in enumerate(CASES.items()):
        affine = np.diag([1.0 + i, 1.5, 2.0, 1.0])
        os.makedirs(root / name)
        nib.save(
            nib.Nifti1Image(rng.integers(1, 900, size=shape).astype(np.int16), affine),
            str(root / name / f"{name}_t1.nii.gz"),
        )
        nib.save(
            nib.Nifti1Image((rng.random(shape) > 0.8).astype(np.uint8), affine),
            str(root / name / f"{name}_seg.nii.gz"),
        )
    out = str(tmp_path_factory.mktemp("prepared") / "out")
    manifest = prepare.prepare(
        "brats", str(root), out, splits={"train": list(CASES)}, storage=request.param, progress=False
    )
    assert manifest["format_version"] == prepared.FORMAT_VERSION == 2
    assert manifest["settings"]["storage"] == request.param
    expected = {}
    for index, name in enumerate(CASES):
        volume = readers.read_volume(
            str(root / name / f"{name}_t1.nii.gz"), str(root / name / f"{name}_seg.nii.gz"), ndim=3
        )
        fields = prepare.process_volume(volume.image, volume.affine, volume.mask, intensity="mri")
        expected[name] = {"id": index, "case_id": name, **fields}
    return out, expected


def _file(out, case: str) -> str:
    """The file prepare wrote for `case` (its suffix says the storage)."""
    (name,) = [n for n in os.listdir(os.path.join(out, "train")) if n.split(".")[0] == case]
    return os.path.join(out, "train", name)


def _check(record, expected):
    assert record["id"] == expected["id"] and type(record["id"]) is np.int32
    assert record["case_id"] == expected["case_id"] and type(record["case_id"]) is str
    for key in ("image", "affine", "bbox", "mask"):
        assert record[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(record[key], expected[key], err_msg=key)


def test_reading_never_uses_ast(folder, monkeypatch):
    out, expected = folder
    source = prepared.data_source(out, "train", dtype=np.float16)
    source[0]  # Opens the files (imports) before `compile` is taken away.
    npy = io.BytesIO()
    np.save(npy, np.zeros(3))
    with monkeypatch.context() as m:
        for module, name in [(ast, "parse"), (ast, "literal_eval"), (builtins, "compile")]:
            m.setattr(module, name, _no_ast)
        with pytest.raises(AssertionError, match="ast used"):  # Numpy's npy header parser is cut off...
            np.load(io.BytesIO(npy.getvalue()), allow_pickle=False)
        records = [source[i] for i in range(len(source))]  # ...prepared records still read.
        as_float32 = prepared.data_source(out, "train")[1]
    for record, case in zip(records, CASES):
        _check(record, expected[case])
    np.testing.assert_array_equal(as_float32["image"], expected["c1"]["image"].astype(np.float32))


def _raw(path: str) -> bytes:
    """The one record's bytes in a prepared file of either storage."""
    if path.endswith(prepared.MAPPED_SUFFIX):
        with open(path, "rb") as f:
            return f.read()
    from array_record.python import array_record_data_source

    (data,) = array_record_data_source.ArrayRecordDataSource([path])
    return data


def test_decoding_survives_gc_that_parses(folder):
    """The crash's mechanism without threads: a garbage collection during AST construction runs a
    gc callback that parses too. Deterministic on CPython 3.11.7, where it breaks npz headers."""
    out, expected = folder
    data = [_raw(_file(out, case)) for case in CASES]
    npz = io.BytesIO()
    np.savez(npz, image=np.zeros((2, 3), np.float16), affine=np.eye(3))

    def parses(phase, info):
        if phase == "start":
            ast.literal_eval("{'descr': '<f2', 'shape': (2, 3)}")

    threshold = gc.get_threshold()
    gc.callbacks.append(parses)
    gc.set_threshold(1)  # A collection at (nearly) every allocation: also inside the AST constructor.
    try:
        records = [prepared.deserialize(d, where=f"record {i}", dtype=np.float16) for i, d in enumerate(data)]
        if sys.version_info[:3] < (3, 11, 8):  # Not vacuous: the npz header parse does break.
            with pytest.raises(SystemError, match="AST constructor recursion depth mismatch"):
                with np.load(io.BytesIO(npz.getvalue()), allow_pickle=False) as z:
                    [z[k] for k in z.files]
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(parses)
    for record, case in zip(records, CASES):
        _check(record, expected[case])


def test_threaded_reads_are_identical(folder):
    """8 threads x 200 reads of one shared source (as grain's reader threads do), with a Python gc
    callback like jax's and a short switch interval so threads interleave often. (The format-1
    reader failed here only now and then, ~1 read in 1500 at a 1 us interval on 3.11.7: the
    deterministic guard against the crash is test_decoding_survives_gc_that_parses.)"""
    out, expected = folder
    source = prepared.data_source(out, "train", dtype=np.float16)
    names = list(CASES)
    failures, barrier = [], threading.Barrier(8)

    def read(seed):
        rng = np.random.default_rng(seed)
        barrier.wait()
        for _ in range(200):
            index = int(rng.integers(len(source)))
            try:
                _check(source[index], expected[names[index]])
            except BaseException as e:  # noqa: BLE001 - every failure is collected and reported.
                failures.append(f"{type(e).__name__}: {e}")

    callback = lambda phase, info: None  # noqa: E731 - jax installs `_xla_gc_callback`.
    interval = sys.getswitchinterval()
    gc.callbacks.append(callback)
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=read, args=(seed,)) for seed in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
        gc.callbacks.remove(callback)
    assert not failures, f"{len(failures)} of 1600 reads failed, e.g. {failures[:3]}"


def _old_format_folder(path):
    """A folder as format version 1 wrote it: "version": 1 and np.savez records."""
    os.makedirs(path / "train")
    buf = io.BytesIO()
    np.savez(
        buf,
        id=np.int32(0),
        case_id=np.str_("c0"),
        image=np.zeros((4, 4), np.float16),
        affine=np.eye(3),
        bbox=np.array([[0, 0], [4, 4]], np.int64),
    )
    prepare._write_records(str(path / "train" / "c0.array_record"), [buf.getvalue()])
    manifest = {
        "format": prepared.FORMAT,
        "version": 1,
        "status": "complete",
        "settings": {},
        "plan": {},
        "splits": {
            "train": {
                "count": 1,
                "files": [{"id": 0, "case_id": "c0", "file": "c0.array_record", "records": 1}],
            }
        },
    }
    (path / prepared.MANIFEST).write_text(json.dumps(manifest))
    return buf.getvalue()


def test_old_format_folder_gives_one_clear_line(tmp_path):
    old = tmp_path / "old"
    record = _old_format_folder(old)
    with pytest.raises(ValueError) as e:
        prepared.data_source(str(old), "train")
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(old))
    assert "format version 1" in message and "python -m isimed.data.prepare" in message
    # A stray old record (e.g. copied into a new folder) is named as such, not as corrupt.
    with pytest.raises(
        prepared.RecordError,
        match=r"^x\.array_record: a record in the old npz "
        r"format .*python -m isimed\.data\.prepare",
    ):
        prepared.deserialize(record, where="x.array_record")


def test_prepare_refuses_to_resume_an_old_format_folder(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        f"{s}_{k}": v
        for s in ("train", "val", "test")
        for k, v in (
            ("images", rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)),
            ("labels", rng.integers(0, 2, (3, 2), dtype=np.uint8)),
        )
    }
    np.savez(tmp_path / "chestmnist_8.npz", **arrays)
    out = tmp_path / "out"
    run = lambda: prepare.prepare(
        "medmnist",
        str(tmp_path / "chestmnist_8.npz"),
        str(out),  # noqa: E731
        spacing=50.0,
        progress=False,
    )
    run()
    manifest = json.loads((out / prepared.MANIFEST).read_text())
    manifest["version"] = 1  # As version 1 wrote it, half done.
    del manifest["format_version"]
    manifest["status"] = "incomplete"
    (out / prepared.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(prepare.PrepareError, match="format version 1.*does not mix versions"):
        run()
    with pytest.raises(ValueError, match="format version 1"):  # Checked before "unfinished".
        prepared.data_source(str(out), "train")


RECORD = {
    "id": np.int32(7),
    "case_id": "case/ü",
    "image": np.arange(24, dtype=np.float16).reshape(2, 3, 4),
    "affine": np.eye(4),
    "bbox": np.array([[0, 0, 0], [2, 3, 4]], np.int64),
}


def test_layout_is_the_documented_one():
    """The bytes, built here by hand from the module docstring, equal `serialize`'s."""
    fields = [
        ("id", 7, (), np.int32(7).tobytes()),
        ("case_id", 13, (), "case/ü".encode()),
        ("image", 10, (2, 3, 4), RECORD["image"].tobytes()),
        ("affine", 12, (4, 4), np.eye(4).tobytes()),
        ("bbox", 9, (2, 3), RECORD["bbox"].tobytes()),
    ]
    header_size = 448  # 16 + 5 * 80 = 416, padded to a multiple of 64.
    entries, body, offset = b"", b"", header_size
    for name, code, shape, raw in fields:
        entries += struct.pack(
            "<16sBBBxIQQ5Q",
            name.encode(),
            code,
            len(shape),
            1,  # flags: the CRC is set
            zlib.crc32(raw),
            offset,
            len(raw),
            *shape,
            *[0] * (5 - len(shape)),
        )
        pad = -(offset + len(raw)) % 64 if name != "bbox" else 0
        body += raw + bytes(pad)
        offset += len(raw) + pad
    head = struct.pack("<8sHHI", b"ISIMEDpr", 2, 5, header_size) + entries
    assert prepared.serialize(RECORD) == head + bytes(header_size - len(head)) + body


def _corrupt(data, at, value):
    return data[:at] + value + data[at + len(value) :]


GOOD = prepared.serialize(RECORD)
ENTRY = 16 + 2 * 80  # The image's entry.
CORRUPT = {
    "truncated: 10 bytes, shorter than the 16-byte header": GOOD[:10],
    "truncated: 100 bytes, shorter than its 448-byte header": GOOD[:100],
    "truncated: field 'bbox' ends at byte": GOOD[:-5],
    "bad magic b'ISIMEDxx'": _corrupt(GOOD, 0, b"ISIMEDxx"),
    "record format version 3; this isimed reads 2": _corrupt(GOOD, 8, struct.pack("<H", 3)),
    "5 bytes after the last field": GOOD + bytes(5),
    "unknown field 'imagf'": _corrupt(GOOD, ENTRY, b"imagf"),
    "field 'image': unknown dtype code 99": _corrupt(GOOD, ENTRY + 16, bytes([99])),
    "field 'image': shape (2, 3, 5) of float16 needs 60 bytes, the header says 48": _corrupt(
        GOOD, ENTRY + 40 + 16, struct.pack("<Q", 5)
    ),
    "field 'case_id': not UTF-8": _corrupt(GOOD, 512, b"\xff"),  # Its bytes: 448 + 64.
}


@pytest.mark.parametrize("problem", list(CORRUPT))
def test_corrupt_record_error_says_what_is_wrong(problem):
    with pytest.raises(prepared.RecordError) as e:
        prepared.deserialize(CORRUPT[problem], where="/data/train/c0.array_record")
    assert str(e.value).startswith("/data/train/c0.array_record: not a prepared example: ")
    assert problem in str(e.value)


def test_corrupt_file_is_named(folder, tmp_path):
    out, _ = folder
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    path = _file(str(copy), "c2")
    prepare._write_records(path, [GOOD[:-5]])
    source = prepared.data_source(str(copy), "train")
    source[1]
    where = re.escape(path)
    with pytest.raises(prepared.RecordError, match=rf"^{where}: not a prepared example: truncated"):
        source[2]


@pytest.mark.parametrize("error", [SystemError, RuntimeError, MemoryError])
def test_errors_not_about_the_bytes_are_not_blamed_on_the_file(folder, monkeypatch, error):
    out, _ = folder
    source = prepared.data_source(out, "train")
    source[0]

    def fails(*args, **kwargs):
        raise error("something else went wrong")

    monkeypatch.setattr(np, "frombuffer", fails)
    with pytest.raises(error) as e:
        source[3]
    assert str(e.value) == "something else went wrong" and not isinstance(e.value, ValueError)
    assert e.value.__notes__ == [f"while reading example 3 from {_file(os.path.abspath(out), 'c3')}"]


def test_serialize_refuses_what_the_format_cannot_hold():
    with pytest.raises(ValueError, match="'image': dtype object cannot be stored"):
        prepared.serialize({**RECORD, "image": np.array([object(), None])})
    with pytest.raises(ValueError, match="unknown record fields"):
        prepared.serialize({**RECORD, "notes": np.zeros(1)})
    with pytest.raises(ValueError, match=r"required fields \['bbox'\]"):
        prepared.serialize({k: v for k, v in RECORD.items() if k != "bbox"})
    # Big-endian and strided input is stored little-endian, C order; 0-d stays 0-d.
    record = prepared.deserialize(
        prepared.serialize(
            {**RECORD, "affine": np.eye(4, dtype=">f8"), "labels": np.ones((3, 2), np.float32)[:, 0]}
        )
    )
    assert record["affine"].dtype == np.dtype("<f8") and record["labels"].shape == (3,)
    assert record["case_id"] == "case/ü" and record["id"] == 7


def test_manifest_entries_never_reach_outside_the_folder(folder, tmp_path, monkeypatch):
    out, _ = folder
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (tmp_path / "x.array_record").write_bytes(b"")  # What "../../x.array_record" would open.
    opened = []
    from array_record.python import array_record_data_source

    monkeypatch.setattr(array_record_data_source, "ArrayRecordDataSource", lambda paths: opened.append(paths))
    monkeypatch.setattr(prepared, "map_file", opened.append)
    original = (copy / prepared.MANIFEST).read_text()
    bad_names = ("../../x.array_record", "../../x.isimed", "/etc/passwd", "sub/c0.array_record", "..")
    for bad in (*bad_names, "c0.npz", 7, None):
        manifest = json.loads(original)
        manifest["splits"]["train"]["files"][1]["file"] = bad
        (copy / prepared.MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(
            ValueError, match=rf"prepared\.json: split 'train' entry 1 names file {re.escape(repr(bad))}"
        ):
            prepared.data_source(str(copy), "train")
    manifest = json.loads(original)
    manifest["splits"]["train"]["files"][1]["records"] = -1
    (copy / prepared.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"entry 1 \(c1\.(array_record|isimed)\): bad record count -1"):
        prepared.data_source(str(copy), "train")
    assert opened == []


def test_mapped_entries_hold_one_record_and_a_split_one_storage(folder, tmp_path):
    out, _ = folder
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    original = json.loads((copy / prepared.MANIFEST).read_text())
    files = original["splits"]["train"]["files"]
    if files[0]["file"].endswith(prepared.MAPPED_SUFFIX):
        files[1]["records"] = 2
        match = r"entry 1 \(c1\.isimed\): a \.isimed file holds one record, the entry says 2"
    else:
        files[1]["file"] = "c1.isimed"
        match = r"split 'train' mixes \.isimed and array_record files"
    (copy / prepared.MANIFEST).write_text(json.dumps(original))
    with pytest.raises(ValueError, match=match):
        prepared.data_source(str(copy), "train")


def test_mapped_records_are_read_only_views_of_the_file(folder):
    out, expected = folder
    record = prepared.data_source(out, "train", dtype=np.float16)[2]
    assert not record["image"].flags.writeable
    base = record["image"]
    while isinstance(base, np.ndarray | memoryview):
        base = base.obj if isinstance(base, memoryview) else base.base
    # Mapped: no copy, the array is a view of the mapping (array_record: of the record's bytes).
    assert isinstance(base, mmap.mmap if _file(out, "c2").endswith(prepared.MAPPED_SUFFIX) else bytes)
    _check(record, expected["c2"])


def test_truncated_file_is_named(folder, tmp_path):
    out, _ = folder
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    path = _file(str(copy), "c2")
    with open(path, "rb") as f:
        data = f.read()
    for size in (0, 10, len(data) - 3):
        with open(path, "wb") as f:
            f.write(data[:size])
        source = prepared.data_source(str(copy), "train")
        source[1]
        if path.endswith(prepared.MAPPED_SUFFIX):
            problem = "empty file" if size == 0 else "truncated"
            match = rf"^{re.escape(path)}: not a prepared example: {problem}"
        else:
            match = rf"^{re.escape(path)}: not a readable array_record file \(truncated or corrupt\?\): "
        with pytest.raises(prepared.RecordError, match=match):
            source[2]


def _without_checksums(record: bytes) -> bytes:
    """`record` as isimed wrote it before checksums: flags and CRC zero in every entry."""
    count = struct.unpack_from("<H", record, 10)[0]
    for i in range(count):
        record = _corrupt(record, 16 + i * 80 + 18, bytes(6))
    return record


def test_overwritten_bytes_are_a_named_error_on_first_read(folder, tmp_path):
    out, _ = folder
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    path = _file(str(copy), "c1")
    data = bytearray(prepared.serialize(prepared.data_source(str(copy), "train")[1]))
    data[-1] ^= 0xFF  # The last byte of the last field: a valid layout, wrong values.
    prepare._write_records(path, [bytes(data)])
    source = prepared.data_source(str(copy), "train")
    source[0]
    with pytest.raises(prepared.RecordError, match=rf"^{re.escape(path)}: field '\w+' fails its checksum"):
        source[1]
    with pytest.raises(prepared.RecordError, match="fails its checksum"):
        prepared.deserialize(bytes(data))


def test_records_without_checksums_still_load_with_one_warning(folder, tmp_path, caplog):
    out, _ = folder
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    source = prepared.data_source(str(copy), "train")
    for i in range(3):
        record = _without_checksums(prepared.serialize(source[i]))
        prepare._write_records(_file(str(copy), f"c{i}"), [record])
    source = prepared.data_source(str(copy), "train")
    with caplog.at_level("WARNING"):
        records = [source[i] for i in range(3)] + [source[0]]
    assert [r["case_id"] for r in records] == ["c0", "c1", "c2", "c0"]
    warnings = [r.getMessage() for r in caplog.records if "checksums" in r.getMessage()]
    assert len(warnings) == 1 and "records carry no checksums" in warnings[0], warnings

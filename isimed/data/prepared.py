"""Reading data written by `isimed.data.prepare`: a random-access source per split.

A prepared directory holds `prepared.json` (settings, splits, counts) and `<split>/*.array_record`
files. Each array_record entry is ONE example serialised with `np.savez` (read back with
`allow_pickle=False`, so loading a prepared directory never runs stored code). Fields:

  id        int32    stable index of the case within its split (`image_id` in the pipeline)
  case_id   str      the raw data set's case name
  image     float16  intensities already normalised to [-1, 1]; returned as float32
  affine    float64  (ndim+1, ndim+1), array index -> world mm (RAS), matches the STORED array
  bbox      int64    (2, ndim) foreground box [start, stop) in the SOURCE file's array indices
  mask      uint8    optional, same shape as image (lesion labels as in the source)
  labels    float32  optional, (L,) image-level labels (MedMNIST)
"""

from __future__ import annotations

import io
import json
import os
import resource
from typing import Any

import numpy as np

MANIFEST = "prepared.json"
FORMAT = "isimed-prepared"
VERSION = 1
# group_size:1 is what grain's random access needs; zstd level 1 shrinks mostly-background volumes
# several-fold at a write/read cost below the npz decode itself.
WRITER_OPTIONS = "group_size:1,zstd:1"
FIELDS = ("id", "case_id", "image", "affine", "bbox", "mask", "labels")


def serialize(record: dict[str, Any]) -> bytes:
    """One example -> npz bytes (no pickle: every field is a plain numeric or unicode array)."""
    unknown = set(record) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown record fields {sorted(unknown)}; allowed: {FIELDS}")
    arrays = {k: np.asarray(v) for k, v in record.items() if v is not None}
    if any(a.dtype == object for a in arrays.values()):
        raise ValueError("record fields must not be Python objects (they would need pickle)")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def deserialize(data: bytes, *, where: str = "record", dtype=np.float32) -> dict[str, Any]:
    """npz bytes -> record dict; image as `dtype`, case_id as str, id as a numpy int32 scalar."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            record = {k: npz[k] for k in npz.files}
    except Exception as e:  # A truncated or foreign file: say which one.
        raise ValueError(f"{where}: not a prepared example ({type(e).__name__}: {e})") from e
    record["image"] = record["image"].astype(dtype, copy=False)
    record["case_id"] = str(record["case_id"])
    record["id"] = np.int32(record["id"])
    return record


def load_manifest(directory: str) -> dict[str, Any]:
    """The parsed `prepared.json` of a prepared directory; ValueError if missing or unfinished."""
    directory = os.path.expanduser(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {directory!r} is not a prepared directory "
            "(run `python -m isimed.data.prepare ... --out=DIR` first)"
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not written by isimed.data.prepare")
    if manifest.get("status") != "complete":
        raise ValueError(
            f"{path}: preparation did not finish (status {manifest.get('status')!r}); "
            "rerun the same prepare command to complete it"
        )
    return manifest


class PreparedSource:
    """Random-access source of one split (`len`, `[i]` -> record dict), for grain.MapDataset.

    Index `i` follows the case order in prepared.json (sorted by id); the record's own `id` is the
    stable case index (ids of skipped bad cases are simply absent). Picklable: worker processes
    reopen the files lazily.
    """

    def __init__(self, directory: str, split: str, dtype=np.float32):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self.split = split
        self.dtype = dtype
        manifest = load_manifest(self.directory)
        splits = manifest["splits"]
        if split not in splits:
            raise ValueError(
                f"{self.directory}: no split {split!r}; prepared splits: {sorted(splits)}"
            )
        entries = splits[split]["files"]
        if not sum(int(e["records"]) for e in entries):
            raise ValueError(f"{self.directory}: split {split!r} is empty (0 prepared examples)")
        # "path[0:n]" lets ArrayRecordDataSource skip opening every file just to count records.
        self._paths = [
            f"{os.path.join(self.directory, split, e['file'])}[0:{int(e['records'])}]"
            for e in entries
        ]
        self._files = [e["file"] for e in entries]
        self._offsets = np.cumsum([0] + [int(e["records"]) for e in entries])
        self._source = None

    def _open(self):
        from array_record.python import array_record_data_source  # Heavy import, only here.

        _raise_open_file_limit(len(self._paths))
        self._source = array_record_data_source.ArrayRecordDataSource(self._paths)
        return self._source

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        # Threads may race to open: harmless, one source is kept (a lock would not pickle).
        source = self._source or self._open()
        where = f"{self.directory}/{self.split}/{self._files[_file_of(self._offsets, index)]}"
        return deserialize(source[index], where=where, dtype=self.dtype)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None  # Open readers are per process.
        return state

    def __repr__(self) -> str:
        return f"PreparedSource({self.directory!r}, {self.split!r}, {len(self)} examples)"


def _file_of(offsets: np.ndarray, index: int) -> int:
    return int(np.searchsorted(offsets, index, side="right") - 1)


def _raise_open_file_limit(num_files: int) -> None:
    """ArrayRecordDataSource keeps one reader open per file it has read; one file per volume can
    pass the default soft limit of open files, so raise it towards the hard limit if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = num_files + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def data_source(directory: str, split: str, dtype=np.float32) -> PreparedSource:
    """The random-access source of `split` in a directory written by `isimed.data.prepare`.

    `dtype=np.float16` returns images as stored: for large volumes the float32 copy costs more
    time and memory than reading the file (numpy converts float16 slowly), and crops are cast
    to float32 by the pipeline anyway.
    """
    return PreparedSource(directory, split, dtype)

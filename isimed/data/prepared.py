"""Reading data written by `isimed.data.prepare`: a random-access source per split.

A prepared directory holds `prepared.json` (settings, splits, counts, `format_version`, each
file's image shape: training checks its crop size against them without reading a volume) and, per
split, the examples, each ONE record in a fixed binary layout (format version 2), decoded with
`struct` and `np.frombuffer` only: no pickle, and no `ast` or `json` per record. Two containers:

  <case>.isimed        (storage "mapped", volumes) one record per file, uncompressed, read by
                       memory-mapping it: a read decodes the ~1 KB header and returns views into
                       the page cache, and cutting crops touches only their pages. A 1 mm brain
                       (197 x 233 x 189) reads in ~30 us instead of ~23 ms for a zstd array_record
                       entry (decompressing all 17 MB to cut 1 MB of crops), and all worker
                       processes share one copy in the page cache. Needs a local disk.
  <name>.array_record  (storage "array_record"; MedMNIST shards always) zstd-compressed entries,
                       ~7x smaller for mostly-background volumes, readable from object stores
                       (gs://); each read decompresses and copies the whole record.

(Format 1 stored np.savez payloads; numpy parses their headers with `ast.literal_eval`, which
CPython 3.11 before 3.11.8 cannot run in several threads at once when garbage collection runs
Python code, as the gc callback installed by `import jax` (and so `import grain`) does: CPython
gh-106905, issue 14.) Fields:

  id        int32    stable index of the case within its split (`image_id` in the pipeline)
  case_id   str      the raw data set's case name (UTF-8)
  image     float16  intensities already normalised to [-1, 1]; returned as float32 by default
  affine    float64  (ndim+1, ndim+1), array index -> world mm (RAS), matches the STORED array
  bbox      int64    (2, ndim) foreground box [start, stop) in the SOURCE file's array indices
  mask      uint8    optional, same shape as image (lesion labels as in the source)
  labels    float32  optional, (L,) image-level labels (MedMNIST)

Record layout (all integers little-endian):

  header   16 bytes  magic b"ISIMEDpr", uint16 format version (2), uint16 number of fields F,
                     uint32 H = offset of the first field's bytes (a multiple of 64)
  F entries, 80 bytes each, in FIELDS order:
                     16 bytes field name (ASCII, NUL-padded), uint8 dtype code (DTYPE_CODES),
                     uint8 ndim (<= 5), uint8 flags, 1 zero byte, uint32 CRC-32 (zlib.crc32)
                     of the field's bytes, uint64 offset, uint64 byte count, 5 x uint64 shape
                     (unused dimensions 0). flags bit 0: the CRC is set (on every field of a
                     record or on none: records written before checksums have flags 0 and a
                     zero CRC, and still load).
  zero padding up to H, then each field's bytes (C order; a string is its UTF-8 bytes) at its
  offset, every offset a multiple of 64 (aligned views), padding between fields only; the record
  ends with the last field's last byte.

The checksums are checked when a record is first read by a process (`PreparedSource`), so bytes
overwritten after preparation are a named error (`RecordError`) instead of silently wrong data;
later reads skip the ~10 ms per 17 MB the CRC costs. `deserialize` checks them on every call.

Decoded arrays are read-only views of the record's bytes (no copy; of the mapped file for
"mapped"), as with the phantom's TFDS records; copy one before writing into it. A mapped file must
not be truncated or rewritten while a job reads it (as with any memory-mapped file, reading a
page cut away since raises SIGBUS).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import resource
import struct
import zlib
from typing import Any

import numpy as np
from absl import logging

from isimed import paths

MANIFEST = "prepared.json"
FORMAT = "isimed-prepared"
# 1: one np.savez payload per record (its npy headers are parsed with ast: no longer read).
# 2: the fixed binary layout above.
FORMAT_VERSION = 2
MAGIC = b"ISIMEDpr"
STORAGES = ("mapped", "array_record")
MAPPED_SUFFIX = ".isimed"
# group_size:1 is what grain's random access needs; zstd level 1 shrinks mostly-background volumes
# several-fold (a 197x233x189 float16 brain: 17.4 MB -> 2.6 MB); decompressing is now most of the
# time a record takes to read.
WRITER_OPTIONS = "group_size:1,zstd:1"
FIELDS = ("id", "case_id", "image", "affine", "bbox", "mask", "labels")
REQUIRED = ("id", "case_id", "image", "affine", "bbox")
MAX_NDIM = 5
ALIGN = 64
STRING = "utf8"
# Code -> stored type; codes are part of the format (append only). 0 is never used.
DTYPE_CODES = (None, "b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8", STRING)
# dtype objects made once here, so decoding never parses a dtype string.
_DTYPES = tuple(None if c in (None, STRING) else np.dtype("<" + c) for c in DTYPE_CODES)
_CODE_OF = {c: i for i, c in enumerate(DTYPE_CODES) if c is not None}
_STRING_CODE = _CODE_OF[STRING]
_HEAD = struct.Struct("<8sHHI")
_ENTRY = struct.Struct("<16sBBBxIQQ5Q")
_HAS_CRC = 1  # flags bit 0
_ZIP_MAGIC = b"PK\x03\x04"  # np.savez: a format version 1 record.
RERUN = "re-run `python -m isimed.data.prepare` with the same flags into a new --out"


class RecordError(ValueError):
    """The bytes of a record are not a valid prepared example; the message names the file."""


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _field_bytes(name: str, value: Any) -> tuple[int, tuple[int, ...], Any]:
    """(dtype code, shape, contiguous little-endian bytes-like) of one field."""
    if isinstance(value, str) or (
        isinstance(value, np.ndarray | np.generic) and np.asarray(value).dtype.kind == "U"
    ):
        if np.ndim(value) != 0:
            raise ValueError(f"field {name!r}: only a single string can be stored")
        return _STRING_CODE, (), str(value).encode("utf-8")
    array = np.asarray(value)
    code = _CODE_OF.get(f"{array.dtype.kind}{array.dtype.itemsize}")
    if code is None:  # Object arrays (they would need pickle), complex, datetime, ...
        storable = [c for c in DTYPE_CODES[1:] if c != STRING]
        raise ValueError(
            f"field {name!r}: dtype {array.dtype} cannot be stored; use one of {storable} or a str"
        )
    if array.ndim > MAX_NDIM:
        raise ValueError(f"field {name!r}: {array.ndim} dimensions, at most {MAX_NDIM}")
    array = np.asarray(array, dtype=_DTYPES[code], order="C")  # Little-endian, C order.
    return code, array.shape, array.reshape(-1).view(np.uint8)


def serialize(record: dict[str, Any]) -> bytes:
    """One example -> record bytes (format version 2, see the module docstring).

    Fields are stored in FIELDS order; None values are left out. Raises ValueError for unknown
    fields, a missing required field, or a value of a type the format cannot hold (e.g. objects).
    """
    unknown = set(record) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown record fields {sorted(unknown)}; allowed: {FIELDS}")
    names = [k for k in FIELDS if record.get(k) is not None]
    missing = [k for k in REQUIRED if k not in names]
    if missing:
        raise ValueError(f"record lacks required fields {missing}")
    fields = [(name, *_field_bytes(name, record[name])) for name in names]
    header_size = _aligned(_HEAD.size + len(fields) * _ENTRY.size)
    entries, payload, end = [], [], header_size
    for name, code, shape, raw in fields:
        offset = _aligned(end)
        entries.append(
            _ENTRY.pack(
                name.encode("ascii"),
                code,
                len(shape),
                _HAS_CRC,
                zlib.crc32(raw),
                offset,
                len(raw),
                *shape,
                *[0] * (MAX_NDIM - len(shape)),
            )
        )
        payload += [bytes(offset - end), raw]
        end = offset + len(raw)
    header = _HEAD.pack(MAGIC, FORMAT_VERSION, len(fields), header_size) + b"".join(entries)
    return b"".join([header, bytes(header_size - len(header)), *payload])


def _unreadable(where: str, e: RuntimeError) -> RecordError:
    return RecordError(
        f"{where}: not a readable array_record file (truncated or corrupt?): "
        f"{' '.join(str(e).split())}; {RERUN}"
    )


def _bad(where: str, problem: str) -> RecordError:
    return RecordError(f"{where}: not a prepared example: {problem}")


def _decode_fields(data, where: str, verify: bool = False) -> dict[str, Any]:
    """Record bytes -> {name: array or str}, checking the layout and, with `verify`, the fields'
    checksums (after the layout, so a damaged header is named as such); RecordError names
    `where`. With `verify`, the `_CHECKSUMS` key says whether the record has checksums."""
    size = len(data)
    if size < _HEAD.size:
        raise _bad(where, f"truncated: {size} bytes, shorter than the {_HEAD.size}-byte header")
    magic, version, count, header_size = _HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        if magic[:4] == _ZIP_MAGIC:
            raise RecordError(
                f"{where}: a record in the old npz format (prepared format version 1), which this "
                f"isimed no longer reads (format {FORMAT_VERSION}); {RERUN}"
            )
        raise _bad(where, f"bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise _bad(where, f"record format version {version}; this isimed reads {FORMAT_VERSION}")
    entries_end = _HEAD.size + count * _ENTRY.size
    if header_size < entries_end or header_size % ALIGN:
        raise _bad(where, f"header size {header_size} does not fit {count} fields")
    if size < header_size:
        raise _bad(where, f"truncated: {size} bytes, shorter than its {header_size}-byte header")
    fields, end, crcs = {}, header_size, {}
    for i in range(count):
        raw_name, code, ndim, flags, crc, offset, nbytes, *dims = _ENTRY.unpack_from(
            data, _HEAD.size + i * _ENTRY.size
        )
        name = raw_name.rstrip(b"\0").decode("ascii", "replace")
        if name not in FIELDS or name in fields:
            raise _bad(where, f"{'duplicate' if name in fields else 'unknown'} field {name!r}")
        if not 0 < code < len(DTYPE_CODES) or ndim > MAX_NDIM:
            raise _bad(where, f"field {name!r}: unknown dtype code {code} or ndim {ndim}")
        if offset < end or offset % ALIGN or offset - end >= ALIGN:
            raise _bad(where, f"field {name!r}: offset {offset} out of sequence (previous end {end})")
        end = offset + nbytes
        if end > size:
            raise _bad(where, f"truncated: field {name!r} ends at byte {end}, the record has {size}")
        crcs[name] = (flags & _HAS_CRC, crc, offset, end)
        shape = tuple(dims[:ndim])
        if code == _STRING_CODE:
            if ndim:
                raise _bad(where, f"field {name!r}: a string with shape {shape}")
            try:
                fields[name] = bytes(data[offset:end]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise _bad(where, f"field {name!r}: not UTF-8 ({e.reason})") from None
            continue
        dtype = _DTYPES[code]
        count_ = math.prod(shape)
        if count_ * dtype.itemsize != nbytes:
            raise _bad(
                where,
                f"field {name!r}: shape {shape} of {dtype} needs "
                f"{count_ * dtype.itemsize} bytes, the header says {nbytes}",
            )
        fields[name] = np.frombuffer(data, dtype, count_, offset).reshape(shape)
    if end != size:
        raise _bad(where, f"{size - end} bytes after the last field (expected {end} bytes)")
    missing = [k for k in REQUIRED if k not in fields]
    if missing:
        raise _bad(where, f"missing fields {missing}")
    if verify:
        fields[_CHECKSUMS] = _verify(data, crcs, where)
    return fields


_CHECKSUMS = "__checksums"


def _verify(data, crcs: dict[str, tuple[int, int, int, int]], where: str) -> bool:
    """Checks every field's CRC-32; False for a record written before checksums (none set)."""
    flagged = {name for name, (has, *_) in crcs.items() if has}
    if not flagged:
        return False
    if len(flagged) != len(crcs):
        raise _bad(where, f"checksums set on fields {sorted(flagged)} only: a damaged header")
    for name, (_, stored, start, stop) in crcs.items():
        computed = zlib.crc32(data[start:stop])
        if computed != stored:
            raise RecordError(
                f"{where}: field {name!r} fails its checksum (CRC-32 stored {stored:08x}, computed "
                f"{computed:08x}): the file changed after preparation (overwritten or damaged); {RERUN}"
            )
    return True


def deserialize(
    data: bytes, *, where: str = "record", dtype=np.float32, verify: bool = True
) -> dict[str, Any]:
    """Record bytes -> record dict; image as `dtype`, case_id as str, id as a numpy int32 scalar.

    RecordError (a ValueError naming `where` and what is wrong) only for bytes that are not a
    valid record or (`verify`) fail their checksums; anything else raised while decoding
    propagates unchanged.
    """
    record = _decode_fields(data, where, verify)
    record.pop(_CHECKSUMS, None)
    return _as_record(record, dtype)


def _as_record(fields: dict[str, Any], dtype) -> dict[str, Any]:
    fields["image"] = fields["image"].astype(dtype, copy=False)
    fields["id"] = np.int32(fields["id"])
    return fields


def manifest_format_version(manifest: dict[str, Any]) -> int:
    """The record format version of a parsed prepared.json (version 1 wrote it as "version")."""
    return int(manifest.get("format_version", manifest.get("version", 1)))


def load_manifest(directory: str) -> dict[str, Any]:
    """The parsed `prepared.json` of a prepared directory; ValueError if missing or unfinished."""
    directory = paths.resolve(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a prepared directory "
            "(run `python -m isimed.data.prepare ... --out=DIR` first)"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not written by isimed.data.prepare")
    version = manifest_format_version(manifest)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{directory}: prepared in record format version {version}"
            f"{' (np.savez records)' if version == 1 else ''}, this isimed reads only version "
            f"{FORMAT_VERSION}; {RERUN}" + ("" if version < FORMAT_VERSION else " or update isimed")
        )
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
        self.directory = os.fspath(paths.resolve(directory))
        self.split = split
        self.dtype = dtype
        manifest = load_manifest(self.directory)
        splits = manifest["splits"]
        if split not in splits:
            raise ValueError(f"{self.directory}: no split {split!r}; prepared splits: {sorted(splits)}")
        manifest_path = f"{self.directory}/{MANIFEST}"
        entries = _checked_entries(splits[split]["files"], manifest_path, split)
        if not sum(int(e["records"]) for e in entries):
            raise ValueError(f"{self.directory}: split {split!r} is empty (0 prepared examples)")
        self._files = [e["file"] for e in entries]
        self._shapes = [e.get("shape") for e in entries]  # Absent in folders prepared before it.
        self._offsets = np.cumsum([0] + [int(e["records"]) for e in entries])
        mapped = {name.endswith(MAPPED_SUFFIX) for name in self._files}
        if len(mapped) > 1:
            raise ValueError(f"{manifest_path}: split {split!r} mixes {MAPPED_SUFFIX} and array_record files")
        self._mapped = mapped.pop()
        if self._mapped and paths.is_uri(self.directory):
            raise ValueError(
                f"{self.directory}: memory-mapped records (prepare --storage=mapped, the default for "
                "volumes) must be on a local disk; object stores need the folder prepared with "
                "--storage=array_record (or copy this folder to a local disk)"
            )
        # "path[0:n]" lets ArrayRecordDataSource skip opening every file just to count records.
        self._paths = [f"{self.directory}/{split}/{e['file']}[0:{int(e['records'])}]" for e in entries]
        self._source = None
        self._verified: set[int] = set()  # Indices whose checksums this process has checked.
        self._warned = False

    def image_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(file, image shape) of every file of the split, no voxel read: the shapes prepare stores
        in prepared.json, else (folders prepared before it did) `file_image_shape`."""
        return [
            (path, tuple(shape) if shape is not None else file_image_shape(path))
            for path, shape in zip(
                [f"{self.directory}/{self.split}/{name}" for name in self._files], self._shapes
            )
        ]

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
        where = f"{self.directory}/{self.split}/{self._files[_file_of(self._offsets, index)]}"
        if self._mapped:
            data = map_file(where)
        else:
            # Threads may race to open: harmless, one source is kept (a lock would not pickle).
            source = self._source or self._open()
            try:
                data = source[index]
            except RuntimeError as e:  # array_record's reader: the file is cut short or corrupt.
                raise _unreadable(where, e) from e
        verify = index not in self._verified
        try:
            record = _decode_fields(data, where, verify)
        except RecordError:
            raise
        except Exception as e:  # Not a fault of the bytes: keep its type, say where it happened.
            e.add_note(f"while reading example {index} from {where}")
            raise
        if verify:
            if not record.pop(_CHECKSUMS) and not self._warned:
                self._warned = True
                logging.warning(
                    "%s/%s: records carry no checksums (prepared by an older isimed), so bytes "
                    "changed since preparation go undetected; prepare again to add them",
                    self.directory,
                    self.split,
                )
            self._verified.add(index)
        return _as_record(record, self.dtype)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None  # Open readers are per process.
        state["_verified"], state["_warned"] = set(), False  # So are the checks.
        return state

    def __repr__(self) -> str:
        return f"PreparedSource({self.directory!r}, {self.split!r}, {len(self)} examples)"


# What prepare writes (`prepare.safe_name` + suffix): never a path, so never outside the folder.
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\.(array_record|isimed)")


def _checked_entries(entries: Any, manifest: str, split: str) -> list[dict[str, Any]]:
    """The `files` entries of one split, refusing any that would read outside `<dir>/<split>/`
    (e.g. "../../x.array_record") or that are malformed; ValueError naming the manifest."""
    if not isinstance(entries, list):
        raise ValueError(f"{manifest}: split {split!r}: 'files' is not a list")
    for i, entry in enumerate(entries):
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
            raise ValueError(
                f"{manifest}: split {split!r} entry {i} names file {name!r}, not a plain "
                "<name>.isimed or <name>.array_record inside the split's folder; refusing to read it"
            )
        records = entry.get("records")
        if not isinstance(records, int) or isinstance(records, bool) or records < 0:
            raise ValueError(f"{manifest}: split {split!r} entry {i} ({name}): bad record count {records!r}")
        shape = entry.get("shape")
        if shape is not None and not (
            isinstance(shape, list) and all(isinstance(n, int) and n >= 1 for n in shape)
        ):
            raise ValueError(f"{manifest}: split {split!r} entry {i} ({name}): bad image shape {shape!r}")
        if name.endswith(MAPPED_SUFFIX) and records != 1:
            raise ValueError(
                f"{manifest}: split {split!r} entry {i} ({name}): a {MAPPED_SUFFIX} file holds one "
                f"record, the entry says {records}"
            )
    return entries


def map_file(path: str) -> mmap.mmap:
    """A mapped record file's bytes, read-only and paged in on use; RecordError if it is empty
    (its layout is checked when decoded). A missing file raises FileNotFoundError naming it."""
    with open(path, "rb") as f:
        try:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # "cannot mmap an empty file"
            raise _bad(path, "empty file") from None


def file_image_shape(path: str) -> tuple[int, ...]:
    """The image shape of the first record of a prepared file, which every record of the file
    shares (a volume file holds one record, a MedMNIST shard images of one array). A mapped file's
    header alone is read (the voxels stay unread pages); an array_record entry is decoded whole."""
    if path.endswith(MAPPED_SUFFIX):
        data = map_file(path)
    else:
        from array_record.python import array_record_data_source

        with array_record_data_source.ArrayRecordDataSource([f"{path}[0:1]"]) as source:
            try:
                data = source[0]
            except RuntimeError as e:
                raise _unreadable(path, e) from e
    return tuple(_decode_fields(data, path)["image"].shape)


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

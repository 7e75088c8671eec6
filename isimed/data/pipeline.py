"""grain input pipeline: records -> K crops per image with their centres in world mm -> batches.

A record is a dict with `id` (int), `image` (spatial array, HU for CT), `affine` ((ndim+1)^2, array
index -> world mm) and optionally `mask` (lesion voxels). One pipeline element is one image, with K
crop positions (`data.crops_per_image` divided by the number of views):

  crops            (K, *crop, 1) float32, intensity-normalised; in training batches (the step
                   finishes them on the device) float16 crops of float16 images without a window
                   (prepared data) stay float16, and crops of integer images stay raw integers
  centres          (K, ndim)     float32, crop centres in world millimetres
  lesion_fraction  (K,)          float32, share of lesion voxels in each crop
  has_lesion       (K,)          int32, crop contains any lesion voxel
  image_id         ()            int32
  views            (K, *crop, 1) like crops, only with `views=2`: a second crop of each position,
                   shifted by up to `view_offset` of the crop size per axis (for two-view methods)
  labels           (L,)          float32, only if the record has image-level `labels`

and batching B images gives a leading B axis. Crops are sampled from the raw record and the window
normalisation, being pointwise, is applied to the crops only: the same result as normalising the
whole volume first at a fraction of the cost.

Host work per crop is kept to a copy (a 32^3 crop of a 1 mm brain takes ~0.05 ms): all crops of an
image are cut by one gather, float16 volumes are widened by a table look-up instead of numpy's slow
float16 cast, and a record kept by `RecordCache` carries its foreground map (one bit per crop
position, computed on its first use) so crop positions are tested by a look-up, not by cutting and
thresholding candidate crops. Every shortcut gives the same crops as the plain computation.
Training batches of float16 data are sent as float16: widening to float32 was ~75% of the host's
work per crop, and the step's cast on the device gives the same numbers. Training crops of integer
images (CT in HU) are sent as stored, at 2 bytes a voxel instead of 4, and windowed by the step.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from isimed import geometry
from isimed import paths

Record = dict[str, Any]


def record_name(record: Record) -> str:
    return f"record id={int(record['id'])}"


def check_record(record: Record, ndim: int) -> None:
    """Raises ValueError naming the record for inputs that would silently give wrong crops.

    It reads the whole volume (the NaN test), so the pipeline calls it once per record."""
    image = record["image"]
    where = record_name(record)
    if image.ndim != ndim:
        raise ValueError(f"{where}: expected a {ndim}D image, got shape {image.shape}")
    geometry.check_affine(record["affine"], ndim, where)
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        raise ValueError(f"{where}: image has {int(np.sum(~np.isfinite(image)))} NaN/inf voxels")
    mask = record.get("mask")
    if mask is not None and mask.shape != image.shape:
        raise ValueError(f"{where}: mask shape {mask.shape} != image shape {image.shape}")


# Every float16 bit pattern -> its float32 value. numpy widens float16 without SIMD (~2.5 ns per
# value); gathering from this 256 KB table is ~3x faster and gives the same bits.
_FLOAT16_VALUES = np.arange(2**16, dtype=np.uint16).view(np.float16)
_FLOAT16_TO_32 = _FLOAT16_VALUES.astype(np.float32)


def as_float32(x: np.ndarray) -> np.ndarray:
    """`x` as float32: the same values as `x.astype(np.float32)`, faster for float16."""
    x = np.asarray(x)
    if x.dtype == np.float16:
        return np.take(_FLOAT16_TO_32, x.view(np.uint16))
    return np.asarray(x, np.float32)


def above(x: np.ndarray, threshold: float) -> np.ndarray:
    """`x > threshold` exactly as numpy compares them, faster for float16: numpy compares float16
    one value at a time in software (~4 ns per value); here two integer range tests on the bit
    patterns (~0.15 ns per value) decide, since float16 values grow with their pattern from +0 to
    +inf and shrink with it from -0 to -inf."""
    x = np.asarray(x)
    if x.dtype != np.float16:
        return x > threshold
    first, negatives = _float16_passing(threshold)
    bits = x.view(np.uint16)
    # uint16 arithmetic wraps: (bits - a) <= b - a tests a <= bits <= b in one comparison.
    out = (bits - np.uint16(_NEGATIVE_ZERO)) < np.uint16(negatives)
    if first <= _POSITIVE_INF:
        out |= (bits - np.uint16(first)) <= np.uint16(_POSITIVE_INF - first)
    return out


_POSITIVE_INF, _NEGATIVE_ZERO, _NEGATIVE_INF = 0x7C00, 0x8000, 0xFC00  # float16 bit patterns.


@functools.lru_cache(maxsize=32, typed=True)  # typed: a numpy float64 compares unlike a float.
def _float16_passing(threshold) -> tuple[int, int]:
    """The float16 bit patterns whose values are `> threshold` as numpy decides it: (the first
    passing pattern of +0..+inf, past +inf if none; how many of -0..-inf pass, from -0 on)."""
    passes = _FLOAT16_VALUES > threshold
    positive = passes[: _POSITIVE_INF + 1]  # Values increase: the passing ones are a suffix.
    negative = passes[_NEGATIVE_ZERO : _NEGATIVE_INF + 1]  # Values decrease: a prefix passes.
    first = _POSITIVE_INF + 1 - int(positive.sum())
    count = int(negative.sum())
    if not (positive[first:].all() and negative[:count].all()):  # Holds for any threshold.
        raise AssertionError(f"float16 order broken for threshold {threshold!r}")
    return first, count


def cut_crops(image: np.ndarray, starts: np.ndarray, crop_shape: Sequence[int]) -> np.ndarray:
    """Crops `(n, *crop_shape)` of `image` at `starts` `(n, ndim)`, as `geometry.extract_crops`,
    by one gather on a sliding-window view (no Python work per crop)."""
    windows = sliding_window_view(image, tuple(int(c) for c in crop_shape))
    return windows[tuple(np.asarray(starts, np.intp).reshape(-1, image.ndim).T)]


def normalise_window(x: np.ndarray, window: Sequence[float] | None) -> np.ndarray:
    """Maps intensities in [lo, hi] (e.g. a CT HU window) linearly to [-1, 1], clipping outside.

    `window=None`: the data was normalised when it was prepared; only cast to float32.
    """
    if window is None:
        return as_float32(x)
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"intensity window must have hi > lo, got {tuple(window)}")
    x = (as_float32(x) - lo) * (2.0 / (hi - lo)) - 1.0
    return np.clip(x, -1.0, 1.0)


def crop_values(crops: np.ndarray, window: Sequence[float] | None, widen: bool = True) -> np.ndarray:
    """Crops as the encoder takes them: `normalise_window`, except with `widen=False` (training
    batches, which the step finishes on the device with `isimed.train_state.unit_crops`, to the
    same float32 numbers): float16 crops of data normalised at preparation (`window=None`) stay
    float16, and integer crops (CT in HU) stay raw integers, windowed on the device."""
    if not widen and (
        np.issubdtype(crops.dtype, np.integer) or (window is None and crops.dtype == np.float16)
    ):
        return crops
    return normalise_window(crops, window)


def foreground_map(
    image: np.ndarray, crop_shape: Sequence[int], threshold: float, min_foreground: float
) -> np.ndarray:
    """Which crop positions hold at least `min_foreground` of voxels above `threshold`: a boolean
    array over crop starts (`image.shape - crop_shape + 1`), bit-packed in C order (`np.packbits`).

    Exactly the per-crop test `mean(crop > threshold) >= min_foreground` at every position, from
    integer box sums (running sums along each axis): O(voxels) once instead of O(crop voxels) per
    candidate crop. 1 bit per position: ~0.7 MB for a 197 x 233 x 189 volume and 32^3 crops.
    """
    crop_shape = tuple(int(c) for c in crop_shape)
    counts = above(image, threshold).astype(np.int32)
    for axis, c in enumerate(crop_shape):  # Box sums are separable: one running sum per axis.
        total = _running_sum(counts, axis)
        n = total.shape[axis]
        # Voxels [i, i + c) along this axis: running sum up to i + c - 1, minus that up to i - 1.
        counts = total[_along(axis, c - 1, n)].copy()
        counts[_along(axis, 1, n - c + 1)] -= total[_along(axis, 0, n - c)]
    return np.packbits(counts >= least_count(int(np.prod(crop_shape)), min_foreground))


@functools.lru_cache(maxsize=16)
def least_count(size: int, min_foreground: float) -> int:
    """The fewest foreground voxels of `size` that pass `mean(crop > threshold) >= min_foreground`
    (size + 1 if none do). The mean is monotonic in the count, so this count, found with the same
    float64 division as the mean of a crop's boolean voxels, decides the test exactly."""
    passes = np.true_divide(np.arange(size + 1), float(size)) >= min_foreground
    return int(np.argmax(passes)) if passes.any() else size + 1


def _running_sum(x: np.ndarray, axis: int) -> np.ndarray:
    """np.cumsum(x, axis) for int32 `x`; along a leading axis as one vectorised add per slice,
    ~5x faster than numpy's strided cumsum there."""
    if axis == x.ndim - 1:
        return np.cumsum(x, axis=axis, dtype=np.int32)
    out = np.moveaxis(x.copy(), axis, 0)
    for i in range(1, out.shape[0]):
        out[i] += out[i - 1]
    return np.moveaxis(out, 0, axis)


def _along(axis: int, start: int, stop: int) -> tuple[slice, ...]:
    return (slice(None),) * axis + (slice(start, stop),)


def map_lookup(packed: np.ndarray, starts: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """The bits of a `foreground_map` over `positions` (its unpacked shape) at `starts` `(n, ndim)`."""
    flat = np.ravel_multi_index(tuple(np.asarray(starts).T), tuple(positions))
    return ((packed[flat >> 3] >> (7 - (flat & 7))) & 1).astype(bool)


def crops_at(
    record: Record,
    starts: np.ndarray,
    crop_shape: Sequence[int],
    window: Sequence[float] | None,
    labels: bool = True,
    widen: bool = True,
) -> dict[str, np.ndarray]:
    """The crops of `record` at `starts` `(n, ndim)` with their world-mm centres and lesion labels:
    crops `(n, *crop, 1)`, centres `(n, ndim)`, image_id and, with `labels`, lesion_fraction `(n,)`
    and has_lesion `(n,)` (training needs no labels and skips cutting the mask). `widen`: see
    `crop_values`."""
    crop_shape = tuple(crop_shape)
    crops = cut_crops(record["image"], starts, crop_shape)
    out = {
        "crops": crop_values(crops, window, widen)[..., None],
        "centres": geometry.crop_centres_mm(starts, crop_shape, record["affine"]).astype(np.float32),
        "image_id": np.int32(record["id"]),
    }
    if not labels:
        return out
    mask = record.get("mask")
    if mask is not None and len(starts):
        lesion = cut_crops(mask, starts, crop_shape) > 0
        fraction = lesion.reshape(len(starts), -1).mean(axis=1)
    else:
        fraction = np.zeros(len(starts))
    out["lesion_fraction"] = fraction.astype(np.float32)
    out["has_lesion"] = (fraction > 0).astype(np.int32)
    return out


@dataclasses.dataclass(frozen=True)
class SampleCrops(grain.transforms.RandomMap):
    """Samples K crops per image with world-mm centres and per-crop lesion labels.

    Crop positions are uniform over all positions whose crop holds at least `min_foreground` of
    voxels above `foreground_threshold` (rejection sampling, falling back to an exact search over
    all positions). A `lesion_share` of the crops is instead centred on random lesion voxels (for
    evaluation sets that need positives; images without lesions get uniform crops only).

    A record kept by `RecordCache` (a `CachedRecord`) gets its `foreground_map` on first use and
    candidates are then tested by a bit look-up; other records are tested by cutting the candidate
    crops. Both give the same crops for the same generator state.
    """

    crop_shape: tuple[int, ...]
    num_crops: int
    window: tuple[float, float] | None
    min_foreground: float = 0.0
    foreground_threshold: float = -900.0
    lesion_share: float = 0.0
    views: int = 1
    view_offset: float = 0.25
    labels: bool = True  # lesion_fraction / has_lesion per crop (evaluation; training needs none).
    widen: bool = True  # False: float16 and integer crops stay as stored (`crop_values`).
    # > 0: every crop is rotated about its centre by angles uniform in +-rotate_deg (one angle in
    # 2D, one per axis in 3D), so the encoder sees anatomy in other poses; the centre, hence the
    # distance target, does not move. Rotated crops are interpolated float32.
    rotate_deg: float = 0.0
    # Ids of the records already checked by this copy of the transform (each worker has its own).
    _checked: set = dataclasses.field(default_factory=set, compare=False, repr=False)

    def random_map(self, record: Record, rng: np.random.Generator) -> dict[str, np.ndarray]:
        ndim = len(self.crop_shape)
        if int(record["id"]) not in self._checked:
            check_record(record, ndim)
            self._checked.add(int(record["id"]))
        where = record_name(record)
        image = record["image"]
        geometry.check_crop_fits(image.shape, self.crop_shape, where)
        mask = record.get("mask")

        num_lesion = 0
        if mask is not None and self.lesion_share > 0 and np.any(mask):
            num_lesion = int(round(self.lesion_share * self.num_crops))
        starts = np.concatenate(
            [
                self._lesion_starts(rng, mask, num_lesion) if num_lesion else np.zeros((0, ndim), int),
                self._uniform_starts(rng, record, self.num_crops - num_lesion, where),
            ]
        ).astype(np.int64)

        out = crops_at(record, starts, self.crop_shape, self.window, self.labels, self.widen)
        if self.rotate_deg > 0:
            out["crops"] = self._rotated(rng, record, starts)
        if self.views == 2:
            shifted = self._shifted(rng, starts, image.shape)
            if self.rotate_deg > 0:
                out["views"] = self._rotated(rng, record, shifted)
            else:
                out["views"] = crop_values(
                    cut_crops(image, shifted, self.crop_shape), self.window, self.widen
                )[..., None]
        elif self.views != 1:
            raise ValueError(f"views must be 1 or 2, got {self.views}")
        if "labels" in record:
            out["labels"] = np.asarray(record["labels"], np.float32)
        return out

    def _rotated(self, rng, record: Record, starts: np.ndarray) -> np.ndarray:
        """The crops at `starts`, each rotated about its centre (`geometry.rotated_crops`)."""
        ndim = len(self.crop_shape)
        angles = rng.uniform(-self.rotate_deg, self.rotate_deg, size=(len(starts), 1 if ndim == 2 else 3))
        rotations = (
            np.stack([geometry.rotation(a) for a in angles]) if len(starts) else np.zeros((0, ndim, ndim))
        )
        crops = geometry.rotated_crops(record["image"], starts, self.crop_shape, record["affine"], rotations)
        return normalise_window(crops, self.window)[..., None]

    def _shifted(self, rng, starts: np.ndarray, image_shape) -> np.ndarray:
        """Second-view starts: each first-view start moved by up to `view_offset` of the crop size
        per axis, clipped to the image (so the two views overlap by at least 1 - view_offset)."""
        crop = np.asarray(self.crop_shape)
        reach = np.floor(self.view_offset * crop).astype(np.int64)
        shift = rng.integers(-reach, reach + 1, size=starts.shape)
        return np.clip(starts + shift, 0, np.asarray(image_shape) - crop)

    def _uniform_starts(self, rng, record: Record, n: int, where: str) -> np.ndarray:
        image = record["image"]
        if self.min_foreground <= 0:
            return geometry.sample_crop_starts(rng, image.shape, self.crop_shape, n, where=where)
        if n == 0:  # Every crop centred on a lesion.
            return np.zeros((0, image.ndim), np.int64)
        eligible = self._foreground_test(record)
        # Rejection sampling is uniform over the accepted positions and avoids whole-volume work.
        # The first n eligible of each draw of 4n candidates are kept; testing them n at a time
        # and stopping once n pass keeps the same crops and skips testing the rest.
        accepted = []
        for _ in range(20):
            cand = geometry.sample_crop_starts(rng, image.shape, self.crop_shape, 4 * n, where=where)
            for i in range(0, len(cand), n):
                part = cand[i : i + n]
                accepted.extend(part[eligible(part)][: n - len(accepted)])
                if len(accepted) == n:
                    return np.asarray(accepted)
        return geometry.sample_crop_starts(
            rng,
            image.shape,
            self.crop_shape,
            n,
            foreground=image > self.foreground_threshold,
            min_foreground=self.min_foreground,
            where=where,
        )

    def _foreground_test(self, record: Record):
        """starts `(m, ndim)` -> which crops there hold enough foreground (boolean `(m,)`)."""
        image, crop = record["image"], self.crop_shape
        memo = getattr(record, "memo", None)
        if memo is None:  # Read once: cutting the candidates is cheaper than a whole-volume map.
            size = int(np.prod(crop))
            least = least_count(size, self.min_foreground)

            def by_cutting(starts):
                fg = above(cut_crops(image, starts, crop), self.foreground_threshold)
                # Summing the booleans' bytes counts them ~3x faster than np.count_nonzero.
                return fg.reshape(len(starts), size).view(np.uint8).sum(axis=1, dtype=np.int32) >= least

            return by_cutting
        key = ("foreground_map", crop, self.foreground_threshold, self.min_foreground)
        packed = memo.get(key)
        if packed is None:  # Threads may race here: both compute the same map, one is kept.
            packed = memo.setdefault(
                key, foreground_map(image, crop, self.foreground_threshold, self.min_foreground)
            )
        positions = [s - c + 1 for s, c in zip(image.shape, crop)]
        return lambda starts: map_lookup(packed, starts, positions)

    def _lesion_starts(self, rng, mask, n: int) -> np.ndarray:
        voxels = np.argwhere(mask > 0)[rng.integers(0, int(np.sum(mask > 0)), size=n)]
        crop = np.asarray(self.crop_shape)
        upper = np.asarray(mask.shape) - crop
        return np.clip(voxels - (crop - 1) // 2, 0, upper)


def open_source(data: ml_collections.ConfigDict, split: str):
    """The random-access record source named by the data config."""
    if data.name == "chest_phantom":
        from isimed.data import chest_phantom  # Imports tfds only when needed.

        return chest_phantom.data_source(data.variant, split, os.fspath(paths.resolve(data.tfds_dir)))
    if data.name == "prepared":
        # Written by `python -m isimed.data.prepare`; images are already normalised to [-1, 1].
        from isimed.data import prepared

        if not data.get("dir"):
            raise ValueError("data.name='prepared' needs --config.data.dir=<prepare --out folder>")
        # Images stay float16 as stored; only the sampled crops are cast to float32.
        return prepared.data_source(data.dir, split, dtype=np.float16)
    raise ValueError(f"unknown data set {data.name!r}; known: 'chest_phantom', 'prepared'")


def image_shapes(data: ml_collections.ConfigDict, split: str) -> list[tuple[str, tuple[int, ...]]]:
    """(where, image shape) for the images of `split`, no volume decoded: the phantom's shapes
    come from its builder config (one shape per variant), a prepared folder's from prepared.json."""
    if data.name == "chest_phantom":
        from isimed.data import chest_phantom

        return [(f"chest_phantom/{data.variant} split {split!r}", chest_phantom.image_shape(data.variant))]
    return open_source(data, split).image_shapes()


def check_crops_fit(data: ml_collections.ConfigDict, splits: Sequence[str]) -> None:
    """Raises ValueError naming the file if `data.crop_size` has another number of axes than the
    images of `splits`, or does not fit in the smallest of them. Run before the pipeline starts:
    there the per-record check meets it only in a reader thread, deep in a grain traceback."""
    crop = tuple(int(c) for c in data.crop_size)
    for split in splits:
        shapes = image_shapes(data, split)
        for where, shape in shapes:
            if len(shape) != len(crop):
                raise ValueError(
                    f"{where}: data.crop_size {crop} has {len(crop)} axes but the images are "
                    f"{len(shape)}D (shape {shape})"
                )
        small = [(where, shape) for where, shape in shapes if any(c > n for c, n in zip(crop, shape))]
        if small:
            where, shape = min(small, key=lambda s: np.prod(s[1]))
            raise ValueError(
                f"{where}: data.crop_size {crop} does not fit in its image of size {shape} "
                f"(the smallest of {len(small)} too small in split {split!r})"
            )


class CachedRecord(dict):
    """A record kept by `RecordCache`; `memo` holds what transforms derive from it once (the
    foreground map of `SampleCrops`, 1 bit per crop position, not counted in the cache's size)."""

    def __init__(self, record: Record):
        super().__init__(record)
        self.memo: dict = {}


class RecordCache:
    """Random access to `source` that keeps decoded records in memory, least recently used out
    first, up to `max_mb`. Decoding a record costs far more than sampling its crops (the phantom:
    ~11 ms per volume against ~3 ms for 16 crops; a zstd-compressed 1 mm brain: ~50 ms against
    ~1 ms), so a split that fits is decoded once. Each process (grain worker) holds its own cache."""

    def __init__(self, source, max_mb: float):
        self.source, self.max_bytes = source, int(max_mb * 2**20)
        self._records: collections.OrderedDict = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Record:
        with self._lock:
            record = self._records.get(index)
            if record is not None:
                self._records.move_to_end(index)
                return record
        record = self.source[index]
        size = sum(getattr(v, "nbytes", 0) for v in record.values())
        if size > self.max_bytes:
            return record
        record = CachedRecord(record)
        with self._lock:
            if index in self._records:  # Another thread decoded it meanwhile: share its memo.
                return self._records[index]
            self._records[index] = record
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._records.popitem(last=False)
                self._bytes -= sum(getattr(v, "nbytes", 0) for v in old.values())
        return record

    def __getstate__(self):  # Worker processes start with an empty cache.
        return {"source": self.source, "max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__init__(state["source"], state["max_bytes"] / 2**20)


class EpochShuffle(grain.MapDataset):
    """The parent's elements in a new random order each epoch, repeated forever (grain's
    ``shuffle().repeat()``, with the order drawn as one permutation per epoch).

    grain 0.2.18's ``shuffle`` places every element with ``index_shuffle``, whose cost grows as the
    data set shrinks (about 18 ms / n per read: 190 us at 96 images, 2.2 ms at 8, 2 us from
    ~10,000). Medical data sets are often that small; for the demo's 64 training volumes it was 45%
    of the pipeline's time. One ``numpy`` permutation of n per epoch, seeded by (seed, epoch), costs
    microseconds and stays a pure function of the index, so checkpointed iterator positions resume
    exactly.
    """

    def __init__(self, parent: grain.MapDataset, seed: int) -> None:
        super().__init__(parent)
        if not len(parent):
            raise ValueError("no images to train on: the split (or this process's shard of it) is empty")
        self._seed = seed
        self._length = len(parent)

    def __len__(self) -> int:
        return sys.maxsize  # Repeated "forever", as grain's repeat().

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a few permutations of one live dataset)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self._seed, epoch)).permutation(self._length)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, self._length)
        return self._parent[int(self._order(epoch)[position])]


def check_data_config(data: ml_collections.ConfigDict, views: int = 1) -> None:
    if data.crops_per_image < 2:
        raise ValueError(
            f"data.crops_per_image must be >= 2 (distances need pairs), got {data.crops_per_image}"
        )
    if data.crops_per_image % views:
        raise ValueError(
            f"data.crops_per_image must be a multiple of the method's {views} views, "
            f"got {data.crops_per_image}"
        )
    if data.images_per_batch < 1:
        raise ValueError(f"data.images_per_batch must be >= 1, got {data.images_per_batch}")


def make_dataset(
    data: ml_collections.ConfigDict,
    split: str,
    *,
    seed: int,
    train: bool,
    batch_size: int | None = None,
    lesion_share: float = 0.0,
    crops_per_image: int | None = None,
    views: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    source=None,
    labels: bool | None = None,
    sampler: grain.transforms.RandomMap | None = None,
) -> grain.IterDataset:
    """Batched crops from one split.

    train=True: shuffled, reshuffled each epoch, repeated forever, batches of `images_per_batch`
    (divided across processes). train=False: every image of this process's shard once, in a fixed
    order with fixed crops for a given seed, final partial batch kept. `views=2` adds a second,
    shifted crop of every position (two-view methods such as SimCLR). `crops_per_image` (default
    `data.crops_per_image`) counts the crops that go through the encoder per image, every view
    included: `crops_per_image // views` positions are sampled. Training crops of float16 data stay
    float16 (the train step widens them); evaluation crops are always float32. `labels` (default:
    not `train`) adds each crop's lesion labels and image id (fine-tuning trains on them).
    `sampler` replaces the crop sampler (`SampleCrops`) by another random map of a record.
    """
    check_data_config(data, views)
    source = open_source(data, split) if source is None else source
    if data.get("cache_mb"):
        source = RecordCache(source, data.cache_mb)
    ds = grain.MapDataset.source(source)
    # Per-process shard first, so each host reads disjoint images.
    ds = ds[process_index::process_count]
    if train:
        ds = EpochShuffle(ds, seed)
    sampler = sampler or SampleCrops(
        crop_shape=tuple(data.crop_size),
        num_crops=(crops_per_image or data.crops_per_image) // views,
        window=None if data.get("window") is None else tuple(data.window),
        min_foreground=data.min_foreground,
        foreground_threshold=data.foreground_threshold,
        lesion_share=lesion_share,
        views=views,
        view_offset=data.view_offset,
        labels=not train if labels is None else labels,
        widen=not train,  # Training batches go to the step, which widens them on the device.
        # Pretraining batches only: labelled crops (fine-tuning) are labelled from the unrotated box.
        rotate_deg=data.get("rotate_deg", 0.0) if train and not labels else 0.0,
    )
    ds = ds.random_map(sampler, seed=seed + 1)
    if batch_size is None:
        if data.images_per_batch % process_count:
            raise ValueError(
                f"data.images_per_batch={data.images_per_batch} is not divisible by {process_count} processes"
            )
        batch_size = data.images_per_batch // process_count
    ds = ds.batch(batch_size, drop_remainder=train)
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=data.num_threads, prefetch_buffer_size=data.prefetch)
    )
    if data.num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
    return it_ds

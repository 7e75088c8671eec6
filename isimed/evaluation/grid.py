"""Crops on a regular grid over whole images, with world-mm centres and lesion labels.

Random crops (the training pipeline, `features.collect`) answer "how good is the embedding on
average"; a regular grid shows *where* in the body it does what, e.g. embedding PCs coloured by
position over a whole held-out subject.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np

from isimed import geometry
from isimed.data import pipeline
from isimed.evaluation import features


def grid_starts(
    image_shape: Sequence[int], crop_shape: Sequence[int], stride: Sequence[int] | int | None = None
) -> np.ndarray:
    """Start indices `(n, ndim)` of a regular grid of crops that fit inside the image.

    `stride` defaults to the crop size (non-overlapping tiles). The leftover margin on each axis
    is split evenly between both ends, so the grid is centred on the image.
    """
    image_shape = tuple(int(s) for s in image_shape)
    crop_shape = tuple(int(c) for c in crop_shape)
    geometry.check_crop_fits(image_shape, crop_shape)
    if stride is None:
        stride = crop_shape
    elif isinstance(stride, (int, np.integer)):
        stride = (int(stride),) * len(crop_shape)
    stride = tuple(int(s) for s in stride)
    if len(stride) != len(crop_shape) or any(s < 1 for s in stride):
        raise ValueError(f"stride must be {len(crop_shape)} integers >= 1, got {stride}")
    axes = []
    for size, crop, step in zip(image_shape, crop_shape, stride):
        span = size - crop  # Largest valid start.
        offset = (span % step) // 2
        axes.append(np.arange(offset, span + 1, step))
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=-1).astype(np.int64)


def grid_crops(
    record: pipeline.Record,
    crop_shape: Sequence[int],
    stride: Sequence[int] | int | None = None,
    *,
    window: Sequence[float],
    min_foreground: float = 0.0,
    foreground_threshold: float = -900.0,
) -> dict[str, np.ndarray]:
    """All grid crops of one record, with the same keys and conventions as the training pipeline.

    Crops with less than `min_foreground` of voxels above `foreground_threshold` (air outside the
    body) are dropped, as the pipeline never samples them either.

    Returns:
      {"crops" (n, *crop, 1) float32 in [-1, 1], "centres" (n, ndim) world mm, "starts" (n, ndim),
       "lesion_fraction" (n,), "has_lesion" (n,) int32, "image_id" (n,) int32}.
    """
    crop_shape = tuple(int(c) for c in crop_shape)
    ndim = len(crop_shape)
    pipeline.check_record(record, ndim)
    image = record["image"]
    starts = grid_starts(image.shape, crop_shape, stride)
    if min_foreground > 0:
        raw = geometry.extract_crops(image, starts, crop_shape)
        fg = (raw > foreground_threshold).reshape(len(starts), -1).mean(axis=1)
        starts = starts[fg >= min_foreground]
    out = pipeline.crops_at(record, starts, crop_shape, window)
    out["image_id"] = np.full(len(starts), out["image_id"], np.int32)
    return {**out, "starts": starts}


def grid_features(
    data: ml_collections.ConfigDict,
    split: str,
    embeds: Mapping[str, features.EmbedFn],
    *,
    max_images: int,
    stride: Sequence[int] | int | None = None,
    with_crops: bool = False,
) -> dict:
    """Embeds the grid crops of the first `max_images` images of a split (in source order).

    Images have different numbers of grid crops, so rows are crops, not images: returns
    `(N, ...)` arrays centres, starts, lesion_fraction, has_lesion, image_id (the grouping key for
    subject-grouped probes), `embeddings` as `{name: (N, D)}` and, with `with_crops`, the crops.
    """
    source = pipeline.open_source(data, split)

    def non_empty_grids():
        for index in range(min(max_images, len(source))):
            crops = grid_crops(
                source[index],
                data.crop_size,
                stride,
                window=data.window,
                min_foreground=data.min_foreground,
                foreground_threshold=data.foreground_threshold,
            )
            if len(crops["starts"]):
                yield crops

    out = features.embed_elements(non_empty_grids(), embeds, np.concatenate, with_crops=with_crops)
    if not out:
        raise ValueError(f"split {split!r} of {data.name} gave no grid crops")
    return out

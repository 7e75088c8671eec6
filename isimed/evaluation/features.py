"""Frozen-encoder feature extraction: jitted, sharded over the mesh's data axis, batched."""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
from absl import logging
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from isimed.data import pipeline

EmbedFn = Callable[[np.ndarray], np.ndarray]


def make_embed_fn(model, mesh: jax.sharding.Mesh, chunk: int = 256):
    """Returns `bind(params, batch_stats) -> embed(crops (N, ...)) -> (N, D) numpy`.

    The encoder runs in eval mode: BatchNorm uses (and never updates) its running statistics.
    Crops go through in fixed-size chunks, padded to a multiple of the device count, so one
    compiled program serves every call.
    """
    n_dev = mesh.devices.size
    chunk = -(-chunk // n_dev) * n_dev
    data = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    @jax.jit
    def forward(params, batch_stats, x):
        return model.apply(params, batch_stats, x, train=False)[0]

    def bind(params, batch_stats) -> EmbedFn:
        params, batch_stats = jax.device_put((params, batch_stats), replicated)

        def embed(crops: np.ndarray) -> np.ndarray:
            out = []
            for i in range(0, len(crops), chunk):
                part = crops[i : i + chunk]
                padded = np.zeros((chunk, *part.shape[1:]), part.dtype)
                padded[: len(part)] = part
                z = forward(params, batch_stats, jax.device_put(padded, data))
                out.append(np.asarray(z)[: len(part)])
            return np.concatenate(out)

        return embed

    return bind


def collect(
    config: ml_collections.ConfigDict,
    split: str,
    embed: EmbedFn,
    *,
    max_images: int,
    crops_per_image: int | None = None,
    lesion_share: float = 0.0,
    with_crops: bool = False,
    seed: int = 1234,
) -> dict[str, np.ndarray]:
    """Embeds fixed crops (same crops every call for a seed) of the first `max_images` images.

    Returns `(B, K, ...)` arrays: embeddings, centres (mm), lesion_fraction, has_lesion, image_id
    `(B,)` and, with `with_crops`, the crops themselves (for raw-intensity reference features).
    """
    k = crops_per_image or config.eval.crops_per_image
    ds = pipeline.make_dataset(
        config.data, split, seed=seed, train=False, batch_size=1, crops_per_image=k,
        lesion_share=lesion_share,
    )
    parts: dict[str, list[np.ndarray]] = {}
    for n, element in enumerate(ds):
        if n >= max_images:
            break
        crops = element["crops"][0]
        element = {key: value[0] for key, value in element.items()}
        element["embeddings"] = embed(crops)
        if not with_crops:
            del element["crops"]
        for key, value in element.items():
            parts.setdefault(key, []).append(value)
        if (n + 1) % 50 == 0:
            logging.info("embedded %d images of split %r", n + 1, split)
    if not parts:
        raise ValueError(f"split {split!r} of {config.data.name} has no images")
    return {key: np.stack(value) for key, value in parts.items()}

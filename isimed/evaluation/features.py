"""Frozen-encoder feature extraction: jitted, sharded over the mesh's data axis, batched."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping

import jax
import ml_collections
import numpy as np
import tqdm
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from isimed import checkpoints
from isimed import runtime
from isimed.data import pipeline

EmbedFn = Callable[[np.ndarray], np.ndarray]


def make_embed_fn(model, mesh: jax.sharding.Mesh, chunk: int = 256, *, backbone: bool = False):
    """Returns `bind(params, batch_stats) -> embed(crops (N, ...)) -> (N, D) numpy`: the encoder's
    embeddings or, with `backbone`, its pooled backbone features (the final Linear's input).

    The encoder runs in eval mode: BatchNorm uses (and never updates) its running statistics.
    Crops go through in fixed-size chunks, padded to a multiple of the device count, so one
    compiled program serves every call. Every process passes the same crops and gets all the
    embeddings back (replicated), so this works unchanged with several processes.
    """
    n_dev = mesh.devices.size
    chunk = -(-chunk // n_dev) * n_dev
    data = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    @functools.partial(jax.jit, out_shardings=replicated)
    def forward(params, batch_stats, x):
        out = model.apply(params, batch_stats, x, train=False, with_pooled=backbone)[0]
        return out[0] if backbone else out

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


def load_embed_fns(workdir: str, step: int | None = None, *, backbone: bool = False):
    """`(config, embeds, state)` of a pretraining checkpoint (latest step by default): its stored
    config, `{"pretrained": ..., "random_init": ...}` frozen encoders (random_init: the same
    architecture and seed pretraining started from) and the restored train state. With
    `backbone`, also `"pretrained_backbone"` and `"random_init_backbone"`: the same encoders'
    pooled backbone features (before the final Linear; a method's MLP head is never included)."""
    config, networks, state = checkpoints.load_encoder(workdir, step)
    mesh = runtime.make_mesh()
    weights = {
        "pretrained": (state["params"]["encoder"], state["batch_stats"]),
        "random_init": (networks.params, networks.batch_stats),
    }
    embeds = {}
    for layer, suffix in ((False, ""), (True, "_backbone"))[: 1 + backbone]:
        bind = make_embed_fn(networks, mesh, backbone=layer)
        embeds.update({name + suffix: bind(*w) for name, w in weights.items()})
    return config, embeds, state


def flatten(a: np.ndarray) -> np.ndarray:
    """`(B, K, ...)` per-image arrays -> `(B*K, ...)` per-crop rows."""
    a = np.asarray(a)
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def embed_elements(
    elements: Iterable[dict[str, np.ndarray]],
    embeds: Mapping[str, EmbedFn],
    combine: Callable[[list[np.ndarray]], np.ndarray],
    *,
    with_crops: bool,
    desc: str | None = None,
    total: int | None = None,
) -> dict:
    """Runs every encoder on the "crops" of each element and gathers all elements' arrays.

    Returns `{key: combine([values of every element])}` for every key of the elements (without
    "crops" unless `with_crops`) plus `embeddings` as `{name: combine([embedded crops])}`; `{}`
    when there are no elements. `combine` is `np.stack` for equal-sized elements (one image each
    in `collect`) or `np.concatenate` to pool rows (grid crops of images of different sizes).
    With `desc`, a progress bar over the elements (`total` of them, if known) on process 0's
    stderr, shown only when stderr is a terminal and removed when done.
    """
    parts: dict[str, list[np.ndarray]] = {}
    embedded: dict[str, list[np.ndarray]] = {name: [] for name in embeds}
    if desc is not None:
        elements = tqdm.tqdm(
            elements,
            desc=desc,
            total=total,
            unit="image",
            leave=False,
            disable=None if jax.process_index() == 0 else True,
        )
    for element in elements:
        for name, embed in embeds.items():
            embedded[name].append(embed(element["crops"]))
        if not with_crops:
            del element["crops"]
        for key, value in element.items():
            parts.setdefault(key, []).append(value)
    if not parts:
        return {}
    out = {key: combine(value) for key, value in parts.items()}
    out["embeddings"] = {name: combine(value) for name, value in embedded.items()}
    return out


def collect(
    config: ml_collections.ConfigDict,
    split: str,
    embeds: Mapping[str, EmbedFn],
    *,
    max_images: int,
    crops_per_image: int | None = None,
    lesion_share: float = 0.0,
    with_crops: bool = False,
    seed: int = 1234,
) -> dict:
    """Embeds fixed crops (same crops every call for a seed) of the first `max_images` images.

    Every encoder in `embeds` sees the same crops, read and sampled once. Returns `(B, K, ...)`
    arrays: centres (mm), lesion_fraction, has_lesion, image_id `(B,)`, `embeddings` as
    `{name: (B, K, D)}` and, with `with_crops`, the crops themselves (raw-intensity features).
    """
    k = crops_per_image or config.eval.crops_per_image
    ds = pipeline.make_dataset(
        config.data,
        split,
        seed=seed,
        train=False,
        batch_size=1,
        crops_per_image=k,
        lesion_share=lesion_share,
    )

    def first_images():
        for n, element in enumerate(ds):
            if n >= max_images:
                break
            yield {key: value[0] for key, value in element.items()}

    out = embed_elements(
        first_images(), embeds, np.stack, with_crops=with_crops, desc=f"embed {split}", total=max_images
    )
    if not out:
        raise ValueError(f"split {split!r} of {config.data.name} has no images")
    return out

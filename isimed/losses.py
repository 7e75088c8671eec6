"""Losses on embeddings (pure jnp functions, always computed in float32)."""

from __future__ import annotations

import jax.numpy as jnp


def safe_sqrt(sq: jnp.ndarray) -> jnp.ndarray:
    """sqrt with a zero (not infinite) gradient at 0, so identical embeddings give finite grads."""
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def pairwise_distances(x: jnp.ndarray) -> jnp.ndarray:
    """Euclidean distances `(n, n)` between rows of `x` `(n, d)`, with a safe gradient.

    Uses the Gram form (memory n^2, not n^2 d) on mean-centred rows, which keeps the cancellation
    error of |a|^2 + |b|^2 - 2ab small; the diagonal is exactly 0.
    """
    x = x.astype(jnp.float32)
    x = x - jnp.mean(x, axis=0, keepdims=True)
    sq_norms = jnp.sum(x * x, axis=-1)
    sq = sq_norms[:, None] + sq_norms[None, :] - 2.0 * (x @ x.T)
    sq = jnp.maximum(sq, 0.0) * (1.0 - jnp.eye(x.shape[0], dtype=x.dtype))
    return safe_sqrt(sq)


def physical_distances(points: jnp.ndarray) -> jnp.ndarray:
    """Exact distances `(n, n)` between low-dimensional points (mm); difference form is cheap here."""
    points = points.astype(jnp.float32)
    diff = points[:, None, :] - points[None, :, :]
    return safe_sqrt(jnp.sum(diff * diff, axis=-1))


def pair_masks(num_images: int, crops_per_image: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Upper-triangle (i < j) masks of within-image and cross-image pairs over B*K crops."""
    image = jnp.repeat(jnp.arange(num_images), crops_per_image)
    n = num_images * crops_per_image
    upper = jnp.triu(jnp.ones((n, n), dtype=bool), k=1)
    same = image[:, None] == image[None, :]
    return upper & same, upper & ~same


def isimed_loss(
    embeddings: jnp.ndarray,
    centres_mm: jnp.ndarray,
    *,
    scale: float | jnp.ndarray,
    pairs: str = "within",
    within_weight: float = 1.0,
    cross_weight: float = 1.0,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """ISImed distance loss.

    Args:
      embeddings: `(B, K, D)` embeddings of K crops from each of B images.
      centres_mm: `(B, K, ndim)` crop centres in world millimetres.
      scale: target distance = physical distance (mm) / scale.
      pairs: "within" uses pairs of crops from the same image; "all" adds cross-image pairs.
      within_weight, cross_weight: weights of the two pair classes. Each class is averaged over its
        own pairs, so the loss does not change with B and K.

    Returns:
      loss and `{"within": ..., "cross": ...}` (per-class mean squared errors; cross is 0 if B=1).
    """
    if pairs not in ("within", "all"):
        raise ValueError(f"pairs must be 'within' or 'all', got {pairs!r}")
    b, k = embeddings.shape[:2]
    latent = pairwise_distances(embeddings.reshape(b * k, -1))
    target = physical_distances(centres_mm.reshape(b * k, -1)) / scale
    err = jnp.square(latent - target)
    within_mask, cross_mask = pair_masks(b, k)

    def masked_mean(mask):
        return jnp.sum(jnp.where(mask, err, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

    within, cross = masked_mean(within_mask), masked_mean(cross_mask)
    loss = within_weight * within
    if pairs == "all":
        loss = loss + cross_weight * cross
    return loss, {"within": within, "cross": cross}

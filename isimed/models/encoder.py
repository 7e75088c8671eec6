"""What every encoder shares: the last feature map, global average pooling, the final Linear.

`Encoder.__call__` is the one place where the pooled backbone features (the input of the final
Linear, what linear evaluation probes as "backbone") and the embedding are computed, so the two
cannot drift apart: the embedding is always `head(pooled)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from isimed.models.layers import global_avg_pool


class Encoder(nnx.Module):
    """Base class: a subclass defines `features(x)` (its last feature map) and `head` (a Linear)."""

    def features(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    def __call__(self, x: jax.Array, *, with_pooled: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Map (N, *spatial, C) inputs to (N, embed_dim) float32 embeddings; with `with_pooled`,
        `(pooled, embeddings)` with the (N, channels) float32 pooled backbone features."""
        pooled = global_avg_pool(self.features(x))
        embeddings = self.head(pooled).astype(jnp.float32)
        return (pooled, embeddings) if with_pooled else embeddings

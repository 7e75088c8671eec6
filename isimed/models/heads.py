"""Projection / expander MLP heads of the two-view baselines (SimCLR, VICReg, Barlow Twins).

Heads exist only during pretraining and always see a whole training batch, so their batch
normalisation uses the statistics of that batch and keeps no running averages: the head's state is
its parameters alone. Under jit with the batch sharded over devices the mean and variance are over
the global batch (synchronised batch norm, as the baselines' papers use).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

BN_EPSILON = 1e-5


class BatchStandardise(nnx.Module):
    """Train-mode batch norm without running statistics: (x - mean) / sqrt(var + eps) * scale + bias."""

    def __init__(self, features: int):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        mean = jnp.mean(x, axis=0, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=0, keepdims=True)
        return (x - mean) / jnp.sqrt(var + BN_EPSILON) * self.scale[...] + self.bias[...]


class MLPHead(nnx.Module):
    """`in_dim -> dims[0] -> ... -> dims[-1]`: Linear, batch norm, ReLU on every hidden layer and a
    plain Linear output (SimCLR v2's projector and VICReg's / Barlow Twins' expander)."""

    def __init__(self, in_dim: int, dims: Sequence[int], *, rngs: nnx.Rngs):
        if not dims:
            raise ValueError("an MLP head needs at least one layer size")
        sizes = (in_dim, *dims)
        pairs = list(zip(sizes[:-2], sizes[1:-1]))
        self.linears = nnx.List([nnx.Linear(a, b, use_bias=False, rngs=rngs) for a, b in pairs])
        self.norms = nnx.List([BatchStandardise(b) for _, b in pairs])
        self.out = nnx.Linear(sizes[-2], sizes[-1], rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.astype(jnp.float32)
        for linear, norm in zip(self.linears, self.norms):
            x = nnx.relu(norm(linear(x)))
        return self.out(x)

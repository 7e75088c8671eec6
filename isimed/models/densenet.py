"""DenseNet encoders matching the layout of MONAI's ``DenseNet`` / ``DenseNet121``."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from isimed.models.encoder import Encoder
from isimed.models.layers import avg_pool
from isimed.models.layers import batch_norm
from isimed.models.layers import check_spatial_dims
from isimed.models.layers import conv
from isimed.models.layers import cpu_backend
from isimed.models.layers import linear
from isimed.models.layers import max_pool
from isimed.models.layers import resolve_dtype


class DenseLayer(nnx.Module):
    """BN -> ReLU -> 1x1 conv (bottleneck) -> BN -> ReLU -> 3x3 conv; output is appended to the input."""

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bn_size: int,
        dropout_prob: float,
        *,
        spatial_dims: int,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        im2col: bool = False,
    ) -> None:
        hidden = bn_size * growth_rate
        kw = dict(spatial_dims=spatial_dims, dtype=dtype, rngs=rngs, im2col=im2col)
        self.bn1 = batch_norm(in_channels, dtype=dtype, rngs=rngs)
        self.conv1 = conv(in_channels, hidden, 1, **kw)
        self.bn2 = batch_norm(hidden, dtype=dtype, rngs=rngs)
        self.conv2 = conv(hidden, growth_rate, 3, padding=1, **kw)
        self.dropout = nnx.Dropout(dropout_prob, rngs=rngs) if dropout_prob > 0 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv1(nnx.relu(self.bn1(x)))
        y = self.conv2(nnx.relu(self.bn2(y)))
        if self.dropout is not None:
            y = self.dropout(y)
        return jnp.concatenate([x, y], axis=-1)


class Transition(nnx.Module):
    """BN -> ReLU -> 1x1 conv -> 2x2 average pool with stride 2.

    With ``im2col`` the pool comes before the (linear, bias-free) 1x1 conv: the same function,
    with 2^d times fewer multiply-adds.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        spatial_dims: int,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        im2col: bool = False,
    ) -> None:
        self.bn = batch_norm(in_channels, dtype=dtype, rngs=rngs)
        self.conv = conv(
            in_channels, out_channels, 1, spatial_dims=spatial_dims, dtype=dtype, rngs=rngs, im2col=im2col
        )
        self.im2col = im2col

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn(x))
        if self.im2col:
            return self.conv(avg_pool(x, 2, 2, reshape=True))
        return avg_pool(self.conv(x), 2, 2)


class DenseNet(Encoder):
    """DenseNet encoder producing an (N, embed_dim) float32 embedding.

    Defaults are DenseNet-121 as configured by MONAI (``DenseNet121``).

    Args:
      spatial_dims: 2 or 3.
      embed_dim: size of the output embedding (the final Linear's width).
      in_channels: number of input channels.
      dtype: compute dtype; parameters are always float32, the output is float32.
      init_features: channels produced by the stem.
      growth_rate: channels each dense layer adds.
      block_config: number of dense layers in each dense block.
      bn_size: bottleneck width of a dense layer, in multiples of ``growth_rate``.
      dropout_prob: dropout after each dense layer's 3x3 conv (needs a
        ``dropout`` RNG stream in ``rngs`` when positive).
      im2col: compute convolutions as matmuls (1^d convs) and patches + matmul (the others), and
        the pools with reshapes (see :func:`~isimed.models.layers.matmul_conv`); much faster under
        XLA:CPU, same function and parameters. ``None`` (default): when JAX's backend is the CPU.
      rngs: parameter (and dropout) RNGs.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        embed_dim: int,
        in_channels: int = 1,
        dtype: str | jnp.dtype = "float32",
        init_features: int = 64,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        bn_size: int = 4,
        dropout_prob: float = 0.0,
        im2col: bool | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        check_spatial_dims(spatial_dims)
        self.dtype = resolve_dtype(dtype)
        self.im2col = cpu_backend() if im2col is None else im2col
        kw = dict(spatial_dims=spatial_dims, dtype=self.dtype, rngs=rngs, im2col=self.im2col)
        self.stem = conv(in_channels, init_features, 7, stride=2, padding=3, **kw)
        self.stem_bn = batch_norm(init_features, dtype=self.dtype, rngs=rngs)

        # Each stage is a dense block, followed by a transition except after the last.
        stages = []
        channels = init_features
        for i, num_layers in enumerate(block_config):
            layers = []
            for _ in range(num_layers):
                layers.append(DenseLayer(channels, growth_rate, bn_size, dropout_prob, **kw))
                channels += growth_rate
            if i < len(block_config) - 1:
                layers.append(Transition(channels, channels // 2, **kw))
                channels //= 2
            stages.append(nnx.Sequential(*layers))
        self.stages = nnx.List(stages)
        self.final_bn = batch_norm(channels, dtype=self.dtype, rngs=rngs)
        self.head = linear(channels, embed_dim, dtype=self.dtype, rngs=rngs)

    def stem_features(self, x: jax.Array) -> jax.Array:
        """(N, *spatial, C) inputs -> the stem's output: conv, BN-ReLU, 3-wide stride-2 max-pool."""
        return max_pool(nnx.relu(self.stem_bn(self.stem(x))), 3, 2, 1, reshape=self.im2col)

    def features(self, x: jax.Array) -> jax.Array:
        """(N, *spatial, C) inputs -> final feature map, after the last BN-ReLU."""
        x = self.stem_features(x)
        for stage in self.stages:
            x = stage(x)
        return nnx.relu(self.final_bn(x))

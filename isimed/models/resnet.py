"""torchvision-style ResNet encoders (v1.5: stride on the bottleneck's 3x3 conv)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from isimed.models.encoder import Encoder
from isimed.models.layers import batch_norm
from isimed.models.layers import check_spatial_dims
from isimed.models.layers import conv
from isimed.models.layers import linear
from isimed.models.layers import max_pool
from isimed.models.layers import resolve_dtype


class _Shortcut(nnx.Module):
    """1x1 strided projection + BN, used when a block changes shape."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        *,
        spatial_dims: int,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ) -> None:
        self.conv = conv(
            in_channels, out_channels, 1, stride=stride, spatial_dims=spatial_dims, dtype=dtype, rngs=rngs
        )
        self.bn = batch_norm(out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
    """Two 3x3 convs with an identity or projection shortcut."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int,
        *,
        spatial_dims: int,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ) -> None:
        kw = dict(spatial_dims=spatial_dims, dtype=dtype, rngs=rngs)
        out_channels = width * self.expansion
        self.conv1 = conv(in_channels, width, 3, stride=stride, padding=1, **kw)
        self.bn1 = batch_norm(width, dtype=dtype, rngs=rngs)
        self.conv2 = conv(width, out_channels, 3, padding=1, **kw)
        self.bn2 = batch_norm(out_channels, dtype=dtype, rngs=rngs)
        self.shortcut = (
            _Shortcut(in_channels, out_channels, stride, **kw)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        residual = x if self.shortcut is None else self.shortcut(x)
        return nnx.relu(y + residual)


class Bottleneck(nnx.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand (x4), with shortcut."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int,
        *,
        spatial_dims: int,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ) -> None:
        kw = dict(spatial_dims=spatial_dims, dtype=dtype, rngs=rngs)
        out_channels = width * self.expansion
        self.conv1 = conv(in_channels, width, 1, **kw)
        self.bn1 = batch_norm(width, dtype=dtype, rngs=rngs)
        self.conv2 = conv(width, width, 3, stride=stride, padding=1, **kw)
        self.bn2 = batch_norm(width, dtype=dtype, rngs=rngs)
        self.conv3 = conv(width, out_channels, 1, **kw)
        self.bn3 = batch_norm(out_channels, dtype=dtype, rngs=rngs)
        self.shortcut = (
            _Shortcut(in_channels, out_channels, stride, **kw)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        residual = x if self.shortcut is None else self.shortcut(x)
        return nnx.relu(y + residual)


class ResNet(Encoder):
    """ResNet encoder producing an (N, embed_dim) float32 embedding.

    Args:
      spatial_dims: 2 or 3.
      embed_dim: size of the output embedding (the final Linear's width).
      in_channels: number of input channels.
      dtype: compute dtype; parameters are always float32, the output is float32.
      block: ``BasicBlock`` or ``Bottleneck``.
      stage_sizes: number of blocks in each of the stages.
      base_width: width of the first stage; doubled at every following stage.
      small_input: use a 3x3 stride-1 stem without max-pool, which keeps
        enough resolution for 16^3-32^3 crops.
      rngs: parameter RNGs.
    """

    def __init__(
        self,
        *,
        spatial_dims: int,
        embed_dim: int,
        in_channels: int = 1,
        dtype: str | jnp.dtype = "float32",
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock,
        stage_sizes: Sequence[int] = (2, 2, 2, 2),
        base_width: int = 64,
        small_input: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        check_spatial_dims(spatial_dims)
        self.dtype = resolve_dtype(dtype)
        self.small_input = small_input
        kw = dict(spatial_dims=spatial_dims, dtype=self.dtype, rngs=rngs)
        if small_input:
            self.stem = conv(in_channels, base_width, 3, padding=1, **kw)
        else:
            self.stem = conv(in_channels, base_width, 7, stride=2, padding=3, **kw)
        self.stem_bn = batch_norm(base_width, dtype=self.dtype, rngs=rngs)

        blocks = []
        channels = base_width
        for stage, num_blocks in enumerate(stage_sizes):
            width = base_width * 2**stage
            for i in range(num_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block(channels, width, stride, **kw))
                channels = width * block.expansion
        self.blocks = nnx.List(blocks)
        self.head = linear(channels, embed_dim, dtype=self.dtype, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """(N, *spatial, C) inputs -> feature map of the last stage."""
        x = nnx.relu(self.stem_bn(self.stem(x)))
        if not self.small_input:
            x = max_pool(x, 3, 2, 1)
        for blk in self.blocks:
            x = blk(x)
        return x

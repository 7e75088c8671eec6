"""Encoders mapping 2D/3D channels-last crops to (N, embed_dim) embeddings (and, on request, their
pooled backbone features: `isimed.models.encoder.Encoder`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from isimed.models.densenet import DenseNet
from isimed.models.encoder import Encoder
from isimed.models.resnet import BasicBlock
from isimed.models.resnet import Bottleneck
from isimed.models.resnet import ResNet
from isimed.models.small_cnn import SmallCNN

__all__ = [
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "DenseNet",
    "Encoder",
    "ResNet",
    "SmallCNN",
    "count_params",
    "create_encoder",
]

MODELS: dict[str, Callable[..., nnx.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18": functools.partial(ResNet, block=BasicBlock, stage_sizes=(2, 2, 2, 2)),
    "resnet50": functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 6, 3)),
    "densenet121": functools.partial(
        DenseNet, init_features=64, growth_rate=32, block_config=(6, 12, 24, 16)
    ),
}


def create_encoder(
    name: str,
    *,
    spatial_dims: int,
    embed_dim: int,
    in_channels: int = 1,
    dtype: str | jnp.dtype = "float32",
    rngs: nnx.Rngs,
    **kwargs,
) -> nnx.Module:
    """Build a registered encoder; ``kwargs`` go to the model class (e.g. ``small_input=True``).

    BatchNorm layers start in train mode; call ``model.eval()`` to use running statistics.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    return MODELS[name](
        spatial_dims=spatial_dims,
        embed_dim=embed_dim,
        in_channels=in_channels,
        dtype=dtype,
        rngs=rngs,
        **kwargs,
    )


def count_params(module: nnx.Module) -> int:
    """Number of trainable elements (``nnx.Param`` leaves; BatchNorm statistics excluded).

    Works on abstract modules from ``nnx.eval_shape`` too.
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))

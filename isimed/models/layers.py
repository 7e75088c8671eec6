"""Dimension-agnostic building blocks shared by the encoders.

Every helper takes ``spatial_dims`` (2 or 3) so that one model definition
serves both (N, H, W, C) and (N, D, H, W, C) channels-last inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# He/Kaiming normal (fan_out, as torchvision's ResNet; MONAI's DenseNet uses
# fan_in): keeps deep ReLU stacks well-scaled at init.
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's BatchNorm momentum=0.1 weights the new batch; Flax's momentum
# weights the old running value, so 0.9 here is the same update rule.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def check_spatial_dims(spatial_dims: int) -> None:
    """Raise ``ValueError`` unless ``spatial_dims`` is 2 or 3."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    """Turn a dtype name or object into a floating ``jnp.dtype``."""
    resolved = jnp.dtype(dtype)
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"compute dtype must be floating point, got {resolved}")
    return resolved


def conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    spatial_dims: int,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
    stride: int = 1,
    padding: int = 0,
    use_bias: bool = False,
    im2col: bool = False,
) -> nnx.Conv:
    """Cubic/square convolution with PyTorch-style symmetric integer padding.

    ``im2col=True`` swaps in :func:`im2col_conv`, much faster on CPU for small models.
    """
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(kernel_size,) * spatial_dims,
        strides=(stride,) * spatial_dims,
        padding=((padding, padding),) * spatial_dims,
        use_bias=use_bias,
        kernel_init=CONV_INIT,
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=im2col_conv if im2col else jax.lax.conv_general_dilated,
        rngs=rngs,
    )


def batch_norm(num_features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm in train mode; switch with ``model.train()`` / ``model.eval()``."""
    return nnx.BatchNorm(
        num_features,
        use_running_average=False,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def linear(in_features: int, out_features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """Dense layer with bias, computing in ``dtype`` with float32 parameters."""
    return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """Max-pool over all spatial axes; padded cells are -inf as in PyTorch."""
    dims = x.ndim - 2
    return nnx.max_pool(x, (window,) * dims, (stride,) * dims, ((padding, padding),) * dims)


def avg_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """Unpadded average pool over all spatial axes (PyTorch floor mode)."""
    dims = x.ndim - 2
    return nnx.avg_pool(x, (window,) * dims, (stride,) * dims, "VALID")


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes, accumulated in float32 for accuracy in bf16."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), dtype=jnp.float32)


def im2col_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: jax.lax.ConvDimensionNumbers | None = None,
    feature_group_count: int = 1,
    precision: jax.lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
    out_sharding: object = None,
) -> jax.Array:
    """Drop-in for ``lax.conv_general_dilated`` as called by ``nnx.Conv``: patches + one matmul.

    XLA:CPU runs 3D convolutions slowly and the input-gradient of a strided
    one (a dilated convolution) 10-100x slower still; gathering the kernel
    taps with strided slices and contracting them in a single dot keeps the
    forward and both gradients on fast matmul/slice kernels. Only the plain
    channels-last case that ``nnx.Conv`` produces with explicit padding is
    supported.
    """
    dims = lhs.ndim - 2
    if (
        any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
        or feature_group_count != 1
        or isinstance(padding, str)
        or dimension_numbers != _nnx_conv_dimension_numbers(dims)
        or out_sharding is not None
    ):
        raise NotImplementedError("im2col_conv supports only nnx.Conv's channels-last, undilated, ungrouped case")
    patches = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
    # Gather taps one axis at a time, innermost first (dims*k slices instead of
    # k**dims): the channels end up ordered (k_1, ..., k_dims, in), i.e. a
    # row-major reshape of the (*kernel, in, out) kernel.
    for axis in reversed(range(1, dims + 1)):
        k, s = rhs.shape[axis - 1], window_strides[axis - 1]
        n = (patches.shape[axis] - k) // s + 1
        patches = jnp.concatenate(
            [jax.lax.slice_in_dim(patches, o, o + s * (n - 1) + 1, s, axis) for o in range(k)], axis=-1
        )
    return jnp.dot(
        patches,
        rhs.reshape(-1, rhs.shape[-1]),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _nnx_conv_dimension_numbers(dims: int) -> jax.lax.ConvDimensionNumbers:
    """The channels-last dimension numbers ``nnx.Conv`` passes for ``dims`` spatial axes."""
    ndim = dims + 2
    lhs_spec = (0, ndim - 1, *range(1, ndim - 1))
    return jax.lax.ConvDimensionNumbers(lhs_spec, (ndim - 1, ndim - 2, *range(ndim - 2)), lhs_spec)

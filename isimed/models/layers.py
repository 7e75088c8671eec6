"""Dimension-agnostic building blocks shared by the encoders.

Every helper takes ``spatial_dims`` (2 or 3) so that one model definition
serves both (N, H, W, C) and (N, D, H, W, C) channels-last inputs.
"""

from __future__ import annotations

import functools
import itertools
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


def cpu_backend() -> bool:
    """True when JAX computes on the CPU: the models then use the matmul formulations below."""
    return jax.default_backend() == "cpu"


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

    ``im2col=True`` swaps in :func:`matmul_conv` (patches + matmul, and plain matmuls for 1^d
    kernels), much faster under XLA:CPU. The parameters are the same either way.
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
        conv_general_dilated=matmul_conv if im2col else jax.lax.conv_general_dilated,
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


def max_pool(x: jax.Array, window: int, stride: int, padding: int, *, reshape: bool = False) -> jax.Array:
    """Max-pool over all spatial axes; padded cells are -inf as in PyTorch.

    ``reshape=True`` computes the 3-wide, stride-2, 1-padded pool of even-sized inputs (the
    DenseNet and ResNet stems) with reshapes and elementwise maxima (:func:`_max_pool_3s2`): same
    values and the same gradient (each window's first maximum gets it); under XLA:CPU its forward
    and backward take ~25 ms for 32 DenseNet stems, ``reduce_window``'s ~130 ms (~800 ms with
    glibc's default allocator, see :func:`~isimed.runtime.tune_malloc`). Other cases fall back
    to ``reduce_window``.
    """
    dims = x.ndim - 2
    if reshape and (window, stride, padding) == (3, 2, 1) and all(n % 2 == 0 for n in x.shape[1:-1]):
        return _max_pool_3s2(x)
    return nnx.max_pool(x, (window,) * dims, (stride,) * dims, ((padding, padding),) * dims)


def avg_pool(x: jax.Array, window: int, stride: int, *, reshape: bool = False) -> jax.Array:
    """Unpadded average pool over all spatial axes (PyTorch floor mode).

    ``reshape=True`` computes non-overlapping windows (``window == stride``) as a reshape and a
    mean, whose gradient is a broadcast instead of XLA:CPU's slow ``reduce_window`` transpose.
    """
    dims = x.ndim - 2
    if reshape and window == stride:
        spatial = [n // window for n in x.shape[1:-1]]
        x = x[(slice(None), *(slice(0, n * window) for n in spatial))]  # floor mode
        x = x.reshape(x.shape[0], *(v for n in spatial for v in (n, window)), x.shape[-1])
        return jnp.mean(x, axis=tuple(range(2, 2 * dims + 1, 2))).astype(x.dtype)
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
    _check_plain_conv(dims, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)
    if out_sharding is not None:
        raise NotImplementedError("im2col_conv does not take out_sharding")
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


def matmul_conv(
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
    """Drop-in for ``lax.conv_general_dilated`` as called by ``nnx.Conv``, as matmuls (for XLA:CPU).

    - 1^d kernels, stride 1, no padding: one matmul over the channels (channels-last data).
    - odd kernels, stride 1, "same" padding (the DenseNet 3^3 convs): :func:`_same_conv`,
      patches + one matmul with a hand-written gradient that needs no patches of the input.
    - anything else (strided stems): :func:`im2col_conv`.
    """
    dims = lhs.ndim - 2
    _check_plain_conv(dims, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)
    if out_sharding is not None:
        raise NotImplementedError("matmul_conv does not take out_sharding")
    kernel, strides = rhs.shape[:-2], tuple(window_strides)
    if all(s == 1 for s in strides):
        if all(k == 1 for k in kernel) and all(tuple(p) == (0, 0) for p in padding):
            matrix = rhs.reshape(rhs.shape[-2:])
            return jnp.dot(lhs, matrix, precision=precision, preferred_element_type=preferred_element_type)
        if all(k % 2 == 1 and tuple(p) == (k // 2, k // 2) for k, p in zip(kernel, padding)):
            return _same_conv(lhs, rhs, precision, preferred_element_type)
    return im2col_conv(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        precision,
        preferred_element_type,
        out_sharding,
    )


def _check_plain_conv(dims, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count):
    if (
        any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
        or feature_group_count != 1
        or isinstance(padding, str)
        or dimension_numbers != _nnx_conv_dimension_numbers(dims)
    ):
        raise NotImplementedError(
            "matmul_conv and im2col_conv support only nnx.Conv's channels-last, undilated, ungrouped case"
        )


def _tap_offsets(kernel: Sequence[int], spatial: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """Per axis, the offsets of a centred odd kernel's taps that can reach a voxel of the input.

    The others only ever meet zero padding (at 1^3, only the centre of a 3^3 kernel), so they are
    left out of the patches; their gradient is zero.
    """
    reach = [range(-(k // 2), k // 2 + 1) for k in kernel]
    return tuple(tuple(o for o in offs if abs(o) < n) for offs, n in zip(reach, spatial))


def _shifted_copies(x: jax.Array, offsets: Sequence[Sequence[int]], sign: int) -> jax.Array:
    """(N, *spatial, C) -> (N, *spatial, T*C): x[p + sign * o] for each tap offset o (row-major
    over the per-axis ``offsets``, zero outside), gathered one axis at a time (innermost first: the
    fewest, largest copies; faster and much quicker to compile under XLA:CPU than T slices)."""
    radius = [max(abs(o) for o in offs) for offs in offsets]
    y = jnp.pad(x, ((0, 0), *((r, r) for r in radius), (0, 0)))
    for axis in reversed(range(1, x.ndim - 1)):
        r, n = radius[axis - 1], x.shape[axis]
        taps = [jax.lax.slice_in_dim(y, r + sign * o, r + sign * o + n, axis=axis) for o in offsets[axis - 1]]
        if len(taps) > 1:  # (..., T_axis, C) -> (..., T_axis * C): this axis's taps outermost so far
            taps = [jnp.stack(taps, axis=-2).reshape(*taps[0].shape[:-1], -1)]
        y = taps[0]
    return y


def _active_kernel(w: jax.Array, offsets: Sequence[Sequence[int]]) -> jax.Array:
    """The taps of a (*kernel, in, out) kernel at ``offsets`` (contiguous, centred ranges)."""
    index = tuple(slice(k // 2 + offs[0], k // 2 + offs[-1] + 1) for k, offs in zip(w.shape[:-2], offsets))
    return w[index]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _same_conv(x: jax.Array, w: jax.Array, precision=None, preferred_element_type=None) -> jax.Array:
    """Stride-1 convolution of (N, *spatial, in) with a (*odd kernel, in, out) kernel, zero "same"
    padding: y[p] = sum_t x[p + o_t] @ w_t.

    Forward: one matmul x @ [w_1 ... w_T] (T*out columns, 864 for a dense layer's 3^3 conv to 32),
    then the T shifted column blocks summed in one elementwise pass; x is never copied T times.
    Backward, by hand: with g's patches at the opposite offsets (T*out channels),
    dx = patches(g) @ w^T and dw = x^T @ patches(g). Both avoid XLA:CPU's convolution kernels and
    the transposes of pad/slice chains that autodiff would produce.
    """
    offsets = _tap_offsets(w.shape[:-2], x.shape[1:-1])
    wa = _active_kernel(w, offsets)
    cin, cout = w.shape[-2:]
    taps = wa.size // (cin * cout)
    y = jnp.dot(
        x,
        jnp.moveaxis(wa.reshape(taps, cin, cout), 0, 1).reshape(cin, taps * cout),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return _shifted_sum(y.reshape(*x.shape[:-1], taps, cout), offsets)


def _shifted_sum(y: jax.Array, offsets: Sequence[Sequence[int]]) -> jax.Array:
    """(N, *spatial, T, C) -> (N, *spatial, C): sum over taps t of y[p + o_t, t] (zero outside).

    Each tap's term is its in-range block of y padded back to full size: single-use pads that XLA
    fuses with the sum into one pass over y (one pad of the whole of y, sliced 27 times, was
    materialised: a second copy of the (N, *spatial, 27 * C) matmul output each conv).
    """
    spatial = y.shape[1:-2]
    total = None
    for t, tap in enumerate(itertools.product(*offsets)):
        start = (0, *(max(o, 0) for o in tap), t, 0)
        limit = (y.shape[0], *(n + min(o, 0) for n, o in zip(spatial, tap)), t + 1, y.shape[-1])
        part = jax.lax.slice(y, start, limit)[..., 0, :]
        part = jnp.pad(part, ((0, 0), *((max(-o, 0), max(o, 0)) for o in tap), (0, 0)))
        total = part if total is None else total + part
    return total


def _same_conv_fwd(x, w, precision, preferred_element_type):
    return _same_conv(x, w, precision, preferred_element_type), (x, w)


def _same_conv_bwd(precision, preferred_element_type, residuals, g):
    del preferred_element_type
    x, w = residuals
    offsets = _tap_offsets(w.shape[:-2], x.shape[1:-1])
    wa = _active_kernel(w, offsets)
    cin, cout = w.shape[-2:]
    taps = wa.size // (cin * cout)
    gp = _shifted_copies(g.astype(x.dtype), offsets, -1).reshape(-1, taps * cout)
    # dx = gp @ w_all^T with w_all the forward's (in, T*out) matrix, contracted on its columns as
    # it is laid out: ~25% faster under XLA:CPU than transposing it for a plain matmul.
    w_all = jnp.moveaxis(wa.reshape(taps, cin, cout), 0, 1).reshape(cin, taps * cout)
    dx = jax.lax.dot_general(gp, w_all, (((1,), (1,)), ((), ())), precision=precision).reshape(x.shape)
    dwa = jnp.dot(x.reshape(-1, cin).T, gp, precision=precision, preferred_element_type=jnp.float32)
    dwa = jnp.swapaxes(dwa.reshape(cin, taps, cout), 0, 1).reshape(wa.shape)
    pad = [(k // 2 + offs[0], k // 2 - offs[-1]) for k, offs in zip(w.shape[:-2], offsets)]
    dw = jnp.pad(dwa, (*pad, (0, 0), (0, 0)))
    return dx, dw.astype(w.dtype)


_same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def _max_pool_3s2(x: jax.Array) -> jax.Array:
    """3-wide, stride-2 max-pool of even-sized (N, *spatial, C) with one -inf cell of padding per
    side: out[o] = max(x[2o - 1], x[2o], x[2o + 1]) along each axis in turn, with reshapes (no
    strided slices). Its gradient goes to the first maximum of each window in row-major order, as
    XLA's ``select_and_scatter`` (and PyTorch) route it: per axis each 3-tap max picks its first
    maximal tap (:func:`_first_max3`), and the axes are reduced innermost first, so the outermost
    choice is made first, i.e. lexicographically."""
    for axis in range(x.ndim - 2, 0, -1):
        n = x.shape[axis]
        pairs = x.reshape(*x.shape[:axis], n // 2, 2, *x.shape[axis + 1 :])
        even = jax.lax.index_in_dim(pairs, 0, axis + 1, keepdims=False)
        odd = jax.lax.index_in_dim(pairs, 1, axis + 1, keepdims=False)
        # Window o's taps along this axis: x[2o - 1] (the previous pair's odd one), x[2o], x[2o + 1].
        previous_odd = jnp.pad(
            jax.lax.slice_in_dim(odd, 0, n // 2 - 1, axis=axis),
            [(1, 0) if a == axis else (0, 0) for a in range(x.ndim)],
            constant_values=-jnp.inf,
        )
        x = _first_max3(previous_odd, even, odd)
    return x


@jax.custom_jvp
def _first_max3(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """Elementwise max of three; its derivative is that of the first argument equal to the max
    (``jnp.maximum`` would split it between ties)."""
    return jnp.maximum(jnp.maximum(a, b), c)


@_first_max3.defjvp
def _first_max3_jvp(primals, tangents):
    a, b, c = primals
    ta, tb, tc = tangents
    m = _first_max3(a, b, c)
    return m, jnp.where(a == m, ta, jnp.where(b == m, tb, tc))

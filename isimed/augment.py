"""Random augmentations of 2D and 3D crops for two-view baselines (SimCLR, VICReg, Barlow Twins).

Pure JAX, jit/vmap friendly, deterministic given a PRNG key. Crops are float32 in [-1, 1] (window
normalised, see `isimed.data.pipeline.normalise_window`) with shape `(*spatial, C)`, 2 or 3 spatial
dims; `augment` takes a batch `(N, *spatial, C)` and draws independently for every crop.

Ops, in the order `augment` applies them (each with its own probability; 0 disables it, and a
disabled op costs nothing because the configuration is static):

  1. flips: every spatial axis flipped independently with `flip_prob`; no transposes or rotations,
     because medical axes are anisotropic (slice spacing differs from in-plane spacing);
  2. Gaussian blur, sigma ~ U[blur_sigma_min, blur_sigma_max] voxels, the same on every axis;
  3. intensity: x * s + t, s ~ U[1 - intensity_scale, 1 + intensity_scale],
     t ~ U[-intensity_shift, intensity_shift];
  4. Gaussian noise with std ~ U[0, noise_std_max];
  5. coarse dropout: `dropout_boxes` axis-aligned boxes, each side uniform in
     [1, max(1, floor(dropout_max_fraction * side))] voxels, filled with 0 or the crop minimum;
  6. clip to [-1, 1] (`clip`, on by default).

Why this order: blur before noise so the noise stays white; dropout after both so the boxes are a
clean constant; blur and the affine intensity map commute (the kernel sums to 1), so their order is
immaterial.

Randomness: `augment` splits its key once per crop; each crop then takes one vector of U[0, 1)
draws for all scalar decisions and one normal field for the noise (see `draw_slices`). The ops
themselves (`flip`, `gaussian_blur`, `intensity`, `gaussian_noise`, `coarse_dropout`) are
deterministic functions of the crop and those draws.

Two views for SimCLR / VICReg / Barlow Twins: since every crop of the batch gets its own key, one
`augment` call on a batch holding both views augments them independently. The train step does
that: it derives its key from (seed, step), stacks the two views into one batch and calls
`augment` once, inside the jitted step with the config closed over (static).

Why clip by default: the window normalisation already saturates everything outside the window at
+-1, and the frozen-encoder evaluation only ever sees [-1, 1]; clipping keeps the pretraining input
range identical to it. The cost is a small bias where the crop sits at the window limits (noise on
air at -1 is half cut off); set `clip=False` to keep the raw values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

FILLS = ("zero", "min")


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """The config as plain, hashable Python values: jit specialises on it (one compile per config)
    and it is a pytree without leaves, so `jax.jit(augment)(key, crops, params)` works as is."""

    flip_prob: float = 0.5
    intensity_prob: float = 0.8
    intensity_scale: float = 0.2  # s ~ U[0.8, 1.2]
    intensity_shift: float = 0.1  # t ~ U[-0.1, 0.1]
    noise_prob: float = 0.5
    noise_std_max: float = 0.1
    blur_prob: float = 0.5
    blur_sigma_min: float = 0.5  # voxels
    blur_sigma_max: float = 1.5  # voxels; kernel radius ceil(3 * blur_sigma_max)
    dropout_prob: float = 0.5
    dropout_boxes: int = 2
    dropout_max_fraction: float = 0.5  # of each side: one box covers at most 1/8 of a 3D crop
    dropout_fill: str = "zero"  # 'zero' (mid-window grey) or 'min' (crop minimum, per channel)
    clip: bool = True

    def __post_init__(self):
        for name in ("flip_prob", "intensity_prob", "noise_prob", "blur_prob", "dropout_prob"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"{name} must be in [0, 1]", value)
        # A scale range of 1 or more could flip the contrast sign.
        _check(
            0.0 <= self.intensity_scale < 1.0,
            "intensity_scale must be in [0, 1)",
            self.intensity_scale,
        )
        _check(self.intensity_shift >= 0.0, "intensity_shift must be >= 0", self.intensity_shift)
        _check(self.noise_std_max >= 0.0, "noise_std_max must be >= 0", self.noise_std_max)
        _check(
            0.0 < self.blur_sigma_min <= self.blur_sigma_max,
            "need 0 < blur_sigma_min <= blur_sigma_max",
            (self.blur_sigma_min, self.blur_sigma_max),
        )
        _check(self.dropout_boxes >= 0, "dropout_boxes must be >= 0", self.dropout_boxes)
        _check(
            0.0 <= self.dropout_max_fraction <= 1.0,
            "dropout_max_fraction must be in [0, 1]",
            self.dropout_max_fraction,
        )
        _check(self.dropout_fill in FILLS, f"dropout_fill must be in {FILLS}", self.dropout_fill)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | AugmentParams) -> AugmentParams:
        """Reads a (possibly partial) config; missing entries take the defaults, unknown ones raise
        (a typo would otherwise silently leave an augmentation at its default)."""
        if isinstance(config, cls):
            return config
        values = dict(config.items())
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown augmentation settings {unknown}; known: {sorted(fields)}")
        # Python scalars, not arrays: the values are compile-time constants.
        casts = {"float": float, "int": int, "str": str, "bool": bool}
        return cls(**{k: casts[fields[k]](v) for k, v in values.items()})


jax.tree_util.register_static(AugmentParams)


def default_config() -> ml_collections.ConfigDict:
    """The augmentation config: every probability and strength (the `AugmentParams` defaults),
    intensities in normalised units (the window [lo, hi] spans [-1, 1], so 0.1 is 5 % of it)."""
    return ml_collections.ConfigDict(dataclasses.asdict(AugmentParams()))


def _check(ok: bool, message: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"augmentation config: {message}, got {value!r}")


def _spatial_axes(x: jnp.ndarray) -> range:
    """Spatial axes of one crop `(*spatial, C)`."""
    if x.ndim not in (3, 4):
        raise ValueError(f"expected one crop (*spatial, C) with 2 or 3 spatial dims, got {x.shape}")
    return range(x.ndim - 1)


def _apply_with_prob(draw: jnp.ndarray, prob: float, augmented: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """`augmented` if the U[0, 1) `draw` falls below `prob` (so with probability `prob`), else `x`.
    Static 0 or 1 skip the select."""
    if prob >= 1.0:
        return augmented
    return jnp.where(draw < prob, augmented, x)


def _between(u: jnp.ndarray, lo: float, hi: float) -> jnp.ndarray:
    """Maps U[0, 1) draws to U[lo, hi)."""
    return lo + (hi - lo) * u


# --------------------------------------------------------------------------------------------------
# Deterministic building blocks (also the references the tests compare with).


def flip_axes(x: jnp.ndarray, flags: jnp.ndarray) -> jnp.ndarray:
    """Flips spatial axis i of one crop `(*spatial, C)` where `flags[i]` is true."""
    for axis in _spatial_axes(x):
        x = jnp.where(flags[axis], jnp.flip(x, axis), x)
    return x


def gaussian_kernel(sigma: jnp.ndarray, radius: int) -> jnp.ndarray:
    """Normalised 1-D Gaussian taps at -radius..radius. The radius is static (shapes must be) while
    sigma may be traced: a kernel wider than 3 sigma only truncates less."""
    taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    w = jnp.exp(-0.5 * jnp.square(taps / sigma))
    return w / jnp.sum(w)


def _reflect_taps(n: int, radius: int) -> np.ndarray:
    """`(n, 2*radius+1, n)` one-hot: tap j of output voxel i reads input voxel k, with the input
    extended half-sample symmetrically ('abc|cba', scipy.ndimage mode 'reflect'; repeated
    reflection when the radius exceeds the side)."""
    padded = np.pad(np.arange(n), radius, mode="symmetric")
    source = padded[np.arange(n)[:, None] + np.arange(2 * radius + 1)[None, :]]
    return (source[..., None] == np.arange(n)).astype(np.float32)


def blur_matrix(sigma: jnp.ndarray, n: int, radius: int) -> jnp.ndarray:
    """`(n, n)` matrix of the 1-D Gaussian blur of a length-n signal with the edges reflected."""
    return jnp.einsum("j,ijk->ik", gaussian_kernel(sigma, radius), _reflect_taps(n, radius))


def blur(x: jnp.ndarray, sigma: jnp.ndarray, radius: int) -> jnp.ndarray:
    """Separable Gaussian blur of one crop over its spatial axes, 'same' size.

    Edges are half-sample symmetric (scipy.ndimage mode 'reflect'), so a constant stays constant
    and the border is not darkened. Each axis is one small matrix product (side x side, the
    boundary folded into the matrix) rather than a convolution: every crop has its own kernel
    under vmap, and XLA:CPU runs the batched products 10x faster than shift-and-add.
    """
    letters = "abcd"[: x.ndim]
    for axis in _spatial_axes(x):
        out = letters.replace(letters[axis], "z")
        # Full float32 precision: on GPUs the default could round the operands to TF32/bf16.
        x = jnp.einsum(
            f"z{letters[axis]},{letters}->{out}",
            blur_matrix(sigma, x.shape[axis], radius),
            x,
            precision=jax.lax.Precision.HIGHEST,
        )
    return x


def box_mask(spatial: tuple[int, ...], starts: jnp.ndarray, sizes: jnp.ndarray) -> jnp.ndarray:
    """Boolean `spatial` mask of the union of boxes `[starts, starts + sizes)` (`(n, ndim)` each).

    Built from per-axis coordinate comparisons, so no shape depends on the drawn sizes. The union
    is a count of covering boxes, a sum of per-axis outer products written as one einsum. Besides
    being short, a contraction is never fused into the per-voxel loop, where XLA:CPU otherwise
    recomputes the box corners from the random bits for every voxel (dropout alone: ~15x slower).
    """
    letters = "xyz"[: len(spatial)]
    along = []
    for axis, n in enumerate(spatial):
        coords = jnp.arange(n)
        lo, hi = starts[:, axis, None], (starts + sizes)[:, axis, None]
        along.append(((coords >= lo) & (coords < hi)).astype(jnp.float32))  # (boxes, n)
    operands = ",".join(f"b{c}" for c in letters)
    count = jnp.einsum(f"{operands}->{letters}", *along, precision=jax.lax.Precision.HIGHEST)
    return count > 0.5


# --------------------------------------------------------------------------------------------------
# The ops on one crop `(*spatial, C)`, given their U[0, 1) draws `u` (first: apply or not).


def flip(x: jnp.ndarray, u: jnp.ndarray, prob: float) -> jnp.ndarray:
    """Flips spatial axis i where `u[i] < prob` (`u`: one draw per spatial axis)."""
    if prob <= 0.0:
        return x
    return flip_axes(x, u < prob)


def gaussian_blur(
    x: jnp.ndarray, u: jnp.ndarray, prob: float, sigma_min: float, sigma_max: float
) -> jnp.ndarray:
    """With probability `prob`, Gaussian blur with sigma ~ U[sigma_min, sigma_max] voxels (`u[1]`);
    kernel radius ceil(3 * sigma_max)."""
    if prob <= 0.0:
        return x
    sigma = _between(u[1], sigma_min, sigma_max)
    return _apply_with_prob(u[0], prob, blur(x, sigma, math.ceil(3.0 * sigma_max)), x)


def intensity(x: jnp.ndarray, u: jnp.ndarray, prob: float, scale: float, shift: float) -> jnp.ndarray:
    """With probability `prob`, x * s + t with s ~ U[1 - scale, 1 + scale] (`u[1]`) and
    t ~ U[-shift, shift] (`u[2]`)."""
    if prob <= 0.0 or (scale == 0.0 and shift == 0.0):
        return x
    s, t = _between(u[1], 1.0 - scale, 1.0 + scale), _between(u[2], -shift, shift)
    return _apply_with_prob(u[0], prob, x * s + t, x)


def gaussian_noise(
    x: jnp.ndarray, u: jnp.ndarray, field: jnp.ndarray, prob: float, std_max: float
) -> jnp.ndarray:
    """With probability `prob`, adds `std * field` (`field` standard normal, shaped like `x`),
    std ~ U[0, std_max] (`u[1]`)."""
    if prob <= 0.0 or std_max == 0.0:
        return x
    return _apply_with_prob(u[0], prob, x + _between(u[1], 0.0, std_max) * field, x)


def _uniform_int(u: jnp.ndarray, lo: jnp.ndarray, hi: jnp.ndarray) -> jnp.ndarray:
    """Maps U[0, 1) draws to integers uniform in [lo, hi] (inclusive); the min guards against
    float rounding up to hi + 1."""
    return jnp.minimum(lo + jnp.floor(u * (hi - lo + 1)).astype(jnp.int32), hi)


def boxes_from_draws(
    u: jnp.ndarray, spatial: tuple[int, ...], max_fraction: float
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`(starts, sizes)`, each `(num_boxes, ndim)`, from draws `u` `(2, num_boxes, ndim)`: sides
    uniform in [1, max(1, floor(max_fraction * side))], starts uniform where the box fits."""
    longest = jnp.asarray([max(1, math.floor(max_fraction * n)) for n in spatial], jnp.int32)
    sizes = _uniform_int(u[0], 1, longest)
    starts = _uniform_int(u[1], 0, jnp.asarray(spatial, jnp.int32) - sizes)
    return starts, sizes


def coarse_dropout(
    x: jnp.ndarray, u: jnp.ndarray, prob: float, num_boxes: int, max_fraction: float, fill: str
) -> jnp.ndarray:
    """With probability `prob`, fills `num_boxes` random boxes (`u[1:]`, see `boxes_from_draws`)
    with 0 or the crop's per-channel minimum."""
    if prob <= 0.0 or num_boxes == 0 or max_fraction == 0.0:
        return x
    spatial = x.shape[:-1]
    corners = u[1:].reshape(2, num_boxes, len(spatial))
    mask = box_mask(spatial, *boxes_from_draws(corners, spatial, max_fraction))
    if fill == "min":
        value = jnp.min(x, axis=tuple(_spatial_axes(x)))
    elif fill == "zero":
        value = jnp.zeros((), x.dtype)
    else:
        raise ValueError(f"dropout fill must be one of {FILLS}, got {fill!r}")
    return _apply_with_prob(u[0], prob, jnp.where(mask[..., None], value, x), x)


# --------------------------------------------------------------------------------------------------
# Entry points.


def draw_slices(params: AugmentParams, ndim: int) -> dict[str, slice]:
    """Where each op's draws sit in the per-crop U[0, 1) vector (its length: the last stop).

    Every op owns its slice whether or not it is enabled, so disabling one op leaves the others'
    draws unchanged. One vector rather than one random call per draw: each threefry call is a loop
    in the XLA:CPU program, and few calls keep the compile time down.
    """
    # Dropout last: its size depends on the number of boxes, which must not move the others.
    sizes = {"flip": ndim, "blur": 2, "intensity": 3, "noise": 2}
    sizes["dropout"] = 1 + 2 * params.dropout_boxes * ndim
    slices, start = {}, 0
    for name, n in sizes.items():
        slices[name] = slice(start, start + n)
        start += n
    return slices


def augment_crop(key: jax.Array, crop: jnp.ndarray, config: Mapping[str, Any] | AugmentParams) -> jnp.ndarray:
    """One random view of one crop `(*spatial, C)`; computed in float32, returned in its dtype."""
    p = AugmentParams.from_config(config)
    x = crop.astype(jnp.float32)
    at = draw_slices(p, len(_spatial_axes(x)))
    k_draws, k_field = jax.random.split(key)
    u = jax.random.uniform(k_draws, (at["dropout"].stop,))
    x = flip(x, u[at["flip"]], p.flip_prob)
    x = gaussian_blur(x, u[at["blur"]], p.blur_prob, p.blur_sigma_min, p.blur_sigma_max)
    x = intensity(x, u[at["intensity"]], p.intensity_prob, p.intensity_scale, p.intensity_shift)
    if p.noise_prob > 0.0 and p.noise_std_max > 0.0:
        # Drawn flat and reshaped: the same distribution, but XLA:CPU takes ~10 s to compile
        # threefry for a 4-5 D shape (jax 0.10, partitionable threefry), <1 s for a flat one.
        field = jax.random.normal(k_field, (x.size,), x.dtype).reshape(x.shape)
        x = gaussian_noise(x, u[at["noise"]], field, p.noise_prob, p.noise_std_max)
    x = coarse_dropout(
        x,
        u[at["dropout"]],
        p.dropout_prob,
        p.dropout_boxes,
        p.dropout_max_fraction,
        p.dropout_fill,
    )
    if p.clip:
        x = jnp.clip(x, -1.0, 1.0)
    return x.astype(crop.dtype)


@jax.jit
def _augment_batch(key: jax.Array, crops: jnp.ndarray, params: AugmentParams) -> jnp.ndarray:
    # `params` is a leafless pytree, hence part of the jit cache key: one compile per config/shape.
    keys = jax.random.split(key, crops.shape[0])
    return jax.vmap(augment_crop, in_axes=(0, 0, None))(keys, crops, params)


def augment(key: jax.Array, crops: jnp.ndarray, config: Mapping[str, Any] | AugmentParams) -> jnp.ndarray:
    """One random view of each crop of a batch `(N, *spatial, C)`, independently per crop.

    `config` is `default_config()` (or a part of it, or `AugmentParams`); its values are static.
    The key is split once per crop, so the crops of one call, two views of a crop included, are
    augmented independently. Inside a jitted train step close over the config; `jax.jit(augment)`
    works directly with `AugmentParams`.
    """
    crops = jnp.asarray(crops)
    if crops.ndim not in (4, 5):
        raise ValueError(f"expected crops (N, *spatial, C) with 2 or 3 spatial dims, got shape {crops.shape}")
    return _augment_batch(key, crops, AugmentParams.from_config(config))

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

FILLS = ("zero", "min")

# Fixed per-op stream indices: folding these into the crop key (rather than splitting the key into
# as many parts as there are ops) keeps an op's draws unchanged when another op is added or removed.
_FLIP, _BLUR, _INTENSITY, _NOISE, _DROPOUT = range(5)


def default_config() -> ml_collections.ConfigDict:
    """The augmentation config (`AugmentConfig`): every probability and strength, intensities in
    normalised units (the window [lo, hi] spans [-1, 1], so 0.1 is 5 % of the window)."""
    c = ml_collections.ConfigDict()
    c.flip_prob = 0.5
    c.intensity_prob = 0.8
    c.intensity_scale = 0.2  # s ~ U[0.8, 1.2]
    c.intensity_shift = 0.1  # t ~ U[-0.1, 0.1]
    c.noise_prob = 0.5
    c.noise_std_max = 0.1
    c.blur_prob = 0.5
    c.blur_sigma_min = 0.5  # voxels
    c.blur_sigma_max = 1.5  # voxels; kernel radius ceil(3 * blur_sigma_max)
    c.dropout_prob = 0.5
    c.dropout_boxes = 2
    c.dropout_max_fraction = 0.5  # of each side: one box covers at most 1/8 of a 3D crop
    c.dropout_fill = "zero"  # 'zero' (mid-window grey) or 'min' (crop minimum, per channel)
    c.clip = True
    return c


AugmentConfig = default_config  # The name the design notes use for the config factory.


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """The config as plain, hashable Python values: jit specialises on it (one compile per config)
    and it is a pytree without leaves, so `jax.jit(augment)(key, crops, params)` works as is."""

    flip_prob: float = 0.5
    intensity_prob: float = 0.8
    intensity_scale: float = 0.2
    intensity_shift: float = 0.1
    noise_prob: float = 0.5
    noise_std_max: float = 0.1
    blur_prob: float = 0.5
    blur_sigma_min: float = 0.5
    blur_sigma_max: float = 1.5
    dropout_prob: float = 0.5
    dropout_boxes: int = 2
    dropout_max_fraction: float = 0.5
    dropout_fill: str = "zero"
    clip: bool = True

    def __post_init__(self):
        for name in ("flip_prob", "intensity_prob", "noise_prob", "blur_prob", "dropout_prob"):
            _check(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1]", getattr(self, name))
        # A scale range of 1 or more could flip the contrast sign.
        _check(0.0 <= self.intensity_scale < 1.0, "intensity_scale must be in [0, 1)", self.intensity_scale)
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
        _check(self.dropout_fill in FILLS, f"dropout_fill must be one of {FILLS}", self.dropout_fill)

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


def _check(ok: bool, message: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"augmentation config: {message}, got {value!r}")


def _spatial_axes(x: jnp.ndarray) -> range:
    """Spatial axes of one crop `(*spatial, C)`."""
    if x.ndim not in (3, 4):
        raise ValueError(f"expected one crop (*spatial, C) with 2 or 3 spatial dims, got {x.shape}")
    return range(x.ndim - 1)


def _apply_with_prob(key: jax.Array, prob: float, augmented: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """`augmented` with probability `prob`, else `x`. Static 0/1 skip the draw and the select."""
    if prob >= 1.0:
        return augmented
    return jnp.where(jax.random.bernoulli(key, prob), augmented, x)


# ---------------------------------------------------------------------------------------------------
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


def blur(x: jnp.ndarray, sigma: jnp.ndarray, radius: int) -> jnp.ndarray:
    """Separable Gaussian blur of one crop over its spatial axes, 'same' size.

    Edges are half-sample symmetric ('abc|cba', scipy.ndimage mode 'reflect'), so a constant stays
    constant and the border is not darkened. Shift-and-add over 2*radius+1 static slices instead of
    a convolution op: each crop has its own kernel under vmap, which XLA fuses into one loop.
    """
    kernel = gaussian_kernel(sigma, radius)
    for axis in _spatial_axes(x):
        n = x.shape[axis]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = jnp.pad(x, pad, mode="symmetric")
        x = sum(
            kernel[j] * jax.lax.slice_in_dim(padded, j, j + n, axis=axis)
            for j in range(2 * radius + 1)
        )
    return x


def box_mask(spatial: tuple[int, ...], starts: jnp.ndarray, sizes: jnp.ndarray) -> jnp.ndarray:
    """Boolean `spatial` mask of the union of boxes `[starts, starts + sizes)` (`(n, ndim)` each).

    Built from per-axis coordinate comparisons, so the shape never depends on the drawn sizes.
    """
    inside = jnp.ones((starts.shape[0],) + tuple(spatial), dtype=bool)
    for axis, n in enumerate(spatial):
        coords = jnp.arange(n)
        along = (coords >= starts[:, axis, None]) & (coords < (starts + sizes)[:, axis, None])
        shape = [starts.shape[0]] + [1] * len(spatial)
        shape[axis + 1] = n
        inside = inside & along.reshape(shape)
    return jnp.any(inside, axis=0)


# ---------------------------------------------------------------------------------------------------
# Random ops on one crop `(*spatial, C)`.


def random_flip(key: jax.Array, x: jnp.ndarray, prob: float) -> jnp.ndarray:
    """Flips each spatial axis independently with probability `prob`."""
    if prob <= 0.0:
        return x
    return flip_axes(x, jax.random.bernoulli(key, prob, (len(_spatial_axes(x)),)))


def random_intensity(
    key: jax.Array, x: jnp.ndarray, prob: float, scale: float, shift: float
) -> jnp.ndarray:
    """x * s + t with s ~ U[1 - scale, 1 + scale], t ~ U[-shift, shift], with probability `prob`."""
    if prob <= 0.0 or (scale == 0.0 and shift == 0.0):
        return x
    k_apply, k_s, k_t = jax.random.split(key, 3)
    s = jax.random.uniform(k_s, minval=1.0 - scale, maxval=1.0 + scale)
    t = jax.random.uniform(k_t, minval=-shift, maxval=shift)
    return _apply_with_prob(k_apply, prob, x * s + t, x)


def random_noise(key: jax.Array, x: jnp.ndarray, prob: float, std_max: float) -> jnp.ndarray:
    """Adds N(0, std^2) per voxel, std ~ U[0, std_max] per crop, with probability `prob`."""
    if prob <= 0.0 or std_max == 0.0:
        return x
    k_apply, k_std, k_noise = jax.random.split(key, 3)
    std = jax.random.uniform(k_std, maxval=std_max)
    # Drawn flat and reshaped: the same distribution, but XLA:CPU takes ~10 s to compile threefry
    # for a 4-5 D shape (jax 0.10, partitionable threefry) against <1 s for a flat one.
    noise = jax.random.normal(k_noise, (x.size,), x.dtype).reshape(x.shape)
    return _apply_with_prob(k_apply, prob, x + std * noise, x)


def random_blur(
    key: jax.Array, x: jnp.ndarray, prob: float, sigma_min: float, sigma_max: float
) -> jnp.ndarray:
    """Gaussian blur with sigma ~ U[sigma_min, sigma_max] voxels (kernel radius
    ceil(3 * sigma_max)), with probability `prob`."""
    if prob <= 0.0:
        return x
    k_apply, k_sigma = jax.random.split(key)
    sigma = jax.random.uniform(k_sigma, minval=sigma_min, maxval=sigma_max)
    return _apply_with_prob(k_apply, prob, blur(x, sigma, math.ceil(3.0 * sigma_max)), x)


def random_boxes(
    key: jax.Array, spatial: tuple[int, ...], num_boxes: int, max_fraction: float
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`(starts, sizes)`, each `(num_boxes, ndim)`: sides uniform in [1, max(1, floor(max_fraction
    * side))], starts uniform over the positions where the box fits."""
    k_size, k_start = jax.random.split(key)
    shape = jnp.asarray(spatial)
    longest = jnp.asarray([max(1, math.floor(max_fraction * n)) for n in spatial])
    sizes = jax.random.randint(k_size, (num_boxes, len(spatial)), 1, longest + 1)
    starts = jax.random.randint(k_start, (num_boxes, len(spatial)), 0, shape - sizes + 1)
    return starts, sizes


def random_dropout(
    key: jax.Array, x: jnp.ndarray, prob: float, num_boxes: int, max_fraction: float, fill: str
) -> jnp.ndarray:
    """Fills `num_boxes` random boxes (see `random_boxes`) with 0 or the crop's per-channel
    minimum, with probability `prob` (all boxes together)."""
    if prob <= 0.0 or num_boxes == 0 or max_fraction == 0.0:
        return x
    k_apply, k_boxes = jax.random.split(key)
    spatial = x.shape[:-1]
    mask = box_mask(spatial, *random_boxes(k_boxes, spatial, num_boxes, max_fraction))
    if fill == "min":
        value = jnp.min(x, axis=tuple(_spatial_axes(x)))
    elif fill == "zero":
        value = jnp.zeros((), x.dtype)
    else:
        raise ValueError(f"dropout fill must be one of {FILLS}, got {fill!r}")
    return _apply_with_prob(k_apply, prob, jnp.where(mask[..., None], value, x), x)


# ---------------------------------------------------------------------------------------------------
# Entry points.


def augment_crop(
    key: jax.Array, crop: jnp.ndarray, config: Mapping[str, Any] | AugmentParams
) -> jnp.ndarray:
    """One random view of one crop `(*spatial, C)`; computed in float32, returned in its dtype."""
    p = AugmentParams.from_config(config)
    x = crop.astype(jnp.float32)
    x = random_flip(jax.random.fold_in(key, _FLIP), x, p.flip_prob)
    x = random_blur(jax.random.fold_in(key, _BLUR), x, p.blur_prob, p.blur_sigma_min, p.blur_sigma_max)
    x = random_intensity(
        jax.random.fold_in(key, _INTENSITY), x, p.intensity_prob, p.intensity_scale, p.intensity_shift
    )
    x = random_noise(jax.random.fold_in(key, _NOISE), x, p.noise_prob, p.noise_std_max)
    x = random_dropout(
        jax.random.fold_in(key, _DROPOUT), x, p.dropout_prob, p.dropout_boxes,
        p.dropout_max_fraction, p.dropout_fill,
    )
    if p.clip:
        x = jnp.clip(x, -1.0, 1.0)
    return x.astype(crop.dtype)


@jax.jit
def _augment_batch(key: jax.Array, crops: jnp.ndarray, params: AugmentParams) -> jnp.ndarray:
    # `params` is a leafless pytree, hence part of the jit cache key: one compile per config/shape.
    keys = jax.random.split(key, crops.shape[0])
    return jax.vmap(augment_crop, in_axes=(0, 0, None))(keys, crops, params)


def augment(
    key: jax.Array, crops: jnp.ndarray, config: Mapping[str, Any] | AugmentParams
) -> jnp.ndarray:
    """One random view of each crop of a batch `(N, *spatial, C)`, independently per crop.

    `config` is `default_config()` (or a part of it, or `AugmentParams`); its values are static.
    For two views call twice with different keys, e.g. `jax.random.split(key)`. Inside a jitted
    train step close over the config; `jax.jit(augment)` works directly with `AugmentParams`.
    """
    crops = jnp.asarray(crops)
    if crops.ndim not in (4, 5):
        raise ValueError(
            f"expected crops (N, *spatial, C) with 2 or 3 spatial dims, got shape {crops.shape}"
        )
    return _augment_batch(key, crops, AugmentParams.from_config(config))

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from isimed import augment as aug

SHAPES = {2: (12, 10), 3: (6, 8, 7)}
N_DEFAULT = 8  # One batch size for every default-config test: one compile per shape.
PROBS = ("flip_prob", "intensity_prob", "noise_prob", "blur_prob", "dropout_prob")


def only(**overrides):
    """The default config with every op disabled except those named in `overrides`."""
    c = aug.default_config()
    for name in PROBS:
        c[name] = 0.0
    c.update(overrides)
    return c


def coded(n, spatial, channels=1):
    """Crops whose voxels are all distinct and inside [-1, 1], so any flip is visible."""
    size = n * math.prod(spatial) * channels
    return (np.arange(size, dtype=np.float32) / size * 1.8 - 0.9).reshape(n, *spatial, channels)


def run(config, crops, seed=0):
    return np.asarray(aug.augment(jax.random.key(seed), jnp.asarray(crops), config))


@pytest.mark.parametrize("ndim", [2, 3])
def test_flips_all_or_none(ndim):
    x = coded(3, SHAPES[ndim])
    spatial_axes = tuple(range(1, ndim + 1))
    np.testing.assert_array_equal(run(only(flip_prob=1.0), x), np.flip(x, axis=spatial_axes))
    np.testing.assert_array_equal(run(only(flip_prob=0.0), x), x)


def test_flips_are_independent_per_axis_and_crop():
    n, spatial = 400, SHAPES[3]
    x = coded(n, spatial)
    y = run(only(flip_prob=0.5), x)
    combos = list(itertools.product([False, True], repeat=3))
    decisions = []
    for xi, yi in zip(x, y):
        # Each output must be exactly one of the 8 axis-flip combinations (no transposes).
        found = [c for c in combos if np.array_equal(np.flip(xi, tuple(np.flatnonzero(c))), yi)]
        assert len(found) == 1
        decisions.append(found[0])
    decisions = np.asarray(decisions)
    np.testing.assert_allclose(decisions.mean(axis=0), 0.5, atol=0.1)
    assert len(set(map(tuple, decisions))) == 8


@pytest.mark.parametrize("ndim", [2, 3])
def test_intensity_shift_only_and_scale_only(ndim):
    x = coded(200, SHAPES[ndim])
    shift_only = only(intensity_prob=1.0, intensity_scale=0.0, intensity_shift=0.3, clip=False)
    shift = run(shift_only, x) - x
    # a == 0: identity scale, so the change is one constant t per crop, t ~ U[-0.3, 0.3].
    t = shift.reshape(len(x), -1)
    np.testing.assert_allclose(t, t[:, :1].repeat(t.shape[1], axis=1), atol=1e-6)
    assert np.all(np.abs(t[:, 0]) <= 0.3 + 1e-6) and t[:, 0].min() < -0.2 and t[:, 0].max() > 0.2
    assert abs(t[:, 0].mean()) < 0.05

    # b == 0: y = s * x with one s per crop, s ~ U[0.75, 1.25].
    y = run(only(intensity_prob=1.0, intensity_scale=0.25, intensity_shift=0.0, clip=False), x)
    flat_x, flat_y = x.reshape(len(x), -1), y.reshape(len(x), -1)
    s = np.sum(flat_x * flat_y, axis=1) / np.sum(flat_x * flat_x, axis=1)
    np.testing.assert_allclose(flat_y, s[:, None] * flat_x, atol=1e-6)
    assert np.all(np.abs(s - 1.0) <= 0.25 + 1e-6) and abs(s.mean() - 1.0) < 0.04
    assert s.min() < 0.8 and s.max() > 1.2


def test_ops_with_known_draws():
    x = jnp.asarray(coded(1, SHAPES[3])[0])
    # intensity: s = 0.8 + 0.4 * 0.25 = 0.9, t = -0.1 + 0.2 * 0.75 = 0.05.
    y = aug.intensity(x, jnp.asarray([0.0, 0.25, 0.75]), 1.0, 0.2, 0.1)
    np.testing.assert_allclose(y, np.asarray(x) * 0.9 + 0.05, atol=1e-6)
    assert np.array_equal(aug.intensity(x, jnp.asarray([0.6, 0.25, 0.75]), 0.5, 0.2, 0.1), x)
    # flip: axes whose draw is below the probability.
    y = aug.flip(x, jnp.asarray([0.2, 0.7, 0.4]), 0.5)
    np.testing.assert_array_equal(y, np.flip(np.asarray(x), (0, 2)))
    # dropout, one box in (6, 8, 7): sides 1 + floor(u * longest), longest (3, 4, 3) -> (2, 4, 1);
    # starts floor(u * (n - side + 1)) -> (floor(0.4 * 5), floor(0.2 * 5), floor(0.9 * 7)).
    u = jnp.asarray([0.0, 0.5, 0.99, 0.0, 0.4, 0.2, 0.9])
    y = aug.coarse_dropout(x, u, 1.0, 1, 0.5, "zero")
    ref = np.array(x)
    ref[2:4, 1:5, 6:7] = 0.0
    np.testing.assert_array_equal(y, ref)


def test_disabling_an_op_keeps_the_other_draws():
    x = coded(20, SHAPES[3])
    flips = run(only(flip_prob=0.5), x)
    both = run(only(flip_prob=0.5, dropout_prob=1.0, dropout_fill="min"), x)
    low = x.min(axis=(1, 2, 3, 4), keepdims=True)
    assert np.all((both == flips) | (both == low)) and np.mean(both == flips) > 0.5


def test_intensity_probability():
    x = coded(400, (4, 4, 4))
    y = run(only(intensity_prob=0.3, intensity_scale=0.2, intensity_shift=0.2, clip=False), x)
    changed = np.any(y != x, axis=(1, 2, 3, 4))
    assert abs(changed.mean() - 0.3) < 0.08


@pytest.mark.parametrize("prob", [1.0, 0.5])
def test_noise_statistics(prob):
    n, std_max = 256, 0.2
    x = np.zeros((n, 16, 16, 16, 1), np.float32)
    y = run(only(noise_prob=prob, noise_std_max=std_max, clip=False), x).reshape(n, -1)
    applied = np.any(y != 0, axis=1)
    assert abs(applied.mean() - prob) < 0.1
    std = y[applied].std(axis=1)
    # Per-crop std ~ U[0, std_max]: mean std_max / 2, sd std_max / sqrt(12).
    assert np.all(std <= std_max * 1.05)
    assert abs(std.mean() - std_max / 2) < 4 * std_max / math.sqrt(12 * applied.sum())
    assert np.all(np.abs(y[applied].mean(axis=1)) < 5 * std / math.sqrt(y.shape[1]) + 1e-7)


@pytest.mark.parametrize("ndim", [2, 3])
def test_blur_of_constant_is_constant(ndim):
    x = np.full((8, *SHAPES[ndim], 2), 0.37, np.float32)
    y = run(only(blur_prob=1.0, blur_sigma_min=0.3, blur_sigma_max=2.5, clip=False), x)
    np.testing.assert_allclose(y, x, atol=1e-6)


@pytest.mark.parametrize(
    # The last case has radius 5 > side 3: repeated reflection.
    "spatial,sigma",
    [((12, 10), 0.8), ((6, 8, 7), 1.2), ((3, 9, 5), 1.5)],
)
def test_blur_matches_scipy_separable_filter(spatial, sigma):
    x = np.random.default_rng(0).uniform(-1, 1, (3, *spatial, 2)).astype(np.float32)
    y = run(only(blur_prob=1.0, blur_sigma_min=sigma, blur_sigma_max=sigma, clip=False), x)
    ref = x
    for axis in range(1, len(spatial) + 1):
        ref = scipy.ndimage.gaussian_filter1d(
            ref, sigma, axis=axis, mode="reflect", radius=math.ceil(3 * sigma)
        )
    np.testing.assert_allclose(y, ref, atol=2e-6)


def test_blur_kernel_wider_than_three_sigma_truncates_at_the_static_radius():
    x = np.random.default_rng(1).uniform(-1, 1, (9, 11, 1)).astype(np.float32)
    y = np.asarray(aug.blur(jnp.asarray(x), 0.7, 4))
    ref = scipy.ndimage.gaussian_filter1d(x, 0.7, axis=0, mode="reflect", radius=4)
    ref = scipy.ndimage.gaussian_filter1d(ref, 0.7, axis=1, mode="reflect", radius=4)
    np.testing.assert_allclose(y, ref, atol=2e-6)


def expected_dropout_fraction(spatial, boxes, max_fraction, prob):
    """Exact mean covered fraction: per axis, P(voxel v inside a box side), boxes independent."""
    cover = np.ones(spatial)
    for axis, n in enumerate(spatial):
        longest = max(1, math.floor(max_fraction * n))
        p_axis = np.zeros(n)
        for size in range(1, longest + 1):
            for start in range(n - size + 1):
                p_axis[start : start + size] += 1.0 / longest / (n - size + 1)
        shape = [1] * len(spatial)
        shape[axis] = n
        cover = cover * p_axis.reshape(shape)
    return prob * np.mean(1.0 - (1.0 - cover) ** boxes)


@pytest.mark.parametrize("ndim", [2, 3])
def test_dropout_fraction_on_average(ndim):
    n, spatial = 3000, SHAPES[ndim]
    x = np.full((n, *spatial, 1), 0.5, np.float32)
    y = run(only(dropout_prob=0.7, dropout_boxes=2, dropout_max_fraction=0.5), x)
    dropped = (y == 0).reshape(n, -1).mean(axis=1)
    assert set(np.unique(y)) <= {0.0, 0.5}
    expected = expected_dropout_fraction(spatial, 2, 0.5, 0.7)
    assert abs(dropped.mean() - expected) < 4 * dropped.std() / math.sqrt(n)


@pytest.mark.parametrize("ndim", [2, 3])
def test_dropout_boxes_are_axis_aligned_and_fills(ndim):
    spatial = SHAPES[ndim]
    x = np.random.default_rng(2).uniform(0.1, 0.9, (50, *spatial, 1)).astype(np.float32)
    zero = run(only(dropout_prob=1.0, dropout_boxes=1, dropout_max_fraction=0.5), x)
    for xi, yi in zip(x, zero):
        mask = (yi == 0)[..., 0]
        idx = np.argwhere(mask)
        assert len(idx) > 0
        lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
        box = np.zeros_like(mask)
        box[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
        np.testing.assert_array_equal(mask, box)  # The filled voxels form one box.
        assert np.all(hi - lo <= np.maximum(1, np.floor(0.5 * np.asarray(spatial))))
        np.testing.assert_array_equal(yi[~mask], xi[~mask])
    # The box draws do not depend on the fill: same key, the same boxes hold the crop minimum.
    one_box = dict(dropout_prob=1.0, dropout_boxes=1, dropout_max_fraction=0.5)
    low = run(only(**one_box, dropout_fill="min"), x)
    minimum = x.min(axis=tuple(range(1, ndim + 2)), keepdims=True)
    np.testing.assert_array_equal(low, np.where(zero == 0, minimum, x))


def test_box_mask_is_union_of_boxes():
    starts = jnp.asarray([[0, 1], [3, 0]])
    sizes = jnp.asarray([[2, 2], [1, 4]])
    ref = np.zeros((5, 4), bool)
    ref[0:2, 1:3] = True
    ref[3:4, 0:4] = True
    np.testing.assert_array_equal(aug.box_mask((5, 4), starts, sizes), ref)


@pytest.mark.parametrize("ndim", [2, 3])
def test_each_view_depends_on_its_crop_and_key_only(ndim):
    # The documented draws: the key is split once per crop, and a crop's view is a function of
    # its key and itself alone, never of the rest of the batch (what lets a (seed, step) key
    # replay a step exactly, and two views in one batch be independent).
    c = aug.default_config()
    x = coded(N_DEFAULT, SHAPES[ndim])
    batch = run(c, x, seed=5)
    one_crop = jax.jit(aug.augment_crop)
    params = aug.AugmentParams.from_config(c)
    for key, crop, view in zip(jax.random.split(jax.random.key(5), N_DEFAULT), x, batch):
        np.testing.assert_allclose(one_crop(key, jnp.asarray(crop), params), view, atol=1e-6)
    # Identical crops get different views, and another key changes them.
    same = np.repeat(x[:1], N_DEFAULT, axis=0)
    a, other = run(c, same, seed=5), run(c, same, seed=6)
    assert not np.array_equal(a, other)
    assert all(not np.array_equal(a[0], a[i]) for i in range(1, N_DEFAULT))


@pytest.mark.parametrize("ndim", [2, 3])
def test_default_config_shape_dtype_and_range(ndim):
    x = np.random.default_rng(3).uniform(-1, 1, (N_DEFAULT, *SHAPES[ndim], 1)).astype(np.float32)
    y = run(aug.default_config(), x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= -1.0 and y.max() <= 1.0


def test_clip_keeps_the_window_range():
    x = np.full((N_DEFAULT, 4, 4, 4, 1), 0.9, np.float32)
    shifted = dict(intensity_prob=1.0, intensity_scale=0.0, intensity_shift=0.5)
    assert run(only(**shifted, clip=True), x).max() == 1.0
    assert run(only(**shifted, clip=False), x).max() > 1.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_all_probabilities_zero_is_identity(ndim):
    x = np.random.default_rng(4).uniform(-1, 1, (5, *SHAPES[ndim], 3)).astype(np.float32)
    np.testing.assert_array_equal(run(only(), x), x)


def test_jit_and_one_compile_per_config():
    # Under an outer jit, with `AugmentParams` as an argument or the config closed over as in the
    # train step, the config still applies: flips at probability 1 flip every spatial axis.
    x = coded(N_DEFAULT, SHAPES[3])
    flips = only(flip_prob=1.0)
    flipped = np.flip(x, axis=(1, 2, 3))
    key = jax.random.key(0)
    params = aug.AugmentParams.from_config(flips)
    np.testing.assert_array_equal(jax.jit(aug.augment)(key, jnp.asarray(x), params), flipped)
    closed = jax.jit(functools.partial(aug.augment, config=flips))
    np.testing.assert_array_equal(closed(key, jnp.asarray(x)), flipped)

    # One compile per (config, shape): new keys reuse it; another config gets its own program, not
    # the cached one.
    c = aug.default_config()
    aug.augment(key, x, c)
    before = aug._augment_batch._cache_size()
    for seed in range(3):
        aug.augment(jax.random.key(seed), x, c)
    assert aug._augment_batch._cache_size() == before
    np.testing.assert_array_equal(aug.augment(key, x, flips), flipped)


def test_bfloat16_in_bfloat16_out():
    x = jnp.asarray(coded(2, SHAPES[2]), jnp.bfloat16)
    y = aug.augment(jax.random.key(0), x, only(intensity_prob=1.0, noise_prob=1.0))
    assert y.dtype == jnp.bfloat16 and not np.array_equal(np.asarray(y), np.asarray(x))


def test_config_validation():
    with pytest.raises(ValueError, match="unknown augmentation settings"):
        aug.AugmentParams.from_config({"flip_probability": 0.5})
    with pytest.raises(ValueError, match="flip_prob"):
        aug.AugmentParams.from_config({"flip_prob": 1.5})
    with pytest.raises(ValueError, match="blur_sigma"):
        aug.AugmentParams.from_config({"blur_sigma_min": 2.0, "blur_sigma_max": 1.0})
    with pytest.raises(ValueError, match="dropout_fill"):
        aug.AugmentParams.from_config({"dropout_fill": "mean"})
    assert aug.AugmentParams.from_config({"noise_prob": 0}).noise_prob == 0.0  # Partial config.
    with pytest.raises(ValueError, match="2 or 3 spatial dims"):
        aug.augment(jax.random.key(0), jnp.zeros((2, 8, 1)), aug.default_config())

"""Tests for isimed.models.

Full-size ResNet/DenseNet models are only traced abstractly (``nnx.eval_shape``):
their parameter counts and output shapes are exact, while compiling them on a
2-core CPU would take minutes. Numerics (finiteness, BatchNorm modes, bfloat16,
gradients) run on the same classes with reduced widths/depths, which exercise
every code path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from isimed import runtime
from isimed.models import MODELS
from isimed.models import DenseNet
from isimed.models import ResNet
from isimed.models import SmallCNN
from isimed.models import count_params
from isimed.models import create_encoder
from isimed.models.layers import avg_pool
from isimed.models.layers import conv
from isimed.models.layers import max_pool


# XLA compilation dominates the run time of these tests on CPU, hence: rbg
# keys (their programs compile much faster than threefry's), NumPy inputs, and
# unoptimised compilation, which costs far less than it saves on tiny programs.
def _fast_compile_options() -> dict:
    options = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
    try:
        jax.jit(lambda: 0, compiler_options=options).lower().compile()
    except jax.errors.JaxRuntimeError:  # XLA:CPU of jax >= 0.11 no longer has the option.
        del options["xla_cpu_use_fusion_emitters"]
    return options


FAST_COMPILE = _fast_compile_options()


def rngs(seed: int = 0) -> nnx.Rngs:
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def fast_jit(fn: Callable) -> Callable:
    """Like ``nnx.jit`` for ``fn(model, *arrays)`` (state updates written back), with FAST_COMPILE."""

    @functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
    def pure(graphdef, state, *args):
        model = nnx.merge(graphdef, state)
        return fn(model, *args), nnx.state(model)

    def wrapped(model, *args):
        out, state = pure(*nnx.split(model), *args)
        nnx.update(model, state)
        return out

    return wrapped


def init(build: Callable[[], nnx.Module]) -> nnx.Module:
    """``build()``, with all parameters initialised by one compiled program."""
    graphdef, state = jax.jit(lambda: nnx.split(build()), compiler_options=FAST_COMPILE)()
    return nnx.merge(graphdef, state)


def normal(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def abstract_model_and_outputs(
    name: str, spatial: tuple[int, ...], in_channels: int, embed_dim: int, **kwargs
) -> tuple[nnx.Module, jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """Build a model and apply ``features`` and ``__call__`` without computing anything."""

    def build_and_apply():
        model = create_encoder(
            name,
            spatial_dims=len(spatial),
            embed_dim=embed_dim,
            in_channels=in_channels,
            rngs=nnx.Rngs(0),
            **kwargs,
        )
        # Eval mode avoids BatchStat writes, which make tracing deep models much slower.
        model.eval()
        x = jnp.zeros((2, *spatial, in_channels))
        return model, model.features(x), model(x)

    return nnx.eval_shape(build_and_apply)


# Reference counts are trainable parameters of the PyTorch models: MONAI 1.6
# DenseNet121(spatial_dims, in_channels=1, out_channels=1024) and torchvision
# resnet18/resnet50() (3 input channels, 1000 classes).
# Feature-map sizes are PyTorch's: floor((n + 2 * padding - kernel) / stride) + 1
# through every strided layer. The input sizes are chosen so that an off-by-one
# padding of the stem, the max-pool or the strided convs, or ceil-mode average
# pooling, changes the result along at least one axis.
@pytest.mark.parametrize(
    "name, spatial, in_channels, embed_dim, kwargs, feature_shape, expected_params",
    [
        ("densenet121", (62, 60, 36), 1, 1024, {}, (2, 1, 1, 1024), 12_292_224),
        ("densenet121", (61, 59), 1, 1024, {}, (2, 1, 1024), 7_997_184),
        ("resnet18", (34, 32), 3, 1000, {}, (2, 1, 512), 11_689_512),
        ("resnet50", (33, 32), 3, 1000, {}, (2, 1, 2048), 25_557_032),
        ("resnet18", (34, 32, 40), 1, 64, {}, (2, 1, 2, 512), None),
        ("resnet50", (16, 12, 7), 1, 64, {"small_input": True}, (2, 2, 1, 2048), None),
        ("small_cnn", (70, 33), 1, 64, {}, (5, 3, 128), None),
        ("small_cnn", (24, 16, 9), 1, 64, {}, (2, 1, 1, 128), None),
    ],
    ids=[
        "densenet121-3d",
        "densenet121-2d",
        "resnet18-2d",
        "resnet50-2d",
        "resnet18-3d",
        "resnet50-3d-small_input",
        "small_cnn-2d",
        "small_cnn-3d",
    ],
)
def test_full_models_shapes_and_param_counts(
    name, spatial, in_channels, embed_dim, kwargs, feature_shape, expected_params
):
    model, features, out = abstract_model_and_outputs(name, spatial, in_channels, embed_dim, **kwargs)
    assert features.shape == (2, *feature_shape)
    assert out.shape == (2, embed_dim)
    assert out.dtype == jnp.float32
    if expected_params is not None:
        assert count_params(model) == expected_params
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_count_params_excludes_batch_stats():
    widths = (16, 32, 64, 128)
    model = nnx.eval_shape(lambda: SmallCNN(spatial_dims=3, embed_dim=128, widths=widths, rngs=nnx.Rngs(0)))
    convs = 27 * sum(cin * cout for cin, cout in zip((1, *widths[:-1]), widths))  # bias-free before BN
    bn_affine = 2 * sum(widths)
    head = 128 * 128 + 128
    assert count_params(model) == convs + bn_affine + head
    running_stats = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    assert running_stats == 2 * sum(widths)


# Small configurations of the model classes (every block type, 2D and 3D);
# kwargs go through create_encoder.
SMALL_CONFIGS = {
    "small_cnn-3d": ("small_cnn", 3, {}, 16),
    "resnet_basic-2d": ("resnet18", 2, dict(base_width=8, stage_sizes=(1, 1)), 16),
    "resnet_bottleneck_small_input-3d": (
        "resnet50",
        3,
        dict(base_width=4, stage_sizes=(1, 1), small_input=True),
        8,
    ),
    "densenet-3d": (
        "densenet121",
        3,
        dict(init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2),
        16,
    ),
}


def build_small(key: str, dtype: str = "float32") -> tuple[nnx.Module, jax.Array, jax.Array]:
    """A small model, a batch of 4 and the same batch with its last two samples replaced."""
    name, spatial_dims, kwargs, size = SMALL_CONFIGS[key]
    model = init(
        lambda: create_encoder(
            name, spatial_dims=spatial_dims, embed_dim=8, dtype=dtype, rngs=rngs(), **kwargs
        )
    )
    x = normal((4,) + (size,) * spatial_dims + (1,))
    mixed = x.at[2:].set(normal(x[2:].shape, seed=1))
    return model, x, mixed


def batch_stats(model: nnx.Module) -> list[np.ndarray]:
    return [np.array(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


@fast_jit
def train_step(model, x, mixed):
    def loss_fn(m):
        out = m(x)
        return jnp.mean(out**2), out

    (loss, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return loss, grads, out, model(mixed)


@fast_jit
def forward(model, x, mixed):
    return model(x), model(mixed)


# Each model is compiled once per mode; the results are shared by the tests below.
@pytest.fixture(scope="module", params=list(SMALL_CONFIGS))
def runs(request) -> dict:
    model, x, mixed = build_small(request.param)
    r = {"key": request.param, "x": x, "stats_init": batch_stats(model)}
    r["loss"], r["grads"], r["train"], r["train_mixed"] = train_step(model, x, mixed)
    r["stats_train"] = batch_stats(model)
    model.eval()
    r["eval"], r["eval_mixed"] = forward(model, x, mixed)
    r["stats_eval"] = batch_stats(model)
    r["model"] = model
    return r


def test_outputs_and_gradients_are_finite(runs):
    for out in (runs["train"], runs["eval"]):
        assert out.shape == (4, 8) and out.dtype == jnp.float32
        assert np.isfinite(out).all()
    assert np.isfinite(runs["loss"])
    grads = jax.tree.leaves(runs["grads"])  # one per nnx.Param
    assert all(np.isfinite(g).all() for g in grads)
    assert all(np.abs(g).max() > 0 for g in grads)  # no parameter is cut off from the output


def test_batchnorm_train_mode_updates_stats_and_mixes_batch(runs):
    assert runs["stats_init"]
    assert all(not np.array_equal(a, b) for a, b in zip(runs["stats_init"], runs["stats_train"], strict=True))
    assert not np.allclose(runs["train"][:2], runs["train_mixed"][:2], rtol=1e-3, atol=1e-3)


def test_batchnorm_eval_mode_is_per_sample_and_frozen(runs):
    for a, b in zip(runs["stats_train"], runs["stats_eval"], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(runs["eval"][:2], runs["eval_mixed"][:2], rtol=1e-5, atol=1e-5)
    assert not np.allclose(runs["eval"][2:], runs["eval_mixed"][2:], rtol=1e-3, atol=1e-3)


@fast_jit
def pooled_forward(model, x):
    pooled, z = model(x, with_pooled=True)
    return pooled, z, model.head(pooled), model.features(x)


def test_embedding_is_the_head_of_the_pooled_backbone(runs):
    """Linear evaluation's backbone features and the embedding come from one forward pass: the
    pooled last feature map, and the final Linear of exactly that."""
    pooled, z, head_of_pooled, feature_map = pooled_forward(runs["model"], runs["x"])
    assert pooled.dtype == z.dtype == jnp.float32
    assert pooled.shape == (4, runs["model"].head.in_features)
    spatial = tuple(range(1, feature_map.ndim - 1))
    np.testing.assert_allclose(
        pooled, np.mean(np.asarray(feature_map, np.float64), axis=spatial), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(z, head_of_pooled, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(z, runs["eval"], rtol=1e-5, atol=1e-6)  # = model(x)


def test_bfloat16_compute(runs):
    name, spatial_dims, kwargs, _ = SMALL_CONFIGS[runs["key"]]
    model = nnx.eval_shape(
        lambda: create_encoder(
            name, spatial_dims=spatial_dims, embed_dim=8, dtype="bfloat16", rngs=nnx.Rngs(0), **kwargs
        )
    )
    nnx.update(model, nnx.state(runs["model"]))  # the reference's float32 params and running stats
    model.eval()

    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv | nnx.Linear | nnx.BatchNorm)]
    assert layers and all(m.dtype == jnp.bfloat16 for m in layers)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    x = runs["x"]
    first_conv = next(m for m in layers if isinstance(m, nnx.Conv) and m.in_features == x.shape[-1])
    assert jax.eval_shape(first_conv, x).dtype == jnp.bfloat16

    out, _ = forward(model, x, x)
    assert out.dtype == jnp.float32
    rel_err = np.linalg.norm(out - runs["eval"]) / np.linalg.norm(runs["eval"])
    assert 0 < rel_err < 0.05


@pytest.mark.parametrize("norm", ["group", "none"])
def test_small_cnn_norm_variants(norm):
    model = init(lambda: SmallCNN(spatial_dims=2, embed_dim=8, norm=norm, widths=(8, 16), rngs=rngs()))
    x = normal((3, 16, 16, 1))
    out, out_mixed = forward(model, x, x.at[1:].set(0.0))
    assert out.shape == (3, 8) and np.isfinite(out).all()
    # Without BatchNorm a sample's embedding is independent of the batch even in train mode.
    np.testing.assert_allclose(out[:1], out_mixed[:1], rtol=1e-5, atol=1e-5)
    assert not nnx.state(model, nnx.BatchStat)


@fast_jit
def conv_and_grads(layer, x):
    loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
    return layer(x), nnx.grad(loss, argnums=(0, 1))(layer, x)


def assert_close_to_scale(actual, desired, tol: float = 1e-5, scale: float | None = None):
    """|actual - desired| <= tol * (|desired| + scale), scale defaulting to max |desired|."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    scale = np.abs(desired).max() if scale is None else scale
    np.testing.assert_allclose(actual, desired, rtol=tol, atol=tol * scale)


# (spatial shape, kernel, stride, padding): the DenseNet's 3^3 "same" convs at 8^3 ... 1^3 (at 1^3
# only the centre tap meets data), a mixed shape, 2D, 1^d convs (plain matmuls), and the strided
# stems that fall back to im2col_conv.
MATMUL_CONV_CASES = {
    "3d-3x3-8": ((8, 8, 8), 3, 1, 1),
    "3d-3x3-2": ((2, 2, 2), 3, 1, 1),
    "3d-3x3-1": ((1, 1, 1), 3, 1, 1),
    "3d-3x3-mixed": ((5, 2, 1), 3, 1, 1),
    "2d-3x3": ((7, 6), 3, 1, 1),
    "2d-5x5-2": ((2, 3), 5, 1, 2),
    "3d-1x1": ((4, 3, 5), 1, 1, 0),
    "2d-1x1": ((6, 5), 1, 1, 0),
    "3d-3x3-stride2": ((9, 9, 9), 3, 2, 1),
    "2d-7x7-stride2": ((9, 9), 7, 2, 3),
    "3d-7x7-stride2-stem": ((16, 16, 16), 7, 2, 3),
}


@pytest.mark.parametrize("case", list(MATMUL_CONV_CASES))
def test_matmul_conv_matches_lax(case):
    spatial, kernel, stride, padding = MATMUL_CONV_CASES[case]
    kw = dict(stride=stride, padding=padding, spatial_dims=len(spatial), dtype=jnp.float32, use_bias=True)
    ref = init(lambda: conv(6, 5, kernel, rngs=rngs(), **kw))
    fast = nnx.eval_shape(lambda: conv(6, 5, kernel, rngs=nnx.Rngs(0), im2col=True, **kw))
    nnx.update(fast, nnx.state(ref))
    x = normal((2, *spatial, 6))
    (y_ref, g_ref), (y_fast, g_fast) = conv_and_grads(ref, x), conv_and_grads(fast, x)
    assert y_ref.shape == y_fast.shape
    assert_close_to_scale(y_fast, y_ref)
    # Gradients of the kernel, the bias and the input.
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref), strict=True):
        assert a.shape == b.shape
        assert_close_to_scale(a, b)


@functools.partial(jax.jit, static_argnums=(0,), compiler_options=FAST_COMPILE)
def pool_and_grad(pool, x, g):
    y, vjp = jax.vjp(pool, x)
    return y, vjp(g)[0]


@pytest.mark.parametrize("shape", [(2, 8, 6, 4, 3), (3, 6, 2, 5), (1, 2, 2, 2, 1)])
def test_reshape_max_pool_matches_reduce_window(shape):
    reference = functools.partial(max_pool, window=3, stride=2, padding=1)
    fast = functools.partial(max_pool, window=3, stride=2, padding=1, reshape=True)
    g = normal((shape[0], *((n + 1) // 2 for n in shape[1:-1]), shape[-1]), seed=1)
    x = normal(shape)
    # Small integers: many windows hold their maximum twice or more; the gradient must go to
    # each window's first maximum, as reduce_window's (and PyTorch's) does.
    ties = jnp.asarray(np.random.default_rng(2).integers(0, 3, shape), jnp.float32)
    for inputs in (x, ties, jnp.maximum(x, 0.0)):
        (y_ref, dx_ref), (y, dx) = pool_and_grad(reference, inputs, g), pool_and_grad(fast, inputs, g)
        np.testing.assert_array_equal(y, y_ref)
        assert_close_to_scale(dx, dx_ref, tol=1e-6)


def test_reshape_max_pool_falls_back_for_odd_sizes():
    x = normal((2, 7, 6, 3))
    np.testing.assert_array_equal(max_pool(x, 3, 2, 1, reshape=True), max_pool(x, 3, 2, 1))


@pytest.mark.parametrize("shape", [(2, 8, 6, 4, 3), (2, 7, 5, 3, 2), (3, 5, 4, 2)])
def test_reshape_avg_pool_matches_reduce_window(shape):
    reference = functools.partial(avg_pool, window=2, stride=2)
    fast = functools.partial(avg_pool, window=2, stride=2, reshape=True)
    x = normal(shape)
    g = normal((shape[0], *(n // 2 for n in shape[1:-1]), shape[-1]), seed=1)
    (y_ref, dx_ref), (y, dx) = pool_and_grad(reference, x, g), pool_and_grad(fast, x, g)
    assert_close_to_scale(y, y_ref, tol=1e-6)
    assert_close_to_scale(dx, dx_ref, tol=1e-6)


# A DenseNet with every kind of layer: 32^3 input, 8^3 after the stem and pool, then dense blocks at
# 8^3, 4^3, 2^3 and 1^3 (where a 3^3 conv sees its centre tap only).
SMALL_DENSENET = dict(init_features=8, growth_rate=4, block_config=(2, 2, 1, 2), bn_size=2)


@fast_jit
def densenet_step(model, x, g):
    def loss_fn(m):
        out = m(x)
        return jnp.vdot(out, g), out

    (_, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return out, grads


# Flax writes the float64 batch statistics into its float32 BatchStat variables (both paths).
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-6), ("float32", 1e-3)])
def test_densenet_matmul_path_matches_lax_path(dtype, tol):
    """The CPU path (matmul convolutions, reshape pools, transitions pooling before their 1^3
    conv) is the same network: same parameter tree, outputs, gradients and BatchNorm statistics.

    In float64 compute both paths agree to the float32 rounding of the parameters and of the final
    pool (tol 1e-6 of the largest value). In float32, train-mode BatchNorms after the stem amplify
    rounding in the stem's kernel gradient (the largest; for the full DenseNet-121 it differs from
    the float64 one by ~5e-3 of its size on either path, here by ~2e-4), hence 1e-3.
    """
    with jax.enable_x64(dtype == "float64"):
        build = lambda im2col: DenseNet(
            spatial_dims=3, embed_dim=8, dtype=dtype, im2col=im2col, rngs=rngs(), **SMALL_DENSENET
        )
        ref = init(lambda: build(False))
        fast = init(lambda: build(True))
        assert not ref.im2col and fast.im2col
        ref_state, fast_state = nnx.state(ref), nnx.state(fast)
        assert jax.tree.structure(ref_state) == jax.tree.structure(fast_state)
        assert [x.shape for x in jax.tree.leaves(ref_state)] == [x.shape for x in jax.tree.leaves(fast_state)]
        assert count_params(fast) == count_params(ref)
        nnx.update(fast, ref_state)

        x, g = normal((4, 32, 32, 32, 1)), normal((4, 8), seed=1)
        (out_ref, grads_ref), (out, grads) = densenet_step(ref, x, g), densenet_step(fast, x, g)
        assert_close_to_scale(out, out_ref, tol)
        # Relative to the largest gradient: some leaves (the stem's BatchNorm, whose output the
        # next train-mode BatchNorms largely normalise away) are ~1e-5 of the others and made of
        # cancelling terms.
        scale = max(np.abs(leaf).max() for leaf in jax.tree.leaves(grads_ref))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
            assert a.shape == b.shape
            assert_close_to_scale(a, b, tol, scale=scale)
        stats, stats_ref = nnx.state(fast, nnx.BatchStat), nnx.state(ref, nnx.BatchStat)
        for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref), strict=True):
            assert_close_to_scale(a, b, tol)
        ref.eval()
        fast.eval()
        (out_ref, _), (out, _) = densenet_step(ref, x, g), densenet_step(fast, x, g)
        assert_close_to_scale(out, out_ref, tol)


def test_densenet_uses_matmul_path_on_cpu_only():
    model = nnx.eval_shape(lambda: DenseNet(spatial_dims=3, embed_dim=8, rngs=nnx.Rngs(0), **SMALL_DENSENET))
    assert model.im2col == (jax.default_backend() == "cpu")


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        create_encoder("vit", spatial_dims=3, embed_dim=8, rngs=nnx.Rngs(0))
    assert all(name in str(err.value) for name in MODELS)


@pytest.mark.parametrize("cls", [SmallCNN, ResNet, DenseNet])
@pytest.mark.parametrize("spatial_dims", [1, 4])
def test_invalid_spatial_dims(cls, spatial_dims):
    with pytest.raises(ValueError, match="spatial_dims"):
        cls(spatial_dims=spatial_dims, embed_dim=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="spatial_dims"):
        create_encoder("small_cnn", spatial_dims=spatial_dims, embed_dim=8, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "platforms, expected", [("cpu", True), ("cpu,cuda", True), ("cuda,cpu", False), ("tpu", False)]
)
def test_tune_malloc_only_where_jax_computes_on_the_cpu(platforms, expected):
    """Training tunes glibc malloc for XLA:CPU only when JAX's first platform is the CPU (read from
    the config before any backend starts); on accelerator hosts it leaves malloc alone."""
    previous = jax.config.jax_platforms
    jax.config.update("jax_platforms", platforms)  # Read at backend start-up only: started already.
    try:
        assert runtime.cpu_only() is expected
        if not expected:
            assert runtime.tune_malloc_for_cpu() is False
    finally:
        jax.config.update("jax_platforms", previous)

"""Everything one training step needs: the mesh, the networks, the optimizer, the state, the loss
and the step. `create_train_step(config, mesh)` is the one way every caller (the loop, benchmarks,
tests) builds them; it resolves the method (`isimed.methods`) once and hands it to the parts.

The train state is a plain pytree `{"step", "params", "batch_stats", "opt_state"}` (plus
`"loss_ref"` for methods that keep loss references, e.g. the normalised hybrid) built from an NNX
encoder with `nnx.split`, so it can be donated, sharded and checkpointed as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from isimed import augment
from isimed import losses
from isimed import methods
from isimed import models
from isimed.models.heads import MLPHead

State = dict[str, Any]
Batch = dict[str, jnp.ndarray]


class Networks:
    """The encoder split into its static graphs (train and eval mode) and its initial variables,
    plus the method's MLP head (pretraining only; parameters alone, no batch statistics)."""

    def __init__(self, config: ml_collections.ConfigDict):
        rngs = nnx.Rngs(config.seed)
        encoder = models.create_encoder(
            config.model.name,
            spatial_dims=len(config.data.crop_size),
            embed_dim=config.model.embed_dim,
            dtype=config.model.dtype,
            rngs=rngs,
        )
        encoder.train()
        # Pure dicts of arrays: plain pytrees for jit donation, sharding and orbax.
        self.train_graph, params, batch_stats = nnx.split(encoder, nnx.Param, ...)
        self.params, self.batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
        encoder.eval()
        self.eval_graph = nnx.split(encoder, nnx.Param, ...)[0]
        self.head_graph, self.head_params = None, None
        if methods.uses_head(config):
            head = MLPHead(config.model.embed_dim, tuple(config.model.head_dims), rngs=rngs)
            self.head_graph, head_params = nnx.split(head, nnx.Param)
            self.head_params = nnx.to_pure_dict(head_params)

    def apply(self, params, batch_stats, x: jnp.ndarray, *, train: bool, with_pooled: bool = False):
        """Embeds `x` (N, *spatial, C); returns (N, D) float32 and the updated batch statistics.
        With `with_pooled`, the first is `(pooled, embeddings)`: the pooled backbone features
        (N, channels) float32 too (see `isimed.models.encoder`)."""
        encoder = nnx.merge(self.train_graph if train else self.eval_graph, params, batch_stats)
        out = encoder(x, with_pooled=with_pooled)
        return out, nnx.to_pure_dict(nnx.split(encoder, nnx.Param, ...)[2])

    def apply_head(self, head_params, z: jnp.ndarray) -> jnp.ndarray:
        return nnx.merge(self.head_graph, head_params)(z)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
    """AdamW with linear warmup then cosine (or exponential) decay, after global-norm clipping."""
    if optim.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, optim.learning_rate, optim.warmup_steps, max(total_steps, optim.warmup_steps + 1)
        )
    elif optim.schedule == "exponential":
        schedule = optax.join_schedules(
            [
                optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps),
                optax.exponential_decay(optim.learning_rate, optim.decay_steps, optim.decay_rate),
            ],
            [optim.warmup_steps],
        )
    else:
        raise ValueError(f"optim.schedule must be 'cosine' or 'exponential', got {optim.schedule!r}")
    tx = optax.chain(
        optax.clip_by_global_norm(optim.grad_clip),
        optax.adamw(schedule, weight_decay=optim.weight_decay),
    )
    return tx, schedule


def init_state(config: ml_collections.ConfigDict, method: methods.Method, networks: Networks, tx) -> State:
    params = {"encoder": networks.params}
    if networks.head_params is not None:
        params["head"] = networks.head_params
    params.update(method.init_params(config.loss))
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": networks.batch_stats,
        "opt_state": tx.init(params),
    }
    loss_ref = method.init_loss_ref(config.loss)
    if loss_ref:  # Only then: states (and checkpoints) of other methods keep their structure.
        state["loss_ref"] = loss_ref
    return state


def make_loss_fn(config: ml_collections.ConfigDict, method: methods.Method, networks: Networks):
    """`loss_fn(params, batch_stats, batch, key, loss_ref) -> (loss, (aux, new_batch_stats, z))`,
    `loss_ref` the state's `"loss_ref"` ({} for methods without).

    All crops of the step (B*K, times two for two-view methods) go through the encoder in one pass
    (train mode, so batch-norm statistics cover both views), then the head and the method's loss.
    Two-view methods augment both views on device with `key`; a one-view method (ISImed) its crops
    when the config has an `augment` section (the folder `demo` preset: intensity and noise).
    """
    head = methods.uses_head(config)
    window = config.data.get("window")
    loss_config = methods.loss_config(config)

    def loss_fn(params, batch_stats, batch, key, loss_ref):
        crops = unit_crops(batch["crops"], window)
        b, k = crops.shape[:2]
        spatial = crops.shape[2:]
        if method.views == 2:
            # Stacked after the image axis, so the batch stays sharded by image.
            views = unit_crops(batch["views"], window)
            x = jnp.stack([crops, views], axis=2).reshape(b * k * 2, *spatial)
            x = augment.augment(key, x, config.augment)
        else:
            x = crops.reshape(b * k, *spatial)
            if "augment" in config:  # A one-view method augments only when its config asks.
                x = augment.augment(key, x, config.augment)
        z, batch_stats = networks.apply(params["encoder"], batch_stats, x, train=True)
        z = z.reshape(b, k, method.views, -1)
        outputs = {"z": z[:, :, 0]}
        if head:
            p = networks.apply_head(params["head"], z.reshape(b * k * method.views, -1))
            p = p.reshape(b * k, method.views, -1)
            outputs["p1"] = p[:, 0]
            if method.views == 2:
                outputs["p2"] = p[:, 1]
        outputs.update({name: params[name] for name in method.init_params(loss_config)})
        if loss_ref:
            outputs["loss_ref"] = loss_ref
        loss, aux = method.loss(outputs, batch, loss_config)
        return loss, (aux, batch_stats, outputs["z"])

    return loss_fn


def metrics_class(method: methods.Method) -> type[clu_metrics.Collection]:
    """Per-step training metrics: the method's loss terms plus what every method logs."""
    averaged = ("loss", *method.terms, "grad_norm", "nonfinite")
    last = ("learning_rate", *method.last_terms)
    return clu_metrics.Collection.create(
        **{name: clu_metrics.Average.from_output(name) for name in averaged},
        **{name: clu_metrics.LastValue.from_output(name) for name in last},
    )


def make_train_step(
    config: ml_collections.ConfigDict, method: methods.Method, networks: Networks, tx, schedule
):
    """The pure step `(state, batch) -> (state, metrics)`; `create_train_step` jits it."""
    loss_fn = make_loss_fn(config, method, networks)
    metrics = metrics_class(method)

    def train_step(state: State, batch: Batch):
        # Augmentation randomness is a function of (seed, step): resuming replays it exactly.
        key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
        (loss, (aux, batch_stats, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], batch, key, state.get("loss_ref", {})
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        grad_norm = optax.tree.norm(grads)
        candidate = {
            "params": optax.apply_updates(state["params"], updates),
            "batch_stats": batch_stats,
            "opt_state": opt_state,
        }
        if "loss_ref" in state:  # The method's loss references, updated by every step.
            candidate["loss_ref"] = aux["loss_ref"]
        new_state, finite = keep_if_finite(candidate, state, loss, grad_norm)
        step_metrics = metrics.single_from_model_output(
            loss=loss,
            **{name: aux[name] for name in (*method.terms, *method.last_terms)},
            grad_norm=grad_norm,
            nonfinite=1.0 - finite.astype(jnp.float32),
            learning_rate=schedule(state["step"]),
        )
        return new_state, step_metrics

    return train_step


def keep_if_finite(candidate: State, state: State, loss: jax.Array, grad_norm: jax.Array):
    """The NaN guard of every training step: `(new_state, finite)`, the entries of `candidate`
    where the loss and the gradient norm are finite, else those of `state` untouched (the host then
    stops the run, so no later checkpoint can hold NaNs); the step counter advances either way."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    kept = {key: state[key] for key in candidate}
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), candidate, kept)
    new_state["step"] = state["step"] + 1
    return new_state, finite


def unit_crops(crops: jax.Array, window: tuple[float, float] | None) -> jax.Array:
    """Training crops as the encoder takes them (float32), finished on the device: the host sends
    float16 crops of prepared data as float16, and crops of integer images (CT in HU) as raw
    integers, which are windowed here exactly as `isimed.data.pipeline.normalise_window` does on the
    host. Float crops are already normalised: only widened."""
    crops = jnp.asarray(crops)
    if not jnp.issubdtype(crops.dtype, jnp.integer) or window is None:
        return crops.astype(jnp.float32)
    lo, hi = float(window[0]), float(window[1])
    # Clipping to [0, 2] before subtracting 1 is the host's clip to [-1, 1] after it, value for
    # value, and keeps XLA from fusing the multiply and the subtraction into one FMA (whose single
    # rounding differs from numpy's two in the last bit).
    return jnp.clip((crops.astype(jnp.float32) - lo) * (2.0 / (hi - lo)), 0.0, 2.0) - 1.0


def make_monitor_fn(networks: Networks, window: tuple[float, float] | None):
    """Collapse monitors `(state, batch) -> {"embedding_std", "rankme"}` on the encoder embeddings
    of the batch's first view, as the step sees them (train-mode BatchNorm; the statistics are not
    kept). Run on logging steps only: RankMe's SVD of the (N, D) embeddings is far too costly for
    every step (a 1024 x 1024 SVD per step at paper scale)."""

    def monitors(state: State, batch: Batch) -> dict[str, jnp.ndarray]:
        crops = unit_crops(batch["crops"], window)
        x = crops.reshape(crops.shape[0] * crops.shape[1], *crops.shape[2:])
        z, _ = networks.apply(state["params"]["encoder"], state["batch_stats"], x, train=True)
        return {"embedding_std": losses.embedding_std(z), "rankme": losses.rankme(z)}

    return monitors


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What `create_train_step` builds. `method` is the config's method (`isimed.methods`), resolved
    once; `state` is the initial state, replicated on the mesh;
    `step` is jitted with the state donated and the batch sharded by image over `data`;
    `grad_fn(params, batch_stats, batch, key, loss_ref) -> ((loss, aux), grads)` is the same loss, jitted
    with the same shardings (for tests that compare gradients across device counts);
    `monitors(state, batch)` the collapse monitors, for logging steps."""

    method: methods.Method
    networks: Networks
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state: State
    step: Callable[[State, Batch], tuple[State, clu_metrics.Collection]]
    grad_fn: Callable
    monitors: Callable[[State, Batch], dict[str, jnp.ndarray]]
    replicated: NamedSharding
    data_sharding: NamedSharding


def create_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> TrainSetup:
    """Networks -> optimizer -> initial state -> jitted step, on `mesh`."""
    if config.data.images_per_batch % mesh.devices.size:
        raise ValueError(
            f"data.images_per_batch={config.data.images_per_batch} must be divisible by the "
            f"{mesh.devices.size} devices (the batch is sharded by image)"
        )
    method = methods.get(config.method)
    networks = Networks(config)
    tx, schedule = make_optimizer(config.optim, config.total_steps)
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))
    state = jax.device_put(init_state(config, method, networks, tx), replicated)
    step = jax.jit(
        make_train_step(config, method, networks, tx, schedule),
        in_shardings=(replicated, data_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    grad_fn = jax.jit(
        jax.value_and_grad(make_loss_fn(config, method, networks), has_aux=True),
        in_shardings=(replicated, replicated, data_sharding, replicated, replicated),
        out_shardings=replicated,
    )
    monitors = jax.jit(
        make_monitor_fn(networks, config.data.get("window")),
        in_shardings=(replicated, data_sharding),
        out_shardings=replicated,
    )
    return TrainSetup(
        method, networks, tx, schedule, state, step, grad_fn, monitors, replicated, data_sharding
    )

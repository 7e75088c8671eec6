"""The one pretraining loop: mesh + sharded batch, jitted step with donated state, orbax checkpoints.

The train state is a plain pytree `{"step", "params", "batch_stats", "opt_state"}` built from an
NNX encoder with `nnx.split`, so it can be donated, sharded and checkpointed as it is. Every method
plugs in through `isimed.methods` (what the pipeline samples and the loss on embeddings).
"""

import json
import os
import signal
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from isimed import augment
from isimed import losses
from isimed import methods
from isimed import models
from isimed import plots
from isimed.data import pipeline
from isimed.evaluation import features as features_lib
from isimed.evaluation import metrics as metrics_lib
from isimed.models.heads import MLPHead
from isimed.writers import MetricWriter

State = dict[str, Any]


def metrics_class(method: methods.Method, with_scale: bool) -> type[clu_metrics.Collection]:
    """Per-step training metrics: the method's loss terms plus what every method logs. The
    collapse indicators (std of the normalised embeddings, RankMe) are on encoder embeddings."""
    averaged = ("loss", *method.terms, "grad_norm", "nonfinite", "embedding_std", "rankme")
    last = ("learning_rate", "target_scale") if with_scale else ("learning_rate",)
    return clu_metrics.Collection.create(
        **{name: clu_metrics.Average.from_output(name) for name in averaged},
        **{name: clu_metrics.LastValue.from_output(name) for name in last},
    )


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device. Auto axes: XLA propagates shardings (the batch is split on
    `data`, parameters are replicated, pairwise-distance matrices are gathered as needed)."""
    return jax.make_mesh(
        (jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
    )


class Model:
    """An encoder split into its static graph (train and eval mode) and its initial variables,
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
        self.params, self.batch_stats = params.to_pure_dict(), batch_stats.to_pure_dict()
        encoder.eval()
        self.eval_graph = nnx.split(encoder, nnx.Param, ...)[0]
        self.head_graph, self.head_params = None, None
        if methods.get(config.method).head:
            head = MLPHead(config.model.embed_dim, tuple(config.model.head_dims), rngs=rngs)
            self.head_graph, head_params = nnx.split(head, nnx.Param)
            self.head_params = head_params.to_pure_dict()

    def apply(self, params, batch_stats, x: jnp.ndarray, *, train: bool):
        """Embeds `x` (N, *spatial, C); returns (N, D) float32 and the updated batch statistics."""
        encoder = nnx.merge(self.train_graph if train else self.eval_graph, params, batch_stats)
        z = encoder(x)
        return z.astype(jnp.float32), nnx.split(encoder, nnx.Param, ...)[2].to_pure_dict()

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


def init_state(config: ml_collections.ConfigDict, model: Model, tx) -> State:
    params = {"encoder": model.params}
    if model.head_params is not None:
        params["head"] = model.head_params
    if config.loss.get("learnable_scale", False):
        params["log_scale"] = jnp.log(jnp.float32(config.loss.scale))
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": model.batch_stats,
        "opt_state": tx.init(params),
    }


def make_loss_fn(config: ml_collections.ConfigDict, model: Model):
    """`loss_fn(params, batch_stats, batch, key) -> (loss, (aux, new_batch_stats, scale, z))`.

    All crops of the step (B*K, times two for two-view methods) go through the encoder in one pass
    (train mode, so batch-norm statistics cover both views), then the head and the method's loss.
    Two-view methods augment both views on device with `key`.
    """
    method = methods.get(config.method)

    def loss_fn(params, batch_stats, batch, key):
        crops = batch["crops"]
        b, k = crops.shape[:2]
        spatial = crops.shape[2:]
        if method.views == 2:
            # Stacked after the image axis, so the batch stays sharded by image.
            x = jnp.stack([crops, batch["views"]], axis=2).reshape(b * k * 2, *spatial)
            x = augment.augment(key, x, config.augment)
        else:
            x = crops.reshape(b * k, *spatial)
        z, batch_stats = model.apply(params["encoder"], batch_stats, x, train=True)
        z = z.reshape(b, k, method.views, -1)
        outputs = {"z": z[:, :, 0]}
        if method.head:
            p = model.apply_head(params["head"], z.reshape(b * k * method.views, -1))
            p = p.reshape(b * k, method.views, -1)
            outputs["p1"], outputs["p2"] = p[:, 0], p[:, 1]
        scale = jnp.exp(params["log_scale"]) if "log_scale" in params else config.loss.get("scale")
        loss, aux = method.loss(outputs, batch, config.loss, scale)
        return loss, (aux, batch_stats, scale, outputs["z"])

    return loss_fn


def make_train_step(config: ml_collections.ConfigDict, model: Model, tx, schedule):
    method = methods.get(config.method)
    loss_fn = make_loss_fn(config, model)
    with_scale = "scale" in config.loss
    metrics = metrics_class(method, with_scale)

    def train_step(state: State, batch: dict[str, jnp.ndarray]):
        # Augmentation randomness is a function of (seed, step): resuming replays it exactly.
        key = jax.random.fold_in(jax.random.key(config.seed), state["step"])
        (loss, (aux, batch_stats, scale, z)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], batch, key
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        grad_norm = optax.tree.norm(grads)
        candidate = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "batch_stats": batch_stats,
            "opt_state": opt_state,
        }
        # NaN guard: a non-finite step leaves the state untouched (the host stops the run), so a
        # later checkpoint can never contain NaNs.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), candidate, state)
        new_state["step"] = state["step"] + 1
        z = jax.lax.stop_gradient(z.reshape(-1, z.shape[-1]))
        step_metrics = metrics.single_from_model_output(
            loss=loss,
            **{name: aux[name] for name in method.terms},
            embedding_std=losses.embedding_std(z),
            rankme=losses.rankme(z),
            grad_norm=grad_norm,
            nonfinite=1.0 - finite.astype(jnp.float32),
            learning_rate=schedule(state["step"]),
            **({"target_scale": jnp.asarray(scale, jnp.float32)} if with_scale else {}),
        )
        return new_state, step_metrics

    return train_step


def _checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True),
    )


def _save(mngr, step: int, state: State, data_iter, config) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config.to_dict()),
        ),
        force=True,
    )


def held_out_summary(
    config: ml_collections.ConfigDict, embed, split: str, *, with_probe: bool, held=None
) -> dict[str, Any]:
    """Spearman(latent, physical) on fixed crops of held-out subjects, and the ridge position probe.

    The probe is trained on crops of training-split images and tested on `split`; the same probe on
    raw crop intensities is the reference row. `held`: those crops, already collected (with crops).
    """
    if held is None:
        held = features_lib.collect(
            config, split, {"model": embed}, max_images=config.eval.max_images, with_crops=with_probe
        )
    z = held["embeddings"]["model"]
    out: dict[str, Any] = {
        f"spearman_{pairs}": metrics_lib.distance_spearman(z, held["centres"], pairs)
        for pairs in ("within", "all")
    }
    if with_probe:
        train = features_lib.collect(
            config, "train", {"model": embed}, max_images=config.eval.probe_train_images,
            with_crops=True,
        )
        flat = features_lib.flatten
        out["position_probe"] = metrics_lib.position_probe(
            flat(train["embeddings"]["model"]), flat(train["centres"]),
            flat(z), flat(held["centres"]),
        )
        n_train, n_held = len(flat(train["centres"])), len(flat(held["centres"]))
        out["position_probe_raw_intensity"] = metrics_lib.position_probe(
            flat(train["crops"]).reshape(n_train, -1), flat(train["centres"]),
            flat(held["crops"]).reshape(n_held, -1), flat(held["centres"]),
        )
    return out


class _Preemption:
    """Turns SIGTERM into a flag the loop checks, so the run saves and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not the main thread (e.g. a notebook worker): no handler.
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and exiting.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Pretrains (resuming from `workdir` if it holds a checkpoint) and returns the summary."""
    if config.distributed:
        jax.distributed.initialize()
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = ml_collections.ConfigDict(config)
    config.data.data_dir = os.path.expanduser(config.data.data_dir)
    writer = MetricWriter(workdir)

    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))
    if config.data.images_per_batch % jax.device_count():
        raise ValueError(
            f"data.images_per_batch={config.data.images_per_batch} must be divisible by the "
            f"{jax.device_count()} devices (the batch is sharded by image)"
        )

    method = methods.get(config.method)
    model = Model(config)
    logging.info("Encoder parameters:\n%s", parameter_overview.get_parameter_overview(model.params))
    tx, schedule = make_optimizer(config.optim, config.total_steps)
    state = jax.device_put(init_state(config, model, tx), replicated)
    train_step = jax.jit(
        make_train_step(config, model, tx, schedule),
        in_shardings=(replicated, data_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    embed = features_lib.make_embed_fn(model, mesh)

    train_ds = pipeline.make_dataset(
        config.data, "train", seed=config.seed, train=True, views=method.views,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    data_iter = iter(train_ds)
    mngr = _checkpoint_manager(workdir, config)
    summary: dict[str, Any] = {}
    start_step = 0
    if mngr.latest_step() is not None:
        start_step = mngr.latest_step()
        restored = mngr.restore(
            start_step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(state),
                data=grain.checkpoint.CheckpointRestore(data_iter),
            ),
        )
        state = restored.state
        logging.info("Resumed from step %d in %s", start_step, mngr.directory)
    else:
        enc = embed(state["params"]["encoder"], state["batch_stats"])
        summary["initial"] = held_out_summary(config, enc, "validation", with_probe=False)
        writer.write_scalars(0, summary["initial"], prefix="validation/")

    step_keys = ("crops", "centres", "views") if method.views == 2 else ("crops", "centres")
    accumulated = None
    t_log, step_log = time.time(), start_step
    with _Preemption() as preemption:
        for step in range(start_step + 1, config.total_steps + 1):
            batch = next(data_iter)
            batch = {
                k: jax.make_array_from_process_local_data(data_sharding, np.asarray(batch[k]))
                for k in step_keys
            }
            state, step_metrics = train_step(state, batch)
            accumulated = step_metrics if accumulated is None else accumulated.merge(step_metrics)

            is_last = step == config.total_steps
            # Read the flag once per step: a SIGTERM arriving later in this step must not skip
            # the save yet still end the run.
            stop = preemption.requested
            will_save = step % config.checkpoint_every == 0 or is_last or stop
            # The NaN guard is checked before every save as well as at every log step.
            if step % config.log_every == 0 or will_save:
                scalars = accumulated.compute()
                accumulated = None
                if scalars["nonfinite"] > 0:
                    raise FloatingPointError(
                        f"non-finite loss or gradient before step {step}; those updates were "
                        f"skipped and nothing was saved. Last good checkpoint: step "
                        f"{mngr.latest_step()} in {mngr.directory}"
                    )
                elapsed = time.time() - t_log
                crops_per_step = (
                    config.data.images_per_batch * config.data.crops_per_image * method.views
                )
                scalars["crops_per_s"] = (step - step_log) * crops_per_step / max(elapsed, 1e-9)
                eta = (config.total_steps - step) * elapsed / max(step - step_log, 1)
                writer.write_scalars(step, scalars, prefix="train/")
                writer.log(
                    f"step {step}/{config.total_steps}, "
                    f"{scalars['crops_per_s']:.0f} crops/s, ETA {eta:.0f} s"
                )
                t_log, step_log = time.time(), step
            if step % config.eval_every == 0 or is_last:
                enc = embed(state["params"]["encoder"], state["batch_stats"])
                summary["validation"] = held_out_summary(config, enc, "validation", with_probe=False)
                writer.write_scalars(step, summary["validation"], prefix="validation/")
            if will_save:
                _save(mngr, step, state, data_iter, config)
            if stop:
                mngr.wait_until_finished()
                writer.close()
                return {"preempted_at_step": step}
    mngr.wait_until_finished()

    enc = embed(state["params"]["encoder"], state["batch_stats"])
    held = features_lib.collect(
        config, "test", {"model": enc}, max_images=config.eval.max_images, with_crops=True
    )
    summary["final"] = held_out_summary(config, enc, "test", with_probe=True, held=held)
    summary["step"] = int(state["step"])
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    writer.close()  # Flushes metrics.jsonl before it is plotted.
    if jax.process_index() == 0:
        learned = state["params"].get("log_scale")
        plots.write_training_plots(
            workdir, config, held["embeddings"]["model"], held["centres"],
            lesion=held["has_lesion"],
            scale_mm=None if learned is None else float(jnp.exp(learned)),
        )
    return summary



def load_checkpoint(workdir: str, step: int | None = None):
    """Restores `(config, model, state)` from a pretraining workdir (latest step by default).

    The model is rebuilt from the config stored in the checkpoint, so the caller needs nothing but
    the directory.
    """
    directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {directory} (expected a pretraining --workdir)")
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
        raise FileNotFoundError(
            f"checkpoint step {step} not found in {directory}; available: {list(mngr.all_steps())}"
        )
    stored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    config = ml_collections.ConfigDict(stored.config)
    model = Model(config)
    tx, _ = make_optimizer(config.optim, config.total_steps)
    abstract = jax.eval_shape(lambda: init_state(config, model, tx))
    _check_shapes(os.path.join(directory, str(step), "state"), abstract, config)
    state = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    ).state
    return config, model, state


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """Leaf shapes keyed by path; keys normalised to strings as orbax stores them."""
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path):
        tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _check_shapes(state_dir: str, abstract: State, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming what was expected and found if a checkpoint does not fit the
    encoder its stored config describes (e.g. written by other code)."""
    found = _shapes(ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree)
    expected = _shapes(abstract)
    problems = [
        f"{key}: expected {shape}, found {found.get(key, 'nothing')}"
        # Parameters first: optimiser-state mismatches only repeat them.
        for key, shape in sorted(expected.items(), key=lambda kv: kv[0].startswith("opt_state"))
        if found.get(key) != shape
    ] + [f"{key}: unexpected {shape}" for key, shape in found.items() if key not in expected]
    if problems:
        raise ValueError(
            f"checkpoint {state_dir} does not match the encoder its config describes "
            f"({config.model.name}, embed_dim={config.model.embed_dim}, "
            f"crop {tuple(config.data.crop_size)}): " + "; ".join(problems[:5])
        )


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable lines for the end of a run."""
    if "preempted_at_step" in summary:
        return f"Preempted: checkpoint saved at step {summary['preempted_at_step']}; rerun to resume."
    final = summary["final"]
    lines = [
        f"Held-out test subjects after {summary['step']} steps:",
        f"  Spearman(latent, physical distance): within image {final['spearman_within']:.3f}, "
        f"all pairs {final['spearman_all']:.3f}",
        f"  Ridge probe of crop centre, mean abs error: embeddings "
        f"{final['position_probe']['mae_mm']:.1f} mm, raw intensities "
        f"{final['position_probe_raw_intensity']['mae_mm']:.1f} mm",
    ]
    if "initial" in summary:
        lines.append(
            f"  (validation Spearman within image at step 0: {summary['initial']['spearman_within']:.3f})"
        )
    return "\n".join(lines)

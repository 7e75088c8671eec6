"""Orbax checkpoints of a pretraining workdir: the manager, saving and restoring the train state
with the data-iterator state and the config, and `load_encoder` for evaluation."""

from __future__ import annotations

import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from isimed import train_state


def manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True),
    )


def save(mngr, step: int, state: train_state.State, data_iter, config) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config.to_dict()),
        ),
        force=True,
    )


def restore(mngr, step: int, state: train_state.State, data_iter) -> train_state.State:
    """Restores the train state (shaped and sharded like `state`) and, in place, the data iterator."""
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state),
            data=grain.checkpoint.CheckpointRestore(data_iter),
        ),
    )
    return restored.state


def load_encoder(workdir: str, step: int | None = None):
    """Restores `(config, networks, state)` from a pretraining workdir (latest step by default).

    The networks are rebuilt from the config stored in the checkpoint, so the caller needs nothing
    but the directory. `networks.params` / `networks.batch_stats` are the same architecture at
    initialisation (the reference row of evaluations).
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
    networks = train_state.Networks(config)
    tx, _ = train_state.make_optimizer(config.optim, config.total_steps)
    abstract = jax.eval_shape(lambda: train_state.init_state(config, networks, tx))
    _check_shapes(os.path.join(directory, str(step), "state"), abstract, config)
    state = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    ).state
    return config, networks, state


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """Leaf shapes keyed by path; keys normalised to strings as orbax stores them."""
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path):
        tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _check_shapes(state_dir: str, abstract: train_state.State, config: ml_collections.ConfigDict) -> None:
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

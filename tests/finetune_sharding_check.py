"""Writes two fine-tuning steps (full mode) on one fixed global batch to an npz: the second step's
loss and gradients, the parameters and batch statistics after it, both steps' metrics, and the
validation and test scores of the stepped state; run under different device and process counts.

python tests/finetune_sharding_check.py OUT.npz PRETRAIN_WORKDIR [--config.FIELD=VALUE ...]
(with XLA_FLAGS=--xla_force_host_platform_device_count=N; for several processes pass
--config.distributed=True and the coordinator fields, as finetune.py takes them)

The keys follow tests/sharding_check.py, so `sharding_check.assert_same_step` compares two outputs.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import finetune_chest  # noqa: E402
from isimed import finetune  # noqa: E402
from isimed import runtime  # noqa: E402
from isimed import workdir as workdir_layout  # noqa: E402


def _flat(prefix: str, tree) -> dict:
    return {
        f"{prefix}/{jax.tree_util.keystr(p)}": np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def _capture_gradients() -> optax.GradientTransformation:
    """An 'optimiser' that changes nothing and keeps the step's raw gradients as its state."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


def main(out: str, pretrain_workdir: str, *overrides: str) -> None:
    config = finetune_chest.get_config("test,mode=full,fraction=0.5")
    config.pretrain_workdir = pretrain_workdir
    config.finetune.warmup_steps = 0  # The first step moves the parameters.
    for arg in overrides:  # --config.a.b=value (the distributed fields).
        key, value = arg.removeprefix("--config.").split("=", 1)
        config[key] = {"True": True, "False": False}.get(value, int(value) if value.isdigit() else value)
    runtime.initialize(config)
    job = finetune.make_job(config, workdir_layout.Workdir(tempfile.mkdtemp()))
    config, networks = job.config, finetune.resolve_config(config)[2]
    data = NamedSharding(job.mesh, P("data"))
    replicated = NamedSharding(job.mesh, P())

    rng = np.random.default_rng(0)
    b, k, c = config.data.images_per_batch, config.data.crops_per_image, tuple(config.data.crop_size)
    lo, hi = config.data.get("window") or (-1.0, 1.0)
    batch = {
        "crops": rng.uniform(lo, hi, size=(b, k, *c, 1)).astype(np.float32),
        "label": rng.integers(0, 2, size=(b, k)).astype(np.int32),
    }
    # Every process holds the whole batch; each device takes its images.
    batch = {n: jax.make_array_from_callback(x.shape, data, lambda i, x=x: x[i]) for n, x in batch.items()}

    # Step 1 trains the zero-initialised head alone (the encoder's gradients are 0 through it);
    # step 2, from the stepped state, trains the encoder too: its gradients are captured first.
    state, metrics = job.step(job.state, batch)
    flat = {f"metric1/{n}": np.asarray(v) for n, v in metrics.compute().items()}
    capture = _capture_gradients()
    start = {**state, "opt_state": jax.device_put(capture.init(state["params"]), replicated)}
    grad_step = jax.jit(
        finetune.make_step(config, networks, capture, lambda step: 0.0),
        in_shardings=(replicated, data),
        out_shardings=(replicated, replicated),
    )
    captured, metrics = grad_step(start, batch)
    flat.update({"loss": np.asarray(metrics.compute()["loss"]), **_flat("grad", captured["opt_state"])})

    state, metrics = job.step(state, batch)  # The run's own step (donates the state it starts from).
    flat.update({f"metric2/{n}": np.asarray(v) for n, v in metrics.compute().items()})
    flat.update(_flat("params", state["params"]))
    flat.update(_flat("stepped_stats", state["batch_stats"]))
    scores = job.validate(1, state)
    flat.update({f"score/{split}/{n}": np.asarray(v) for split, s in scores.items() for n, v in s.items()})
    if jax.process_index() == 0:
        np.savez(out, devices=jax.device_count(), learning_rate=config.finetune.learning_rate, **flat)


if __name__ == "__main__":
    main(*sys.argv[1:])

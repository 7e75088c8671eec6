"""Writes the loss, gradients, batch statistics and parameters after one train step on one fixed
global batch to an npz; run under different device and process counts.

python tests/sharding_check.py OUT.npz [CONFIG] [--config.FIELD=VALUE ...]
(with XLA_FLAGS=--xla_force_host_platform_device_count=N; for several processes pass
--config.distributed=True and the coordinator fields, as main.py takes them)

CONFIG names a configs/ module (default isimed_chest), optionally with config-argument tokens
(`isimed_chest:method=simclr`); two-view methods also exercise the on-device
augmentation and the MLP head's batch norm over the global batch.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from isimed import methods  # noqa: E402
from isimed import runtime  # noqa: E402
from isimed import train_state  # noqa: E402


def _global(x: np.ndarray, sharding) -> jax.Array:
    """Every process holds the whole batch; each device takes its slice of it."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _flat(prefix: str, tree) -> dict:
    return {
        f"{prefix}/{jax.tree_util.keystr(p)}": np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def assert_same_step(one: dict, other: dict) -> None:
    """Two `tests/sharding_check.py` outputs describe the same step: loss, gradients and batch
    statistics agree to rtol 1e-5; the parameters after the step agree to 5% of one step's size
    wherever the gradient is above float noise (Adam's first step is sign(g) * lr, and its epsilon
    amplifies tiny relative gradient differences), and never differ by more than one step.
    Entries that are exactly zero in theory (biases that distances ignore) are float noise, so the
    absolute tolerance is relative to the largest gradient overall."""
    assert one.keys() == other.keys() and len(one) > 10
    lr = float(one["learning_rate"])
    scale = max(np.abs(v).max() for k, v in one.items() if k.startswith("grad/"))
    noise = 1e-6 * scale
    for key in one:
        if key.startswith("params/"):
            grad = one["grad/" + key.removeprefix("params/")]
            diff = np.abs(other[key] - one[key])
            assert diff.max() <= 1.01 * lr, (key, diff.max())
            assert np.all(diff[np.abs(grad) > 10 * noise] <= 0.05 * lr), key
        elif key != "learning_rate":
            np.testing.assert_allclose(other[key], one[key], rtol=1e-5, atol=noise, err_msg=key)


def main(out: str, config_name: str = "isimed_chest", *overrides: str) -> None:
    # CONFIG: a configs/ module, optionally with config-argument tokens (`isimed_chest:method=simclr`).
    module, _, arg = config_name.partition(":")
    config = importlib.import_module(f"configs.{module}").get_config(
        ",".join(("test", arg) if arg else ("test",))
    )
    for arg in overrides:  # --config.a.b=value, values as JSON (strings without quotes).
        key, value = arg.removeprefix("--config.").split("=", 1)
        try:
            value = json.loads(value.replace("True", "true").replace("False", "false"))
        except json.JSONDecodeError:
            pass
        config[key] = value
    runtime.initialize(config)
    config.data.images_per_batch = 8
    config.optim.warmup_steps = 0  # The first step moves the parameters.
    if "pairs" in config.loss:
        config.loss.pairs = "all"  # Cross-image pairs span devices.
    rng = np.random.default_rng(0)
    views = methods.get(config.method).views
    b, k, c = 8, config.data.crops_per_image // views, config.data.crop_size
    batch = {
        "crops": rng.uniform(-1, 1, size=(b, k, *c, 1)).astype(np.float32),
        "centres": rng.uniform(-150, 150, size=(b, k, 3)).astype(np.float32),
    }
    if views == 2:
        batch["views"] = rng.uniform(-1, 1, size=(b, k, *c, 1)).astype(np.float32)
    setup = train_state.create_train_step(config, runtime.make_mesh())
    batch = {name: _global(x, setup.data_sharding) for name, x in batch.items()}
    state = setup.state
    key = jax.random.key(3)
    (loss, (_, batch_stats, _)), grads = setup.grad_fn(
        state["params"], state["batch_stats"], batch, key, state.get("loss_ref", {})
    )
    flat = {"loss": np.asarray(loss), **_flat("grad", grads), **_flat("stats", batch_stats)}
    state, _ = setup.step(state, batch)
    flat.update(_flat("params", state["params"]))
    flat.update(_flat("stepped_stats", state["batch_stats"]))
    if jax.process_index() == 0:
        np.savez(out, devices=jax.device_count(), learning_rate=config.optim.learning_rate, **flat)


if __name__ == "__main__":
    main(*sys.argv[1:])

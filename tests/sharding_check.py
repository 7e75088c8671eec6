"""Writes loss and gradients of one batch to an npz; run under different device counts.

python tests/sharding_check.py OUT.npz [CONFIG]   (with XLA_FLAGS=--xla_force_host_platform_device_count=N)

CONFIG names a configs/ module (default isimed_chest); two-view methods also exercise the on-device
augmentation and the MLP head's batch norm over the global batch.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from isimed import methods  # noqa: E402
from isimed import train_state  # noqa: E402


def main(out: str, config_name: str = "isimed_chest") -> None:
    config = importlib.import_module(f"configs.{config_name}").get_config("test")
    config.data.images_per_batch = 8
    if "pairs" in config.loss:
        config.loss.pairs = "all"  # Cross-image pairs span devices.
    rng = np.random.default_rng(0)
    b, k, c = 8, config.data.crops_per_image, config.data.crop_size
    batch = {
        "crops": rng.uniform(-1, 1, size=(b, k, *c, 1)).astype(np.float32),
        "centres": rng.uniform(-150, 150, size=(b, k, 3)).astype(np.float32),
    }
    if methods.get(config.method).views == 2:
        batch["views"] = rng.uniform(-1, 1, size=(b, k, *c, 1)).astype(np.float32)
    setup = train_state.create_train_step(config, train_state.make_mesh())
    state = setup.state
    key = jax.random.key(3)
    (loss, (_, batch_stats, _)), grads = setup.grad_fn(state["params"], state["batch_stats"], batch, key)
    flat = {
        "loss": np.asarray(loss),
        **{f"grad/{jax.tree_util.keystr(p)}": np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(grads)},
        **{f"stats/{jax.tree_util.keystr(p)}": np.asarray(s) for p, s in jax.tree_util.tree_leaves_with_path(batch_stats)},
    }
    np.savez(out, devices=jax.device_count(), **flat)


if __name__ == "__main__":
    main(*sys.argv[1:])

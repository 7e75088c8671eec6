"""Writes the self-supervised losses (and their gradients) of one batch to an npz; run under
different device counts.

python tests/ssl_sharding_check.py OUT.npz   (with XLA_FLAGS=--xla_force_host_platform_device_count=N)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from isimed import losses  # noqa: E402

LOSSES = {
    "nt_xent": lambda z1, z2: losses.nt_xent_loss(z1, z2, temperature=0.1),
    "vicreg": losses.vicreg_loss,
    "barlow": losses.barlow_twins_loss,
}


def main(out: str) -> None:
    rng = np.random.default_rng(0)
    n, d = 16, 32  # n divisible by 8, so every device holds rows of the batch.
    z1 = rng.normal(size=(n, d)).astype(np.float32)
    z2 = (z1 + 0.5 * rng.normal(size=(n, d))).astype(np.float32)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data = NamedSharding(mesh, P("data"))
    flat = {}
    for name, fn in LOSSES.items():
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True), in_shardings=(data, data))
        (loss, aux), (g1, g2) = step(z1, z2)
        flat[f"{name}/loss"] = np.asarray(loss)
        flat.update({f"{name}/{k}": np.asarray(v) for k, v in aux.items()})
        flat[f"{name}/grad_z1"] = np.asarray(g1)
        flat[f"{name}/grad_z2"] = np.asarray(g2)
    flat["embedding_std"] = np.asarray(jax.jit(losses.embedding_std, in_shardings=data)(z1))
    np.savez(out, devices=jax.device_count(), **flat)


if __name__ == "__main__":
    main(sys.argv[1])

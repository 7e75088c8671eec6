"""Where should crop augmentation run: on the host CPU inside the grain pipeline, or on the device?

python -m benchmarks.augment [--seconds=3] [--train_step]

Both sides run the one implementation, the jitted `isimed.augment.augment`, with the default
augmentation config on the same crops; only where it runs differs:

(a) host: a grain `random_map` over one train step's batch of pre-made crops (MapDataset, batched
    before the map, read in the main thread: 0 workers, num_threads=0). The map runs `augment` on
    the CPU backend (inputs placed on `jax.devices("cpu")[0]`) with a key drawn from grain's
    per-record generator, and hands numpy back to the pipeline. XLA:CPU may use every core for one
    call. Seconds per step, after compiling and one warm-up step.
(b) device: `augment` on the default JAX device with device-resident crops, after compiling,
    synchronised with `block_until_ready`: seconds per step.

With a CPU-only JAX both run on the same backend, so the ratio then shows only the cost of the grain
map and the host copies; on a GPU/TPU it compares the two placements. Optionally, for scale, one
small_cnn 3D 16^3 train step (128 crops) as built by benchmarks/train_step.py.
"""

from __future__ import annotations

import dataclasses
import os
import time

import grain
import jax
import numpy as np
from absl import app
from absl import flags

from isimed import augment as augment_lib

flags.DEFINE_float("seconds", 3.0, "Minimum measuring time per variant and side.")
flags.DEFINE_bool("train_step", True, "Also time one small_cnn 3D 16^3 train step (128 crops).")
FLAGS = flags.FLAGS

# name, crop shape, crops per step (B*K)
VARIANTS = [
    ("3D 16^3", (16, 16, 16), 128),
    ("3D 16^3", (16, 16, 16), 512),
    ("3D 32^3", (32, 32, 32), 128),
    ("2D 32^2", (32, 32), 512),
]


def host_augment(crops: np.ndarray, seed: int, params: augment_lib.AugmentParams) -> jax.Array:
    """`isimed.augment.augment` of a batch of crops on the host CPU backend, whatever the default
    device: the key is made and the crops are placed on the CPU, so the jitted call runs there."""
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        return augment_lib.augment(jax.random.key(seed), jax.device_put(crops, cpu), params)


@dataclasses.dataclass(frozen=True)
class HostAugment(grain.transforms.RandomMap):
    params: augment_lib.AugmentParams

    def random_map(self, crops: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.asarray(host_augment(crops, int(rng.integers(2**31)), self.params))


def make_crops(crop: tuple[int, ...], n: int) -> np.ndarray:
    """Smooth-ish random crops in [-1, 1] (the content does not change the cost)."""
    x = np.random.default_rng(0).uniform(-1, 1, (n, *crop, 1)).astype(np.float32)
    return np.tanh(2.0 * x)


def time_until(fn, seconds: float, min_reps: int = 3) -> float:
    """Median seconds per call of `fn` over at least `min_reps` calls and `seconds`. The median,
    not the mean: the 2 cores are shared, and a neighbour's burst should not decide the table."""
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def host_step_seconds(
    crops: np.ndarray, params: augment_lib.AugmentParams, seconds: float
) -> tuple[float, float]:
    """(compile seconds, seconds per step) of one step's B*K crops through grain batch +
    random_map, main thread only."""
    cpu = jax.devices("cpu")[0]
    start = time.perf_counter()
    views = jax.block_until_ready(host_augment(crops, 0, params))  # Compiles on the CPU backend.
    compile_s = time.perf_counter() - start
    if views.devices() != {cpu}:
        raise RuntimeError(f"host augmentation ran on {views.devices()}, not on {cpu}")
    ds = grain.MapDataset.source(list(crops)).repeat().batch(len(crops))
    ds = ds.random_map(HostAugment(params), seed=0)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    next(it)  # Warm-up.
    return compile_s, time_until(lambda: next(it), seconds)


def device_step_seconds(
    crops: np.ndarray, params: augment_lib.AugmentParams, seconds: float
) -> tuple[float, float]:
    """(compile seconds, seconds per step) of the jitted JAX augment on device-resident crops."""
    x = jax.device_put(crops)
    keys = iter(jax.random.split(jax.random.key(0), 100_000))
    start = time.perf_counter()
    jax.block_until_ready(augment_lib.augment(next(keys), x, params))
    compile_s = time.perf_counter() - start
    step = lambda: jax.block_until_ready(augment_lib.augment(next(keys), x, params))  # noqa: E731
    step_s = time_until(step, seconds)
    return compile_s, step_s


def train_step_ms() -> float:
    from benchmarks import train_step

    row = train_step._time_step(
        "small_cnn 3D 16^3", "small_cnn", (16, 16, 16), (8, 16), 128, "float32", steps=3
    )
    return row["step_ms"]


def main(argv):
    del argv
    params = augment_lib.AugmentParams.from_config(augment_lib.default_config())
    rows = []
    for name, crop, n in VARIANTS:
        crops = make_crops(crop, n)
        host_compile_s, host_s = host_step_seconds(crops, params, FLAGS.seconds)
        compile_s, device_s = device_step_seconds(crops, params, FLAGS.seconds)
        rows.append((name, n, host_s, device_s, compile_s))
        print(
            f"{name} x{n}: host {host_s * 1e3:.1f} ms (compile {host_compile_s:.1f} s), "
            f"device {device_s * 1e3:.1f} ms (compile {compile_s:.1f} s)",
            flush=True,
        )

    print(
        f"\nAugmentation per train step, default config, both sides `isimed.augment.augment` "
        f"(JAX {jax.default_backend()}, {os.cpu_count()} CPU cores; host = CPU backend in a "
        f"grain random_map, 0 workers)\n"
    )
    print(
        "| crops | per step | host ms/step | host crops/s | device ms/step | device crops/s "
        "| device/host (crops/s) | device compile s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, n, host_s, device_s, compile_s in rows:
        print(
            f"| {name} | {n} | {host_s * 1e3:.1f} | {n / host_s:,.0f} | {device_s * 1e3:.1f} "
            f"| {n / device_s:,.0f} | {host_s / device_s:.2f}x | {compile_s:.1f} |"
        )
    if FLAGS.train_step:
        step_ms = train_step_ms()
        host_128 = rows[0][2] * 1e3
        device_128 = rows[0][3] * 1e3
        print(
            f"\nFor scale: small_cnn 3D 16^3 train step, 128 crops, float32: {step_ms:.1f} ms "
            f"(augmenting one view of those crops: host {host_128:.1f} ms = "
            f"{host_128 / step_ms:.0%} of it, device {device_128:.1f} ms = "
            f"{device_128 / step_ms:.0%}; two-view methods augment twice)"
        )


if __name__ == "__main__":
    app.run(main)

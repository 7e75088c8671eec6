"""Where should crop augmentation run: in the grain workers (numpy, per crop) or on the device?

python -m benchmarks.augment [--seconds=3] [--train_step]

(a) host: a numpy/scipy version of `isimed.augment` (written here only, as the alternative being
    measured) as a grain `random_map` over a MapDataset of pre-made crops, batched to one train
    step's worth, read in the main thread (0 workers, num_threads=0): crops/s of one CPU core.
(b) device: the jitted `isimed.augment.augment` on the default JAX device, after compiling,
    synchronised with `block_until_ready`: crops/s.
Both with the default augmentation config. Optionally, for scale, one small_cnn 3D 16^3 train
step (128 crops) as built by benchmarks/train_step.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
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


def numpy_augment(
    rng: np.random.Generator, crop: np.ndarray, p: augment_lib.AugmentParams
) -> np.ndarray:
    """The ops of `isimed.augment.augment_crop`, same order and distributions, on one crop
    `(*spatial, C)` on the host. Unlike under vmap, ops that are not drawn cost nothing here."""
    x = crop.astype(np.float32, copy=True)
    spatial = x.shape[:-1]
    flips = [axis for axis in range(len(spatial)) if rng.random() < p.flip_prob]
    if flips:
        x = np.flip(x, flips)
    if rng.random() < p.blur_prob:
        sigma = rng.uniform(p.blur_sigma_min, p.blur_sigma_max)
        radius = math.ceil(3.0 * p.blur_sigma_max)
        for axis in range(len(spatial)):
            x = scipy.ndimage.gaussian_filter1d(x, sigma, axis=axis, mode="reflect", radius=radius)
    if rng.random() < p.intensity_prob:
        s = rng.uniform(1.0 - p.intensity_scale, 1.0 + p.intensity_scale)
        t = rng.uniform(-p.intensity_shift, p.intensity_shift)
        x = x * np.float32(s) + np.float32(t)
    if rng.random() < p.noise_prob:
        std = rng.uniform(0.0, p.noise_std_max)
        x = x + np.float32(std) * rng.standard_normal(x.shape, dtype=np.float32)
    if p.dropout_boxes and rng.random() < p.dropout_prob:
        fill = x.min(axis=tuple(range(len(spatial)))) if p.dropout_fill == "min" else 0.0
        x = np.array(x)  # Writable and contiguous (a flip may have left a view of the input).
        for _ in range(p.dropout_boxes):
            box = []
            for n in spatial:
                size = rng.integers(1, max(1, math.floor(p.dropout_max_fraction * n)) + 1)
                start = rng.integers(0, n - size + 1)
                box.append(slice(start, start + size))
            x[tuple(box)] = fill
    if p.clip:
        x = np.clip(x, -1.0, 1.0)
    return x


@dataclasses.dataclass(frozen=True)
class NumpyAugment(grain.transforms.RandomMap):
    params: augment_lib.AugmentParams

    def random_map(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return numpy_augment(rng, crop, self.params)


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
) -> float:
    """Seconds per step of B*K crops through grain random_map + batch, main thread only."""
    ds = grain.MapDataset.source(list(crops)).repeat()
    ds = ds.random_map(NumpyAugment(params), seed=0).batch(len(crops))
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    next(it)  # Warm-up.
    return time_until(lambda: next(it), seconds)


def device_step_seconds(
    crops: np.ndarray, params: augment_lib.AugmentParams, seconds: float
) -> tuple[float, float]:
    """(compile seconds, seconds per step) of the jitted JAX augment on device-resident crops."""
    x = jax.device_put(jnp.asarray(crops))
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
        host_s = host_step_seconds(crops, params, FLAGS.seconds)
        compile_s, device_s = device_step_seconds(crops, params, FLAGS.seconds)
        rows.append((name, n, host_s, device_s, compile_s))
        print(f"{name} x{n}: host {host_s * 1e3:.1f} ms, device {device_s * 1e3:.1f} ms "
              f"(compile {compile_s:.1f} s)", flush=True)

    print(f"\nAugmentation per train step, default config (JAX {jax.default_backend()}, "
          f"{os.cpu_count()} CPU cores; host = grain random_map, 0 workers, 1 thread)\n")
    print("| crops | per step | host ms/step | host crops/s | device ms/step | device crops/s "
          "| device/host (crops/s) | device compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, n, host_s, device_s, compile_s in rows:
        print(f"| {name} | {n} | {host_s * 1e3:.1f} | {n / host_s:,.0f} | {device_s * 1e3:.1f} "
              f"| {n / device_s:,.0f} | {host_s / device_s:.2f}x | {compile_s:.1f} |")
    if FLAGS.train_step:
        step_ms = train_step_ms()
        host_128 = rows[0][2] * 1e3
        device_128 = rows[0][3] * 1e3
        print(f"\nFor scale: small_cnn 3D 16^3 train step, 128 crops, float32: {step_ms:.1f} ms "
              f"(augmenting one view of those crops: host {host_128:.1f} ms = "
              f"{host_128 / step_ms:.0%} of it, device {device_128:.1f} ms = "
              f"{device_128 / step_ms:.0%}; two-view methods augment twice)")


if __name__ == "__main__":
    app.run(main)

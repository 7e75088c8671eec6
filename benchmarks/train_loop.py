"""End-to-end training throughput: the real step fed by the real grain pipeline, per preset.

python -m benchmarks.train_loop [--presets=test,demo,demo2d] [--steps=30]

For each preset, in one process and on the same shapes:
- end to end: `next(pipeline)` -> device -> jitted step, as the training loop runs it;
- step only: the same step on one batch already on the device (the device's own rate);
- input only: `next(pipeline)` alone (the host pipeline's rate);
and the share of end-to-end time the device waits for input, 1 - step only / end to end.
The rates are the best round of each; the e2e / step ratio is the median of the per-round ratios
(each round times end to end and step only back to back), which a machine whose speed drifts
between rounds moves far less than a ratio of two best rounds taken at different times.
The paper preset (DenseNet-121 3D, 1,024 crops of 32^3) is for accelerators.
"""

import time

import jax
import numpy as np
from absl import app
from absl import flags

from configs import isimed_chest
from isimed import methods
from isimed import runtime
from isimed import train_state
from isimed.data import pipeline

flags.DEFINE_list("presets", ["test", "demo", "demo2d"], "isimed_chest.py presets to run.")
flags.DEFINE_string("method", "isimed", "Method (configs/isimed_chest.py:PRESET,method=M).")
flags.DEFINE_integer("steps", 30, "Timed steps per measurement (after one compile step).")
flags.DEFINE_integer("warmup", 60, "Untimed end-to-end steps first (fills the decoded-volume cache).")
flags.DEFINE_integer("rounds", 5, "Alternating rounds of the three measurements.")
flags.DEFINE_string("tfds_dir", "~/tensorflow_datasets", "Where the phantom is (generated on first use).")
FLAGS = flags.FLAGS


def _timed(fn, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def measure(preset: str, method: str, steps: int, tfds_dir: str, warmup: int = 0, rounds: int = 1) -> dict:
    config = isimed_chest.get_config(f"{preset},method={method}")
    config.data.tfds_dir = tfds_dir
    setup = train_state.create_train_step(config, runtime.make_mesh())
    views = methods.get(method).views
    keys = ("crops", "centres", "views") if views == 2 else ("crops", "centres")
    data_iter = iter(pipeline.make_dataset(config.data, "train", seed=0, train=True, views=views))

    def next_batch():
        batch = next(data_iter)
        return {
            k: jax.make_array_from_process_local_data(setup.data_sharding, np.asarray(batch[k])) for k in keys
        }

    state = {"s": setup.state}

    def step(batch):
        state["s"], metrics = setup.step(state["s"], batch)
        return metrics

    fixed = next_batch()
    t0 = time.perf_counter()
    jax.block_until_ready(step(fixed))
    compile_s = time.perf_counter() - t0
    # Warm-up: the first epoch decodes (and caches) every volume, which later epochs do not.
    _timed(lambda: step(next_batch()), warmup)
    # Alternating rounds (end to end and step only in turn first): on a shared machine load drifts.
    runs = {
        "end_to_end": lambda: step(next_batch()),
        "step_only": lambda: step(fixed),
        "input_only": lambda: next(data_iter)["crops"],
    }
    times = {k: [] for k in runs}
    for r in range(rounds):
        order = ("end_to_end", "step_only") if r % 2 == 0 else ("step_only", "end_to_end")
        for k in (*order, "input_only"):
            times[k].append(_timed(runs[k], steps))
    end_to_end, step_only, input_only = (min(times[k]) for k in times)
    ratio = float(np.median([s / e for s, e in zip(times["step_only"], times["end_to_end"])]))
    crops = config.data.images_per_batch * config.data.crops_per_image
    return {
        "preset": preset,
        "model": config.model.name,
        "crops": crops,
        "crop": "x".join(map(str, config.data.crop_size)),
        "compile_s": compile_s,
        "end_to_end": crops / end_to_end,
        "step_only": crops / step_only,
        "input_only": crops / input_only,
        "ratio": ratio,
        "wait": max(0.0, 1.0 - ratio),
    }


def main(argv):
    del argv
    import os

    tfds_dir = os.path.expanduser(FLAGS.tfds_dir)
    rows = [
        measure(p, FLAGS.method, FLAGS.steps, tfds_dir, FLAGS.warmup, FLAGS.rounds) for p in FLAGS.presets
    ]
    print(
        f"\nTraining loop throughput ({jax.default_backend()}, {jax.device_count()} device(s), "
        f"{os.cpu_count()} CPU cores; {FLAGS.method}; {FLAGS.rounds} alternating rounds of "
        f"{FLAGS.steps} steps after {FLAGS.warmup} warm-up steps; crops/s of the best round, "
        "e2e / step: median of the rounds' ratios)"
    )
    print(
        "| preset | model | crops/step | crop | end to end | step only | input only "
        "| e2e / step | device waits | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['model']} | {r['crops']} | {r['crop']} | {r['end_to_end']:,.0f} "
            f"| {r['step_only']:,.0f} | {r['input_only']:,.0f} | {r['ratio']:.0%} "
            f"| {r['wait']:.0%} | {r['compile_s']:.1f} |"
        )


if __name__ == "__main__":
    from isimed import runtime

    runtime.tune_malloc_for_cpu()  # As training does, before JAX starts.
    app.run(main)

"""Input-pipeline benchmark: phantom generation volumes/s and crops/s with 0 and 2 worker processes.

python -m benchmarks.pipeline [--data_dir=~/tensorflow_datasets] [--seconds=10]
"""

import os
import time

from absl import app
from absl import flags

from configs import isimed_chest
from isimed.data import chest_phantom
from isimed.data import phantom
from isimed.data import pipeline

flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data dir (the phantom is generated here).")
flags.DEFINE_float("seconds", 10.0, "Measurement time per pipeline variant.")
FLAGS = flags.FLAGS


def generation_rate(spec: phantom.PhantomSpec, n: int = 8) -> float:
    phantom.generate_subject(spec, 0, 0)
    start = time.perf_counter()
    for i in range(n):
        phantom.generate_subject(spec, 0, i)
    return n / (time.perf_counter() - start)


def crops_per_second(data, seconds: float) -> float:
    it = iter(pipeline.make_dataset(data, "train", seed=0, train=True))
    next(it)  # Warm-up: opens files, starts workers.
    crops, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(it)
        crops += batch["crops"].shape[0] * batch["crops"].shape[1]
    return crops / (time.perf_counter() - start)


def main(argv):
    del argv
    data_dir = os.path.expanduser(FLAGS.data_dir)
    rows = [
        ("phantom generation 64x96x96 (1 process)", f"{generation_rate(phantom.PhantomSpec()):.1f} volumes/s")
    ]
    chest_phantom.data_source("demo3d", "train", data_dir)
    for crop, k in [((16, 16, 16), 16), ((16, 16, 16), 32), ((32, 32, 32), 32)]:
        for workers in (0, 2):
            data = isimed_chest.get_config("demo").data
            data.tfds_dir, data.crop_size, data.crops_per_image = data_dir, crop, k
            data.num_workers, data.images_per_batch = workers, 8
            rate = crops_per_second(data, FLAGS.seconds)
            rows.append(
                (f"pipeline {crop[0]}^3 crops, K={k}, B=8, {workers} workers", f"{rate:,.0f} crops/s")
            )
    width = max(len(r[0]) for r in rows)
    print(f"\n{'variant':<{width}}  rate\n{'-' * width}  {'-' * 16}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"(machine: {os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    app.run(main)

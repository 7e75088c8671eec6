"""Input-pipeline benchmark: the phantom, and one real brain MRI against the authors' MONAI pipeline.

python -m benchmarks.pipeline [--data_dir=~/tensorflow_datasets] [--seconds=10] [--rows=phantom,real]

phantom: generation volumes/s and crops/s with 0 and 2 worker processes.

real: nilearn's MNI152 T1 template at 1 mm (197 x 233 x 189; nilearn ships the file, no download)
prepared with `isimed.data.prepare` (MRI normalisation, native grid) into a temporary folder in
both storages, then the real grain pipeline (`make_dataset`, the folder configs' data settings:
crops held at least half inside the head) cutting 16 crops of 32^3 per image read, 8 images per
batch, one process, no worker processes, one read thread; with the volume read from its file each
time (`cache_mb=0`: a memory-mapped `.isimed` file, or a zstd array_record entry decompressed
whole) and kept in memory (`cache_mb=1024`, which also keeps the volume's foreground map).
With `monai` importable (`make benchmark-reference`'s venv, which has torch, monai, nilearn and
this project) MONAI reference rows follow, the authors' training transforms without augmentation:
LoadImaged, CropForegroundd (> 0), SpatialPadd, ScaleIntensityRangePercentilesd (5..95 -> [-1, 1])
and RandSpatialCropSamplesd (16 crops of 32^3, no foreground test) through a MONAI DataLoader
(batch 8, no workers, one torch thread), reading the NIfTI each time (Dataset) and with the volume
cached (CacheDataset). Variants run in alternating rounds in one process. "per CPU s" divides by
the CPU time this process used (all its threads): the rate per core, which a machine loaded by
other jobs distorts less than the wall clock.
"""

import os
import tempfile
import time

from absl import app
from absl import flags

from configs import isimed_chest
from configs import isimed_folder
from isimed.data import chest_phantom
from isimed.data import phantom
from isimed.data import pipeline

flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data dir (the phantom is generated here).")
flags.DEFINE_float("seconds", 10.0, "Measurement time per pipeline variant.")
flags.DEFINE_list("rows", ["phantom", "real"], "Which workloads: phantom, real.")
flags.DEFINE_integer("rounds", 3, "real: alternating rounds per variant (seconds split between them).")
FLAGS = flags.FLAGS

REAL_CROP, REAL_K, REAL_B = (32, 32, 32), 16, 8


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


def phantom_rows(data_dir: str, seconds: float) -> list[tuple[str, str]]:
    rows = [
        ("phantom generation 64x96x96 (1 process)", f"{generation_rate(phantom.PhantomSpec()):.1f} volumes/s")
    ]
    chest_phantom.data_source("demo3d", "train", data_dir)
    for crop, k in [((16, 16, 16), 16), ((16, 16, 16), 32), ((32, 32, 32), 32)]:
        for workers in (0, 2):
            data = isimed_chest.get_config("demo").data
            data.tfds_dir, data.crop_size, data.crops_per_image = data_dir, crop, k
            data.num_workers, data.images_per_batch = workers, 8
            rate = crops_per_second(data, seconds)
            rows.append(
                (f"pipeline {crop[0]}^3 crops, K={k}, B=8, {workers} workers", f"{rate:,.0f} crops/s")
            )
    return rows


def write_template(folder: str) -> str:
    """nilearn's MNI152 T1 template at 1 mm as `folder/raw/mni152.nii.gz`; returns the path."""
    import nibabel as nib
    from nilearn import datasets

    os.makedirs(os.path.join(folder, "raw"), exist_ok=True)
    path = os.path.join(folder, "raw", "mni152.nii.gz")
    nib.save(datasets.load_mni152_template(resolution=1), path)
    return path


def prepare_template(folder: str, storage: str) -> str:
    """The template prepared by `isimed.data.prepare` (MRI, native grid) into `folder/<storage>`."""
    from isimed.data import prepare

    out = os.path.join(folder, storage)
    prepare.prepare(
        "glob",
        os.path.join(folder, "raw"),
        out,
        options={"image_pattern": "*.nii.gz"},
        intensity="mri",
        splits={"train": ["mni152"]},
        storage=storage,
        progress=False,
    )
    return out


def project_batches(prepared_dir: str, cache_mb: int):
    """Crops per `next()` of the real grain pipeline on the prepared template."""
    data = isimed_folder.get_config("paper").data
    data.dir, data.crop_size, data.crops_per_image = prepared_dir, REAL_CROP, REAL_K
    data.images_per_batch, data.num_workers, data.num_threads = REAL_B, 0, 1
    data.cache_mb = cache_mb
    it = iter(pipeline.make_dataset(data, "train", seed=0, train=True))
    while True:
        batch = next(it)
        yield batch["crops"].shape[0] * batch["crops"].shape[1]


def _positive(x):
    return x > 0


def monai_batches(nifti: str, cached: bool):
    """Crops per `next()` of a MONAI pipeline on the same NIfTI (RandSpatialCropSamplesd)."""
    import torch
    from monai import data as monai_data
    from monai import transforms as mt

    torch.set_num_threads(1)  # One core, as the project's rows.
    # The authors' training transforms (NabJa/isimed, meddist/data/loading.py), without augmentation.
    transform = mt.Compose(
        [
            mt.LoadImaged(keys="image", ensure_channel_first=True),
            mt.CropForegroundd(keys="image", source_key="image", select_fn=_positive),
            mt.SpatialPadd(keys="image", spatial_size=REAL_CROP),
            mt.ScaleIntensityRangePercentilesd(keys="image", lower=5, upper=95, b_min=-1.0, b_max=1.0),
            mt.RandSpatialCropSamplesd(
                keys="image", roi_size=REAL_CROP, num_samples=REAL_K, random_size=False
            ),
        ]
    )
    items = [{"image": nifti}] * REAL_B
    if cached:  # Runs the transforms up to the first random one once, keeps the result.
        dataset = monai_data.CacheDataset(items, transform, progress=False)
    else:
        dataset = monai_data.Dataset(items, transform)
    loader = monai_data.DataLoader(dataset, batch_size=REAL_B, num_workers=0)
    while True:
        for batch in loader:
            yield batch["image"].shape[0]


def _alternate(variants: dict, seconds: float, rounds: int) -> dict[str, tuple[float, float]]:
    """{name: (crops/s wall, crops per CPU second)} over `rounds` alternating rounds."""
    totals = {name: [0, 0.0, 0.0] for name in variants}
    for gen in variants.values():
        next(gen)  # Warm-up: opens files, fills caches, starts threads.
    for _ in range(rounds):
        for name, gen in variants.items():
            crops, wall, cpu = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - wall < seconds / rounds:
                crops += next(gen)
            totals[name][0] += crops
            totals[name][1] += time.perf_counter() - wall
            totals[name][2] += time.process_time() - cpu
    return {name: (c / w, c / cpu) for name, (c, w, cpu) in totals.items()}


def real_rows(seconds: float, rounds: int) -> list[tuple[str, str]]:
    try:
        import nilearn  # noqa: F401
    except ImportError:
        return [
            ("MNI152 real-volume rows", "skipped: nilearn not installed (the [test] or [reference] extra)")
        ]
    try:
        import monai  # noqa: F401
    except ImportError:
        monai = None
    with tempfile.TemporaryDirectory() as folder:
        nifti = write_template(folder)
        mapped, compressed = prepare_template(folder, "mapped"), prepare_template(folder, "array_record")
        variants = {
            "project, mapped file read each time": project_batches(mapped, 0),
            "project, array_record read each time": project_batches(compressed, 0),
            "project, volume cached": project_batches(mapped, 1024),
        }
        if monai is not None:
            variants["MONAI, NIfTI read each time"] = monai_batches(nifti, cached=False)
            variants["MONAI, volume cached (CacheDataset)"] = monai_batches(nifti, cached=True)
        rates = _alternate(variants, seconds, rounds)
    rows = []
    for name, (wall, cpu) in rates.items():
        rows.append(
            (f"MNI152 1 mm, 32^3 x16 per read, B=8: {name}", f"{wall:,.0f} crops/s, {cpu:,.0f} per CPU s")
        )
    if monai is not None:
        ref = rates["MONAI, NIfTI read each time"][1]
        ref_cached = rates["MONAI, volume cached (CacheDataset)"][1]
        for name in [n for n in rates if n.startswith("project")]:
            cpu = rates[name][1]
            rows.append(
                (
                    f"ratio per CPU s, {name} / MONAI",
                    f"{cpu / ref:.1f}x (file), {cpu / ref_cached:.1f}x (cached)",
                )
            )
    else:
        rows.append(("MONAI reference rows", "skipped: monai not importable (make benchmark-reference)"))
    return rows


def main(argv):
    del argv
    rows = []
    if "phantom" in FLAGS.rows:
        rows += phantom_rows(os.path.expanduser(FLAGS.data_dir), FLAGS.seconds)
    if "real" in FLAGS.rows:
        rows += real_rows(FLAGS.seconds, FLAGS.rounds)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'variant':<{width}}  rate\n{'-' * width}  {'-' * 16}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"(machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    app.run(main)

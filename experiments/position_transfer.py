"""Position transfer on real MRI: pretrain on one brain, probe crop position on deformed "subjects".

python -m experiments.position_transfer [--subjects=8] [--steps=0] [--workdir=workdirs/position_transfer]

1. Data: nilearn's MNI152 T1 template at 2 mm (shipped with nilearn, nothing downloaded) and
   `--subjects` new subjects made from it, each by a smooth random deformation (largest
   displacement drawn in `--max_displacement_mm`), a smooth multiplicative bias field and Rician
   noise. All are written as NIfTI on the template's grid and prepared with `isimed.data.prepare`
   (glob layout, MRI normalisation, foreground-cropped): train = the template, validation = the
   template again (the "template itself" test), test = the subjects.
2. Pretraining: the folder `demo` preset (`configs/isimed_folder.py:demo`) unchanged, on the train
   split, through `isimed.train` (`--steps` overrides the step count for quick checks only).
3. Evaluation with the project's probes: the ridge position probe (`probes.position_probe`) is fitted
   on `--probe_crops` crops of the template and tested on `--test_crops` crops of each test image;
   feature sets: the pretrained encoder, the same encoder at initialisation, raw crop intensities,
   and the mean predictor (the probe on constant features predicts the training mean). Spearman
   (latent distance, physical distance) over crop pairs within each image and over all pairs.

Ground truth. A subject is the template pulled back through phi(x) = x + u(x): the subject voxel at
world position x shows the template's anatomy from x + u(x). The primary ground truth is the crop
centre in the subject's own world frame (x, what `isimed.data.pipeline` computes from the subject's
affine): that is what a position probe and ISImed's distances see on any real scan, and the physical
distance between two crops of a subject is |x1 - x2| in its own body, not in the template's. The
secondary column, "anat", scores the same predictions against the anatomical correspondence
x + u(x) (the template position of the anatomy at the crop centre), so the part of the error that
is the deformation itself (at most `--max_displacement_mm`) can be read off.

Writes `position_transfer.json` and `position_transfer.md` into the workdir and prints the table.
A finished pretraining of the same config in the workdir is reused (with its recorded timing); one
of another config is refused (use another `--workdir`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import nibabel as nib
import numpy as np
from absl import app
from absl import flags
from scipy import ndimage

import experiments
from isimed import geometry
from isimed import workdir as workdir_layout

FLAGS = flags.FLAGS

TEMPLATE_CASES = {"train": "template_fit", "validation": "template_eval"}
PROBE_SEED, TEST_SEED = 1234, 4321  # Different crops for fitting and testing on the template.


# ------------------------------------------------------------------------------------------------
# Subjects: deformation, bias field, noise.


def smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], spacing_mm: np.ndarray, control_mm: float
) -> np.ndarray:
    """A smooth random field on `shape`: i.i.d. normal values on a control lattice every
    `control_mm`, interpolated by cubic splines (a free-form deformation, as TorchIO's
    RandomElasticDeformation draws one). Smooth at the scale of `control_mm` by construction."""
    extent = np.asarray(shape) * np.asarray(spacing_mm, np.float64)
    coarse = np.maximum(4, np.ceil(extent / control_mm).astype(int) + 1)  # >= 4: cubic needs it.
    values = rng.standard_normal(tuple(coarse))
    # Each fine voxel's position on the control lattice (first and last voxels on its ends).
    axes = [np.linspace(0, c - 1, n) for c, n in zip(coarse, shape)]
    grid = np.meshgrid(*axes, indexing="ij")
    return ndimage.map_coordinates(values, grid, order=3, mode="nearest")


def displacement_field(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    spacing_mm: np.ndarray,
    max_mm: float,
    control_mm: float = 16.0,
) -> np.ndarray:
    """`(ndim, *shape)` world-mm displacements whose largest vector norm is exactly `max_mm`
    (zeros for `max_mm == 0`)."""
    if max_mm < 0:
        raise ValueError(f"max_mm must be >= 0, got {max_mm}")
    u = np.stack([smooth_field(rng, shape, spacing_mm, control_mm) for _ in shape])
    if max_mm == 0:
        return np.zeros_like(u)
    return u * (max_mm / np.sqrt((u**2).sum(0)).max())


def bias_field(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    spacing_mm: np.ndarray,
    strength: float,
    control_mm: float = 48.0,
) -> np.ndarray:
    """A smooth positive multiplicative field exp(b), |b| <= `strength` (MRI coil shading)."""
    b = smooth_field(rng, shape, spacing_mm, control_mm)
    return np.exp(strength * b / np.abs(b).max())


def warp(image: np.ndarray, affine: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """The image pulled back through x -> x + u(x): out[i] = image at world(i) + u(i) (trilinear;
    points outside take the nearest edge voxel)."""
    index = np.stack(np.meshgrid(*map(np.arange, image.shape), indexing="ij"), -1).reshape(-1, image.ndim)
    world = geometry.voxel_to_world(index, affine) + displacement.reshape(image.ndim, -1).T
    source = geometry.world_to_voxel(world, affine).T.reshape(image.ndim, *image.shape)
    return ndimage.map_coordinates(image, source, order=1, mode="nearest").astype(image.dtype)


def make_subject(
    template: np.ndarray,
    affine: np.ndarray,
    rng: np.random.Generator,
    *,
    max_mm: float,
    control_mm: float,
    bias: float,
    bias_control_mm: float,
    noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(subject image, its displacement field `(3, *shape)` in mm) on the template's grid:
    |bias x warped template + complex Gaussian noise| (Rician, like a magnitude MR image)."""
    spacing = geometry.spacing_from_affine(affine)
    u = displacement_field(rng, template.shape, spacing, max_mm, control_mm)
    image = warp(template.astype(np.float64), affine, u) * bias_field(
        rng, template.shape, spacing, bias, bias_control_mm
    )
    sigma = noise * np.percentile(template[template > 0], 95)
    real = image + sigma * rng.standard_normal(image.shape)
    imag = sigma * rng.standard_normal(image.shape)
    return np.hypot(real, imag).astype(np.float32), u


def subject_parameters(n: int, lo_mm: float, hi_mm: float, seed: int) -> list[float]:
    """Each subject's largest displacement, uniform in [lo_mm, hi_mm]."""
    return np.random.default_rng([seed, 0]).uniform(lo_mm, hi_mm, size=n).tolist()


def subject_fields(template: np.ndarray, affine: np.ndarray, settings: dict) -> list[dict[str, Any]]:
    """Every subject of `settings` (deterministic in its seed): name, image, displacement."""
    out = []
    for k, max_mm in enumerate(settings["max_mm"]):
        rng = np.random.default_rng([settings["seed"], 1, k])
        image, u = make_subject(
            template,
            affine,
            rng,
            max_mm=max_mm,
            control_mm=settings["deformation_spacing_mm"],
            bias=settings["bias"],
            bias_control_mm=settings["bias_spacing_mm"],
            noise=settings["noise"],
        )
        out.append({"name": f"subject_{k:02d}", "image": image, "displacement": u})
    return out


# ------------------------------------------------------------------------------------------------
# Ground truth.


def anatomical_positions(centres_mm: np.ndarray, affine: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """x + u(x) at subject world positions `centres_mm (n, 3)`: where in the template the anatomy
    at each point comes from (u trilinearly interpolated on the grid of `affine`)."""
    index = geometry.world_to_voxel(centres_mm, affine).T
    u = np.stack([ndimage.map_coordinates(c, index, order=1, mode="nearest") for c in displacement], -1)
    return np.asarray(centres_mm, np.float64) + u


# ------------------------------------------------------------------------------------------------
# Data folder.


def load_template() -> tuple[np.ndarray, np.ndarray]:
    from nilearn.datasets import load_mni152_template  # Ships the file: nothing is downloaded.

    img = load_mni152_template(resolution=2)
    return np.asarray(img.dataobj, np.float32), np.asarray(img.affine, np.float64)


def prepare_folder(workdir: str, settings: dict, template, affine, subjects) -> str:
    """Writes the NIfTI files and prepares them (once per settings); returns the prepared dir."""
    from isimed.data import prepare

    raw, out = os.path.join(workdir, "raw"), os.path.join(workdir, "prepared")
    settings_path = os.path.join(workdir, "subjects.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            old = json.load(f)
        if old != settings:
            raise ValueError(
                f"{settings_path}: this workdir holds subjects made with other settings "
                f"({old}); use another --workdir"
            )
    os.makedirs(raw, exist_ok=True)
    images = {name: template for name in TEMPLATE_CASES.values()}
    images.update({s["name"]: s["image"] for s in subjects})
    for name, image in images.items():
        path = os.path.join(raw, name + ".nii.gz")
        if not os.path.exists(path):
            nib.save(nib.Nifti1Image(image, affine), path + ".tmp.nii.gz")
            os.replace(path + ".tmp.nii.gz", path)
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=1)
    splits = {split: [name] for split, name in TEMPLATE_CASES.items()}
    splits["test"] = [s["name"] for s in subjects]
    prepare.prepare(
        "glob",
        raw,
        out,
        options={"image_pattern": "*.nii.gz"},
        intensity="mri",
        crop_foreground=True,
        splits=splits,
        progress=False,
    )
    return out


# ------------------------------------------------------------------------------------------------
# Pretraining and evaluation.


def pretrain(data_dir: str, workdir: str, steps: int, rotate_deg: float = 0.0) -> dict[str, Any]:
    """The folder demo preset on the template (`rotate_deg`: its crops rotated about their
    centres, `data.rotate_deg`); reuses a finished run. Returns its timing."""
    from configs import isimed_folder
    from isimed import train

    run_dir = os.path.join(workdir, "pretrain")
    timing_path = os.path.join(run_dir, "timing.json")
    config = isimed_folder.get_config("demo")
    config.data.dir = os.path.abspath(data_dir)
    if steps:
        config.total_steps = steps
    config.data.rotate_deg = rotate_deg
    recipe = config.to_json_best_effort(sort_keys=True)
    if os.path.exists(timing_path):
        with open(timing_path) as f:
            timing = json.load(f)
        # Only a run of this very config: a recipe change with the same step count retrains.
        if timing.get("config") == recipe:
            print(f"reusing the pretraining in {run_dir}", flush=True)
            return timing
        if workdir_layout.Workdir(run_dir).checkpoints.exists():
            raise ValueError(f"{run_dir}: holds a pretraining of another config; use another --workdir")
    start = time.time()
    experiments.finished(train.train_and_evaluate(config, run_dir), run_dir)
    seconds = time.time() - start
    timing = {
        "steps": config.total_steps,
        "pretrain_s": round(seconds, 1),  # Compilation, evaluations and checkpoints included.
        "s_per_step": round(seconds / config.total_steps, 3),
        "train_s_per_step": _train_s_per_step(run_dir, config),
        "load_after": _load(),
        "commit": _commit(),
        "config": recipe,
    }
    with open(timing_path, "w") as f:
        json.dump(timing, f)
    return timing


def _train_s_per_step(run_dir: str, config) -> float:
    """Median seconds per training step over the logged intervals after the first (which holds
    the compilation), from metrics.jsonl's crops_per_s."""
    from isimed.evaluation import metrics_log

    _, crops_per_s = metrics_log.read_metrics(workdir_layout.Workdir(run_dir).metrics)["train/crops_per_s"]
    crops_per_step = config.data.images_per_batch * config.data.crops_per_image
    rates = crops_per_s[1:] if len(crops_per_s) > 1 else crops_per_s
    return round(float(np.median(crops_per_step / rates)), 3)


def _commit() -> str:
    """HEAD's short hash, "+modified" when the code it trained with differs from it."""

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--", "isimed", "configs")
        return git("rev-parse", "--short", "HEAD") + ("+modified" if dirty else "")
    except OSError:
        return "n/a"


def _load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "n/a"


def evaluate(
    pretrain_dir: str,
    subjects: list[dict],
    affine: np.ndarray,
    *,
    probe_crops: int,
    test_crops: int,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Position-probe MAE (per axis, mean; subjects also against the anatomical ground truth) and
    distance Spearman of every feature set on the template and on the subjects. `data_dir`: a
    prepared folder of other `subjects` (default: the one the run was pretrained on)."""
    from isimed.evaluation import features
    from isimed.evaluation import metrics
    from isimed.evaluation import probes

    config, embeds, state = features.load_embed_fns(pretrain_dir)
    if data_dir is not None:
        config.data.dir = os.path.abspath(data_dir)
    fit = features.collect(
        config,
        "train",
        embeds,
        max_images=1,
        crops_per_image=probe_crops,
        with_crops=True,
        seed=PROBE_SEED,
    )
    tests = {
        "template": features.collect(
            config,
            "validation",
            embeds,
            max_images=1,
            crops_per_image=test_crops,
            with_crops=True,
            seed=TEST_SEED,
        ),
        "subjects": features.collect(
            config,
            "test",
            embeds,
            max_images=len(subjects),
            crops_per_image=test_crops,
            with_crops=True,
            seed=TEST_SEED,
        ),
    }
    # Ground truth 2: the template position of the anatomy at each subject crop centre.
    # Record ids index the split's cases in prepared.json's plan.
    with open(os.path.join(config.data.dir, "prepared.json")) as f:
        plan = json.load(f)["plan"]["test"]
    by_name = {s["name"]: s["displacement"] for s in subjects}
    held = tests["subjects"]
    held["anatomical"] = np.stack(
        [
            anatomical_positions(c, affine, by_name[plan[int(i)]])
            for c, i in zip(held["centres"], held["image_id"])
        ]
    )
    flat = features.flatten
    rows: dict[str, dict] = {}
    for test_name, test in tests.items():
        for name in ("pretrained", "random_init", "raw_intensity", "mean"):
            row = _row(name, fit, test, flat, probes, metrics)
            rows[f"{test_name}/{name}"] = row
    return {"step": int(state["step"]), "rows": rows}


def _features(name: str, data: dict) -> np.ndarray:
    """`(B, K, D)` features of one feature set."""
    if name in ("pretrained", "random_init"):
        return data["embeddings"][name]
    crops = data["crops"]
    if name == "raw_intensity":
        return crops.reshape(*crops.shape[:2], -1)
    return np.zeros((*crops.shape[:2], 1))  # Constant features: the probe predicts the mean.


def _row(name: str, fit: dict, test: dict, flat, probes, metrics) -> dict[str, Any]:
    x_fit, x_test = flat(_features(name, fit)), flat(_features(name, test))
    probe = probes.position_probe(x_fit, flat(fit["centres"]), x_test, flat(test["centres"]))
    row = {"mae_mm": probe["mae_mm"], "mae_mm_per_axis": probe["mae_mm_per_axis"], "alpha": probe["alpha"]}
    if "anatomical" in test:
        anat = probes.position_probe(x_fit, flat(fit["centres"]), x_test, flat(test["anatomical"]))
        row["mae_mm_anatomical"] = anat["mae_mm"]
    if name != "mean":
        z = _features(name, test)
        for pairs in ("within", "all"):
            row[f"spearman_{pairs}"] = metrics.distance_spearman(z, test["centres"], pairs)
    return row


def format_table(result: dict[str, Any]) -> str:
    t = result["timing"]
    lines = [
        f"Position transfer, MNI152 2 mm: folder demo preset, {t['steps']} steps, "
        f"{t['pretrain_s']:.0f} s in all ({t['s_per_step']:.2f} s/step; training steps alone "
        f"{t['train_s_per_step']:.2f} s/step); `uptime` after: {t['load_after']}",
        "",
        "| test | features | MAE x | MAE y | MAE z | MAE mean | MAE anat | Spearman within | Spearman all |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in result["rows"].items():
        test, name = key.split("/")
        cells = [f"{v:.1f}" for v in row["mae_mm_per_axis"]] + [f"{row['mae_mm']:.1f}"]
        cells.append(f"{row['mae_mm_anatomical']:.1f}" if "mae_mm_anatomical" in row else "")
        cells += [f"{row[k]:.3f}" if k in row else "n/a" for k in ("spearman_within", "spearman_all")]
        lines.append(f"| {test} | {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "MAE in mm (RAS axes). Target: pretrained on subjects, MAE mean <= 5 mm and Spearman >= 0.95."
    )
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    workdir = os.path.abspath(os.path.expanduser(FLAGS.workdir))
    os.makedirs(workdir, exist_ok=True)
    lo, hi = (float(v) for v in FLAGS.max_displacement_mm)
    settings = {
        "seed": FLAGS.seed,
        "max_mm": subject_parameters(FLAGS.subjects, lo, hi, FLAGS.seed),
        "deformation_spacing_mm": FLAGS.deformation_spacing_mm,
        "bias": FLAGS.bias,
        "bias_spacing_mm": FLAGS.bias_spacing_mm,
        "noise": FLAGS.noise,
    }
    template, affine = load_template()
    t0 = time.time()
    subjects = subject_fields(template, affine, settings)
    data_dir = prepare_folder(workdir, settings, template, affine, subjects)
    print(f"{len(subjects)} subjects made and prepared in {time.time() - t0:.0f} s", flush=True)
    timing = pretrain(data_dir, workdir, FLAGS.steps, FLAGS.rotate_deg)
    t0 = time.time()
    result = {
        "settings": settings,
        "timing": timing,
        **evaluate(
            os.path.join(workdir, "pretrain"),
            subjects,
            affine,
            probe_crops=FLAGS.probe_crops,
            test_crops=FLAGS.test_crops,
        ),
    }
    result["eval_s"] = round(time.time() - t0, 1)
    table = format_table(result)
    with open(os.path.join(workdir, "position_transfer.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(workdir, "position_transfer.md"), "w") as f:
        f.write(table + "\n")
    print(table)


def _define_flags() -> None:
    """Flags exist only when run as a program: other modules (experiments.compare_methods) define
    the same names, and the tests import both."""
    flags.DEFINE_string("workdir", "workdirs/position_transfer", "Data, pretraining run and the table.")
    flags.DEFINE_integer("subjects", 8, "Deformed test subjects.")
    flags.DEFINE_list("max_displacement_mm", ["2", "4"], "Range of each subject's largest displacement.")
    flags.DEFINE_float("deformation_spacing_mm", 16.0, "Control-point spacing of the deformation.")
    flags.DEFINE_float("bias", 0.2, "Bias field: log-amplitude (0.2: x0.82 .. x1.22).")
    flags.DEFINE_float("bias_spacing_mm", 48.0, "Control-point spacing of the bias field.")
    flags.DEFINE_float("noise", 0.02, "Rician noise sigma, as a share of the 95th intensity percentile.")
    flags.DEFINE_integer("seed", 0, "Seed of the subjects (pretraining uses the preset's seed).")
    flags.DEFINE_integer("steps", 0, "Pretraining steps (0: the demo preset's).")
    flags.DEFINE_float(
        "rotate_deg", 0.0, "Pretraining crops rotated by up to this per axis (data.rotate_deg)."
    )
    flags.DEFINE_integer("probe_crops", 1024, "Template crops the position probe is fitted on.")
    flags.DEFINE_integer("test_crops", 256, "Crops per test image.")


if __name__ == "__main__":
    from isimed import runtime

    runtime.tune_malloc_for_cpu()  # As main.py does: before JAX starts (it pretrains here).
    _define_flags()
    app.run(main)

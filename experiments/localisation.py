"""One-shot localisation on real MRI with known truth: ISImed matching against the identity and
SimpleITK registration.

python -m experiments.localisation [--subjects=3] [--point_spacing_mm=30] [--sitk]
    [--pretrain_workdir=workdirs/position_transfer] [--workdir=workdirs/localisation]

1. Template: nilearn's MNI152 T1 at 2 mm (shipped with nilearn, nothing downloaded).
2. Targets ("subjects"), each made from the template: the smooth deformation (largest
   displacement in [2, 4] mm), bias field and Rician noise of `experiments.position_transfer`,
   plus a rigid motion (rotation up to +-`--max_degrees` per axis, translation up to
   +-`--max_shift_mm` per axis) and a cut field of view (`--cut` share of one axis removed at one
   end), on the template's grid widened by 20 mm per side (room for the motion).
   Subject voxel at world x shows the template's anatomy at phi(x) = y + u(y), y = R x + t.
3. Points: the MNI152 brain mask sampled on a regular `--point_spacing_mm` lattice. A point's
   truth in a subject is phi^-1(p) (y = p - u(y) by fixed-point iteration, then x = R^T (y - t));
   points whose truth falls outside the subject's cut field of view are left out (counted).
4. Methods: `identity` (the same mm in both scans), ISImed variants (`isimed.locate`: plain
   nearest neighbour on the coarse grid, + one-voxel local search, + 6 offset query crops), and
   with `--sitk` SimpleITK (the `[registration]` extra): affine (Mattes MI on 5% of voxels,
   shrink 4 and 2, 100 iterations) then B-spline (6^3 mesh, LBFGSB 30 iterations, shrink 2 and
   1), template as the fixed image, so its transform maps template points into the subject.
   Light settings: with 3 affine levels, 200 + 60 iterations and 10% sampling, one subject
   took ~24 min in all on 2 busy cores, most of it SimpleITK (0.8 mm MRE on 244 points).
5. The encoder: the folder `demo` preset pretrained on the template by the position-transfer
   experiment (`--pretrain_workdir`: reused when finished there, trained there otherwise).

Reports the radial error (MRE, median, 90th percentile, share within 5 and 10 mm) over all kept
points of all subjects, seconds to embed a volume and per point (the match alone, embeddings
given), wall time of SimpleITK per subject, and `uptime` before and after (other processes on
the machine inflate every time). Writes localisation.json and localisation.md into --workdir.
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
from absl import logging
from scipy import ndimage

from experiments import position_transfer as pt
from isimed import geometry

FLAGS = flags.FLAGS
PAD_MM = 20.0
# (name, offset_mm, refine, align rounds): what `isimed.locate` can do, simplest first. Also run
# (README numbers): 8 and 16 mm offsets, within 0.3 mm of 12 mm.
VARIANTS = (
    ("isimed nearest, coarse", 0.0, False, 0),
    ("isimed nearest + local search", 0.0, True, 0),
    ("isimed 7 crops (12 mm) + local search", 12.0, True, 0),
    ("isimed pose aligned (3 rounds), 7 crops (12 mm) + local search", 12.0, True, 3),
)


# ------------------------------------------------------------------------------------------------
# Subjects with known truth.


def _sample(
    volume: np.ndarray, affine: np.ndarray, world: np.ndarray, order: int = 1, cval=0.0
) -> np.ndarray:
    index = geometry.world_to_voxel(world, affine).T
    return ndimage.map_coordinates(volume, index, order=order, mode="constant", cval=cval)


def _displacement_at(u: np.ndarray, affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    index = geometry.world_to_voxel(world, affine).T
    return np.stack([ndimage.map_coordinates(c, index, order=1, mode="nearest") for c in u], -1)


def make_subject(template: np.ndarray, affine: np.ndarray, k: int, settings: dict) -> dict[str, Any]:
    """Subject k: image and affine (its own cut grid) and the transform's parts (R, t, u)."""
    rng = np.random.default_rng([settings["seed"], 2, k])
    spacing = geometry.spacing_from_affine(affine)
    max_mm = rng.uniform(*settings["deformation_mm"])
    u = pt.displacement_field(rng, template.shape, spacing, max_mm, settings["deformation_spacing_mm"])
    degrees = rng.uniform(-settings["max_degrees"], settings["max_degrees"], 3)
    r = geometry.rotation(degrees)
    t = rng.uniform(-settings["max_shift_mm"], settings["max_shift_mm"], 3)
    pad = int(round(PAD_MM / spacing[0]))
    shape = np.asarray(template.shape) + 2 * pad
    grid_affine = affine.copy()
    grid_affine[:3, 3] = geometry.voxel_to_world(-pad * np.ones(3), affine)
    # The cut: a share of one axis removed at one end.
    axis, end = int(rng.integers(3)), int(rng.integers(2))
    cut = int(round(rng.uniform(*settings["cut"]) * shape[axis]))
    lo = np.zeros(3, int)
    hi = shape.copy()
    if end == 0:
        lo[axis] = cut
    else:
        hi[axis] -= cut
    sub_affine = grid_affine.copy()
    sub_affine[:3, 3] = geometry.voxel_to_world(lo.astype(float), grid_affine)
    sub_shape = tuple(int(v) for v in hi - lo)
    index = np.stack(np.meshgrid(*map(np.arange, sub_shape), indexing="ij"), -1).reshape(-1, 3)
    x = geometry.voxel_to_world(index, sub_affine)
    y = x @ r.T + t
    p = y + _displacement_at(u, affine, y)
    image = _sample(template.astype(np.float64), affine, p).reshape(sub_shape)
    image *= pt.bias_field(rng, sub_shape, spacing, settings["bias"], settings["bias_spacing_mm"])
    sigma = settings["noise"] * np.percentile(template[template > 0], 95)
    image = np.hypot(image + sigma * rng.standard_normal(sub_shape), sigma * rng.standard_normal(sub_shape))
    return {
        "name": f"subject_{k:02d}",
        "image": image.astype(np.float32),
        "affine": sub_affine,
        "rotation": r,
        "degrees": degrees.round(2).tolist(),
        "shift_mm": t.round(2).tolist(),
        "max_deformation_mm": round(float(max_mm), 2),
        "cut": {"axis": axis, "end": "low" if end == 0 else "high", "voxels": cut},
        "u": u,
    }


def truth(points: np.ndarray, subject: dict, affine: np.ndarray) -> np.ndarray:
    """Where template points lie in the subject: phi^-1 (see the module docstring)."""
    y = points.copy()
    for _ in range(30):  # |grad u| < 1: a contraction; 30 steps reach far below a voxel.
        y = points - _displacement_at(subject["u"], affine, y)
    return (y - subject_translation(subject)) @ subject["rotation"]


def subject_translation(subject: dict) -> np.ndarray:
    return np.asarray(subject["shift_mm"], np.float64)


def inside(points: np.ndarray, shape, affine: np.ndarray, margin: float = 0.0) -> np.ndarray:
    index = geometry.world_to_voxel(points, affine)
    return np.all((index >= margin - 0.5) & (index <= np.asarray(shape) - 0.5 - margin), axis=1)


def brain_points(spacing_mm: float) -> np.ndarray:
    """The MNI152 brain mask on a regular lattice (world mm)."""
    from nilearn.datasets import load_mni152_brain_mask

    img = load_mni152_brain_mask(resolution=2)
    mask = np.asarray(img.dataobj) > 0
    step = int(round(spacing_mm / geometry.spacing_from_affine(img.affine)[0]))
    index = np.argwhere(mask)
    lo = index.min(0) + (np.ptp(index, 0) % step) // 2
    keep = np.all((index - lo) % step == 0, axis=1)
    return geometry.voxel_to_world(index[keep], img.affine)


# ------------------------------------------------------------------------------------------------
# SimpleITK.


def sitk_register(template, template_affine, subject, subject_affine, points: np.ndarray) -> np.ndarray:
    """Template points mapped into the subject by SimpleITK affine + B-spline registration."""
    import SimpleITK as sitk  # The [registration] extra.

    lps = np.diag([-1.0, -1.0, 1.0])

    def image(a, affine):
        out = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(a, np.float32).transpose(2, 1, 0)))
        spacing = geometry.spacing_from_affine(affine)
        out.SetSpacing(spacing.tolist())
        out.SetOrigin((lps @ affine[:3, 3]).tolist())
        out.SetDirection((lps @ affine[:3, :3] / spacing).ravel().tolist())
        return out

    fixed, moving = image(template, template_affine), image(subject, subject_affine)
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    reg = _sitk_method(sitk, (4, 2), (2.0, 1.0))
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 100, relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(init, inPlace=False)
    affine_tx = reg.Execute(fixed, moving)
    bspline = sitk.BSplineTransformInitializer(fixed, [6, 6, 6])
    reg = _sitk_method(sitk, (2, 1), (1.0, 0.0))
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=30)
    reg.SetMovingInitialTransform(affine_tx)
    reg.SetInitialTransform(bspline, inPlace=True)
    reg.Execute(fixed, moving)
    # Fixed (template) -> moving (subject): the B-spline first, then the affine.
    composite = sitk.CompositeTransform([affine_tx, bspline])
    out = [composite.TransformPoint((lps @ p).tolist()) for p in points]
    return np.asarray(out) @ lps


def _sitk_method(sitk, shrink, sigmas):
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.05, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


# ------------------------------------------------------------------------------------------------
# Run.


def errors_summary(errors: np.ndarray) -> dict[str, float]:
    return {
        "mre_mm": round(float(np.mean(errors)), 2),
        "median_mm": round(float(np.median(errors)), 2),
        "p90_mm": round(float(np.percentile(errors, 90)), 2),
        "within_5mm": round(float(np.mean(errors <= 5.0)), 3),
        "within_10mm": round(float(np.mean(errors <= 10.0)), 3),
    }


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "n/a"


def encoder_workdir(pretrain_workdir: str) -> str:
    """The position-transfer experiment's pretraining (its default subjects), reused or trained."""
    settings = {
        "seed": 0,
        "max_mm": pt.subject_parameters(8, 2.0, 4.0, 0),
        "deformation_spacing_mm": 16.0,
        "bias": 0.2,
        "bias_spacing_mm": 48.0,
        "noise": 0.02,
    }
    template, affine = pt.load_template()
    subjects = pt.subject_fields(template, affine, settings)
    data_dir = pt.prepare_folder(pretrain_workdir, settings, template, affine, subjects)
    pt.pretrain(data_dir, pretrain_workdir, 0)
    return os.path.join(pretrain_workdir, "pretrain")


def run(workdir: str, settings: dict, *, pretrain_workdir: str, stride: int, with_sitk: bool) -> dict:
    from isimed import locate

    os.makedirs(os.path.join(workdir, "raw"), exist_ok=True)
    result: dict[str, Any] = {"settings": settings, "stride": stride, "load_before": _uptime()}
    encoder_dir = os.path.abspath(pretrain_workdir)
    if not os.path.isdir(os.path.join(encoder_dir, "pretrain", "checkpoints")):
        encoder_workdir(encoder_dir)
    locator = locate.load_locator(os.path.join(encoder_dir, "pretrain"))
    result["encoder"] = locator.name
    template, affine = pt.load_template()
    points = brain_points(settings["point_spacing_mm"])
    paths = {"template": os.path.join(workdir, "raw", "template.nii.gz")}
    nib.save(nib.Nifti1Image(template, affine), paths["template"])
    subjects = [make_subject(template, affine, k, settings) for k in range(settings["subjects"])]
    for s in subjects:
        paths[s["name"]] = os.path.join(workdir, "raw", s["name"] + ".nii.gz")
        nib.save(nib.Nifti1Image(s["image"], s["affine"]), paths[s["name"]])

    def embedded(name):
        start = time.time()
        g = locate.embed_volume(locator, *locate.read_volume(paths[name], locator), stride=stride)
        return g, time.time() - start, len(g.starts)

    warm, _, _ = embedded("template")  # Compiles the encoder: not timed.
    template_grid, template_s, template_crops = embedded("template")
    embed_s, embed_crops = [template_s], [template_crops]
    errors: dict[str, list[np.ndarray]] = {"identity": []}
    match_s: dict[str, float] = {}
    kept_points, dropped = 0, 0
    sitk_s = []
    align_s: dict[str, list[float]] = {}
    per_subject = []
    for s in subjects:
        target, seconds, crops = embedded(s["name"])
        embed_s.append(seconds)
        embed_crops.append(crops)
        true = truth(points, s, affine)
        keep = inside(true, s["image"].shape, s["affine"])
        kept_points += int(keep.sum())
        dropped += int((~keep).sum())
        p, t = points[keep], true[keep]
        errors["identity"].append(np.linalg.norm(p - t, axis=1))
        row = {k: v for k, v in s.items() if k not in ("image", "affine", "rotation", "u")}
        aligned = {}
        for name, offset_mm, refine, rounds in VARIANTS:
            target.extra.clear()  # Every variant pays for its own fine crops.
            template_grid.extra.clear()
            if rounds and rounds not in aligned:
                start = time.time()
                aligned[rounds] = locate.align(template_grid, target, locator, rounds=rounds)
                align_s.setdefault(name, []).append(time.time() - start)
            start = time.time()
            if rounds:
                grid, pose = aligned[rounds]
                found, score = locate.match(
                    p, template_grid, grid, locator, offset_mm=offset_mm, refine=refine
                )
                found = locate.apply_pose(found, pose)
            else:
                found, score = locate.match(
                    p, template_grid, target, locator, offset_mm=offset_mm, refine=refine
                )
            match_s[name] = match_s.get(name, 0.0) + time.time() - start
            e = np.linalg.norm(found - t, axis=1)
            errors.setdefault(name, []).append(e)
            row[name] = errors_summary(e)
            if offset_mm == 12.0:  # Does the score rank the errors?
                row[name]["score_error_spearman"] = round(float(_spearman(score, e)), 3)
        if with_sitk:
            start = time.time()
            found = sitk_register(template, affine, s["image"], s["affine"], p)
            sitk_s.append(time.time() - start)
            row["sitk_s"] = round(sitk_s[-1], 1)
            e = np.linalg.norm(found - t, axis=1)
            errors.setdefault("SimpleITK affine + B-spline", []).append(e)
            row["SimpleITK affine + B-spline"] = errors_summary(e)
        per_subject.append(row)
        print(json.dumps(row), flush=True)
    result["rows"] = {name: errors_summary(np.concatenate(e)) for name, e in errors.items()}
    for name, seconds in match_s.items():
        result["rows"][name]["s_per_point"] = round(seconds / kept_points, 3)
    for name, seconds in align_s.items():  # Aligning a target: embeddings included.
        result["rows"][name]["s_per_subject"] = round(float(np.mean(seconds)), 1)
    if sitk_s:
        result["rows"]["SimpleITK affine + B-spline"]["s_per_subject"] = round(float(np.mean(sitk_s)), 1)
    result.update(
        points=len(points),
        points_kept=kept_points,
        points_outside_fov=dropped,
        embed_s_per_volume=round(float(np.mean(embed_s)), 1),
        embed_s_template=round(template_s, 1),
        crops_per_volume=int(np.mean(embed_crops)),
        subjects=per_subject,
        load_after=_uptime(),
    )
    return result


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import stats

    return float(stats.spearmanr(a, b).statistic)


def format_table(result: dict) -> str:
    st = result["settings"]
    lines = [
        f"Localisation, MNI152 2 mm template -> {st['subjects']} subjects (deformation "
        f"{st['deformation_mm'][0]:g}-{st['deformation_mm'][1]:g} mm, rotation <= "
        f"{st['max_degrees']:g} deg and shift <= {st['max_shift_mm']:g} mm per axis, "
        f"{st['cut'][0]:.0%}-{st['cut'][1]:.0%} of one axis cut, bias, noise); "
        f"{result['points_kept']} point pairs ({result['points']} brain points every "
        f"{st['point_spacing_mm']:g} mm; {result['points_outside_fov']} outside a cut field of "
        "view left out)",
        "",
        "| method | MRE mm | median | p90 | <= 5 mm | <= 10 mm | s per point | s per subject |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        per_point = f"{r['s_per_point']:.3f}" if "s_per_point" in r else ""
        per_subject = f"{r['s_per_subject']:.0f}" if "s_per_subject" in r else ""
        lines.append(
            f"| {name} | {r['mre_mm']:.1f} | {r['median_mm']:.1f} | {r['p90_mm']:.1f} | "
            f"{r['within_5mm']:.0%} | {r['within_10mm']:.0%} | {per_point} | {per_subject} |"
        )
    lines += [
        "",
        f"ISImed: encoder {result['encoder']}, coarse grid stride {result['stride']} voxels; embedding "
        f"a volume {result['embed_s_per_volume']:.1f} s on average ({result['crops_per_volume']} crops; "
        f"the template {result['embed_s_template']:.1f} s), once per scan; s per point is the match "
        "alone; s per subject: pose alignment of a target (its embeddings included) and SimpleITK "
        "(everything).",
        f"`uptime` before: {result['load_before']}",
        f"`uptime` after: {result['load_after']}",
    ]
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax's restore lines would bury the table.
    workdir = os.path.abspath(os.path.expanduser(FLAGS.workdir))
    settings = {
        "seed": FLAGS.seed,
        "subjects": FLAGS.subjects,
        "deformation_mm": [2.0, 4.0],
        "deformation_spacing_mm": 16.0,
        "bias": 0.2,
        "bias_spacing_mm": 48.0,
        "noise": 0.02,
        "max_degrees": FLAGS.max_degrees,
        "max_shift_mm": FLAGS.max_shift_mm,
        "cut": [float(v) for v in FLAGS.cut],
        "point_spacing_mm": FLAGS.point_spacing_mm,
    }
    result = run(
        workdir,
        settings,
        pretrain_workdir=os.path.expanduser(FLAGS.pretrain_workdir),
        stride=FLAGS.stride,
        with_sitk=FLAGS.sitk,
    )
    table = format_table(result)
    with open(os.path.join(workdir, "localisation.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(workdir, "localisation.md"), "w") as f:
        f.write(table + "\n")
    print(table)


def _define_flags() -> None:
    flags.DEFINE_string("workdir", "workdirs/localisation", "Subjects written here, and the table.")
    flags.DEFINE_string(
        "pretrain_workdir", "workdirs/position_transfer", "The position-transfer experiment's workdir."
    )
    flags.DEFINE_integer("subjects", 3, "Target subjects.")
    flags.DEFINE_float("max_degrees", 10.0, "Largest rotation about each axis.")
    flags.DEFINE_float("max_shift_mm", 20.0, "Largest translation along each axis.")
    flags.DEFINE_list("cut", ["0.1", "0.25"], "Range of the share of one axis cut away.")
    flags.DEFINE_float("point_spacing_mm", 30.0, "Lattice spacing of the brain points (68 points).")
    flags.DEFINE_integer("stride", 3, "Coarse grid stride in voxels.")
    flags.DEFINE_boolean("sitk", True, "Also SimpleITK registration (pip install -e '.[registration]').")
    flags.DEFINE_integer("seed", 0, "Seed of the subjects.")


if __name__ == "__main__":
    from isimed import runtime

    runtime.tune_malloc_for_cpu()  # It may pretrain (as main.py does: before JAX starts).
    _define_flags()
    app.run(main)

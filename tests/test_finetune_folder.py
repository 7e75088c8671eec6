"""Fine-tuning on a prepared folder, end to end: synthetic CT volumes with lesion masks written as
NIfTI (nibabel) and as NRRD (pynrrd, LPS), prepared by `isimed.data.prepare` into
train/validation/test splits that each hold both formats, pretrained with
`configs/isimed_folder.py:test` for a few steps, then fine-tuned (full mode, a label fraction)
with `configs/finetune_chest.py:test`, whose data set comes from the pretraining checkpoint."""

import json

import nibabel as nib
import nrrd
import numpy as np
import pytest

from configs import finetune_chest
from configs import isimed_folder
from isimed import finetune
from isimed import train
from isimed.data import prepare
from isimed.data import prepared
from isimed.data import readers

SHAPE = (24, 20, 16)
SPACING = 2.0  # mm
# Explicit splits, both formats in each: n* are NIfTI cases, r* NRRD cases.
SPLITS = {
    "train": ["n0/image", "n1/image", "r0/image", "r1/image"],
    "validation": ["n2/image", "r2/image"],
    "test": ["n3/image", "r3/image"],
}


def _volume(i: int) -> tuple[np.ndarray, np.ndarray]:
    """`(image HU int16, lesion mask uint8)`: an ellipsoidal body (about 40 HU, an intensity
    ramp and noise) in air (-1000 HU), with a bright spherical lesion at a case-dependent place."""
    rng = np.random.default_rng(i)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"), -1)
    centre = (np.asarray(SHAPE) - 1) / 2
    body = np.sum(((index - centre) / (np.asarray(SHAPE) * 0.45)) ** 2, -1) < 1
    image = np.full(SHAPE, -1000.0)
    image[body] = 40.0 + 8.0 * index[body][:, 0] + rng.normal(0, 15, int(body.sum()))
    lesion_centre = centre + np.array([4.0 - (i % 3) * 3, 3.0 - (i % 2) * 5, (i % 3) - 1.0])
    mask = np.sum((index - lesion_centre) ** 2, -1) <= 3.0**2
    image[mask] += 400.0
    return image.astype(np.int16), mask.astype(np.uint8)


def _affine(i: int) -> np.ndarray:
    """RAS+ affine: 2 mm isotropic voxels, a case-dependent origin."""
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = [-20.0 + i, 15.0 - 2 * i, -30.0 + 3 * i]
    return affine


def _write_nifti(folder, image, mask, affine):
    nib.save(nib.Nifti1Image(image, affine), str(folder / "image.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), str(folder / "mask.nii.gz"))


def _write_nrrd(folder, image, mask, affine):
    lps = readers.LPS_TO_RAS @ affine  # NRRD files are commonly LPS; the reader converts.
    header = {"space": "LPS", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]}
    nrrd.write(str(folder / "image.nrrd"), image, header)
    nrrd.write(str(folder / "mask.nrrd"), mask, header)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(prepared folder, manifest, {case id: mask voxel count})."""
    root = tmp_path_factory.mktemp("raw")
    lesion_voxels = {}
    for split_cases in SPLITS.values():
        for case_id in split_cases:
            name = case_id.split("/")[0]
            i = int(name[1:]) + (10 if name[0] == "r" else 0)
            image, mask = _volume(i)
            (root / name).mkdir()
            (_write_nifti if name[0] == "n" else _write_nrrd)(root / name, image, mask, _affine(i))
            lesion_voxels[case_id] = int(mask.sum())
    out = str(tmp_path_factory.mktemp("prepared") / "out")
    manifest = prepare.prepare(
        "glob",
        str(root),
        out,
        options={"image_pattern": "*/image.*", "mask_pattern": "{parent}/mask.*", "require_mask": True},
        intensity="ct",
        splits=SPLITS,
        progress=False,
    )
    return out, manifest, lesion_voxels


@pytest.fixture(scope="module")
def pretrained_on_folder(folder, tmp_path_factory):
    config = isimed_folder.get_config("test")
    config.data.dir = folder[0]
    config.data.images_per_batch = 2
    config.total_steps = 4
    config.log_every = 2
    config.eval_every = config.checkpoint_every = 4
    config.eval.crops_per_image = 8
    config.eval.max_images = 2
    config.eval.probe_train_images = 4
    workdir = str(tmp_path_factory.mktemp("pretrain_folder"))
    train.train_and_evaluate(config, workdir)
    return workdir


def test_folder_of_nifti_and_nrrd_is_prepared_with_its_masks(folder):
    out, manifest, lesion_voxels = folder
    assert manifest["status"] == "complete" and manifest["has_mask"]
    assert manifest["counts"] == {split: len(cases) for split, cases in SPLITS.items()}
    for split, cases in SPLITS.items():
        source = prepared.data_source(out, split)
        records = [source[i] for i in range(len(source))]
        assert [r["case_id"] for r in records] == cases
        for record in records:  # Every case's mask survives preparation (same grid: no resampling).
            assert int(np.sum(record["mask"] > 0)) == lesion_voxels[record["case_id"]] > 0


def test_finetune_full_on_a_prepared_folder(folder, pretrained_on_folder, tmp_path):
    config = finetune_chest.get_config("test,mode=full,fraction=0.5")
    config.pretrain_workdir = pretrained_on_folder
    config.total_steps = 10
    config.eval_every = config.checkpoint_every = 5
    results = finetune.finetune(config, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == results

    # The pretraining checkpoint's data set was used: the prepared folder's splits.
    resolved = finetune.resolve_config(config)[0]
    assert resolved.data.name == "prepared" and resolved.data.dir == folder[0]
    n_train = len(SPLITS["train"])
    assert results["train_subjects_available"] == n_train
    assert results["train_subjects"] == round(0.5 * n_train)
    train_ids = finetune.split_ids(resolved.data, "train")
    assert set(results["train_subject_ids"]) < set(train_ids)
    assert results["validation_subjects"] == len(SPLITS["validation"])
    assert results["test_subjects"] == len(SPLITS["test"])

    # The held-out crops the run scored (fixed: the same crops every call) hold lesion crops and
    # crops without lesion, from every held-out subject.
    for split in ("validation", "test"):
        held = finetune.fixed_crops(resolved, split)
        assert set(np.unique(held["label"]).tolist()) == {0, 1}, split
        for image_id in np.unique(held["image_id"]):
            assert held["label"][held["image_id"] == image_id].any(), (split, image_id)

    assert results["final_step"] == 10
    assert [s for s, _ in results["validation_curve"]] == [0, 5, 10]
    assert np.isfinite(results["test_auc"]) and 0.0 <= results["test_auc"] <= 1.0
    assert results["selected_step"] in (0, 5, 10)

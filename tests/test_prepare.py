"""Preparing real data into array_record and reading it back (isimed.data.prepare / prepared).

Real image: nilearn's MNI152 template (shipped with nilearn, nothing downloaded), written as a
BraTS-style folder whose cases differ by shifts and flips of the affine, with synthetic tumour
masks at known world positions.
"""

import errno
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time

import ml_collections
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from isimed import geometry
from isimed.data import pipeline
from isimed.data import prepare
from isimed.data import prepared

NUM_CASES = 8
# Explicit split lists: 3 train, 1 validation, 4 test (linear evaluation needs folds + 1 = 4).
SPLITS = {
    "train": [f"BraTS2021_{i:05d}" for i in (0, 1, 2)],
    "validation": ["BraTS2021_00003"],
    "test": [f"BraTS2021_{i:05d}" for i in (4, 5, 6, 7)],
}


def _case_geometry(template_affine, shape, i):
    """(flip axis 0?, affine): odd cases store the array flipped (same world), all are shifted."""
    affine = np.array(template_affine, np.float64)
    if i % 2:
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1.0, shape[0] - 1
        affine = affine @ flip
    affine[:3, 3] += [3.0 * i, -2.0 * i, 1.5 * i]  # Subjects are not perfectly registered.
    return affine


def _tumour_mask(shape, affine, centre_mm, radius_mm=12.0):
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = geometry.voxel_to_world(index, affine)
    return (np.linalg.norm(world - centre_mm, axis=-1) < radius_mm).astype(np.uint8) * 2


@pytest.fixture(scope="module")
def brats_raw(tmp_path_factory):
    from nilearn.datasets import load_mni152_template

    template = load_mni152_template(resolution=2)
    data = (np.asarray(template.dataobj) * 1000).astype(np.int16)
    root = tmp_path_factory.mktemp("brats_raw")
    for i in range(NUM_CASES):
        name = f"BraTS2021_{i:05d}"
        affine = _case_geometry(template.affine, data.shape, i)
        image = data[::-1] if i % 2 else data
        centre = np.array([20.0 + 2 * i, -10.0, 15.0])  # World mm, inside the brain.
        os.makedirs(root / name)
        nib.save(nib.Nifti1Image(image, affine), str(root / name / f"{name}_t1.nii.gz"))
        nib.save(
            nib.Nifti1Image(_tumour_mask(data.shape, affine, centre), affine),
            str(root / name / f"{name}_seg.nii.gz"),
        )
    return str(root)


@pytest.fixture(scope="module")
def brats_prepared(brats_raw, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("brats_prepared") / "out")
    manifest = prepare.prepare(
        "brats", brats_raw, out, spacing=4.0, crop_foreground=True, splits=SPLITS, progress=False
    )
    return out, manifest


def test_brats_prepared_keeps_world_mm(brats_raw, brats_prepared):
    out, manifest = brats_prepared
    assert manifest["counts"] == {"train": 3, "validation": 1, "test": 4}
    assert manifest["has_mask"] and manifest["spacing"] == [4.0, 4.0, 4.0]
    assert manifest["format_version"] == prepared.FORMAT_VERSION  # Record layout: test_prepared_format.
    source = prepared.data_source(out, "test")
    assert len(source) == 4
    rng = np.random.default_rng(0)
    for index in range(len(source)):
        record = source[index]
        assert record["image"].dtype == np.float32 and record["mask"].dtype == np.uint8
        assert record["id"] == index and record["case_id"] == SPLITS["test"][index]
        np.testing.assert_allclose(geometry.spacing_from_affine(record["affine"]), 4.0)
        assert record["image"].min() >= -1.0 and record["image"].max() <= 1.0
        raw = nib.load(os.path.join(brats_raw, record["case_id"], record["case_id"] + "_t1.nii.gz"))
        raw_image = np.asarray(raw.dataobj).astype(np.float64)
        # bbox: foreground (> min) box in the raw file's indices.
        fg = np.argwhere(raw_image > raw_image.min())
        np.testing.assert_array_equal(record["bbox"], [fg.min(0), fg.max(0) + 1])
        # Any stored voxel shows the raw image at the same world point (linear interpolation).
        lo, hi = np.percentile(raw_image[raw_image > raw_image.min()], (5, 95))
        u = rng.integers(0, record["image"].shape, size=(50, 3))
        v = geometry.world_to_voxel(geometry.voxel_to_world(u, record["affine"]), raw.affine)
        expected = ndimage.map_coordinates(raw_image, v.T, order=1, mode="nearest")
        expected = np.clip((expected - lo) * 2 / (hi - lo) - 1, -1, 1)
        np.testing.assert_allclose(record["image"][tuple(u.T)], expected, atol=2e-3)
        # The tumour's centroid stays at its world position (to within the 4 mm grid).
        raw_mask = np.asarray(nib.load(raw.get_filename().replace("_t1", "_seg")).dataobj)
        centroid = lambda m, a: geometry.voxel_to_world(np.argwhere(m > 0).mean(0), a)
        np.testing.assert_allclose(
            centroid(record["mask"], record["affine"]), centroid(raw_mask, raw.affine), atol=2.0
        )


def test_process_volume_resample_and_crop_keep_world_positions():
    # An intensity linear in world mm is reproduced exactly by linear interpolation, so each
    # stored voxel must hold the value of its own world position, whatever the grid.
    rng = np.random.default_rng(1)
    direction, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    affine = geometry.affine_from_spacing([0.8, 1.3, 2.5], [10.0, -40.0, 7.0], direction)
    shape = (40, 30, 20)
    world = geometry.voxel_to_world(np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1), affine)
    gradient = np.array([3.0, -2.0, 5.0])
    image = world @ gradient
    offset = -400.0 - image.min()  # Every value in [-400, 1000) HU: above the CT foreground.
    image += offset
    image[:5] = -1000.0  # Air (below the CT foreground threshold): cropped away.
    for spacing, crop in [(None, True), ((1.5, 1.5, 1.5), False), ((2.0, 1.0, 3.0), True)]:
        out = prepare.process_volume(
            image, affine, None, intensity="ct", window=(-1000, 1000), spacing=spacing, crop_foreground=crop
        )
        assert out["image"].dtype == np.float16
        np.testing.assert_array_equal(out["bbox"], [[5, 0, 0], shape])
        index = np.argwhere(np.ones(out["image"].shape, bool))[::7]
        points = geometry.voxel_to_world(index, out["affine"])
        # Voxels interpolated only from non-air source voxels.
        inside = geometry.world_to_voxel(points, affine)[:, 0] >= 5 - 1e-6
        assert inside.mean() > 0.5
        expected = (points @ gradient + offset) / 1000.0
        np.testing.assert_allclose(out["image"][tuple(index.T)][inside], expected[inside], atol=1e-3)
        if crop:  # The first stored voxel is the box's first voxel, at the same world point.
            np.testing.assert_allclose(
                geometry.voxel_to_world([0, 0, 0], out["affine"]), geometry.voxel_to_world([5, 0, 0], affine)
            )


def test_brats_config_trains_and_linear_eval_runs(brats_prepared, tmp_path):
    from configs import isimed_brats
    from configs import linear_eval_brats
    from isimed import train
    from isimed.evaluation import linear_eval

    out, _ = brats_prepared
    config = isimed_brats.get_config("test")
    config.data.dir = out
    config.data.images_per_batch = 2
    config.total_steps = 6
    config.eval_every = 1000
    config.checkpoint_every = 6
    config.eval.crops_per_image = 8
    config.eval.max_images = 4
    config.eval.probe_train_images = 3
    workdir = str(tmp_path / "pretrain")
    summary = train.train_and_evaluate(config, workdir)
    assert np.isfinite(summary["final"]["spearman_within"])

    eval_config = linear_eval_brats.get_config("test")
    eval_config.pretrain_workdir = workdir
    eval_config.probe.epochs = 5
    results = linear_eval.evaluate(eval_config, str(tmp_path / "eval"))
    row = results["feature_sets"]["pretrained"]
    assert results["tasks"]["lesion"] and "lesion_crop" in row and "labels_image" not in row
    assert 0 < results["lesion_crop_share"] < 1
    assert "| n/a |" in linear_eval.format_results(results)  # labels mean AUC: no labels.

    # Evaluated on another folder whose images are thinner than the crops: said before any crop.
    rng = np.random.default_rng(0)
    for name in ("s0", "s1"):
        _write_case(tmp_path / "thin_raw", name, rng.integers(1, 500, size=(12, 10, 7)).astype(np.int16))
    thin = tmp_path / "thin"
    splits = {"train": ["s0"], "test": ["s1"]}
    prepare.prepare("brats", str(tmp_path / "thin_raw"), str(thin), splits=splits, progress=False)
    eval_config.data_dir = str(thin)
    fit = f"{thin}/test/s1.isimed: data.crop_size (8, 8, 8) does not fit in its image of size (12, 10, 7)"
    with pytest.raises(ValueError, match=re.escape(fit)):
        linear_eval.evaluate(eval_config, str(tmp_path / "eval_thin"))


def _medmnist_npz(path, sizes=(12, 5, 8), size=16, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, size=(n, 14), dtype=np.uint8)
    np.savez(path, **arrays)
    return arrays


def test_medmnist_records_carry_labels(tmp_path):
    from configs import isimed_chestmnist

    arrays = _medmnist_npz(tmp_path / "chestmnist_16.npz")
    out = str(tmp_path / "out")
    manifest = prepare.prepare(
        "medmnist", str(tmp_path / "chestmnist_16.npz"), out, spacing=25.0, shard_size=5, progress=False
    )
    assert manifest["counts"] == {"train": 12, "validation": 5, "test": 8}
    assert manifest["label_names"][:2] == ["atelectasis", "cardiomegaly"]
    assert manifest["ndim"] == 2 and len(manifest["splits"]["train"]["files"]) == 3
    source = prepared.data_source(out, "test")
    record = source[6]
    assert record["id"] == 6 and record["image"].shape == (16, 16)
    np.testing.assert_array_equal(record["labels"], arrays["test_labels"][6])
    np.testing.assert_allclose(record["image"], arrays["test_images"][6] / 127.5 - 1, atol=1e-3)
    np.testing.assert_allclose(record["affine"], np.diag([25.0, 25.0, 1.0]))
    assert pickle.loads(pickle.dumps(source))[7]["id"] == 7  # grain workers get a copy.

    config = isimed_chestmnist.get_config("test")
    config.data.dir = out
    batch = next(iter(pipeline.make_dataset(config.data, "train", seed=0, train=True)))
    assert batch["labels"].shape == (config.data.images_per_batch, 14)
    assert batch["crops"].shape[2:] == (8, 8, 1)


def _write_case(root, name, image, affine=np.diag([1.0, 1.0, 1.0, 1.0])):
    os.makedirs(root / name, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), str(root / name / f"{name}_t1.nii.gz"))
    return str(root / name / f"{name}_t1.nii.gz")


@pytest.fixture
def raw_with_bad_files(tmp_path):
    root = tmp_path / "raw"
    rng = np.random.default_rng(0)
    for i in range(3):
        _write_case(root, f"good{i}", rng.integers(1, 500, size=(12, 10, 8)).astype(np.int16))
    truncated = _write_case(root, "truncated", rng.integers(1, 500, size=(12, 10, 8)).astype(np.int16))
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    _write_case(root, "empty", np.zeros((12, 10, 8), np.int16))  # No foreground above the minimum.
    return root


def test_bad_files_skipped_and_listed_or_raise(raw_with_bad_files, tmp_path):
    for bad, problem in [("empty", "no foreground"), ("truncated", "cannot read NIfTI")]:
        with pytest.raises(prepare.PrepareError, match=f"{bad}_t1.nii.gz: {problem}"):
            prepare.prepare(
                "brats",
                str(raw_with_bad_files),
                str(tmp_path / bad),
                splits={"train": ["good0", bad]},
                progress=False,
            )
    manifest = prepare.prepare(
        "brats",
        str(raw_with_bad_files),
        str(tmp_path / "out"),
        skip_bad=True,
        splits={"train": ["empty", "good0", "good1", "truncated"], "test": ["good2"]},
        progress=False,
    )
    assert manifest["report"]["skipped"] == 2 and manifest["report"]["done"] == 3
    reasons = {s["case_id"]: s["reason"] for s in manifest["skipped"]}
    assert "no foreground" in reasons["empty"] and "cannot read NIfTI" in reasons["truncated"]
    assert [e["case_id"] for e in manifest["splits"]["train"]["files"]] == ["good0", "good1"]
    assert [prepared.data_source(str(tmp_path / "out"), "train")[i]["id"] for i in (0, 1)] == [1, 2]
    assert "skipped empty" in prepare.format_report(manifest)


def test_rerun_resumes_and_refuses_other_settings(raw_with_bad_files, tmp_path):
    out = tmp_path / "out"
    kwargs = dict(splits={"train": ["good0", "good1"], "test": ["good2"]}, skip_bad=True, progress=False)
    prepare.prepare("brats", str(raw_with_bad_files), str(out), **kwargs)
    os.remove(out / "train" / "good1.isimed")  # As if interrupted before this volume...
    (out / "train" / ".good1.isimed.tmp").write_bytes(b"half")  # ...while writing it.
    manifest = prepare.prepare("brats", str(raw_with_bad_files), str(out), **kwargs)
    assert (manifest["report"]["done"], manifest["report"]["resumed"]) == (1, 2)
    assert not (out / "train" / ".good1.isimed.tmp").exists()
    assert prepared.data_source(str(out), "train")[1]["case_id"] == "good1"
    with pytest.raises(prepare.PrepareError, match="other settings.*spacing"):
        prepare.prepare("brats", str(raw_with_bad_files), str(out), spacing=2.0, **kwargs)
    storage_diff = r"other settings.*'storage': \('mapped', 'array_record'\)"
    with pytest.raises(prepare.PrepareError, match=storage_diff):
        prepare.prepare("brats", str(raw_with_bad_files), str(out), storage="array_record", **kwargs)
    with pytest.raises(prepare.PrepareError, match="changed"):
        prepare.prepare(
            "brats",
            str(raw_with_bad_files),
            str(out),
            **{**kwargs, "splits": {"train": ["good0"], "test": ["good2"]}},
        )


@pytest.mark.parametrize("storage", ["mapped", "array_record"])
def test_crop_size_checked_against_the_smallest_image_of_each_split(tmp_path, storage, monkeypatch):
    """Exact fit passes; one voxel over on any axis names the smallest file too small and both
    sizes, from the shapes prepare stored in prepared.json (no file opened) or, in a folder
    prepared before it stored them, from each file's first record."""
    root = tmp_path / "raw"
    rng = np.random.default_rng(0)
    for name, shape in [("big", (12, 10, 8)), ("small", (11, 10, 9)), ("wide", (12, 11, 8))]:
        _write_case(root, name, rng.integers(1, 500, size=shape).astype(np.int16))
    out = tmp_path / "out"
    splits = {"train": ["big", "wide"], "test": ["small"]}
    prepare.prepare("brats", str(root), str(out), splits=splits, storage=storage, progress=False)
    suffix = prepared.MAPPED_SUFFIX if storage == "mapped" else ".array_record"
    manifest = json.loads((out / prepared.MANIFEST).read_text())
    assert [e["shape"] for e in manifest["splits"]["train"]["files"]] == [[12, 10, 8], [12, 11, 8]]

    def check_all():
        data = ml_collections.ConfigDict({"name": "prepared", "dir": str(out), "crop_size": (11, 10, 8)})
        pipeline.check_crops_fit(data, ["train", "test"])  # The exact fit on every axis.
        for crop, where, size in [
            ((12, 10, 8), "test/small", (11, 10, 9)),
            ((11, 11, 8), "train/big", (12, 10, 8)),
            ((11, 10, 9), "train/big", (12, 10, 8)),
        ]:
            data.crop_size = crop
            message = f"{out}/{where}{suffix}: data.crop_size {crop} does not fit in its image of size {size}"
            with pytest.raises(ValueError, match=re.escape(message)):
                pipeline.check_crops_fit(data, ["train", "test"])
        data.crop_size = (11, 10)
        rank = r"big\.\w+: data.crop_size \(11, 10\) has 2 axes but the images are 3D"
        with pytest.raises(ValueError, match=rank):
            pipeline.check_crops_fit(data, ["train"])

    with monkeypatch.context() as m:
        m.setattr(prepared, "file_image_shape", None)  # Stored shapes: no file is opened.
        check_all()
    for entry in manifest["splits"]["train"]["files"] + manifest["splits"]["test"]["files"]:
        del entry["shape"]  # As prepared before shapes were stored.
    (out / prepared.MANIFEST).write_text(json.dumps(manifest))
    check_all()


def test_prepare_refuses_an_object_store_out_before_reading_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    advice = r"--out=gs://b/p: prepare writes to a local folder only; .* prepare with --storage=array_record"
    for storage in (None, "array_record"):
        with pytest.raises(prepare.PrepareError, match=advice):
            prepare.prepare("brats", str(tmp_path / "raw"), "gs://b/p", storage=storage, progress=False)
    assert os.listdir(tmp_path) == []  # No local folder named "gs:".


def test_data_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepared.json"):
        prepared.data_source(str(tmp_path), "train")
    _medmnist_npz(tmp_path / "chestmnist_16.npz", sizes=(3, 0, 2))
    prepare.prepare(
        "medmnist", str(tmp_path / "chestmnist_16.npz"), str(tmp_path / "out"), spacing=25.0, progress=False
    )
    with pytest.raises(ValueError, match="'validation' is empty"):
        prepared.data_source(str(tmp_path / "out"), "validation")
    with pytest.raises(ValueError, match="no split 'val'"):
        prepared.data_source(str(tmp_path / "out"), "val")


CONFIGS = (
    "isimed_brats",
    "isimed_autopet",
    "isimed_chestmnist",
    "isimed_folder",
    "linear_eval_brats",
    "linear_eval_autopet",
    "linear_eval_chestmnist",
)


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_load(name):
    import importlib

    from configs import isimed_chest
    from configs import linear_eval_chest

    module = importlib.import_module(f"configs.{name}")
    for preset in (None, "paper", "demo", "test"):
        c = module.get_config(preset)
        if name.startswith("isimed_"):
            # Real-data configs carry none of the phantom's keys, and every other data key.
            phantom_only = {"variant", "tfds_dir", "window"}
            assert c.data.name == "prepared" and not phantom_only & set(c.data)
            assert set(c.data) == (set(isimed_chest.get_config(preset).data) - phantom_only) | {"dir"}
            # The folder demo recipe adds intensity augmentation for ISImed (real scans vary).
            extra = {"augment"} if name == "isimed_folder" and preset == "demo" else set()
            assert set(c) == set(isimed_chest.get_config(preset)) | extra
        else:
            assert set(c) == set(linear_eval_chest.get_config(preset))
    with pytest.raises(ValueError, match="unknown preset"):
        module.get_config("tset")


def test_chestmnist_config_trains_and_linear_eval_uses_labels(tmp_path):
    from configs import isimed_chestmnist
    from configs import linear_eval_chestmnist
    from isimed import train
    from isimed.evaluation import linear_eval

    _medmnist_npz(tmp_path / "chestmnist_16.npz", sizes=(8, 4, 8))
    out = str(tmp_path / "out")
    prepare.prepare("medmnist", str(tmp_path / "chestmnist_16.npz"), out, spacing=25.0, progress=False)
    config = isimed_chestmnist.get_config("test")
    config.data.dir = out
    config.total_steps = 3
    config.eval_every = 1000
    config.checkpoint_every = 3
    config.eval.max_images = 4
    config.eval.probe_train_images = 4
    workdir = str(tmp_path / "pretrain")
    train.train_and_evaluate(config, workdir)

    eval_config = linear_eval_chestmnist.get_config("test")
    eval_config.pretrain_workdir = workdir
    eval_config.probe.epochs = 5
    results = linear_eval.evaluate(eval_config, str(tmp_path / "eval"))
    row = results["feature_sets"]["pretrained"]
    assert results["tasks"] == {"lesion": False, "labels": True, "context": False}
    assert "labels_image" in row and "lesion_crop" not in row and "knn_accuracy" not in row
    assert len(row["labels_image"]["folds"][0]["auc_per_label"]) == 14
    table = linear_eval.format_results(results)
    assert "| pretrained | n/a | n/a |" in table


# ---------------------------------------------------------------------------------------------
# A failed write is not a bad input; kill -9 mid-run, rerun: the same folder as one run.


@pytest.mark.parametrize("storage", prepared.STORAGES)
def test_disk_full_stops_even_with_skip_bad(raw_with_bad_files, tmp_path, monkeypatch, storage):
    from array_record.python import array_record_module

    real = array_record_module.ArrayRecordWriter
    calls = []

    class FullDisk:  # The second case's write fails as on a full disk, after bytes reached the file.
        def __init__(self, path, options):
            calls.append(path)
            self.writer = real(path, options)

        def write(self, data):
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.writer.write(data)

        def close(self):
            self.writer.close()

    def full_disk(path, mode="r", *args, **kwargs):  # The mapped files' writes, the same way.
        if str(path).endswith(".isimed.tmp"):
            calls.append(path)
            if len(calls) == 2:
                with open(path, "wb") as f:
                    f.write(b"partial")  # Some bytes reached the file before the disk filled.
                path = "/dev/full"
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", FullDisk)
    monkeypatch.setattr(prepare, "open", full_disk, raising=False)
    out = tmp_path / "out"
    kwargs = dict(
        splits={"train": ["empty", "good0", "good1", "truncated"]},
        skip_bad=True,
        storage=storage,
        progress=False,
    )
    suffix = {"mapped": "isimed", "array_record": "array_record"}[storage]
    with pytest.raises(prepare.OutputError, match=rf"cannot write .*/good1\.{suffix}: No space left"):
        prepare.prepare("brats", str(raw_with_bad_files), str(out), **kwargs)
    manifest = json.loads((out / prepared.MANIFEST).read_text())
    assert manifest["status"] == "incomplete" and "skipped" not in manifest
    assert sorted(os.listdir(out / "train")) == [f"good0.{suffix}"]  # No partial file left.
    with pytest.raises(ValueError, match="did not finish"):
        prepared.data_source(str(out), "train")
    monkeypatch.setattr(array_record_module, "ArrayRecordWriter", real)  # Space freed: resume.
    monkeypatch.setattr(prepare, "open", open, raising=False)
    manifest = prepare.prepare("brats", str(raw_with_bad_files), str(out), **kwargs)
    assert (manifest["report"]["done"], manifest["report"]["resumed"]) == (1, 1)
    assert sorted(s["case_id"] for s in manifest["skipped"]) == ["empty", "truncated"]


def test_rerun_after_a_kill_while_starting(raw_with_bad_files, tmp_path):
    """The moments the random kills rarely hit: the first manifest half written, and the manifest
    written before any split folder; the rerun accepts both and ends as one run does."""
    kwargs = dict(splits={"train": ["good0", "good1"], "test": ["good2"]}, progress=False)
    once = prepare.prepare("brats", str(raw_with_bad_files), str(tmp_path / "once"), **kwargs)
    half = tmp_path / "half"
    half.mkdir()
    (half / (prepared.MANIFEST + ".tmp")).write_text('{"format": "isimed-prep')
    no_splits = tmp_path / "no_splits"
    no_splits.mkdir()
    (no_splits / prepared.MANIFEST).write_text(
        json.dumps(
            {k: once[k] for k in ("format", "format_version", "settings", "plan")} | {"status": "incomplete"}
        )
    )
    for out in (half, no_splits):
        manifest = prepare.prepare("brats", str(raw_with_bad_files), str(out), **kwargs)
        assert manifest["splits"] == once["splits"] and manifest["report"]["done"] == 3


def _prepare_command(root, out) -> list[str]:
    return [
        sys.executable,
        "-m",
        "isimed.data.prepare",
        "--layout=glob",
        f"--root={root}",
        f"--out={out}",
        "--image_pattern=*.nii.gz",
        "--mask_pattern={stem}.seg.nii.gz",
        "--intensity=mri",
        "--spacing=0.7",
        "--crop_foreground",
        "--fractions=0.6,0.2,0.2",
        "--seed=2",  # Gives each split cases (seed 0 leaves test empty, which prepare refuses).
    ]


def _folder_contents(out) -> tuple[dict, dict]:
    """(prepared.json without the run's report, {(split, id): decoded record})."""
    manifest = json.loads((out / prepared.MANIFEST).read_text())
    del manifest["report"]
    records = {}
    for split in manifest["splits"]:
        if manifest["splits"][split]["count"]:
            for record in prepared.data_source(str(out), split, dtype=np.float16):
                records[split, int(record["id"])] = record
    return manifest, records


def test_prepare_killed_at_random_moments_then_rerun_equals_one_run(tmp_path):
    """SIGKILL `python -m isimed.data.prepare` after a random number of written files (3 rounds),
    rerun each time; the final folder equals one prepared in one go, array for array."""
    root = tmp_path / "raw"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        image = rng.integers(0, 900, (40 + i % 3, 36, 30)).astype(np.int16)  # ~10 ms a case.
        nib.save(nib.Nifti1Image(image, np.diag([1.0, 1.2, 1.5, 1.0])), str(root / f"c{i:02d}.nii.gz"))
        mask = (rng.random(image.shape) > 0.9).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, np.diag([1.0, 1.2, 1.5, 1.0])), str(root / f"c{i:02d}.seg.nii.gz"))
    once = tmp_path / "once"
    subprocess.run(_prepare_command(root, once), check=True, capture_output=True, timeout=120)

    out = tmp_path / "killed"
    random_ = random.Random(0)
    killed_at = []  # Files written when each kill came.

    def written() -> int:
        return len(list(out.glob("*/*.isimed")))

    for _ in range(3):
        target = written() + random_.randint(1, 3)  # A few more files than the last round left.
        proc = subprocess.Popen(
            _prepare_command(root, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while proc.poll() is None and written() < target:
            time.sleep(0.002)
        time.sleep(random_.uniform(0.0, 0.02))  # Then anywhere: reading, writing, renaming.
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_at.append(written())
        proc.wait(timeout=60)
    assert any(n < 12 for n in killed_at), f"no round was killed mid-run: {killed_at}"
    subprocess.run(_prepare_command(root, out), check=True, capture_output=True, timeout=120)

    (once_manifest, once_records), (manifest, records) = _folder_contents(once), _folder_contents(out)
    assert manifest == once_manifest
    assert sorted(records) == sorted(once_records) and len(records) == 12
    for key, record in records.items():
        assert set(record) == set(once_records[key])
        for field, value in record.items():
            assert np.array_equal(value, once_records[key][field]), (key, field)
    assert not list(out.glob("*/.*.tmp"))

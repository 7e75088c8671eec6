"""experiments/position_transfer.py: the subject generator and both ground truths, on tiny volumes."""

import json
import os

import numpy as np
import pytest

from experiments import position_transfer as pt
from isimed import geometry
from isimed.data import prepared

SHAPE = (10, 12, 14)


def _oblique_affine(spacing=(2.0, 1.5, 2.5)):
    """A rotated, anisotropic grid, so world and index axes differ."""
    direction, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))
    return geometry.affine_from_spacing(list(spacing), [10.0, -20.0, 5.0], direction)


def _ramps(shape, affine):
    """Three images whose voxels hold their own world x, y and z (mm)."""
    index = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)
    return np.moveaxis(geometry.voxel_to_world(index, affine), -1, 0)


def test_zero_strength_is_the_identity():
    affine = _oblique_affine()
    image = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    u = pt.displacement_field(np.random.default_rng(1), SHAPE, geometry.spacing_from_affine(affine), 0.0)
    np.testing.assert_array_equal(u, 0.0)
    np.testing.assert_allclose(pt.warp(image, affine, u), image, atol=1e-6)
    subject, u = pt.make_subject(
        image,
        affine,
        np.random.default_rng(2),
        max_mm=0.0,
        control_mm=8.0,
        bias=0.0,
        bias_control_mm=16.0,
        noise=0.0,
    )
    np.testing.assert_allclose(subject, image, atol=1e-6)


@pytest.mark.parametrize("max_mm", [0.5, 2.0, 4.0])
def test_displacement_reaches_and_respects_its_bound(max_mm):
    spacing = np.array([2.0, 2.0, 2.0])
    u = pt.displacement_field(np.random.default_rng(4), (20, 22, 18), spacing, max_mm, control_mm=8.0)
    norm = np.sqrt((u**2).sum(0))
    assert norm.max() == pytest.approx(max_mm, rel=1e-9)
    # Smooth: the field changes by a small part of its size from one voxel to the next.
    steps = [np.abs(np.diff(u, axis=a)).max() for a in (1, 2, 3)]
    assert max(steps) < 0.5 * max_mm
    with pytest.raises(ValueError, match="max_mm"):
        pt.displacement_field(np.random.default_rng(4), SHAPE, spacing, -1.0)


def test_bias_field_is_smooth_and_positive():
    spacing = np.array([2.0, 2.0, 2.0])
    shape, strength = (30, 30, 30), 0.3
    b = pt.bias_field(np.random.default_rng(5), shape, spacing, strength, control_mm=24.0)
    assert b.shape == shape and np.all(b > 0)
    log_b = np.log(b)
    assert np.abs(log_b).max() == pytest.approx(strength)
    # Control points 12 voxels apart: neighbouring voxels differ by a small part of the field's
    # range (white noise of the same range: about all of it).
    step = max(np.abs(np.diff(log_b, axis=a)).max() for a in range(3))
    assert step < 0.2 * (log_b.max() - log_b.min())


@pytest.mark.parametrize("crop", [(4, 4, 4), (3, 5, 3)])
def test_anatomical_positions_match_brute_force(crop):
    # Warping images that hold their own world coordinates gives, at each subject voxel, the
    # template position its anatomy comes from (linear interpolation of a linear function is
    # exact); at a crop centre that is the mean of the crop's central voxel(s).
    affine = _oblique_affine()
    u = pt.displacement_field(np.random.default_rng(6), SHAPE, geometry.spacing_from_affine(affine), 1.4, 6.0)
    warped = np.stack([pt.warp(r, affine, u) for r in _ramps(SHAPE, affine)])
    rng = np.random.default_rng(7)
    starts = np.stack([rng.integers(0, n - c + 1, size=40) for n, c in zip(SHAPE, crop)], -1)
    # Central voxels at least one voxel from the edge: the sample stays inside the grid.
    lo, hi = np.array(crop) // 2 - (np.array(crop) % 2 == 0), np.array(crop) // 2
    keep = np.all((starts + lo >= 1) & (starts + hi <= np.array(SHAPE) - 2), axis=1)
    starts = starts[keep]
    expected = np.zeros((len(starts), 3))
    for n, s in enumerate(starts):  # Brute force: average the central voxels, one by one.
        voxels = [(i, j, k) for i in (lo[0], hi[0]) for j in (lo[1], hi[1]) for k in (lo[2], hi[2])]
        voxels = set(voxels)
        expected[n] = np.mean([warped[(slice(None), *(s + np.array(v)))] for v in voxels], axis=0)
    centres = geometry.crop_centres_mm(starts, crop, affine)
    got = pt.anatomical_positions(centres, affine, u)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.abs(got - centres).max() > 0.1  # The deformation moved them.
    zero = pt.anatomical_positions(centres, affine, np.zeros_like(u))
    np.testing.assert_allclose(zero, centres, atol=1e-9)


def test_prepared_subject_keeps_the_template_world_frame(tmp_path):
    # The primary ground truth: a subject crop's centre in the subject's own world mm, which the
    # pipeline computes from the prepared record's affine; the subject must be on the template's
    # grid, so that a record voxel's world position is the template grid point with that value.
    affine = geometry.affine_from_spacing([2.0, 2.0, 2.0], [-20.0, -24.0, -18.0])
    shape = (20, 24, 18)
    template = np.zeros(shape, np.float32)
    template[3:17, 4:20, 3:15] = np.random.default_rng(8).uniform(0.2, 1.0, (14, 16, 12))
    settings = {
        "seed": 0,
        "max_mm": [2.5],
        "deformation_spacing_mm": 8.0,
        "bias": 0.1,
        "bias_spacing_mm": 24.0,
        "noise": 0.0,
    }
    subjects = pt.subject_fields(template, affine, settings)
    out = pt.prepare_folder(str(tmp_path), settings, template, affine, subjects)
    manifest = json.load(open(os.path.join(out, "prepared.json")))
    assert manifest["plan"] == {
        "train": ["template_fit"],
        "validation": ["template_eval"],
        "test": ["subject_00"],
    }
    record = prepared.data_source(out, "test")[0]
    index = np.argwhere(np.ones(record["image"].shape, bool))
    source = geometry.world_to_voxel(geometry.voxel_to_world(index, record["affine"]), affine)
    np.testing.assert_allclose(source, np.round(source), atol=1e-6)  # On the template's grid.
    values = subjects[0]["image"][tuple(np.round(source).astype(int).T)]
    stored = record["image"].reshape(-1).astype(np.float64)
    # Prepared images are an increasing affine map of the source (clipped to [-1, 1]).
    inside = (stored > -1) & (stored < 1)
    slope, offset = np.polyfit(values[inside], stored[inside], 1)
    assert slope > 0
    np.testing.assert_allclose(stored[inside], slope * values[inside] + offset, atol=2e-3)
    # Other settings in the same workdir are refused (the prepared folder would be stale).
    with pytest.raises(ValueError, match="other settings"):
        pt.prepare_folder(str(tmp_path), {**settings, "seed": 1}, template, affine, subjects)


def test_folder_demo_recipe_augments_isimed_crops_exactly_once(monkeypatch):
    """The folder demo recipe turns augmentation on for ISImed (one view): the train loss passes
    all crops of the step once through `augment` with the recipe's settings (traced only, no
    compute), no flips (they would mirror left and right); other presets and the two-view methods'
    own augmentation are left as they were."""
    import jax

    from configs import isimed_folder
    from isimed import augment
    from isimed import methods
    from isimed import train_state

    assert "augment" not in isimed_folder.get_config("test")
    assert isimed_folder.get_config("demo,method=simclr").augment.flip_prob > 0
    demo = isimed_folder.get_config("demo")
    assert demo.augment.flip_prob == 0.0 and demo.augment.noise_prob > 0
    calls = []

    def recording(key, x, config):
        calls.append((x.shape, dict(config)))
        return x + 1.0  # So that the traced loss depends on it.

    monkeypatch.setattr(augment, "augment", recording)

    class Networks:  # Stands in for the encoder: only the augmentation path is under test.
        params, batch_stats = {}, {}

        @staticmethod
        def apply(params, batch_stats, x, train):
            return x.reshape(x.shape[0], -1)[:, :4], batch_stats

    b = 2
    for config in (
        isimed_folder.get_config("test"),
        isimed_folder.demo_recipe(isimed_folder.get_config("test")),
    ):
        k, crop = config.data.crops_per_image, tuple(config.data.crop_size)
        batch = {
            "crops": jax.ShapeDtypeStruct((b, k, *crop, 1), np.float32),
            "centres": jax.ShapeDtypeStruct((b, k, 3), np.float32),
        }
        loss_fn = train_state.make_loss_fn(config, methods.get("isimed"), Networks)
        jax.eval_shape(loss_fn, {"encoder": {}}, {}, batch, jax.random.key(0), {})
    assert calls == [((b * k, *crop, 1), dict(config.augment))]


def test_pretraining_of_another_config_is_not_reused(tmp_path):
    """A finished run is reused only for the very config (a recipe change with the same step
    count would otherwise be scored as the new recipe); one of another config is refused."""
    run_dir = tmp_path / "pretrain"
    (run_dir / "checkpoints").mkdir(parents=True)
    timing = {"steps": 1500, "pretrain_s": 1.0, "config": "{}"}
    (run_dir / "timing.json").write_text(json.dumps(timing))
    with pytest.raises(ValueError, match="another config"):
        pt.pretrain(str(tmp_path / "data"), str(tmp_path), steps=0)

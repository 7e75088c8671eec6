import itertools

import numpy as np
import pytest

from isimed import geometry


def random_affine(rng, ndim):
    q, _ = np.linalg.qr(rng.normal(size=(ndim, ndim)))
    spacing = rng.uniform(0.3, 6.0, size=ndim)
    return geometry.affine_from_spacing(spacing, rng.normal(scale=100, size=ndim), q)


@pytest.mark.parametrize("ndim", [2, 3])
def test_voxel_world_roundtrip_matches_brute_force(ndim):
    rng = np.random.default_rng(0)
    for _ in range(5):
        affine = random_affine(rng, ndim)
        idx = rng.uniform(0, 50, size=(20, ndim))
        expected = np.array([(affine @ np.append(i, 1.0))[:ndim] for i in idx])
        np.testing.assert_allclose(geometry.voxel_to_world(idx, affine), expected, atol=1e-9)
        np.testing.assert_allclose(geometry.world_to_voxel(expected, affine), idx, atol=1e-8)
        np.testing.assert_allclose(
            geometry.spacing_from_affine(affine), np.linalg.norm(affine[:ndim, :ndim], axis=0)
        )


def test_anisotropic_spacing_gives_mm_not_voxel_distances():
    affine = geometry.affine_from_spacing([0.7, 0.7, 5.0])
    centres = geometry.crop_centres_mm(np.array([[0, 0, 0], [0, 0, 1], [1, 0, 0]]), (8, 8, 8), affine)
    d = geometry.pairwise_distances(centres)
    # One voxel along the slice axis is 5 mm; one in-plane voxel is 0.7 mm.
    assert d[0, 1] == pytest.approx(5.0)
    assert d[0, 2] == pytest.approx(0.7)
    assert d[1, 2] == pytest.approx(np.hypot(5.0, 0.7))


def test_crop_centre_is_voxel_centre_mean():
    rng = np.random.default_rng(1)
    affine = random_affine(rng, 3)
    starts = np.array([[3, 5, 7]])
    crop = (4, 5, 6)
    voxels = np.array(list(itertools.product(*[range(s, s + c) for s, c in zip(starts[0], crop)])))
    expected = geometry.voxel_to_world(voxels, affine).mean(axis=0)
    np.testing.assert_allclose(geometry.crop_centres_mm(starts, crop, affine)[0], expected, atol=1e-9)


def test_pairwise_distances_brute_force():
    rng = np.random.default_rng(2)
    p = rng.normal(size=(7, 3))
    expected = np.array([[np.linalg.norm(a - b) for b in p] for a in p])
    np.testing.assert_allclose(geometry.pairwise_distances(p), expected, atol=1e-12)


@pytest.mark.parametrize(
    "image_shape,crop", [((20, 30, 25), (8, 8, 8)), ((40, 33), (16, 16)), ((8, 8, 8), (8, 8, 8))]
)
def test_crops_inside_image_and_seeded(image_shape, crop):
    starts = geometry.sample_crop_starts(np.random.default_rng(3), image_shape, crop, 500)
    assert starts.shape == (500, len(crop))
    assert np.all(starts >= 0)
    assert np.all(starts + np.array(crop) <= np.array(image_shape))
    again = geometry.sample_crop_starts(np.random.default_rng(3), image_shape, crop, 500)
    np.testing.assert_array_equal(starts, again)


def test_crop_positions_uniform_over_valid_range():
    starts = geometry.sample_crop_starts(np.random.default_rng(4), (10, 12), (7, 10), 30000)
    counts = np.zeros((4, 3))
    np.add.at(counts, (starts[:, 0], starts[:, 1]), 1)
    assert counts.min() > 0  # Both extreme positions are reachable.
    np.testing.assert_allclose(counts / counts.sum(), 1 / 12, atol=0.01)


def test_box_fractions_brute_force():
    rng = np.random.default_rng(5)
    mask = rng.random((9, 8, 7)) > 0.6
    crop = (3, 4, 2)
    fractions = geometry.box_fractions(mask, crop)
    for s in np.ndindex(fractions.shape):
        box = mask[tuple(slice(a, a + c) for a, c in zip(s, crop))]
        assert fractions[s] == pytest.approx(box.mean())


def test_foreground_constraint_respected_and_uniform():
    mask = np.zeros((30, 30), bool)
    mask[10:20, 5:25] = True
    crop = (6, 6)
    starts = geometry.sample_crop_starts(
        np.random.default_rng(6), mask.shape, crop, 20000, foreground=mask, min_foreground=0.5
    )
    frac = geometry.box_fractions(mask, crop)
    assert np.all(frac[starts[:, 0], starts[:, 1]] >= 0.5)
    eligible = int(np.sum(frac >= 0.5))
    assert len({tuple(s) for s in starts}) == eligible  # Every eligible position is drawn.


def test_foreground_impossible_is_a_clear_error():
    mask = np.zeros((20, 20), bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match="foreground"):
        geometry.sample_crop_starts(np.random.default_rng(0), mask.shape, (8, 8), 4, mask, 0.5)


def test_crop_larger_than_image_names_both_sizes():
    with pytest.raises(ValueError, match=r"\(40, 40, 40\).*\(32, 64, 64\)"):
        geometry.sample_crop_starts(np.random.default_rng(0), (32, 64, 64), (40, 40, 40), 2)


@pytest.mark.parametrize("spacing", [[1.0, 0.0, 1.0], [1.0, -2.0, 1.0], [1.0, np.nan, 1.0]])
def test_bad_spacing_is_a_clear_error(spacing):
    with pytest.raises(ValueError, match="spacing"):
        geometry.affine_from_spacing(spacing)
    if spacing[1] < 0:
        return  # A negative affine entry is a legitimate axis flip, not a bad spacing.
    with pytest.raises(ValueError, match="scan.nii.gz.*(spacing|non-finite)"):
        geometry.check_affine(np.diag(spacing + [1.0]), 3, "scan.nii.gz")


def test_extract_crops_brute_force():
    img = np.arange(6 * 7 * 8).reshape(6, 7, 8)
    starts = np.array([[0, 0, 0], [2, 3, 4]])
    crops = geometry.extract_crops(img, starts, (3, 4, 4))
    np.testing.assert_array_equal(crops[1], img[2:5, 3:7, 4:8])


def test_rotation_matrices_are_rotations_about_the_named_axes():
    r = geometry.rotation([0.0, 0.0, 90.0])  # About z: x -> y.
    np.testing.assert_allclose(r @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-12)
    r = geometry.rotation([90.0, 0.0, 0.0])  # About x: y -> z.
    np.testing.assert_allclose(r @ [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], atol=1e-12)
    r = geometry.rotation([7.0, -4.0, 9.0])
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    np.testing.assert_allclose(geometry.rotation([90.0]) @ [1.0, 0.0], [0.0, 1.0], atol=1e-12)


def test_unrotated_crops_are_the_plain_crops():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(12, 10, 9)).astype(np.float32)
    starts = np.array([[0, 0, 0], [3, 2, 1], [6, 4, 3]])
    affine = geometry.affine_from_spacing([1.0, 0.8, 2.5], origin=[4.0, -3.0, 10.0])
    got = geometry.rotated_crops(image, starts, (6, 6, 6), affine, np.stack([np.eye(3)] * 3))
    np.testing.assert_allclose(got, geometry.extract_crops(image, starts, (6, 6, 6)), atol=1e-6)


def test_a_quarter_turn_of_an_isotropic_crop_is_numpys_rot90():
    image = np.arange(12 * 11, dtype=np.float32).reshape(12, 11)
    starts = np.array([[2, 3], [5, 4]])
    crops = geometry.extract_crops(image, starts, (6, 6))
    rotations = np.stack([geometry.rotation([90.0])] * 2)
    got = geometry.rotated_crops(image, starts, (6, 6), np.eye(3), rotations)
    # Crop voxel (i, j) shows the image at c + R((i, j) - c) = (c - (j - c), i): crop[5 - j, i],
    # which is numpy's clockwise quarter turn.
    np.testing.assert_allclose(got, np.rot90(crops, k=-1, axes=(1, 2)), atol=1e-4)


def test_rotated_crops_sample_the_image_at_rotated_world_points():
    """A field linear in world mm is interpolated exactly: each crop voxel must hold its value at
    c + R (p - c), with anisotropic voxels and a tilted affine."""
    direction = geometry.rotation([0.0, 20.0, -35.0])
    affine = geometry.affine_from_spacing([1.2, 0.9, 2.0], origin=[-30.0, 12.0, 5.0], direction=direction)
    shape, crop = (40, 44, 24), (8, 8, 6)
    w, b = np.array([0.3, -1.1, 0.7]), 2.0
    index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    image = (geometry.voxel_to_world(index, affine) @ w + b).reshape(shape).astype(np.float32)
    starts = np.array([[14, 16, 8], [16, 18, 9]])
    rotations = np.stack([geometry.rotation([8.0, -6.0, 10.0]), geometry.rotation([-10.0, 3.0, 0.0])])
    got = geometry.rotated_crops(image, starts, crop, affine, rotations)
    offsets = np.stack(np.meshgrid(*[np.arange(c) for c in crop], indexing="ij"), -1).reshape(-1, 3)
    for n, start in enumerate(starts):
        p = geometry.voxel_to_world(start + offsets, affine)
        c = geometry.crop_centres_mm(start[None], crop, affine)[0]
        expected = ((c + (p - c) @ rotations[n].T) @ w + b).reshape(crop)
        np.testing.assert_allclose(got[n], expected, atol=2e-3)
    # The centre voxel value (even sizes: the mean around it) is the unrotated one: c is fixed.
    plain = geometry.extract_crops(image, starts, crop)
    np.testing.assert_allclose(got.mean(axis=(1, 2, 3)), plain.mean(axis=(1, 2, 3)), atol=2e-3)

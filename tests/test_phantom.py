"""Tests for the synthetic thorax phantom: determinism, geometry, anatomy, nodule ground truth."""

from __future__ import annotations

import functools
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from isimed.data import phantom
from isimed.data import structures

S = structures.STRUCTURES
DEFAULT = phantom.PhantomSpec()
# Same field of view as the default at half the resolution: fast, and anatomy is still complete.
TINY = phantom.PhantomSpec(shape=(32, 48, 48), spacing=(10.0, 7.0, 7.0))


@functools.cache
def subject(spec: phantom.PhantomSpec, seed: int, index: int) -> dict[str, np.ndarray]:
    return phantom.generate_subject(spec, seed, index)


def world(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    """World mm of array indices (n, ndim) through a homogeneous affine."""
    index = np.asarray(index, np.float64)
    return (affine @ np.concatenate([index, np.ones((len(index), 1))], axis=1).T).T[:, :-1]


def centroid_mm(s: dict[str, np.ndarray], label: int, k: int | None = None) -> np.ndarray:
    """World [x, y, z] centroid of a label, over the whole volume or axial slice k."""
    region = s["labels"] == label
    if k is not None:
        region[:k] = False
        region[k + 1 :] = False
    assert region.any(), f"label {label} absent"
    return world(s["affine"], np.argwhere(region)).mean(axis=0)


def nodule_subjects(spec: phantom.PhantomSpec, count: int) -> list[dict[str, np.ndarray]]:
    """The first `count` subjects (seed 0) that have nodules."""
    with_nodules = []
    for index in range(60):
        s = subject(spec, 0, index)
        if s["has_nodule"]:
            with_nodules.append(s)
            if len(with_nodules) == count:
                return with_nodules
    raise AssertionError(f"only {len(with_nodules)} of 60 subjects have nodules")


def test_outputs_have_documented_types_and_shapes():
    s = subject(DEFAULT, 0, 0)
    shape = DEFAULT.shape
    assert s["image"].dtype == np.int16 and s["image"].shape == shape
    assert s["mask"].dtype == np.uint8 and s["mask"].shape == shape
    assert s["labels"].dtype == np.uint8 and s["labels"].shape == shape
    assert s["affine"].dtype == np.float64 and s["affine"].shape == (4, 4)
    assert s["has_nodule"].shape == () and s["has_nodule"].dtype == bool
    n = len(s["nodule_diameters_mm"])
    assert s["nodule_centres_mm"].dtype == np.float32 and s["nodule_centres_mm"].shape == (n, 3)
    assert s["nodule_diameters_mm"].dtype == np.float32
    assert set(np.unique(s["labels"])) <= set(S.values())
    assert set(np.unique(s["mask"])) <= {0, 1}
    assert s["image"].min() >= -1024 and s["image"].max() <= 3071


def test_same_seed_and_index_is_bit_identical():
    a = phantom.generate_subject(TINY, 7, 3)
    b = phantom.generate_subject(TINY, 7, 3)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_different_index_or_seed_gives_different_anatomy():
    base = subject(TINY, 0, 0)
    for other in (subject(TINY, 0, 1), subject(TINY, 1, 0)):
        assert not np.array_equal(base["image"], other["image"])
        assert not np.array_equal(base["labels"], other["labels"])


def test_importing_defines_no_flags():
    # A fresh interpreter: other test modules may define flags in this one.
    code = "from absl import flags; import isimed.data.phantom; print(len(list(flags.FLAGS)))"
    baseline = "from absl import flags; print(len(list(flags.FLAGS)))"
    root = pathlib.Path(phantom.__file__).parents[2]
    counts = [
        subprocess.run([sys.executable, "-c", c], cwd=root, check=True, capture_output=True, text=True).stdout
        for c in (code, baseline)
    ]
    assert counts[0] == counts[1]


@pytest.mark.parametrize("spacing", [(0.0, 3.5, 3.5), (5.0, -3.5, 3.5), (5.0, 3.5, float("nan"))])
def test_bad_spacing_raises_naming_spacing(spacing):
    with pytest.raises(ValueError, match="spacing"):
        phantom.generate_subject(phantom.PhantomSpec(spacing=spacing), 0, 0)


@pytest.mark.parametrize("shape", [(64, 96), (0, 96, 96), (64, 96, 2)])
def test_bad_shape_raises_naming_shape(shape):
    with pytest.raises(ValueError, match="shape"):
        phantom.PhantomSpec(shape=shape)


def test_affine_spacing_orientation_and_centre():
    s = subject(DEFAULT, 0, 0)
    affine = s["affine"]
    sz, sy, sx = DEFAULT.spacing
    # Array z -> world z (superior), array y -> world y (posterior), array x -> world x (left).
    np.testing.assert_allclose(affine[:3, :3], [[0, 0, sx], [0, sy, 0], [sz, 0, 0]])
    np.testing.assert_array_equal(affine[3], [0, 0, 0, 1])
    k, j, i = 10, 20, 30
    p = world(affine, [[k, j, i], [k + 1, j, i], [k, j + 1, i], [k, j, i + 1]])
    # Neighbour distances are the anisotropic spacing, along the documented world axes.
    np.testing.assert_allclose(p[1] - p[0], [0, 0, 5.0])
    np.testing.assert_allclose(p[2] - p[0], [0, 3.5, 0])
    np.testing.assert_allclose(p[3] - p[0], [3.5, 0, 0])
    corners = world(affine, [[0, 0, 0], np.subtract(DEFAULT.shape, 1)])
    assert np.all(np.abs(corners.mean(axis=0)) < 10.0)  # roughly centred at world 0


def test_anatomy_has_physical_size_independent_of_spacing():
    fine, coarse = subject(DEFAULT, 0, 2), subject(TINY, 0, 2)
    for name in ("body", "lung_left", "lung_right", "heart", "liver"):
        volumes = [
            np.sum(s["labels"] == S[name]) * np.prod(spec.spacing)
            for s, spec in ((fine, DEFAULT), (coarse, TINY))
        ]
        assert volumes[1] == pytest.approx(volumes[0], rel=0.2), name
        np.testing.assert_allclose(
            centroid_mm(fine, S[name]), centroid_mm(coarse, S[name]), atol=8.0, err_msg=name
        )


def test_subjects_vary_in_size():
    lungs = [S["lung_left"], S["lung_right"]]
    lung_volumes = [np.isin(subject(TINY, 0, i)["labels"], lungs).sum() for i in range(8)]
    assert max(lung_volumes) > 1.2 * min(lung_volumes)


@pytest.mark.parametrize("index", range(6))
def test_anatomical_layout(index):
    s = subject(DEFAULT, 0, index)
    labels, image = s["labels"], s["image"]
    for name, value in S.items():
        if name != "nodule":
            assert np.any(labels == value), f"{name} missing"
    lungs = np.isin(labels, [S["lung_left"], S["lung_right"]])
    assert np.median(image[lungs]) < -500
    assert np.median(image[labels == S["spine"]]) > 300
    assert np.median(image[labels == S["trachea"]]) < -500
    assert np.median(image[labels == S["fat"]]) < -50
    assert image[labels == S["background"]].mean() < -900

    heart = centroid_mm(s, S["heart"])
    # Mid-thoracic slice through the heart's centroid: lungs flank the heart.
    k = int(round(np.linalg.solve(s["affine"], np.append(heart, 1.0))[0]))
    heart_k = centroid_mm(s, S["heart"], k)
    assert centroid_mm(s, S["lung_left"], k)[0] > heart_k[0] + 20
    assert centroid_mm(s, S["lung_right"], k)[0] < heart_k[0] - 20

    spine = centroid_mm(s, S["spine"])
    assert spine[1] > heart[1] + 30  # spine posterior to the heart
    assert abs(centroid_mm(s, S["trachea"])[0] - spine[0]) < 15  # trachea near the midline
    assert centroid_mm(s, S["aorta"])[0] > spine[0]  # descending aorta left of the spine

    liver, right_lung = centroid_mm(s, S["liver"]), centroid_mm(s, S["lung_right"])
    assert liver[2] < right_lung[2] - 50  # below the right dome
    assert liver[0] < spine[0]  # patient's right
    # The liver is below the lowest right-lung voxel in its own column, i.e. under the dome.
    right = labels == S["lung_right"]
    liver_mask = labels == S["liver"]
    columns = right.any(axis=0) & liver_mask.any(axis=0)
    lowest_lung = np.argmax(right, axis=0)
    highest_liver = liver_mask.shape[0] - 1 - np.argmax(liver_mask[::-1], axis=0)
    assert np.all(highest_liver[columns] < lowest_lung[columns])


def test_about_three_quarters_of_subjects_have_nodules():
    flags = []
    for i in range(40):
        s = subject(TINY, 0, i)
        assert bool(s["has_nodule"]) == bool(s["mask"].any()) == (len(s["nodule_diameters_mm"]) > 0)
        flags.append(bool(s["has_nodule"]))
    assert 0.6 <= np.mean(flags) <= 0.9


def test_subjects_without_nodules_have_empty_mask():
    s = next(subject(TINY, 0, i) for i in range(40) if not subject(TINY, 0, i)["has_nodule"])
    assert not s["mask"].any()
    assert not np.any(s["labels"] == S["nodule"])
    assert s["nodule_centres_mm"].shape == (0, 3)


def nodules_by_placement(spec: phantom.PhantomSpec, count: int):
    """{placement: [(subject, one nodule's mask, its index)]}: the first `count` nodules of each
    placement (seed 0)."""
    found = {name: [] for name in phantom.NODULE_PLACEMENTS}
    for i in range(40):
        s = subject(spec, 0, i)
        labels, _ = ndimage.label(s["mask"], structure=np.ones((3, 3, 3)))
        for n, (centre, placement) in enumerate(zip(s["nodule_centres_mm"], s["nodule_placements"])):
            index = np.rint(np.linalg.solve(s["affine"], np.append(centre, 1.0))[:3]).astype(int)
            component = labels == labels[tuple(index)]
            found[phantom.NODULE_PLACEMENTS[placement]].append((s, component, n))
        if all(len(items) >= count for items in found.values()):
            return {name: items[:count] for name, items in found.items()}
    raise AssertionError(f"fewer than {count} nodules of some placement in 40 subjects: {found.keys()}")


def ring(component: np.ndarray) -> np.ndarray:
    return ndimage.binary_dilation(component, structure=np.ones((3, 3, 3))) & ~component


def test_nodule_placements():
    lungs = [S["lung_left"], S["lung_right"]]
    for name, items in nodules_by_placement(DEFAULT, 3).items():
        for s, component, _ in items:
            np.testing.assert_array_equal(s["mask"].astype(bool), s["labels"] == S["nodule"])
            around = set(np.unique(s["labels"][ring(component)]).tolist())
            assert len(around & set(lungs)) == 1, (name, around)  # a single lung
            if name == "isolated":
                assert around <= {*lungs, S["vessel"]}, around
            elif name == "juxta_vascular":
                assert S["vessel"] in around and around <= {*lungs, S["vessel"]}, around
            else:  # juxta-pleural: lies on the chest wall or diaphragm
                assert around & {S["body"], S["ribs"]} and around <= {
                    *lungs,
                    S["vessel"],
                    S["body"],
                    S["ribs"],
                }


def test_nodule_diameters_match_mask_volume():
    for spec in (DEFAULT, TINY):
        voxel_mm3 = float(np.prod(spec.spacing))
        for s in nodule_subjects(spec, 10):
            labels, count = ndimage.label(s["mask"], structure=np.ones((3, 3, 3)))
            diameters = s["nodule_diameters_mm"]
            assert count == len(diameters)  # separate nodules stay separate
            assert np.all((diameters >= 4.0) & (diameters <= 30.0))
            for centre, diameter, placement in zip(s["nodule_centres_mm"], diameters, s["nodule_placements"]):
                index = np.linalg.solve(s["affine"], np.append(centre, 1.0))[:3]
                component = labels[tuple(np.rint(index).astype(int))]
                assert component > 0, "nodule centre outside its mask"
                measured = (6.0 / np.pi * np.sum(labels == component) * voxel_mm3) ** (1 / 3)
                # Small nodules hold only a few voxels, so allow half a voxel diagonal on top.
                tol = 0.1 * diameter + 0.5 * np.linalg.norm(spec.spacing)
                if phantom.NODULE_PLACEMENTS[placement] == "juxta_pleural":
                    assert measured <= diameter + tol  # only the part inside the lung is nodule
                else:
                    assert abs(measured - diameter) <= tol, (measured, diameter)


def test_nodule_intensities_by_type():
    clean = phantom.PhantomSpec(noise_hu=0.0, blur_mm=0.0)
    seen = set()
    for s in nodule_subjects(clean, 8):
        labels, _ = ndimage.label(s["mask"], structure=np.ones((3, 3, 3)))
        for centre, kind, hu in zip(s["nodule_centres_mm"], s["nodule_types"], s["nodule_hu"]):
            index = np.rint(np.linalg.solve(s["affine"], np.append(centre, 1.0))[:3]).astype(int)
            values = s["image"][labels == labels[tuple(index)]]
            name = phantom.NODULE_TYPES[kind]
            seen.add(name)
            if name == "ground_glass":
                assert -700 <= hu <= -300
                np.testing.assert_allclose(values, hu, atol=0.5)
            else:
                assert 0 <= hu <= 60
                if name == "solid":
                    np.testing.assert_allclose(values, hu, atol=0.5)
                else:  # a solid core (the centre voxel) in ground glass
                    assert abs(s["image"][tuple(index)] - hu) <= 0.5
                    assert np.all((np.abs(values - hu) <= 0.5) | ((values >= -700) & (values <= -300)))
    assert seen == set(phantom.NODULE_TYPES)


def test_vessel_tree_is_connected_tapering_and_inside_the_lungs():
    for index in range(3):
        rng = np.random.default_rng([0, index])
        anatomy = phantom._draw_anatomy(rng)
        tree = phantom._draw_vessels(rng, anatomy)
        roots = tree["level"] == 0
        assert roots.sum() >= 6  # trunks from both hila
        assert np.all(tree["r1"] < tree["r0"])  # each segment tapers
        for i in np.flatnonzero(~roots):
            # Every branch starts at the end of a thicker parent one level up.
            parents = np.flatnonzero(
                (tree["level"] == tree["level"][i] - 1)
                & np.all(np.abs(tree["p1"] - tree["p0"][i]) < 1e-6, axis=1)
            )
            assert len(parents) == 1 and tree["r1"][parents[0]] > tree["r0"][i]
        assert np.all(phantom._in_lung(tree["p1"], anatomy))
        assert tree["level"].max() >= 4

    # In the voxels: vessels in both lungs, thicker near the hila than in the periphery.
    s = subject(DEFAULT, 0, 0)
    vessel = s["labels"] == S["vessel"]
    points = world(s["affine"], np.argwhere(vessel))
    assert np.any(points[:, 0] > 20) and np.any(points[:, 0] < -20)
    thickness = ndimage.distance_transform_edt(vessel, sampling=DEFAULT.spacing)[vessel]
    distance = np.abs(points[:, 0] - np.median(points[:, 0]))  # lateral distance from the midline
    assert (
        thickness[distance < np.percentile(distance, 25)].mean()
        > thickness[distance > np.percentile(distance, 75)].mean()
    )


def test_vessels_are_blood_bright_in_the_lungs():
    for index in range(3):
        s = subject(DEFAULT, 0, index)
        thick = ndimage.binary_erosion(s["labels"] == S["vessel"], structure=np.ones((1, 3, 3)))
        lungs = np.isin(s["labels"], [S["lung_left"], S["lung_right"]])
        assert thick.any()
        assert np.median(s["image"][thick]) > np.median(s["image"][lungs]) + 400


def test_pleura_mask_matches_a_brute_force_neighbour_search():
    labels = subject(TINY, 0, 1)["labels"]
    expected = np.zeros(labels.shape, bool)
    for k, j, i in np.argwhere(np.isin(labels, [S["lung_left"], S["lung_right"]])):
        for dk, dj, di in [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]:
            n = (k + dk, j + dj, i + di)
            if all(0 <= a < b for a, b in zip(n, labels.shape)) and labels[n] in (S["body"], S["ribs"]):
                expected[k, j, i] = True
    np.testing.assert_array_equal(structures.pleura_mask(labels), expected)
    assert expected.any()


def test_project_coronal():
    s = nodule_subjects(TINY, 1)[0]
    p = phantom.project_coronal(s)
    nz, _, nx = TINY.shape
    assert p["image"].shape == p["mask"].shape == (nz, nx)
    assert p["image"].dtype == np.int16 and p["mask"].dtype == np.uint8
    assert p["affine"].shape == (3, 3) and p["affine"].dtype == np.float64
    np.testing.assert_array_equal(p["mask"] > 0, s["mask"].any(axis=1))
    assert p["mask"].any()
    np.testing.assert_allclose(p["image"], s["image"].astype(np.float64).mean(axis=1), atol=0.51)
    # The world x, z of a 2D pixel equal those of every 3D voxel in its y column.
    k, i = np.meshgrid(np.arange(nz), np.arange(nx), indexing="ij")
    k, i = k.ravel(), i.ravel()
    xz_2d = world(p["affine"], np.stack([k, i], axis=1))
    for j in (0, 17, TINY.shape[1] - 1):
        xyz = world(s["affine"], np.stack([k, np.full_like(k, j), i], axis=1))
        np.testing.assert_allclose(xz_2d, xyz[:, [0, 2]])


def test_preview_writes_png(tmp_path):
    out = tmp_path / "preview.png"
    phantom.save_preview(TINY, seed=0, num_subjects=1, out_path=str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_montage_and_hu_table(tmp_path):
    out = tmp_path / "montage.png"
    phantom.save_montage(TINY, seed=0, index=1, out_path=str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = phantom.structure_hu(TINY, seed=0, num_subjects=2)
    s = [subject(TINY, 0, i) for i in range(2)]
    lungs = np.concatenate([x["image"][x["labels"] == S["lung_left"]] for x in s]).astype(np.float64)
    mean, std, n = table["lung_left"]
    assert n == lungs.size and mean == pytest.approx(lungs.mean()) and std == pytest.approx(lungs.std())
    assert "nodule" not in table and all(name in table for name in S if name != "nodule")

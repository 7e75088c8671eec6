"""isimed.locate: matching on embeddings whose geometry the test controls (a crop's own voxels,
pooled), the command end to end on a pretrained test-preset encoder, and its bad-input messages."""

import csv
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from isimed import locate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACING = 2.0
CROP = (8, 8, 8)


def _pooled(crops: np.ndarray) -> np.ndarray:
    """A crop's 2^3-pooled voxels: equal embeddings exactly where the crops hold the same voxels,
    so the true match costs 0 and every other position more."""
    n = len(crops)
    c = crops[..., 0].reshape(n, 4, 2, 4, 2, 4, 2)
    return c.mean(axis=(2, 4, 6)).reshape(n, -1)


def _locator(**kwargs) -> locate.Locator:
    norm = {"intensity": None, "window": None, "spacing": None}
    return locate.Locator(
        _pooled, CROP, scale=1.0, normalisation=norm, min_foreground=0.0, foreground_threshold=-1.0, **kwargs
    )


def _texture(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.standard_normal(shape), 1.5).astype(np.float32)


def _grid(image, origin_mm=(0.0, 0.0, 0.0), stride=2) -> locate.Grid:
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = origin_mm
    return locate.embed_volume(_locator(), image, affine, stride=stride)


@pytest.fixture(scope="module")
def shifted_pair():
    """A template and a target holding the same anatomy `shift` voxels further along each axis
    (same affine): template point p is target point p - shift * SPACING."""
    volume = _texture((44, 44, 44))
    shift = np.array([3, 1, 5])
    template = volume[:36, :36, :36]
    target = volume[shift[0] : shift[0] + 36, shift[1] : shift[1] + 36, shift[2] : shift[2] + 36]
    return _grid(template), _grid(target), shift * SPACING


def test_match_finds_a_known_shift_to_the_voxel(shifted_pair):
    template, target, shift_mm = shifted_pair
    rng = np.random.default_rng(1)
    # Off voxel centres: the sub-voxel part must be carried through.
    points = rng.uniform(20.0, 50.0, size=(12, 3))
    for offset_mm in (0.0, 6.0):
        found, score = locate.match(points, template, target, _locator(), offset_mm=offset_mm)
        np.testing.assert_allclose(found, points - shift_mm, atol=1e-6)
        np.testing.assert_allclose(score, 0.0, atol=1e-5)


def test_anisotropic_voxels_and_points_near_the_edges_are_found_exactly():
    """Offsets that are not whole voxels (12 mm at 1 x 1.5 x 5 mm voxels), points off voxel centres
    and near the template's edges, a coarse stride of 3: an identical neighbourhood must cost 0
    and be found exactly (template and target place each query crop the same way)."""
    spacing = np.array([1.0, 1.5, 5.0])
    volume = _texture((52, 48, 40), seed=3)
    shift = np.array([3, 1, 5])
    size = np.array([44, 40, 30])
    affine = np.diag([*spacing, 1.0])
    template = locate.embed_volume(_locator(), volume[: size[0], : size[1], : size[2]], affine, stride=3)
    moved = volume[
        shift[0] : shift[0] + size[0], shift[1] : shift[1] + size[1], shift[2] : shift[2] + size[2]
    ]
    target = locate.embed_volume(_locator(), moved, affine, stride=3)
    rng = np.random.default_rng(4)
    # Points whose centre crop exists in the target (template voxels from shift + 4 on: crops
    # start 3.5 voxels before their centre); within 12 mm of an edge some of a point's offset
    # crops leave the template or the target.
    points = rng.uniform(shift + 4.0, size - 1.5, size=(40, 3)) * spacing
    found, score = locate.match(points, template, target, _locator(), offset_mm=12.0)
    np.testing.assert_allclose(found, points - shift * spacing, atol=1e-6)
    np.testing.assert_allclose(score, 0.0, atol=1e-5)


def test_refinement_is_what_reaches_odd_shifts(shifted_pair):
    """The coarse lattice (stride 2) cannot land on an odd shift: without refinement some answers
    are a voxel off, and their score says so."""
    template, target, shift_mm = shifted_pair
    points = np.random.default_rng(2).uniform(20.0, 50.0, size=(12, 3))
    found, score = locate.match(points, template, target, _locator(), refine=False)
    error = np.linalg.norm(found - (points - shift_mm), axis=1)
    assert error.max() >= SPACING - 1e-6 and error.max() <= np.sqrt(3) * SPACING + 1e-6
    assert np.all(score[error > 0] > 0)


def test_cost_map_is_lowest_at_the_truth(shifted_pair):
    template, target, shift_mm = shifted_pair
    point = np.array([[31.0, 33.0, 35.0]])  # Voxel centres: crop centres fall on the lattice.
    costs = locate.cost_maps(point, template, target, _locator(), offset_mm=0.0)
    best = np.unravel_index(np.argmin(costs[0]), costs[0].shape)
    start = target.origin + target.stride * np.array(best)
    centre = locate.geometry.crop_centres_mm(start[None], CROP, target.affine)[0]
    assert np.linalg.norm(centre - (point[0] - shift_mm)) <= np.sqrt(3) * SPACING


def test_plots_leave_the_notebook_backend_alone(shifted_pair, tmp_path):
    """`plot_matches` draws without pyplot: a notebook's backend (here pdf) is the same after."""
    import matplotlib

    template, target, shift_mm = shifted_pair
    points = np.array([[31.0, 33.0, 35.0], [40.0, 30.0, 44.0]])
    found, score = locate.match(points, template, target, _locator())
    backend = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        written = locate.plot_matches(
            str(tmp_path), points, found, score, template, target, _locator(), names=["a", "b"]
        )
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(backend)
    assert [os.path.basename(p) for p in written] == ["point_0001.png", "point_0002.png"]
    assert all(os.path.getsize(p) > 0 for p in written)


def test_embedding_cache_round_trip(tmp_path):
    image = _texture((20, 20, 20), seed=3)
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    calls = []

    def counting(crops):
        calls.append(len(crops))
        return _pooled(crops)

    loc = locate.Locator(
        counting, CROP, 1.0, {"intensity": None}, min_foreground=0.0, foreground_threshold=-1
    )
    path = str(tmp_path / "grid.npz")
    first = locate.embed_volume(loc, image, affine, stride=3, cache=path)
    n = sum(calls)
    second = locate.embed_volume(loc, image, affine, stride=3, cache=path)
    assert sum(calls) == n > 0  # The second read embedded nothing.
    np.testing.assert_array_equal(first.embeddings, second.embeddings)
    np.testing.assert_array_equal(first.lattice, second.lattice)
    with np.load(path, allow_pickle=False) as f:
        assert sorted(f.files) == ["embeddings", "starts"]


def test_fit_rigid_recovers_a_pose_despite_outliers():
    rng = np.random.default_rng(4)
    angle = np.deg2rad(9.0)
    r = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    t = np.array([5.0, -12.0, 17.0])
    a = rng.uniform(-60, 60, size=(200, 3))
    b = a @ r.T + t + rng.normal(0, 1.0, size=a.shape)
    b[:30] += rng.uniform(-40, 40, size=(30, 3))  # Wrong matches: a share the trim must drop.
    fit_r, fit_t = locate.fit_rigid(a, b)
    assert np.degrees(np.arccos((np.trace(fit_r.T @ r) - 1) / 2)) < 0.5
    np.testing.assert_allclose(fit_t, t, atol=1.0)
    assert np.linalg.det(fit_r) > 0


def test_point_outside_the_template_is_named(shifted_pair):
    template, target, _ = shifted_pair
    with pytest.raises(locate.LocateError, match=r"point 2 \(500, 0, 0 mm\) is outside the template"):
        locate.match(np.array([[30.0, 30, 30], [500, 0, 0]]), template, target, _locator())


def _write_case(tmp_path, name: str, data: np.ndarray, origin=(0.0, 0.0, 0.0)) -> str:
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = origin
    path = str(tmp_path / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _points_csv(tmp_path, points, name: str = "points.csv") -> str:
    path = str(tmp_path / name)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "x", "y", "z", "note"])
        for i, p in enumerate(points):
            w.writerow([f"p{i}", *p, "kept"])
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from isimed import cli; sys.argv[0] = 'isimed-locate'; cli.run_locate()"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory):
    """A phantom-like CT volume in HU (body and structure inside air) as template and target."""
    tmp = tmp_path_factory.mktemp("ct")
    volume = 400.0 * _texture((24, 24, 24), seed=5) * 8
    volume[:2], volume[-2:] = -1000.0, -1000.0
    path = _write_case(tmp, "scan", volume.astype(np.float32), origin=(-10.0, 5.0, 0.0))
    return tmp, path


def test_command_end_to_end(pretrained, ct_files, tmp_path):
    """Template = target: every point is found where it is (the query crops are the target's; with
    a barely trained encoder only while the exact crop is on the grid, --stride=1), the other
    columns pass through, and --plot draws one file per point."""
    workdir, _ = pretrained
    _, scan = ct_files
    points = [[4.0, 25.0, 21.0], [14.5, 30.0, 18.0], [0.0, 17.0, 30.0]]
    out = str(tmp_path / "found.csv")
    result = _run(
        f"--workdir={workdir}",
        f"--template={scan}",
        f"--target={scan}",
        f"--points={_points_csv(tmp_path, points)}",
        f"--out={out}",
        f"--plot={tmp_path / 'plots'}",
        "--offset_mm=0",
        "--stride=1",  # Every crop on the grid: the exact one is always a candidate.
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["label", "x", "y", "z", "note", "score"]
    assert [r[0] for r in rows[1:]] == ["p0", "p1", "p2"] and all(r[4] == "kept" for r in rows[1:])
    found = np.array([[float(v) for v in r[1:4]] for r in rows[1:]])
    np.testing.assert_allclose(found, points, atol=0.01)
    assert all(float(r[5]) < 1e-3 for r in rows[1:])
    assert sorted(os.listdir(tmp_path / "plots")) == [f"point_{i:04d}.png" for i in (1, 2, 3)]
    assert os.listdir(tmp_path / "locate_cache")  # Embedded grids cached next to --out.


# Bad inputs: docs/errors.md rows `locate.*`; tests/test_errors.py runs these triggers (with its
# `Trigger`: tmp_path, request, pretrained_dir) and checks each message against the table.


def _scan(t) -> str:
    volume = 400.0 * _texture((24, 24, 24), seed=5) * 8
    return _write_case(t.tmp_path, "scan", volume.astype(np.float32))


def _locate_files(t, **changes):
    scan = _scan(t)
    args = {
        "workdir": str(t.pretrained_dir),
        "template_path": scan,
        "target_path": scan,
        "points_path": _points_csv(t.tmp_path, [[4.0, 25.0, 21.0]]),
        "out_path": str(t.tmp_path / "out.csv"),
    }
    args.update(changes)
    return lambda: locate.locate_files(**args, progress=False)


def _slice_file(t) -> str:
    return _write_case(t.tmp_path, "slice", np.zeros((24, 24), np.float32))


def _cut_file(t) -> str:
    data = open(_scan(t), "rb").read()
    path = t.tmp_path / "cut.nii.gz"
    path.write_bytes(data[:200])
    return str(path)


def _far_point(t) -> str:
    return _points_csv(t.tmp_path, [[4.0, 25.0, 21.0], [0.0, 0.0, 900.0]], "far.csv")


TRIGGERS = {
    "locate.point_outside": lambda t: _locate_files(t, points_path=_far_point(t)),
    "locate.dimensionality": lambda t: _locate_files(t, target_path=_slice_file(t)),
    "locate.no_checkpoint": lambda t: _locate_files(t, workdir=str(t.tmp_path / "empty")),
    "locate.unreadable": lambda t: _locate_files(t, target_path=_cut_file(t)),
}

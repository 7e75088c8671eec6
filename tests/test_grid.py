import numpy as np
import pytest

from isimed import geometry
from isimed.evaluation import features
from isimed.evaluation import grid


def code(index):
    """The value a coded image holds at voxel (i, j, k)."""
    i, j, k = np.moveaxis(np.asarray(index), -1, 0)
    return 10000 * i + 100 * j + k


# Window (0, 2**18): the voxel value v maps to v / 2**17 - 1, exactly in float32 for v < 2**17.
WINDOW = (0.0, 2.0**18)


def decode(crops):
    return np.rint((crops.astype(np.float64) + 1.0) * 2.0**17).astype(np.int64)


def make_record(shape=(12, 20, 16), spacing=(3.0, 2.0, 1.5)):
    """A coded image (each voxel's value encodes its index), a 3 x 3 x 4 lesion at
    [4:7, 10:13, 5:9], spacing 3 / 2 / 1.5 mm, origin (-10, 5, 7) mm."""
    image = code(np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[4:7, 10:13, 5:9] = 1
    affine = geometry.affine_from_spacing(spacing, origin=(-10.0, 5.0, 7.0))
    return {"id": 7, "image": image, "mask": mask, "affine": affine}


def test_grid_starts_regular_centred_and_inside():
    starts = grid.grid_starts((12, 20, 16), (4, 4, 4), stride=(4, 5, 3))
    axes = [np.unique(starts[:, a]) for a in range(3)]
    # Axis 0: span 8, stride 4 -> 0, 4, 8. Axis 1: span 16, stride 5, leftover 1 -> offset 0.
    # Axis 2: span 12, stride 3 -> 0..12. Every combination once.
    assert [a.tolist() for a in axes] == [[0, 4, 8], [0, 5, 10, 15], [0, 3, 6, 9, 12]]
    assert len(starts) == 3 * 4 * 5 == len({tuple(s) for s in starts})
    # Default stride = crop size; leftover margin split between both ends.
    starts = grid.grid_starts((10, 10), (4, 4))
    assert np.unique(starts[:, 0]).tolist() == [1, 5]
    assert np.all(starts >= 0) and np.all(starts + 4 <= 10)
    assert len(grid.grid_starts((9, 9), (3, 3), stride=1)) == 49


def test_grid_starts_rejects_bad_input():
    with pytest.raises(ValueError, match="does not fit"):
        grid.grid_starts((4, 4), (5, 4))
    with pytest.raises(ValueError, match="stride"):
        grid.grid_starts((8, 8), (4, 4), stride=(0, 2))


def test_grid_crops_coded_voxels_centres_and_lesion():
    out = grid.grid_crops(make_record(), (4, 4, 4), 4, window=WINDOW)
    starts = out["starts"]
    # Spans 8, 16, 12 with stride 4: starts 0, 4, 8 x 0..16 x 0..12, no leftover margin.
    assert starts.shape == (3 * 5 * 4, 3)
    assert starts[0].tolist() == [0, 0, 0] and starts[-1].tolist() == [8, 16, 12]
    assert out["crops"].shape == (60, 4, 4, 4, 1) and out["crops"].dtype == np.float32
    # Every crop holds exactly the voxels at its start + (0..3)^3, in array order.
    offsets = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1)
    for n, start in enumerate(starts):
        np.testing.assert_array_equal(decode(out["crops"][n, ..., 0]), code(start + offsets))
    # Centre = origin + spacing * (start + 1.5): the voxel-centre convention.
    np.testing.assert_allclose(out["centres"][0], [-5.5, 8.0, 9.25], rtol=1e-6)
    np.testing.assert_allclose(out["centres"][-1], [18.5, 40.0, 27.25], rtol=1e-6)
    # The lesion overlaps four crops: (rows of i) x (rows of j) x (rows of k) of its voxels, / 64.
    lesion = {tuple(s): f for s, f in zip(starts.tolist(), out["lesion_fraction"]) if f > 0}
    assert lesion == {(4, 8, 4): 18 / 64, (4, 8, 8): 6 / 64, (4, 12, 4): 9 / 64, (4, 12, 8): 3 / 64}
    np.testing.assert_array_equal(out["has_lesion"], out["lesion_fraction"] > 0)
    assert out["has_lesion"].dtype == np.int32
    assert np.all(out["image_id"] == 7) and out["image_id"].shape == (60,)


def test_grid_crops_drop_background_like_the_pipeline():
    record = make_record()
    record["image"][:, :3] = -1000.0  # An air band in j < 3.
    every = grid.grid_crops(record, (4, 4, 4), 2, window=WINDOW)
    kept = grid.grid_crops(
        record, (4, 4, 4), 2, window=WINDOW, min_foreground=0.9, foreground_threshold=-900.0
    )
    # Stride 2: j starts 0, 2, ..., 16; those at 0 (3 of 4 rows air) and 2 (1 of 4) fall below 90 %.
    assert np.unique(every["starts"][:, 1]).tolist() == list(range(0, 17, 2))
    assert np.unique(kept["starts"][:, 1]).tolist() == list(range(4, 17, 2))
    assert len(every["starts"]) == 5 * 9 * 7 and len(kept["starts"]) == 5 * 7 * 7
    # The surviving crops keep their own voxels, centres and labels.
    first = kept["starts"][0]
    assert first.tolist() == [0, 4, 0]
    assert decode(kept["crops"][0, 0, 0, 0, 0]) == code(first)
    np.testing.assert_allclose(kept["centres"][0], [-5.5, 16.0, 9.25], rtol=1e-6)


def test_grid_crops_reject_a_wrong_rank_record():
    record = make_record()
    with pytest.raises(ValueError, match="record id=7: expected a 2D image"):
        grid.grid_crops(record, (4, 4), window=WINDOW)


def test_grid_features_on_the_phantom(test_config):
    def embed(crops):  # A stand-in encoder: mean and max intensity.
        flat = crops.reshape(len(crops), -1)
        return np.stack([flat.mean(1), flat.max(1)], axis=1)

    out = grid.grid_features(
        test_config.data, "test", {"stats": embed}, max_images=3, stride=8, with_crops=True
    )
    n = len(out["centres"])
    assert n > 0 and out["embeddings"]["stats"].shape == (n, 2)
    assert out["crops"].shape == (n, *test_config.data.crop_size, 1)
    assert len(np.unique(out["image_id"])) == 3
    np.testing.assert_allclose(out["embeddings"]["stats"], embed(out["crops"]))
    assert {"starts", "lesion_fraction", "has_lesion", "image_id"} <= set(out)


def test_embed_elements_stacks_or_concatenates_every_key():
    def elements():  # Two "images" of two crops each; the helper deletes "crops" in place.
        return [{"crops": np.full((2, 3), float(v)), "image_id": np.array([v, v])} for v in (1, 2)]

    def total(crops):
        return crops.sum(axis=1, keepdims=True)

    out = features.embed_elements(elements(), {"sum": total}, np.stack, with_crops=False)
    assert set(out) == {"image_id", "embeddings"}
    np.testing.assert_array_equal(out["image_id"], [[1, 1], [2, 2]])
    np.testing.assert_array_equal(out["embeddings"]["sum"], [[[3.0], [3.0]], [[6.0], [6.0]]])
    out = features.embed_elements(
        elements(), {"sum": total, "twice": lambda c: 2 * total(c)}, np.concatenate, with_crops=True
    )
    assert out["crops"].shape == (4, 3)
    np.testing.assert_array_equal(out["embeddings"]["sum"][:, 0], [3.0, 3.0, 6.0, 6.0])
    np.testing.assert_array_equal(out["embeddings"]["twice"][:, 0], [6.0, 6.0, 12.0, 12.0])
    assert features.embed_elements([], {"sum": total}, np.stack, with_crops=False) == {}

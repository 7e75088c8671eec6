import numpy as np
import pytest

from isimed import geometry
from isimed.data import pipeline
from isimed.evaluation import grid


def make_record(shape=(12, 20, 16), spacing=(3.0, 2.0, 1.5)):
    rng = np.random.default_rng(0)
    image = rng.uniform(-1000, 400, size=shape).astype(np.float32)
    image[:, :3] = -1000.0  # An air band: crops there have little foreground.
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


def test_grid_crops_match_geometry_and_pipeline_conventions():
    record = make_record()
    crop = (4, 4, 4)
    out = grid.grid_crops(record, crop, 4, window=(-1000.0, 1000.0))
    starts = out["starts"]
    assert len(starts) == len(grid.grid_starts(record["image"].shape, crop, 4))
    np.testing.assert_allclose(out["centres"], geometry.crop_centres_mm(starts, crop, record["affine"]),
                               rtol=1e-6)
    expected = pipeline.normalise_window(geometry.extract_crops(record["image"], starts, crop),
                                         (-1000.0, 1000.0))
    np.testing.assert_array_equal(out["crops"][..., 0], expected)
    assert out["crops"].shape == (len(starts), *crop, 1) and out["crops"].dtype == np.float32
    fraction = geometry.extract_crops(record["mask"], starts, crop).reshape(len(starts), -1).mean(1)
    np.testing.assert_allclose(out["lesion_fraction"], fraction, rtol=1e-6)
    np.testing.assert_array_equal(out["has_lesion"], fraction > 0)
    assert out["has_lesion"].sum() > 0
    assert np.all(out["image_id"] == 7)


def test_grid_crops_drop_background_like_the_pipeline():
    record = make_record()
    crop = (4, 4, 4)
    every = grid.grid_crops(record, crop, 2, window=(-1000.0, 1000.0))
    kept = grid.grid_crops(record, crop, 2, window=(-1000.0, 1000.0), min_foreground=0.9,
                           foreground_threshold=-900.0)
    assert 0 < len(kept["starts"]) < len(every["starts"])
    fg = geometry.extract_crops(record["image"], kept["starts"], crop) > -900.0
    assert np.all(fg.reshape(len(kept["starts"]), -1).mean(1) >= 0.9)


def test_grid_crops_reject_a_wrong_rank_record():
    record = make_record()
    with pytest.raises(ValueError, match="record id=7: expected a 2D image"):
        grid.grid_crops(record, (4, 4), window=(-1000.0, 1000.0))


def test_grid_features_on_the_phantom(test_config):
    def embed(crops):  # A stand-in encoder: mean and max intensity.
        flat = crops.reshape(len(crops), -1)
        return np.stack([flat.mean(1), flat.max(1)], axis=1)

    out = grid.grid_features(test_config.data, "test", {"stats": embed}, max_images=3, stride=8,
                             with_crops=True)
    n = len(out["centres"])
    assert n > 0 and out["embeddings"]["stats"].shape == (n, 2)
    assert out["crops"].shape == (n, *test_config.data.crop_size, 1)
    assert len(np.unique(out["image_id"])) == 3
    np.testing.assert_allclose(out["embeddings"]["stats"], embed(out["crops"]))
    assert {"starts", "lesion_fraction", "has_lesion", "image_id"} <= set(out)

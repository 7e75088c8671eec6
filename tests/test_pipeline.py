import os
import subprocess
import sys

import numpy as np
import pytest

from configs import isimed_chest
from isimed import geometry
from isimed import runtime
from isimed.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (12, 20, 18)


def coded_source(n=6, shape=SHAPE, spacing=(5.0, 0.7, 0.7)):
    """Images whose voxel value is their flat index, so a crop reveals where it was taken."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        mask = np.zeros(shape, np.uint8)
        if i % 2 == 0:
            mask[(slice(4, 8), slice(5, 10), slice(6, 12))[: len(shape)]] = 1
        q, _ = np.linalg.qr(rng.normal(size=(len(shape), len(shape))))
        affine = geometry.affine_from_spacing(spacing[: len(shape)], rng.normal(size=len(shape)) * 50, q)
        records.append(
            {
                "id": 100 + i,
                "image": np.arange(np.prod(shape), dtype=np.float32).reshape(shape),
                "affine": affine,
                "mask": mask,
            }
        )
    return records


def data_config(**overrides):
    c = isimed_chest.get_config("test").data
    c.crop_size = (4, 6, 5)
    c.crops_per_image = 5
    c.images_per_batch = 3
    c.window = (0.0, float(np.prod(SHAPE) - 1))
    c.min_foreground = 0.0
    c.update(overrides)
    return c


def decode_starts(crops, shape=SHAPE):
    """Crop start indices from the first voxel of each normalised coded crop."""
    lo, hi = 0.0, float(np.prod(shape) - 1)
    first = crops.reshape(crops.shape[0], -1)[:, 0]
    flat = np.rint((first + 1.0) / 2.0 * (hi - lo) + lo).astype(int)
    return np.stack(np.unravel_index(flat, shape), axis=-1)


def test_batch_shapes_centres_and_labels():
    source = coded_source()
    by_id = {r["id"]: r for r in source}
    cfg = data_config()
    # Evaluation batches carry the lesion labels (training batches skip them).
    batch = next(iter(pipeline.make_dataset(cfg, "train", seed=0, train=False, batch_size=3, source=source)))
    assert batch["crops"].shape == (3, 5, 4, 6, 5, 1) and batch["crops"].dtype == np.float32
    assert batch["centres"].shape == (3, 5, 3) and batch["centres"].dtype == np.float32
    assert batch["lesion_fraction"].shape == (3, 5) and batch["has_lesion"].shape == (3, 5)
    assert batch["image_id"].shape == (3,)
    assert np.all(np.abs(batch["crops"]) <= 1.0)
    for b, image_id in enumerate(batch["image_id"]):
        record = by_id[int(image_id)]
        starts = decode_starts(batch["crops"][b])
        # The crop really is the image at `starts` (not only its first voxel).
        for n, s in enumerate(starts):
            expected = pipeline.normalise_window(
                record["image"][tuple(slice(a, a + c) for a, c in zip(s, cfg.crop_size))], cfg.window
            )
            np.testing.assert_allclose(batch["crops"][b, n, ..., 0], expected, atol=1e-6)
        np.testing.assert_allclose(
            batch["centres"][b],
            geometry.crop_centres_mm(starts, cfg.crop_size, record["affine"]),
            atol=1e-3,
        )
        lesion = geometry.extract_crops(record["mask"], starts, cfg.crop_size)
        np.testing.assert_allclose(batch["lesion_fraction"][b], lesion.reshape(5, -1).mean(1), atol=1e-6)
        np.testing.assert_array_equal(batch["has_lesion"][b], lesion.reshape(5, -1).any(1))


def test_2d_images():
    shape = (30, 26)
    source = coded_source(4, shape=shape, spacing=(0.8, 0.8))
    cfg = data_config(crop_size=(8, 8), window=(0.0, float(np.prod(shape) - 1)))
    batch = next(iter(pipeline.make_dataset(cfg, "train", seed=0, train=True, source=source)))
    assert batch["crops"].shape == (3, 5, 8, 8, 1) and batch["centres"].shape == (3, 5, 2)


def take(ds_iter, n):
    return [next(ds_iter) for _ in range(n)]


def test_seeded_reproducible_and_shuffled():
    source = coded_source()
    cfg = data_config()
    a = take(iter(pipeline.make_dataset(cfg, "train", seed=7, train=True, source=source)), 4)
    b = take(iter(pipeline.make_dataset(cfg, "train", seed=7, train=True, source=source)), 4)
    c = take(iter(pipeline.make_dataset(cfg, "train", seed=8, train=True, source=source)), 4)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(a[0]["crops"], c[0]["crops"])
    # Two batches of 3 make one epoch of 6 images: every image once, not in storage order.
    ids = np.concatenate([a[0]["image_id"], a[1]["image_id"]])
    assert sorted(ids) == [r["id"] for r in source]
    orders = [
        tuple(
            np.concatenate(
                [
                    x["image_id"]
                    for x in take(
                        iter(pipeline.make_dataset(cfg, "train", seed=s, train=True, source=source)), 2
                    )
                ]
            )
        )
        for s in range(4)
    ]
    assert len(set(orders)) > 1


def test_epoch_shuffle_orders_every_epoch_anew():
    """Each run of n reads is one epoch holding every element once; epochs, and seeds, differ;
    the order is a function of (seed, index) alone; every element reaches every position about
    equally often."""
    n = 7
    parent = pipeline.grain.MapDataset.range(n)
    ds = pipeline.EpochShuffle(parent, seed=5)
    epochs = [[ds[e * n + i] for i in range(n)] for e in range(400)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs[:20]}) > 15
    again, other = pipeline.EpochShuffle(parent, seed=5), pipeline.EpochShuffle(parent, seed=6)
    assert epochs[3] == [again[3 * n + i] for i in range(n)]
    assert epochs[:3] != [[other[e * n + i] for i in range(n)] for e in range(3)]
    counts = np.zeros((n, n))
    for e in epochs:
        counts[np.arange(n), e] += 1  # counts[position, element]
    # Expected 400 / 7 = 57 per cell; 4.5 sigma is about 32.
    assert np.abs(counts - 400 / n).max() < 32, counts
    with pytest.raises(ValueError, match="empty"):
        pipeline.EpochShuffle(pipeline.grain.MapDataset.range(0), seed=0)


def test_iterator_state_restores_exact_stream():
    source = coded_source()
    cfg = data_config()
    it = iter(pipeline.make_dataset(cfg, "train", seed=3, train=True, source=source))
    take(it, 3)
    state = it.get_state()
    expected = take(it, 3)
    fresh = iter(pipeline.make_dataset(cfg, "train", seed=3, train=True, source=source))
    fresh.set_state(state)
    for x, y in zip(expected, take(fresh, 3)):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_process_shards_are_disjoint_and_cover_the_split():
    source = coded_source(6)
    cfg = data_config(images_per_batch=2)
    seen = []
    for index in range(2):
        ds = pipeline.make_dataset(
            cfg,
            "eval",
            seed=0,
            train=False,
            source=source,
            process_index=index,
            process_count=2,
            batch_size=1,
        )
        seen.append({int(x["image_id"][0]) for x in ds})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {r["id"] for r in source}


def test_eval_dataset_is_fixed_and_lesion_share_gives_positives():
    source = coded_source(4)
    cfg = data_config(crops_per_image=10)
    kwargs = dict(seed=1, train=False, batch_size=4, lesion_share=0.4, source=source)
    a = next(iter(pipeline.make_dataset(cfg, "eval", **kwargs)))
    b = next(iter(pipeline.make_dataset(cfg, "eval", **kwargs)))
    np.testing.assert_array_equal(a["crops"], b["crops"])
    for image_id, has in zip(a["image_id"], a["has_lesion"]):
        if (image_id - 100) % 2 == 0:  # Images with a lesion: at least 40% positive crops.
            assert has.sum() >= 4
        else:
            assert has.sum() == 0


def test_all_crops_on_lesions_with_a_foreground_minimum():
    """lesion_share=1 leaves no uniform crops to draw (the rejection sampler gets n=0)."""
    source = coded_source(4)
    cfg = data_config(crops_per_image=6, min_foreground=0.5)
    kwargs = dict(seed=1, train=False, batch_size=4, lesion_share=1.0, source=source)
    batch = next(iter(pipeline.make_dataset(cfg, "eval", **kwargs)))
    with_lesion = (batch["image_id"] - 100) % 2 == 0
    assert np.all(batch["has_lesion"][with_lesion] == 1) and batch["crops"].shape[1] == 6


def test_min_foreground_respected():
    source = coded_source(2)
    for r in source:
        r["image"] = np.full(SHAPE, -1000.0, np.float32)
        r["image"][:, 8:, :] = 0.0  # "Body" occupies the back of the volume.
    cfg = data_config(min_foreground=0.75, foreground_threshold=-500.0, window=(-1000.0, 1000.0))
    batch = next(iter(pipeline.make_dataset(cfg, "train", seed=0, train=True, batch_size=2, source=source)))
    body = batch["crops"] > -0.5
    assert np.all(body.reshape(2, 5, -1).mean(-1) >= 0.75)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda r: r["image"].__setitem__((1, 2, 3), np.nan), r"record id=100.*NaN"),
        (lambda r: r["affine"].__setitem__((slice(None), 1), 0.0), r"record id=100.*spacing"),
        (
            lambda r: r.update(image=r["image"][:3], mask=r["mask"][:3]),
            r"record id=100.*crop size \(4, 6, 5\).*\(3, 20, 18\)",
        ),
        (lambda r: r.__setitem__("mask", r["mask"][:, :4]), r"record id=100.*mask shape"),
        (lambda r: r.__setitem__("image", r["image"][0]), r"record id=100.*3D image"),
    ],
)
def test_bad_records_give_errors_naming_the_record(mutate, message):
    source = coded_source(1)
    mutate(source[0])
    cfg = data_config()
    with pytest.raises(ValueError, match=message):
        next(iter(pipeline.make_dataset(cfg, "train", seed=0, train=True, batch_size=1, source=source)))


def test_fewer_than_two_crops_is_an_error():
    with pytest.raises(ValueError, match="crops_per_image must be >= 2"):
        pipeline.make_dataset(
            data_config(crops_per_image=1), "train", seed=0, train=True, source=coded_source()
        )


def test_unknown_config_key_fails_on_the_command_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "main.py",
            "--config=configs/isimed_chest.py:test",
            "--config.data.crop_sise=4",
            f"--workdir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "crop_sise" in result.stderr


class _CountingSource:
    """Records of 1,000 bytes each; counts how often each is decoded."""

    def __init__(self, n=6):
        self.reads = [0] * n

    def __len__(self):
        return len(self.reads)

    def __getitem__(self, i):
        self.reads[i] += 1
        return {"id": np.int32(i), "image": np.full(1000, i, np.uint8)}


def test_record_cache_decodes_each_record_once_within_its_budget():
    import pickle

    source = _CountingSource()
    cache = pipeline.RecordCache(source, max_mb=3500 / 2**20)  # Room for 3 records.
    for i in (0, 1, 2, 0, 1, 2):
        assert int(cache[i]["image"][0]) == i
    assert source.reads[:3] == [1, 1, 1]
    cache[3]  # Evicts the least recently used record, 0.
    cache[1], cache[0]
    assert source.reads[:4] == [2, 1, 1, 1]
    fresh = pickle.loads(pickle.dumps(cache))  # A worker starts empty.
    fresh[1]
    assert source.reads[1] == 1 and fresh.source is not source


def test_cached_pipeline_gives_the_same_batches(test_config):
    data = test_config.data
    batches = {}
    for cache_mb in (0, 64):
        data.cache_mb = cache_mb
        it = iter(pipeline.make_dataset(data, "train", seed=3, train=True))
        batches[cache_mb] = [next(it) for _ in range(4)]
    for a, b in zip(batches[0], batches[64]):
        assert a.keys() == b.keys() == {"crops", "centres", "image_id"}  # No labels in training.
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


# ------------------------------------------------------------------------------------------------
# The fast crop path (one gather, float16 table look-ups, cached foreground maps) against the plain
# computation it replaced: the same crops for the same generator state.


def _plain_uniform_starts(rng, image, crop, n, threshold, min_foreground):
    """The rejection sampler as first written: cut every candidate, threshold it, take the mean."""
    accepted = []
    for _ in range(20):
        cand = geometry.sample_crop_starts(rng, image.shape, crop, 4 * n)
        fg = geometry.extract_crops(image, cand, crop) > threshold
        ok = cand[fg.reshape(len(cand), -1).mean(axis=1) >= min_foreground]
        accepted.extend(ok[: n - len(accepted)])
        if len(accepted) == n:
            return np.asarray(accepted)
    fg = image > threshold
    return geometry.sample_crop_starts(
        rng, image.shape, crop, n, foreground=fg, min_foreground=min_foreground
    )


def _head_record(dtype=np.float16, shape=(30, 34, 26)):
    """A noisy ellipsoid "head" in [-1, 1] on a -1 background, values near the -0.9 threshold too."""
    rng = np.random.default_rng(5)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.7
    image = np.where(inside, rng.uniform(-0.95, 1.0, shape), -1.0)
    image[0, 0, :8] = [-0.9, -0.89990234, -0.9001, 0.0, -0.0, 1.0, -1.0, -0.8999]  # float16 rounding.
    return {"id": np.int32(7), "image": image.astype(dtype), "affine": np.eye(4)}


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("views", [1, 2])
def test_fast_crops_equal_the_plain_computation(cached, views):
    crop, n = (8, 10, 6), 6
    record = _head_record()
    sampler = pipeline.SampleCrops(
        crop, n, window=None, min_foreground=0.5, foreground_threshold=-0.9, views=views, labels=False
    )
    fast_rng, plain_rng = np.random.default_rng(11), np.random.default_rng(11)
    source = pipeline.CachedRecord(record) if cached else record
    for _ in range(5):
        got = sampler.random_map(source, fast_rng)
        starts = _plain_uniform_starts(plain_rng, record["image"], crop, n, -0.9, 0.5)
        crops = geometry.extract_crops(record["image"], starts, crop).astype(np.float32)[..., None]
        np.testing.assert_array_equal(got["crops"], crops)
        np.testing.assert_array_equal(
            got["centres"], geometry.crop_centres_mm(starts, crop, record["affine"]).astype(np.float32)
        )
        if views == 2:
            shifted = sampler._shifted(plain_rng, starts, record["image"].shape)
            expected = geometry.extract_crops(record["image"], shifted, crop).astype(np.float32)
            np.testing.assert_array_equal(got["views"], expected[..., None])
    assert list(getattr(source, "memo", {})) == ([("foreground_map", crop, -0.9, 0.5)] if cached else [])


@pytest.mark.parametrize(
    "shape,crop",
    [((13, 11, 9), (4, 11, 3)), ((13, 11, 9), (1, 1, 1)), ((13, 11, 9), (13, 5, 9)), ((17, 12), (5, 4))],
)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_foreground_map_is_the_per_crop_test_at_every_position(shape, crop, dtype):
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, shape).astype(dtype)
    positions = [s - c + 1 for s, c in zip(shape, crop)]
    starts = np.stack(np.unravel_index(np.arange(np.prod(positions)), positions), axis=-1)
    for threshold, min_foreground in [(-0.2, 0.5), (0.3, 0.25), (-1.0, 1.0)]:
        packed = pipeline.foreground_map(image, crop, threshold, min_foreground)
        fg = geometry.extract_crops(image, starts, crop) > threshold
        expected = fg.reshape(len(starts), -1).mean(axis=1) >= min_foreground
        np.testing.assert_array_equal(pipeline.map_lookup(packed, starts, positions), expected)


def test_float16_shortcuts_equal_numpy_for_every_bit_pattern():
    every = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(256, 256)
    widened = pipeline.as_float32(every)
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened.view(np.uint32), every.astype(np.float32).view(np.uint32))
    # A Python float is compared in float16, a numpy float64 in float64: 0.09997 lies between two
    # float16 values, so the two give different answers, and both must match numpy.
    thresholds = (-0.9, 0.0, -0.0, 1e-8, 70000.0, -np.inf, np.inf, np.nan, 0.09997, np.float64(0.09997))
    for threshold in (*thresholds, np.float32(-0.3), np.float16(-65504.0)):
        with np.errstate(invalid="ignore", over="ignore"):  # numpy warns for 70000 -> float16.
            expected = every > threshold
            np.testing.assert_array_equal(pipeline.above(every, threshold), expected, err_msg=repr(threshold))
    assert np.sum(every > 0.09997) != np.sum(every > np.float64(0.09997))
    ints = np.arange(-5, 5, dtype=np.int16)
    np.testing.assert_array_equal(pipeline.as_float32(ints), ints.astype(np.float32))
    np.testing.assert_array_equal(pipeline.above(ints, 0.5), ints > 0.5)


def test_cut_crops_equals_extract_crops():
    image = np.arange(9 * 8 * 7, dtype=np.int16).reshape(9, 8, 7)
    starts = np.array([[0, 0, 0], [5, 3, 4], [2, 6, 1], [5, 3, 4]])
    crops = pipeline.cut_crops(image, starts, (4, 2, 3))
    np.testing.assert_array_equal(crops, geometry.extract_crops(image, starts, (4, 2, 3)))
    assert pipeline.cut_crops(image, np.zeros((0, 3), int), (4, 2, 3)).shape == (0, 4, 2, 3)


def test_cached_records_compute_their_foreground_map_once(monkeypatch):
    calls = []
    real = pipeline.foreground_map
    monkeypatch.setattr(pipeline, "foreground_map", lambda *a: calls.append(1) or real(*a))
    records = [dict(_head_record(), id=np.int32(i)) for i in range(3)]
    cfg = data_config(crop_size=(8, 10, 6), window=None, min_foreground=0.5, foreground_threshold=-0.9)
    cfg.images_per_batch, cfg.cache_mb = 3, 64
    batches = take(iter(pipeline.make_dataset(cfg, "train", seed=0, train=True, source=records)), 4)
    assert len(calls) == 3  # One map per record, over 4 epochs.
    cfg.cache_mb = 0
    plain = take(iter(pipeline.make_dataset(cfg, "train", seed=0, train=True, source=records)), 4)
    assert len(calls) == 3  # Records read each time are tested crop by crop.
    for a, b in zip(batches, plain):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_training_crops_of_float16_data_stay_float16_and_widen_to_the_same_values():
    record = _head_record()
    kwargs = dict(window=None, min_foreground=0.5, foreground_threshold=-0.9, views=2, labels=False)
    half = pipeline.SampleCrops((8, 10, 6), 6, widen=False, **kwargs)
    full = pipeline.SampleCrops((8, 10, 6), 6, **kwargs)
    a = half.random_map(record, np.random.default_rng(3))
    b = full.random_map(record, np.random.default_rng(3))
    for key in ("crops", "views"):
        assert a[key].dtype == np.float16 and b[key].dtype == np.float32
        np.testing.assert_array_equal(a[key].astype(np.float32), b[key])
    # make_dataset: float16 for training, float32 for evaluation; windowed data always float32.
    records = [dict(_head_record(), id=np.int32(i)) for i in range(3)]
    cfg = data_config(crop_size=(8, 10, 6), window=None, min_foreground=0.5, foreground_threshold=-0.9)
    for train, dtype in ((True, np.float16), (False, np.float32)):
        batch = next(iter(pipeline.make_dataset(cfg, "train", seed=0, train=train, source=records)))
        assert batch["crops"].dtype == dtype
    batch = next(
        iter(pipeline.make_dataset(data_config(), "train", seed=0, train=True, source=coded_source()))
    )
    assert batch["crops"].dtype == np.float32  # Windowed float data: normalised on the host.


def _ct_record():
    """Integer HU from air to bone, the window's edges and beyond included."""
    rng = np.random.default_rng(2)
    image = rng.integers(-1100, 1400, (20, 22, 18)).astype(np.int16)
    image[0, 0, :6] = [-1000, 1000, -1001, 1001, 0, 1]
    return {"id": np.int32(3), "image": image, "affine": np.eye(4)}


def test_training_crops_of_integer_data_stay_raw_and_window_on_the_device_to_the_same_values():
    import jax

    from isimed import train_state

    kwargs = dict(
        window=(-1000.0, 1000.0), min_foreground=0.0, foreground_threshold=-900.0, views=2, labels=False
    )
    raw = pipeline.SampleCrops((8, 10, 6), 6, widen=False, **kwargs).random_map(
        _ct_record(), np.random.default_rng(4)
    )
    host = pipeline.SampleCrops((8, 10, 6), 6, **kwargs).random_map(_ct_record(), np.random.default_rng(4))
    for key in ("crops", "views"):
        assert raw[key].dtype == np.int16 and host[key].dtype == np.float32
        device = jax.jit(train_state.unit_crops, static_argnums=1)(raw[key], (-1000.0, 1000.0))
        np.testing.assert_array_equal(np.asarray(device).view(np.uint32), host[key].view(np.uint32))
        assert host[key].min() == -1.0 and host[key].max() == 1.0


def test_float16_and_integer_training_crops_give_the_same_step_and_monitors():
    from isimed import train_state

    config = isimed_chest.get_config("test")
    setup = train_state.create_train_step(config, runtime.make_mesh())
    rng = np.random.default_rng(0)
    b, k, crop = config.data.images_per_batch, config.data.crops_per_image, config.data.crop_size
    half = {
        "crops": rng.uniform(-1, 1, (b, k, *crop, 1)).astype(np.float16),
        "centres": rng.uniform(-100, 100, (b, k, 3)).astype(np.float32),
    }
    full = {key: value.astype(np.float32) for key, value in half.items()}
    # Integer HU crops, windowed by the step, against the host's windowing of the same crops.
    lo, hi = (int(v) for v in config.data.window)
    hu = {**half, "crops": rng.integers(lo - 200, hi + 200, half["crops"].shape).astype(np.int16)}
    windowed = {**half, "crops": pipeline.normalise_window(hu["crops"], config.data.window)}
    for a, b in ((half, full), (hu, windowed)):
        _assert_same_step_and_monitors(setup, a, b)


def _assert_same_step_and_monitors(setup, *batches):
    import jax

    results = []
    for batch in batches:
        state, metrics = setup.step(jax.tree.map(np.array, setup.state), batch)
        results.append((state, metrics.compute(), setup.monitors(setup.state, batch)))
    for x, y in zip(*(jax.tree.leaves(r) for r in results)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_rotated_pretraining_crops_keep_their_centres_and_labelled_crops_stay_unrotated():
    source = coded_source()
    plain_cfg, rotated_cfg = data_config(), data_config(rotate_deg=10.0)

    def first(cfg, **kw):
        return next(iter(pipeline.make_dataset(cfg, "train", seed=0, train=True, source=source, **kw)))

    plain, rotated = first(plain_cfg), first(rotated_cfg)
    # Positions are drawn before the angles: the same centres, hence the same distance targets.
    np.testing.assert_array_equal(rotated["centres"], plain["centres"])
    assert rotated["crops"].dtype == np.float32 and rotated["crops"].shape == plain["crops"].shape
    diff = np.abs(rotated["crops"] - plain["crops"].astype(np.float32)).reshape(len(plain["crops"]), 5, -1)
    assert np.all(diff.max(-1) > 1e-3)  # Every crop was turned.
    # Labelled training crops (fine-tuning) are labelled from the unrotated box: never rotated.
    np.testing.assert_array_equal(
        first(rotated_cfg, labels=True)["crops"], first(plain_cfg, labels=True)["crops"]
    )
    # Two views: both are rotated, each with its own angles.
    two = first(data_config(rotate_deg=10.0, crops_per_image=10), views=2)
    assert two["views"].shape == two["crops"].shape and not np.allclose(two["views"], two["crops"])

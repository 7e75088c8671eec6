import json
import os
import shutil

import numpy as np
import pytest

from configs import linear_eval_chest
from isimed import checkpoints
from isimed.data import phantom
from isimed.data import structures
from isimed.evaluation import context_tasks
from isimed.evaluation import linear_eval
from isimed.evaluation import metrics


@pytest.fixture
def eval_config(pretrained):
    config = linear_eval_chest.get_config("test")
    config.pretrain_workdir = pretrained[0]
    return config


def scalars(tree, prefix=""):
    """Every number in a nested results dict, keyed by its path."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(scalars(v, f"{prefix}/{k}"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(scalars(v, f"{prefix}/{i}"))
        return out
    return {prefix: tree} if isinstance(tree, (int, float)) else {}


def test_checkpoint_evaluates_end_to_end_and_reproducibly(eval_config, tmp_path):
    first = linear_eval.evaluate(eval_config, str(tmp_path / "a"))
    assert set(first["feature_sets"]) == set(linear_eval.FEATURE_SETS)
    for name, row in first["feature_sets"].items():
        for metric in ("auc", "accuracy", "f1", "sensitivity", "specificity"):
            assert np.isfinite(row["lesion_crop"]["mean"][metric]), (name, metric)
        assert row["rankme"] >= 1.0
    table = open(tmp_path / "a" / "results.md").read()
    assert "pretrained" in table and "random_init" in table and "raw_intensity" in table
    # The phantom carries structure labels: every feature set gets the context tasks.
    assert first["tasks"]["context"]
    for name, row in first["feature_sets"].items():
        assert np.isfinite(row["nodule_hard"]["mean"]["auc"]), name
        assert np.isfinite(row["anatomy"]["mean"]["accuracy"]), name
        assert set(row["nodule_hard"]["auc_vs"]) == set(context_tasks.NEGATIVE_KINDS)
    headroom = first["headroom"]["nodule_hard"]
    raw, random = (
        first["feature_sets"][n]["nodule_hard"]["mean"]["auc"] for n in ("raw_intensity", "random_init")
    )
    assert headroom["headroom"] == pytest.approx(1.0 - max(raw, random))
    assert "| nodule_hard | auc |" in table and "anatomy macro AUC" in table
    assert json.load(open(tmp_path / "a" / "results.json"))["checkpoint_step"] == first["checkpoint_step"]
    # Evaluating the same checkpoint again: identical numbers (nothing carried across folds/models).
    second = linear_eval.evaluate(eval_config, str(tmp_path / "b"))
    a, b = scalars(first["feature_sets"]), scalars(second["feature_sets"])
    assert a.keys() == b.keys() and len(a) > 50
    for key in a:
        assert a[key] == b[key] or (np.isnan(a[key]) and np.isnan(b[key])), key


def test_no_subject_in_two_parts_of_any_fold(eval_config, tmp_path):
    results = linear_eval.evaluate(eval_config, str(tmp_path))
    for row in results["feature_sets"].values():
        tested = []
        for train_ids, val_ids, test_ids in row["lesion_crop"]["fold_subjects"]:
            assert not set(train_ids) & set(test_ids)
            assert not set(val_ids) & set(test_ids)
            assert not set(train_ids) & set(val_ids)
            tested += list(test_ids)
        assert sorted(tested) == sorted(set(tested))  # Each subject evaluated exactly once.
        assert len(tested) == results["num_subjects"]


def test_missing_checkpoint_is_a_clear_error(eval_config, tmp_path):
    eval_config.pretrain_workdir = str(tmp_path / "nothing_here")
    with pytest.raises(FileNotFoundError, match="no checkpoints in .*nothing_here"):
        linear_eval.evaluate(eval_config, str(tmp_path / "out"))


def test_mismatched_encoder_is_a_clear_error(pretrained, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(pretrained[0], workdir)
    step_dir = (
        workdir
        / "checkpoints"
        / max(os.listdir(workdir / "checkpoints"), key=lambda d: int(d) if d.isdigit() else -1)
    )
    config_file = step_dir / "config" / "metadata"
    stored = json.load(open(config_file))
    stored["model"]["embed_dim"] = 7
    json.dump(stored, open(config_file, "w"))
    with pytest.raises(ValueError, match="does not match.*embed_dim|expected.*found"):
        checkpoints.load_encoder(str(workdir))


def test_pretraining_adds_position_information(eval_config, tmp_path):
    """What ISImed is trained for must show in the report: crop positions are read off the
    pretrained features better than off the same encoder at initialisation."""
    rows = linear_eval.evaluate(eval_config, str(tmp_path))["feature_sets"]
    assert rows["pretrained"]["spearman_within"] > rows["random_init"]["spearman_within"] + 0.15
    assert (
        rows["pretrained"]["position_probe"]["mae_mm"] < 0.9 * rows["random_init"]["position_probe"]["mae_mm"]
    )


def test_select_step_picks_the_best_saved_validation_step(tmp_path):
    for step in (100, 200, 300):
        (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
    (tmp_path / "checkpoints" / "tmp_save").mkdir()  # Not a step: ignored.
    rows = [
        {"step": 50, "train/loss": 1.0},
        {"step": 100, "validation/spearman_within": 0.3},
        {"step": 200, "validation/spearman_within": 0.7},
        {"step": 300, "validation/spearman_within": 0.5},
        {"step": 400, "validation/spearman_within": 0.9},  # Best, but its checkpoint is gone.
    ]
    log = tmp_path / "metrics.jsonl"
    # A run killed mid-write leaves a truncated last line.
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 500, "validation/spe')
    assert linear_eval._select_step(str(tmp_path), "best") == 200
    # A resumed run logs step 300 again; the later value (the run that continued) counts.
    log.write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
        + json.dumps({"step": 300, "validation/spearman_within": 0.8})
        + "\n"
    )
    assert linear_eval._select_step(str(tmp_path), "best") == 300
    assert linear_eval._select_step(str(tmp_path), "latest") is None
    assert linear_eval._select_step(str(tmp_path), "50") == 50
    log.write_text(json.dumps({"step": 400, "validation/spearman_within": 0.9}) + "\n")
    with pytest.raises(FileNotFoundError, match="saved steps: \\[100, 200, 300\\]"):
        linear_eval._select_step(str(tmp_path), "best")


SPEC = phantom.PhantomSpec(shape=(32, 48, 48), spacing=(10.0, 7.0, 7.0))


def phantom_record(index: int) -> dict:
    s = phantom.generate_subject(SPEC, 0, index)
    return {
        "id": index,
        "image": s["image"],
        "mask": s["mask"],
        "affine": s["affine"],
        "structures": s["labels"],
    }


def test_context_task_labels_match_a_brute_force_computation():
    sampling = context_tasks.Sampling(crop_shape=(6, 8, 8), window=(-1000.0, 400.0), positives=5, negatives=4)
    record = next(r for r in map(phantom_record, range(10)) if r["mask"].any())
    out = context_tasks.task_crops(record, sampling, np.random.default_rng(0))
    labels, mask = record["structures"], record["mask"] > 0
    pleura = structures.pleura_mask(labels)
    lungs = [structures.STRUCTURES["lung_left"], structures.STRUCTURES["lung_right"]]
    n = len(out["starts"])
    assert all(len(v) == n for v in out.values())
    nodule_task = context_tasks.TASKS.index("nodule")
    for row in range(n):
        k, j, i = out["starts"][row]
        crop_mask = mask[k : k + 6, j : j + 8, i : i + 8]
        assert crop_mask.shape == (6, 8, 8)
        assert out["has_lesion"][row] == int(crop_mask.any())
        centre = (k + 2, j + 3, i + 3)  # start + (crop - 1) // 2
        name = (
            context_tasks.ANATOMY_CLASSES[out["structure"][row]]
            if out["structure"][row] >= 0
            else "background"
        )
        assert structures.STRUCTURES[name] == labels[centre]
        np.testing.assert_allclose(
            out["crops"][row, ..., 0],
            np.clip((record["image"][k : k + 6, j : j + 8, i : i + 8] + 300.0) / 700.0, -1, 1),
            atol=1e-6,
        )
        if out["task"][row] != nodule_task:
            continue
        kind = out["kind"][row]
        # A crop at the image edge may have been moved off its centre voxel by clipping.
        edge = np.subtract(mask.shape, (6, 8, 8))
        at_edge = np.any(out["starts"][row] == 0) or np.any(out["starts"][row] == edge)
        assert (kind == -1) == bool(out["has_lesion"][row])  # positives hold nodule, negatives none
        if kind >= 0 and not at_edge:
            expected = {
                "vessel": labels[centre] == structures.STRUCTURES["vessel"],
                "pleura": pleura[centre],
                "lung": labels[centre] in lungs,
            }
            assert expected[context_tasks.NEGATIVE_KINDS[kind]]
    counts = np.bincount(out["task"], minlength=3)
    assert counts[nodule_task] == 5 + 3 * 4
    assert np.all(out["has_nodule"]) and np.all(out["image_id"] == record["id"])
    present = {c for c in np.unique(labels) if c != 0}
    anatomy = out["structure"][out["task"] == context_tasks.TASKS.index("anatomy")]
    assert {structures.STRUCTURES[context_tasks.ANATOMY_CLASSES[c]] for c in anatomy} <= present
    # Same rng seed: the same crops (every feature set sees the same ones).
    again = context_tasks.task_crops(record, sampling, np.random.default_rng(0))
    np.testing.assert_array_equal(out["starts"], again["starts"])


def test_image_features_are_the_mean_and_max_of_each_image():
    x = np.arange(12.0).reshape(6, 2)
    ids = np.array([3, 1, 3, 1, 1, 3])
    got_ids, got = context_tasks.image_features(x, ids)
    np.testing.assert_array_equal(got_ids, [1, 3])
    np.testing.assert_allclose(got[0], [(2 + 6 + 8) / 3, (3 + 7 + 9) / 3, 8, 9])
    np.testing.assert_allclose(got[1], [(0 + 4 + 10) / 3, (1 + 5 + 11) / 3, 10, 11])


def test_multiclass_metrics_by_hand():
    y = np.eye(3)[[0, 1, 2, 2]]
    prob = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3]])
    out = metrics.multiclass_metrics(y, prob)
    assert out["accuracy"] == 0.5  # rows 0 and 2 right
    # One-vs-rest AUCs: class 0: 1.0 (0.6 > 0.5, 0.1, 0.2); class 1: 0.4 beats 0.3, 0.2, loses to 0.5 -> 2/3;
    # class 2: positives 0.7, 0.3 against 0.1, 0.1 -> 1.0.
    np.testing.assert_allclose(out["auc_per_class"], [1.0, 2 / 3, 1.0])
    assert out["macro_auc"] == pytest.approx((1.0 + 2 / 3 + 1.0) / 3)
    with pytest.raises(ValueError, match="one-hot"):
        from isimed.evaluation import probes

        probes.fit_linear_probe(
            np.ones((4, 2)), np.ones((4, 3)), np.ones((2, 2)), np.eye(3)[[0, 1]], task="multiclass"
        )


def test_headroom_is_one_minus_the_best_baseline():
    rows = {
        "pretrained": {"nodule_hard": {"mean": {"auc": 0.9}}},
        "random_init": {"nodule_hard": {"mean": {"auc": 0.7}}},
        "raw_intensity": {"nodule_hard": {"mean": {"auc": 0.8}}},
    }
    h = context_tasks.headroom(rows)["nodule_hard"]
    assert h["best_baseline"] == "raw_intensity" and h["headroom"] == pytest.approx(0.2)
    assert h["best_pretrained"] == "pretrained" and h["gain"] == pytest.approx(0.1)


def test_multiclass_probe_separates_clusters_and_returns_distributions():
    from isimed.evaluation import probes

    rng = np.random.default_rng(0)
    centres = np.array([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    classes = rng.integers(0, 3, size=300)
    x = centres[classes] + rng.normal(size=(300, 2))
    y = np.eye(3)[classes]
    probe = probes.fit_linear_probe(
        x[:200], y[:200], x[200:250], y[200:250], task="multiclass", epochs=20, batch_size=16
    )
    prob = probe.predict(x[250:])
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-9)
    assert metrics.multiclass_metrics(y[250:], prob)["accuracy"] > 0.9

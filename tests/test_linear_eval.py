import json
import os
import shutil

import numpy as np
import pytest

from configs import linear_eval_chest
from isimed import train
from isimed.evaluation import linear_eval


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
    step_dir = workdir / "checkpoints" / max(os.listdir(workdir / "checkpoints"), key=lambda d: int(d) if d.isdigit() else -1)
    config_file = step_dir / "config" / "metadata"
    stored = json.load(open(config_file))
    stored["model"]["embed_dim"] = 7
    json.dump(stored, open(config_file, "w"))
    with pytest.raises(ValueError, match="does not match.*embed_dim|expected.*found"):
        train.load_checkpoint(str(workdir))


def test_pretraining_adds_position_information(eval_config, tmp_path):
    """What ISImed is trained for must show in the report: crop positions are read off the
    pretrained features better than off the same encoder at initialisation."""
    rows = linear_eval.evaluate(eval_config, str(tmp_path))["feature_sets"]
    assert rows["pretrained"]["spearman_within"] > rows["random_init"]["spearman_within"] + 0.15
    assert rows["pretrained"]["position_probe"]["mae_mm"] < 0.9 * rows["random_init"]["position_probe"]["mae_mm"]


def test_best_checkpoint_is_the_best_logged_validation_step(pretrained):
    workdir = pretrained[0]
    saved = {int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()}
    logged = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        row = json.loads(line)
        if "validation/spearman_within" in row and row["step"] in saved:
            logged[row["step"]] = row["validation/spearman_within"]
    assert len(logged) >= 2
    assert linear_eval._select_step(workdir, "best") == max(logged, key=logged.get)
    assert linear_eval._select_step(workdir, "latest") is None
    assert linear_eval._select_step(workdir, "50") == 50

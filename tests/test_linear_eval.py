import json
import os
import shutil

import numpy as np
import pytest

from configs import linear_eval_chest
from isimed import checkpoints
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

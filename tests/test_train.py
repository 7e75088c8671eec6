import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from sharding_check import assert_same_step

from configs import isimed_chest
from isimed import checkpoints
from isimed import runtime
from isimed import train
from isimed import train_state
from isimed.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "crop, problem",
    [
        ((33, 48, 48), r"data.crop_size \(33, 48, 48\) does not fit in its image of size \(32, 48, 48\)"),
        ((32, 48, 49), r"data.crop_size \(32, 48, 49\) does not fit in its image of size \(32, 48, 48\)"),
        ((7, 7), r"data.crop_size \(7, 7\) has 2 axes but the images are 3D \(shape \(32, 48, 48\)\)"),
    ],
)
def test_crop_size_checked_before_anything_is_generated_written_or_compiled(tmp_path, crop, problem):
    config = isimed_chest.get_config("test")
    config.data.tfds_dir = str(tmp_path / "tfds")
    config.data.crop_size = (32, 48, 48)  # The tiny phantom's shape: the exact fit passes.
    pipeline.check_crops_fit(config.data, ["train", "validation", "test"])
    config.data.crop_size = crop
    with pytest.raises(ValueError, match=r"^chest_phantom/tiny3d split 'train': " + problem):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path)) == []  # No phantom generated, no workdir made.


@pytest.mark.parametrize("config_name", ["isimed_chest", "isimed_chest:method=isimed_vicreg"])
def test_one_device_equals_eight_devices(run_on_devices, config_name):
    one = run_on_devices("tests/sharding_check.py", 1, config_name)
    eight = run_on_devices("tests/sharding_check.py", 8, config_name)
    assert int(one.pop("devices")) == 1 and int(eight.pop("devices")) == 8
    assert_same_step(one, eight)


def test_preset_learns_and_writes_outputs(pretrained, test_config):
    workdir, summary = pretrained
    tmp_path = Path(workdir)
    before = summary["initial"]["spearman_within"]
    after = summary["validation"]["spearman_within"]
    assert after > before + 0.15, (before, after)
    # Embeddings locate crops better than raw intensities do.
    probe = summary["final"]["position_probe"]["mae_mm"]
    assert probe < summary["final"]["position_probe_raw_intensity"]["mae_mm"]
    assert json.load(open(tmp_path / "summary.json"))["step"] == test_config.total_steps
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert max(line["step"] for line in lines) == test_config.total_steps
    assert "train/loss" in lines[-2] or "train/loss" in lines[-1]
    for png in ("training_curves.png", "distance_scatter.png", "pca.png"):
        assert (tmp_path / png).stat().st_size > 10_000, png


def restored_params(workdir):
    _, _, state = checkpoints.load_encoder(workdir)
    return int(state["step"]), state["params"]


def test_sigterm_checkpoint_then_resume_equals_straight_run(test_config, tmp_path):
    steps = 40
    test_config.total_steps = steps
    test_config.eval_every = 1000
    test_config.checkpoint_every = 50
    straight = tmp_path / "straight"
    train.train_and_evaluate(test_config, str(straight))

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [
            sys.executable,
            "main.py",
            "--config=configs/isimed_chest.py:test",
            f"--config.data.tfds_dir={test_config.data.tfds_dir}",
            f"--config.total_steps={steps}",
            "--config.eval_every=1000",
            "--config.checkpoint_every=50",
            f"--workdir={interrupted}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:  # Interrupt at the first training log line.
        if line.startswith("step 10:"):
            proc.send_signal(signal.SIGTERM)
            break
    output = line + proc.stdout.read()
    assert proc.wait(timeout=120) == 0, output
    assert "Preempted" in output
    step, _ = restored_params(str(interrupted))  # The SIGTERM checkpoint restores.
    assert 10 <= step < steps

    train.train_and_evaluate(test_config, str(interrupted))
    a, b = checkpoints.read_state(straight, steps), checkpoints.read_state(interrupted, steps)
    assert jax.tree.structure(a) == jax.tree.structure(b) and int(b["step"]) == steps
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(test_config, tmp_path, monkeypatch):
    test_config.total_steps = 20
    test_config.checkpoint_every = 20
    train.train_and_evaluate(test_config, str(tmp_path))
    test_config.total_steps = 40  # May change on resume.
    next_batch = train._Run.next_batch

    def poisoned(run):  # Non-finite inputs -> non-finite loss.
        batch = next_batch(run)
        return {**batch, "crops": batch["crops"] * np.nan}

    monkeypatch.setattr(train._Run, "next_batch", poisoned)
    with pytest.raises(FloatingPointError, match="Last good checkpoint: step 20"):
        train.train_and_evaluate(test_config, str(tmp_path))
    step, params = restored_params(str(tmp_path))
    assert step == 20
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("scale_mm, grows", [(1.0, True), (1e4, False)])
def test_learnable_scale_moves_toward_the_embedding_distances(test_config, scale_mm, grows):
    """Targets far above the embeddings' distances (scale 1 mm) make the learned scale grow; far
    below (scale 10 m) make it shrink."""
    test_config.loss.learnable_scale = True
    test_config.loss.scale = scale_mm
    test_config.optim.learning_rate = 0.05
    setup = train_state.create_train_step(test_config, runtime.make_mesh())
    state = setup.state
    assert float(np.exp(state["params"]["log_scale"])) == pytest.approx(scale_mm)
    rng = np.random.default_rng(0)
    b, k, c = 4, test_config.data.crops_per_image, test_config.data.crop_size
    batch = {
        "crops": rng.uniform(-1, 1, size=(b, k, *c, 1)).astype(np.float32),
        "centres": rng.uniform(-150, 150, size=(b, k, 3)).astype(np.float32),
    }
    for _ in range(10):
        state, metrics = setup.step(state, batch)
    ratio = float(metrics.compute()["target_scale"]) / scale_mm
    assert ratio > 1.2 if grows else ratio < 1 / 1.2, ratio

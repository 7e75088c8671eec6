"""Fine-tuning (`isimed.finetune`) on the one training loop: the encoder it starts from, the frozen
mode, the nested subject-disjoint label fractions, bit-exact resume, and a head that learns the
phantom's lesion task."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import finetune_chest
from isimed import checkpoints
from isimed import export
from isimed import finetune
from isimed import train
from isimed import workdir as workdir_layout
from isimed.data import pipeline
from isimed.data import structures
from isimed.evaluation import context_tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _same_bits(a, b) -> list[str]:
    """Paths of the leaves that differ in dtype, shape or any bit (of two trees of one structure)."""
    a, b = _leaves(a), _leaves(b)
    assert set(a) == set(b)
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()]


def _config(pretrained, arg="test", **overrides):
    config = finetune_chest.get_config(arg)
    config.pretrain_workdir = pretrained[0]
    config.update_from_flattened_dict(overrides)
    return config


def _stored_encoder(state):
    """The encoder's parameters and running statistics of a `checkpoints.read_state` tree."""
    return state["params"]["encoder"], state["batch_stats"]


@pytest.mark.parametrize("init", ["pretrained", "random", "export"])
def test_starts_from_exactly_the_chosen_encoder(pretrained, tmp_path, init):
    config_, networks, state = checkpoints.load_encoder(pretrained[0])
    if init == "export":
        path = export.export(pretrained[0], "npz", out=str(tmp_path / "encoder.npz"))["path"]
        config = _config(pretrained, "test,init=export", init_export=path)
        expected = (state["params"]["encoder"], state["batch_stats"])
    elif init == "random":
        config = _config(pretrained, "test,init=random")
        expected = (networks.params, networks.batch_stats)
    else:
        config = _config(pretrained)
        expected = (state["params"]["encoder"], state["batch_stats"])
    job = finetune.make_job(config, workdir_layout.Workdir(tmp_path / "ft"))
    start = (job.state["params"]["encoder"], job.state["batch_stats"])
    assert not _same_bits(start, expected)
    # The random init differs from the pretrained weights, so each case checks its source.
    assert _same_bits(networks.params, state["params"]["encoder"])
    head = job.state["params"]["head"]
    assert not np.any(np.asarray(head["kernel"])) and not np.any(np.asarray(head["bias"]))
    assert int(job.state["step"]) == 0


@pytest.mark.parametrize("mode", ["linear", "full"])
def test_linear_mode_leaves_the_encoder_bit_identical(pretrained, tmp_path, mode):
    _, _, state = checkpoints.load_encoder(pretrained[0])
    before = checkpoints.read_state(pretrained[0], int(state["step"]))  # As orbax stores it.
    config = _config(pretrained, f"test,mode={mode},fraction=0.5", total_steps=12, eval_every=12)
    results = finetune.finetune(config, str(tmp_path))
    assert results["final_step"] == 12
    after = checkpoints.read_state(str(tmp_path), 12)
    changed = _same_bits(_stored_encoder(after), _stored_encoder(before))
    if mode == "linear":
        assert not changed, changed
    else:  # The same check sees a trained encoder (parameters and running statistics).
        assert any(k.startswith("[0]") for k in changed) and any(k.startswith("[1]") for k in changed)
    assert np.any(np.asarray(after["params"]["head"]["kernel"]))


def test_label_fractions_are_nested_and_subject_disjoint(pretrained, tmp_path):
    num_train = 40
    sizes = [2] + [finetune.num_label_subjects(num_train, f, None) for f in (0.05, 0.1, 0.25, 1.0)]
    subsets = [set(finetune.label_subjects(num_train, n, seed=3)) for n in sizes]
    assert [len(s) for s in subsets] == [2, 2, 4, 10, 40]
    for small, large in zip(subsets, subsets[1:]):
        assert small <= large
    assert subsets[2] != set(finetune.label_subjects(num_train, 4, seed=4))  # The seed matters.

    config = _config(pretrained, "test,fraction=0.25")
    job = finetune.make_job(config, workdir_layout.Workdir(tmp_path))
    data = job.config.data
    chosen = finetune.label_subjects(len(finetune.split_ids(data, "train")), 3, config.split_seed)
    labelled = set(finetune.split_ids(data, "train", chosen))
    seen = set()
    for _ in range(8):  # What training actually reads: only labelled subjects' crops.
        seen |= {int(i) for i in np.asarray(next(job.data_iter)["image_id"]).reshape(-1)}
    assert seen == labelled and len(labelled) == 3
    held = set(finetune.split_ids(data, "validation")) | set(finetune.split_ids(data, "test"))
    assert held and not (labelled & held)
    assert not set(finetune.split_ids(data, "validation")) & set(finetune.split_ids(data, "test"))


def test_interrupted_at_a_checkpoint_and_resumed_equals_a_straight_run(pretrained, tmp_path, monkeypatch):
    config = _config(
        pretrained,
        "test,mode=full,fraction=0.5",
        total_steps=24,
        eval_every=8,
        checkpoint_every=8,
        **{"finetune.head_only_steps": 4},
    )
    straight = finetune.finetune(config, str(tmp_path / "straight"))

    reached = train._Preemption.reached
    monkeypatch.setattr(train._Preemption, "reached", lambda self, step: step == 13)  # A SIGTERM.
    assert finetune.finetune(config, str(tmp_path / "resumed")) == {"preempted_at_step": 13}
    monkeypatch.setattr(train._Preemption, "reached", reached)
    resumed = finetune.finetune(config, str(tmp_path / "resumed"))
    assert "resumed from step 13" in (tmp_path / "resumed" / "log.txt").read_text()

    a, b = (checkpoints.read_state(str(tmp_path / name), 24) for name in ("straight", "resumed"))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert not _same_bits(a, b)
    assert resumed == straight
    assert json.loads((tmp_path / "resumed" / "results.json").read_text()) == straight


def test_a_head_on_random_init_beats_chance_on_held_out_subjects(pretrained, tmp_path):
    config = _config(pretrained, "test,mode=full,init=random,fraction=0.5")
    results = finetune.finetune(config, str(tmp_path))
    assert results["test_subjects"] >= 4 and results["train_subjects"] == 6
    assert results["test_auc"] > 0.65, results
    # Selected on validation only: the reported step is the validation curve's best.
    best = max(auc for _, auc in results["validation_curve"])
    assert results["validation_auc"] == best
    assert results["selected_step"] == min(s for s, auc in results["validation_curve"] if auc == best)


def test_selection_reads_validation_only_and_takes_the_earliest_best():
    assert finetune.select_step([(0, 0.5), (10, 0.8), (20, float("nan")), (30, 0.8)]) == (10, 0.8)
    with pytest.raises(finetune.FinetuneError):
        finetune.select_step([(0, float("nan"))])


def test_config_argument_and_default_workdir():
    config = finetune_chest.get_config("test,init=random,mode=full,fraction=0.05")
    assert (config.mode, config.init, config.fraction) == ("full", "random", 0.05)
    config.pretrain_workdir = "/runs/a"
    assert finetune.default_workdir(config) == "/runs/a/finetune_full_0.05_random"
    config = finetune_chest.get_config("demo,subjects=2")
    config.pretrain_workdir = "/runs/a"
    assert finetune.default_workdir(config) == "/runs/a/finetune_linear_2subjects"
    for bad in ("test,mode=half", "test,fraction=0", "test,colour=red", "huge"):
        with pytest.raises(ValueError):
            finetune_chest.get_config(bad)


def test_structure_task_labels_the_structure_at_the_crop_centre(pretrained, tmp_path):
    config = _config(pretrained, "test,task=structure,fraction=0.5", total_steps=30, eval_every=15)
    job = finetune.make_job(config, workdir_layout.Workdir(tmp_path / "job"))
    record = pipeline.open_source(job.config.data, "train")[0]
    sampler = finetune.make_sampler(job.config, 64, train=False)
    out = sampler.random_map(record, np.random.default_rng(0))
    centres = out["starts"] + (np.asarray(job.config.data.crop_size) - 1) // 2
    name_of = {value: name for name, value in structures.STRUCTURES.items()}
    names = [name_of[v] for v in np.asarray(record["structures"])[tuple(centres.T)]]
    classes = finetune.STRUCTURE_CLASSES
    expected = [classes.index(n) if n in classes else -1 for n in names]
    assert out["label"].tolist() == expected and len(set(expected)) > 3

    results = finetune.finetune(config, str(tmp_path / "run"))
    assert results["task"] == "structure_at_centre"
    assert results["test_auc"] > 0.6, results  # Macro one-vs-rest AUC; chance is 0.5.


def test_head_input_is_the_embedding_or_each_row_standardised():
    z = np.random.default_rng(1).normal(3.0, 0.05, size=(6, 16)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(finetune.head_input(z, "none")), z)
    reference = (z - z.mean(1, keepdims=True)) / z.std(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(finetune.head_input(z, "layer")), reference, rtol=1e-3, atol=1e-3)


def test_image_task_pools_each_images_crops_as_linear_evaluation_does():
    """Training and scoring pool an image's crops with `pool_image` (a reshape); linear
    evaluation's image features group crop rows by image id: the same features."""
    z = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32)
    ids, reference = context_tasks.image_features(z.reshape(35, 3), np.repeat(np.arange(5), 7))
    np.testing.assert_allclose(np.asarray(finetune.pool_image(z)), reference, rtol=1e-6)


def test_image_task_labels_subjects_and_reads_their_lungs(pretrained, tmp_path):
    config = _config(pretrained, "test,task=image,fraction=0.5", total_steps=20, eval_every=10)
    job = finetune.make_job(config, workdir_layout.Workdir(tmp_path / "job"))
    source = pipeline.open_source(job.config.data, "train")
    sampler = finetune.make_sampler(job.config, 16, train=False)
    in_lung = {structures.STRUCTURES[n] for n in ("lung_left", "lung_right", "vessel", "nodule")}
    labels = []
    for i in range(len(source)):
        record = source[i]
        out = sampler.random_map(record, np.random.default_rng(i))
        labels.append(int(out["label"][0]))
        assert labels[-1] == int(np.any(np.asarray(record["mask"]) > 0))
        centres = out["starts"] + (np.asarray(job.config.data.crop_size) - 1) // 2
        assert set(np.asarray(record["structures"])[tuple(centres.T)].tolist()) <= in_lung
        assert out["crops"].shape[0] == 16
    assert set(labels) == {0, 1}  # Subjects with and without nodules.

    results = finetune.finetune(config, str(tmp_path / "run"))
    assert results["task"] == "nodule_image" and results["metric"] == "auc"
    assert [s for s, _ in results["validation_curve"]] == [0, 10, 20]
    assert np.isfinite(results["test_auc"])
    state = checkpoints.read_state(str(tmp_path / "run"), 20)
    assert np.asarray(state["params"]["head"]["kernel"]).shape == (2 * job.config.model.embed_dim, 1)


def test_finetune_command_writes_results_under_the_pretraining_workdir(pretrained, tmp_path):
    workdir = tmp_path / "pretrain"
    shutil.copytree(pretrained[0], workdir)
    command = [
        sys.executable,
        os.path.join(ROOT, "finetune.py"),
        f"--config={os.path.join(ROOT, 'configs', 'finetune_chest.py')}:test,fraction=0.5",
        f"--config.pretrain_workdir={workdir}",
        "--config.total_steps=4",
        "--config.eval_every=2",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = workdir / "finetune_linear_0.5"
    assert done.stdout.startswith(f"workdir: {out} (from --config")
    results = json.loads((out / "results.json").read_text())
    assert [s for s, _ in results["validation_curve"]] == [0, 2, 4]
    assert "test auc" in done.stdout


def test_nan_guard_stops_fine_tuning_and_keeps_the_last_good_checkpoint(pretrained, tmp_path, monkeypatch):
    config = _config(pretrained, "test,mode=full,fraction=0.5", total_steps=8, checkpoint_every=4)
    next_batch = train._Run.next_batch
    calls = []

    def poisoned(run):  # Non-finite crops from step 6 on -> non-finite loss.
        calls.append(1)
        batch = next_batch(run)
        return {**batch, "crops": batch["crops"] * np.nan} if len(calls) >= 6 else batch

    monkeypatch.setattr(train._Run, "next_batch", poisoned)
    with pytest.raises(FloatingPointError, match="Last good checkpoint: step 4"):
        finetune.finetune(config, str(tmp_path))
    state = checkpoints.read_state(str(tmp_path), 4)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def _bad_finetune(t, arg: str = "test", **overrides):
    """Fine-tuning the `pretrained` run's encoder with a config that cannot work: the error comes
    before any data is read for training or anything compiled."""
    config = finetune_chest.get_config(arg)
    config.pretrain_workdir = str(t.pretrained_dir)
    config.update_from_flattened_dict(overrides)
    return lambda: finetune.finetune(config, str(t.tmp_path / "finetune"))


# docs/errors.md rows `finetune.*` (collected by tests/test_errors.py).
TRIGGERS = {
    "finetune.no_pretraining": lambda t: _bad_finetune(t, pretrain_workdir=None),
    "finetune.subjects": lambda t: _bad_finetune(t, subjects=999),
    "finetune.export": lambda t: _bad_finetune(t, "test,init=export"),
    "finetune.head_only": lambda t: _bad_finetune(t, "test,mode=full", **{"finetune.head_only_steps": 10**6}),
    "finetune.mode": lambda t: _bad_finetune(t, mode="partial"),
}

"""`python -m experiments.label_efficiency` runs end to end (tiny budget), and its summary pairs
each pretrained arm with random init seed by seed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import label_efficiency

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_label_efficiency_writes_tables(phantom_dir, tmp_path):
    workdir = tmp_path / "label_efficiency"
    cmd = [
        sys.executable,
        "-m",
        "experiments.label_efficiency",
        "--preset=test",
        "--pretrain_steps=5",
        "--steps=4",
        "--fractions=2,1.0",
        "--arms=isimed",
        f"--data_dir={phantom_dir}",
        f"--workdir={workdir}",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((workdir / "label_efficiency.json").read_text())["summary"]
    assert set(summary) == {"random", "isimed"}
    assert set(summary["isimed"]) == {"2", "1.0"} and "difference_to_random" in summary["isimed"]["2"]
    runs = json.loads((workdir / "label_efficiency.json").read_text())["runs"]
    expected = {(arm, n) for arm in ("random", "isimed") for n in (2, 12)}  # 1.0: all 12 subjects.
    assert {(r["arm"], r["train_subjects"]) for r in runs} == expected
    table = (workdir / "label_efficiency.md").read_text()
    assert "| isimed |" in table and "Paired difference to random init" in table
    assert "Convergence: validation AUC at step 4" in table  # --steps=4: the first evaluation.
    first = json.loads((workdir / "label_efficiency.json").read_text())["first_evaluation"]
    curves = {(r["arm"], r["train_subjects"]): r["validation_curve"] for r in runs}
    assert first["isimed"]["2"]["validation_auc"][0] == pytest.approx(curves["isimed", 2][1][1])
    assert (workdir / "label_efficiency.png").stat().st_size > 0

    # Another recipe in the same workdir would mix its runs into the table: refused.
    out = subprocess.run([*cmd, "--recipe=folder_demo"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "recipe.json" in out.stderr and "another --workdir" in out.stderr


def test_summary_pairs_arms_with_random_init_by_seed():
    aucs = {"random": {"2": [0.6, 0.7, 0.8]}, "isimed": {"2": [0.7, 0.9, 0.8]}}
    row = label_efficiency.summarise(aucs)["isimed"]["2"]
    assert row["test_auc"] == pytest.approx([0.8, np.std([0.7, 0.9, 0.8])])
    assert row["difference_to_random"] == pytest.approx([0.1, np.std([0.1, 0.2, 0.0])])
    assert label_efficiency.amount("2") == {"subjects": 2}
    assert label_efficiency.amount("1.0") == {"fraction": 1.0}
    assert label_efficiency.amount("0.05") == {"fraction": 0.05}


def test_labels_needed_is_the_fewest_subjects_reaching_random_init_with_all_labels():
    subjects = {"2": 2, "0.1": 6, "1.0": 64}
    aucs = {
        "random": {"2": [0.7], "0.1": [0.8], "1.0": [0.9]},
        "isimed": {"2": [0.8], "0.1": [0.91], "1.0": [0.95]},  # 6 subjects reach 0.9.
        "simclr": {"2": [0.6], "0.1": [0.7], "1.0": [0.89]},  # Never does.
    }
    needed = label_efficiency.labels_needed(label_efficiency.summarise(aucs), subjects)
    assert needed == {"random": 64, "isimed": 6, "simclr": None}


def test_a_preempted_run_ends_the_experiment_instead_of_feeding_the_next_run():
    import experiments

    assert experiments.finished({"final_step": 10}, "w") == {"final_step": 10}
    with pytest.raises(SystemExit) as stop:
        experiments.finished({"preempted_at_step": 7}, "w")
    assert stop.value.code == 0  # As the commands: the checkpoint is saved, a rerun resumes.

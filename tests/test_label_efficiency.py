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


def test_summary_pairs_arms_with_random_init_by_seed():
    aucs = {"random": {"2": [0.6, 0.7, 0.8]}, "isimed": {"2": [0.7, 0.9, 0.8]}}
    row = label_efficiency.summarise(aucs)["isimed"]["2"]
    assert row["test_auc"] == pytest.approx([0.8, np.std([0.7, 0.9, 0.8])])
    assert row["difference_to_random"] == pytest.approx([0.1, np.std([0.1, 0.2, 0.0])])
    assert label_efficiency.amount("2") == {"subjects": 2}
    assert label_efficiency.amount("1.0") == {"fraction": 1.0}
    assert label_efficiency.amount("0.05") == {"fraction": 0.05}

"""`python -m experiments.compare_methods` runs end to end (tiny budget) and writes its outputs."""

import os
import subprocess
import sys

import pytest

from experiments import compare_methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_methods_writes_table_and_plot(phantom_dir, tmp_path):
    workdir = tmp_path / "compare"
    cmd = [
        sys.executable,
        "-m",
        "experiments.compare_methods",
        "--preset=test",
        "--eval_preset=test",
        "--steps=5",
        "--methods=isimed,simclr",
        f"--data_dir={phantom_dir}",
        f"--workdir={workdir}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = (workdir / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == [
        "ISImed (embedding)",
        "ISImed (backbone)",
        "SimCLR (embedding)",
        "SimCLR (backbone)",
        "random init (embedding)",
        "random init (backbone)",
        "raw intensity",
    ]
    assert "n/a" not in rows[1]  # Every metric was measured for the pretrained encoder.
    assert "n/a" not in rows[2]  # And for its backbone.
    assert (workdir / "compare.png").stat().st_size > 10_000
    # A second call reuses the finished runs instead of training again.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Reusing" in again.stderr
    assert (workdir / "compare.md").read_text() == table


def _results(auc: float, mae: float, backbone_auc: float) -> dict:
    """One evaluation's results as linear_eval writes them (the metrics the comparison reads)."""

    def row(a):
        fold = {"mean": {"auc": a}, "std": {"auc": 0.01}}
        return {"lesion_crop": fold, "nodule_hard": fold, "rankme": 9.0, "position_probe": {"mae_mm": mae}}

    sets = {"pretrained": row(auc), "pretrained_backbone": row(backbone_auc)}
    sets.update({name: row(0.5) for name in ("random_init", "random_init_backbone", "raw_intensity")})
    for r in sets.values():
        r["spearman_within"] = 0.5
    return {"feature_sets": sets, "pretrain_s": 1.0}


def test_seed_spread_and_the_hybrid_tradeoff_table():
    runs = {
        "isimed": [_results(0.7, 10.0, 0.8), _results(0.9, 14.0, 0.8)],
        "isimed_vicreg_w3": [_results(0.8, 20.0, 0.9)] * 2,
        "isimed_vicreg": [_results(0.75, 15.0, 0.85)] * 2,
        "vicreg": [_results(0.95, 30.0, 0.97)] * 2,
    }
    rows = compare_methods.summarise(runs)
    assert rows["ISImed (embedding)"]["crop AUC"] == pytest.approx((0.8, 0.1))  # Mean, std over 2 seeds.
    assert rows["ISImed (backbone)"]["crop AUC"] == (0.8, 0.0)
    assert rows["hybrid (VICReg weight 3) (embedding)"]["position MAE mm"] == (20.0, 0.0)
    lines = compare_methods.tradeoff(runs).splitlines()[2:]
    # Ordered by VICReg weight: ISImed (0), the default hybrid (1), weight 3, VICReg alone.
    assert [line.split("|")[2].strip() for line in lines] == ["0", "1", "3", "VICReg alone"]
    assert lines[0].split("|")[3:5] == [" 0.800 ± 0.100 ", " 12.0 ± 2.0 "]
    assert compare_methods.tradeoff({"isimed": runs["isimed"]}) is None

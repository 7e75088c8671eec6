"""`python -m benchmarks.compare_methods` runs end to end (tiny budget) and writes its outputs."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_methods_writes_table_and_plot(phantom_dir, tmp_path):
    workdir = tmp_path / "compare"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.compare_methods",
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
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["isimed", "simclr", "random init (reference)"]
    assert "n/a" not in rows[1]  # Every metric was measured for the pretrained encoder.
    assert (workdir / "compare.png").stat().st_size > 10_000
    # A second call reuses the finished runs instead of training again.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Reusing" in again.stderr
    assert (workdir / "compare.md").read_text() == table

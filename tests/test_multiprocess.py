"""Two JAX processes on localhost (CPU collectives over gloo, 2 simulated devices each): the
multi-host runtime the project scales on, run end to end with the `test` preset.

The commands are the README's "two processes on one machine" recipe.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from sharding_check import assert_same_step

from configs import finetune_chest
from isimed import checkpoints
from isimed import finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One xdist worker runs the module, so the shared two-process run happens once.
pytestmark = [pytest.mark.multiprocess, pytest.mark.xdist_group("multiprocess")]

STEPS = 20
TRAIN_FLAGS = [
    f"--config.total_steps={STEPS}",
    "--config.log_every=2",
    "--config.eval_every=10",
    "--config.checkpoint_every=10",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )


def _start(script_and_args: list[str], processes: int, devices: int = 2) -> list[subprocess.Popen]:
    """Starts `processes` copies of `python SCRIPT ARGS` joined by jax.distributed (if > 1)."""
    port = _free_port()
    procs = []
    for i in range(processes):
        dist = (
            []
            if processes == 1
            else [
                "--config.distributed=True",
                f"--config.coordinator_address=127.0.0.1:{port}",
                f"--config.num_processes={processes}",
                f"--config.process_id={i}",
            ]
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *script_and_args, *dist],
                cwd=ROOT,
                env=_env(devices),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def _finish(procs, timeout=300) -> list[str]:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-3000:]}"
    return outputs


def _pretrain_args(tfds_dir, workdir, *extra):
    return [
        "main.py",
        "--config=configs/isimed_chest.py:test",
        f"--config.data.tfds_dir={tfds_dir}",
        f"--workdir={workdir}",
        *TRAIN_FLAGS,
        *extra,
    ]


def _state(workdir):
    """Every saved leaf of the latest step: params, batch statistics, optimizer state, step."""
    return checkpoints.read_state(str(workdir), STEPS)


def _assert_states_equal(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b):
        assert np.array_equal(x, y), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def straight(phantom_dir, tmp_path_factory):
    """(workdir, outputs) of one uninterrupted 2-process run."""
    workdir = tmp_path_factory.mktemp("two_process")
    return workdir, _finish(_start(_pretrain_args(phantom_dir, workdir), 2))


def test_two_processes_train_and_only_process_zero_writes(straight):
    workdir, (out0, out1) = straight
    assert "process 0 of 2: 2 local / 4 global cpu devices" in out0
    assert "process 1 of 2: 2 local / 4 global cpu devices" in out1
    assert "starting from scratch" in out0 and "starting from scratch" in out1
    assert "Held-out test subjects after 20 steps" in out0
    # Metrics, logs and the summary come from process 0 alone: each step is logged once.
    assert "train/loss" not in out1
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl") if "train/loss" in line]
    assert steps == list(range(2, STEPS + 1, 2))
    assert json.load(open(workdir / "summary.json"))["step"] == STEPS
    for png in ("training_curves.png", "distance_scatter.png", "pca.png"):
        assert (workdir / png).stat().st_size > 10_000, png
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]


def test_two_process_runs_are_identical(straight, phantom_dir, tmp_path):
    again = tmp_path / "again"
    _finish(_start(_pretrain_args(phantom_dir, again), 2))
    _assert_states_equal(_state(again), _state(straight[0]))


def test_sigterm_to_one_process_stops_all_at_one_step_and_resume_matches(straight, phantom_dir, tmp_path):
    workdir = tmp_path / "preempted"
    procs = _start(_pretrain_args(phantom_dir, workdir), 2)
    lines = []
    for line in procs[0].stdout:  # Preempt process 1 once process 0 is training.
        lines.append(line)
        if line.startswith("step 4/"):
            procs[1].send_signal(signal.SIGTERM)
            break
    rest = _finish(procs)
    out0 = "".join(lines) + rest[0]
    saved = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
    assert "Preempted: checkpoint saved at step" in out0 and "Preempted" in rest[1]
    step0 = int(out0.split("Preempted: checkpoint saved at step ")[1].split(";")[0])
    step1 = int(rest[1].split("Preempted: checkpoint saved at step ")[1].split(";")[0])
    assert step0 == step1 == max(saved) and 4 <= step0 < STEPS

    outputs = _finish(_start(_pretrain_args(phantom_dir, workdir), 2))
    assert all(f"resumed from step {step0}" in out for out in outputs)
    _assert_states_equal(_state(workdir), _state(straight[0]))


def test_checkpoint_unreadable_on_one_process_all_resume_from_the_previous(straight, phantom_dir, tmp_path):
    """Step 20's data-iterator position of process 1, a file only process 1 reads, cut in half:
    process 0 can read step 20, yet both must resume from step 10 (before they agreed ahead of
    orbax's collective restore, process 0 entered it alone and both aborted). Step 20 is moved
    aside once, each process says why, and the resumed run ends equal to the straight one."""
    workdir = tmp_path / "cut"
    shutil.copytree(straight[0], workdir, ignore=shutil.ignore_patterns("*.png", "tensorboard"))
    position = workdir / "checkpoints" / "20" / "data" / "process_1-of-2.json"
    text = position.read_text()
    position.write_text(text[: len(text) // 2])
    out0, out1 = _finish(_start(_pretrain_args(phantom_dir, workdir), 2))
    assert "resumed from step 10" in out0 and "resumed from step 10" in out1
    moved = f"{workdir}/unreadable_checkpoints/20, resuming from step 10"
    assert out0.count(moved) == 1 and "unreadable on process 1" in out0, out0[-3000:]
    assert "process 1: data/process_1-of-2.json is not valid JSON" in out1, out1[-3000:]
    assert sorted(os.listdir(workdir / "unreadable_checkpoints")) == ["20"]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]  # Step 20 saved again.
    _assert_states_equal(_state(workdir), _state(straight[0]))


def test_one_train_step_two_processes_equals_one_process(tmp_path):
    """Loss, gradients, parameters and batch statistics of one step on one global batch: 2
    processes x 2 devices against 1 process x 4 devices."""
    outs = {}
    for processes, devices in ((1, 4), (2, 2)):
        out = str(tmp_path / f"{processes}.npz")
        _finish(_start(["tests/sharding_check.py", out, "isimed_chest"], processes, devices))
        outs[processes] = dict(np.load(out))
    one, two = outs[1], outs[2]
    assert int(one.pop("devices")) == int(two.pop("devices")) == 4
    assert_same_step(one, two)


def test_linear_eval_two_processes_equals_one_process(straight, tmp_path):
    results = {}
    for processes, devices in ((1, 4), (2, 2)):
        out = tmp_path / f"eval{processes}"
        _finish(
            _start(
                [
                    "linear_eval.py",
                    "--config=configs/linear_eval_chest.py:test",
                    f"--config.pretrain_workdir={straight[0]}",
                    f"--workdir={out}",
                ],
                processes,
                devices,
            )
        )
        results[processes] = json.load(open(out / "results.json"))
    one, two = results[1], results[2]
    one.pop("pretrain_workdir"), two.pop("pretrain_workdir")
    assert one == two


FINETUNE_FLAGS = [
    "--config=configs/finetune_chest.py:test,mode=full,fraction=0.5",
    "--config.total_steps=10",
    "--config.eval_every=5",
    "--config.checkpoint_every=5",
]


def test_finetune_two_processes_finish_and_only_process_zero_writes(straight, tmp_path):
    """`finetune.py` on 2 processes x 2 devices from the 2-process pretraining: both exit 0 (process
    1 used to crash formatting results it does not have), process 0 alone writes results.json and
    the metrics, and the labelled subjects are those a 1-process run labels (chosen from the split
    and seeds alone; each process then reads its share of them)."""
    workdir = tmp_path / "finetune"
    args = ["finetune.py", *FINETUNE_FLAGS, f"--config.pretrain_workdir={straight[0]}"]
    args.append(f"--workdir={workdir}")
    out0, out1 = _finish(_start(args, 2))
    assert "process 0 of 2: 2 local / 4 global cpu devices" in out0
    assert "process 1 of 2: 2 local / 4 global cpu devices" in out1
    assert [p.name for p in tmp_path.rglob("results.json")] == ["results.json"]
    results = json.loads((workdir / "results.json").read_text())
    assert finetune.format_results(results) in out0
    assert "Fine-tuning finished at step 10; process 0 writes results.json." in out1
    assert "test auc" not in out1 and "train/loss" not in out1
    assert results["final_step"] == 10
    assert [s for s, _ in results["validation_curve"]] == [0, 5, 10]
    assert np.isfinite(results["test_auc"])
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert sorted(r["step"] for r in rows if "validation/auc" in r) == [0, 5, 10]  # Each once.
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "5"]

    config = finetune_chest.get_config("test,mode=full,fraction=0.5")
    config.pretrain_workdir = str(straight[0])
    data = finetune.resolve_config(config)[0].data
    available = len(finetune.split_ids(data, "train"))
    n = finetune.num_label_subjects(available, config.fraction, None)
    chosen = finetune.label_subjects(available, n, config.split_seed)
    assert results["train_subjects"] == n >= 2
    assert results["train_subject_ids"] == finetune.split_ids(data, "train", chosen)


def test_finetune_step_two_processes_equals_one_process(straight, tmp_path):
    """Two full-mode fine-tuning steps on one global batch (`tests/finetune_sharding_check.py`):
    the second step's loss and gradients (the encoder's too), the parameters and BatchNorm
    statistics after it, both steps' metrics and the validation and test scores of the stepped
    state: 2 processes x 2 devices against 1 process x 4 devices. (Whole runs are not compared:
    each process reads its own share of the labelled subjects, so the global batches of a 2-process
    run are not those of a 1-process run.)"""
    outs = {}
    for processes, devices in ((1, 4), (2, 2)):
        out = str(tmp_path / f"{processes}.npz")
        _finish(_start(["tests/finetune_sharding_check.py", out, str(straight[0])], processes, devices))
        outs[processes] = dict(np.load(out))
    one, two = outs[1], outs[2]
    assert int(one.pop("devices")) == int(two.pop("devices")) == 4
    assert any(np.abs(v).max() > 0 for k, v in one.items() if k.startswith("grad/['encoder']"))
    assert_same_step(one, two)

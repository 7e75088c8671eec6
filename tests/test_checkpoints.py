"""Nothing lost, nothing silent: resuming after kill -9, unreadable checkpoints, config drift on
resume, config validation; the triggers of docs/errors.md's checkpoint and config rows."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
import pytest

from isimed import checkpoints
from isimed import workdir as workdir_layout

if TYPE_CHECKING:
    from test_errors import Trigger

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# kill -9 at random points, resume each time: the final state equals a straight run bit for bit.

KILL_STEPS = 40
KILL_FLAGS = [
    f"--config.total_steps={KILL_STEPS}",
    "--config.checkpoint_every=5",
    "--config.log_every=1",
    "--config.eval_every=1000",
]
STEP_LINE = re.compile(r"^step (\d+)[:/]")


def _main(config_file: str, tfds_dir: str, workdir: Path, *extra: str) -> subprocess.Popen:
    """`python main.py` in its own process group (a kill takes its grain workers too)."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    return subprocess.Popen(
        [
            sys.executable,
            "main.py",
            # `PATH` or `PATH:method=M`: the test preset added to the config argument.
            f"--config={config_file}{',' if ':' in config_file else ':'}test",
            f"--config.data.tfds_dir={tfds_dir}",
            f"--workdir={workdir}",
            *KILL_FLAGS,
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, out[-4000:]
    return out


def _kill_when(proc: subprocess.Popen, step: int, delay: float, pattern=STEP_LINE) -> tuple[str, bool]:
    """Reads the output until the first line matching `pattern` for `step` or a later one, waits
    `delay` s and sends SIGKILL to the whole process group. Returns (output, killed)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = pattern.match(line)
        if m and int(m.group(1)) >= step:
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
            lines.append(proc.stdout.read())
            proc.wait()
            return "".join(lines), True
    proc.wait()
    return "".join(lines), False


def _state(workdir: Path, step: int = KILL_STEPS) -> dict:
    """Every leaf of the saved train state (params, batch_stats, opt_state, step) as numpy."""
    return checkpoints.read_state(str(workdir), step)


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(straight: Path, resumed: Path) -> None:
    a, b = _state(straight), _state(resumed)
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert len(leaves_a) > 10
    for (path, x), y in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
    positions = sorted((straight / "checkpoints" / str(KILL_STEPS) / "data").glob("process_*.json"))
    # One process wrote one position; an empty glob (a renamed file) must not pass unchecked.
    assert [p.name for p in positions] == ["process_0-of-1.json"], positions
    for path in positions:  # The data-iterator position.
        assert path.read_text() == (resumed / path.relative_to(straight)).read_text()
    # metrics.jsonl: every training step once, with the straight run's loss; evaluation rows once.
    rows_a, rows_b = _rows(straight), _rows(resumed)
    train_a = {r["step"]: r["train/loss"] for r in rows_a if "train/loss" in r}
    train_b = [(r["step"], r["train/loss"]) for r in rows_b if "train/loss" in r]
    assert [s for s, _ in train_b] == list(range(1, KILL_STEPS + 1))
    assert dict(train_b) == train_a
    val_b = [r["step"] for r in rows_b if any(k.startswith("validation/") for k in r)]
    assert (
        val_b
        == sorted(set(val_b))
        == [r["step"] for r in rows_a if any(k.startswith("validation/") for k in r)]
    )


# The progress line `_log_step` prints for a step; a checkpoint step's save starts right after it.
PROGRESS_LINE = re.compile(r"^step (\d+)/\d+")


def _kill_and_resume(
    config_file, tfds_dir, workdir: Path, rounds: int, seed: int, workers=lambda i: 0
) -> list[str]:
    """`rounds` runs killed at random points, then one run to the end; returns what happened.

    Until one kill has landed during a save (an unfinished `.orbax-checkpoint-tmp` folder left
    behind), a run is killed 0-0.1 s after the progress line of its next checkpoint step, while
    orbax writes that step; after that, after a random step and a random delay."""
    rng = random.Random(seed)
    log = []
    start, hit_save, unfinished = 0, False, []
    for i in range(rounds + 1):
        t0 = time.time()
        proc = _main(config_file, tfds_dir, workdir, f"--config.data.num_workers={workers(i)}")
        # A kill can land after the run saved its last steps: then nothing is left to interrupt.
        if i == rounds or start > KILL_STEPS - 4:
            out = _finish(proc)
            log.append(f"final run from step {start} ({time.time() - t0:.0f} s)")
            assert "Traceback" not in out, out
            assert not unfinished or f"removed {len(unfinished)} unfinished checkpoint save" in out, out
            break
        if not hit_save:
            target, delay, pattern = (start // 5 + 1) * 5, rng.uniform(0.0, 0.1), PROGRESS_LINE
        else:
            target, delay, pattern = rng.randint(start + 1, KILL_STEPS - 3), rng.uniform(0.0, 0.3), STEP_LINE
        out, killed = _kill_when(proc, target, delay, pattern)
        assert killed, f"round {i}: the run ended before step {target}:\n{out[-3000:]}"
        assert "Traceback" not in out, out
        tmp = [p.name for p in (workdir / "checkpoints").iterdir() if checkpoints.TMP_MARKER in p.name]
        hit_save = hit_save or bool(tmp)
        saved = checkpoints_steps(workdir)
        log.append(
            f"round {i}: killed at step >= {target} after {delay:.2f} s; "
            f"saved {saved}, unfinished {tmp} ({time.time() - t0:.0f} s)"
        )
        if i > 0:
            assert f"resumed from step {start}" in out or (start == 0 and "starting from scratch" in out), out
            assert not unfinished or f"removed {len(unfinished)} unfinished checkpoint save" in out, out
        start, unfinished = max(saved, default=0), tmp
    return log


def checkpoints_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _straight(config_file: str, tfds_dir: str, workdir: Path) -> None:
    """The uninterrupted run, in this process (saves a process start): the same config as
    `_main` gives main.py."""
    from configs import isimed_chest
    from isimed import train

    assert config_file.partition(":")[0] == "configs/isimed_chest.py", config_file
    arg = config_file.partition(":")[2]
    config = isimed_chest.get_config(f"test,{arg}" if arg else "test")
    config.data.tfds_dir = tfds_dir
    for flag in KILL_FLAGS:
        key, value = flag.removeprefix("--config.").split("=")
        config[key] = int(value)
    train.train_and_evaluate(config, str(workdir))


def test_kill9_at_random_points_then_resume_equals_straight_run(phantom_dir, tmp_path):
    """Five SIGKILLs (at least one while a checkpoint is being saved), each followed by a resume;
    two grain worker processes in round 1, none in the others (data.num_workers may change on
    resume: the position is converted between grain's two state forms, both ways here; one round
    only, as each worker process imports the whole stack again).
    Every leaf of the final state, the data-iterator position and the logged loss of every step
    equal a straight run's; metrics.jsonl holds each step once."""
    straight, workdir = tmp_path / "straight", tmp_path / "killed"
    _straight("configs/isimed_chest.py", phantom_dir, straight)
    log = _kill_and_resume(
        "configs/isimed_chest.py",
        phantom_dir,
        workdir,
        rounds=5,
        seed=14,
        workers=lambda i: 2 if i == 1 else 0,
    )
    print("\n".join(log))
    assert any("unfinished []" not in line for line in log[:-1]), (
        "no kill landed during a save:\n" + "\n".join(log)
    )
    _assert_same_run(straight, workdir)


def test_kill9_two_view_method(phantom_dir, tmp_path):
    """The same for SimCLR (two views, augmentation keyed by step), two kills."""
    straight, workdir = tmp_path / "straight", tmp_path / "killed"
    _straight("configs/isimed_chest.py:method=simclr", phantom_dir, straight)
    log = _kill_and_resume("configs/isimed_chest.py:method=simclr", phantom_dir, workdir, rounds=2, seed=5)
    print("\n".join(log))
    _assert_same_run(straight, workdir)


# ---------------------------------------------------------------------------------------------
# Unreadable checkpoints, config drift, validation. TRIGGERS: the checkpoint/config rows of
# docs/errors.md, checked with the data rows by tests/test_errors.py.


def _corrupt(step_dir: Path, what: str) -> None:
    """Truncates a file of a step folder, as a kill or a full disk leaves it."""
    files = {
        "metadata": [step_dir / "state" / "_METADATA"],
        "checkpoint_metadata": [step_dir / "_CHECKPOINT_METADATA"],
        "config": [step_dir / "config" / "metadata"],
        "data": list((step_dir / "data").glob("process_*.json")),
        "arrays": list((step_dir / "state").glob("ocdbt.process_*/d/*")),
    }[what]
    assert files, what
    for path in files:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def _step_dir(workdir: Path, step: int) -> Path:
    return workdir / "checkpoints" / str(step)


def _bad_config(t: Trigger, **changes):
    return t.start(t.tmp_path / "never_created", **changes)


def _unfinished_save(t: Trigger):
    workdir = t.workdir()
    (workdir / "checkpoints" / "155.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    return t.start(workdir)


def _metrics_after_checkpoint(t: Trigger):
    workdir = t.workdir()
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 151, "train/loss": 1.0}) + "\n")
        f.write(json.dumps({"step": 152, "train/loss": 1.0}) + "\n")
        f.write('{"step": 153, "train/lo')
    return t.start(workdir)


def _other_process_count(t: Trigger):
    workdir = t.workdir()
    for step in (50, 100, 150):
        data = _step_dir(workdir, step) / "data"
        (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
    return t.start(workdir)


def _unknown_iterator_state(t: Trigger):
    workdir = t.workdir()
    (_step_dir(workdir, 150) / "data" / "process_0-of-1.json").write_text('{"position": 150}')
    return t.start(workdir)


def _resume_unreadable(t: Trigger):
    workdir = t.workdir()
    _corrupt(_step_dir(workdir, 150), "metadata")
    return t.start(workdir)


def _none_readable(t: Trigger):
    workdir = t.workdir()
    for step, what in ((150, "arrays"), (100, "checkpoint_metadata"), (50, "data")):
        _corrupt(_step_dir(workdir, step), what)
    return t.start(workdir)


def _eval_unreadable(t: Trigger):
    workdir = t.workdir()
    _corrupt(_step_dir(workdir, 150), "arrays")
    return lambda: checkpoints.load_encoder(str(workdir))


def _eval_step_unreadable(t: Trigger):
    workdir = t.workdir()
    _corrupt(_step_dir(workdir, 150), "config")
    return lambda: checkpoints.load_encoder(str(workdir), 150)


def _mismatch(t: Trigger):
    workdir = t.workdir()
    config_file = _step_dir(workdir, 150) / "config" / "metadata"
    stored = json.loads(config_file.read_text())
    stored["model"]["embed_dim"] = 7
    config_file.write_text(json.dumps(stored))
    return lambda: checkpoints.load_encoder(str(workdir))


def _unwritable_workdir(t: Trigger):
    (t.tmp_path / "a_file").write_text("")
    return t.start(t.tmp_path / "a_file" / "run")


class CommandFailed(Exception):
    """A command exited non-zero; the message is its output."""


def _command(t: Trigger, *args: str):
    """`python main.py ARGS` in a process: what the user sees. Fails on a traceback."""

    def run():
        done = subprocess.run(
            [sys.executable, "main.py", f"--workdir={t.tmp_path / 'run'}", *args],
            cwd=ROOT,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = done.stdout + done.stderr
        assert "Traceback" not in output, output
        if done.returncode:
            raise CommandFailed(output)

    return run


def _busy_workdir(t: Trigger):
    from isimed import workdir as layout

    busy = t.tmp_path / "busy"
    busy.mkdir()
    t.request.addfinalizer(layout.Lock(layout.Workdir(busy)).acquire().release)
    return t.start(busy)


def _save_failed(t: Trigger):
    from isimed import train

    start = t.start(t.tmp_path / "full")
    _failing_writes(t.monkeypatch, f"{os.sep}checkpoints{os.sep}1.")

    def save_step_1(run, state, start_step, summary):
        run.save(1, state)
        return state, False

    t.monkeypatch.setattr(train, "_train", save_step_1)
    return start


TRIGGERS = {
    "config.interval": lambda t: _bad_config(t, checkpoint_every=0),
    "config.keep": lambda t: _bad_config(t, keep_checkpoints=0),
    "config.total_steps": lambda t: _bad_config(t, total_steps=0),
    "config.crops": lambda t: _bad_config(t, **{"data.crops_per_image": 1}),
    "config.images": lambda t: _bad_config(t, **{"data.images_per_batch": 0}),
    "config.model": lambda t: _bad_config(t, **{"model.name": "resnet19"}),
    "config.method": lambda t: _bad_config(t, method="byol"),
    "config.dtype": lambda t: _bad_config(t, **{"model.dtype": "float64"}),
    "config.crop_size": lambda t: _bad_config(t, **{"data.crop_size": (0, 8, 8)}),
    "config.learning_rate": lambda t: _bad_config(t, **{"optim.learning_rate": 0.0}),
    "config.schedule": lambda t: _bad_config(t, **{"optim.schedule": "linear"}),
    "config.other": lambda t: _bad_config(t, **{"optim.warmup_steps": -1}),
    "config.rotate_deg": lambda t: _bad_config(t, **{"data.rotate_deg": 90.0}),
    "config.several": lambda t: _bad_config(
        t, checkpoint_every=0, keep_checkpoints=0, **{"optim.learning_rate": -1.0}
    ),
    "config.missing_file": lambda t: _command(t, "--config=configs/nosuch.py:test"),
    "config.one_line": lambda t: _command(
        t, "--config=configs/isimed_chest.py:test", "--config.optim.learning_rate=-1"
    ),
    "workdir.unwritable": _unwritable_workdir,
    "workdir.busy": _busy_workdir,
    "checkpoint.save_failed": _save_failed,
    "resume.drift": lambda t: t.start(
        t.workdir(), seed=1, **{"model.embed_dim": 64, "optim.learning_rate": 1e-3}
    ),
    "resume.allowed": lambda t: t.start(t.workdir(), total_steps=160, log_every=5),
    "resume.past_total_steps": lambda t: t.start(t.workdir(), total_steps=100),
    "resume.unreadable": _resume_unreadable,
    "resume.none_readable": _none_readable,
    "resume.unfinished_save": _unfinished_save,
    "resume.metrics": _metrics_after_checkpoint,
    "resume.processes": _other_process_count,
    "resume.iterator": _unknown_iterator_state,
    "eval.unreadable": _eval_unreadable,
    "eval.step_unreadable": _eval_step_unreadable,
    "eval.no_checkpoints": lambda t: lambda: checkpoints.load_encoder(str(t.tmp_path / "nothing_here")),
    "eval.step_missing": lambda t: lambda: checkpoints.load_encoder(str(t.pretrained_dir), 7),
    "checkpoint.mismatch": _mismatch,
}


PRETRAINING_CONFIGS = sorted(
    p.stem
    for p in (ROOT / "configs").glob("*.py")
    if p.stem not in ("common", "__init__") and not p.stem.startswith("linear_eval")
)


def _configs():
    import importlib

    from configs import common
    from isimed import methods

    for name in PRETRAINING_CONFIGS:
        module = importlib.import_module(f"configs.{name}")
        for preset in common.PRESETS:
            for method in methods.METHODS:
                try:
                    yield f"{name}:{preset},method={method}", module.get_config(f"{preset},method={method}")
                except ValueError:  # A preset this experiment does not offer.
                    continue


def test_every_shipped_config_is_valid_and_names_the_resumable_fields():
    from isimed import config_checks

    seen = set()
    names = []
    for name, config in _configs():
        config_checks.validate(config)
        names.append(name)
        seen |= set(config_checks._as_stored(config))
    assert len(names) > 20, names
    for field in config_checks.RESUMABLE:  # The allow-list names real fields.
        assert any(f == field or (field.endswith(".*") and f.startswith(field[:-1])) for f in seen), field


def test_validation_reports_every_problem_before_anything_is_read(test_config, tmp_path, monkeypatch):
    from isimed import config_checks
    from isimed import train
    from isimed import train_state
    from isimed.data import pipeline

    def never(*args, **kwargs):
        raise AssertionError("read data or built the model before checking the config")

    monkeypatch.setattr(pipeline, "make_dataset", never)
    monkeypatch.setattr(train_state, "create_train_step", never)
    test_config.checkpoint_every = 0
    test_config.keep_checkpoints = 0
    test_config.data.crop_size = (8, 8, 8, 8)
    test_config.model.dtype = "int8"
    with pytest.raises(config_checks.ConfigError) as e:
        train.train_and_evaluate(test_config, str(tmp_path / "run"))
    lines = str(e.value).splitlines()
    assert lines[0] == "invalid config (4 problems):"
    assert [line.split(" = ")[0].strip() for line in lines[1:]] == [
        "checkpoint_every",
        "keep_checkpoints",
        "model.dtype",
        "data.crop_size",
    ]
    assert not (tmp_path / "run").exists()


def test_resume_changes_allow_only_the_listed_fields(test_config):
    from isimed import config_checks

    stored = test_config.to_dict()
    given = test_config.copy_and_resolve_references()
    given.total_steps = 1000
    given.data.num_workers = 2
    given.eval.max_images = 2
    given.process_id = 3  # Per launch: not even reported.
    given.model.embed_dim = 64
    given.loss.scale = 1.0
    given.data.crop_size = (16, 16, 16)
    del stored["eval"]["crops_per_image"]  # Added to the code after the checkpoint: allowed.
    allowed, refused = config_checks.resume_changes(stored, given)
    assert allowed == [
        "data.num_workers: 0 -> 2",
        f"eval.crops_per_image: (absent) -> {test_config.eval.crops_per_image}",
        f"eval.max_images: {test_config.eval.max_images} -> 2",
        f"total_steps: {test_config.total_steps} -> 1000",
    ]
    assert refused == [
        "data.crop_size: [8, 8, 8] -> [16, 16, 16]",
        "loss.scale: 100.0 -> 1.0",
        "model.embed_dim: 32 -> 64",
    ]


def test_unreadable_newest_step_is_moved_aside_and_training_redoes_it_bit_for_bit(
    pretrained, test_config, tmp_path, caplog
):
    """Step 150 truncated: the run resumes from 100, moves 150 aside, trains to 150 again and
    saves exactly the state the uninterrupted run saved there (every leaf, bit for bit)."""
    from isimed import train

    workdir = tmp_path / "run"
    shutil.copytree(pretrained[0], workdir)
    _corrupt(_step_dir(workdir, 150), "arrays")
    with caplog.at_level("WARNING"):
        train.train_and_evaluate(test_config, str(workdir))
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "resuming from step 100" in warnings[0], warnings
    assert (workdir_layout.Workdir(workdir).unreadable_checkpoints / "150").is_dir()
    assert checkpoints_steps(workdir) == [50, 100, 150]
    a, b = _state(Path(pretrained[0]), 150), _state(workdir, 150)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
    steps = [r["step"] for r in _rows(workdir) if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 150


def test_load_encoder_restores_only_what_evaluation_needs(pretrained, tmp_path):
    """An optimiser the code can no longer build does not stop evaluating the checkpoint: no
    optimiser is built and its state is not restored."""
    workdir = tmp_path / "run"
    shutil.copytree(pretrained[0], workdir, ignore=shutil.ignore_patterns("*.png", "tensorboard"))
    config_file = _step_dir(workdir, 150) / "config" / "metadata"
    stored = json.loads(config_file.read_text())
    stored["optim"]["schedule"] = "an optimiser from the future"
    config_file.write_text(json.dumps(stored))
    config, _, state = checkpoints.load_encoder(str(workdir))
    assert set(state) == {"params", "batch_stats", "step"} and int(state["step"]) == 150
    a = _state(Path(pretrained[0]), 150)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a["params"]), jax.tree.leaves(state["params"])
    ):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


def test_unfinished_saves_are_removed(tmp_path, caplog):
    (tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    (tmp_path / "checkpoints" / "10").mkdir()
    with caplog.at_level("WARNING"):
        assert checkpoints.remove_unfinished_saves(str(tmp_path)) == ["20.orbax-checkpoint-tmp"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]
    assert len(caplog.records) == 1
    assert checkpoints.remove_unfinished_saves(str(tmp_path)) == []


def test_metrics_rows_after_the_restored_step_are_dropped(tmp_path):
    from isimed import paths
    from isimed import train

    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 0, "validation/x": 1.0},
        {"step": 5, "train/loss": 2.0},
        {"step": 10, "train/loss": 3.0},
        {"step": 10, "validation/x": 4.0},
        {"step": 11, "train/loss": 5.0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 12, "tra')
    assert train._drop_metrics_after(paths.resolve(path), 10) == 2
    assert _rows(tmp_path) == rows[:4]
    assert train._drop_metrics_after(paths.resolve(path), 10) == 0
    assert train._drop_metrics_after(paths.resolve(path), -1) == 4  # From scratch: all.
    assert path.read_text() == ""


# ---------------------------------------------------------------------------------------------
# Misuse loses nothing: two runs on one workdir, signals during a save, a full disk, a rerun.


@pytest.fixture(scope="module")
def straight_run(phantom_dir, tmp_path_factory) -> Path:
    """The uninterrupted `KILL_FLAGS` run of configs/isimed_chest.py (in this process)."""
    workdir = tmp_path_factory.mktemp("straight")
    _straight("configs/isimed_chest.py", phantom_dir, workdir)
    return workdir


def test_a_second_run_on_a_busy_workdir_is_refused_and_the_first_is_untouched(
    phantom_dir, straight_run, tmp_path
):
    workdir = tmp_path / "run"
    # Started together: whichever locks the workdir first trains, the other must stop at once.
    procs = [_main("configs/isimed_chest.py", phantom_dir, workdir) for _ in range(2)]
    outs = [proc.communicate(timeout=600)[0] for proc in procs]
    codes = sorted(proc.returncode for proc in procs)
    assert codes[0] == 0 and codes[1] != 0, outs
    refused = outs[[proc.returncode for proc in procs].index(codes[1])]
    busy = r"workdir .*/run is in use by another run \(host .*, pid \d+; lock .*/run/\.lock\)"
    assert re.search(busy, refused), refused
    assert "Traceback" not in refused, refused
    _assert_same_run(straight_run, workdir)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_burst_of_signals_during_a_save_saves_exits_0_and_resumes_exactly(
    phantom_dir, straight_run, tmp_path, signum
):
    workdir = tmp_path / "run"
    proc = _main("configs/isimed_chest.py", phantom_dir, workdir)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = PROGRESS_LINE.match(line)
        if m and int(m.group(1)) >= 10:  # A checkpoint step: its save starts now.
            break
    for _ in range(40):  # The first signal asks for a save, the others land during it.
        os.kill(proc.pid, signum)
        time.sleep(0.02)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out
    step = int(re.search(r"Preempted: checkpoint saved at step (\d+); rerun to resume", out).group(1))
    assert step >= 10 and checkpoints_steps(workdir)[-1] == step
    assert not [p for p in (workdir / "checkpoints").iterdir() if checkpoints.TMP_MARKER in p.name]
    out = _finish(_main("configs/isimed_chest.py", phantom_dir, workdir))
    assert f"resumed from step {step}" in out, out
    _assert_same_run(straight_run, workdir)


def _failing_writes(monkeypatch, marker: str) -> None:
    """Every file write under a path containing `marker` fails as on a full disk."""
    import errno

    from etils import epath

    cls = type(epath.Path("/"))
    write_text, write_bytes = cls.write_text, cls.write_bytes

    def fail(write):
        def patched(self, *args, **kwargs):
            if marker in os.fspath(self):
                raise OSError(errno.ENOSPC, "No space left on device", os.fspath(self))
            return write(self, *args, **kwargs)

        return patched

    monkeypatch.setattr(cls, "write_text", fail(write_text))
    monkeypatch.setattr(cls, "write_bytes", fail(write_bytes))


def test_a_failed_save_stops_the_run_with_one_line_and_the_previous_checkpoint_resumes(
    phantom_dir, straight_run, tmp_path, monkeypatch
):
    workdir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _failing_writes(patch, f"{os.sep}checkpoints{os.sep}10.")
        with pytest.raises(checkpoints.SaveError) as error:
            _straight("configs/isimed_chest.py", phantom_dir, workdir)
    message = str(error.value)
    assert "\n" not in message
    assert re.fullmatch(
        r"cannot save checkpoint step 10 in .*/run/checkpoints/10: \[Errno 28\] No space left on device: "
        r".*/checkpoints/10\.orbax-checkpoint-tmp/.*; training stopped, the last checkpoint \(step 5\) is "
        r"intact \(fix the cause, e.g. free disk space, and rerun to resume\)",
        message,
    ), message
    # Stopped before the next checkpoint step (the old code trained on until its save failed).
    assert max(r["step"] for r in _rows(workdir) if "train/loss" in r) < 15
    assert checkpoints_steps(workdir) == [5]
    _straight("configs/isimed_chest.py", phantom_dir, workdir)  # Resumes from step 5.
    _assert_same_run(straight_run, workdir)


def test_a_resumed_run_keeps_the_summary_of_its_earlier_segments(pretrained, test_config, tmp_path):
    from isimed import train

    workdir = tmp_path / "run"
    shutil.copytree(pretrained[0], workdir)
    (workdir / "summary.json").unlink()  # As if killed while writing the plots.
    summary = train.train_and_evaluate(test_config, str(workdir))
    assert summary["initial"] == pretrained[1]["initial"]
    assert summary["validation"] == pretrained[1]["validation"]
    assert json.loads((workdir / "summary.json").read_text())["initial"] == pretrained[1]["initial"]


def test_the_workdir_lock_names_its_holder_and_dies_with_it(tmp_path):
    from isimed import workdir as layout

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from isimed import workdir as w; "
            f"w.Lock(w.Workdir({str(tmp_path)!r})).acquire(); print('locked', flush=True); time.sleep(600)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(layout.WorkdirBusy, match=rf"in use by another run \(host .*, pid {holder.pid}; "):
            layout.Lock(layout.Workdir(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The dead holder's lock file stays behind and is taken over.
    with layout.Lock(layout.Workdir(tmp_path)):
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()

"""Entry points: default workdirs, the console scripts setup.cfg installs, method commands that
refuse other methods' configs, and `python main.py` / `python linear_eval.py` without --workdir."""

import configparser
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from isimed import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "isimed-pretrain",
    "isimed-simclr",
    "isimed-vicreg",
    "isimed-barlow",
    "isimed-linear-eval",
    "isimed-prepare",
    "isimed-export",
    "isimed-locate",
    "isimed-finetune",
}


def _entry_points() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=")) for line in lines)


def _run(args, cwd, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "config_arg,expected",
    [
        ("configs/isimed_chest.py:demo", "workdirs/isimed_chest_demo"),
        ("configs/isimed_chest.py", "workdirs/isimed_chest"),
        ("/abs/path/configs/isimed_brats.py:test,method=simclr", "workdirs/isimed_brats_test_simclr"),
        ("configs/isimed_chest.py:method=vicreg", "workdirs/isimed_chest_vicreg"),
        ("configs/isimed_chest.py:head=true,demo", "workdirs/isimed_chest_demo_head"),
        ("configs/isimed_chest.py:demo,method=isimed,head=false", "workdirs/isimed_chest_demo"),
        ("isimed_folder.py:demo2d", "workdirs/isimed_folder_demo2d"),
    ],
)
def test_default_workdir_is_config_name_preset_and_method(config_arg, expected):
    assert cli.default_workdir(config_arg) == expected


def test_linear_eval_workdir_is_inside_the_pretraining_workdir():
    expected = os.path.abspath("workdirs/isimed_chest_demo/linear_eval")
    assert cli.linear_eval_workdir("workdirs/isimed_chest_demo") == expected
    assert cli.linear_eval_workdir("gs://bucket/runs/a/") == "gs://bucket/runs/a/linear_eval"


def test_setup_cfg_declares_every_console_script_and_each_resolves():
    entry_points = _entry_points()
    assert set(entry_points) == SCRIPTS
    for target in entry_points.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target
    installed = {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group="console_scripts")
        if ep.dist is not None and ep.dist.name == "isimed"
    }
    assert installed == entry_points, "stale install: rerun `pip install -e .` (make install does)"


@pytest.mark.parametrize("method", sorted(cli.METHOD_COMMANDS))
def test_method_commands_default_to_the_chest_config_with_their_method(method):
    path = cli.default_config(method)
    assert path == os.path.join(ROOT, "configs", "isimed_chest.py") + f":method={method}"
    chest = importlib.import_module("configs.isimed_chest")
    config = chest.get_config(path.partition(":")[2])
    assert config.method == method
    command = cli.METHOD_COMMANDS[method]
    cli.check_method(config, method, path, command)  # No exit.
    with pytest.raises(SystemExit, match=f"trains {method}, but .* is a 'isimed' config"):
        cli.check_method(chest.get_config("test"), method, "configs/isimed_chest.py:test", command)


@pytest.mark.parametrize(
    "config_arg,expected",
    [
        ("configs/isimed_chest.py", "configs/isimed_chest.py:method=simclr"),
        ("configs/isimed_chest.py:demo", "configs/isimed_chest.py:demo,method=simclr"),
        ("configs/isimed_chest.py:method=simclr,test", "configs/isimed_chest.py:method=simclr,test"),
    ],
)
def test_method_commands_add_their_method_to_the_config_argument(config_arg, expected):
    assert cli.with_method(config_arg, "simclr", "isimed-simclr") == expected
    argv = ["isimed-simclr", "--config", config_arg, "--config.total_steps=3"]
    cli._add_method(argv, "simclr", "isimed-simclr")
    assert argv == ["isimed-simclr", "--config", expected, "--config.total_steps=3"]


def test_method_command_refuses_another_methods_config_outside_the_repository(tmp_path):
    # Run from elsewhere: the config's `from configs import common` must still import.
    config = os.path.join(ROOT, "configs", "isimed_chest.py") + ":test,method=vicreg"
    done = _run(
        [sys.executable, "-c", "from isimed import cli; cli.run_simclr()", f"--config={config}"],
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 1
    assert f"isimed-simclr trains simclr, but --config={config} names method=vicreg" in done.stderr
    assert not (tmp_path / "workdirs").exists()


def test_bad_config_argument_is_one_line_before_anything_runs(tmp_path):
    config = os.path.join(ROOT, "configs", "isimed_chest.py") + ":demo,method=byol"
    main = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={config}"]
    done = _run(main, cwd=tmp_path, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"main.py: --config={config}: config argument 'demo,method=byol': unknown method 'byol'; "
        "use one of: isimed, simclr, vicreg, barlow, isimed_vicreg"
    )
    assert not (tmp_path / "workdirs").exists()


def test_main_and_linear_eval_default_their_workdirs(phantom_dir, tmp_path):
    pretrain = [
        sys.executable,
        os.path.join(ROOT, "main.py"),
        f"--config={os.path.join(ROOT, 'configs', 'isimed_chest.py')}:test",
        f"--config.data.tfds_dir={phantom_dir}",
        "--config.total_steps=4",
        "--config.eval.max_images=2",
        "--config.eval.probe_train_images=4",
    ]
    done = _run(pretrain, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("workdir: workdirs/isimed_chest_test (from --config; set --workdir")
    workdir = tmp_path / "workdirs" / "isimed_chest_test"
    assert json.loads((workdir / "summary.json").read_text())["final"]
    assert (workdir / "checkpoints" / "4").is_dir()

    evaluate = [
        sys.executable,
        os.path.join(ROOT, "linear_eval.py"),
        f"--config={os.path.join(ROOT, 'configs', 'linear_eval_chest.py')}:test",
        "--config.pretrain_workdir=workdirs/isimed_chest_test",
        "--config.max_images=6",
        "--config.reference_images=4",
        "--config.folds=2",
    ]
    done = _run(evaluate, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    first = done.stdout.splitlines()[0]
    assert first.startswith("workdir: /") and first.endswith(
        "/workdirs/isimed_chest_test/linear_eval (from --config.pretrain_workdir; set --workdir to change)"
    )
    assert json.loads((workdir / "linear_eval" / "results.json").read_text())["checkpoint_step"] == 4


def test_prepare_command_runs_the_prepare_module(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 16, 16), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, size=(n, 14), dtype=np.uint8)
    np.savez(tmp_path / "chestmnist_16.npz", **arrays)
    out = tmp_path / "prepared"
    done = _run(
        [
            sys.executable,
            "-c",
            "from isimed import cli; cli.run_prepare()",
            "--layout=medmnist",
            f"--root={tmp_path / 'chestmnist_16.npz'}",
            "--spacing=25",
            f"--out={out}",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads((out / "prepared.json").read_text())["counts"]
    assert counts == {"train": 4, "validation": 2, "test": 2}

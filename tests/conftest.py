import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/ and benchmarks/ are importable as in the entry points.


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory):
    """A data dir holding the tiny synthetic phantom (generated once per test worker)."""
    from isimed.data import chest_phantom

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    chest_phantom.data_source("tiny3d", "train", data_dir)
    return data_dir


@pytest.fixture
def test_config(phantom_dir):
    from configs import isimed_chest

    config = isimed_chest.get_config("test")
    config.data.tfds_dir = phantom_dir
    return config


@pytest.fixture(scope="session")
def pretrained(phantom_dir, tmp_path_factory):
    """(workdir, summary) of one pretraining run with the test preset."""
    from configs import isimed_chest
    from isimed import train

    config = isimed_chest.get_config("test")
    config.data.tfds_dir = phantom_dir
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    return workdir, train.train_and_evaluate(config, workdir)


@pytest.fixture
def run_on_devices(tmp_path):
    """`run(script, n, *args) -> dict of arrays`: runs `script OUT.npz *args` on n simulated CPU
    devices."""

    def run(script: str, n: int, *args: str) -> dict:
        out = str(tmp_path / f"{os.path.basename(script)}-{'-'.join(args)}-{n}.npz")
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
        subprocess.run([sys.executable, script, out, *args], cwd=ROOT, env=env, check=True, timeout=300)
        return dict(np.load(out))

    return run

"""What runs report: MetricWriter (the JSON-lines log always; Weights & Biases only when a project
is set) and the progress bars (only on a terminal)."""

import io
import json
import sys
import time

import ml_collections
import numpy as np
import pytest

from configs import isimed_chest
from isimed import writers
from isimed.data import prepare
from isimed.evaluation import features


def _config(**wandb) -> ml_collections.ConfigDict:
    fields = {"project": None, "entity": None, "name": None, "mode": None, **wandb}
    return ml_collections.ConfigDict({"seed": 7654321, "wandb": fields})


def _jsonl(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_without_a_project_wandb_is_never_imported(tmp_path, monkeypatch):
    # None in sys.modules makes `import wandb` raise ImportError: any import attempt would fail.
    monkeypatch.setitem(sys.modules, "wandb", None)
    config = isimed_chest.get_config("test")
    assert config.wandb.project is None  # The default: no W&B.
    writer = writers.MetricWriter(tmp_path, config)
    writer.write_scalars(3, {"loss": 0.25}, prefix="train/")
    writer.close()
    assert _jsonl(tmp_path) == [{"step": 3, "train/loss": 0.25}]
    assert not (tmp_path / "wandb").exists() and not (tmp_path / writers.WANDB_ID_FILE).exists()


def test_a_project_without_wandb_installed_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[tracking\]'"):
        writers.MetricWriter(tmp_path, _config(project="isimed-test"))


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb in offline mode with its settings, cache and data folders under tmp_path."""
    pytest.importorskip("wandb", reason="the [tracking] extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    return tmp_path / "run"


def _run_files(workdir, run_id: str, expected: tuple[bytes, ...], count: int) -> list[bytes]:
    """The contents of the `count` `run-<id>.wandb` files of offline runs with this id (one per
    writer), once one of them holds every `expected` byte string. The folders are
    `offline-run-<start time, whole seconds>-<id>`, with `-1`, `-2`, ... added when a run starts in
    the same second as another. wandb's service process writes the file asynchronously:
    `run.finish()` can return before the last records are on disk."""
    deadline = time.monotonic() + 60
    while True:
        files = sorted((workdir / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))
        data = [f.read_bytes() for f in files]
        if len(data) == count and any(all(e in d for e in expected) for d in data):
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(data)} run file(s) {files}; none holds all of {expected}")
        time.sleep(0.2)


def test_offline_wandb_run_records_the_scalars_and_config_and_resumes(offline_wandb):
    workdir = offline_wandb
    writer = writers.MetricWriter(workdir, _config(project="isimed-test", mode="offline"))
    writer.write_scalars(0, {"spearman_within": 0.5}, prefix="validation/")
    writer.write_scalars(10, {"loss": 0.75}, prefix="train/")
    writer.write_scalars(20, {"loss": 0.123456789}, prefix="train/")
    writer.close()

    run_id = (workdir / writers.WANDB_ID_FILE).read_text()
    # The .wandb file is a log of protobuf records; names and JSON values are stored verbatim:
    # both scalars' names, the last value and a config value.
    expected = (b"validation/spearman_within", b"train/loss", b"0.123456789", b"7654321")
    [data] = _run_files(workdir, run_id, expected, count=1)
    assert data.startswith(b":W&B")
    # The other writers are unchanged.
    assert _jsonl(workdir)[-1] == {"step": 20, "train/loss": 0.123456789}

    # A resumed run (same workdir) continues the same W&B run id.
    writer = writers.MetricWriter(workdir, _config(project="isimed-test", mode="offline"))
    writer.write_scalars(30, {"loss": 0.0625}, prefix="train/")
    writer.close()
    assert (workdir / writers.WANDB_ID_FILE).read_text() == run_id
    _run_files(workdir, run_id, (b"train/loss", b"0.0625"), count=2)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_show_only_on_a_terminal(terminal, monkeypatch):
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    elements = ({"crops": np.full((2, 3), i, np.float32), "id": np.int32(i)} for i in range(3))
    out = features.embed_elements(
        elements,
        {"sum": lambda c: c.sum(axis=1, keepdims=True)},
        np.stack,
        with_crops=False,
        desc="embed test",
        total=3,
    )
    np.testing.assert_array_equal(out["embeddings"]["sum"][:, 0, 0], [0.0, 3.0, 6.0])
    bar = prepare._progress(4, "prepare", True, "case")
    bar.update(4)
    bar.close()
    quiet = prepare._progress(4, "prepare quiet", False, "case")  # progress=False: never shown.
    quiet.update(4)
    quiet.close()
    text = err.getvalue()
    if terminal:
        assert "embed test:" in text and "/3 [" in text  # Redrawn at most every 0.1 s, then removed.
        assert "prepare: 100%" in text and "4/4" in text and "prepare quiet" not in text
    else:
        assert text == ""

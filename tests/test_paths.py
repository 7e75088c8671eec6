"""Workdirs and data folders given as URIs (gs://...) reach orbax, the writers and the readers
unmangled. No network: epath's backends are redirected to a local folder (`etils.epath.testing`),
and the libraries that talk to object stores themselves (orbax, tensorboardX, array_record) are
replaced by recorders of the path they were given."""

import json
import os

import ml_collections
import numpy as np
import pytest
from etils.epath import testing as epath_testing

from isimed import checkpoints
from isimed import paths
from isimed import writers
from isimed.data import prepared
from isimed.evaluation import plots

BUCKET = "gs://bucket"


def test_resolve_keeps_uris_and_makes_local_paths_absolute(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert str(paths.resolve("gs://bucket/runs/a")) == "gs://bucket/runs/a"
    assert str(paths.resolve("gs://bucket/runs/a") / "checkpoints") == "gs://bucket/runs/a/checkpoints"
    assert str(paths.resolve("~/x")) == os.path.join(str(tmp_path), "x")
    assert str(paths.resolve("rel/y")) == os.path.join(str(tmp_path), "rel", "y")


@pytest.fixture
def bucket(tmp_path):
    """`gs://bucket/...` is served from `tmp_path/...` for everything that goes through epath."""

    def local(path):
        return str(path).replace(BUCKET, str(tmp_path))

    def redirect(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    fns = ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "glob", "stat", "remove")
    with epath_testing.mock_epath(**{fn: redirect for fn in fns}):
        yield tmp_path


def test_checkpoint_manager_gets_the_uri(monkeypatch):
    seen = {}

    class Recorder:
        def __init__(self, directory, options=None):
            seen["directory"] = str(directory)

    monkeypatch.setattr(checkpoints.ocp, "CheckpointManager", Recorder)
    checkpoints.manager(f"{BUCKET}/run", ml_collections.ConfigDict({"keep_checkpoints": 2}))
    assert seen["directory"] == f"{BUCKET}/run/checkpoints"


def test_writers_write_through_the_uri(bucket, monkeypatch):
    logdirs = []

    class Recorder:
        def __init__(self, logdir):
            logdirs.append(logdir)

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    monkeypatch.setattr(writers, "SummaryWriter", Recorder)
    for step in (1, 2):  # A resumed run appends to what the first one wrote.
        writer = writers.MetricWriter(f"{BUCKET}/run")
        writer.write_scalars(step, {"loss": 0.5 * step})
        writer.close()
    assert logdirs == [f"{BUCKET}/run/tensorboard"] * 2
    rows = [json.loads(line) for line in open(bucket / "run" / "metrics.jsonl")]
    assert rows == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 1.0}]
    assert open(bucket / "run" / "log.txt").read().count("loss=") == 2


def test_plots_write_through_the_uri(bucket):
    written = plots.roc_curves(
        {"a": (np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.4, 0.6]))}, f"{BUCKET}/eval/roc.png"
    )
    assert written == f"{BUCKET}/eval/roc.png"
    assert (bucket / "eval" / "roc.png").read_bytes().startswith(b"\x89PNG")


def test_prepared_reader_gets_the_uri(bucket, monkeypatch):
    manifest = {
        "format": prepared.FORMAT,
        "format_version": prepared.FORMAT_VERSION,
        "status": "complete",
        "splits": {"train": {"files": [{"file": "c0.array_record", "records": 1}]}},
    }
    (bucket / "prep").mkdir()
    (bucket / "prep" / prepared.MANIFEST).write_text(json.dumps(manifest))
    source = prepared.data_source(f"{BUCKET}/prep", "train")
    assert len(source) == 1
    opened = []

    class Recorder:
        def __init__(self, paths_):
            opened.extend(paths_)

    from array_record.python import array_record_data_source

    monkeypatch.setattr(array_record_data_source, "ArrayRecordDataSource", Recorder)
    source._open()
    assert opened == [f"{BUCKET}/prep/train/c0.array_record[0:1]"]
    # Memory-mapped records cannot be read from an object store: said when the source is made.
    manifest["splits"]["train"]["files"] = [{"file": "c0.isimed", "records": 1}]
    (bucket / "prep" / prepared.MANIFEST).write_text(json.dumps(manifest))
    local = r"gs://bucket/prep: memory-mapped records .* on a local disk; object stores need .*array_record"
    with pytest.raises(ValueError, match=local):
        prepared.data_source(f"{BUCKET}/prep", "train")

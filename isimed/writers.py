"""Metric writers: TensorBoard event files, a JSON-lines log and a plain-text log (also printed).

clu.metric_writers would pull in TensorFlow; tensorboardX writes the same event files without it
(to `gs://` too, with google-cloud-storage installed). Only process 0 writes. The logs are
appended to, so a resumed run continues them; object stores cannot append, so for a URI workdir
each flush rewrites the whole (small) file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import ml_collections
from etils import epath
from tensorboardX import SummaryWriter

from isimed import paths
from isimed import workdir as workdir_layout


class _LogFile:
    """A text file lines are appended to: in place locally, by rewriting on object stores."""

    def __init__(self, path):
        self._path = path
        self._rewrite = paths.is_uri(path)
        if self._rewrite:
            self._text = path.read_text() if path.exists() else ""
        else:
            self._file = open(path, "a")

    def write_line(self, line: str) -> None:
        if self._rewrite:
            self._text += line + "\n"
            self._path.write_text(self._text)
        else:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if not self._rewrite:
            self._file.close()


class MetricWriter:
    """Writes scalars to TensorBoard, metrics.jsonl and log.txt and, when `config.wandb.project`
    is set, to a Weights & Biases run (see `_wandb_run`); only on process 0."""

    def __init__(self, workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None):
        self._active = jax.process_index() == 0
        self._wandb = None
        if self._active:
            workdir = workdir_layout.Workdir(workdir)
            workdir.root.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(os.fspath(workdir.tensorboard))
            self._jsonl = _LogFile(workdir.metrics)
            self._text = _LogFile(workdir.log)
            self._wandb = _wandb_run(workdir.root, config)

    def write_scalars(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        if not self._active:
            return
        scalars = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
        for key, value in scalars.items():
            self._tb.add_scalar(key, value, step)
        self._jsonl.write_line(json.dumps({"step": int(step), **scalars}))
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))
        self.log(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

    def log(self, line: str) -> None:
        """A progress line: printed and appended to log.txt."""
        if self._active:
            print(line, flush=True)
            self._text.write_line(line)

    def close(self) -> None:
        """Flushes and closes everything; later calls do nothing."""
        if self._active:
            self._active = False
            self._tb.close()
            self._jsonl.close()
            self._text.close()
            if self._wandb is not None:
                self._wandb.finish()
                self._wandb = None


WANDB_ID_FILE = "wandb_run_id"


def _wandb_run(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None):
    """A W&B run when `config.wandb.project` is set, else None (wandb is imported only then).

    The run's files go to `WORKDIR/wandb/` (a local workdir; for a URI, wandb's default folder).
    Its id is kept in `WORKDIR/wandb_run_id`, so a resumed pretraining run continues the same W&B
    run. `wandb.mode` None leaves the mode to wandb (WANDB_MODE, else online); "offline" writes
    locally only, needs no account or network, and `wandb sync` uploads it later.
    """
    settings = None if config is None else config.get("wandb")
    if settings is None or not settings.get("project"):
        return None
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            f"config.wandb.project={settings.project!r} needs wandb, which is not installed: "
            "pip install -e '.[tracking]'"
        ) from e
    workdir = epath.Path(workdir)
    uri = "://" in os.fspath(workdir)
    id_file = workdir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else None
    run = wandb.init(
        project=settings.project,
        entity=settings.get("entity"),
        mode=settings.get("mode"),
        name=settings.get("name") or workdir.name,
        id=run_id,
        resume="allow",
        dir=None if uri else os.fspath(workdir),
        config=config.to_dict(),
    )
    if run_id is None:
        id_file.write_text(run.id)
    return run

"""What a workdir holds, named in one place: every job that writes or reads a workdir (training,
evaluation, export, the tools) gets its paths from `Workdir`, so no file name is spelt twice.

A pretraining workdir:

  checkpoints/              orbax step folders (state, data-iterator positions, config)
  unreadable_checkpoints/   step folders a resume could not read, moved aside
  tensorboard/              TensorBoard event files
  metrics.jsonl             one JSON row per logged step
  log.txt                   the lines the run printed
  summary.json              held-out metrics of the run
  *.png                     plots (training curves, distance scatter, PCA)
  profile/                  a jax.profiler trace, when asked for
  export/                   exported encoders (`isimed-export`)
  linear_eval/              linear evaluation's default output folder
  finetune_<mode>_<labels>/ fine-tuning's default workdirs (a workdir each: checkpoints,
                            logs, results.json)
  wandb/                    Weights & Biases offline runs
  .lock                     held (flock) by the run training in it (`Lock`)

Paths may be local or URIs (`gs://...`); they are `etils.epath.Path`s (`isimed.paths.resolve`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import socket

from absl import logging
from etils import epath

from isimed import errors
from isimed import paths


@dataclasses.dataclass(frozen=True)
class Workdir:
    """The paths inside one workdir; `Workdir(path)` resolves `path` (`~`, relative, or a URI)."""

    root: epath.Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "root", paths.resolve(path))

    def __truediv__(self, name: str) -> epath.Path:
        return self.root / name

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    def __str__(self) -> str:
        return os.fspath(self.root)

    @property
    def checkpoints(self) -> epath.Path:
        return self.root / "checkpoints"

    @property
    def unreadable_checkpoints(self) -> epath.Path:
        return self.root / "unreadable_checkpoints"

    @property
    def tensorboard(self) -> epath.Path:
        return self.root / "tensorboard"

    @property
    def metrics(self) -> epath.Path:
        return self.root / "metrics.jsonl"

    @property
    def log(self) -> epath.Path:
        return self.root / "log.txt"

    @property
    def summary(self) -> epath.Path:
        return self.root / "summary.json"

    @property
    def profile(self) -> epath.Path:
        return self.root / "profile"

    @property
    def export(self) -> epath.Path:
        return self.root / "export"

    @property
    def linear_eval(self) -> epath.Path:
        return self.root / "linear_eval"

    def finetune(self, name: str) -> epath.Path:
        """`finetune_<name>`: a fine-tuning run's default workdir (`isimed.finetune.run_name`)."""
        return self.root / f"finetune_{name}"

    @property
    def wandb(self) -> epath.Path:
        return self.root / "wandb"

    @property
    def lock(self) -> epath.Path:
        return self.root / ".lock"

    def plot(self, name: str) -> epath.Path:
        """`<name>.png` in the workdir (training_curves, distance_scatter, pca, roc)."""
        return self.root / f"{name}.png"


class WorkdirBusy(errors.UserError, RuntimeError):
    """Another run holds the workdir's lock."""


class WorkdirUnwritable(errors.UserError, OSError):
    """The workdir cannot be created or written (below a regular file, no permission, ...)."""


class Lock:
    """One run per workdir: an exclusive `fcntl.flock` on `WORKDIR/.lock`, which holds the holder's
    host and pid for the message another run gets.

    The kernel releases a flock when its process exits however it exits (kill -9 included), so a
    lock file left by a dead process is stale by construction and taken over without a check of
    its pid. Flocks work across NFS clients on Linux (emulated with byte-range locks). URIs
    (`gs://...`) have no lock primitive: the run goes on unlocked, with a warning. Held by process
    0 of a run only; evaluation, which only reads, takes none.
    """

    def __init__(self, workdir: Workdir):
        self.path = workdir.lock
        self._fd: int | None = None

    def acquire(self) -> Lock:
        """Takes the lock or raises `WorkdirBusy` naming the holder; returns self."""
        if paths.is_uri(self.path):
            logging.warning(
                "workdir %s is not local: it is not locked, so make sure one run uses it at a time",
                self.path.parent,
            )
            return self
        fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirBusy(
                f"workdir {self.path.parent} is in use by another run ({holder}; lock {self.path}); "
                "wait for it to finish, stop it, or use another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        # The file stays: deleting it would let a third run lock a new file while a second one
        # waits on the old one.
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

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
  wandb/                    Weights & Biases offline runs

Paths may be local or URIs (`gs://...`); they are `etils.epath.Path`s (`isimed.paths.resolve`).
"""

from __future__ import annotations

import dataclasses
import os

from etils import epath

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

    @property
    def wandb(self) -> epath.Path:
        return self.root / "wandb"

    def plot(self, name: str) -> epath.Path:
        """`<name>.png` in the workdir (training_curves, distance_scatter, pca, roc)."""
        return self.root / f"{name}.png"

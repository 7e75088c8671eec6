"""Metric writers: TensorBoard event files, a JSON-lines log and a plain-text log (also printed).

clu.metric_writers would pull in TensorFlow; tensorboardX writes the same event files without it.
Only process 0 writes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
from tensorboardX import SummaryWriter


class MetricWriter:
    def __init__(self, workdir: str):
        self._active = jax.process_index() == 0
        if self._active:
            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._text = open(os.path.join(workdir, "log.txt"), "a")

    def write_scalars(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
        if not self._active:
            return
        scalars = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
        for key, value in scalars.items():
            self._tb.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._jsonl.flush()
        self.log(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

    def log(self, line: str) -> None:
        """A progress line: printed and appended to log.txt."""
        if self._active:
            print(line, flush=True)
            self._text.write(line + "\n")
            self._text.flush()

    def close(self) -> None:
        if self._active:
            self._tb.close()
            self._jsonl.close()
            self._text.close()

"""Reading a pretraining run's metrics.jsonl (written by `isimed.writers.MetricWriter`).

One JSON object per line, `{"step": int, key: value, ...}`. Used for the training-curve plots and
for choosing the best checkpoint in linear evaluation.
"""

from __future__ import annotations

import json
import math

import numpy as np

from isimed import paths


def read_rows(metrics_jsonl_path: str) -> list[tuple[int, dict]]:
    """`(line number (1-based), row)` of every non-blank line, in file order.

    A run killed mid-write leaves a truncated last line: it is skipped, as the rest is good. An
    unreadable line anywhere else is a ValueError naming the file and line.
    """
    lines = paths.resolve(metrics_jsonl_path).read_text().splitlines()
    rows = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((line_no, json.loads(line)))
        except json.JSONDecodeError as e:
            if line_no == len(lines):
                continue
            raise ValueError(f"{metrics_jsonl_path}:{line_no}: not valid JSON ({e})") from e
    return rows


def read_metrics(metrics_jsonl_path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{key: (steps, values)}` for every numeric key of a metrics.jsonl file, sorted by step.

    A resumed run appends to the same file, so a step can appear twice; the later row wins, which
    is the value of the run that continued. Non-numeric and non-finite values are skipped; a row
    without "step" counts as step = its line number.
    """
    series: dict[str, dict[int, float]] = {}
    for line_no, row in read_rows(metrics_jsonl_path):
        step = int(row.get("step", line_no))
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                series.setdefault(key, {})[step] = float(value)
    out = {}
    for key, points in series.items():
        steps = np.array(sorted(points), dtype=np.int64)
        out[key] = (steps, np.array([points[s] for s in steps], dtype=np.float64))
    return out

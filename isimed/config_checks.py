"""Checks on a pretraining config that run before anything is read or compiled.

- `validate(config)`: every bad value at once, one line per field (`ConfigError`).
- `resume_changes(stored, config)`: what differs between the config stored in a checkpoint and
  the one given to resume it, split into changes that are allowed on resume (`RESUMABLE`) and
  changes that are not (`resume_error` turns those into one `ConfigError`).

Messages are listed in docs/errors.md; tests/test_errors.py checks that table against them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from isimed import errors
from isimed import methods
from isimed import models

DTYPES = ("float32", "bfloat16", "float16")
# The learning-rate schedules `train_state.make_optimizer` builds.
SCHEDULES = ("cosine", "exponential")

# Settings that may differ between the run that wrote a checkpoint and the run that resumes it:
# how long to train and how often to log, evaluate, save and profile, how the input pipeline is
# run (workers, threads, prefetch, cache) and where the data lies (not what it holds), the
# multi-host launch, the compilation cache, experiment tracking (`wandb.*`) and the held-out
# evaluation (`eval.*`, which never touches the training state). A name ending in ".*" covers a
# whole group. Everything else (seed, data, model, method, loss, optimiser, augmentation) is part
# of what is being trained and must match, or the resumed run is not the run that was started.
# A setting the stored config does not hold at all (added to the code after the checkpoint was
# written, so its default is taken to keep the old behaviour), or holds but the code no longer
# has, is allowed and announced like any allowed change.
#
# total_steps: the cosine schedule decays to `total_steps`, so changing it changes the learning
# rate of every remaining step: from the resumed step on, the schedule is the one of the new total
# (the steps already taken keep the rates they had). The resumed run then matches neither a
# straight run to the old total nor one to the new total; it is announced when resuming.
RESUMABLE = (
    "total_steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "data.num_workers",
    "data.num_threads",
    "data.prefetch",
    "data.tfds_dir",
    "data.dir",
    "distributed",
    "coordinator_address",
    "num_processes",
    "process_id",
    "compilation_cache_dir",
    "data.cache_mb",
    "profile_steps",
    "wandb.*",
    "eval.*",
)
# Set per launch (process_id differs between the processes of one run): allowed to differ and not
# reported as a change.
LAUNCH = ("distributed", "coordinator_address", "num_processes", "process_id")


class ConfigError(errors.UserError, ValueError):
    """A config that cannot be used: the message lists every problem, one line each."""


def _problems(config: ml_collections.ConfigDict) -> list[str]:
    problems = []

    def get(field: str) -> Any:
        node = config
        for part in field.split("."):
            node = node.get(part) if isinstance(node, (Mapping, ml_collections.ConfigDict)) else None
        return node

    def at_least(field: str, low: int) -> None:
        value = get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            problems.append(f"{field} = {value!r}: must be an integer >= {low}")

    for field in ("total_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        at_least(field, 1)
    at_least("data.crops_per_image", 2)
    at_least("data.images_per_batch", 1)
    at_least("model.embed_dim", 1)
    at_least("data.num_workers", 0)

    name = get("model.name")
    if name not in models.MODELS:
        problems.append(f"model.name = {name!r}: unknown; known: {', '.join(sorted(models.MODELS))}")
    method = get("method")
    if method not in methods.METHODS:
        problems.append(f"method = {method!r}: unknown; known: {', '.join(sorted(methods.METHODS))}")
    dtype = get("model.dtype")
    if dtype not in DTYPES:
        problems.append(f"model.dtype = {dtype!r}: must be one of {', '.join(DTYPES)}")

    crop = get("data.crop_size")
    if (
        not isinstance(crop, (tuple, list))
        or len(crop) not in (2, 3)
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in crop)
    ):
        problems.append(f"data.crop_size = {crop!r}: must be 2 or 3 integers >= 1 (2D or 3D crops)")

    rotate = get("data.rotate_deg")
    if rotate is not None and (
        not isinstance(rotate, (int, float)) or isinstance(rotate, bool) or not 0 <= rotate <= 45
    ):
        problems.append(f"data.rotate_deg = {rotate!r}: must be a number of degrees in [0, 45]")

    lr = get("optim.learning_rate")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        problems.append(f"optim.learning_rate = {lr!r}: must be > 0")
    schedule = get("optim.schedule")
    if schedule not in SCHEDULES:
        problems.append(f"optim.schedule = {schedule!r}: must be one of {', '.join(SCHEDULES)}")
    warmup = get("optim.warmup_steps")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        problems.append(f"optim.warmup_steps = {warmup!r}: must be an integer >= 0")
    return problems


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises `ConfigError` listing every invalid field of a pretraining config, one per line
    (`field = value: what it must be`). Checks values only: that the crop fits the data's images
    is checked where the data is opened."""
    problems = _problems(config)
    if problems:
        raise ConfigError(
            f"invalid config ({len(problems)} problem{'s' * (len(problems) > 1)}):\n  "
            + "\n  ".join(problems)
        )


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _as_stored(config: ml_collections.ConfigDict | Mapping) -> dict[str, Any]:
    """The config as the checkpoint holds it (JSON: tuples become lists), flattened."""
    tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    return _flat(json.loads(json.dumps(tree)))


def is_resumable(field: str) -> bool:
    return any(field == name or (name.endswith(".*") and field.startswith(name[:-1])) for name in RESUMABLE)


_ABSENT = "(absent)"


def resume_changes(stored: Mapping, config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
    """`(allowed, refused)`: the fields that differ between the config a checkpoint stores and the
    one given to resume it, each as `"field: stored -> given"` (values as JSON, `(absent)` for a
    field one side lacks), split by `RESUMABLE`; `LAUNCH` fields are not listed."""
    old, new = _as_stored(stored), _as_stored(config)
    allowed, refused = [], []
    for field in sorted(set(old) | set(new)):
        a, b = old.get(field, _ABSENT), new.get(field, _ABSENT)
        if a == b or field in LAUNCH:
            continue
        line = f"{field}: {a if a is _ABSENT else json.dumps(a)} -> {b if b is _ABSENT else json.dumps(b)}"
        ok = is_resumable(field) or a is _ABSENT or b is _ABSENT
        (allowed if ok else refused).append(line)
    return allowed, refused


def resume_error(refused: list[str], where: str) -> ConfigError:
    """The one error for settings that differ from the checkpoint's and may not change."""
    return ConfigError(
        f"cannot resume {where} with a different config: {len(refused)} setting"
        f"{'s' * (len(refused) > 1)} differ from the checkpoint's and may not change on resume "
        f"(use a new --workdir to train with them):\n  " + "\n  ".join(refused)
    )

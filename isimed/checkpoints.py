"""Orbax checkpoints of a pretraining workdir: the manager, saving and restoring the train state
with the data-iterator state and the config, and `load_encoder` for evaluation.

Every step folder holds `state` (params, batch_stats, opt_state, step), `data` (each process's
data-iterator position) and `config` (the run's config as JSON). Restoring never trusts a folder:

- a step that cannot be read (a truncated or missing file) is reported in one warning line
  (folder and reason) and the previous step is used; if no step can be read, `CheckpointError`
  lists every step tried and why;
- resuming compares the stored config with the given one (`isimed.config_checks`): settings that
  may not change stop the run with one message listing each difference;
- `load_encoder` restores only what evaluation needs (params, batch_stats, step), so a checkpoint
  stays evaluable whatever happens to the optimiser.

Orbax's own log lines during a restore attempt are dropped at the default log level (shown with
`--verbosity=0`); the one-line reports above say what happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as py_logging
import os
import re
import sys

import grain
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from isimed import config_checks
from isimed import errors
from isimed import methods
from isimed import runtime
from isimed import train_state
from isimed import workdir as workdir_layout

# Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when complete; a run killed
# while saving leaves that folder behind.
TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """No step of a checkpoint folder could be read; the message lists each step tried and why."""


class _Unreadable(Exception):
    """One step folder cannot be read; the message is the reason, one line."""


def manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    with _orbax_logs_dropped():  # It parses every step's metadata and logs unreadable ones.
        return ocp.CheckpointManager(
            workdir_layout.Workdir(workdir).checkpoints,
            options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True),
        )


def remove_unfinished_saves(workdir: str) -> list[str]:
    """Deletes the temporary folders of saves that never completed (a run killed while saving;
    names containing `.orbax-checkpoint-tmp`) and reports them in one warning line. Process 0
    deletes, every process waits for it; returns the names removed."""
    directory = workdir_layout.Workdir(workdir).checkpoints
    removed = []
    if jax.process_index() == 0 and directory.is_dir():
        for path in sorted(directory.iterdir()):
            if TMP_MARKER in path.name:
                path.rmtree()
                removed.append(path.name)
        if removed:
            logging.warning(
                "removed %d unfinished checkpoint save(s) in %s (a run was stopped while saving): %s",
                len(removed),
                directory,
                ", ".join(removed),
            )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("isimed: unfinished checkpoint saves removed")
    return removed


def save(mngr, step: int, state: train_state.State, data_iter, config) -> None:
    """Starts saving `step` (orbax finishes it in the background: `finish_saves`); a save that
    fails already here raises `SaveError`."""
    try:
        with orbax_errors_dropped():
            mngr.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(data_iter),
                    config=ocp.args.JsonSave(config.to_dict()),
                ),
                force=True,
            )
    except Exception as e:  # Orbax and tensorstore raise many types for one failed write.
        raise _save_error(mngr, step, e) from e


class SaveError(errors.UserError, OSError):
    """A checkpoint could not be written (disk full, no permission); the previous one is intact."""


def finish_saves(mngr, step: int | None, *, only_if_done: bool = False) -> None:
    """Waits for the save in flight (of `step`), raising `SaveError` if it failed. With
    `only_if_done`, returns at once while it is still running: a check cheap enough for every
    step, so a failed save stops the run within one step."""
    if step is None or (only_if_done and mngr.is_saving_in_progress()):
        return
    try:
        with orbax_errors_dropped():
            mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - whatever failed in the background, the save failed
        raise _save_error(mngr, step, e) from e


def _save_error(mngr, step: int, e: Exception) -> SaveError:
    if isinstance(e, OSError) and e.strerror:
        reason = f"[Errno {e.errno}] {e.strerror}" + (f": {e.filename}" if e.filename else "")
    else:
        reason = f"{type(e).__name__}: " + " ".join(str(e).split())
    last = mngr.latest_step()
    return SaveError(
        f"cannot save checkpoint step {step} in {epath.Path(mngr.directory) / str(step)}: {reason}; "
        "training stopped, "
        + ("no earlier checkpoint" if last is None else f"the last checkpoint (step {last}) is intact")
        + " (fix the cause, e.g. free disk space, and rerun to resume)"
    )


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `restore` found: the step and state restored, the `field: stored -> given` lines of
    allowed setting changes, and the newer step folders it could not read (moved aside)."""

    step: int
    state: train_state.State
    changes: list[str]
    unreadable: dict[int, str]


def restore(mngr, state: train_state.State, data_iter, config: ml_collections.ConfigDict) -> Restored | None:
    """Restores the newest readable step (None if there is no step at all).

    The train state is restored shaped and sharded like `state`, the data iterator in place. A
    step that cannot be read is skipped for the previous one; the unreadable newer folders are
    moved to `<workdir>/unreadable_checkpoints/` (process 0), so the resumed run can save those
    steps again, and each is reported in one warning line (folder, reason, where it went). Raises
    `config_checks.ConfigError` when settings that may not change on resume differ from the stored
    config, ValueError when the stored arrays do not fit `state` or the checkpoint was written by
    another number of processes, and `CheckpointError` when no step can be read.
    """
    directory = epath.Path(mngr.directory)
    tried: dict[int, str] = {}
    for step in sorted(mngr.all_steps(), reverse=True):
        step_dir = directory / str(step)
        reason = None
        try:
            stored = _read_step_files(step_dir, data=True)
            changes, refused = config_checks.resume_changes(stored["config"], config)
            if refused:
                raise config_checks.resume_error(refused, f"{directory} (step {step})")
            _check_shapes(step_dir / "state", state, ml_collections.ConfigDict(stored["config"]))
        except _Unreadable as e:
            reason = " ".join(str(e).split())  # One line, whatever the library's message holds.
        # Agreed before restoring: orbax's restore is collective (barriers), so a process that
        # skipped it (its own iterator file unreadable) would leave the others waiting in it.
        reason = _agree(reason)
        if reason is None:
            try:
                args = ocp.args.Composite(state=ocp.args.StandardRestore(state))
                restored = _attempt(mngr.restore, step, args=args).state
                position = _iterator_state(stored["data"], data_iter.get_state(), step_dir)
                _attempt(data_iter.set_state, position)
            except _Unreadable as e:
                reason = " ".join(str(e).split())
            reason = _agree(reason)
        if reason is None:
            if hasattr(data_iter, "start_prefetch"):
                data_iter.start_prefetch()
            _move_aside(mngr, directory, tried, step)
            return Restored(step, restored, changes, tried)
        tried[step] = reason
    if tried:
        raise _none_readable(directory, tried)
    return None


def _none_readable(directory, tried: dict[int, str]) -> CheckpointError:
    return CheckpointError(
        f"no readable checkpoint in {directory}; tried {len(tried)} step(s):\n  "
        + "\n  ".join(f"step {step}: {reason}" for step, reason in tried.items())
        + "\n(move the folder away to start from scratch)"
    )


def _agree(reason: str | None) -> str | None:
    """The same outcome on every process: a step is used only if every process could read it."""
    if jax.process_count() == 1:
        return reason
    if reason is not None and jax.process_index() != 0:  # Process 0's warning names only the process.
        logging.warning("process %d: %s", jax.process_index(), reason)
    failed = multihost_utils.process_allgather(np.array(reason is not None))
    if reason is None and np.any(failed):
        # Process 0 reports the step, so name the process that has the reason.
        return "unreadable on process " + ", ".join(str(i) for i in np.flatnonzero(failed))
    return reason


def _move_aside(mngr, directory: epath.Path, tried: dict[int, str], used: int) -> None:
    """Moves unreadable step folders to `<workdir>/unreadable_checkpoints/` (process 0) and
    reports each in one line."""
    if not tried:
        return
    if jax.process_index() == 0:
        target = workdir_layout.Workdir(directory.parent).unreadable_checkpoints
        target.mkdir(parents=True, exist_ok=True)
        for step, reason in tried.items():
            dest, n = target / str(step), 1
            while dest.exists():
                dest, n = target / f"{step}-{n}", n + 1
            (directory / str(step)).rename(dest)
            logging.warning(
                "checkpoint step %d in %s is unreadable (%s); moved to %s, resuming from step %d",
                step,
                directory / str(step),
                reason,
                dest,
                used,
            )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("isimed: unreadable checkpoints moved")
    mngr.reload()


def _iterator_state(stored: dict, fresh: dict, step_dir) -> dict:
    """The stored data-iterator position in the form this run's iterator takes.

    Grain's state depends on `data.num_workers`: `{"next_index": n}` without worker processes; with
    W workers, W shards (image indices i::W) read round-robin, each with its own `next_index`.
    The training stream is the same either way (element n is the same batch), so the position is
    converted through n, the number of batches consumed: this is what lets `data.num_workers`
    change on resume.
    """
    if set(stored) == set(fresh) and (
        "iterators_in_use_indices" not in fresh
        or len(stored["iterators_in_use_indices"]) == len(fresh["iterators_in_use_indices"])
    ):
        return stored
    n = _consumed(stored)
    if n is None or _consumed(fresh) is None:
        raise ValueError(
            f"checkpoint {step_dir}: cannot convert the stored data-iterator position "
            f"({json.dumps(stored)[:200]}) to this run's data pipeline ({json.dumps(fresh)[:200]}); "
            f"resume with the data.num_workers the checkpoint was written with"
        )
    if set(fresh) == {"next_index"}:
        return {"next_index": n}
    w = len(fresh["iterators_in_use_indices"])
    return {
        "next_index_in_cycle": n % w,
        "next_index_in_datasets": w,
        "iterators_in_use_indices": list(range(w)),
        "iterators_in_use_states": [{"next_index": (n - i + w - 1) // w} for i in range(w)],
        "exhausted": [0] * w,
        "future_states": {},
    }


def _consumed(state: dict) -> int | None:
    """Batches consumed, from a grain state of either form (None if not one of them)."""
    if set(state) == {"next_index"}:
        return int(state["next_index"])
    shards = state.get("iterators_in_use_states")
    w = len(state.get("iterators_in_use_indices") or ())
    if (
        w
        and state.get("iterators_in_use_indices") == list(range(w))
        and state.get("next_index_in_datasets") == w
        and not any(state.get("exhausted", [1]))
        and not state.get("future_states")
        and all(isinstance(x, dict) and set(x) == {"next_index"} for x in shards)
    ):
        n = sum(x["next_index"] for x in shards)
        if [x["next_index"] for x in shards] == [(n - i + w - 1) // w for i in range(w)]:
            return n
    return None


def _read_json(path: epath.Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise _Unreadable(f"{_rel(path)} is missing") from None
    except OSError as e:
        raise _Unreadable(f"{_rel(path)} cannot be read: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _Unreadable(f"{_rel(path)} is not valid JSON ({e})") from None


def _rel(path: epath.Path) -> str:
    """`path` relative to its step folder (`state/_METADATA`), for one-line reasons."""
    parts = path.parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return "/".join(parts[i + 1 :])
    return str(path)


def _read_step_files(step_dir: epath.Path, *, data: bool) -> dict:
    """Reads a step folder's small JSON files (the orbax metadata, the state's tree metadata, the
    stored config and, with `data`, this process's data-iterator position); raises `_Unreadable`
    for a missing or truncated one. Returns `{"config": ...}`."""
    _read_json(step_dir / "_CHECKPOINT_METADATA")
    _read_json(step_dir / "state" / "_METADATA")
    stored = {"config": _read_json(step_dir / "config" / "metadata")}
    if data:
        i, n = jax.process_index(), jax.process_count()
        mine = step_dir / "data" / f"process_{i}-of-{n}.json"
        if not mine.exists() and (step_dir / "data").is_dir():
            counts = sorted(
                {
                    int(m.group(1))
                    for p in (step_dir / "data").iterdir()
                    if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", p.name))
                }
            )
            if counts and n not in counts:
                raise ValueError(
                    f"checkpoint {step_dir} holds the data-iterator positions of {counts[0]} "
                    f"process(es); resume it with {counts[0]} process(es), not {n}"
                )
        stored["data"] = _read_json(mine)
    return stored


def _reason(e: BaseException) -> str:
    """One line for a failed read: the innermost cause (tensorstore's, not orbax's wrapper)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = (str(e).strip().splitlines() or [""])[0]
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _ignore_closed_loop_callbacks() -> None:
    """After a failed read, tensorstore completes the reads still in flight and calls back into
    orbax's event loop, which is closed by then: each call raises "Event loop is closed" as an
    unraisable exception, a traceback printed per array (hundreds of lines). Those are dropped,
    process-wide from the first checkpoint read on; every other unraisable exception is printed
    as before."""
    previous = sys.unraisablehook
    if getattr(previous, "_isimed", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    hook._isimed = True
    sys.unraisablehook = hook


def _attempt(fn, *args, **kwargs):
    """Runs an orbax read, turning any failure into `_Unreadable` with a one-line reason."""
    _ignore_closed_loop_callbacks()
    try:
        with _orbax_logs_dropped():
            return fn(*args, **kwargs)
    except _Unreadable:
        raise
    except Exception as e:  # Orbax, tensorstore and grain raise many types for bad files.
        raise _Unreadable(_reason(e)) from e


class _DropBelowVerbose(py_logging.Filter):
    """Drops records unless INFO logging is on (`--verbosity=0` or more)."""

    def filter(self, record):
        return py_logging.getLogger("absl").isEnabledFor(py_logging.INFO)


class _DropOrbaxErrors(py_logging.Filter):
    """Drops orbax's and asyncio's records (a failed save logs a traceback per thread) unless INFO
    logging is on; `SaveError` reports the failure in one line."""

    def filter(self, record):
        from_library = record.name == "asyncio" or f"{os.sep}orbax{os.sep}" in record.pathname
        return not from_library or py_logging.getLogger("absl").isEnabledFor(py_logging.INFO)


def orbax_errors_dropped():
    """While saving: orbax's background threads log at any time, so training holds this for as
    long as a save can be in flight."""
    return _filtered(_DropOrbaxErrors())


def _orbax_logs_dropped():
    """Orbax and asyncio log lines (failed reads, missing metadata) are dropped at the default
    log level while reading checkpoints: the one-line reports of this module replace them."""
    return _filtered(_DropBelowVerbose())


@contextlib.contextmanager
def _filtered(drop: py_logging.Filter):
    loggers = [py_logging.getLogger(name) for name in ("absl", "asyncio")]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def load_encoder(workdir: str, step: int | None = None):
    """Restores `(config, networks, state)` from a pretraining workdir (latest step by default).

    The networks are rebuilt from the config stored in the checkpoint, so the caller needs nothing
    but the directory. `networks.params` / `networks.batch_stats` are the same architecture at
    initialisation (the reference row of evaluations). Only `state["params"]`,
    `state["batch_stats"]` and `state["step"]` are restored (no optimiser state): a checkpoint
    stays evaluable whatever the optimiser. With `step=None`, an unreadable newest step is reported
    in one warning line and the previous one is used; `CheckpointError` if none can be read. A
    given `step` is read or fails (`CheckpointError` with the reason).
    """
    directory = workdir_layout.Workdir(workdir).checkpoints
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {directory} (expected a pretraining --workdir)")
    with _orbax_logs_dropped():
        mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    available = sorted(mngr.all_steps(), reverse=True)
    if step is not None and step not in available:
        raise FileNotFoundError(
            f"checkpoint step {step} not found in {directory}; available: {sorted(available)}"
        )
    if not available:
        raise FileNotFoundError(f"no checkpoint steps in {directory}")
    tried: dict[int, str] = {}
    for candidate in [step] if step is not None else available:
        try:
            return _load_encoder_step(mngr, directory, candidate, tried)
        except _Unreadable as e:
            tried[candidate] = str(e)
    raise _none_readable(directory, tried)


def _load_encoder_step(mngr, directory: epath.Path, step: int, tried: dict[int, str]):
    step_dir = directory / str(step)
    config = ml_collections.ConfigDict(_read_step_files(step_dir, data=False)["config"])
    networks = train_state.Networks(config)
    # Replicated on this process's mesh, whatever topology wrote the checkpoint. The optimiser
    # state is left out (identity: no optimiser is built from the stored config).
    replicated = NamedSharding(runtime.make_mesh(), P())
    method = methods.get(config.method)
    full = jax.eval_shape(lambda: train_state.init_state(config, method, networks, optax.identity()))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        {key: value for key, value in full.items() if key != "opt_state"},
    )
    _check_shapes(step_dir / "state", abstract, config)
    restore = ocp.args.PyTreeRestore(
        item=abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True,
    )
    state = _attempt(mngr.restore, step, args=ocp.args.Composite(state=restore)).state
    for skipped, reason in tried.items():
        logging.warning(
            "checkpoint step %d in %s is unreadable (%s); using step %d",
            skipped,
            directory / str(skipped),
            reason,
            step,
        )
    return config, networks, state


def read_state(workdir: str, step: int) -> dict:
    """Every leaf of the train state saved at `step` (params, batch_stats, opt_state, step) as
    numpy arrays, in the structure orbax stored it (optimiser tuples as lists): for comparing runs
    leaf by leaf. Evaluation uses `load_encoder`."""
    directory = workdir_layout.Workdir(workdir).checkpoints / str(step) / "state"
    with ocp.StandardCheckpointer() as checkpointer:
        # On this process's first device, whatever topology wrote it.
        device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            checkpointer.metadata(directory).item_metadata.tree,
        )
        state = checkpointer.restore(directory, target)
    return jax.tree.map(np.asarray, state)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """Leaf shapes keyed by path; keys normalised to strings as orbax stores them."""
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path): tuple(
            leaf.shape
        )
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _check_shapes(state_dir, abstract: train_state.State, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming what was expected and found if a checkpoint does not fit the
    encoder its stored config describes (e.g. written by other code); `_Unreadable` if its array
    metadata cannot be read. Only the parts of the state in `abstract` (its top-level keys) are
    compared."""

    def read():
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.metadata(state_dir).item_metadata

    metadata = _attempt(read)
    if metadata is None:  # Orbax logs why and returns nothing.
        raise _Unreadable("state: the array metadata cannot be read (damaged manifest.ocdbt or array file)")
    parts = tuple(f"{key}/" for key in abstract)
    found = {key: shape for key, shape in _shapes(metadata.tree).items() if f"{key}/".startswith(parts)}
    expected = _shapes(abstract)
    problems = [
        f"{key}: expected {shape}, found {found.get(key, 'nothing')}"
        # Parameters first: optimiser-state mismatches only repeat them.
        for key, shape in sorted(expected.items(), key=lambda kv: kv[0].startswith("opt_state"))
        if found.get(key) != shape
    ] + [f"{key}: unexpected {shape}" for key, shape in found.items() if key not in expected]
    if problems:
        raise ValueError(
            f"checkpoint {state_dir} does not match the encoder its config describes "
            f"({config.model.name}, embed_dim={config.model.embed_dim}, "
            f"crop {tuple(config.data.crop_size)}): " + "; ".join(problems[:5])
        )

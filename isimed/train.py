"""The one training loop: pretraining (`train_and_evaluate(config, workdir)`, every method) and
every other job that trains (fine-tuning, `isimed.finetune`) through `run_job(config, workdir,
make_job)`.

The loop owns the steps, logging (TensorBoard, metrics.jsonl, log.txt, W&B), progress and ETA,
the NaN guard, preemption, the workdir lock, and orbax checkpoints with the data-iterator
position and resume. What it trains comes from a `Job` (initial state, jitted step, data
iterator, validation, finish), which `make_job` builds: `_pretraining_job` here (the step,
state and optimizer from `isimed.train_state`, held-out metrics from `isimed.evaluation`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from jax.experimental import multihost_utils

from isimed import checkpoints
from isimed import config_checks
from isimed import paths
from isimed import runtime
from isimed import train_state
from isimed import workdir as workdir_layout
from isimed.data import pipeline
from isimed.evaluation import features as features_lib
from isimed.evaluation import held_out
from isimed.evaluation import plots
from isimed.writers import MetricWriter


class _Preemption:
    """Decides, the same way on every process, at which step to save and stop after a SIGTERM or
    (one process) a SIGINT / Ctrl-C.

    One process: a handler notes the signal and the loop reads the note once per step; the run
    then saves, waits for the save and the writers and exits 0. Signals are noted, never obeyed,
    for as long as this context is entered (training and the wait for the last save), so a
    second signal, or a burst of them, cannot kill a save in flight. Several processes: JAX's
    preemption service (started by `jax.distributed.initialize`) catches SIGTERM on any process
    and agrees with all of them on one step (`reached_preemption_sync_point`), so every process
    saves the same step; no Python handler is installed then, as it would replace JAX's (and a
    Ctrl-C noted on one process only could not be agreed on).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None  # The name of the first signal noted.
        self._previous: dict[int, Any] = {}
        self._multiprocess = jax.process_count() > 1

    def __enter__(self):
        if self._multiprocess:
            return self
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # Not the main thread (e.g. a notebook worker): no handler.
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        if self.requested is None:
            logging.warning(
                "%s received: saving a checkpoint and exiting (further signals are ignored until then).",
                signal.Signals(signum).name,
            )
            self.requested = signal.Signals(signum).name

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; call exactly once per step on every process."""
        if self._multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested is not None

    def __exit__(self, *exc):
        if self.requested:
            # The run is stopping: the rest of a burst of signals must not kill the process
            # between its last save and its exit 0, so the handler stays (the command line then
            # ignores them).
            return
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler not set from Python; nothing to restore.
                signal.signal(signum, previous)
        self._previous = {}


@dataclasses.dataclass
class Job:
    """What the loop trains, built by a job's `make_job(config, workdir)` (`run_job`).

    config: the run's config: the loop reads `total_steps`, `log_every`, `eval_every`,
        `checkpoint_every`, `keep_checkpoints`, `profile_steps` and `wandb`; it is stored in
        every checkpoint and compared on resume (`config_checks.resume_changes`).
    mesh: the device mesh the state and batches live on.
    state: the initial train state (a pytree with an int `"step"`), replicated on `mesh`.
    step: the jitted `(state, batch) -> (state, metrics)`; the metrics a clu Collection with at
        least `nonfinite` (the NaN guard: a non-finite step must leave the state untouched).
    data_iter: the training batches' grain iterator (`get_state` / `set_state`: checkpointed).
    next_batch: `() -> batch`, the next batch of `data_iter` on the device.
    validate: `(step, state) -> {group: {name: float}}`, run at step 0 and every `eval_every`
        steps; each group is logged under `<group>/`, and the group `"validation"` is the
        summary's `initial` / `validation`.
    finish: `(run, state, summary) -> summary` after the last step (not after a preemption): the
        job's held-out results and files; it closes `run.writer`.
    crops_per_step: crops through the encoder per step (the `crops_per_s` throughput).
    description: the second line of the run's announcement (e.g. the encoder and its size).
    monitors: `(state, batch) -> {name: value}` logged with the training metrics (None: none).
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    state: Any
    step: Callable
    data_iter: Any
    next_batch: Callable[[], Any]
    validate: Callable[[int, Any], dict[str, dict[str, Any]]]
    finish: Callable[[_Run, Any, dict[str, Any]], dict[str, Any]]
    crops_per_step: int
    description: str
    monitors: Callable[[Any, Any], dict[str, Any]] | None = None


class _Run:
    """What one run holds: its job, the workdir, checkpoints, preemption and the writer."""

    def __init__(self, job: Job, workdir: workdir_layout.Workdir):
        self.job, self.config, self.workdir = job, job.config, workdir
        # Opened by `open_writer` once the step to start from is known: metrics.jsonl rows logged
        # after it are dropped first.
        self.writer: MetricWriter | None = None
        self.mesh = job.mesh
        self.data_iter = job.data_iter
        checkpoints.remove_unfinished_saves(workdir)
        self.mngr = checkpoints.manager(workdir, job.config)
        self.saving: int | None = None  # The step of the newest save started.
        self.preemption = _Preemption()

    def open_writer(self, start_step: int | None) -> str | None:
        """Opens the metric writer; first (process 0) drops the metrics.jsonl rows of steps after
        `start_step` (all rows when starting from scratch, `None`): a killed run logged them after
        its last checkpoint, and this run logs those steps again. Returns the line that says so."""
        dropped = 0
        if jax.process_index() == 0:
            after = -1 if start_step is None else start_step
            dropped = _drop_metrics_after(self.workdir.metrics, after)
        self.writer = MetricWriter(self.workdir, self.config)
        if dropped:
            return (
                f"metrics.jsonl: dropped {dropped} line(s) logged after "
                + ("the start" if start_step is None else f"step {start_step}")
                + " (after the last checkpoint); those steps are logged again"
            )
        return None

    def save(self, step: int, state) -> None:
        self.saving = step
        checkpoints.save(self.mngr, step, state, self.data_iter, self.config)

    def finish_saves(self, *, only_if_done: bool = False, on_error: bool = False) -> None:
        """Waits for the save in flight; `SaveError` if it failed. `only_if_done`: the per-step
        check, which does not wait. `on_error`: the run is already stopping with another error,
        so a failed save is a warning line, not a second error."""
        try:
            checkpoints.finish_saves(self.mngr, self.saving, only_if_done=only_if_done)
        except checkpoints.SaveError as e:
            if not on_error:
                raise
            logging.warning("%s", e)

    def announce(self, status: str) -> None:
        """The run's first lines, printed by every process (visible at the default log level)."""
        lines = [
            f"process {jax.process_index()} of {jax.process_count()}: "
            f"{jax.local_device_count()} local / {jax.device_count()} global "
            f"{jax.default_backend()} devices, "
            f"mesh {dict(self.mesh.shape)}",
            f"{self.job.description}; {status}",
        ]
        for line in lines:
            self.say(line)

    def say(self, line: str) -> None:
        """A line every process prints (process 0 into log.txt too), at the default log level."""
        if jax.process_index() == 0:
            self.writer.log(line)
        else:
            print(line, flush=True)

    def validate(self, step: int, state) -> dict[str, Any]:
        """The job's validation, each group logged under `<group>/`; returns the "validation" group."""
        groups = self.job.validate(step, state)
        for group, scores in groups.items():
            self.writer.write_scalars(step, scores, prefix=f"{group}/")
        return groups["validation"]

    def next_batch(self):
        return self.job.next_batch()

    def monitors(self, state, batch) -> dict[str, Any]:
        return {} if self.job.monitors is None else self.job.monitors(state, batch)


def _log_step(run: _Run, step: int, accumulated, monitors, since: tuple[float, int]) -> tuple[float, int]:
    """Writes the accumulated metrics and this step's collapse monitors with throughput and ETA;
    stops the run on a non-finite step.

    The NaN guard is checked before every save as well as at every log step."""
    config = run.config
    scalars = {**accumulated.compute(), **monitors}
    if scalars["nonfinite"] > 0:
        run.finish_saves(on_error=True)  # The save in flight counts as good once it is done.
        raise FloatingPointError(
            f"non-finite loss or gradient before step {step}; those updates were "
            f"skipped and nothing was saved. Last good checkpoint: step "
            f"{run.mngr.latest_step()} in {run.mngr.directory}"
        )
    t_log, step_log = since
    elapsed = time.time() - t_log
    scalars["crops_per_s"] = (step - step_log) * run.job.crops_per_step / max(elapsed, 1e-9)
    eta = (config.total_steps - step) * elapsed / max(step - step_log, 1)
    run.writer.write_scalars(step, scalars, prefix="train/")
    run.writer.log(f"step {step}/{config.total_steps}, {scalars['crops_per_s']:.0f} crops/s, ETA {eta:.0f} s")
    return time.time(), step


def _profile(run: _Run, step: int, state) -> None:
    """Starts the `profile_steps` trace before its first step and stops it before the step after
    its last (once the traced steps have finished on the device)."""
    first_last = tuple(run.config.get("profile_steps") or ())
    if len(first_last) != 2:
        return
    if step == first_last[0]:
        jax.profiler.start_trace(os.fspath(run.workdir.profile))
    elif step == first_last[1] + 1:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        run.say(f"profile of steps {first_last[0]}-{first_last[1]} in {run.workdir.profile}")


def _train(run: _Run, state, start_step: int, summary: dict[str, Any]):
    """Steps from `start_step` to `total_steps`; returns `(state, preempted)`."""
    config = run.config
    accumulated = None
    since = (time.time(), start_step)
    for step in range(start_step + 1, config.total_steps + 1):
        run.finish_saves(only_if_done=True)  # A failed save stops the run within one step.
        _profile(run, step, state)
        batch = run.next_batch()
        state, step_metrics = run.job.step(state, batch)
        accumulated = step_metrics if accumulated is None else accumulated.merge(step_metrics)
        is_last = step == config.total_steps
        # Decided once per step: a signal arriving later in this step must not skip the save
        # yet still end the run.
        stop = run.preemption.reached(step)
        will_save = step % config.checkpoint_every == 0 or is_last or stop
        if step % config.log_every == 0 or will_save:
            since = _log_step(run, step, accumulated, run.monitors(state, batch), since)
            accumulated = None
        if step % config.eval_every == 0 or is_last:
            summary["validation"] = run.validate(step, state)
        if will_save:
            run.save(step, state)
        if stop:
            return state, True
    return state, False


def _drop_metrics_after(path, step: int) -> int:
    """Rewrites metrics.jsonl without the rows of steps after `step` and without a truncated last
    line (a run killed mid-write); returns how many lines were dropped. Lines that are not rows
    are kept."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue  # Truncated by a kill.
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            continue
        kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


def _check_writable(workdir: workdir_layout.Workdir) -> None:
    """Creates `workdir` and writes and deletes a file in it (each process its own), so a
    workdir that cannot be written stops the run at once with one message, not deep in orbax."""
    # The pid too: two runs starting on one workdir (the second is refused by the lock, taken
    # after this) must not delete each other's probe and fail with a false "cannot be written".
    probe = workdir / f".write_test_process_{jax.process_index()}_{os.getpid()}"
    try:
        workdir.root.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise workdir_layout.WorkdirUnwritable(f"workdir {workdir} cannot be written: {e}") from e


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Pretrains (resuming from `workdir` if it holds a checkpoint) and returns the summary.

    The config is checked before anything is read or compiled (`config_checks.validate`: every bad
    value in one error). Resuming restores, from the newest readable checkpoint, the parameters,
    batch statistics, optimiser state, step and data-iterator position, so the run continues bit
    for bit; the stored config must match `config` except for `config_checks.RESUMABLE` settings
    (changed ones are announced). An unreadable newest checkpoint is reported and the previous one
    used (`checkpoints.restore`). metrics.jsonl rows of steps after the restored one are dropped.

    One run per workdir: a second one stops with `workdir.WorkdirBusy` naming the holder. A SIGTERM
    or Ctrl-C saves a checkpoint and returns `{"preempted_at_step": N}` (`_Preemption`); every way
    out waits for the save in flight, and a save that fails stops the run with
    `checkpoints.SaveError`.
    """
    config_checks.validate(config)
    pipeline.check_crops_fit(config.data, ("train", "validation", "test"))
    runtime.initialize(config)
    return run_job(config, workdir, _pretraining_job)


def run_job(
    config: ml_collections.ConfigDict,
    workdir: str,
    make_job: Callable[[ml_collections.ConfigDict, workdir_layout.Workdir], Job],
) -> dict[str, Any]:
    """Trains the job `make_job(config, workdir)` builds (a copy of `config` is passed) in
    `workdir`, resuming from its newest readable checkpoint, and returns its finish's summary
    (or `{"preempted_at_step": N}`). Everything `train_and_evaluate` says of resuming, the lock,
    preemption and saves holds for every job. `make_job` runs once the workdir is locked."""
    workdir = workdir_layout.Workdir(workdir)
    _check_writable(workdir)
    lock = _lock(workdir)
    try:
        return _locked(config, workdir, make_job)
    finally:
        if lock is not None:
            lock.release()


def _lock(workdir: workdir_layout.Workdir) -> workdir_layout.Lock | None:
    """Process 0 locks the workdir for the whole run (`workdir.Lock`); every process stops with
    `WorkdirBusy` when another run holds it."""
    lock, busy = None, None
    if jax.process_index() == 0:
        try:
            lock = workdir_layout.Lock(workdir).acquire()
        except workdir_layout.WorkdirBusy as e:
            busy = e
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(busy is not None)):
        busy = busy or workdir_layout.WorkdirBusy(f"workdir {workdir} is in use by another run")
    if busy is not None:
        raise busy
    return lock


def _locked(config: ml_collections.ConfigDict, workdir: workdir_layout.Workdir, make_job) -> dict[str, Any]:
    run = _Run(make_job(ml_collections.ConfigDict(config), workdir), workdir)
    config, state = run.config, run.job.state
    restored = checkpoints.restore(run.mngr, state, run.data_iter, config)
    dropped = run.open_writer(None if restored is None else restored.step)
    try:
        return _train_and_finish(run, state, restored, dropped)
    except BaseException:
        run.writer.close()  # Flushes the logs when the run stops with an error.
        raise


def _train_and_finish(run: _Run, state, restored, dropped: str | None) -> dict[str, Any]:
    """Announces the start, validates at step 0 (fresh runs), trains, then the held-out summary."""
    summary: dict[str, Any] = {}
    if restored is not None and restored.step > run.config.total_steps:
        # Training nothing and reporting the checkpoint as the end of a shorter run would hide
        # the mistake.
        raise config_checks.ConfigError(
            f"cannot resume {run.mngr.directory} (step {restored.step}) with total_steps = "
            f"{run.config.total_steps}: the checkpoint is past it; pass "
            f"--config.total_steps={restored.step} or more, or use a new --workdir"
        )
    if restored is not None:
        start_step, state = restored.step, restored.state
        changed = "; changed on resume: " + ", ".join(restored.changes) if restored.changes else ""
        run.announce(f"resumed from step {start_step} in {run.mngr.directory}{changed}")
    else:
        start_step = 0
        run.announce("starting from scratch")
    if dropped:
        run.writer.log(dropped)
    with run.preemption, checkpoints.orbax_errors_dropped():
        if restored is None:
            summary["initial"] = run.validate(0, state)
        else:
            summary.update(_summary_so_far(run.workdir.metrics))
        try:
            state, preempted = _train(run, state, start_step, summary)
        except BaseException:
            run.finish_saves(on_error=True)  # No way out drops the save in flight.
            raise
        run.finish_saves()
        # A signal noted after the last step's check (during its save) stops the run here too:
        # the held-out evaluation could outlast a preemption's grace period.
        if preempted or run.preemption.requested:
            run.writer.close()
            return {"preempted_at_step": int(state["step"])}
    # From here on a signal is obeyed: the last checkpoint is complete, and a rerun only
    # evaluates.
    return run.job.finish(run, state, summary)


def _summary_so_far(path) -> dict[str, Any]:
    """`initial` (step 0) and `validation` (the newest later step) from metrics.jsonl's
    validation rows: the earlier segments of a resumed run computed them. Called after the rows
    of steps after the restored checkpoint were dropped."""
    rows: dict[int, dict[str, float]] = {}
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        scores = {k.removeprefix("validation/"): v for k, v in row.items() if k.startswith("validation/")}
        if scores and isinstance(row.get("step"), int):
            rows[row["step"]] = scores
    summary = {}
    if 0 in rows:
        summary["initial"] = rows[0]
    later = [step for step in rows if step > 0]
    if later:
        summary["validation"] = rows[max(later)]
    return summary


def _pretraining_job(config: ml_collections.ConfigDict, workdir: workdir_layout.Workdir) -> Job:
    """Pretraining with `config.method`: the train state and step of `train_state`, crops of the
    training split, held-out validation (Spearman, no probe) and, at the end, held-out test metrics
    with the position probe, summary.json and the plots."""
    del workdir
    if config.data.name == "chest_phantom":
        config.data.tfds_dir = os.fspath(paths.resolve(config.data.tfds_dir))
    mesh = runtime.make_mesh()
    setup = train_state.create_train_step(config, mesh)
    method = setup.method
    logging.info("Encoder parameters:\n%s", parameter_overview.get_parameter_overview(setup.networks.params))
    embed = features_lib.make_embed_fn(setup.networks, mesh)
    train_ds = pipeline.make_dataset(
        config.data,
        "train",
        seed=config.seed,
        train=True,
        views=method.views,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    data_iter = iter(train_ds)
    step_keys = ("crops", "centres", "views") if method.views == 2 else ("crops", "centres")

    def next_batch() -> train_state.Batch:
        batch = next(data_iter)
        return {
            k: jax.make_array_from_process_local_data(setup.data_sharding, np.asarray(batch[k]))
            for k in step_keys
        }

    def encoder(state: train_state.State):
        return embed(state["params"]["encoder"], state["batch_stats"])

    def validate(step: int, state: train_state.State) -> dict[str, dict[str, Any]]:
        del step
        scores = held_out.held_out_summary(config, encoder(state), "validation", with_probe=False)
        return {"validation": scores}

    def finish(run: _Run, state: train_state.State, summary: dict[str, Any]) -> dict[str, Any]:
        enc = encoder(state)
        held = features_lib.collect(
            config, "test", {"model": enc}, max_images=config.eval.max_images, with_crops=True
        )
        summary["final"] = held_out.held_out_summary(config, enc, "test", with_probe=True, held=held)
        summary["step"] = int(state["step"])
        if jax.process_index() == 0:
            run.workdir.summary.write_text(json.dumps(summary, indent=2))
        run.writer.close()  # Flushes metrics.jsonl before it is plotted.
        if jax.process_index() == 0:
            plots.write_training_plots(
                run.workdir,
                held["embeddings"]["model"],
                held["centres"],
                lesion=held["has_lesion"],
                scale_mm=method.target_scale_mm(jax.device_get(state["params"]), config.loss),
            )
        return summary

    return Job(
        config=config,
        mesh=mesh,
        state=setup.state,
        step=setup.step,
        data_iter=data_iter,
        next_batch=next_batch,
        validate=validate,
        finish=finish,
        crops_per_step=config.data.images_per_batch * config.data.crops_per_image,
        description=f"encoder {config.model.name}: "
        f"{parameter_overview.count_parameters(setup.networks.params):,} parameters",
        monitors=setup.monitors,
    )


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable lines for the end of a run."""
    if "preempted_at_step" in summary:
        return f"Preempted: checkpoint saved at step {summary['preempted_at_step']}; rerun to resume."
    final = summary["final"]
    if "spearman_all" in final:  # Subjects in one world frame (`held_out.held_out_summary`).
        spearman = f"within image {final['spearman_within']:.3f}, all pairs {final['spearman_all']:.3f}"
        probe, key = "Ridge probe of crop centre", "position_probe"
    else:
        spearman = f"within image {final['spearman_within']:.3f} (subjects in their own frames)"
        probe, key = "Ridge probe of crop centre within each subject", "position_probe_within_subject"
    lines = [
        f"Held-out test subjects after {summary['step']} steps:",
        f"  Spearman(latent, physical distance): {spearman}",
        f"  {probe}, mean abs error: embeddings {final[key]['mae_mm']:.1f} mm, raw intensities "
        f"{final[key + '_raw_intensity']['mae_mm']:.1f} mm",
    ]
    if "initial" in summary:
        lines.append(
            f"  (validation Spearman within image at step 0: {summary['initial']['spearman_within']:.3f})"
        )
    return "\n".join(lines)

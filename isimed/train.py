"""The one pretraining loop every method uses: `train_and_evaluate(config, workdir)`.

The step, state and optimizer come from `isimed.train_state`, checkpoints from
`isimed.checkpoints`, held-out metrics from `isimed.evaluation`; this module owns the loop,
preemption and logging.
"""

from __future__ import annotations

import json
import os
import signal
import time
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
from isimed.data import pipeline
from isimed.evaluation import features as features_lib
from isimed.evaluation import held_out
from isimed.evaluation import plots
from isimed.writers import MetricWriter


class _Preemption:
    """Decides, the same way on every process, at which step to save and stop after a SIGTERM.

    One process: a SIGTERM handler sets a flag the loop reads once per step. Several processes:
    JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM on any
    process and agrees with all of them on one step (`reached_preemption_sync_point`), so every
    process saves the same step; no Python handler is installed then, as it would replace JAX's.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._multiprocess = jax.process_count() > 1

    def __enter__(self):
        if self._multiprocess:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not the main thread (e.g. a notebook worker): no handler.
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint and exiting.")
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; call exactly once per step on every process."""
        if self._multiprocess:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _Run:
    """What one pretraining run holds: config, setup, data iterator, checkpoints and writer."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir = config, workdir
        # Opened by `open_writer` once the step to start from is known: metrics.jsonl rows logged
        # after it are dropped first.
        self.writer: MetricWriter | None = None
        self.mesh = mesh = runtime.make_mesh()
        self.setup = train_state.create_train_step(config, mesh)
        self.method = self.setup.method
        logging.info(
            "Encoder parameters:\n%s",
            parameter_overview.get_parameter_overview(self.setup.networks.params),
        )
        self.embed = features_lib.make_embed_fn(self.setup.networks, mesh)
        train_ds = pipeline.make_dataset(
            config.data,
            "train",
            seed=config.seed,
            train=True,
            views=self.method.views,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        self.data_iter = iter(train_ds)
        checkpoints.remove_unfinished_saves(workdir)
        self.mngr = checkpoints.manager(workdir, config)
        self.step_keys = ("crops", "centres", "views") if self.method.views == 2 else ("crops", "centres")

    def open_writer(self, start_step: int | None) -> str | None:
        """Opens the metric writer; first (process 0) drops the metrics.jsonl rows of steps after
        `start_step` (all rows when starting from scratch, `None`): a killed run logged them after
        its last checkpoint, and this run logs those steps again. Returns the line that says so."""
        dropped = 0
        if jax.process_index() == 0:
            after = -1 if start_step is None else start_step
            dropped = _drop_metrics_after(self.workdir / "metrics.jsonl", after)
        self.writer = MetricWriter(self.workdir, self.config)
        if dropped:
            return (
                f"metrics.jsonl: dropped {dropped} line(s) logged after "
                + ("the start" if start_step is None else f"step {start_step}")
                + " (after the last checkpoint); those steps are logged again"
            )
        return None

    def announce(self, status: str) -> None:
        """The run's first lines, printed by every process (visible at the default log level)."""
        lines = [
            f"process {jax.process_index()} of {jax.process_count()}: "
            f"{jax.local_device_count()} local / {jax.device_count()} global "
            f"{jax.default_backend()} devices, "
            f"mesh {dict(self.mesh.shape)}",
            f"encoder {self.config.model.name}: "
            f"{parameter_overview.count_parameters(self.setup.networks.params):,} parameters; {status}",
        ]
        for line in lines:
            self.say(line)

    def say(self, line: str) -> None:
        """A line every process prints (process 0 into log.txt too), at the default log level."""
        if jax.process_index() == 0:
            self.writer.log(line)
        else:
            print(line, flush=True)

    def encoder(self, state: train_state.State):
        return self.embed(state["params"]["encoder"], state["batch_stats"])

    def validate(self, step: int, state: train_state.State) -> dict[str, Any]:
        scores = held_out.held_out_summary(self.config, self.encoder(state), "validation", with_probe=False)
        self.writer.write_scalars(step, scores, prefix="validation/")
        return scores

    def next_batch(self) -> train_state.Batch:
        batch = next(self.data_iter)
        return {
            k: jax.make_array_from_process_local_data(self.setup.data_sharding, np.asarray(batch[k]))
            for k in self.step_keys
        }


def _log_step(run: _Run, step: int, accumulated, monitors, since: tuple[float, int]) -> tuple[float, int]:
    """Writes the accumulated metrics and this step's collapse monitors with throughput and ETA;
    stops the run on a non-finite step.

    The NaN guard is checked before every save as well as at every log step."""
    config = run.config
    scalars = {**accumulated.compute(), **monitors}
    if scalars["nonfinite"] > 0:
        raise FloatingPointError(
            f"non-finite loss or gradient before step {step}; those updates were "
            f"skipped and nothing was saved. Last good checkpoint: step "
            f"{run.mngr.latest_step()} in {run.mngr.directory}"
        )
    t_log, step_log = since
    elapsed = time.time() - t_log
    crops_per_step = config.data.images_per_batch * config.data.crops_per_image
    scalars["crops_per_s"] = (step - step_log) * crops_per_step / max(elapsed, 1e-9)
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
        jax.profiler.start_trace(os.fspath(run.workdir / "profile"))
    elif step == first_last[1] + 1:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        run.say(f"profile of steps {first_last[0]}-{first_last[1]} in {run.workdir / 'profile'}")


def _train(run: _Run, state, start_step: int, summary: dict[str, Any]):
    """Steps from `start_step` to `total_steps`; returns `(state, preempted)`."""
    config = run.config
    accumulated = None
    since = (time.time(), start_step)
    with _Preemption() as preemption:
        for step in range(start_step + 1, config.total_steps + 1):
            _profile(run, step, state)
            batch = run.next_batch()
            state, step_metrics = run.setup.step(state, batch)
            accumulated = step_metrics if accumulated is None else accumulated.merge(step_metrics)
            is_last = step == config.total_steps
            # Decided once per step: a SIGTERM arriving later in this step must not skip the save
            # yet still end the run.
            stop = preemption.reached(step)
            will_save = step % config.checkpoint_every == 0 or is_last or stop
            if step % config.log_every == 0 or will_save:
                since = _log_step(run, step, accumulated, run.setup.monitors(state, batch), since)
                accumulated = None
            if step % config.eval_every == 0 or is_last:
                summary["validation"] = run.validate(step, state)
            if will_save:
                checkpoints.save(run.mngr, step, state, run.data_iter, config)
            if stop:
                return state, True
    return state, False


def _finish(run: _Run, state, summary: dict[str, Any]) -> dict[str, Any]:
    """Held-out test metrics with the position probe, summary.json and the plots."""
    config, workdir = run.config, run.workdir
    enc = run.encoder(state)
    held = features_lib.collect(
        config, "test", {"model": enc}, max_images=config.eval.max_images, with_crops=True
    )
    summary["final"] = held_out.held_out_summary(config, enc, "test", with_probe=True, held=held)
    summary["step"] = int(state["step"])
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    run.writer.close()  # Flushes metrics.jsonl before it is plotted.
    if jax.process_index() == 0:
        plots.write_training_plots(
            workdir,
            held["embeddings"]["model"],
            held["centres"],
            lesion=held["has_lesion"],
            scale_mm=run.method.target_scale_mm(jax.device_get(state["params"]), config.loss),
        )
    return summary


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


def _check_writable(workdir) -> None:
    """Creates `workdir` and writes and deletes a file in it (each process its own), so a
    workdir that cannot be written stops the run at once with one message, not deep in orbax."""
    probe = workdir / f".write_test_process_{jax.process_index()}"
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise type(e)(f"workdir {workdir} cannot be written: {e}") from e


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Pretrains (resuming from `workdir` if it holds a checkpoint) and returns the summary.

    The config is checked before anything is read or compiled (`config_checks.validate`: every bad
    value in one error). Resuming restores, from the newest readable checkpoint, the parameters,
    batch statistics, optimiser state, step and data-iterator position, so the run continues bit
    for bit; the stored config must match `config` except for `config_checks.RESUMABLE` settings
    (changed ones are announced). An unreadable newest checkpoint is reported and the previous one
    used (`checkpoints.restore`). metrics.jsonl rows of steps after the restored one are dropped.
    """
    config_checks.validate(config)
    pipeline.check_crops_fit(config.data, ("train", "validation", "test"))
    runtime.initialize(config)
    workdir = paths.resolve(workdir)
    _check_writable(workdir)
    config = ml_collections.ConfigDict(config)
    if config.data.name == "chest_phantom":
        config.data.tfds_dir = os.fspath(paths.resolve(config.data.tfds_dir))
    run = _Run(config, workdir)
    state = run.setup.state
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
    if restored is not None:
        start_step, state = restored.step, restored.state
        changed = "; changed on resume: " + ", ".join(restored.changes) if restored.changes else ""
        run.announce(f"resumed from step {start_step} in {run.mngr.directory}{changed}")
    else:
        start_step = 0
        run.announce("starting from scratch")
    if dropped:
        run.writer.log(dropped)
    if restored is None:
        summary["initial"] = run.validate(0, state)
    state, preempted = _train(run, state, start_step, summary)
    run.mngr.wait_until_finished()
    if preempted:
        run.writer.close()
        return {"preempted_at_step": int(state["step"])}
    return _finish(run, state, summary)


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

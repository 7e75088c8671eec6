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
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from jax.experimental import multihost_utils

from isimed import checkpoints
from isimed import methods
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
        self.writer = MetricWriter(workdir)
        self.method = methods.get(config.method)
        self.mesh = mesh = train_state.make_mesh()
        self.setup = train_state.create_train_step(config, mesh)
        logging.info(
            "Encoder parameters:\n%s",
            parameter_overview.get_parameter_overview(self.setup.networks.params),
        )
        self.embed = features_lib.make_embed_fn(self.setup.networks, mesh)
        train_ds = pipeline.make_dataset(
            config.data, "train", seed=config.seed, train=True, views=self.method.views,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        self.data_iter = iter(train_ds)
        self.mngr = checkpoints.manager(workdir, config)
        self.step_keys = ("crops", "centres", "views") if self.method.views == 2 else ("crops", "centres")

    def announce(self, status: str) -> None:
        """The run's first lines, printed by every process (visible at the default log level)."""
        lines = [
            f"process {jax.process_index()} of {jax.process_count()}: "
            f"{jax.local_device_count()} local / {jax.device_count()} global {jax.default_backend()} devices, "
            f"mesh {dict(self.mesh.shape)}",
            f"encoder {self.config.model.name}: "
            f"{parameter_overview.count_parameters(self.setup.networks.params):,} parameters; {status}",
        ]
        for line in lines:
            self.writer.log(line) if jax.process_index() == 0 else print(line, flush=True)

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


def _log_step(run: _Run, step: int, accumulated, since: tuple[float, int]) -> tuple[float, int]:
    """Writes the accumulated metrics with throughput and ETA; stops the run on a non-finite step.

    The NaN guard is checked before every save as well as at every log step."""
    config = run.config
    scalars = accumulated.compute()
    if scalars["nonfinite"] > 0:
        raise FloatingPointError(
            f"non-finite loss or gradient before step {step}; those updates were "
            f"skipped and nothing was saved. Last good checkpoint: step "
            f"{run.mngr.latest_step()} in {run.mngr.directory}"
        )
    t_log, step_log = since
    elapsed = time.time() - t_log
    crops_per_step = config.data.images_per_batch * config.data.crops_per_image * run.method.views
    scalars["crops_per_s"] = (step - step_log) * crops_per_step / max(elapsed, 1e-9)
    eta = (config.total_steps - step) * elapsed / max(step - step_log, 1)
    run.writer.write_scalars(step, scalars, prefix="train/")
    run.writer.log(
        f"step {step}/{config.total_steps}, {scalars['crops_per_s']:.0f} crops/s, ETA {eta:.0f} s"
    )
    return time.time(), step


def _train(run: _Run, state, start_step: int, summary: dict[str, Any]):
    """Steps from `start_step` to `total_steps`; returns `(state, preempted)`."""
    config = run.config
    accumulated = None
    since = (time.time(), start_step)
    with _Preemption() as preemption:
        for step in range(start_step + 1, config.total_steps + 1):
            state, step_metrics = run.setup.step(state, run.next_batch())
            accumulated = step_metrics if accumulated is None else accumulated.merge(step_metrics)
            is_last = step == config.total_steps
            # Decided once per step: a SIGTERM arriving later in this step must not skip the save
            # yet still end the run.
            stop = preemption.reached(step)
            will_save = step % config.checkpoint_every == 0 or is_last or stop
            if step % config.log_every == 0 or will_save:
                since = _log_step(run, step, accumulated, since)
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
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    run.writer.close()  # Flushes metrics.jsonl before it is plotted.
    if jax.process_index() == 0:
        learned = state["params"].get("log_scale")
        plots.write_training_plots(
            workdir, config, held["embeddings"]["model"], held["centres"],
            lesion=held["has_lesion"],
            scale_mm=None if learned is None else float(jnp.exp(learned)),
        )
    return summary


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize` for `config.distributed`; unset fields are auto-detected."""
    if config.distributed and not jax.distributed.is_initialized():
        jax.distributed.initialize(
            coordinator_address=config.get("coordinator_address"),
            num_processes=config.get("num_processes"),
            process_id=config.get("process_id"),
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Pretrains (resuming from `workdir` if it holds a checkpoint) and returns the summary."""
    initialize_distributed(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config = ml_collections.ConfigDict(config)
    if config.data.name == "chest_phantom":
        config.data.tfds_dir = os.path.expanduser(config.data.tfds_dir)
    run = _Run(config, workdir)
    state = run.setup.state
    summary: dict[str, Any] = {}
    start_step = run.mngr.latest_step()
    if start_step is not None:
        state = checkpoints.restore(run.mngr, start_step, state, run.data_iter)
        run.announce(f"resumed from step {start_step} in {run.mngr.directory}")
    else:
        start_step = 0
        run.announce("starting from scratch")
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
    lines = [
        f"Held-out test subjects after {summary['step']} steps:",
        f"  Spearman(latent, physical distance): within image {final['spearman_within']:.3f}, "
        f"all pairs {final['spearman_all']:.3f}",
        f"  Ridge probe of crop centre, mean abs error: embeddings "
        f"{final['position_probe']['mae_mm']:.1f} mm, raw intensities "
        f"{final['position_probe_raw_intensity']['mae_mm']:.1f} mm",
    ]
    if "initial" in summary:
        lines.append(
            f"  (validation Spearman within image at step 0: {summary['initial']['spearman_within']:.3f})"
        )
    return "\n".join(lines)

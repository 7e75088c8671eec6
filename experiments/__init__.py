"""Experiments that compare methods or test what an encoder learned: results, not speed (speed
lives in benchmarks/)."""

import sys
from typing import Any


def finished(result: dict[str, Any], workdir: str) -> dict[str, Any]:
    """`result` of a training run (`train.train_and_evaluate`, `finetune.finetune`), or the end of
    the experiment when a SIGTERM / Ctrl-C preempted that run: its checkpoint is saved, and going
    on would build the next run (or the table) on an unfinished one. Rerunning resumes it."""
    if "preempted_at_step" in result:
        print(
            f"stopped: the run in {workdir} was preempted at step {result['preempted_at_step']} "
            "(checkpoint saved); rerun the same command to resume",
            flush=True,
        )
        sys.exit(0)
    return result

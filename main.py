"""Pretraining entry point: `python main.py --config=configs/isimed_chest.py:demo [--workdir=DIR]`
(installed as `isimed-pretrain`; one implementation, `isimed.cli.run_pretrain`).

DIR defaults to `workdirs/<config name>[_<preset>]` (here `workdirs/isimed_chest_demo`). Resumes
from the latest checkpoint in DIR. Writes checkpoints, TensorBoard events, metrics.jsonl, log.txt
and summary.json there.
"""

from isimed import cli

if __name__ == "__main__":
    cli.run_pretrain()

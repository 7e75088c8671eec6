"""Pretraining entry point: `python main.py --config=configs/isimed_chest.py:demo --workdir=DIR`.

Resumes from the latest checkpoint in DIR. Writes checkpoints, TensorBoard events, metrics.jsonl,
log.txt and summary.json there.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from isimed import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results (resumes from it).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Library INFO logs (orbax, tfds) drown progress.
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(train.format_summary(summary))


if __name__ == "__main__":
    app.run(main)

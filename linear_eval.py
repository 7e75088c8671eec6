"""Linear evaluation entry point.

python linear_eval.py --config=configs/linear_eval_chest.py:demo \
    --config.pretrain_workdir=PRETRAIN_DIR --workdir=EVAL_DIR

Writes results.json and results.md to EVAL_DIR and prints the table.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from isimed.evaluation import linear_eval

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Linear-evaluation configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for results.json and results.md.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    results = linear_eval.evaluate(FLAGS.config, FLAGS.workdir)
    print(linear_eval.format_results(results))


if __name__ == "__main__":
    app.run(main)

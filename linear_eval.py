"""Linear evaluation entry point (installed as `isimed-linear-eval`; one implementation,
`isimed.cli.run_linear_eval`).

python linear_eval.py --config=configs/linear_eval_chest.py:demo \
    --config.pretrain_workdir=PRETRAIN_DIR [--workdir=EVAL_DIR]

Writes results.json and results.md to EVAL_DIR (default PRETRAIN_DIR/linear_eval) and prints the
table.
"""

from isimed import cli

if __name__ == "__main__":
    cli.run_linear_eval()

"""Fine-tuning entry point (installed as `isimed-finetune`; one implementation,
`isimed.cli.run_finetune`).

python finetune.py --config=configs/finetune_chest.py:demo,mode=linear,fraction=0.1 \
    --config.pretrain_workdir=PRETRAIN_DIR [--workdir=DIR]

DIR defaults to PRETRAIN_DIR/finetune_<mode>_<fraction>[_<init>]; resumes from it. Writes
checkpoints, metrics.jsonl, log.txt and results.json (the test AUC at the step of the best
validation AUC) there.
"""

from isimed import cli

if __name__ == "__main__":
    cli.run_finetune()

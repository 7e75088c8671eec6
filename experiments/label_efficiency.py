"""Label efficiency: what pretraining saves when labels are few. Fine-tunes each arm's encoder
with a nested series of labelled-subject fractions and compares the test AUC with fine-tuning the
same architecture from its random initialisation.

python -m experiments.label_efficiency [--preset=demo] [--arms=isimed] [--mode=full]
    [--fractions=2,0.05,0.1,0.25,1.0] [--seeds=1] [--workdir=workdirs/label_efficiency]

Arms: `random` (always; the same architecture at the initialisation ISImed's pretraining started
from) and each pretraining method of `--arms` (`configs/isimed_chest.py:<preset>,method=<arm>`,
the one training loop). Every (arm, fraction, seed) is a run of `isimed.finetune`
(`configs/finetune_chest.py:<preset>,mode=<mode>`, the task: crop lesion classification) with the
test AUC at the step of the best validation AUC. A fraction of 1 or more (an integer) is that many
subjects. Seed s pretrains with seed s and fine-tunes every arm with `seed = split_seed = s`: the
same labelled subjects and batches for each arm, so each seed gives a paired difference to the
random init. Writes label_efficiency.md (mean ± std over seeds of the test AUC, and of the paired
difference to random init) and label_efficiency.json. Finished runs are reused.
"""

import json
import os

import numpy as np
from absl import app
from absl import flags
from absl import logging

from configs import finetune_chest
from configs import isimed_chest
from isimed import finetune
from isimed import train


def define_flags() -> None:
    """The command's flags, defined when it runs (not on import: the tests import several
    experiments into one process, and absl refuses a flag name defined twice)."""
    flags.DEFINE_string("preset", "demo", "Preset of the pretraining and the fine-tuning configs.")
    flags.DEFINE_list("arms", ["isimed"], "Pretraining methods fine-tuned (random init is always an arm).")
    flags.DEFINE_enum("mode", "full", ["linear", "full"], "Fine-tuning mode.")
    flags.DEFINE_list(
        "fractions", ["2", "0.05", "0.1", "0.25", "1.0"], "Shares (<= 1) or counts (> 1) of subjects."
    )
    flags.DEFINE_integer("seeds", 1, "Seeds 0..N-1 (pretraining, labelled subjects and batches).")
    flags.DEFINE_integer("pretrain_steps", 0, "Pretraining steps (0: the preset's).")
    flags.DEFINE_integer("steps", 0, "Fine-tuning steps (0: the preset's).")
    flags.DEFINE_string("workdir", "workdirs/label_efficiency", "Where runs and the tables go.")
    flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data dir (the phantom is generated here).")


FLAGS = flags.FLAGS

RANDOM = "random"


def amount(fraction: str) -> dict:
    """`{"fraction": F}` for a share in (0, 1], `{"subjects": N}` for a count above 1."""
    value = float(fraction)
    if value > 1.0 or (value == 1.0 and "." not in fraction):
        return {"subjects": int(value)}
    return {"fraction": value}


def pretrain(method: str, seed: int) -> str:
    """The pretraining workdir of (method, seed), pretrained unless done."""
    workdir = os.path.join(FLAGS.workdir, f"pretrain_{method}_seed{seed}")
    if not os.path.exists(os.path.join(workdir, "summary.json")):
        config = isimed_chest.get_config(f"{FLAGS.preset},method={method}")
        config.seed = seed
        config.data.tfds_dir = FLAGS.data_dir
        if FLAGS.pretrain_steps:
            config.total_steps = FLAGS.pretrain_steps
        print(f"== pretraining {method}, seed {seed} -> {workdir}", flush=True)
        train.train_and_evaluate(config, workdir)
    return workdir


def finetune_one(arm: str, fraction: str, seed: int) -> dict:
    """results.json of one fine-tuning run, run unless done."""
    pretrain_workdir = pretrain("isimed" if arm == RANDOM else arm, seed)
    init = "random" if arm == RANDOM else "pretrained"
    config = finetune_chest.get_config(f"{FLAGS.preset},mode={FLAGS.mode},init={init}")
    config.pretrain_workdir = pretrain_workdir
    config.update(amount(fraction))
    config.seed = config.split_seed = seed
    config.data_dir = FLAGS.data_dir
    if FLAGS.steps:
        config.total_steps = FLAGS.steps
    workdir = os.path.join(FLAGS.workdir, f"{arm}_{finetune.run_name(config)}_seed{seed}")
    path = os.path.join(workdir, "results.json")
    if os.path.exists(path):
        return json.load(open(path))
    print(f"== fine-tuning {arm}, {fraction} labelled, seed {seed} -> {workdir}", flush=True)
    return finetune.finetune(config, workdir)


def summarise(aucs: dict[str, dict[str, list[float]]]) -> dict:
    """Per arm and fraction: mean and std over seeds of the test AUC and, for pretrained arms,
    of the paired difference to random init (same seed)."""
    out: dict = {}
    for arm, per_fraction in aucs.items():
        out[arm] = {}
        for fraction, values in per_fraction.items():
            v = np.asarray(values)
            row = {"test_auc": [float(v.mean()), float(v.std())], "seeds": len(v)}
            if arm != RANDOM:
                d = v - np.asarray(aucs[RANDOM][fraction])
                row["difference_to_random"] = [float(d.mean()), float(d.std())]
            out[arm][fraction] = row
    return out


def table(summary: dict, fractions: list[str], key: str, title: str) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "| arm | " + " | ".join(fractions) + " |",
        "|---" * (len(fractions) + 1) + "|",
    ]
    for arm, rows in summary.items():
        if key not in rows[fractions[0]]:
            continue
        cells = [f"{rows[f][key][0]:.3f} ± {rows[f][key][1]:.3f}" for f in fractions]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax's and grain's INFO lines; the runs print their own.
    os.makedirs(FLAGS.workdir, exist_ok=True)
    arms = [RANDOM, *[a for a in FLAGS.arms if a != RANDOM]]
    aucs: dict[str, dict[str, list[float]]] = {arm: {f: [] for f in FLAGS.fractions} for arm in arms}
    runs = []
    for seed in range(FLAGS.seeds):
        for fraction in FLAGS.fractions:
            for arm in arms:
                results = finetune_one(arm, fraction, seed)
                aucs[arm][fraction].append(results["test_auc"])
                runs.append({"arm": arm, "fraction": fraction, "seed": seed, **results})
    summary = summarise(aucs)
    labels = "fractions of training subjects labelled (integers: subjects)"
    lines = [
        f"# Label efficiency ({FLAGS.mode} fine-tuning, preset {FLAGS.preset}, {FLAGS.seeds} seed(s))",
        "",
        f"Test AUC of crop lesion classification at the step of the best validation AUC; {labels}; "
        "mean ± std over seeds.",
        "",
        *table(summary, FLAGS.fractions, "test_auc", "Test AUC"),
        *table(summary, FLAGS.fractions, "difference_to_random", "Paired difference to random init"),
    ]
    with open(os.path.join(FLAGS.workdir, "label_efficiency.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(FLAGS.workdir, "label_efficiency.json"), "w") as f:
        json.dump({"summary": summary, "runs": runs}, f, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    define_flags()
    app.run(main)

"""Label efficiency: what pretraining saves when labels are few. Fine-tunes each arm's encoder
with a nested series of labelled-subject fractions and compares the test AUC with fine-tuning the
same architecture from its random initialisation.

python -m experiments.label_efficiency [--preset=demo] [--arms=isimed,isimed_head,...]
    [--mode=full] [--task=lesion|structure|image] [--fractions=2,0.1,0.25,1.0] [--seeds=1]
    [--seed=S] [--recipe=folder_demo] [--workdir=workdirs/label_efficiency]

Arms (`ARMS`): `random` (always; the same architecture at the initialisation ISImed's pretraining
started from) and pretraining methods, each `configs/isimed_chest.py:<preset>,<tokens>` through
the one training loop. `--recipe=folder_demo` pretrains every arm with the folder `demo` recipe
(`configs/isimed_folder.demo_recipe`: 24^3 crops, 4 x 16 crops per step, learning rate 3e-2,
1,500 steps, intensity augmentation for ISImed), random init included (its architecture and crop
size come from the same config). A recipe belongs to its workdir, recorded in recipe.json; a
different one there is refused. Every (arm, fraction, seed) is a run of `isimed.finetune`
(`configs/finetune_chest.py:<preset>,mode=<mode>,task=<task>`; tasks share the pretrainings of a
workdir) with the test AUC at the step of the best validation AUC. A fraction of 1 or more (an
integer) is that many subjects. Seed s pretrains with seed s and fine-tunes every arm with
`seed = split_seed = s`: the same labelled subjects and batches for each arm, so each seed gives a
paired difference to the random init. `--seed=S` runs that seed only and writes no table (seeds in
parallel processes, one workdir); a run over all seeds reuses finished runs and writes
label_efficiency[_<task>].md (mean ± std over seeds of the test AUC and of the paired difference
to random init; the same for the validation AUC at the first evaluation, how fast each arm gets
going; the labelled subjects each arm needs to reach random init with every label), .png (test
AUC against labelled subjects) and .json (every run too).
"""

import json
import os

import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging

import experiments
from configs import finetune_chest
from configs import isimed_chest
from configs import isimed_folder
from isimed import finetune
from isimed import train
from isimed.evaluation import plots

RANDOM = "random"
# Fine-tuning task -> what the tables say it is.
TASKS = {
    "lesion": "crop lesion classification",
    "structure": "the structure at the crop centre (macro one-vs-rest AUC)",
    "image": "image-level nodule presence from crops of the lungs",
}
# Arm -> the pretraining config's tokens after the preset.
ARMS = {
    "isimed": "method=isimed",
    "isimed_head": "method=isimed,head=true",
    "hybrid": "method=isimed_vicreg",
    "simclr": "method=simclr",
    "vicreg": "method=vicreg",
    "barlow": "method=barlow",
}


def define_flags() -> None:
    """The command's flags, defined when it runs (not on import: the tests import several
    experiments into one process, and absl refuses a flag name defined twice)."""
    flags.DEFINE_string("preset", "demo", "Preset of the pretraining and the fine-tuning configs.")
    flags.DEFINE_list("arms", list(ARMS), f"Pretrained arms (random init is always one): {', '.join(ARMS)}.")
    flags.DEFINE_enum("mode", "full", ["linear", "full"], "Fine-tuning mode.")
    flags.DEFINE_enum("task", "lesion", list(TASKS), "Fine-tuning task (the pretrainings are shared).")
    flags.DEFINE_list("fractions", ["2", "0.1", "0.25", "1.0"], "Shares (<= 1) or counts (> 1) of subjects.")
    flags.DEFINE_integer("seeds", 1, "Seeds 0..N-1 (pretraining, labelled subjects and batches).")
    flags.DEFINE_integer("seed", None, "Run only this seed, write no table (parallel processes).")
    flags.DEFINE_enum(
        "recipe",
        "preset",
        ["preset", "folder_demo"],
        "Pretraining recipe of every arm (the preset's or the folder demo's).",
    )
    flags.DEFINE_integer("pretrain_steps", 0, "Pretraining steps (0: the preset's).")
    flags.DEFINE_integer("steps", 0, "Fine-tuning steps (0: the preset's).")
    flags.DEFINE_string("workdir", "workdirs/label_efficiency", "Where runs and the tables go.")
    flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data dir (the phantom is generated here).")


FLAGS = flags.FLAGS


def amount(fraction: str) -> dict:
    """`{"fraction": F}` for a share in (0, 1], `{"subjects": N}` for a count above 1."""
    value = float(fraction)
    if value > 1.0 or (value == 1.0 and "." not in fraction):
        return {"subjects": int(value)}
    return {"fraction": value}


def pretrain_config(arm: str, seed: int) -> ml_collections.ConfigDict:
    config = isimed_chest.get_config(f"{FLAGS.preset},{ARMS[arm]}")
    if FLAGS.recipe == "folder_demo":
        isimed_folder.demo_recipe(config)
    config.seed = seed
    config.data.tfds_dir = FLAGS.data_dir
    if FLAGS.pretrain_steps:
        config.total_steps = FLAGS.pretrain_steps
    return config


def pretrain(arm: str, seed: int) -> str:
    """The pretraining workdir of (arm, seed), pretrained unless done."""
    workdir = os.path.join(FLAGS.workdir, f"pretrain_{arm}_seed{seed}")
    if not os.path.exists(os.path.join(workdir, "summary.json")):
        print(f"== pretraining {arm}, seed {seed} -> {workdir}", flush=True)
        experiments.finished(train.train_and_evaluate(pretrain_config(arm, seed), workdir), workdir)
    return workdir


def finetune_one(arm: str, fraction: str, seed: int) -> dict:
    """results.json of one fine-tuning run, run unless done."""
    pretrain_workdir = pretrain("isimed" if arm == RANDOM else arm, seed)
    init = "random" if arm == RANDOM else "pretrained"
    config = finetune_chest.get_config(f"{FLAGS.preset},mode={FLAGS.mode},init={init},task={FLAGS.task}")
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
    return experiments.finished(finetune.finetune(config, workdir), workdir)


def check_recipe() -> None:
    """Records the experiment's recipe in its workdir; refuses a workdir made with another one
    (finished runs are reused, so they would be mixed into the table)."""
    recipe = {
        "preset": FLAGS.preset,
        "mode": FLAGS.mode,
        "recipe": FLAGS.recipe,
        "pretrain_steps": FLAGS.pretrain_steps,
        "steps": FLAGS.steps,
    }
    path = os.path.join(FLAGS.workdir, "recipe.json")
    if os.path.exists(path):
        stored = json.load(open(path))
        if stored != recipe:
            raise app.UsageError(
                f"{path}: this workdir holds runs of {stored}, not {recipe}; pass another --workdir"
            )
    else:
        with open(path, "w") as f:
            json.dump(recipe, f, indent=2)


def summarise(aucs: dict[str, dict[str, list[float]]], key: str = "test_auc") -> dict:
    """Per arm and fraction: mean and std over seeds of `aucs` (as `key`) and, for pretrained
    arms, of the paired difference to random init (same seed)."""
    out: dict = {}
    for arm, per_fraction in aucs.items():
        out[arm] = {}
        for fraction, values in per_fraction.items():
            v = np.asarray(values)
            row = {key: [float(v.mean()), float(v.std())], "seeds": len(v)}
            if arm != RANDOM:
                d = v - np.asarray(aucs[RANDOM][fraction])
                row["difference_to_random"] = [float(d.mean()), float(d.std())]
            out[arm][fraction] = row
    return out


def labels_needed(summary: dict, subjects: dict[str, int]) -> dict[str, int | None]:
    """Per arm: the fewest labelled subjects (of the fractions run) whose mean test AUC reaches
    random init's with the most labels; None where no fraction does."""
    most = max(subjects, key=subjects.get)
    goal = summary[RANDOM][most]["test_auc"][0]
    needed = {}
    for arm, rows in summary.items():
        reached = [subjects[f] for f, row in rows.items() if row["test_auc"][0] >= goal]
        needed[arm] = min(reached) if reached else None
    return needed


def table(summary: dict, fractions: list[str], key: str, title: str, header: list[str]) -> list[str]:
    lines = [f"### {title}", "", "| arm | " + " | ".join(header) + " |", "|---" * (len(fractions) + 1) + "|"]
    for arm, rows in summary.items():
        if key not in rows[fractions[0]]:
            continue
        sign = "+" if key == "difference_to_random" else ""
        cells = [f"{rows[f][key][0]:{sign}.3f} ± {rows[f][key][1]:.3f}" for f in fractions]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax's and grain's INFO lines; the runs print their own.
    unknown = [a for a in FLAGS.arms if a != RANDOM and a not in ARMS]
    if unknown:
        raise app.UsageError(f"--arms: unknown {unknown}; known: {', '.join([RANDOM, *ARMS])}")
    os.makedirs(FLAGS.workdir, exist_ok=True)
    check_recipe()
    arms = [RANDOM, *[a for a in FLAGS.arms if a != RANDOM]]
    seeds = [FLAGS.seed] if FLAGS.seed is not None else list(range(FLAGS.seeds))
    aucs: dict[str, dict[str, list[float]]] = {arm: {f: [] for f in FLAGS.fractions} for arm in arms}
    # Convergence: the validation AUC at the first evaluation after step 0.
    early: dict[str, dict[str, list[float]]] = {arm: {f: [] for f in FLAGS.fractions} for arm in arms}
    subjects: dict[str, int] = {}
    runs = []
    for seed in seeds:
        for fraction in FLAGS.fractions:
            for arm in arms:
                results = finetune_one(arm, fraction, seed)
                aucs[arm][fraction].append(results["test_auc"])
                early_step, early_auc = results["validation_curve"][1]
                early[arm][fraction].append(early_auc)
                subjects[fraction] = results["train_subjects"]
                runs.append({"arm": arm, "fraction": fraction, "seed": seed, **results})
    if FLAGS.seed is not None:
        return
    summary = summarise(aucs)
    first = summarise(early, "validation_auc")
    needed = labels_needed(summary, subjects)
    header = [f"{f} ({subjects[f]})" for f in FLAGS.fractions]
    most = subjects[FLAGS.fractions[-1]]
    recipe = "" if FLAGS.recipe == "preset" else f", pretraining recipe {FLAGS.recipe}"
    lines = [
        f"# Label efficiency ({FLAGS.mode} fine-tuning, preset {FLAGS.preset}, {len(seeds)} seed(s){recipe})",
        "",
        f"Test AUC of {TASKS[FLAGS.task]} at the step of the best validation AUC; columns: "
        "fraction of the training subjects labelled (integers: subjects), labelled subjects in "
        "brackets; mean ± std over seeds.",
        "",
        *table(summary, FLAGS.fractions, "test_auc", "Test AUC", header),
        *table(summary, FLAGS.fractions, "difference_to_random", "Paired difference to random init", header),
        *table(
            first,
            FLAGS.fractions,
            "validation_auc",
            f"Convergence: validation AUC at step {early_step}",
            header,
        ),
        *table(
            first, FLAGS.fractions, "difference_to_random", f"Paired difference at step {early_step}", header
        ),
        f"### Labelled subjects needed to reach random init with {most}",
        "",
        "| arm | subjects |",
        "|---|---|",
        *[f"| {arm} | {n if n is not None else f'not reached with {most}'} |" for arm, n in needed.items()],
        "",
    ]
    curves = {
        arm: (
            [subjects[f] for f in FLAGS.fractions],
            [rows[f]["test_auc"][0] for f in FLAGS.fractions],
            [rows[f]["test_auc"][1] for f in FLAGS.fractions],
        )
        for arm, rows in summary.items()
    }
    stem = os.path.join(
        FLAGS.workdir, "label_efficiency" + ("" if FLAGS.task == "lesion" else f"_{FLAGS.task}")
    )
    plots.metric_curves(curves, stem + ".png", "labelled subjects", "test AUC")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    with open(stem + ".json", "w") as f:
        json.dump(
            {"summary": summary, "first_evaluation": first, "labels_needed": needed, "runs": runs},
            f,
            indent=2,
        )
    print("\n".join(lines))


if __name__ == "__main__":
    define_flags()
    app.run(main)

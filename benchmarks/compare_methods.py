"""ISImed against SimCLR, VICReg and Barlow Twins: same phantom, encoder, crops per step and steps.

python -m benchmarks.compare_methods [--preset=demo] [--seeds=1] [--workdir=workdirs/compare]

Pretrains every method with `configs/<method>_chest.py:<preset>` (the one training loop), evaluates
each checkpoint with `linear_eval.evaluate` (`configs/linear_eval_chest.py:<eval_preset>`, the
function behind `linear_eval.py`), and writes `compare.md`, `compare.json` and `compare.png` to the
workdir. Finished runs are reused, so an interrupted comparison continues where it stopped.

With one seed, ± is the spread over the probe's subject-grouped folds; with several seeds it is the
spread over seeds (each seed's fold mean), which is what differences between methods should be
judged against.
"""

import importlib
import json
import os
import time

import numpy as np
import tqdm
from absl import app
from absl import flags
from absl import logging
from matplotlib.figure import Figure

from configs import linear_eval_chest
from isimed import train
from isimed.evaluation import linear_eval

flags.DEFINE_list("methods", ["isimed", "simclr", "vicreg", "barlow"], "configs/<method>_chest.py to run.")
flags.DEFINE_string("preset", "demo", "Pretraining preset of every method's config.")
flags.DEFINE_string("eval_preset", "demo", "Preset of configs/linear_eval_chest.py.")
flags.DEFINE_integer("steps", 0, "Pretraining steps (0: the preset's).")
flags.DEFINE_integer("seeds", 1, "Runs per method with seeds 0..N-1.")
flags.DEFINE_string("workdir", "workdirs/compare", "Where runs and the table go.")
flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data dir (the phantom is generated here).")
FLAGS = flags.FLAGS

# (label, where in the pretrained feature set's results, higher is better)
METRICS = (
    ("crop AUC", ("lesion_crop", "auc"), True),
    ("image AUC", ("lesion_image", "auc"), True),
    ("RankMe", ("rankme",), True),
    ("position MAE mm", ("position_probe", "mae_mm"), False),
    ("Spearman within", ("spearman_within",), True),
)


def _value(row: dict, path: tuple[str, ...]) -> tuple[float, float]:
    """(value, fold std) of a metric in one feature set's results; nan when the task is absent."""
    if path[0] not in row:
        return float("nan"), float("nan")
    if path[0] in ("lesion_crop", "lesion_image"):
        return row[path[0]]["mean"][path[1]], row[path[0]]["std"][path[1]]
    value = row[path[0]][path[1]] if len(path) == 2 else row[path[0]]
    return float(value), float("nan")


def run_one(method: str, seed: int) -> dict:
    """Pretrains and evaluates one (method, seed); returns its results with wall times."""
    run_dir = os.path.join(FLAGS.workdir, f"{method}_seed{seed}")
    timing_path = os.path.join(run_dir, "timing.json")
    results_path = os.path.join(run_dir, "linear_eval", "results.json")
    if os.path.exists(timing_path) and os.path.exists(results_path):
        logging.warning("Reusing %s", run_dir)
        return {**json.load(open(results_path)), **json.load(open(timing_path))}

    config = importlib.import_module(f"configs.{method}_chest").get_config(FLAGS.preset)
    config.seed = seed
    config.data.tfds_dir = FLAGS.data_dir
    if FLAGS.steps:
        config.total_steps = FLAGS.steps
    print(f"== {method}, seed {seed}: {config.total_steps} steps -> {run_dir}", flush=True)
    start = time.time()
    train.train_and_evaluate(config, run_dir)
    pretrain_s = time.time() - start

    eval_config = linear_eval_chest.get_config(FLAGS.eval_preset)
    eval_config.pretrain_workdir = run_dir
    eval_config.seed = seed
    start = time.time()
    results = linear_eval.evaluate(eval_config, os.path.join(run_dir, "linear_eval"))
    timing = {"pretrain_s": pretrain_s, "eval_s": time.time() - start, "steps": config.total_steps}
    with open(timing_path, "w") as f:
        json.dump(timing, f)
    return {**results, **timing}


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method (plus the randomly initialised encoder as a floor): mean and spread per metric."""
    rows: dict[str, dict] = {}
    reference = runs[next(iter(runs))]
    for name, results, feature_set in [
        *((m, r, "pretrained") for m, r in runs.items()),
        ("random init (reference)", reference, "random_init"),
    ]:
        row = {}
        for label, path, _ in METRICS:
            values = [_value(r["feature_sets"][feature_set], path) for r in results]
            means = np.array([v for v, _ in values])
            # Several seeds: spread over seeds; one seed: over the probe's folds (if it has folds).
            spread = float(np.std(means)) if len(means) > 1 else values[0][1]
            row[label] = (float(np.mean(means)), spread)
        row["pretrain s"] = (
            (float(np.mean([r["pretrain_s"] for r in results])), float("nan"))
            if feature_set == "pretrained"
            else (float("nan"), float("nan"))
        )
        rows[name] = row
    return rows


def format_table(rows: dict[str, dict], header: str) -> str:
    labels = [label for label, _, _ in METRICS] + ["pretrain s"]
    lines = [header, "", "| method | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, row in rows.items():
        cells = []
        for label in labels:
            mean, spread = row[label]
            digits = 1 if label in ("RankMe", "position MAE mm", "pretrain s") else 3
            if np.isnan(mean):
                cells.append("n/a")
            elif np.isnan(spread):
                cells.append(f"{mean:.{digits}f}")
            else:
                cells.append(f"{mean:.{digits}f} ± {spread:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_plot(rows: dict[str, dict], out_png: str, title: str) -> str:
    """One panel per metric, one bar per method, error bars = the table's spread."""
    fig = Figure(figsize=(4 * len(METRICS), 4), layout="constrained")
    names = list(rows)
    colours = [f"C{i}" for i in range(len(names) - 1)] + ["0.7"]  # The reference in grey.
    for ax, (label, _, higher) in zip(fig.subplots(1, len(METRICS)), METRICS):
        means = np.array([rows[n][label][0] for n in names])
        spreads = np.array([rows[n][label][1] for n in names])
        yerr = None if np.all(np.isnan(spreads)) else np.nan_to_num(spreads)  # No spread, no bars.
        ax.bar(range(len(names)), np.nan_to_num(means), yerr=yerr, color=colours, capsize=3)
        ax.set_xticks(
            range(len(names)),
            [n.replace(" (reference)", "\n(reference)") for n in names],
            rotation=45,
            ha="right",
            fontsize=8,
        )
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=9)
    fig.suptitle(title, fontsize=8, wrap=True)
    fig.savefig(out_png, dpi=110)
    return out_png


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    FLAGS.workdir = os.path.abspath(os.path.expanduser(FLAGS.workdir))
    FLAGS.data_dir = os.path.expanduser(FLAGS.data_dir)
    start = time.time()
    runs: dict[str, list[dict]] = {m: [] for m in FLAGS.methods}
    jobs = [(m, seed) for m in FLAGS.methods for seed in range(FLAGS.seeds)]
    # Runs done and the ETA over all of them (stderr, only on a terminal; redrawn after each run).
    with tqdm.tqdm(jobs, desc="compare", unit="run", disable=None) as bar:
        for method, seed in bar:
            bar.set_postfix_str(f"{method} seed {seed}")
            runs[method].append(run_one(method, seed))
    rows = summarise(runs)
    steps = runs[FLAGS.methods[0]][0]["steps"]
    spread = "std over seeds" if FLAGS.seeds > 1 else "std over the probe's subject-grouped folds"
    header = (
        f"Methods compared on the SYNTHETIC chest phantom: preset `{FLAGS.preset}`, {steps} steps, "
        f"{FLAGS.seeds} seed(s), linear eval preset `{FLAGS.eval_preset}`; mean ± {spread}."
    )
    table = format_table(rows, header)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with open(os.path.join(FLAGS.workdir, "compare.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(FLAGS.workdir, "compare.json"), "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=2)
    png = bar_plot(rows, os.path.join(FLAGS.workdir, "compare.png"), header)
    print(table)
    print(f"\nWrote {png} and compare.md / compare.json; total {time.time() - start:.0f} s.")


if __name__ == "__main__":
    app.run(main)

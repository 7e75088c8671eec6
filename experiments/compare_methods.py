"""ISImed (with and without a projection head), the ISImed + VICReg hybrid, SimCLR, VICReg and
Barlow Twins: same phantom, encoder, crops per step and steps.

python -m experiments.compare_methods [--preset=demo] [--seeds=1] [--hybrid_weights=0.1,3]
    [--workdir=workdirs/compare]

Pretrains every method with `configs/isimed_chest.py:<preset>,method=<method>` (`isimed_head`:
`head=true`; the one training loop), evaluates
each checkpoint with `linear_eval.evaluate` (`configs/linear_eval_chest.py:<eval_preset>`, the
function behind `linear_eval.py`) and writes `compare.md`, `compare.json` and `compare.png` to the
workdir. Each method gets two rows: its embedding (the encoder's output) and its pooled backbone
features (the final Linear's input), each probed the same way; the randomly initialised encoder
(both layers) and raw crop intensities are the reference rows. `--hybrid_weights` adds hybrid runs
with those `loss.vicreg_weight`s and a trade-off table (lesion AUC against position error over the
VICReg weight, ISImed and VICReg at the ends). Finished pretraining and evaluations are reused, so
an interrupted comparison continues where it stopped.

With one seed, ± is the spread over the probe's subject-grouped folds; with several seeds it is the
spread over seeds (each seed's fold mean), which is what differences between methods should be
judged against.
"""

import json
import os
import time

import numpy as np
import tqdm
from absl import app
from absl import flags
from absl import logging
from matplotlib.figure import Figure

import experiments
from configs import isimed_chest
from configs import linear_eval_chest
from isimed import methods
from isimed import train
from isimed import workdir as workdir_layout
from isimed.evaluation import linear_eval

flags.DEFINE_list(
    "methods",
    ["isimed", "isimed_head", "isimed_vicreg", "simclr", "vicreg", "barlow"],
    "Methods to run (`isimed_head`: ISImed with head=true).",
)
flags.DEFINE_list(
    "hybrid_weights", [], "Extra isimed_vicreg runs with these loss.vicreg_weight values (trade-off table)."
)
flags.DEFINE_string("preset", "demo", "Pretraining preset of every method's config.")
flags.DEFINE_string("eval_preset", "demo", "Preset of configs/linear_eval_chest.py.")
flags.DEFINE_integer("steps", 0, "Pretraining steps (0: the preset's).")
flags.DEFINE_integer("seeds", 1, "Runs per method with seeds 0..N-1.")
flags.DEFINE_string("workdir", "workdirs/compare", "Where runs and the table go.")
flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data dir (the phantom is generated here).")
FLAGS = flags.FLAGS

# (label, where in a feature set's results, higher is better); linear_eval's lesion task and its
# context tasks (hard negatives, anatomy, image-level nodule presence; n/a where the data has none).
METRICS = (
    ("crop AUC", ("lesion_crop", "auc"), True),
    ("hard-negative crop AUC", ("nodule_hard", "auc"), True),
    ("anatomy macro AUC", ("anatomy", "macro_auc"), True),
    ("image AUC", ("nodule_image", "auc"), True),
    ("RankMe", ("rankme",), True),
    ("position MAE mm", ("position_probe", "mae_mm"), False),
    ("Spearman within", ("spearman_within",), True),
)


def _value(row: dict, path: tuple[str, ...]) -> tuple[float, float]:
    """(value, fold std) of a metric in one feature set's results; nan when the task is absent."""
    if path[0] not in row:
        return float("nan"), float("nan")
    entry = row[path[0]]
    if isinstance(entry, dict) and "mean" in entry:  # A cross-validated probe: mean and std over folds.
        return float(entry["mean"][path[1]]), float(entry["std"][path[1]])
    value = entry[path[1]] if len(path) == 2 else entry
    return float(value), float("nan")


# Row labels of the configs; a run `isimed_vicreg_w<W>` is the hybrid with vicreg_weight W.
LABELS = {"isimed": "ISImed", "isimed_head": "ISImed + head", "isimed_vicreg": "hybrid", "simclr": "SimCLR"}
LABELS.update({"vicreg": "VICReg", "barlow": "Barlow Twins"})
# (results feature set, row suffix) of each encoder layer probed.
LAYERS = (("pretrained", "embedding"), ("pretrained_backbone", "backbone"))
REFERENCES = (
    ("random init (embedding)", "random_init"),
    ("random init (backbone)", "random_init_backbone"),
    ("raw intensity", "raw_intensity"),
)


def run_config(run: str, seed: int):
    """The pretraining config of a run name: a method, `isimed_head`, or `isimed_vicreg_w<W>`."""
    method, weight = run, None
    if run.startswith("isimed_vicreg_w"):
        method, weight = "isimed_vicreg", float(run[len("isimed_vicreg_w") :])
    arg = f"{FLAGS.preset},head=true" if method == "isimed_head" else f"{FLAGS.preset},method={method}"
    config = isimed_chest.get_config(arg)
    if weight is not None:
        config.loss.vicreg_weight = weight
    config.seed = seed
    config.data.tfds_dir = FLAGS.data_dir
    if FLAGS.steps:
        config.total_steps = FLAGS.steps
    return config


def label(run: str) -> str:
    if run.startswith("isimed_vicreg_w"):
        return f"hybrid (VICReg weight {float(run[len('isimed_vicreg_w') :]):g})"
    return LABELS.get(run, run)


def run_one(run: str, seed: int) -> dict:
    """Pretrains (unless done) and evaluates (unless done) one (run, seed); returns the
    evaluation's results with the pretraining wall time and steps."""
    run_dir = os.path.join(FLAGS.workdir, f"{run}_seed{seed}")
    pretrain_path = os.path.join(run_dir, "pretrain.json")
    eval_dir = os.fspath(workdir_layout.Workdir(run_dir).linear_eval)
    results_path = os.path.join(eval_dir, "results.json")
    if os.path.exists(pretrain_path):
        logging.warning("Reusing the pretraining in %s", run_dir)
        timing = json.load(open(pretrain_path))
    else:
        config = run_config(run, seed)
        print(f"== {run}, seed {seed}: {config.total_steps} steps -> {run_dir}", flush=True)
        start = time.time()
        experiments.finished(train.train_and_evaluate(config, run_dir), run_dir)
        timing = {"pretrain_s": time.time() - start, "steps": config.total_steps}
        with open(pretrain_path, "w") as f:
            json.dump(timing, f)
    if os.path.exists(results_path):
        logging.warning("Reusing the evaluation in %s", run_dir)
        return {**json.load(open(results_path)), **timing}

    eval_config = linear_eval_chest.get_config(FLAGS.eval_preset)
    eval_config.pretrain_workdir = run_dir
    eval_config.seed = seed
    eval_config.data_dir = FLAGS.data_dir
    results = linear_eval.evaluate(eval_config, eval_dir)
    return {**results, **timing}


def _row(results: list[dict], feature_set: str, timed: bool) -> dict:
    """Mean and spread of every metric of one feature set over seeds."""
    row = {}
    for name, path, _ in METRICS:
        values = [_value(r["feature_sets"][feature_set], path) for r in results]
        means = np.array([v for v, _ in values])
        # Several seeds: spread over seeds; one seed: over the probe's folds (if it has folds).
        spread = float(np.std(means)) if len(means) > 1 else values[0][1]
        row[name] = (float(np.mean(means)), spread)
    pretrain = float(np.mean([r["pretrain_s"] for r in results])) if timed else float("nan")
    row["pretrain s"] = (pretrain, float("nan"))
    return row


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per run and probed layer, then the references (randomly initialised encoder, raw
    intensities, from the first run's evaluation): mean and spread per metric."""
    rows: dict[str, dict] = {}
    for run, results in runs.items():
        for feature_set, layer in LAYERS:
            rows[f"{label(run)} ({layer})"] = _row(results, feature_set, timed=True)
    first = runs[next(iter(runs))]
    for name, feature_set in REFERENCES:
        rows[name] = _row(first, feature_set, timed=False)
    return rows


def tradeoff(runs: dict[str, list[dict]]) -> str | None:
    """Lesion crop AUC and position error of the hybrid over its VICReg weight, with ISImed
    (weight 0) and VICReg (VICReg alone) at the ends, both probed layers; None without hybrids."""
    hybrids = {}
    for run, results in runs.items():
        if run.startswith("isimed_vicreg"):
            if run == "isimed_vicreg":  # The method's default weight.
                weight = float(methods.get("isimed_vicreg").defaults["vicreg_weight"])
            else:
                weight = float(run[len("isimed_vicreg_w") :])
            hybrids[weight] = results
    if not hybrids:
        return None
    points = [("ISImed", "0", runs.get("isimed"))]
    points += [("hybrid", f"{w:g}", hybrids[w]) for w in sorted(hybrids)]
    points += [("VICReg", "VICReg alone", runs.get("vicreg"))]
    lines = [
        "| run | VICReg weight | crop AUC (embedding) | position MAE mm (embedding) "
        "| crop AUC (backbone) | position MAE mm (backbone) |",
        "|---|---|---|---|---|---|",
    ]
    for name, weight, results in points:
        if results is None:
            continue
        cells = []
        for feature_set, _ in LAYERS:
            row = _row(results, feature_set, timed=False)
            cells += [_cell(row["crop AUC"], 3), _cell(row["position MAE mm"], 1)]
        lines.append(f"| {name} | {weight} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: tuple[float, float], digits: int) -> str:
    mean, spread = value
    if np.isnan(mean):
        return "n/a"
    if np.isnan(spread):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def format_table(rows: dict[str, dict], header: str) -> str:
    labels = [name for name, _, _ in METRICS] + ["pretrain s"]
    lines = [header, "", "| method | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, row in rows.items():
        cells = [_cell(row[m], 1 if m in ("RankMe", "position MAE mm", "pretrain s") else 3) for m in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_plot(rows: dict[str, dict], out_png: str, title: str) -> str:
    """One panel per metric, one bar per row, error bars = the table's spread: a colour per run,
    its backbone row hatched, the reference rows grey."""
    fig = Figure(figsize=(4.5 * len(METRICS), 5), layout="constrained")
    names = list(rows)
    references = {name for name, _ in REFERENCES}
    runs = list(dict.fromkeys(n.rsplit(" (", 1)[0] for n in names if n not in references))
    colours = ["0.75" if n in references else f"C{runs.index(n.rsplit(' (', 1)[0]) % 10}" for n in names]
    hatches = ["//" if n.endswith("(backbone)") else "" for n in names]
    for ax, (metric, _, higher) in zip(fig.subplots(1, len(METRICS)), METRICS):
        means = np.array([rows[n][metric][0] for n in names])
        spreads = np.array([rows[n][metric][1] for n in names])
        yerr = None if np.all(np.isnan(spreads)) else np.nan_to_num(spreads)  # No spread, no bars.
        ax.bar(range(len(names)), np.nan_to_num(means), yerr=yerr, color=colours, hatch=hatches, capsize=2)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{metric} ({'higher' if higher else 'lower'} is better)", fontsize=9)
    fig.suptitle(title, fontsize=8, wrap=True)
    fig.savefig(out_png, dpi=110)
    return out_png


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    FLAGS.workdir = os.path.abspath(os.path.expanduser(FLAGS.workdir))
    FLAGS.data_dir = os.path.expanduser(FLAGS.data_dir)
    start = time.time()
    names = [*FLAGS.methods, *(f"isimed_vicreg_w{float(w):g}" for w in FLAGS.hybrid_weights)]
    runs: dict[str, list[dict]] = {m: [] for m in names}
    jobs = [(m, seed) for m in names for seed in range(FLAGS.seeds)]
    # Runs done and the ETA over all of them (stderr, only on a terminal; redrawn after each run).
    with tqdm.tqdm(jobs, desc="compare", unit="run", disable=None) as bar:
        for method, seed in bar:
            bar.set_postfix_str(f"{method} seed {seed}")
            runs[method].append(run_one(method, seed))
    rows = summarise(runs)
    steps = runs[names[0]][0]["steps"]
    spread = "std over seeds" if FLAGS.seeds > 1 else "std over the probe's subject-grouped folds"
    header = (
        f"Methods compared on the SYNTHETIC chest phantom: preset `{FLAGS.preset}`, {steps} steps, "
        f"{FLAGS.seeds} seed(s), linear eval preset `{FLAGS.eval_preset}`; mean ± {spread}."
    )
    table = format_table(rows, header)
    hybrid = tradeoff(runs)
    if hybrid is not None:
        table += (
            "\n\nThe hybrid's trade-off over its VICReg weight (terms normalised by their running means):\n\n"
        )
        table += hybrid
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with open(os.path.join(FLAGS.workdir, "compare.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(FLAGS.workdir, "compare.json"), "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=2)
    png = bar_plot(rows, os.path.join(FLAGS.workdir, "compare.png"), header)
    print(table)
    print(f"\nWrote {png} and compare.md / compare.json; total {time.time() - start:.0f} s.")


if __name__ == "__main__":
    from isimed import runtime

    runtime.tune_malloc_for_cpu()  # As main.py does: before JAX starts (every run pretrains here).
    app.run(main)

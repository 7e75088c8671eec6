"""Linear evaluation of a pretraining checkpoint: `evaluate(config, workdir)`.

Feature sets compared in every report: the pretrained encoder, the same architecture randomly
initialised, and raw crop intensities, so the table shows what pretraining adds. Each encoder is
probed at two layers: its embedding (the final Linear's output, what ISImed's distance loss
constrains unless it has a projection head) and its pooled backbone features (`*_backbone`, the
final Linear's input, where standard SSL practice probes). All see the same crops. Encoders run
frozen in eval mode (BatchNorm running statistics, never updated).

Distances and positions follow the pretraining data's frame (`isimed.methods.shared_frame`): with
subjects in one world frame, Spearman within images and across them, and a position probe fitted
on reference-split subjects; with subjects in their own frames, Spearman within images only and a
position probe fitted and tested within each evaluated subject (`position_probe_within_subject`).
"""

import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from isimed import methods
from isimed import paths
from isimed import runtime
from isimed import workdir as workdir_layout
from isimed.data import pipeline
from isimed.evaluation import context_tasks
from isimed.evaluation import features as features_lib
from isimed.evaluation import metrics as metrics_lib
from isimed.evaluation import metrics_log
from isimed.evaluation import plots
from isimed.evaluation import probes

FEATURE_SETS = ("pretrained", "pretrained_backbone", "random_init", "random_init_backbone", "raw_intensity")


def _select_step(pretrain_workdir: str, checkpoint: str) -> int | None:
    """None for the latest step; else the requested or best-validation step."""
    if checkpoint == "latest":
        return None
    if checkpoint != "best":
        return int(checkpoint)
    log = workdir_layout.Workdir(pretrain_workdir).metrics
    ckpt_dir = workdir_layout.Workdir(pretrain_workdir).checkpoints
    available = {int(d.name) for d in ckpt_dir.iterdir() if d.name.isdigit()} if ckpt_dir.is_dir() else set()
    scores = {}
    if log.exists():
        for _, row in metrics_log.read_rows(log):
            if "validation/spearman_within" in row and row["step"] in available:
                scores[row["step"]] = row["validation/spearman_within"]
    if not scores:
        raise FileNotFoundError(
            f"checkpoint='best' needs validation metrics for a saved step in {log}; "
            f"saved steps: {sorted(available)}"
        )
    return max(scores, key=scores.get)


def _pool(crops: np.ndarray, factor: int) -> np.ndarray:
    """Average-pools `(B, K, *spatial, 1)` crops by `factor` per axis; returns `(B, K, features)`."""
    b, k = crops.shape[:2]
    spatial = crops.shape[2:-1]
    x = crops[(slice(None), slice(None), *[slice(0, s - s % factor) for s in spatial], 0)]
    blocks = [b, k]
    for s in spatial:
        blocks += [s // factor, factor]
    x = x.reshape(blocks).mean(axis=tuple(3 + 2 * i for i in range(len(spatial))))
    return x.reshape(b, k, -1)


def _collect_all(config, pre_config, embed_fns, split, k, lesion_share, max_images):
    """Per feature set, the same crops' features and labels; raw intensities pooled."""
    data = features_lib.collect(
        pre_config,
        split,
        embed_fns,
        max_images=max_images,
        crops_per_image=k,
        lesion_share=lesion_share,
        with_crops=True,
        seed=config.seed + 17,
    )
    features = {**data.pop("embeddings"), "raw_intensity": _pool(data.pop("crops"), config.raw_pool)}
    return {name: {**data, "embeddings": z} for name, z in features.items()}


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs every task and metric for every feature set; writes results.json and results.md."""
    runtime.initialize(config)
    pretrain_workdir, pre_config, embed_fns, state = _load_pretrained(config)
    pipeline.check_crops_fit(pre_config.data, (config.eval_split, config.reference_split))
    evaluation = _collect_all(
        config,
        pre_config,
        embed_fns,
        config.eval_split,
        config.crops_per_image,
        config.lesion_share,
        config.max_images,
    )
    reference = _collect_all(
        config,
        pre_config,
        embed_fns,
        config.reference_split,
        config.crops_per_image,
        config.lesion_share,
        config.reference_images,
    )
    # Spearman and RankMe on uniformly placed crops (lesion-centred crops cluster in the lungs).
    uniform = _collect_all(
        config, pre_config, embed_fns, config.eval_split, config.crops_per_image, 0.0, config.max_images
    )

    results: dict[str, Any] = {
        "pretrain_workdir": pretrain_workdir,
        "checkpoint_step": int(state["step"]),
        "eval_split": config.eval_split,
        "num_subjects": int(len(evaluation["pretrained"]["image_id"])),
        "crops_per_subject": config.crops_per_image,
        "lesion_crop_share": float(evaluation["pretrained"]["has_lesion"].mean()),
        "feature_sets": {},
    }
    # Tasks follow the data: lesion tasks need crops with and without lesion (masks), the
    # image-level multi-label task needs 0/1 `labels` (e.g. ChestMNIST's 14 findings).
    has_lesions = len(np.unique(evaluation["pretrained"]["has_lesion"])) == 2
    labels = evaluation["pretrained"].get("labels")
    has_labels = labels is not None and bool(np.all(np.isin(labels, (0, 1))))
    results["tasks"] = {"lesion": has_lesions, "labels": has_labels}
    for name in FEATURE_SETS:
        results["feature_sets"][name] = _feature_set_row(
            config,
            evaluation[name],
            reference[name],
            uniform[name],
            has_lesions,
            has_labels,
            methods.shared_frame(pre_config),
        )
    _add_context_tasks(config, pre_config, embed_fns, results)
    _write_outputs(workdir, results, evaluation["pretrained"])
    return results


def _add_context_tasks(config, pre_config, embed_fns, results: dict[str, Any]) -> None:
    """Adds the context tasks (hard-negative nodule crops, anatomy, image-level nodule presence;
    `context_tasks`) to every feature set's row where the records carry structure labels, and
    every task's headroom over the baselines."""
    context = None
    if config.get("context") is not None and config.context.enabled:
        context = context_tasks.collect(
            config, pre_config, embed_fns, functools.partial(_pool, factor=config.raw_pool)
        )
    results["tasks"]["context"] = context is not None
    if context is not None:
        cv = _cross_validator(config)
        for name, row in results["feature_sets"].items():
            row.update(context_tasks.probe_rows(cv, context[name]))
    results["headroom"] = context_tasks.headroom(results["feature_sets"])


def _cross_validator(config: ml_collections.ConfigDict):
    return functools.partial(
        probes.cross_validate,
        folds=config.folds,
        val_fraction=config.val_fraction,
        epochs=config.probe.epochs,
        learning_rate=config.probe.learning_rate,
        weight_decays=tuple(config.probe.weight_decays),
        batch_size=config.probe.batch_size,
        seed=config.seed,
    )


def _load_pretrained(config: ml_collections.ConfigDict):
    """(pretrain workdir, its config with the data dir override applied, embed fns, state)."""
    if not config.pretrain_workdir:
        raise ValueError("set --config.pretrain_workdir to a pretraining --workdir")
    pretrain_workdir = os.fspath(paths.resolve(config.pretrain_workdir))
    step = _select_step(pretrain_workdir, str(config.checkpoint))
    pre_config, embeds, state = features_lib.load_embed_fns(pretrain_workdir, step, backbone=True)
    if config.data_dir:
        pre_config.data["dir" if pre_config.data.name == "prepared" else "tfds_dir"] = config.data_dir
    return pretrain_workdir, pre_config, embeds, state


def _feature_set_row(
    config: ml_collections.ConfigDict,
    ev: dict,
    ref: dict,
    uni: dict,
    has_lesions: bool,
    has_labels: bool,
    shared_frame: bool,
) -> dict[str, Any]:
    """Every task and metric of one feature set: `ev` the evaluated crops, `ref` the reference
    (training-split) crops, `uni` uniformly placed evaluation crops; `shared_frame`: whether the
    subjects share one world frame (module docstring)."""
    cv = _cross_validator(config)
    flat = features_lib.flatten
    x = flat(ev["embeddings"])
    groups = np.repeat(ev["image_id"], ev["embeddings"].shape[1])
    image_x = ev["embeddings"].mean(axis=1)  # Image level: mean of its crop features.
    image_y = ev["has_lesion"].max(axis=1)
    row = {}
    if has_lesions:
        row["lesion_crop"] = cv(x, flat(ev["has_lesion"]), groups, task="binary")
        row["lesion_fraction"] = cv(x, flat(ev["lesion_fraction"]), groups, task="regression")
        row["knn_accuracy"] = probes.knn_accuracy(
            flat(ref["embeddings"]), flat(ref["has_lesion"]), x, flat(ev["has_lesion"]), k=config.knn_k
        )
    if has_labels and len(image_x) >= 2 * config.folds:
        row["labels_image"] = cv(image_x, ev["labels"], ev["image_id"], task="multilabel")
    row["rankme"] = metrics_lib.rankme(flat(uni["embeddings"]))
    row["spearman_within"] = metrics_lib.distance_spearman(uni["embeddings"], uni["centres"], "within")
    if shared_frame:
        row["position_probe"] = probes.position_probe(
            flat(ref["embeddings"]), flat(ref["centres"]), flat(uni["embeddings"]), flat(uni["centres"])
        )
        row["spearman_cross"] = metrics_lib.distance_spearman(uni["embeddings"], uni["centres"], "cross")
    else:
        row["position_probe_within_subject"] = probes.within_subject_position_probe(
            uni["embeddings"], uni["centres"]
        )
    if has_lesions and len(np.unique(image_y)) == 2 and len(image_y) >= 2 * config.folds:
        row["lesion_image"] = cv(image_x, image_y, ev["image_id"], task="binary")
    return row


def _write_outputs(workdir: str, results: dict[str, Any], pretrained: dict) -> None:
    """results.json (without predictions), results.md, roc.png and pca.png, on process 0."""
    workdir = paths.resolve(workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "results.json").write_text(
            json.dumps(_without_predictions(results), indent=2, default=float)
        )
        (workdir / "results.md").write_text(format_results(results) + "\n")
        # roc.png (out-of-fold lesion-probe scores) and pca.png (pretrained embeddings).
        plots.write_linear_eval_plots(workdir, results, pretrained=pretrained)


def _without_predictions(tree: Any) -> Any:
    """A copy without the probes' out-of-fold "predictions" (arrays: kept out of results.json)."""
    if isinstance(tree, dict):
        return {k: _without_predictions(v) for k, v in tree.items() if k != "predictions"}
    return tree


def _pm(cv: dict, metric: str) -> str:
    return f"{cv['mean'][metric]:.3f} ± {cv['std'][metric]:.3f}"


def format_results(results: dict[str, Any]) -> str:
    """A markdown table: one row per feature set."""
    lines = [
        f"Linear evaluation of step {results['checkpoint_step']} of {results['pretrain_workdir']}",
        f"({results['num_subjects']} {results['eval_split']} subjects x {results['crops_per_subject']} "
        f"crops, {results['lesion_crop_share']:.0%} contain lesion; mean ± std over subject-grouped folds)",
        "",
        "| features | crop AUC | crop acc | crop F1 | sens | spec | image AUC | labels mean AUC "
        "| lesion-fraction MAE | kNN acc | RankMe | position MAE mm | Spearman within "
        "| Spearman cross |",
        # Subjects in their own frames: the position MAE is within subjects, no cross Spearman.
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell_of(row, task, metric):  # "n/a" for tasks the data cannot pose (no masks, no labels).
        return _pm(row[task], metric) if task in row else "n/a"

    for name, row in results["feature_sets"].items():
        cell = functools.partial(cell_of, row)
        knn = f"{row['knn_accuracy']:.3f}" if "knn_accuracy" in row else "n/a"
        if "position_probe" in row:
            position, cross = f"{row['position_probe']['mae_mm']:.1f}", f"{row['spearman_cross']:.3f}"
        else:
            position, cross = f"{row['position_probe_within_subject']['mae_mm']:.1f} (within subject)", "n/a"
        lines.append(
            f"| {name} | {cell('lesion_crop', 'auc')} | {cell('lesion_crop', 'accuracy')} "
            f"| {cell('lesion_crop', 'f1')} | {cell('lesion_crop', 'sensitivity')} "
            f"| {cell('lesion_crop', 'specificity')} | {cell('lesion_image', 'auc')} "
            f"| {cell('labels_image', 'mean_auc')} | {cell('lesion_fraction', 'mae')} | {knn} "
            f"| {row['rankme']:.1f} | {position} | {row['spearman_within']:.3f} | {cross} |"
        )
    return "\n".join(lines + context_tasks.format_tables(results))

"""Downstream tasks that need context, posed on records that carry a structure label map
(`structures`, as the synthetic phantom's 3D records do; `isimed.data.structures` names the labels).

* nodule detection with hard negatives: crops centred on nodule voxels (positives) against
  nodule-free crops centred on vessels, on the pleura and anywhere in the lungs; label = the crop
  contains nodule (as the pipeline's `has_lesion`). A bright spot at the centre is not enough:
  vessels are as bright as solid nodules, and the chest wall touches juxta-pleural ones.
* anatomy: which structure lies at the crop centre (multi-class over the structures, background
  excluded); crops are centred on random voxels of each structure present, so classes are
  balanced within a subject.
* image-level nodule presence: crops centred on random lung voxels (blind to nodules); the image
  features are the mean and the max of its crops' features; label = the subject has a nodule.

Every subject's crops come from `np.random.default_rng([seed, id])`, so each feature set sees
the same crops. The crop centre voxel is `start + (crop - 1) // 2`, as for lesion-centred crops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from isimed import geometry
from isimed.data import pipeline
from isimed.data import structures as structure_labels
from isimed.evaluation import features as features_lib
from isimed.evaluation import metrics as metrics_lib

TASKS = ("nodule", "anatomy", "image")
NEGATIVE_KINDS = ("vessel", "pleura", "lung")  # centres of the nodule task's negative crops
ANATOMY_CLASSES = tuple(name for name in structure_labels.STRUCTURES if name != "background")
_LUNGS = (structure_labels.STRUCTURES["lung_left"], structure_labels.STRUCTURES["lung_right"])
_IN_LUNG = (*_LUNGS, structure_labels.STRUCTURES["vessel"], structure_labels.STRUCTURES["nodule"])


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Crops per subject of each task."""

    crop_shape: tuple[int, ...]
    window: tuple[float, float] | None
    positives: int = 16  # nodule task: crops centred on nodule voxels (subjects with nodules)
    negatives: int = 8  # nodule task: per kind of NEGATIVE_KINDS
    anatomy: int = 3  # anatomy task: per structure present
    image: int = 32  # image task: crops centred on lung voxels


def has_structures(record: pipeline.Record) -> bool:
    return "structures" in record and record.get("mask") is not None


def centre_voxels(starts: np.ndarray, crop_shape: Sequence[int]) -> np.ndarray:
    """The voxel at the centre of each crop: `start + (crop - 1) // 2`."""
    return np.asarray(starts) + (np.asarray(crop_shape) - 1) // 2


def _starts(voxels: np.ndarray, crop_shape: Sequence[int], image_shape: Sequence[int]) -> np.ndarray:
    """Starts of crops centred on `voxels (n, ndim)`, clipped into the image."""
    crop = np.asarray(crop_shape)
    return np.clip(voxels - (crop - 1) // 2, 0, np.asarray(image_shape) - crop).astype(np.int64)


def _pick(rng: np.random.Generator, where: np.ndarray, n: int) -> np.ndarray:
    """`n` random voxels `(n, ndim)` (with replacement) of the boolean volume `where`."""
    flat = np.flatnonzero(where)
    if flat.size == 0 or n <= 0:
        return np.zeros((0, where.ndim), np.int64)
    return np.stack(np.unravel_index(flat[rng.integers(flat.size, size=n)], where.shape), axis=1)


def _nodule_free(
    rng: np.random.Generator, where: np.ndarray, mask: np.ndarray, n: int, crop_shape: Sequence[int]
) -> np.ndarray:
    """Starts of up to `n` crops centred on voxels of `where` whose crops hold no nodule voxel."""
    voxels = _pick(rng, where, 4 * n)
    starts = _starts(voxels, crop_shape, mask.shape)
    if len(starts):
        holds = geometry.extract_crops(mask, starts, tuple(crop_shape)).reshape(len(starts), -1).any(axis=1)
        starts = starts[~holds]
    return starts[:n]


def task_starts(record: pipeline.Record, sampling: Sampling, rng: np.random.Generator, tasks=TASKS) -> dict:
    """Crop starts of each task for one record: {"nodule": (starts, kind index (-1: positive)),
    "anatomy": starts, "image": starts} for the `tasks` asked."""
    structures, mask = np.asarray(record["structures"]), np.asarray(record["mask"]) > 0
    crop = sampling.crop_shape
    out = {}
    if "nodule" in tasks:
        parts = [_starts(_pick(rng, mask, sampling.positives), crop, mask.shape)]
        kinds = [np.full(len(parts[0]), -1)]
        wheres = {
            "vessel": structures == structure_labels.STRUCTURES["vessel"],
            "pleura": structure_labels.pleura_mask(structures),
            "lung": np.isin(structures, _LUNGS),
        }
        for k, name in enumerate(NEGATIVE_KINDS):
            parts.append(_nodule_free(rng, wheres[name], mask, sampling.negatives, crop))
            kinds.append(np.full(len(parts[-1]), k))
        out["nodule"] = (np.concatenate(parts), np.concatenate(kinds))
    if "anatomy" in tasks:
        labels = structure_labels.STRUCTURES
        parts = [
            _starts(_pick(rng, structures == labels[name], sampling.anatomy), crop, mask.shape)
            for name in ANATOMY_CLASSES
        ]
        out["anatomy"] = np.concatenate(parts)
    if "image" in tasks:
        out["image"] = _starts(_pick(rng, np.isin(structures, _IN_LUNG), sampling.image), crop, mask.shape)
    return out


def task_crops(record: pipeline.Record, sampling: Sampling, rng: np.random.Generator, tasks=TASKS) -> dict:
    """Every task crop of one record, one row per crop: crops, centres, starts, task (index into TASKS),
    has_lesion (crop holds nodule), kind (NEGATIVE_KINDS index, -1 for positives and other tasks),
    structure (label at the crop's centre voxel, as an ANATOMY_CLASSES index; -1 for background),
    image_id and has_nodule (the record's)."""
    starts = task_starts(record, sampling, rng, tasks)
    rows, task, kind = [], [], []
    for t, name in enumerate(TASKS):
        if name not in starts:
            continue
        part = starts[name]
        if name == "nodule":
            part, kinds = part
            kind.append(kinds)
        else:
            kind.append(np.full(len(part), -1))
        rows.append(part)
        task.append(np.full(len(part), t))
    all_starts = np.concatenate(rows)
    out = pipeline.crops_at(record, all_starts, sampling.crop_shape, sampling.window)
    centre_label = np.asarray(record["structures"])[tuple(centre_voxels(all_starts, sampling.crop_shape).T)]
    # Label value -> ANATOMY_CLASSES index (background and unknown values -> -1).
    lookup = np.full(256, -1, np.int64)
    for index, name in enumerate(ANATOMY_CLASSES):
        lookup[structure_labels.STRUCTURES[name]] = index
    n = len(all_starts)
    out.update(
        {
            "starts": all_starts,
            "task": np.concatenate(task),
            "kind": np.concatenate(kind),
            "structure": lookup[centre_label],
            "image_id": np.full(n, int(record["id"]), np.int64),
            "has_nodule": np.full(n, bool(np.any(np.asarray(record["mask"]) > 0))),
        }
    )
    return out


def iterate(
    data, splits: dict[str, Sequence[str]], sampling: Sampling, max_images: int, seed: int
) -> Iterator[dict]:
    """Task crops of the first `max_images` records of each split; `splits` maps a split name to
    the tasks posed on it. Yields nothing when the records carry no structure labels."""
    for split, tasks in splits.items():
        source = pipeline.open_source(data, split)
        for i in range(min(len(source), max_images)):
            record = source[i]
            if not has_structures(record):
                return
            yield task_crops(record, sampling, np.random.default_rng([seed, int(record["id"])]), tasks)


def image_features(features: np.ndarray, image_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, per-image [mean, max] of crop feature rows) in sorted id order."""
    ids = np.unique(image_id)
    pooled = [np.concatenate([features[image_id == i].mean(0), features[image_id == i].max(0)]) for i in ids]
    return ids, np.stack(pooled)


def collect(config, pre_config, embeds: dict, pool) -> dict[str, dict] | None:
    """Per feature set (every encoder in `embeds`, and "raw_intensity" via `pool`), the context
    tasks' per-crop rows with their "embeddings"; None when the data has no structure labels."""
    data = pre_config.data
    # Only data whose records carry structure labels poses these tasks; look at one record of the
    # evaluation split before opening any other split (real data sets may lack a validation one).
    source = pipeline.open_source(data, config.eval_split)
    if len(source) == 0 or not has_structures(source[0]):
        return None
    sampling = Sampling(
        crop_shape=tuple(data.crop_size),
        window=None if data.get("window") is None else tuple(data.window),
        positives=config.context.positives,
        negatives=config.context.negatives,
        anatomy=config.context.anatomy,
        image=config.context.image,
    )
    splits = {split: TASKS for split in config.context.crop_splits}
    for split in config.context.image_splits:
        splits.setdefault(split, ("image",))
    elements = iterate(data, splits, sampling, config.context.max_images, seed=config.seed + 29)
    out = features_lib.embed_elements(elements, embeds, np.concatenate, with_crops=True, desc="embed context")
    if not out:
        return None
    crops = out.pop("crops")
    features = {**out.pop("embeddings"), "raw_intensity": pool(crops[None])[0]}
    return {name: {**out, "embeddings": z} for name, z in features.items()}


def probe_rows(cv, d: dict) -> dict[str, Any]:
    """The context tasks of one feature set; `cv(x, y, groups, task=...)` cross-validates a probe.

    nodule_hard also holds "auc_vs": the AUC of the positives against each kind of negative,
    from the pooled out-of-fold scores; anatomy holds "classes", the structures it tells apart.
    """
    x, task, ids = d["embeddings"], d["task"], d["image_id"]
    rows: dict[str, Any] = {}
    sel = task == TASKS.index("nodule")
    y = d["has_lesion"][sel]
    if len(np.unique(y)) == 2:
        result = cv(x[sel], y, ids[sel], task="binary")
        score, kind = result["predictions"].score, d["kind"][sel]
        result["auc_vs"] = {
            name: metrics_lib.binary_metrics(y[(y == 1) | (kind == k)], score[(y == 1) | (kind == k)])["auc"]
            for k, name in enumerate(NEGATIVE_KINDS)
        }
        rows["nodule_hard"] = result
    sel = (task == TASKS.index("anatomy")) & (d["structure"] >= 0)
    classes = np.unique(d["structure"][sel])
    if len(classes) >= 2:
        onehot = (d["structure"][sel][:, None] == classes[None, :]).astype(np.float64)
        rows["anatomy"] = cv(x[sel], onehot, ids[sel], task="multiclass")
        rows["anatomy"]["classes"] = [ANATOMY_CLASSES[c] for c in classes]
    sel = task == TASKS.index("image")
    image_ids, image_x = image_features(x[sel], ids[sel])
    image_y = np.array([d["has_nodule"][sel][ids[sel] == i][0] for i in image_ids]).astype(np.int64)
    if len(np.unique(image_y)) == 2:
        try:
            rows["nodule_image"] = cv(image_x, image_y, image_ids, task="binary")
        except ValueError:  # too few subjects for the folds: the task is left out
            pass
    return rows


# Each task's headline metric; "baselines" are the feature sets that learned nothing.
HEADLINE = {
    "lesion_crop": "auc",
    "lesion_image": "auc",
    "nodule_hard": "auc",
    "anatomy": "macro_auc",
    "nodule_image": "auc",
}
BASELINES = ("raw_intensity", "random_init", "random_init_backbone")


def headroom(feature_sets: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per task: the best baseline (raw intensity or random init), the headroom 1 - that, the
    best other (pretrained) feature set and its gain over the best baseline."""
    out = {}
    for task, metric in HEADLINE.items():
        scores = {name: row[task]["mean"][metric] for name, row in feature_sets.items() if task in row}
        base = {n: s for n, s in scores.items() if n in BASELINES}
        other = {n: s for n, s in scores.items() if n not in BASELINES}
        if not base:
            continue
        best_base = max(base, key=base.get)
        entry = {"metric": metric, "best_baseline": best_base, "baseline": base[best_base]}
        entry["headroom"] = 1.0 - base[best_base]
        if other:
            best = max(other, key=other.get)
            entry.update(
                {"best_pretrained": best, "pretrained": other[best], "gain": other[best] - base[best_base]}
            )
        out[task] = entry
    return out


def format_tables(results: dict[str, Any]) -> list[str]:
    """Markdown lines: the context tasks per feature set, then every task's headroom."""
    lines = []
    if results.get("tasks", {}).get("context"):
        lines += [
            "",
            "Context tasks: nodule crops against hard negatives (AUC, and against each kind of negative: "
            "out-of-fold scores pooled), structure at the crop centre (accuracy, macro one-vs-rest AUC), "
            "image-level nodule presence from lung crops (AUC).",
            "",
            "| features | nodule AUC | vs vessel | vs pleura | vs lung | anatomy acc | anatomy macro AUC "
            "| image nodule AUC |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in results["feature_sets"].items():
            vs = row.get("nodule_hard", {}).get("auc_vs", {})
            lines.append(
                f"| {name} | {_cell(row, 'nodule_hard', 'auc')} "
                + " ".join(f"| {vs[k]:.3f}" if k in vs else "| n/a" for k in NEGATIVE_KINDS)
                + f" | {_cell(row, 'anatomy', 'accuracy')} | {_cell(row, 'anatomy', 'macro_auc')} "
                f"| {_cell(row, 'nodule_image', 'auc')} |"
            )
    if results.get("headroom"):
        lines += [
            "",
            "Headroom: 1 - the best baseline (raw intensity or random init) on each task's headline metric.",
            "",
            "| task | metric | best baseline | headroom | best pretrained | gain |",
            "|---|---|---|---|---|---|",
        ]
        for task, h in results["headroom"].items():
            pretrained = f"{h['best_pretrained']} {h['pretrained']:.3f}" if "best_pretrained" in h else "n/a"
            gain = f"{h['gain']:+.3f}" if "gain" in h else "n/a"
            lines.append(
                f"| {task} | {h['metric']} | {h['best_baseline']} {h['baseline']:.3f} | {h['headroom']:.3f} "
                f"| {pretrained} | {gain} |"
            )
    return lines


def _cell(row: dict, task: str, metric: str) -> str:
    if task not in row:
        return "n/a"
    return f"{row[task]['mean'][metric]:.3f} ± {row[task]['std'][metric]:.3f}"

"""Metrics of embeddings and of probe predictions (numpy / scipy / scikit-learn, host side).

Nothing here fits a model: the probes that produce predictions live in `probes`.

* representation metrics: `rankme`, and latent vs physical distances (`pair_distances`,
  `distance_spearman`);
* task metrics of predictions: `binary_metrics`, `multilabel_metrics`, `multiclass_metrics`,
  `regression_metrics`, and
  `auc_from_ranks` (many AUCs at once, for model selection).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.spatial
import scipy.stats
import sklearn.metrics

from isimed import losses

PAIRS = ("within", "cross", "all")


# --------------------------------------------------------------------------------------------
# Representation metrics.


def rankme(embeddings: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., 2023): a smooth effective rank of an embedding matrix.

    With `s` the singular values of the `(N, D)` matrix, `p_k = s_k / sum(s) + eps` and
    `RankMe = exp(-sum_k p_k log p_k)`. The matrix is deliberately *not* centred, as in the
    paper: a constant offset shared by all embeddings counts as one used dimension.

    A rank-r matrix with equal non-zero singular values scores ~r; the maximum is min(N, D).
    An all-zero matrix (complete collapse) has no spectrum to normalise and returns 0.0;
    non-finite embeddings (a diverged encoder) return nan rather than raising, so a
    whole evaluation run still finishes and reports the failure.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"rankme expects a (N, D) matrix, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        return float("nan")
    return float(losses.rankme(x, eps))


def pair_distances(
    embeddings: np.ndarray, centres_mm: np.ndarray, pairs: str
) -> tuple[np.ndarray, np.ndarray]:
    """Latent and physical (mm) distances of every unordered crop pair of the chosen kind.

    Args:
      embeddings: `(B, K, D)`; centres_mm: `(B, K, ndim)`.
      pairs: "within" (same image), "cross" (different images) or "all".
    Returns:
      `(latent, physical)`, float64, pairs in row-major upper-triangle order of the `B * K` crops
      (image by image for "within": `B * K * (K - 1) / 2` pairs).
    """
    embeddings = np.asarray(embeddings, np.float64)
    centres_mm = np.asarray(centres_mm, np.float64)
    if embeddings.ndim != 3 or centres_mm.ndim != 3 or embeddings.shape[:2] != centres_mm.shape[:2]:
        raise ValueError(
            f"expected embeddings (B, K, D) and centres (B, K, ndim) with the same B and K, got "
            f"{embeddings.shape} and {centres_mm.shape}"
        )
    if pairs not in PAIRS:
        raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
    b, k = embeddings.shape[:2]
    # scipy's pdist: condensed vectors in the same row-major upper-triangle order, with no
    # (n, n, D) difference array (128 GiB for 2,048 raw crops of 16^3) and exact per-pair sums.
    if pairs == "within":
        none = np.zeros(0)  # So that B = 0 gives no pairs rather than an error.
        latent = [none, *(scipy.spatial.distance.pdist(z) for z in embeddings)]
        physical = [none, *(scipy.spatial.distance.pdist(p) for p in centres_mm)]
        return np.concatenate(latent), np.concatenate(physical)
    latent = scipy.spatial.distance.pdist(embeddings.reshape(b * k, embeddings.shape[-1]))
    physical = scipy.spatial.distance.pdist(centres_mm.reshape(b * k, centres_mm.shape[-1]))
    if pairs == "all":
        return latent, physical
    image = np.repeat(np.arange(b), k)
    i, j = np.triu_indices(b * k, k=1)
    keep = image[i] != image[j]
    return latent[keep], physical[keep]


def spearman(latent: np.ndarray, physical: np.ndarray) -> float:
    """Spearman correlation of paired distances; nan with fewer than 2 pairs."""
    if len(latent) < 2:
        return float("nan")
    return float(scipy.stats.spearmanr(latent, physical)[0])


def distance_spearman(embeddings: np.ndarray, centres_mm: np.ndarray, pairs: str) -> float:
    """Spearman correlation of latent vs physical distances over unordered crop pairs.

    Args:
      embeddings: `(B, K, D)`; centres_mm: `(B, K, ndim)`.
      pairs: "within" (same image), "cross" (different images) or "all".
    """
    return spearman(*pair_distances(embeddings, centres_mm, pairs))


# --------------------------------------------------------------------------------------------
# Task metrics.


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUC, accuracy, F1, sensitivity and specificity of predicted probabilities.

    Undefined quantities are nan instead of a silent 0 so that fold averages (nanmean) are not
    dragged down by folds that cannot measure them: AUC needs both classes, sensitivity needs a
    positive, specificity a negative, F1 at least one true or predicted positive.
    """
    y = binary_labels(y_true).astype(int)
    prob = np.asarray(prob, dtype=np.float64).reshape(-1)
    if y.shape != prob.shape:
        raise ValueError(f"y_true {y.shape} and prob {prob.shape} differ in shape")
    pred = (prob >= threshold).astype(int)
    tp = int(np.sum((pred == 1) & (y == 1)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    auc = float(sklearn.metrics.roc_auc_score(y, prob)) if n_pos and n_neg else float("nan")
    return {
        "auc": auc,
        "accuracy": float(np.mean(pred == y)) if len(y) else float("nan"),
        "f1": float(sklearn.metrics.f1_score(y, pred, labels=[0, 1], zero_division=np.nan)),
        "sensitivity": tp / n_pos if n_pos else float("nan"),
        "specificity": tn / n_neg if n_neg else float("nan"),
    }


def multilabel_metrics(y_true: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    """Per-label AUC (nan where a label has a single class) and their mean over defined labels.

    Returns {"auc_per_label": [L floats], "mean_auc": float (nan if no label is defined)}.
    """
    y = binary_labels(y_true)
    prob = np.asarray(prob, dtype=np.float64)
    if y.ndim != 2 or y.shape != prob.shape:
        raise ValueError(f"expected matching (N, L) arrays, got {y.shape} and {prob.shape}")
    per_label = []
    for j in range(y.shape[1]):
        col = y[:, j]
        both = 0 < col.sum() < len(col)
        per_label.append(float(sklearn.metrics.roc_auc_score(col, prob[:, j])) if both else float("nan"))
    defined = [a for a in per_label if not np.isnan(a)]
    return {"auc_per_label": per_label, "mean_auc": float(np.mean(defined)) if defined else float("nan")}


def multiclass_metrics(y_onehot: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    """Accuracy of the most probable class and the one-vs-rest AUC of every class.

    Returns {"accuracy": float, "macro_auc": mean of the defined per-class AUCs (nan if none),
    "auc_per_class": [C floats], nan for a class absent from or alone in `y_onehot`}.
    """
    y = binary_labels(y_onehot)
    prob = np.asarray(prob, dtype=np.float64)
    if y.ndim != 2 or y.shape != prob.shape:
        raise ValueError(f"expected matching (N, C) arrays, got {y.shape} and {prob.shape}")
    per_class = multilabel_metrics(y, prob)
    accuracy = float(np.mean(prob.argmax(axis=1) == y.argmax(axis=1))) if len(y) else float("nan")
    return {
        "accuracy": accuracy,
        "macro_auc": per_class["mean_auc"],
        "auc_per_class": per_class["auc_per_label"],
    }


def regression_metrics(y_true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Mean absolute error and root mean squared error (over all outputs for multi-output)."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"y_true {y.shape} and pred {p.shape} differ in shape")
    err = p - y
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err**2)))}


def auc_from_ranks(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC of every row of `scores (..., N)` against binary `y (N,)` (Mann-Whitney U).

    Vectorised so the model selection can score all (weight decay, epoch) candidates in one
    call; average ranks give ties half credit, exactly as sklearn's roc_auc_score.
    """
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    ranks = scipy.stats.rankdata(scores, axis=-1)
    return (ranks[..., pos].sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def binary_labels(y: np.ndarray) -> np.ndarray:
    """0/1 targets as float64; ValueError for any other value."""
    y = np.asarray(y)
    if y.size and not np.all(np.isin(y, (0, 1))):
        raise ValueError("binary / multilabel targets must be 0 or 1")
    return y.astype(np.float64)

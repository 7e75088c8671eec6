"""Frozen-feature probes and their metrics (host side; the linear probe trains with optax).

Evaluation hygiene this module enforces (the reason it exists rather than calling sklearn
directly):

* folds are grouped by subject, so no subject's crops are in both the fitted and evaluated set;
* the probe's hyper-parameters (weight decay, number of epochs) are chosen on a validation split
  carved from the training folds only, never on the fold being evaluated;
* metrics are computed from scratch on each held-out fold and reported as mean +- std over folds.

Features are numpy arrays `(N, D)` with one label and one subject id per row.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.special
import scipy.stats
import sklearn.metrics
import sklearn.model_selection
import sklearn.neighbors

from isimed import losses

TASKS = ("binary", "multilabel", "regression")


# --------------------------------------------------------------------------------------------
# Representation-level metrics.


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


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int = 20,
) -> float:
    """Accuracy of a cosine-similarity k-NN majority vote (k clipped to the training size).

    Ties in the vote go to the smallest label (scikit-learn's behaviour).
    """
    train_x = np.asarray(train_x)
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("knn_accuracy needs a non-empty train and test set")
    k = int(max(1, min(k, len(train_x))))
    # Brute force: the cosine metric is not supported by tree indices, and N is modest.
    clf = sklearn.neighbors.KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
    clf.fit(train_x, np.asarray(train_y))
    return float(np.mean(clf.predict(np.asarray(test_x)) == np.asarray(test_y)))


# --------------------------------------------------------------------------------------------
# Task metrics.


def binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUC, accuracy, F1, sensitivity and specificity of predicted probabilities.

    Undefined quantities are nan instead of a silent 0 so that fold averages (nanmean) are not
    dragged down by folds that cannot measure them: AUC needs both classes, sensitivity needs a
    positive, specificity a negative, F1 at least one true or predicted positive.
    """
    y = _binary_labels(y_true).astype(int)
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
    y = _binary_labels(y_true)
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


def regression_metrics(y_true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Mean absolute error and root mean squared error (over all outputs for multi-output)."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"y_true {y.shape} and pred {p.shape} differ in shape")
    err = p - y
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err**2)))}


def _binary_labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.size and not np.all(np.isin(y, (0, 1))):
        raise ValueError("binary / multilabel targets must be 0 or 1")
    return y.astype(np.float64)


# --------------------------------------------------------------------------------------------
# Linear probe.


@dataclasses.dataclass
class LinearProbe:
    """A trained linear read-out plus the training statistics it standardises inputs with.

    Attributes:
      task: "binary", "multilabel" or "regression".
      weights: `(D, L)` in standardised-feature space; bias: `(L,)`.
      feature_mean, feature_std: training-set statistics (std already includes the 1e-6).
      target_mean, target_std: regression targets' training statistics (0 / 1 otherwise).
      squeeze: whether targets were 1-D, so predictions come back 1-D as well.
      selected: {"weight_decay", "epoch", "val_score"} chosen on the validation split.
    """

    task: str
    weights: np.ndarray
    bias: np.ndarray
    feature_mean: np.ndarray
    feature_std: np.ndarray
    target_mean: np.ndarray
    target_std: np.ndarray
    squeeze: bool
    selected: dict[str, float] = dataclasses.field(default_factory=dict)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw linear outputs `(N, L)` (standardised units for regression)."""
        z = (np.asarray(x, dtype=np.float64) - self.feature_mean) / self.feature_std
        return z @ self.weights + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities (binary `(N,)`, multilabel `(N, L)`) or values (regression)."""
        out = self.logits(x)
        if self.task == "regression":
            out = out * self.target_std + self.target_mean
        else:
            # float64 sigmoid: float32 would saturate confident logits to exactly 1.0 and
            # create artificial ties in the AUC.
            out = scipy.special.expit(out)
        return out[:, 0] if self.squeeze else out


def _loss(params: dict, x: jax.Array, y: jax.Array, mask: jax.Array, task: str) -> jax.Array:
    out = x @ params["w"] + params["b"]
    if task == "regression":
        per_row = jnp.mean((out - y) ** 2, axis=-1)
    else:
        per_row = jnp.mean(optax.sigmoid_binary_cross_entropy(out, y), axis=-1)
    # Padding rows carry mask 0; the max() keeps an all-padding batch from dividing by zero.
    return jnp.sum(per_row * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@functools.partial(jax.jit, static_argnames=("task",))
def _train_all(
    x: jax.Array,
    y: jax.Array,
    valid: jax.Array,
    batches: jax.Array,
    weight_decays: jax.Array,
    learning_rate: jax.Array,
    task: str,
) -> dict:
    """Trains one probe per weight decay (vmapped) and returns the params after every epoch.

    x `(P, D)`, y `(P, L)` and valid `(P,)` are padded to `P = steps * batch` rows so the
    compiled program depends only on the number of steps per epoch, not on the exact fold size;
    batches `(E, steps, batch)` holds the row indices of every minibatch of every epoch. The whole
    run is one program (scan over epochs and steps) because per-step Python dispatch would
    dominate the cost of such a small model.
    """
    d, l = x.shape[1], y.shape[1]

    def train_one(wd):
        # Bias is not decayed: shrinking it towards 0 only biases the predicted base rate.
        tx = optax.adamw(learning_rate, weight_decay=wd, mask={"w": True, "b": False})
        params = {"w": jnp.zeros((d, l), x.dtype), "b": jnp.zeros((l,), x.dtype)}

        def step(carry, idx):
            params, opt_state = carry
            grads = jax.grad(_loss)(params, x[idx], y[idx], valid[idx], task)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        def epoch(carry, epoch_batches):
            carry, _ = jax.lax.scan(step, carry, epoch_batches)
            return carry, carry[0]

        _, history = jax.lax.scan(epoch, (params, tx.init(params)), batches)
        return history

    return jax.vmap(train_one)(weight_decays)


def _auc_from_ranks(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC of every row of `scores (..., N)` against binary `y (N,)` (Mann-Whitney U).

    Vectorised so the model selection can score all (weight decay, epoch) candidates in one
    call; average ranks give ties half credit, exactly as sklearn's roc_auc_score.
    """
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    ranks = scipy.stats.rankdata(scores, axis=-1)
    return (ranks[..., pos].sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _val_scores(task: str, logits: np.ndarray, y: np.ndarray, target_std: np.ndarray) -> np.ndarray:
    """Selection score (higher is better) for logits `(W, C, N, L)` against y `(N, L)`.

    Falls back to the negative validation loss when the primary metric is undefined (a
    validation split with a single class); the fallback depends only on the labels, so all
    candidates are still compared with the same criterion.
    """
    if task == "regression":
        err = (logits - y) * target_std  # Back to target units so val_score is interpretable.
        return -np.mean(err**2, axis=(-2, -1))
    aucs = [
        _auc_from_ranks(y[:, j], logits[..., j])
        for j in range(y.shape[1])
        if 0 < y[:, j].sum() < len(y)
    ]
    if aucs:
        return np.mean(aucs, axis=0)
    # Stable BCE with logits: log(1 + exp(z)) - y z.
    bce = np.logaddexp(0.0, logits) - y * logits
    return -np.mean(bce, axis=(-2, -1))


def fit_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    task: str,
    epochs: int = 100,
    learning_rate: float = 1e-2,
    weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1),
    batch_size: int = 256,
    seed: int = 0,
    eval_every: int = 5,
) -> LinearProbe:
    """Trains a linear probe with AdamW and selects (weight decay, epoch) on the validation set.

    Features are standardised with the training statistics (regression targets too, undone in
    `predict`). Each weight decay is trained from zero weights for `epochs` epochs on minibatches
    shuffled by `np.random.default_rng(seed)` (the same order for every weight decay, so they are
    compared on equal footing) and scored on (val_x, val_y) after every `eval_every` epochs and
    after the last one. Scores: AUC (binary), mean AUC over labels with both classes
    (multilabel), -MSE in target units (regression). Ties go to the earlier weight decay in
    `weight_decays`, then the earlier epoch.

    Args:
      train_x, val_x: `(N, D)` features.
      train_y, val_y: `(N,)` 0/1 (binary), `(N, L)` 0/1 (multilabel), `(N,)` or `(N, T)`
        (regression).
      task: "binary", "multilabel" or "regression".

    Returns:
      A LinearProbe with the selected weights and `selected` =
      {"weight_decay", "epoch" (epochs completed, 1-based), "val_score"}.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if epochs < 1 or batch_size < 1 or eval_every < 1 or len(weight_decays) == 0:
        raise ValueError("epochs, batch_size, eval_every must be >= 1 and weight_decays non-empty")
    train_x = np.asarray(train_x, dtype=np.float64)
    val_x = np.asarray(val_x, dtype=np.float64)
    n, d = train_x.shape
    if n == 0 or len(val_x) == 0:
        raise ValueError("fit_linear_probe needs non-empty train and validation sets")
    if val_x.shape[1] != d:
        raise ValueError(f"train has {d} features, val has {val_x.shape[1]}")
    ytr, squeeze = _targets(train_y, task, n)
    yva, _ = _targets(val_y, task, len(val_x))
    if ytr.shape[1] != yva.shape[1]:
        raise ValueError(f"train has {ytr.shape[1]} targets, val has {yva.shape[1]}")

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    if task == "regression":
        t_mean, t_std = ytr.mean(0), ytr.std(0) + 1e-6
    else:
        t_mean, t_std = np.zeros(ytr.shape[1]), np.ones(ytr.shape[1])
    ztr, zva = (train_x - mean) / std, (val_x - mean) / std
    ytr_z = (ytr - t_mean) / t_std

    steps = -(-n // batch_size)
    padded = steps * batch_size
    x_pad = np.zeros((padded, d), np.float32)
    x_pad[:n] = ztr
    y_pad = np.zeros((padded, ytr.shape[1]), np.float32)
    y_pad[:n] = ytr_z
    valid = np.zeros(padded, np.float32)
    valid[:n] = 1.0
    rng = np.random.default_rng(seed)
    # Padding indices go last, so only the final minibatch of an epoch is short.
    tail = np.arange(n, padded)
    batches = np.stack(
        [np.concatenate([rng.permutation(n), tail]).reshape(steps, batch_size) for _ in range(epochs)]
    ).astype(np.int32)

    history = _train_all(
        jnp.asarray(x_pad), jnp.asarray(y_pad), jnp.asarray(valid), jnp.asarray(batches),
        jnp.asarray(weight_decays, jnp.float32), jnp.asarray(learning_rate, jnp.float32), task=task,
    )
    checkpoints = np.array(sorted({*range(eval_every, epochs + 1, eval_every), epochs})) - 1
    w_hist = np.asarray(history["w"], np.float64)[:, checkpoints]  # (W, C, D, L)
    b_hist = np.asarray(history["b"], np.float64)[:, checkpoints]  # (W, C, L)
    val_logits = np.einsum("nd,wcdl->wcnl", zva, w_hist) + b_hist[:, :, None, :]
    yva_target = (yva - t_mean) / t_std if task == "regression" else yva
    scores = _val_scores(task, val_logits, yva_target, t_std)
    # A diverged candidate (nan) must never win; argmax then takes the first best, giving the
    # documented tie-break order.
    best = int(np.argmax(np.where(np.isfinite(scores), scores, -np.inf)))
    wi, ci = np.unravel_index(best, scores.shape)
    return LinearProbe(
        task=task,
        weights=w_hist[wi, ci],
        bias=b_hist[wi, ci],
        feature_mean=mean,
        feature_std=std,
        target_mean=t_mean,
        target_std=t_std,
        squeeze=squeeze,
        selected={
            "weight_decay": float(weight_decays[wi]),
            "epoch": int(checkpoints[ci] + 1),
            "val_score": float(scores[wi, ci]),
        },
    )


def _targets(y: np.ndarray, task: str, n: int) -> tuple[np.ndarray, bool]:
    """Targets as float64 `(N, L)` plus whether the caller passed 1-D targets."""
    y = _binary_labels(y) if task != "regression" else np.asarray(y, dtype=np.float64)
    if len(y) != n:
        raise ValueError(f"{len(y)} targets for {n} feature rows")
    if task == "binary" and y.ndim != 1:
        raise ValueError(f"binary targets must be 1-D, got shape {y.shape}")
    if task == "multilabel" and y.ndim != 2:
        raise ValueError(f"multilabel targets must be (N, L), got shape {y.shape}")
    if y.ndim > 2:
        raise ValueError(f"targets must be 1-D or 2-D, got shape {y.shape}")
    return (y[:, None], True) if y.ndim == 1 else (y, False)


# --------------------------------------------------------------------------------------------
# Subject-grouped cross-validation.


@dataclasses.dataclass(frozen=True, eq=False)
class Predictions:
    """Out-of-fold test-set predictions of `cross_validate`, one row per input row.

    Every row is in exactly one test fold, so these are honest held-out scores for ROC curves.
    Kept as arrays (not in results.json: `linear_eval` strips the "predictions" key).

    Attributes:
      y_true: the labels as given; score: the probe's probabilities (binary `(N,)`, multilabel
        `(N, L)`) or predicted values (regression); fold: `(N,)` index of the fold that tested
        the row.
    """

    y_true: np.ndarray
    score: np.ndarray
    fold: np.ndarray

    def __eq__(self, other: object) -> bool:
        # Arrays compare elementwise; repeated runs must compare equal (nan included).
        if not isinstance(other, Predictions):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, f), getattr(other, f), equal_nan=True)
            for f in ("y_true", "score", "fold")
        )


def cross_validate(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    task: str,
    folds: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """Subject-grouped k-fold evaluation of a linear probe.

    Outer split: `GroupKFold(n_splits=folds)` over the subject ids, for every task. It was chosen
    over StratifiedGroupKFold because it applies to all three tasks alike, is deterministic
    without a seed, and balances fold sizes; folds that happen to lack a class yield nan for the
    undefined metrics, which the nan-aware aggregation skips. Inner split: for fold `i`,
    `GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed + i)` over the
    training subjects gives the validation subjects used to choose the probe's weight decay and
    epoch, so train, validation and test subjects are pairwise disjoint and the evaluated fold
    never influences model selection. A fresh probe is fitted per fold (nothing carries over).

    Args:
      features: `(N, D)`; labels: as in `fit_linear_probe`; groups: `(N,)` subject ids.
      task: "binary", "multilabel" or "regression".
      probe_kwargs: forwarded to `fit_linear_probe` (epochs, learning_rate, weight_decays, ...).

    Returns:
      {"folds": [metrics of each fold plus "selected", "n_subjects" and "n_samples"],
       "mean": {metric: nanmean over folds}, "std": {metric: nanstd (ddof=0) over folds},
       "fold_subjects": [(train ids, val ids, test ids) per fold],
       "predictions": `Predictions` (out-of-fold scores, for ROC curves; not JSON)} for every
      scalar metric (multilabel's per-label list is kept per fold only).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    features = np.asarray(features)
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    if not len(features) == len(labels) == len(groups):
        raise ValueError(
            f"features ({len(features)}), labels ({len(labels)}) and groups ({len(groups)}) "
            "must have the same number of rows"
        )
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_groups = len(np.unique(groups))
    if n_groups < folds + 1:
        raise ValueError(
            f"{n_groups} distinct subjects cannot form {folds} subject-grouped folds plus a "
            f"validation split; need at least {folds + 1}"
        )
    metric_fn = {"binary": binary_metrics, "multilabel": multilabel_metrics,
                 "regression": regression_metrics}[task]

    per_fold, fold_subjects = [], []
    oof_score: np.ndarray | None = None
    oof_fold = np.full(len(features), -1, np.int64)
    outer = sklearn.model_selection.GroupKFold(n_splits=folds)
    for i, (fit_idx, test_idx) in enumerate(outer.split(features, groups=groups)):
        if len(np.unique(groups[fit_idx])) < 2:
            raise ValueError(
                f"fold {i} leaves fewer than 2 training subjects, so no validation split can be "
                "carved from them; use fewer folds or more subjects"
            )
        inner = sklearn.model_selection.GroupShuffleSplit(
            n_splits=1, test_size=val_fraction, random_state=seed + i)
        tr, va = next(inner.split(fit_idx, groups=groups[fit_idx]))
        train_idx, val_idx = fit_idx[tr], fit_idx[va]
        probe = fit_linear_probe(
            features[train_idx], labels[train_idx], features[val_idx], labels[val_idx],
            task=task, seed=seed, **probe_kwargs)
        predicted = probe.predict(features[test_idx])
        metrics = metric_fn(labels[test_idx], predicted)
        if oof_score is None:
            oof_score = np.full((len(features), *predicted.shape[1:]), np.nan)
        oof_score[test_idx], oof_fold[test_idx] = predicted, i
        subjects = tuple(np.unique(groups[idx]).tolist() for idx in (train_idx, val_idx, test_idx))
        per_fold.append({
            **metrics,
            "selected": dict(probe.selected),
            "n_subjects": {k: len(s) for k, s in zip(("train", "val", "test"), subjects)},
            "n_samples": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
        })
        fold_subjects.append(subjects)

    scalar = [k for k, v in per_fold[0].items() if isinstance(v, float)]
    mean, std = {}, {}
    with warnings.catch_warnings():
        # A metric undefined on every fold is reported as nan; numpy's warning adds nothing.
        warnings.simplefilter("ignore", RuntimeWarning)
        for k in scalar:
            values = np.array([f[k] for f in per_fold], dtype=np.float64)
            mean[k], std[k] = float(np.nanmean(values)), float(np.nanstd(values))
    return {"folds": per_fold, "mean": mean, "std": std, "fold_subjects": fold_subjects,
            "predictions": Predictions(y_true=labels.copy(), score=oof_score, fold=oof_fold)}

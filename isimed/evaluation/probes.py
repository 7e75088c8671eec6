"""Probes on frozen features: the linear probe, its subject-grouped cross-validation, the ridge
position probe and the k-NN classifier (host side; the linear probe trains with optax).

Their metrics live in `metrics`. Evaluation hygiene this module enforces (the reason it exists
rather than calling sklearn directly):

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
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.special
import sklearn.linear_model
import sklearn.model_selection
import sklearn.neighbors

from isimed.evaluation import metrics

TASKS = ("binary", "multilabel", "multiclass", "regression")
_TASK_METRICS = {
    "binary": metrics.binary_metrics,
    "multilabel": metrics.multilabel_metrics,
    "multiclass": metrics.multiclass_metrics,
    "regression": metrics.regression_metrics,
}


# --------------------------------------------------------------------------------------------
# Closed-form probes: k-NN and the ridge position probe.


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


def position_probe(
    train_features: np.ndarray,
    train_centres: np.ndarray,
    test_features: np.ndarray,
    test_centres: np.ndarray,
) -> dict[str, float | list[float]]:
    """Ridge regression of crop centres (mm) from features; mean absolute error on the test set.

    Features are standardised with the training statistics; the ridge strength is chosen by
    leave-one-out cross-validation on the training set only.
    """
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    probe = sklearn.linear_model.RidgeCV(alphas=np.logspace(-3, 4, 15))
    probe.fit((train_features - mean) / std, train_centres)
    predicted = probe.predict((test_features - mean) / std)
    abs_err = np.abs(predicted - test_centres)
    return {
        "mae_mm": float(abs_err.mean()),
        "mae_mm_per_axis": abs_err.mean(0).tolist(),
        "alpha": float(probe.alpha_),
    }


def within_subject_position_probe(
    features: np.ndarray, centres: np.ndarray, folds: int = 5
) -> dict[str, float | list[float] | int]:
    """`position_probe` fitted and tested within each subject: for data whose subjects lie in
    unrelated world frames, where a probe across subjects would have to guess each frame.

    Args:
      features: `(B, K, D)` features of K crops of each of B subjects; centres: `(B, K, ndim)` mm.
      folds: each subject's crops are split into this many folds (fewer where a subject has under
        two crops per fold; in order, as crops are sampled at random positions); each fold is
        predicted by a probe fitted on the subject's other crops.
    Returns:
      `mae_mm` and `mae_mm_per_axis`: absolute error averaged over each subject's crops, then over
      subjects; `subjects`: B; `folds`: the folds used.
    """
    b, k = centres.shape[:2]
    folds = min(folds, k // 2)
    if folds < 2:
        raise ValueError(f"within-subject position probe: {k} crops per subject, need at least 4")
    per_subject = []
    for i in range(b):
        errors = []
        for test in np.array_split(np.arange(k), folds):
            train = np.setdiff1d(np.arange(k), test)
            fit = position_probe(features[i, train], centres[i, train], features[i, test], centres[i, test])
            errors.append(np.asarray(fit["mae_mm_per_axis"]) * len(test))
        per_subject.append(np.sum(errors, axis=0) / k)
    per_axis = np.mean(per_subject, axis=0)
    return {
        "mae_mm": float(per_axis.mean()),
        "mae_mm_per_axis": per_axis.tolist(),
        "subjects": int(b),
        "folds": int(folds),
    }


# --------------------------------------------------------------------------------------------
# Linear probe.


@dataclasses.dataclass
class LinearProbe:
    """A trained linear read-out plus the training statistics it standardises inputs with.

    Attributes:
      task: "binary", "multilabel", "multiclass" (one-hot targets, softmax) or "regression".
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
        elif self.task == "multiclass":
            out = scipy.special.softmax(out, axis=-1)
        else:
            # float64 sigmoid: float32 would saturate confident logits to exactly 1.0 and
            # create artificial ties in the AUC.
            out = scipy.special.expit(out)
        return out[:, 0] if self.squeeze else out


def _loss(params: dict, x: jax.Array, y: jax.Array, mask: jax.Array, task: str) -> jax.Array:
    out = x @ params["w"] + params["b"]
    if task == "regression":
        per_row = jnp.mean((out - y) ** 2, axis=-1)
    elif task == "multiclass":  # one-hot targets, softmax cross-entropy
        per_row = optax.softmax_cross_entropy(out, y)
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
    d, labels = x.shape[1], y.shape[1]

    def train_one(wd):
        # Bias is not decayed: shrinking it towards 0 only biases the predicted base rate.
        tx = optax.adamw(learning_rate, weight_decay=wd, mask={"w": True, "b": False})
        params = {"w": jnp.zeros((d, labels), x.dtype), "b": jnp.zeros((labels,), x.dtype)}

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
        metrics.auc_from_ranks(y[:, j], logits[..., j])
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
      task: "binary", "multilabel", "multiclass" (one-hot targets, softmax) or "regression".

    Returns:
      A LinearProbe with the selected weights and `selected` =
      {"weight_decay", "epoch" (epochs completed, 1-based), "val_score"}.
    """
    _check_probe_settings(task, epochs, batch_size, eval_every, weight_decays)
    train_x, ytr, val_x, yva, squeeze = _probe_inputs(train_x, train_y, val_x, val_y, task)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    t_mean, t_std = _target_statistics(ytr, task)
    x_pad, y_pad, valid, batches = _padded_minibatches(
        (train_x - mean) / std, (ytr - t_mean) / t_std, batch_size, epochs, seed
    )
    history = _train_all(
        jnp.asarray(x_pad),
        jnp.asarray(y_pad),
        jnp.asarray(valid),
        jnp.asarray(batches),
        jnp.asarray(weight_decays, jnp.float32),
        jnp.asarray(learning_rate, jnp.float32),
        task=task,
    )
    checkpoints = np.array(sorted({*range(eval_every, epochs + 1, eval_every), epochs})) - 1
    w_hist = np.asarray(history["w"], np.float64)[:, checkpoints]  # (W, C, D, L)
    b_hist = np.asarray(history["b"], np.float64)[:, checkpoints]  # (W, C, L)
    val_logits = np.einsum("nd,wcdl->wcnl", (val_x - mean) / std, w_hist) + b_hist[:, :, None, :]
    yva_target = (yva - t_mean) / t_std if task == "regression" else yva
    scores = _val_scores(task, val_logits, yva_target, t_std)
    wi, ci = _best_candidate(scores)
    selected = {
        "weight_decay": float(weight_decays[wi]),
        "epoch": int(checkpoints[ci] + 1),
        "val_score": float(scores[wi, ci]),
    }
    return LinearProbe(
        task=task,
        weights=w_hist[wi, ci],
        bias=b_hist[wi, ci],
        feature_mean=mean,
        feature_std=std,
        target_mean=t_mean,
        target_std=t_std,
        squeeze=squeeze,
        selected=selected,
    )


def _check_probe_settings(
    task: str, epochs: int, batch_size: int, eval_every: int, weight_decays: Sequence[float]
) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if epochs < 1 or batch_size < 1 or eval_every < 1 or len(weight_decays) == 0:
        raise ValueError("epochs, batch_size, eval_every must be >= 1 and weight_decays non-empty")


def _probe_inputs(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, task: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """Checked float64 (train_x, train targets (N, L), val_x, val targets, squeeze)."""
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
    return train_x, ytr, val_x, yva, squeeze


def _target_statistics(y: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) that standardise regression targets `(N, L)`; (0, 1) for 0/1 targets."""
    if task == "regression":
        return y.mean(0), y.std(0) + 1e-6
    return np.zeros(y.shape[1]), np.ones(y.shape[1])


def _padded_minibatches(
    x: np.ndarray, y: np.ndarray, batch_size: int, epochs: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float32 x, y and valid (1 = real row) padded to `steps * batch_size` rows, and the row
    indices `(epochs, steps, batch_size)` int32 of every minibatch, shuffled by
    `np.random.default_rng(seed)` one epoch after the other."""
    n, d = x.shape
    steps = -(-n // batch_size)
    padded = steps * batch_size
    x_pad = np.zeros((padded, d), np.float32)
    x_pad[:n] = x
    y_pad = np.zeros((padded, y.shape[1]), np.float32)
    y_pad[:n] = y
    valid = np.zeros(padded, np.float32)
    valid[:n] = 1.0
    rng = np.random.default_rng(seed)
    # Padding indices go last, so only the final minibatch of an epoch is short.
    tail = np.arange(n, padded)
    batches = np.stack(
        [np.concatenate([rng.permutation(n), tail]).reshape(steps, batch_size) for _ in range(epochs)]
    ).astype(np.int32)
    return x_pad, y_pad, valid, batches


def _best_candidate(scores: np.ndarray) -> tuple[int, int]:
    """(weight decay, checkpoint) indices of the highest finite score in `scores (W, C)`.

    A diverged candidate (nan) must never win; argmax then takes the first best, giving the
    documented tie-break order (earlier weight decay, then earlier epoch).
    """
    best = int(np.argmax(np.where(np.isfinite(scores), scores, -np.inf)))
    wi, ci = np.unravel_index(best, scores.shape)
    return wi, ci


def _targets(y: np.ndarray, task: str, n: int) -> tuple[np.ndarray, bool]:
    """Targets as float64 `(N, L)` plus whether the caller passed 1-D targets."""
    y = metrics.binary_labels(y) if task != "regression" else np.asarray(y, dtype=np.float64)
    if len(y) != n:
        raise ValueError(f"{len(y)} targets for {n} feature rows")
    if task == "binary" and y.ndim != 1:
        raise ValueError(f"binary targets must be 1-D, got shape {y.shape}")
    if task in ("multilabel", "multiclass") and y.ndim != 2:
        raise ValueError(f"{task} targets must be (N, L), got shape {y.shape}")
    if task == "multiclass" and not np.all(y.sum(axis=1) == 1):
        raise ValueError("multiclass targets must be one-hot rows (exactly one 1 per row)")
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
      task: "binary", "multilabel", "multiclass" (one-hot targets, softmax) or "regression".
      probe_kwargs: forwarded to `fit_linear_probe` (epochs, learning_rate, weight_decays, ...).

    Returns:
      {"folds": [metrics of each fold plus "selected", "n_subjects" and "n_samples"],
       "mean": {metric: nanmean over folds}, "std": {metric: nanstd (ddof=0) over folds},
       "fold_subjects": [(train ids, val ids, test ids) per fold],
       "predictions": `Predictions` (out-of-fold scores, for ROC curves; not JSON)} for every
      scalar metric (multilabel's per-label list is kept per fold only).
    """
    features, labels, groups = _check_cv_inputs(features, labels, groups, task, folds, val_fraction)
    per_fold, fold_subjects = [], []
    oof_score: np.ndarray | None = None
    oof_fold = np.full(len(features), -1, np.int64)
    splits = _grouped_splits(features, groups, folds, val_fraction, seed)
    for i, (train_idx, val_idx, test_idx) in enumerate(splits):
        probe = fit_linear_probe(
            features[train_idx],
            labels[train_idx],
            features[val_idx],
            labels[val_idx],
            task=task,
            seed=seed,
            **probe_kwargs,
        )
        predicted = probe.predict(features[test_idx])
        if oof_score is None:
            oof_score = np.full((len(features), *predicted.shape[1:]), np.nan)
        oof_score[test_idx], oof_fold[test_idx] = predicted, i
        subjects = tuple(np.unique(groups[idx]).tolist() for idx in (train_idx, val_idx, test_idx))
        per_fold.append(
            {
                **_TASK_METRICS[task](labels[test_idx], predicted),
                "selected": dict(probe.selected),
                "n_subjects": {k: len(s) for k, s in zip(("train", "val", "test"), subjects)},
                "n_samples": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
            }
        )
        fold_subjects.append(subjects)
    mean, std = _fold_mean_std(per_fold)
    return {
        "folds": per_fold,
        "mean": mean,
        "std": std,
        "fold_subjects": fold_subjects,
        "predictions": Predictions(y_true=labels.copy(), score=oof_score, fold=oof_fold),
    }


def _check_cv_inputs(
    features: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    task: str,
    folds: int,
    val_fraction: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three inputs as numpy arrays; ValueError for anything `cross_validate` cannot do."""
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
    return features, labels, groups


def _grouped_splits(
    features: np.ndarray, groups: np.ndarray, folds: int, val_fraction: float, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(train, val, test) row indices of every fold: GroupKFold for test, then a
    GroupShuffleSplit (random_state seed + fold) of the remaining subjects for validation."""
    outer = sklearn.model_selection.GroupKFold(n_splits=folds)
    for i, (fit_idx, test_idx) in enumerate(outer.split(features, groups=groups)):
        if len(np.unique(groups[fit_idx])) < 2:
            raise ValueError(
                f"fold {i} leaves fewer than 2 training subjects, so no validation split can be "
                "carved from them; use fewer folds or more subjects"
            )
        inner = sklearn.model_selection.GroupShuffleSplit(
            n_splits=1, test_size=val_fraction, random_state=seed + i
        )
        tr, va = next(inner.split(fit_idx, groups=groups[fit_idx]))
        yield fit_idx[tr], fit_idx[va], test_idx


def _fold_mean_std(per_fold: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """nanmean and nanstd (ddof=0) over folds of every scalar (float) metric."""
    scalar = [k for k, v in per_fold[0].items() if isinstance(v, float)]
    mean, std = {}, {}
    with warnings.catch_warnings():
        # A metric undefined on every fold is reported as nan; numpy's warning adds nothing.
        warnings.simplefilter("ignore", RuntimeWarning)
        for k in scalar:
            values = np.array([f[k] for f in per_fold], dtype=np.float64)
            mean[k], std[k] = float(np.nanmean(values)), float(np.nanstd(values))
    return mean, std

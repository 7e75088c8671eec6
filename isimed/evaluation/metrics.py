"""Representation metrics on held-out crops (numpy / scipy / scikit-learn, host side)."""

from __future__ import annotations

import numpy as np
import scipy.stats
import sklearn.linear_model

from isimed import geometry


def distance_spearman(
    embeddings: np.ndarray, centres_mm: np.ndarray, pairs: str = "within"
) -> float:
    """Spearman correlation of latent vs physical distances over unordered crop pairs.

    Args:
      embeddings: `(B, K, D)`; centres_mm: `(B, K, ndim)`.
      pairs: "within" (same image), "cross" (different images) or "all".
    """
    b, k = embeddings.shape[:2]
    latent = geometry.pairwise_distances(embeddings.reshape(b * k, -1))
    physical = geometry.pairwise_distances(centres_mm.reshape(b * k, -1))
    image = np.repeat(np.arange(b), k)
    i, j = np.triu_indices(b * k, k=1)
    same = image[i] == image[j]
    keep = {"within": same, "cross": ~same, "all": np.ones_like(same)}[pairs]
    if keep.sum() < 2:
        return float("nan")
    return float(scipy.stats.spearmanr(latent[i[keep], j[keep]], physical[i[keep], j[keep]])[0])


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

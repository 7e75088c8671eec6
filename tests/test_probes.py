"""Tests for isimed.evaluation.metrics and .probes: hand-computed metric cases, brute-force
distances, the linear probe and grouped-CV hygiene."""

import numpy as np
import pytest
import sklearn.metrics

from isimed.evaluation import metrics
from isimed.evaluation import probes

# Small shared shapes: every probe test pads to 3 minibatches of 64 rows, so the jitted trainer
# compiles once per task rather than once per test.
PROBE_KW = dict(epochs=30, batch_size=64, learning_rate=5e-2)


def _orthonormal(rng, n, k):
    q, _ = np.linalg.qr(rng.normal(size=(n, k)))
    return q


# ---------------------------------------------------------------------------------- RankMe


def test_rankme_known_spectrum():
    # Singular values 3 and 1 (and two zeros), readable off the matrix: p = (3/4, 1/4, 0, 0).
    x = np.zeros((5, 4))
    x[0, 0], x[1, 1] = 3.0, 1.0
    # exp(-(0.75 ln 0.75 + 0.25 ln 0.25)) = exp(0.215762 + 0.346574) = exp(0.562335) = 1.754765;
    # eps = 1e-7 on the two zero values adds 2 * 1e-7 * ln(1e7) = 3.2e-6 nats.
    assert metrics.rankme(x, eps=1e-7) == pytest.approx(1.754771, rel=2e-6)
    # A rotation does not change the spectrum: rows (1, 1) and (1, -1) have s = (sqrt 2, sqrt 2).
    assert metrics.rankme(np.array([[1.0, 1.0], [1.0, -1.0]]), eps=0.0) == pytest.approx(2.0, rel=1e-6)


def test_rankme_of_non_finite_embeddings_is_nan():
    x = np.eye(3)
    x[1, 2] = np.inf
    assert np.isnan(metrics.rankme(x))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        metrics.rankme(np.ones(3))


def test_rankme_extremes():
    rng = np.random.default_rng(1)
    rank_one = np.outer(rng.normal(size=50), rng.normal(size=16))
    assert metrics.rankme(rank_one) == pytest.approx(1.0, abs=1e-3)
    d = 12
    assert metrics.rankme(_orthonormal(rng, d, d)) == pytest.approx(d, rel=1e-4)
    # Not centred: a constant offset on every row is one used dimension, not zero.
    assert metrics.rankme(np.ones((20, 5))) == pytest.approx(1.0, abs=1e-3)
    assert metrics.rankme(np.zeros((4, 3))) == 0.0


# ------------------------------------------------------------------------- distances


@pytest.mark.parametrize("pairs", ["within", "cross", "all"])
def test_pair_distances_match_brute_force(pairs):
    rng = np.random.default_rng(0)
    z, centres = rng.normal(size=(3, 4, 5)), rng.uniform(-100, 100, size=(3, 4, 3))
    expected_l, expected_p = [], []
    crops = [(b, i) for b in range(3) for i in range(4)]  # Row-major, as the function orders pairs.
    for n, (b1, i1) in enumerate(crops):
        for b2, i2 in crops[n + 1 :]:
            if {"within": b1 == b2, "cross": b1 != b2, "all": True}[pairs]:
                expected_l.append(np.linalg.norm(z[b1, i1] - z[b2, i2]))
                expected_p.append(np.linalg.norm(centres[b1, i1] - centres[b2, i2]))
    # 12 crops: 66 pairs, of which 3 images x 6 are within an image and the other 48 across.
    assert len(expected_l) == {"within": 18, "cross": 48, "all": 66}[pairs]
    latent, physical = metrics.pair_distances(z, centres, pairs)
    np.testing.assert_allclose(latent, expected_l, rtol=1e-12)
    np.testing.assert_allclose(physical, expected_p, rtol=1e-12)


@pytest.mark.parametrize("pairs", ["within", "cross", "all"])
def test_pair_distances_memory_is_pairs_not_pairs_times_dim(pairs):
    """Wide features (raw crops) over many crops: the old (n, n, D) difference array would take
    256 x 256 x 4096 x 8 B = 2 GiB here; the pairs themselves take under 1 MiB. Values against
    numpy brute force on a few pairs, duplicates (distance 0) included."""
    import tracemalloc

    rng = np.random.default_rng(1)
    z = rng.normal(size=(2, 128, 4096))
    z[1, 5] = z[0, 3]  # A cross pair at distance 0.
    centres = rng.uniform(-100, 100, size=(2, 128, 3))
    tracemalloc.start()
    latent, physical = metrics.pair_distances(z, centres, pairs)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20
    flat_z, flat_c = z.reshape(256, -1), centres.reshape(256, 3)
    i, j = np.triu_indices(256, k=1)
    keep = {"within": i // 128 == j // 128, "cross": i // 128 != j // 128, "all": i >= 0}[pairs]
    i, j = i[keep], j[keep]
    assert len(latent) == len(physical) == len(i)
    for n in (0, 1, len(i) // 2, len(i) - 1):
        assert latent[n] == pytest.approx(np.linalg.norm(flat_z[i[n]] - flat_z[j[n]]), rel=1e-12)
        assert physical[n] == pytest.approx(np.linalg.norm(flat_c[i[n]] - flat_c[j[n]]), rel=1e-12)
    if pairs != "within":
        assert latent[np.flatnonzero((i == 3) & (j == 128 + 5))[0]] == 0.0


def test_pair_distances_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same B and K"):
        metrics.pair_distances(np.zeros((3, 4, 5)), np.zeros((3, 5, 3)), "within")
    with pytest.raises(ValueError, match="pairs"):
        metrics.pair_distances(np.zeros((3, 4, 5)), np.zeros((3, 4, 3)), "some")


def test_distance_spearman_hand_case():
    # One image, three crops on a line at 0, 1, 3 mm -> distances (1, 3, 2) for pairs (01, 02, 12);
    # embeddings at 0, 2, 3 -> (2, 3, 1). Ranks (1, 3, 2) vs (2, 3, 1): d = (-1, 0, 1),
    # rho = 1 - 6 * 2 / (3 * 8) = 0.5.
    centres = np.array([[[0.0], [1.0], [3.0]]])
    z = np.array([[[0.0], [2.0], [3.0]]])
    assert metrics.distance_spearman(z, centres, "within") == pytest.approx(0.5)
    assert np.isnan(metrics.distance_spearman(z, centres, "cross"))  # One image: no cross pairs.
    # Two images of two crops: one within pair each, physical distances (1, 2) vs latent (3, 1).
    two_c = np.array([[[0.0], [1.0]], [[0.0], [2.0]]])
    two_z = np.array([[[0.0], [3.0]], [[0.0], [1.0]]])
    assert metrics.distance_spearman(two_z, two_c, "within") == pytest.approx(-1.0)
    assert np.isnan(metrics.distance_spearman(two_z[:1], two_c[:1], "within"))  # A single pair.


# ------------------------------------------------------------------------------------ kNN


def test_knn_separated_clusters_and_chance():
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0, 0, 0], [0, 10.0, 0, 0]])  # Orthogonal: cosine separates them.
    y = rng.integers(0, 2, size=200)
    x = centres[y] + rng.normal(scale=0.5, size=(200, 4))
    assert probes.knn_accuracy(x[:100], y[:100], x[100:], y[100:], k=5) == 1.0

    xr = rng.normal(size=(1000, 8))
    yr = rng.integers(0, 2, size=1000)
    acc = probes.knn_accuracy(xr[:500], yr[:500], xr[500:], yr[500:], k=20)
    assert 0.4 < acc < 0.6


def test_knn_hand_cases_cosine_ties_and_clipped_k():
    train_x = np.array([[1.0, 0.0], [0.0, 100.0]])
    train_y = np.array([0, 1])
    # (3, 4) is 4.5 from (1, 0) and 96 from (0, 100), but at cosine 0.6 vs 0.8: label 1.
    assert probes.knn_accuracy(train_x, train_y, [[3.0, 4.0]], [1], k=1) == 1.0
    # k = 2: one vote each; the tie goes to the smaller label.
    assert probes.knn_accuracy(train_x, train_y, [[3.0, 4.0]], [0], k=2) == 1.0
    # k = 20 is clipped to the 5 training rows: every test row gets the majority label 0.
    x5 = np.array([[1.0, 0.0], [2.0, 0.1], [3.0, -0.1], [0.0, 1.0], [0.1, 2.0]])
    y5 = np.array([0, 0, 0, 1, 1])
    test_x = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 5.0], [4.0, 0.0]])
    test_y = np.array([0, 1, 1, 0])
    assert probes.knn_accuracy(x5, y5, test_x, test_y, k=20) == 0.5
    assert probes.knn_accuracy(x5, y5, test_x, test_y, k=1) == 1.0


# -------------------------------------------------------------------------------- metrics


def test_binary_metrics_hand_case():
    m = metrics.binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9]))
    # Pairs (pos, neg): (.4,.1) ok, (.4,.6) wrong, (.9,.1) ok, (.9,.6) ok -> 3/4.
    assert m["auc"] == pytest.approx(0.75)
    # Predictions [0,1,0,1]: TP=1, FP=1, FN=1, TN=1.
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)
    # A stricter threshold turns .6 into a negative: TN=2, TP=1, FN=1.
    m = metrics.binary_metrics([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9], threshold=0.7)
    assert (m["accuracy"], m["sensitivity"], m["specificity"]) == pytest.approx((0.75, 0.5, 1.0))
    assert m["f1"] == pytest.approx(2 / 3)


def test_binary_metrics_single_class_is_nan():
    m = metrics.binary_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert np.isnan(m["auc"]) and np.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        metrics.binary_metrics([0, 2], [0.1, 0.2])


def test_multilabel_metrics_excludes_single_class_label():
    y = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]])
    prob = np.array([[0.1, 0.2, 0.5], [0.6, 0.8, 0.5], [0.4, 0.1, 0.5], [0.9, 0.7, 0.5]])
    m = metrics.multilabel_metrics(y, prob)
    assert m["auc_per_label"][0] == pytest.approx(0.75)
    assert m["auc_per_label"][1] == pytest.approx(1.0)
    assert np.isnan(m["auc_per_label"][2])
    assert m["mean_auc"] == pytest.approx(0.875)


def test_regression_metrics_hand_case():
    m = metrics.regression_metrics(np.zeros(4), np.array([1.0, -1.0, 3.0, -3.0]))
    assert m["mae"] == pytest.approx(2.0)
    assert m["rmse"] == pytest.approx(np.sqrt(5.0))


def test_vectorised_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=40)
    scores = np.round(rng.normal(size=(3, 40)), 1)  # Rounding creates ties.
    ours = metrics.auc_from_ranks(y, scores)
    ref = [sklearn.metrics.roc_auc_score(y, s) for s in scores]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


# --------------------------------------------------------------------------- linear probe


def _separable(rng, n, d=8):
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 5.0, size=d) + rng.normal(size=d)
    w = rng.normal(size=d)
    score = x @ w
    return x, (score > np.median(score)).astype(int)


def test_fit_linear_probe_binary_separable():
    rng = np.random.default_rng(0)
    x, y = _separable(rng, 220)
    probe = probes.fit_linear_probe(x[:160], y[:160], x[160:], y[160:], task="binary", **PROBE_KW)
    prob = probe.predict(x[160:])
    assert prob.shape == (60,) and np.all((prob >= 0) & (prob <= 1))
    val_auc = metrics.binary_metrics(y[160:], prob)["auc"]
    assert val_auc > 0.99
    sel = probe.selected
    assert set(sel) == {"weight_decay", "epoch", "val_score"}
    assert sel["weight_decay"] in (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
    assert sel["epoch"] in (5, 10, 15, 20, 25, 30)
    # The returned weights are the selected ones: their validation AUC is the recorded score.
    assert sel["val_score"] == pytest.approx(val_auc, abs=1e-9)


def test_fit_linear_probe_is_deterministic():
    rng = np.random.default_rng(1)
    x, y = _separable(rng, 220)
    y = np.where(rng.random(220) < 0.2, 1 - y, y)  # Label noise so selection is not trivial.
    a = probes.fit_linear_probe(x[:160], y[:160], x[160:], y[160:], task="binary", **PROBE_KW)
    b = probes.fit_linear_probe(x[:160], y[:160], x[160:], y[160:], task="binary", **PROBE_KW)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.selected == b.selected


def test_fit_linear_probe_selects_best_candidate():
    # Two informative dimensions out of 64, noisy labels, 160 training rows: the probe overfits
    # with more epochs, so the best checkpoint is not the last one.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(220, 64))
    y = (x[:, 0] + x[:, 1] + rng.normal(size=220) > 0).astype(int)
    args = (x[:160], y[:160], x[160:], y[160:])
    wds = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
    probe = probes.fit_linear_probe(*args, task="binary", weight_decays=wds, **PROBE_KW)
    sel = probe.selected
    # Each weight decay alone: its best checkpoint, and its last epoch (eval_every=epochs).
    best_each = [
        probes.fit_linear_probe(*args, task="binary", weight_decays=(wd,), **PROBE_KW).selected["val_score"]
        for wd in wds
    ]
    last_each = [
        probes.fit_linear_probe(
            *args, task="binary", weight_decays=(wd,), eval_every=30, **PROBE_KW
        ).selected["val_score"]
        for wd in wds
    ]
    assert sel["val_score"] == pytest.approx(max(best_each), abs=1e-12)
    assert sel["val_score"] > max(last_each)  # Early stopping mattered on this data.
    # The returned weights are those after `epoch` epochs with that weight decay: retraining for
    # exactly that long (same shuffles, since they are drawn epoch by epoch) reproduces them.
    again = probes.fit_linear_probe(
        *args,
        task="binary",
        weight_decays=(sel["weight_decay"],),
        eval_every=sel["epoch"],
        **dict(PROBE_KW, epochs=sel["epoch"]),
    )
    np.testing.assert_allclose(again.weights, probe.weights, rtol=1e-5, atol=1e-6)


def test_fit_linear_probe_regression_exact_linear():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(220, 8)) * 3.0 + 1.0
    t = x @ rng.normal(size=8) * 10.0 + 50.0  # Off-scale targets: exercises target standardising.
    probe = probes.fit_linear_probe(
        x[:160], t[:160], x[160:], t[160:], task="regression", weight_decays=(0.0, 1e-2), **PROBE_KW
    )
    pred = probe.predict(x[160:])
    assert pred.shape == (60,)
    m = metrics.regression_metrics(t[160:], pred)
    assert m["mae"] < 1e-2 * t.std()
    assert probe.selected["weight_decay"] in (0.0, 1e-2)
    assert probe.selected["val_score"] == pytest.approx(-(m["rmse"] ** 2), rel=1e-6, abs=1e-9)


def test_fit_linear_probe_multilabel():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(220, 8))
    y = (x @ rng.normal(size=(8, 3)) > 0).astype(int)
    probe = probes.fit_linear_probe(x[:160], y[:160], x[160:], y[160:], task="multilabel", **PROBE_KW)
    prob = probe.predict(x[160:])
    assert prob.shape == (60, 3)
    m = metrics.multilabel_metrics(y[160:], prob)
    assert m["mean_auc"] > 0.97
    assert probe.selected["val_score"] == pytest.approx(m["mean_auc"], abs=1e-9)


def test_fit_linear_probe_rejects_bad_task():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="task"):
        probes.fit_linear_probe(x, [0, 1, 0, 1], x, [0, 1, 0, 1], task="softmax")


# ----------------------------------------------------------------------- cross-validation


def _grouped_data(seed=0, subjects=30, per_subject=8):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"s{i:02d}" for i in range(subjects)], per_subject)
    subject_offset = np.repeat(rng.normal(size=(subjects, 8)), per_subject, axis=0)
    x, y = _separable(rng, subjects * per_subject)
    return x + 0.3 * subject_offset, y, groups


def test_cross_validate_subject_hygiene():
    x, y, groups = _grouped_data()
    res = probes.cross_validate(x, y, groups, task="binary", folds=5, **PROBE_KW)
    assert len(res["folds"]) == 5 and len(res["fold_subjects"]) == 5
    tested = []
    for (train, val, test), fold in zip(res["fold_subjects"], res["folds"]):
        train, val, test = set(train), set(val), set(test)
        assert train and val and test
        assert not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == set(groups)
        assert fold["n_subjects"] == {"train": len(train), "val": len(val), "test": len(test)}
        assert sum(fold["n_samples"].values()) == len(x)
        assert {"weight_decay", "epoch", "val_score"} == set(fold["selected"])
        tested.extend(test)
    assert sorted(tested) == sorted(set(groups))  # Each subject is tested exactly once.
    for metric in ("auc", "accuracy", "f1", "sensitivity", "specificity"):
        values = [f[metric] for f in res["folds"]]
        assert res["mean"][metric] == pytest.approx(np.nanmean(values))
        assert res["std"][metric] == pytest.approx(np.nanstd(values))
    assert res["mean"]["auc"] > 0.9


def test_cross_validate_is_repeatable():
    x, y, groups = _grouped_data(seed=1)
    y = np.where(np.random.default_rng(5).random(len(y)) < 0.25, 1 - y, y)
    a = probes.cross_validate(x, y, groups, task="binary", folds=5, seed=3, **PROBE_KW)
    b = probes.cross_validate(x, y, groups, task="binary", folds=5, seed=3, **PROBE_KW)
    assert a == b


def test_cross_validate_regression_keys():
    x, _, groups = _grouped_data(seed=2)
    t = x @ np.arange(1.0, 9.0)
    res = probes.cross_validate(
        x, t, groups, task="regression", folds=5, weight_decays=(0.0, 1e-2), **PROBE_KW
    )
    assert set(res["mean"]) == {"mae", "rmse"}
    assert res["mean"]["mae"] < 0.05 * t.std()


def test_cross_validate_input_errors():
    x, y, groups = _grouped_data(subjects=5, per_subject=4)
    with pytest.raises(ValueError, match="at least 6"):
        probes.cross_validate(x, y, groups, task="binary", folds=5)
    with pytest.raises(ValueError, match="same number of rows"):
        probes.cross_validate(x, y[:-1], groups, task="binary", folds=2)
    with pytest.raises(ValueError, match="same number of rows"):
        probes.cross_validate(x, y, groups[:-1], task="binary", folds=2)


# ------------------------------------------------------------------ within-subject position probe


def _subjects_in_own_frames(rng, b=6, k=40, noise=0.5):
    """Crop centres in each subject's own world frame and features linear in the crop's position
    in one anatomical frame: a random rotation and shift per subject between the two, as scans in
    scanner coordinates have, plus feature noise and uninformative dimensions."""
    centres = rng.uniform(-100, 100, size=(b, k, 3))
    features = np.empty((b, k, 8))
    for i in range(b):
        rotation = _orthonormal(rng, 3, 3)
        anatomical = (centres[i] - rng.uniform(-300, 300, size=3)) @ rotation
        features[i, :, :3] = anatomical + rng.normal(0, noise, size=(k, 3))
        features[i, :, 3:] = rng.normal(size=(k, 5))
    return features, centres


def test_within_subject_position_probe_matches_a_sklearn_reference():
    import sklearn.linear_model
    import sklearn.model_selection

    features, centres = _subjects_in_own_frames(np.random.default_rng(3), b=3, k=23)
    got = probes.within_subject_position_probe(features, centres, folds=5)
    per_subject = []
    for x, y in zip(features, centres):
        errors = np.zeros(3)
        for train, test in sklearn.model_selection.KFold(5).split(x):
            mean, std = x[train].mean(0), x[train].std(0) + 1e-6
            ridge = sklearn.linear_model.RidgeCV(alphas=np.logspace(-3, 4, 15))
            ridge.fit((x[train] - mean) / std, y[train])
            errors += np.abs(ridge.predict((x[test] - mean) / std) - y[test]).sum(0)
        per_subject.append(errors / len(x))
    np.testing.assert_allclose(got["mae_mm_per_axis"], np.mean(per_subject, axis=0), rtol=1e-9)
    assert got["mae_mm"] == pytest.approx(np.mean(per_subject))
    assert (got["subjects"], got["folds"]) == (3, 5)


def test_within_subject_probe_finds_positions_a_cross_subject_probe_cannot():
    features, centres = _subjects_in_own_frames(np.random.default_rng(4))
    within = probes.within_subject_position_probe(features, centres)["mae_mm"]
    flat = lambda a: a.reshape(-1, a.shape[-1])
    fit, test = slice(0, 3), slice(3, None)
    across = probes.position_probe(
        flat(features[fit]), flat(centres[fit]), flat(features[test]), flat(centres[test])
    )
    # Uniform centres on [-100, 100] have a mean absolute deviation of 50 mm per axis.
    assert within < 2.0 and across["mae_mm"] > 30.0, (within, across["mae_mm"])


def test_within_subject_probe_uses_fewer_folds_for_few_crops_and_refuses_too_few():
    features, centres = _subjects_in_own_frames(np.random.default_rng(5), b=2, k=6)
    assert probes.within_subject_position_probe(features, centres, folds=5)["folds"] == 3
    with pytest.raises(ValueError, match="3 crops per subject, need at least 4"):
        probes.within_subject_position_probe(features[:, :3], centres[:, :3])

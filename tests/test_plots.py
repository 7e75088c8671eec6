import itertools
import json
import os

import matplotlib.image
import numpy as np
import pytest
import sklearn.decomposition

from isimed.evaluation import metrics
from isimed.evaluation import metrics_log
from isimed.evaluation import plots
from isimed.evaluation import probes


def read_png(path: str) -> np.ndarray:
    assert os.path.getsize(path) > 1000
    return matplotlib.image.imread(path)


def assert_png(path: str, height: int, width: int) -> None:
    """The PNG has exactly panels x panel size x DPI pixels (no tight bbox) and is not blank."""
    image = read_png(path)
    assert image.shape[:2] == (height, width)
    assert image[..., :3].std() > 0.01


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def fake_embeddings(rng, b=3, k=6, d=5):
    centres = rng.uniform(-100, 100, size=(b, k, 3))
    # Embedding = centre / 100 in the first 3 dimensions plus noise: Spearman well above 0.
    z = np.concatenate([centres / 100.0, np.zeros((b, k, d - 3))], axis=-1)
    return z + 0.05 * rng.standard_normal(z.shape), centres


@pytest.fixture(autouse=True)
def no_pyplot_figures_left():
    """No plot function may leave figures in pyplot's global state."""
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before


def test_training_curves_any_keys_resume_and_size(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "validation/spearman_within": 0.05}]
    for step in range(10, 110, 10):
        rows.append(
            {
                "step": step,
                "train/loss": 10.0 / step,
                "train/invariance": 1.0 + step,
                "train/embedding_std": 0.1,
                "train/rankme": 20.0,
                "train/note": "text",
            }
        )
    rows.append({"step": 50, "validation/spearman_within": 0.5})
    rows.append({"step": 50, "train/loss": 123.0})  # A resumed run repeats step 50: later wins.
    write_jsonl(log, rows)
    series = metrics_log.read_metrics(str(log))
    assert set(series) == {
        "train/loss",
        "train/invariance",
        "train/embedding_std",
        "train/rankme",
        "validation/spearman_within",
    }
    steps, values = series["train/loss"]
    assert list(steps) == list(range(10, 110, 10))
    assert values[list(steps).index(50)] == 123.0
    assert list(series["validation/spearman_within"][0]) == [0, 50]

    out = plots.training_curves(str(log), str(tmp_path / "curves.png"))
    assert out == str(tmp_path / "curves.png")
    assert_png(out, 2 * 280, 4 * 360)  # 5 panels: 2 rows x 4 columns of 3.6 x 2.8 inches.
    fig = plots._training_curves_figure(series, "t")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "train/loss" and titles[-1] == "validation/spearman_within"
    scales = {ax.get_title(): ax.get_yscale() for ax in fig.axes if ax.get_title()}
    assert scales["train/loss"] == "log"  # Spans more than a decade.
    assert scales["validation/spearman_within"] == "linear"


def test_training_curves_without_metrics_is_a_clear_error(tmp_path):
    log = tmp_path / "metrics.jsonl"
    write_jsonl(log, [{"step": 1, "note": "nothing numeric"}])
    with pytest.raises(ValueError, match="no numeric metrics"):
        plots.training_curves(str(log), str(tmp_path / "x.png"))


def test_read_metrics_skips_a_truncated_last_line_only(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.0}\n{"step": 3, "tr')
    steps, values = metrics_log.read_metrics(str(log))["train/loss"]
    assert list(steps) == [1, 2] and list(values) == [2.0, 1.0]
    log.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "tr\n{"step": 3, "train/loss": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not valid JSON"):
        metrics_log.read_metrics(str(log))


def test_distance_scatter_panels_hand_spearman_and_fitted_scale(tmp_path):
    # One image, crops at 0, 1, 3 mm: physical distances (1, 3, 2) for pairs (01, 02, 12).
    centres = np.array([[[0.0], [1.0], [3.0]]])
    trained = np.array([[[0.0], [2.0], [3.0]]])  # Latent distances (2, 3, 1): Spearman 0.5.
    exact = centres / 100.0  # Latent distance x 100 mm is the physical distance: Spearman 1.
    out = plots.distance_scatter(exact, centres, 100.0, str(tmp_path / "one.png"))
    assert_png(out, 400, 420)
    fig = plots._distance_scatter_figure({"embeddings": exact}, centres, 100.0, 4000, 0)
    assert fig.axes[0].get_title() == "embeddings: Spearman 1.000\n(3 within-image pairs, 3 shown)"
    assert fig.axes[0].get_ylabel() == "latent distance x 100 mm"

    panels = {"exact": exact, "trained": trained}
    out = plots.distance_scatter(panels, centres, None, str(tmp_path / "two.png"), max_pairs=2)
    assert_png(out, 400, 2 * 420)
    fig = plots._distance_scatter_figure(panels, centres, None, 2, 0)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "exact: Spearman 1.000\n(3 within-image pairs, 2 shown)",
        "trained: Spearman 0.500\n(3 within-image pairs, 2 shown)",
    ]
    # Least-squares scale latent.physical / latent.latent: 100 for "exact"; (2 + 9 + 2) / (4 + 9 + 1)
    # = 13 / 14 = 0.929 for "trained".
    assert [ax.get_ylabel() for ax in fig.axes] == [
        "latent distance x 100 mm (fitted)",
        "latent distance x 0.929 mm (fitted)",
    ]


def test_pca_matches_sklearn():
    x = np.random.default_rng(2).standard_normal((50, 6)) @ np.diag([5, 3, 2, 1, 0.5, 0.1])
    p = plots.pca(x, 3)
    ref = sklearn.decomposition.PCA(3).fit(x)
    np.testing.assert_allclose(p.explained, ref.explained_variance_ratio_, rtol=1e-8)
    np.testing.assert_allclose(np.abs(p.scores), np.abs(ref.transform(x)), atol=1e-8)


@pytest.mark.parametrize("ndim, lesion", [(3, "binary"), (3, None), (2, "fraction")])
def test_embedding_pca_one_panel_per_axis_plus_lesion(tmp_path, ndim, lesion):
    rng = np.random.default_rng(3)
    n = 200
    centres = rng.uniform(-100, 100, size=(n, ndim))
    z = np.concatenate([centres / 50, rng.standard_normal((n, 4))], axis=1)
    labels = {"binary": (rng.random(n) < 0.2).astype(int), "fraction": rng.random(n), None: None}[lesion]
    out = plots.embedding_pca(z, centres, str(tmp_path / "pca.png"), lesion=labels)
    columns = ndim + (lesion is not None)
    assert_png(out, 2 * 330, columns * 380)  # 2 rows of 3.8 x 3.3 inch panels.
    fig = plots._embedding_pca_figure(z, centres, labels, None, 4000, 0)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("coloured")]
    # Two rows (PC1-PC2, PC1-PC3), one panel per world axis plus the lesion panel.
    assert len(titles) == 2 * (ndim + (lesion is not None))
    assert sum("lesion" in t for t in titles) == 2 * (lesion is not None)


def test_embedding_pca_rejects_mismatched_centres(tmp_path):
    with pytest.raises(ValueError, match="centres"):
        plots.embedding_pca(np.zeros((10, 4)), np.zeros((9, 3)), str(tmp_path / "p.png"))


def _mann_whitney_auc(y, score):
    """P(score of a positive > score of a negative), ties counting 1/2: every pair, by brute force."""
    pos, neg = score[y == 1], score[y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_in_legend_hand_cases_and_brute_force(tmp_path):
    rng = np.random.default_rng(4)
    y = (rng.random(60) < 0.4).astype(int)
    noisy = np.round(y + rng.normal(0, 0.7, size=60), 1)  # Rounded: ties between classes.
    curves = {
        # Pairs (pos, neg): (.4, .1) ok, (.4, .6) wrong, (.9, .1) ok, (.9, .6) ok -> 3/4.
        "hand": (np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9])),
        # (.5, .5) tie 1/2, (.5, .2) ok, (.9, .5) ok, (.9, .2) ok -> 3.5/4.
        "ties": (np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9])),
        "noisy": (y, noisy),
        "one class": (np.zeros(10, int), rng.random(10)),
    }
    out = plots.roc_curves(curves, str(tmp_path / "roc.png"))
    assert_png(out, 460, 500)
    legend = [t.get_text() for t in plots._roc_figure(curves, "ROC").axes[0].get_legend().get_texts()]
    assert legend[:2] == ["hand (AUC 0.750)", "ties (AUC 0.875)"]
    assert plots.roc_label("hand", *curves["hand"])[1] == 0.75
    assert plots.roc_label("ties", *curves["ties"])[1] == 0.875
    expected = _mann_whitney_auc(y, noisy)
    assert plots.roc_label("noisy", y, noisy)[1] == pytest.approx(expected, abs=1e-12)
    assert legend[2] == f"noisy (AUC {expected:.3f})"
    assert legend[3] == "one class (AUC undefined: one class)"
    assert np.isnan(plots.roc_label("x", *curves["one class"])[1])


def test_cross_validate_returns_out_of_fold_predictions():
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(12), 10)
    x = rng.standard_normal((120, 4))
    y = (x[:, 0] + 0.5 * rng.standard_normal(120) > 0).astype(int)
    res = probes.cross_validate(x, y, groups, task="binary", folds=3, epochs=5, weight_decays=(0.0,))
    pred = res["predictions"]
    np.testing.assert_array_equal(pred.y_true, y)
    assert pred.score.shape == (120,) and np.all((pred.score >= 0) & (pred.score <= 1))
    assert sorted(np.unique(pred.fold)) == [0, 1, 2]
    for i, (_, _, test_ids) in enumerate(res["fold_subjects"]):
        assert set(groups[pred.fold == i]) == set(test_ids)
        fold_auc = metrics.binary_metrics(y[pred.fold == i], pred.score[pred.fold == i])["auc"]
        assert fold_auc == res["folds"][i]["auc"]
    again = probes.cross_validate(x, y, groups, task="binary", folds=3, epochs=5, weight_decays=(0.0,))
    assert again == res  # Predictions compare by value, so whole results still compare.

    reg = probes.cross_validate(
        x, x[:, 1], groups, task="regression", folds=3, epochs=5, weight_decays=(0.0,)
    )
    assert reg["predictions"].score.shape == (120,) and np.all(np.isfinite(reg["predictions"].score))


def test_write_training_plots_writes_three_pngs(tmp_path):
    rng = np.random.default_rng(6)
    write_jsonl(
        tmp_path / "metrics.jsonl",
        [{"step": s, "train/loss": 1.0 / s, "validation/spearman_within": 0.1} for s in (1, 2, 3)],
    )
    z, centres = fake_embeddings(rng)
    written = plots.write_training_plots(
        str(tmp_path), z, centres, lesion=(rng.random(centres.shape[:2]) < 0.3).astype(int), scale_mm=100.0
    )
    assert set(written) == {"training_curves", "distance_scatter", "pca"}
    for name in ("training_curves", "distance_scatter", "pca"):
        assert written[name] == str(tmp_path / f"{name}.png")
        read_png(written[name])
    # A method without a distance scale (e.g. SimCLR) and a workdir without metrics still work.
    other = tmp_path / "other"
    written = plots.write_training_plots(str(other), z, centres)
    assert set(written) == {"distance_scatter", "pca"}


def test_write_linear_eval_plots(tmp_path):
    rng = np.random.default_rng(7)
    y = (rng.random(60) < 0.4).astype(int)
    results = {
        "feature_sets": {
            name: {
                "lesion_crop": {
                    "predictions": probes.Predictions(y, y + rng.normal(0, s, 60), np.zeros(60, int))
                }
            }
            for name, s in (("pretrained", 0.5), ("random_init", 1.0), ("raw_intensity", 2.0))
        }
    }
    z, centres = fake_embeddings(rng, b=6, k=10)
    pretrained = {"embeddings": z, "centres": centres, "has_lesion": y.reshape(6, 10)}
    written = plots.write_linear_eval_plots(str(tmp_path), results, pretrained=pretrained)
    assert written == {"roc": str(tmp_path / "roc.png"), "pca": str(tmp_path / "pca.png")}
    for path in written.values():
        read_png(path)
    # Data without lesions (e.g. image-level labels only): no ROC, PCA without a lesion panel.
    no_lesion = {"embeddings": z, "centres": centres, "has_lesion": np.zeros((6, 10), int)}
    written = plots.write_linear_eval_plots(
        str(tmp_path / "none"), {"feature_sets": {"x": {}}}, pretrained=no_lesion
    )
    assert set(written) == {"pca"}


def test_linear_eval_writes_plots_and_keeps_predictions_out_of_json(pretrained, tmp_path):
    from configs import linear_eval_chest
    from isimed.evaluation import linear_eval

    config = linear_eval_chest.get_config("test")
    config.pretrain_workdir = pretrained[0]
    results = linear_eval.evaluate(config, str(tmp_path))
    assert isinstance(results["feature_sets"]["pretrained"]["lesion_crop"]["predictions"], probes.Predictions)
    text = open(tmp_path / "results.json").read()
    assert "predictions" not in text
    assert json.loads(text)["feature_sets"]["pretrained"]["lesion_crop"]["mean"]
    for name in ("roc.png", "pca.png"):
        read_png(str(tmp_path / name))

import json
import os

import matplotlib.image
import ml_collections
import numpy as np
import pytest
import scipy.stats
import sklearn.decomposition
import sklearn.metrics

from isimed import plots
from isimed.evaluation import metrics as metrics_lib
from isimed.evaluation import probes


def read_png(path: str) -> np.ndarray:
    assert os.path.getsize(path) > 1000
    return matplotlib.image.imread(path)


def assert_png_matches(path: str, fig) -> None:
    """The PNG reads back with exactly the figure's size in pixels."""
    w, h = fig.get_size_inches() * plots.DPI
    image = read_png(path)
    assert image.shape[:2] == (round(h), round(w))
    assert image[..., :3].std() > 0.01  # Not a blank canvas.


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
        rows.append({"step": step, "train/loss": 10.0 / step, "train/invariance": 1.0 + step,
                     "train/embedding_std": 0.1, "train/rankme": 20.0, "train/note": "text"})
    rows.append({"step": 50, "validation/spearman_within": 0.5})
    rows.append({"step": 50, "train/loss": 123.0})  # A resumed run repeats step 50: later wins.
    write_jsonl(log, rows)
    series = plots.read_metrics(str(log))
    assert set(series) == {"train/loss", "train/invariance", "train/embedding_std", "train/rankme",
                           "validation/spearman_within"}
    steps, values = series["train/loss"]
    assert list(steps) == list(range(10, 110, 10))
    assert values[list(steps).index(50)] == 123.0
    assert list(series["validation/spearman_within"][0]) == [0, 50]

    out = plots.training_curves(str(log), str(tmp_path / "curves.png"))
    assert out == str(tmp_path / "curves.png")
    fig = plots._training_curves_figure(series, "t")
    assert_png_matches(out, fig)
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
    steps, values = plots.read_metrics(str(log))["train/loss"]
    assert list(steps) == [1, 2] and list(values) == [2.0, 1.0]
    log.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "tr\n{"step": 3, "train/loss": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not valid JSON"):
        plots.read_metrics(str(log))


def test_within_image_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    z, centres = fake_embeddings(rng)
    latent, physical = plots.within_image_pairs(z, centres)
    expected_l, expected_p = [], []
    for b in range(z.shape[0]):
        for i in range(z.shape[1]):
            for j in range(i + 1, z.shape[1]):
                expected_l.append(np.linalg.norm(z[b, i] - z[b, j]))
                expected_p.append(np.linalg.norm(centres[b, i] - centres[b, j]))
    np.testing.assert_allclose(latent, expected_l, rtol=1e-12)
    np.testing.assert_allclose(physical, expected_p, rtol=1e-12)
    with pytest.raises(ValueError, match="same B and K"):
        plots.within_image_pairs(z[:, :4], centres)


def test_distance_scatter_panels_and_spearman_in_title(tmp_path):
    rng = np.random.default_rng(1)
    z, centres = fake_embeddings(rng)
    random_z = rng.standard_normal(z.shape)
    out = plots.distance_scatter(z, centres, 100.0, str(tmp_path / "one.png"))
    assert_png_matches(out, plots._distance_scatter_figure({"embeddings": z}, centres, 100.0, 4000, 0))

    panels = {"random init": random_z, "trained": z}
    out = plots.distance_scatter(panels, centres, None, str(tmp_path / "two.png"), max_pairs=10)
    fig = plots._distance_scatter_figure(panels, centres, None, 10, 0)
    assert_png_matches(out, fig)
    for ax, (name, emb) in zip(fig.axes, panels.items()):
        rho = metrics_lib.distance_spearman(emb, centres, "within")
        assert ax.get_title().startswith(f"{name}: Spearman {rho:.3f}")
        assert "10 shown" in ax.get_title()
        assert "fitted" in ax.get_ylabel()


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
    fig = plots._embedding_pca_figure(z, centres, labels, None, 4000, 0)
    assert_png_matches(out, fig)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("coloured")]
    # Two rows (PC1-PC2, PC1-PC3), one panel per world axis plus the lesion panel.
    assert len(titles) == 2 * (ndim + (lesion is not None))
    assert sum("lesion" in t for t in titles) == 2 * (lesion is not None)


def test_embedding_pca_rejects_mismatched_centres(tmp_path):
    with pytest.raises(ValueError, match="centres"):
        plots.embedding_pca(np.zeros((10, 4)), np.zeros((9, 3)), str(tmp_path / "p.png"))


def test_roc_auc_in_legend_equals_sklearn(tmp_path):
    rng = np.random.default_rng(4)
    y = (rng.random(300) < 0.4).astype(int)
    curves = {
        "good": (y, y + rng.normal(0, 0.7, size=300)),
        "weak": (y, y + rng.normal(0, 3.0, size=300)),
        "one class": (np.zeros(10, int), rng.random(10)),
    }
    out = plots.roc_curves(curves, str(tmp_path / "roc.png"))
    fig = plots._roc_figure(curves, "ROC")
    assert_png_matches(out, fig)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    for name in ("good", "weak"):
        auc = sklearn.metrics.roc_auc_score(*curves[name])
        assert f"{name} (AUC {auc:.3f})" in legend
        assert plots.roc_label(name, *curves[name])[1] == pytest.approx(auc, abs=1e-15)
    assert "one class (AUC undefined: one class)" in legend
    assert np.isnan(plots.roc_label("x", *curves["one class"])[1])


def test_cross_validate_returns_out_of_fold_predictions():
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(12), 10)
    x = rng.standard_normal((120, 4))
    y = (x[:, 0] + 0.5 * rng.standard_normal(120) > 0).astype(int)
    res = probes.cross_validate(x, y, groups, task="binary", folds=3, epochs=5,
                                weight_decays=(0.0,))
    pred = res["predictions"]
    np.testing.assert_array_equal(pred.y_true, y)
    assert pred.score.shape == (120,) and np.all((pred.score >= 0) & (pred.score <= 1))
    assert sorted(np.unique(pred.fold)) == [0, 1, 2]
    for i, (_, _, test_ids) in enumerate(res["fold_subjects"]):
        assert set(groups[pred.fold == i]) == set(test_ids)
        fold_auc = probes.binary_metrics(y[pred.fold == i], pred.score[pred.fold == i])["auc"]
        assert fold_auc == res["folds"][i]["auc"]
    again = probes.cross_validate(x, y, groups, task="binary", folds=3, epochs=5,
                                  weight_decays=(0.0,))
    assert again == res  # Predictions compare by value, so whole results still compare.

    reg = probes.cross_validate(x, x[:, 1], groups, task="regression", folds=3, epochs=5,
                                weight_decays=(0.0,))
    assert reg["predictions"].score.shape == (120,) and np.all(np.isfinite(reg["predictions"].score))


def test_write_training_plots_writes_three_pngs(tmp_path):
    rng = np.random.default_rng(6)
    write_jsonl(tmp_path / "metrics.jsonl",
                [{"step": s, "train/loss": 1.0 / s, "validation/spearman_within": 0.1} for s in (1, 2, 3)])
    config = ml_collections.ConfigDict({"loss": {"scale": 100.0}})
    z, centres = fake_embeddings(rng)
    written = plots.write_training_plots(str(tmp_path), config, z, centres,
                                         lesion=(rng.random(centres.shape[:2]) < 0.3).astype(int))
    assert set(written) == {"training_curves", "distance_scatter", "pca"}
    for name in ("training_curves", "distance_scatter", "pca"):
        assert written[name] == str(tmp_path / f"{name}.png")
        read_png(written[name])
    # A method without a distance scale (e.g. SimCLR) and a workdir without metrics still work.
    other = tmp_path / "other"
    written = plots.write_training_plots(str(other), ml_collections.ConfigDict({"loss": {}}), z, centres)
    assert set(written) == {"distance_scatter", "pca"}


def test_write_linear_eval_plots(tmp_path):
    rng = np.random.default_rng(7)
    y = (rng.random(60) < 0.4).astype(int)
    results = {"feature_sets": {
        name: {"lesion_crop": {"predictions": probes.Predictions(y, y + rng.normal(0, s, 60),
                                                                  np.zeros(60, int))}}
        for name, s in (("pretrained", 0.5), ("random_init", 1.0), ("raw_intensity", 2.0))
    }}
    z, centres = fake_embeddings(rng, b=6, k=10)
    pretrained = {"embeddings": z, "centres": centres, "has_lesion": y.reshape(6, 10)}
    written = plots.write_linear_eval_plots(str(tmp_path), results, pretrained=pretrained)
    assert written == {"roc": str(tmp_path / "roc.png"), "pca": str(tmp_path / "pca.png")}
    for path in written.values():
        read_png(path)
    # Data without lesions (e.g. image-level labels only): no ROC, PCA without a lesion panel.
    no_lesion = {"embeddings": z, "centres": centres, "has_lesion": np.zeros((6, 10), int)}
    written = plots.write_linear_eval_plots(str(tmp_path / "none"), {"feature_sets": {"x": {}}},
                                            pretrained=no_lesion)
    assert set(written) == {"pca"}


def test_linear_eval_writes_plots_and_keeps_predictions_out_of_json(pretrained, tmp_path):
    from configs import linear_eval_chest
    from isimed.evaluation import linear_eval

    config = linear_eval_chest.get_config("test")
    config.pretrain_workdir = pretrained[0]
    results = linear_eval.evaluate(config, str(tmp_path))
    assert isinstance(results["feature_sets"]["pretrained"]["lesion_crop"]["predictions"],
                      probes.Predictions)
    text = open(tmp_path / "results.json").read()
    assert "predictions" not in text
    assert json.loads(text)["feature_sets"]["pretrained"]["lesion_crop"]["mean"]
    for name in ("roc.png", "pca.png"):
        read_png(str(tmp_path / name))


def test_spearman_of_fake_embeddings_is_high():
    # Sanity check of the fixture the scatter tests rely on.
    z, centres = fake_embeddings(np.random.default_rng(8), b=4, k=12)
    latent, physical = plots.within_image_pairs(z, centres)
    assert scipy.stats.spearmanr(latent, physical)[0] > 0.9
    assert np.allclose(physical, plots.within_image_pairs(centres, centres)[0])

"""The plots researchers look at: training curves, latent vs physical distance, embedding PCA, ROC.

Every function takes arrays or records, writes one PNG and returns its path. Figures are built as
`matplotlib.figure.Figure` objects on an Agg canvas, never through pyplot, so nothing here touches
pyplot's global figure list or the interactive backend of a notebook or a training process.

`write_training_plots` and `write_linear_eval_plots` are the one-call hooks used by the
pretraining loop and by linear evaluation.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import sklearn.metrics
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from isimed import paths
from isimed import workdir as workdir_layout
from isimed.evaluation import features as features_lib
from isimed.evaluation import metrics as metrics_lib
from isimed.evaluation import metrics_log

DPI = 100
_PANEL = (4.0, 3.2)  # inches per subplot panel
_MAX_POINTS = 4000  # scatter points per panel: more adds no information, only file size and time


def figure(nrows: int, ncols: int, panel: tuple[float, float] = _PANEL) -> Figure:
    """An empty figure of `nrows x ncols` panels of `panel` inches, on its own Agg canvas (add
    axes with `fig.subplots`); `save` writes it."""
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), dpi=DPI, layout="tight")
    FigureCanvasAgg(fig)  # Attaches the Agg canvas explicitly; the figure never meets pyplot.
    return fig


def save(fig: Figure, out_png: str | os.PathLike) -> str:
    """Writes `fig` as a PNG (local path or gs://) and returns the path."""
    out_png = paths.resolve(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # Through epath, so a gs:// workdir works too.
    # No bbox_inches="tight": the PNG then has exactly figsize * DPI pixels.
    fig.savefig(buffer, dpi=DPI, format="png")
    out_png.write_bytes(buffer.getvalue())
    return os.fspath(out_png)


def _subsample(n: int, max_n: int, seed: int) -> np.ndarray:
    """Sorted indices of at most `max_n` of `n` rows (all of them when n <= max_n)."""
    if n <= max_n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))


# --------------------------------------------------------------------------------------------
# Training curves.


# Bounded scores and throughput read better on a linear axis whatever their range.
_LINEAR_KEYS = ("spearman", "auc", "accuracy", "f1", "rankme", "per_s", "std", "nonfinite")


def _log_scale(key: str, values: np.ndarray) -> bool:
    """Log y-axis for positive series spanning more than a factor 10 (losses, learning rates,
    gradient norms), except bounded scores and throughput."""
    if any(word in key.lower() for word in _LINEAR_KEYS):
        return False
    return bool(len(values) > 1 and np.all(values > 0) and values.max() / values.min() > 10.0)


def _training_curves_figure(series: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> Figure:
    # train/* first (loss leading), then validation/*, then anything else, each alphabetically.
    def order(key: str) -> tuple[int, int, str]:
        group = 0 if key.startswith("train/") else 1 if key.startswith("validation/") else 2
        return group, 0 if key.endswith("/loss") else 1, key

    keys = sorted(series, key=order)
    ncols = min(4, max(1, len(keys)))
    nrows = max(1, -(-len(keys) // ncols))
    fig = figure(nrows, ncols, panel=(3.6, 2.8))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        steps, values = series[key]
        validation = key.startswith("validation/")
        ax.plot(
            steps,
            values,
            marker="o" if validation or len(steps) < 20 else None,
            markersize=3,
            color="tab:orange" if validation else "tab:blue",
            linewidth=1.2,
        )
        if _log_scale(key, values):
            ax.set_yscale("log")
            if values.max() / values.min() > 100.0:
                # Two or more decades have enough major labels; minor ones would crowd them.
                ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return fig


def training_curves(metrics_jsonl_path: str, out_png: str) -> str:
    """One panel per logged scalar (train/* and validation/*) against step; returns the PNG path.

    Works for whatever keys a method logs; positive series spanning more than a decade are drawn
    on a log scale.
    """
    series = metrics_log.read_metrics(metrics_jsonl_path)
    if not series:
        raise ValueError(f"{metrics_jsonl_path} holds no numeric metrics to plot")
    name = paths.resolve(metrics_jsonl_path).parent.name
    return save(_training_curves_figure(series, f"Training curves: {name}"), out_png)


# --------------------------------------------------------------------------------------------
# Latent vs physical distance.


def _distance_scatter_figure(
    embeddings: Mapping[str, np.ndarray],
    centres_mm: np.ndarray,
    scale_mm: float | None,
    max_pairs: int,
    seed: int,
) -> Figure:
    fig = figure(1, len(embeddings), panel=(4.2, 4.0))
    axes = fig.subplots(1, len(embeddings), squeeze=False).ravel()
    for ax, (name, z) in zip(axes, embeddings.items()):
        latent, physical = metrics_lib.pair_distances(z, centres_mm, "within")
        if scale_mm is None:
            # Methods without a distance target: least-squares scale, so the shape can be read.
            scale = float(latent @ physical / max(latent @ latent, 1e-12))
            scale_note = f"x {scale:.3g} mm (fitted)"
        else:
            scale, scale_note = float(scale_mm), f"x {float(scale_mm):g} mm"
        rho = metrics_lib.spearman(latent, physical)
        keep = _subsample(len(latent), max_pairs, seed)
        ax.scatter(
            physical[keep],
            scale * latent[keep],
            s=3,
            alpha=0.35,
            linewidths=0,
            color="tab:blue",
            rasterized=True,
        )
        top = max(float(physical.max(initial=0.0)), float(scale * latent.max(initial=0.0)), 1e-6)
        ax.plot([0, top], [0, top], color="black", linewidth=1, linestyle="--", label="identity")
        ax.set_xlim(0, top * 1.02)
        ax.set_ylim(0, top * 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel("physical distance (mm)", fontsize=8)
        ax.set_ylabel(f"latent distance {scale_note}", fontsize=8)
        ax.set_title(
            f"{name}: Spearman {rho:.3f}\n({len(latent)} within-image pairs, {len(keep)} shown)", fontsize=9
        )
        ax.legend(loc="upper left", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return fig


def distance_scatter(
    embeddings: np.ndarray | Mapping[str, np.ndarray],
    centres_mm: np.ndarray,
    scale_mm: float | None,
    out_png: str,
    *,
    max_pairs: int = _MAX_POINTS,
    seed: int = 0,
) -> str:
    """Latent distance x scale vs physical distance of within-image crop pairs; returns the path.

    Args:
      embeddings: `(B, K, D)`, or `{name: (B, K, D)}` for side-by-side panels over the same crops
        (e.g. random init vs trained).
      centres_mm: `(B, K, ndim)` crop centres in world mm.
      scale_mm: the loss's target scale (a latent unit is `scale_mm` mm); None fits a
        least-squares scale per panel (methods not trained on distances).
      max_pairs: pairs drawn per panel (a random subset); the Spearman in the title uses all.
    """
    if not isinstance(embeddings, Mapping):
        embeddings = {"embeddings": embeddings}
    if not embeddings:
        raise ValueError("distance_scatter needs at least one embedding array")
    fig = _distance_scatter_figure(embeddings, centres_mm, scale_mm, max_pairs, seed)
    return save(fig, out_png)


# --------------------------------------------------------------------------------------------
# Embedding PCA.


@dataclasses.dataclass(frozen=True)
class PCA:
    """Principal components of an `(N, D)` matrix: `scores (N, C)`, explained variance ratios."""

    scores: np.ndarray
    explained: np.ndarray


def pca(embeddings: np.ndarray, num_components: int = 3) -> PCA:
    """Projection of centred embeddings on their first principal axes (numpy SVD)."""
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"pca needs an (N >= 2, D) matrix, got shape {x.shape}")
    x = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    c = min(num_components, len(s))
    variance = s**2
    explained = variance[:c] / max(variance.sum(), 1e-300)
    return PCA(scores=u[:, :c] * s[:c], explained=explained)


def _axis_names(ndim: int) -> list[str]:
    # The phantom's 3D world frame is LPS-like: x to the patient's left, y posterior, z superior.
    if ndim == 3:
        return ["world x (mm, left)", "world y (mm, posterior)", "world z (mm, superior)"]
    return [f"world axis {a} (mm)" for a in range(ndim)]


def _embedding_pca_figure(
    embeddings: np.ndarray,
    centres_mm: np.ndarray,
    lesion: np.ndarray | None,
    axis_names: Sequence[str] | None,
    max_points: int,
    seed: int,
) -> Figure:
    embeddings = np.asarray(embeddings)
    centres_mm = np.asarray(centres_mm, np.float64)
    _check_pca_inputs(embeddings, centres_mm, lesion)
    names = list(axis_names) if axis_names is not None else _axis_names(centres_mm.shape[1])
    p = pca(embeddings, 3)
    keep = _subsample(len(embeddings), max_points, seed)
    # Rows: PC1 vs PC2, and PC1 vs PC3 where a third component exists.
    pairs = [(0, 1)] + ([(0, 2)] if p.scores.shape[1] >= 3 else [])
    if p.scores.shape[1] < 2:
        raise ValueError("embedding_pca needs embeddings with at least 2 dimensions")
    ncols = len(names) + (lesion is not None)
    fig = figure(len(pairs), ncols, panel=(3.8, 3.3))
    axes = fig.subplots(len(pairs), ncols, squeeze=False)
    for row, (a, b) in enumerate(pairs):
        xs, ys = p.scores[keep, a], p.scores[keep, b]
        for col, name in enumerate(names):
            ax = axes[row, col]
            points = ax.scatter(
                xs, ys, c=centres_mm[keep, col], cmap="viridis", s=5, linewidths=0, rasterized=True
            )
            fig.colorbar(points, ax=ax, shrink=0.85).ax.tick_params(labelsize=7)
            ax.set_title(f"coloured by {name}", fontsize=8)
        if lesion is not None:
            _lesion_panel(fig, axes[row, -1], xs, ys, np.asarray(lesion)[keep].astype(np.float64))
        for ax in axes[row]:
            ax.set_xlabel(f"PC{a + 1} ({p.explained[a]:.0%} var.)", fontsize=8)
            ax.set_ylabel(f"PC{b + 1} ({p.explained[b]:.0%} var.)", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(f"Embedding PCA of {len(embeddings)} crops ({len(keep)} shown)", fontsize=10)
    return fig


def _check_pca_inputs(embeddings: np.ndarray, centres_mm: np.ndarray, lesion: np.ndarray | None):
    if centres_mm.ndim != 2 or len(centres_mm) != len(embeddings):
        raise ValueError(
            f"expected centres (N, ndim) for {len(embeddings)} embeddings, got {centres_mm.shape}"
        )
    if lesion is not None and len(np.asarray(lesion)) != len(embeddings):
        raise ValueError(f"lesion has {len(lesion)} rows for {len(embeddings)} embeddings")


def _lesion_panel(fig: Figure, ax, xs: np.ndarray, ys: np.ndarray, values: np.ndarray) -> None:
    """The PC scatter coloured by lesion: 0/1 labels as two classes, fractions as a colour bar."""
    if np.all(np.isin(values, (0.0, 1.0))):
        # Positives drawn last so a few lesion crops are not hidden under the rest.
        for label, color, text in ((0.0, "lightgray", "no lesion"), (1.0, "tab:red", "lesion")):
            m = values == label
            ax.scatter(
                xs[m],
                ys[m],
                s=5 if label == 0 else 9,
                color=color,
                linewidths=0,
                label=f"{text} ({int(m.sum())})",
                rasterized=True,
            )
        ax.legend(fontsize=7, loc="best", markerscale=2)
    else:
        order = np.argsort(values)
        points = ax.scatter(
            xs[order], ys[order], c=values[order], cmap="magma_r", s=5, linewidths=0, rasterized=True
        )
        fig.colorbar(points, ax=ax, shrink=0.85).ax.tick_params(labelsize=7)
    ax.set_title("coloured by lesion", fontsize=8)


def embedding_pca(
    embeddings: np.ndarray,
    centres_mm: np.ndarray,
    out_png: str,
    lesion: np.ndarray | None = None,
    *,
    axis_names: Sequence[str] | None = None,
    max_points: int = _MAX_POINTS,
    seed: int = 0,
) -> str:
    """First principal components of crop embeddings, one panel per world axis; returns the path.

    Each panel colours the same PC1-PC2 (and PC1-PC3) scatter by one coordinate of the crop centre:
    smooth colour gradients mean the embedding encodes position (the paper's "positional
    encoding" picture). With `lesion` ((N,) 0/1 labels or lesion fractions) a last panel colours
    by lesion.

    Args:
      embeddings: `(N, D)`; centres_mm: `(N, ndim)`; lesion: `(N,)` or None.
      axis_names: colour-bar titles per world axis (default: the phantom's LPS-like frame for 3D).
    """
    fig = _embedding_pca_figure(embeddings, centres_mm, lesion, axis_names, max_points, seed)
    return save(fig, out_png)


# --------------------------------------------------------------------------------------------
# ROC curves.


def roc_label(name: str, y_true: np.ndarray, score: np.ndarray) -> tuple[str, float]:
    """The legend entry of one ROC curve and its AUC (nan when only one class is present)."""
    y = np.asarray(y_true).reshape(-1)
    if len(np.unique(y)) < 2:
        return f"{name} (AUC undefined: one class)", float("nan")
    auc = float(sklearn.metrics.roc_auc_score(y, np.asarray(score).reshape(-1)))
    return f"{name} (AUC {auc:.3f})", auc


def _roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> Figure:
    fig = figure(1, 1, panel=(5.0, 4.6))
    ax = fig.subplots()
    for name, (y_true, score) in curves.items():
        label, auc = roc_label(name, y_true, score)
        if math.isnan(auc):
            ax.plot([], [], label=label)  # Listed in the legend, nothing to draw.
            continue
        fpr, tpr, _ = sklearn.metrics.roc_curve(np.asarray(y_true).reshape(-1), np.asarray(score).reshape(-1))
        ax.plot(fpr, tpr, linewidth=1.5, label=label)
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)", fontsize=8)
    ax.set_ylabel("true positive rate (sensitivity)", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], out_png: str, *, title: str = "ROC"
) -> str:
    """One ROC curve per feature set, AUC in the legend; returns the PNG path.

    Args:
      curves: `{name: (y_true (N,) 0/1, score (N,))}`.
    """
    if not curves:
        raise ValueError("roc_curves needs at least one (y_true, score) pair")
    return save(_roc_figure(curves, title), out_png)


def metric_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
    out_png: str,
    xlabel: str,
    ylabel: str,
) -> str:
    """One line per arm with error bars (e.g. test AUC against labelled subjects, mean ± std over
    seeds), x on a log axis; returns the PNG path.

    Args:
      curves: `{name: (x, mean, std)}`, three sequences of one length.
    """
    fig = figure(1, 1, panel=(5.5, 4.0))
    ax = fig.subplots()
    for name, (x, mean, std) in curves.items():
        ax.errorbar(x, mean, yerr=std, marker="o", markersize=3, capsize=2, linewidth=1.2, label=name)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save(fig, out_png)


# --------------------------------------------------------------------------------------------
# One call per job.


def write_training_plots(
    workdir: str,
    embeddings: np.ndarray,
    centres: np.ndarray,
    lesion: np.ndarray | None = None,
    scale_mm: float | None = None,
) -> dict[str, str]:
    """training_curves.png, distance_scatter.png and pca.png in a pretraining workdir.

    Args:
      workdir: the pretraining --workdir (holds metrics.jsonl).
      embeddings: `(B, K, D)` held-out crop embeddings; centres: `(B, K, ndim)` mm, as returned by
        `features_lib.collect`; lesion: optional `(B, K)` has_lesion labels.
      scale_mm: mm per unit of latent distance, `Method.target_scale_mm`; None (methods without a
        distance target: SimCLR, VICReg, ...) fits one.
    Returns:
      `{plot name: path}` of the files written.
    """
    workdir = workdir_layout.Workdir(workdir)
    written = {}
    log = workdir.metrics
    if log.exists() and metrics_log.read_metrics(log):
        written["training_curves"] = training_curves(log, workdir.plot("training_curves"))
    written["distance_scatter"] = distance_scatter(
        {"held-out crops": embeddings}, centres, scale_mm, workdir.plot("distance_scatter")
    )
    flat = features_lib.flatten
    written["pca"] = embedding_pca(
        flat(embeddings),
        flat(centres),
        workdir.plot("pca"),
        lesion=None if lesion is None else flat(lesion),
    )
    return written


def write_linear_eval_plots(
    workdir: str,
    results: Mapping[str, Any],
    pretrained: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """roc.png (crop-level lesion ROC per feature set) and pca.png in a linear-evaluation workdir.

    Args:
      results: `linear_eval.evaluate`'s results before stripping: every
        `results["feature_sets"][name]["lesion_crop"]["predictions"]` holds the out-of-fold
        `probes.Predictions` of the lesion probe.
      pretrained: the evaluated crops of the pretrained encoder as `features_lib.collect` returns
        them (`embeddings (B, K, D)`, `centres (B, K, ndim)`, optional `has_lesion (B, K)`), for
        pca.png (coloured by lesion only where both classes occur).
    Returns:
      `{plot name: path}` of the files written.
    """
    workdir = workdir_layout.Workdir(workdir)
    written = {}
    curves = {}
    for name, row in results.get("feature_sets", {}).items():
        predictions = row.get("lesion_crop", {}).get("predictions")
        if predictions is not None:
            curves[name] = (predictions.y_true, predictions.score)
    if curves:
        written["roc"] = roc_curves(
            curves,
            workdir.plot("roc"),
            title="Crop-level lesion ROC (out-of-fold linear-probe scores)",
        )
    if pretrained is not None and "centres" in pretrained:
        lesion = pretrained.get("has_lesion")
        # Data without lesion masks (all crops negative) get no lesion panel.
        if lesion is not None and len(np.unique(lesion)) < 2:
            lesion = None
        flat = features_lib.flatten
        written["pca"] = embedding_pca(
            flat(pretrained["embeddings"]),
            flat(pretrained["centres"]),
            workdir.plot("pca"),
            lesion=None if lesion is None else flat(lesion),
        )
    return written

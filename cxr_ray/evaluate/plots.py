"""PNG figures for evaluation: ROC curves, confusion matrix, training curves.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas,
never through ``pyplot``: no global figure registry, no backend switch, so
these are safe to call from Ray workers and threads and leak nothing.
``path`` is a local path or any URI :mod:`cxr_ray.io.storage` writes (s3://).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve

from cxr_ray.io.storage import is_remote, open_output

DPI = 110


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    path = os.fspath(path)

    if is_remote(path):
        with open_output(path, "wb") as handle:
            handle.write(data)
    else:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
    return path


def plot_roc(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: str | os.PathLike) -> str:
    """One-vs-rest ROC curve per class (classes absent from ``y_true`` are listed, not drawn)."""

    y = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if y.dtype.kind in "USO":
        y = np.array([list(classes).index(str(v)) for v in y.tolist()])
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1)
    for i, name in enumerate(classes):
        positive = y == i
        if positive.all() or not positive.any():
            ax.plot([], [], label=f"{name} (not in data)")
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, i])
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)",
           title="ROC, one vs rest")
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_confusion(cm, classes: Sequence[str], path: str | os.PathLike) -> str:
    """Confusion matrix (rows true, columns predicted): counts, shaded by row fraction."""
    matrix = np.asarray(cm.get("matrix") if isinstance(cm, dict) else cm, dtype=np.float64)
    k = len(classes)
    if matrix.shape != (k, k):
        raise ValueError(f"confusion matrix must be {k}x{k} for {k} classes, got {matrix.shape}")
    rows = matrix.sum(axis=1, keepdims=True)
    fraction = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    size = 2.2 + 0.6 * k
    fig = _figure(size + 0.8, size)
    ax = fig.add_subplot()
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    for r in range(k):
        for c in range(k):
            ax.text(c, r, f"{int(matrix[r, c])}", ha="center", va="center",
                    color="white" if fraction[r, c] > 0.5 else "black", fontsize="small")
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    return _save(fig, path)


def plot_training_curves(history: list[dict], path: str | os.PathLike) -> str:
    """Loss, validation accuracy / AUC and learning rate per epoch (missing keys are skipped)."""
    if not history:
        raise ValueError("history is empty: nothing to plot")

    def series(key: str) -> tuple[list, list]:
        points = [(row.get("epoch", i), row[key]) for i, row in enumerate(history) if row.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    fig = _figure(11, 3.4)
    loss_ax, score_ax, lr_ax = fig.subplots(1, 3)
    for key in ("train_loss", "val_loss"):
        x, v = series(key)
        if v:
            loss_ax.plot(x, v, marker="o", markersize=3, label=key)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    for key in ("val_accuracy", "val_balanced_accuracy", "val_auc"):
        x, v = series(key)
        if v:
            score_ax.plot(x, v, marker="o", markersize=3, label=key)
    score_ax.set(xlabel="epoch", ylabel="score", title="validation")
    x, v = series("lr")
    if v:
        lr_ax.plot(x, v, marker="o", markersize=3, color="tab:purple")
        if min(v) > 0:
            lr_ax.set_yscale("log")
    lr_ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    for ax in (loss_ax, score_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return _save(fig, path)


def plot_reliability(curves: dict[str, dict], path: str | os.PathLike) -> str:
    """Reliability diagram: accuracy against confidence per bin, one line per curve, with its ECE.

    ``curves`` maps a label ("before calibration", "after") to a
    :func:`cxr_ray.evaluate.calibration.reliability` record. The diagonal is
    perfect calibration; bars at the bottom show how many cases each bin holds.
    """
    if not curves:
        raise ValueError("no reliability curves to plot")
    fig = _figure(5.2, 5.0)
    ax, count_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfect calibration")
    first = next(iter(curves.values()))
    edges = np.asarray(first["edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    width = (edges[1] - edges[0]) / (len(curves) + 1)
    for i, (label, curve) in enumerate(curves.items()):
        points = [(c, a) for c, a in zip(curve["confidence"], curve["accuracy"], strict=True) if c is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, linewidth=1.5,
                label=f"{label} (ECE {curve['ece']:.3f})")
        count_ax.bar(centres - 0.5 * (edges[1] - edges[0]) + (i + 0.5) * width, curve["count"], width=width,
                     label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), ylabel="accuracy", title="reliability (top-label confidence)")
    ax.legend(loc="upper left", fontsize="small")
    count_ax.set(xlabel="confidence", ylabel="cases")
    return _save(fig, path)

"""One PNG of sample images per class, each with its heatmap: the figure training and evaluation reports carry.

Drawn with matplotlib's object API (no pyplot global state, safe in worker threads).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from cxr_ray.explain.methods import Explainer
from cxr_ray.explain.overlay import DEFAULT_ALPHA, DEFAULT_CMAP, overlay_rgb
from cxr_ray.io.storage import open_output
from cxr_ray.models.card import ModelCard


def heatmap_grid(
    model: nn.Module,
    card: ModelCard,
    samples: Sequence[tuple[np.ndarray, str | int]],
    path: str | os.PathLike,
    *,
    method: str = "gradcam",
    per_class: int = 3,
    target: str = "predicted",
    layer: str | None = None,
    alpha: float = DEFAULT_ALPHA,
    cmap: str = DEFAULT_CMAP,
    title: str | None = None,
    s3_endpoint: str | None = None,
) -> dict:
    """One PNG: a row per class, up to ``per_class`` of its samples, each with its heatmap.

    ``samples`` are ``(pixels (H, W) in [0, 1], label)`` with the label a class
    name or index, typically validation images; the first ``per_class`` of each
    class are drawn. ``target`` chooses the class each heatmap explains:
    ``"predicted"`` (default), ``"label"`` (the sample's own class) or a class name.
    ``title`` replaces the default figure title (model name, arch, method).
    Returns a summary (path, per-class counts, what each cell shows).
    """
    classes = list(card.classes)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if target not in ("predicted", "label") and target not in classes:
        raise ValueError(f"target must be 'predicted', 'label' or one of {classes}, got {target!r}")
    chosen: dict[str, list[np.ndarray]] = {name: [] for name in classes}
    for pixels, label in samples:
        name = classes[label] if isinstance(label, (int, np.integer)) else str(label)
        if name not in chosen:
            raise ValueError(f"sample label {label!r} is not one of {classes}")
        if len(chosen[name]) < per_class:
            chosen[name].append(pixels)

    explainer = Explainer(model, card, method, layer=layer)
    figure = Figure(figsize=(2.6 * per_class, 2.9 * len(classes)), dpi=100)
    axes = figure.subplots(len(classes), per_class, squeeze=False)
    cells = []
    for row, name in enumerate(classes):
        for col in range(per_class):
            ax = axes[row][col]
            ax.set_axis_off()
            if col >= len(chosen[name]):
                if col == 0:
                    ax.text(0.5, 0.5, f"no {name} samples", ha="center", va="center")
                continue
            pixels = chosen[name][col]
            wanted = {"predicted": None, "label": name}.get(target, target)
            result = explainer.explain(pixels, wanted)
            predicted = max(result.probabilities, key=result.probabilities.get)  # type: ignore[arg-type]
            ax.imshow(overlay_rgb(pixels, result.heatmap, alpha=alpha, cmap=cmap))
            ax.set_title(
                f"true {name} / pred {predicted}\n{method} for {result.target_class} "
                f"p={result.score:.2f}",
                fontsize=8,
            )
            cells.append(
                {"label": name, "predicted": predicted, "explained": result.target_class, "score": result.score}
            )
    figure.suptitle(title or f"{card.name} ({card.arch}) {method} heatmaps", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    with open_output(os.fspath(path), "wb", s3_endpoint=s3_endpoint) as handle:
        handle.write(buffer.getvalue())
    return {
        "path": os.fspath(path),
        "method": method,
        "per_class": {name: len(chosen[name]) for name in classes},
        "cells": cells,
    }

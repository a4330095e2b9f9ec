"""Heatmaps drawn on the radiograph, at the original image size.

The overlay is blended per pixel with an opacity that grows with the heatmap
(``alpha * heatmap``), so regions the model ignores show the film unaltered
instead of a uniform blue tint. Colormaps are matplotlib's; the PNG is
written by Pillow, so the same inputs give the same bytes.

:func:`heatmap_grid` draws a figure with matplotlib's object API (no pyplot
global state, safe in worker threads).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

DEFAULT_CMAP = "jet"
DEFAULT_ALPHA = 0.5
DEFAULT_PERCENTILE = 99.0


def display_scale(heatmap: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> np.ndarray:
    """The heatmap divided by the ``percentile`` of its positive values, clipped to [0, 1].

    Grad-CAM maps are smooth, so this changes them little; LRP maps are sparse
    (a few strong pixels), and without it most of their evidence is invisible.
    Like the outlier clipping of ``captum.attr.visualization``. Display only:
    metrics use the heatmap itself.
    """
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, None)
    positive = heat[heat > 0]
    if positive.size == 0 or percentile >= 100:
        return np.clip(heat, 0.0, 1.0)
    top = float(np.percentile(positive, percentile))
    return np.clip(heat / top, 0.0, 1.0) if top > 0 else np.clip(heat, 0.0, 1.0)


def overlay_rgb(
    pixels: np.ndarray,
    heatmap: np.ndarray,
    *,
    alpha: float = DEFAULT_ALPHA,
    cmap: str = DEFAULT_CMAP,
    percentile: float = DEFAULT_PERCENTILE,
) -> np.ndarray:
    """uint8 (H, W, 3): the grey image with ``heatmap`` (same H, W, in [0, 1]) blended on top.

    ``percentile`` sets the heat shown at full colour (see :func:`display_scale`; 100 = the maximum).
    """
    import matplotlib

    pixels = np.asarray(pixels, dtype=np.float32)
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if pixels.ndim != 2 or heatmap.shape != pixels.shape:
        raise ValueError(
            f"pixels and heatmap must be 2-D and the same shape, got {pixels.shape} and {heatmap.shape}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = display_scale(heatmap, percentile)
    colour = matplotlib.colormaps[cmap](heat)[..., :3].astype(np.float32)
    grey = np.clip(np.nan_to_num(pixels), 0.0, 1.0)[..., None]
    weight = (alpha * heat)[..., None]
    blended = (1.0 - weight) * grey + weight * colour
    return np.round(blended * 255.0).astype(np.uint8)


def overlay_png_bytes(
    pixels: np.ndarray, heatmap: np.ndarray, *, alpha: float = DEFAULT_ALPHA, cmap: str = DEFAULT_CMAP
) -> bytes:
    """The overlay as PNG bytes (what the HTTP endpoint base64-encodes)."""
    buffer = io.BytesIO()
    Image.fromarray(overlay_rgb(pixels, heatmap, alpha=alpha, cmap=cmap), mode="RGB").save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def save_overlay(
    pixels: np.ndarray,
    heatmap: np.ndarray,
    path: str | os.PathLike,
    *,
    alpha: float = DEFAULT_ALPHA,
    cmap: str = DEFAULT_CMAP,
    s3_endpoint: str | None = None,
) -> str:
    """Write the overlay PNG to a local path or URI; returns where it went."""
    from cxr_ray.io.storage import open_output

    data = overlay_png_bytes(pixels, heatmap, alpha=alpha, cmap=cmap)
    with open_output(os.fspath(path), "wb", s3_endpoint=s3_endpoint) as handle:
        handle.write(data)
    return os.fspath(path)


def heatmap_grid(
    model,
    card,
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cxr_ray.explain.methods import Explainer
    from cxr_ray.io.storage import open_output

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
            predicted = max(result.probabilities, key=result.probabilities.get)
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

"""Heatmaps drawn on the radiograph, at the original image size.

The overlay is blended per pixel with an opacity that grows with the heatmap
(``alpha * heatmap``), so regions the model ignores show the film unaltered
instead of a uniform blue tint. Colormaps are matplotlib's; the PNG is
written by Pillow, so the same inputs give the same bytes.

Figures of many overlays are :mod:`cxr_ray.explain.grid`'s.
"""

from __future__ import annotations

import io
import os

import matplotlib
import numpy as np
from PIL import Image

from cxr_ray.io.storage import open_output

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
    return png_bytes(overlay_rgb(pixels, heatmap, alpha=alpha, cmap=cmap))


def png_bytes(rgb: np.ndarray) -> bytes:
    """An :func:`overlay_rgb` image as PNG bytes (screening also sends the same array as a DICOM SC)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
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
    data = overlay_png_bytes(pixels, heatmap, alpha=alpha, cmap=cmap)
    with open_output(os.fspath(path), "wb", s3_endpoint=s3_endpoint) as handle:
        handle.write(data)
    return os.fspath(path)

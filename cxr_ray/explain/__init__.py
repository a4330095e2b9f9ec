"""Explainability: Grad-CAM and LRP heatmaps (Captum), overlays, and how well they localise lesions.

Entry points:

* :func:`explain` / :class:`Explainer` -- one heatmap per image, at its original size;
* :func:`overlay_png_bytes` / :func:`save_overlay` -- draw a heatmap on the X-ray;
* :func:`heatmap_grid` -- one PNG of sample images per class for training reports;
* :func:`localisation_report` -- energy ratio and pointing game against lesion masks.
"""

from cxr_ray.explain.grid import heatmap_grid
from cxr_ray.explain.localisation import (
    energy_ratio,
    localisation_report,
    localisation_scores,
    pointing_hit,
)
from cxr_ray.explain.methods import (
    METHODS,
    Explainer,
    Explanation,
    UnsupportedExplanationError,
    check_supported,
    explain,
    supported_pairs,
)
from cxr_ray.explain.overlay import overlay_png_bytes, overlay_rgb, save_overlay

__all__ = [
    "METHODS",
    "Explainer",
    "Explanation",
    "UnsupportedExplanationError",
    "check_supported",
    "energy_ratio",
    "explain",
    "heatmap_grid",
    "localisation_report",
    "localisation_scores",
    "overlay_png_bytes",
    "overlay_rgb",
    "pointing_hit",
    "save_overlay",
    "supported_pairs",
]

"""Evaluation: the papers' metrics with bootstrap CIs, operating points, k-fold summaries, plots.

Figures live in :mod:`cxr_ray.evaluate.plots` (imports matplotlib; not loaded here).
"""

from cxr_ray.evaluate.metrics import choose_threshold, classification_report, summarize_folds

__all__ = ["choose_threshold", "classification_report", "summarize_folds"]

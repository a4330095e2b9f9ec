"""The training-data fingerprint stored in ``model.json`` (``drift_fingerprint``) for drift checks.

What a model saw on its validation split, in a form a screening run can be
compared with later (:mod:`cxr_ray.evaluate.drift`): the histogram of the
positive-class score (after :meth:`ModelCard.decide`, so the same calibrated
score a screening row records) and the header mix: format, modality, view,
photometric interpretation, image-size band and manufacturer, each as counts
per category. Only counts: no path, no identifier, nothing per image.

``data_fingerprint`` (a content hash of the training files) says *which* data;
this says *what it looked like*.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

FINGERPRINT_VERSION = 1
# Equal-width bins on [0, 1]: the same for every model, so histograms compare bin by bin.
SCORE_BINS = 10
# Header fields compared, in report order; each is a column of the screening Parquet
# (``size_band`` is derived from ``rows`` / ``cols``).
HEADER_FIELDS = ("format", "modality", "view_position", "photometric_interpretation", "manufacturer", "size_band")
MISSING = "(none)"  # the category of an absent value (a PNG has no modality)
# Longest image side, in pixels: below 1024 is a thumbnail or a downscaled export, 2000-3000 a
# typical CR/DX detector; a shift between bands often means another source or export path.
SIZE_BANDS = ((1024, "<1024"), (2048, "1024-2047"), (3072, "2048-3071"))
LARGEST_BAND = ">=3072"


def score_edges() -> np.ndarray:
    return np.linspace(0.0, 1.0, SCORE_BINS + 1)


def score_histogram(scores: Iterable[float]) -> list[int]:
    """Counts of ``scores`` (NaN left out) in the :data:`SCORE_BINS` bins of [0, 1]."""
    values = np.asarray(list(scores), dtype=np.float64)
    values = np.clip(values[np.isfinite(values)], 0.0, 1.0)
    counts, _ = np.histogram(values, bins=score_edges())
    return [int(c) for c in counts]


def size_band(rows: Any, cols: Any) -> str:
    """The band of the longer side (``(none)`` when the size is unknown)."""
    try:
        side = max(int(rows), int(cols))
    except (TypeError, ValueError):
        return MISSING
    if side <= 0:
        return MISSING
    return next((label for limit, label in SIZE_BANDS if side < limit), LARGEST_BAND)


def category(value: Any) -> str:
    """A header value as a category name (``(none)`` for missing / empty)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return MISSING
    text = str(value).strip()
    return text if text else MISSING


def header_mix(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """``{field: {category: count}}`` over decode-metadata records (dicts with rows/cols and the fields)."""
    mix: dict[str, Counter] = {name: Counter() for name in HEADER_FIELDS}
    for record in records:
        for name in HEADER_FIELDS:
            value = size_band(record.get("rows"), record.get("cols")) if name == "size_band" else record.get(name)
            mix[name][category(value)] += 1
    return {name: dict(sorted(counts.items())) for name, counts in mix.items()}


def build_fingerprint(scores: np.ndarray | None, records: list[Mapping[str, Any]], *,
                      positive_class: str | None, computed_on: str = "validation") -> dict[str, Any]:
    """The ``drift_fingerprint`` record: score histogram (None without a positive class) and header mix."""
    score = None
    if scores is not None and positive_class is not None:
        score = {"class": positive_class, "bin_edges": [round(float(e), 6) for e in score_edges()],
                 "counts": score_histogram(scores)}
    return {
        "version": FINGERPRINT_VERSION,
        "computed_on": computed_on,
        "images": len(records),
        "score": score,
        "headers": header_mix(records),
    }


def usable(fingerprint: Any) -> bool:
    """Whether a card's fingerprint can be compared with (an old artifact has none; a foreign one may be odd)."""
    return (isinstance(fingerprint, dict) and fingerprint.get("version") == FINGERPRINT_VERSION
            and isinstance(fingerprint.get("headers"), dict))

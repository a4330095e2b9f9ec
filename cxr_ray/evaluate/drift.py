"""Drift: how far a screened population is from the model's validation data (its fingerprint).

Each distribution (the positive-class score histogram; each header field's
category mix) is compared with the population stability index,

    PSI = sum over bins of (screened% - reference%) * ln(screened% / reference%),

the credit-scoring rule of thumb read as: below 0.1 no meaningful change,
0.1-0.2 a moderate shift worth watching, above 0.2 a significant shift (the
model is seeing inputs unlike the ones it was validated on; its sensitivity
and specificity may not hold). Counts are smoothed by half an image per bin
so that a category absent on one side gives a large, finite PSI instead of
infinity. The score distribution also gets the two-sample Kolmogorov-Smirnov
distance computed on the shared bins (the largest gap between the two
cumulative histograms; a lower bound of the exact statistic).

PSI is noisy on small samples: with fewer than :data:`MIN_IMAGES` screened
images the figures are reported but no warning is raised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxr_ray.models.fingerprint import HEADER_FIELDS, usable

PSI_MODERATE = 0.1
PSI_SIGNIFICANT = 0.2
MIN_IMAGES = 30
SMOOTHING = 0.5  # images added to every bin of both sides
LABELS = {"score": "score distribution", "format": "file format", "modality": "modality",
          "view_position": "view position", "photometric_interpretation": "photometric interpretation",
          "manufacturer": "manufacturer", "size_band": "image size (longest side, px)"}


@dataclass
class DriftCheck:
    """One compared distribution."""

    name: str
    psi: float
    level: str  # "stable" | "moderate" | "significant"
    reference: dict[str, int]
    screened: dict[str, int]
    ks: float | None = None
    message: str = ""


@dataclass
class DriftResult:
    """All checks of a run, or why there are none."""

    available: bool
    reason: str = ""
    screened_images: int = 0
    reference_images: int = 0
    checks: list[DriftCheck] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return [c.message for c in self.checks if c.level == "significant" and c.message]


def psi(reference: list[int] | np.ndarray, screened: list[int] | np.ndarray) -> float:
    """Population stability index of two count vectors over the same bins (smoothed)."""
    ref = np.asarray(reference, dtype=np.float64) + SMOOTHING
    new = np.asarray(screened, dtype=np.float64) + SMOOTHING
    ref, new = ref / ref.sum(), new / new.sum()
    return float(np.sum((new - ref) * np.log(new / ref)))


def ks_binned(reference: list[int], screened: list[int]) -> float:
    """Largest gap between the two cumulative histograms (0 when either side is empty)."""
    ref, new = np.asarray(reference, dtype=np.float64), np.asarray(screened, dtype=np.float64)
    if ref.sum() == 0 or new.sum() == 0:
        return 0.0
    return float(np.max(np.abs(np.cumsum(ref) / ref.sum() - np.cumsum(new) / new.sum())))


def level(value: float) -> str:
    if value > PSI_SIGNIFICANT:
        return "significant"
    return "moderate" if value > PSI_MODERATE else "stable"


def _biggest_change(reference: dict[str, int], screened: dict[str, int]) -> str:
    """Plain words for the category whose share moved most, e.g. ``'CT' 0% in validation, 60% here``."""
    ref_n, new_n = max(sum(reference.values()), 1), max(sum(screened.values()), 1)
    keys = sorted(set(reference) | set(screened))
    key = max(keys, key=lambda k: abs(screened.get(k, 0) / new_n - reference.get(k, 0) / ref_n))
    return (f"'{key}' is {screened.get(key, 0) / new_n:.0%} of the screened images "
            f"against {reference.get(key, 0) / ref_n:.0%} in validation")


def _check(name: str, reference: dict[str, int], screened: dict[str, int], enough: bool, *,
           ks: float | None = None, detail: str = "") -> DriftCheck:
    keys = sorted(set(reference) | set(screened))
    value = psi([reference.get(k, 0) for k in keys], [screened.get(k, 0) for k in keys])
    check = DriftCheck(name=name, psi=round(value, 4), level=level(value), reference=reference, screened=screened,
                       ks=None if ks is None else round(ks, 4))
    if check.level == "significant" and enough:
        check.message = (f"Significant shift in {LABELS.get(name, name)} (PSI {value:.2f} > {PSI_SIGNIFICANT}): "
                         f"{detail or _biggest_change(reference, screened)}. These inputs differ from the data the "
                         "model was validated on; its sensitivity and specificity may not hold for them.")
    elif check.level == "significant":
        check.level = "moderate"  # too few images to call it; the figure is still shown
    return check


def compare(fingerprint: Any, score_counts: list[int] | None, headers: dict[str, dict[str, int]],
            screened_images: int) -> DriftResult:
    """Every check the fingerprint allows, against what a run screened (``ok`` rows only)."""
    if not usable(fingerprint):
        return DriftResult(available=False, reason=(
            "not possible: this model's model.json has no training-data fingerprint (an artifact trained "
            "before fingerprints were stored); retrain it to enable the drift check"))
    result = DriftResult(available=True, screened_images=screened_images,
                         reference_images=int(fingerprint.get("images", 0)))
    if screened_images == 0:
        result.available, result.reason = False, "not possible: no input of this output was screened (no ok rows)"
        return result
    enough = screened_images >= MIN_IMAGES
    score = fingerprint.get("score")
    if score and score_counts is not None and len(score.get("counts", [])) == len(score_counts):
        ref = [int(c) for c in score["counts"]]
        edges = score["bin_edges"]
        names = [f"{edges[i]:.1f}-{edges[i + 1]:.1f}" for i in range(len(ref))]
        ks = ks_binned(ref, score_counts)
        result.checks.append(_check("score", dict(zip(names, ref, strict=True)),
                                    dict(zip(names, score_counts, strict=True)), enough, ks=ks,
                                    detail=f"the cumulative score distributions differ by up to {ks:.0%} (KS)"))
    for name in HEADER_FIELDS:
        reference = fingerprint["headers"].get(name)
        if reference and name in headers:
            result.checks.append(_check(name, dict(reference), headers[name], enough))
    return result

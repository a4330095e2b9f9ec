"""The drift check's figures (no Ray): PSI and KS on known distributions, the documented
thresholds, the small-sample rule, and artifacts without a fingerprint."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxr_ray.evaluate.drift import MIN_IMAGES, PSI_SIGNIFICANT, compare, ks_binned, psi
from cxr_ray.models.fingerprint import build_fingerprint, header_mix, score_histogram, size_band


def _records(n: int, fmt: str = "dicom", modality: str | None = "DX", side: int = 2048) -> list[dict]:
    return [{"format": fmt, "modality": modality, "view_position": "PA", "photometric_interpretation": "MONOCHROME2",
             "manufacturer": None, "rows": side, "cols": side - 10} for _ in range(n)]


def test_psi_is_zero_for_equal_shares_and_matches_the_formula():
    assert psi([10, 20, 30], [10, 20, 30]) == 0.0
    assert psi([10, 20, 30], [20, 40, 60]) < 1e-4  # equal shares, different sizes: only the smoothing differs
    ref, new = np.array([50.5, 50.5]) / 101, np.array([80.5, 20.5]) / 101  # counts + 0.5 smoothing
    assert psi([50, 50], [80, 20]) == pytest.approx(float(np.sum((new - ref) * np.log(new / ref))))
    assert math.isfinite(psi([100, 0], [0, 100]))  # an empty bin: large but finite


def test_ks_is_the_largest_gap_of_the_cumulative_histograms():
    assert ks_binned([10, 0, 0], [0, 0, 10]) == pytest.approx(1.0)
    assert ks_binned([5, 5], [5, 5]) == 0.0


def test_size_bands_and_missing_values():
    assert [size_band(r, c) for r, c in ((64, 64), (1024, 800), (2500, 3000), (4000, 10))] == [
        "<1024", "1024-2047", "2048-3071", ">=3072"]
    assert size_band(None, None) == "(none)"
    assert header_mix([{"format": "png", "modality": None, "rows": 0, "cols": 0}])["modality"] == {"(none)": 1}


def test_a_shifted_header_mix_warns_and_an_unshifted_one_does_not():
    fingerprint = build_fingerprint(np.linspace(0, 1, 200), _records(200), positive_class="covid")
    same = compare(fingerprint, score_histogram(np.linspace(0, 1, 100)), header_mix(_records(100)), 100)
    assert same.available and not same.warnings and {c.level for c in same.checks} == {"stable"}
    shifted = header_mix(_records(60, fmt="png", modality=None, side=512) + _records(40))
    moved = compare(fingerprint, score_histogram(np.linspace(0, 1, 100)), shifted, 100)
    levels = {c.name: c.level for c in moved.checks}
    assert levels["format"] == levels["modality"] == levels["size_band"] == "significant"
    assert levels["score"] == levels["view_position"] == "stable"
    assert any("Significant shift in file format" in w and "'dicom' is 40% of the screened images against 100%" in w
               for w in moved.warnings)
    assert all(c.psi > PSI_SIGNIFICANT for c in moved.checks if c.level == "significant")


def test_a_shifted_score_distribution_warns_with_its_ks_distance():
    fingerprint = build_fingerprint(np.full(100, 0.05), _records(100), positive_class="covid")
    result = compare(fingerprint, score_histogram(np.full(100, 0.95)), header_mix(_records(100)), 100)
    score = next(c for c in result.checks if c.name == "score")
    assert score.level == "significant" and score.ks == pytest.approx(1.0)
    assert "KS" in score.message


def test_too_few_images_show_the_figure_but_raise_no_warning():
    fingerprint = build_fingerprint(None, _records(100), positive_class=None)
    few = MIN_IMAGES - 1
    result = compare(fingerprint, None, header_mix(_records(few, fmt="png")), few)
    fmt = next(c for c in result.checks if c.name == "format")
    assert fmt.psi > PSI_SIGNIFICANT and fmt.level == "moderate" and not result.warnings


@pytest.mark.parametrize("fingerprint", [None, {}, {"version": 99, "headers": {}}, "a string"])
def test_without_a_usable_fingerprint_the_check_says_it_was_not_possible(fingerprint):
    result = compare(fingerprint, [0] * 10, header_mix(_records(50)), 50)
    assert not result.available and result.reason.startswith("not possible") and not result.checks

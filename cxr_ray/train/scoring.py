"""After a run: its probabilities on held-out rows, calibration, the operating point, the reports.

The order is fixed: the temperature is fitted on the VALIDATION predictions;
the threshold is chosen on the calibrated validation probabilities; test
reports are of calibrated probabilities at that threshold, with patient-level
bootstrap intervals and the calibration error before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from cxr_ray.evaluate.calibration import calibration_record, expected_calibration_error, reliability
from cxr_ray.evaluate.metrics import choose_threshold, classification_report
from cxr_ray.models.calibration import temperature_scale
from cxr_ray.models.card import CalibrationRecord, ThresholdsRecord
from cxr_ray.train.config import TrainConfig
from cxr_ray.train.ingest import subset
from cxr_ray.train.predict import predict_probs
from cxr_ray.train.prepare import Prepared


@dataclass(frozen=True)
class Scored:
    """One set of rows, predicted: sorted by row id, with their labels and patient groups."""

    row_ids: np.ndarray
    labels: np.ndarray
    probs: np.ndarray  # uncalibrated (the network's softmax)
    groups: np.ndarray

    def calibrated(self, temperature: float) -> np.ndarray:
        return temperature_scale(self.probs, temperature)


def predict_parts(cfg: TrainConfig, prep: Prepared, state: dict[str, Any], *,
                  temperatures: list[float] | None = None, **parts: np.ndarray) -> dict[str, Scored]:
    """``{part: Scored}`` for each named set of row ids, in ONE pass (one actor pool start).

    ``temperatures``: ``state`` is a fold ensemble's.
    """
    wanted = np.concatenate([np.asarray(v, dtype=np.int64) for v in parts.values()]) if parts else np.zeros(0, np.int64)
    ids, probs = predict_probs(subset(prep.decoded, wanted), state, cfg.arch, len(prep.classes),
                               preprocessing=dict(prep.preprocessing), use_gpu=cfg.use_gpu,
                               temperatures=temperatures)
    position = {int(r): i for i, r in enumerate(ids)}
    table = prep.table.set_index("row_id")
    out = {}
    for name, rows in parts.items():
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        index = np.array([position[int(r)] for r in rows], dtype=np.int64)
        empty = np.zeros((0, len(prep.classes)), np.float32)
        out[name] = Scored(rows, table.loc[rows, "label"].to_numpy(), probs[index] if len(index) else empty,
                           table.loc[rows, "group"].to_numpy())
    return out


def fit_calibration(val: Scored) -> CalibrationRecord:
    """Temperature scaling fitted on the validation predictions (T = 1 when there are none)."""
    if not len(val.labels):
        return CalibrationRecord(method="temperature", temperature=1.0, fitted_on="nothing (no validation split)")
    return cast(CalibrationRecord, calibration_record(val.probs, val.labels))


def pick_threshold(cfg: TrainConfig, prep: Prepared, labels: np.ndarray, probs: np.ndarray) -> ThresholdsRecord:
    """The validation-chosen operating point on (calibrated) probabilities, or a recorded 0.5 default."""
    if prep.positive_class is None:
        return ThresholdsRecord()
    pos = prep.classes.index(prep.positive_class)
    try:
        chosen = choose_threshold(labels == pos, probs[:, pos], target_sensitivity=cfg.target_sensitivity)
        return cast(ThresholdsRecord, chosen)
    except ValueError as exc:
        return ThresholdsRecord(positive=0.5, target_sensitivity=cfg.target_sensitivity, chosen_on="default",
                                note=str(exc))


def report(cfg: TrainConfig, prep: Prepared, scored: Scored, thresholds: ThresholdsRecord,
           temperature: float = 1.0) -> dict[str, Any]:
    """The classification report of the CALIBRATED probabilities, CIs over patients, and the ECE before/after."""
    probs = scored.calibrated(temperature)
    out = classification_report(scored.labels, probs, prep.classes, positive_class=prep.positive_class,
                                threshold=thresholds.get("positive"), n_bootstrap=cfg.n_bootstrap, seed=cfg.seed,
                                groups=scored.groups)
    out["calibration"] = {
        "temperature": float(temperature),
        "ece": expected_calibration_error(probs, scored.labels),
        "ece_uncalibrated": expected_calibration_error(scored.probs, scored.labels),
    }
    return out


def reliability_curves(scored: Scored, temperature: float) -> dict[str, dict[str, Any]]:
    """The reliability diagram's two curves for ``scored``: before and after calibration."""
    return {"before calibration": reliability(scored.probs, scored.labels),
            f"after (T = {temperature:.2f})": reliability(scored.calibrated(temperature), scored.labels)}

"""After a run: its probabilities on held-out rows, the operating point, the classification reports."""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from cxr_ray.evaluate.metrics import choose_threshold, classification_report
from cxr_ray.models.card import ThresholdsRecord
from cxr_ray.train.config import TrainConfig
from cxr_ray.train.ingest import subset
from cxr_ray.train.predict import predict_probs
from cxr_ray.train.prepare import Prepared


def predict_parts(cfg: TrainConfig, prep: Prepared, state: dict[str, Any], **parts: np.ndarray
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{part: (labels, probs)}`` for each named set of row ids, in ONE pass (one actor pool start)."""
    wanted = np.concatenate([np.asarray(v, dtype=np.int64) for v in parts.values()]) if parts else np.zeros(0, np.int64)
    ids, probs = predict_probs(subset(prep.decoded, wanted), state, cfg.arch, len(prep.classes), use_gpu=cfg.use_gpu)
    position = {int(r): i for i, r in enumerate(ids)}
    labels = prep.table.set_index("row_id")["label"]
    out = {}
    for name, rows in parts.items():
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        index = np.array([position[int(r)] for r in rows], dtype=np.int64)
        empty = np.zeros((0, len(prep.classes)), np.float32)
        out[name] = (labels.loc[rows].to_numpy(), probs[index] if len(index) else empty)
    return out


def pick_threshold(cfg: TrainConfig, prep: Prepared, labels: np.ndarray, probs: np.ndarray) -> ThresholdsRecord:
    """The validation-chosen operating point, or a recorded 0.5 default when it cannot be chosen."""
    if prep.positive_class is None:
        return ThresholdsRecord()
    pos = prep.classes.index(prep.positive_class)
    try:
        chosen = choose_threshold(labels == pos, probs[:, pos], target_sensitivity=cfg.target_sensitivity)
        return cast(ThresholdsRecord, chosen)
    except ValueError as exc:
        return ThresholdsRecord(positive=0.5, target_sensitivity=cfg.target_sensitivity, chosen_on="default",
                                note=str(exc))


def report(cfg: TrainConfig, prep: Prepared, labels: np.ndarray, probs: np.ndarray,
           thresholds: ThresholdsRecord) -> dict[str, Any]:
    return classification_report(labels, probs, prep.classes, positive_class=prep.positive_class,
                                 threshold=thresholds.get("positive"), n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)

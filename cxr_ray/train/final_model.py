"""The artifact a k-fold CV run keeps: the fold ensemble, or one model retrained on all development data.

``--final ensemble``
    The K fold models, each calibrated on its own fold's validation patients,
    as one :class:`~cxr_ray.models.ensemble.FoldEnsemble` (the mean of their
    calibrated probabilities). Nothing is trained again, and every member was
    measured on a held-out fold.

``--final retrain``
    One model trained on ALL development patients (no validation carve) for
    the median of the folds' kept epochs, with the same schedule. It has no
    validation data of its own, so its temperature is the median of the
    folds' validation-fitted temperatures.

Either way the operating threshold is the median of the folds'
validation-chosen thresholds (never one chosen on test data).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd

from cxr_ray.models.build import build_model
from cxr_ray.models.card import CalibrationRecord, EnsembleRecord, ThresholdsRecord
from cxr_ray.models.ensemble import FoldEnsemble
from cxr_ray.train.config import TrainConfig
from cxr_ray.train.epoch_state import cpu_state
from cxr_ray.train.fit import fit
from cxr_ray.train.prepare import Prepared


class FoldResult(Protocol):
    threshold: float | None
    best_epoch: int
    state: dict[str, Any]
    temperature: float


@dataclass
class FinalModel:
    state: dict[str, Any]
    calibration: CalibrationRecord
    record: dict[str, Any]  # what reports say about how it was made
    ensemble: EnsembleRecord | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def temperatures(self) -> list[float] | None:
        """Members' temperatures for prediction (ensembles), else None."""
        return None if self.ensemble is None else list(self.ensemble["temperatures"])

    @property
    def temperature(self) -> float:
        return float(self.calibration["temperature"])


def final_threshold(cfg: TrainConfig, prep: Prepared, folds: Sequence[FoldResult]) -> ThresholdsRecord:
    """The median of the folds' validation-chosen thresholds (never one chosen on test data)."""
    chosen = [f.threshold for f in folds if f.threshold is not None]
    if prep.positive_class is None:
        return ThresholdsRecord()
    if not chosen:
        return ThresholdsRecord(positive=0.5, chosen_on="default",
                                note="no fold could choose a threshold on its validation split")
    return ThresholdsRecord(positive=float(statistics.median(chosen)), target_sensitivity=cfg.target_sensitivity,
                            chosen_on="validation",
                            method=f"median of the {len(chosen)} folds' validation-chosen thresholds", per_fold=chosen)


def ensemble_of(cfg: TrainConfig, prep: Prepared, folds: Sequence[FoldResult], dev: pd.DataFrame,
                thresholds: ThresholdsRecord) -> FinalModel:
    temperatures = [f.temperature for f in folds]
    members = []
    for fold in folds:
        member = build_model(cfg.arch, len(prep.classes))
        member.load_state_dict(fold.state)
        members.append(member)
    ensemble = EnsembleRecord(members=len(folds), temperatures=temperatures,
                              combine="mean of the members' calibrated probabilities",
                              trained_on="fold i's member: the development patients outside fold i, minus its "
                                         "validation carve")
    calibration = CalibrationRecord(method="temperature", temperature=1.0, per_fold=temperatures,
                                    fitted_on="each member on its own fold's validation patients (inside the graph)")
    record = {
        "trained_on": f"the {len(folds)} fold models (an ensemble: mean of calibrated probabilities)",
        "images": int(len(dev)), "patients": int(dev["group"].nunique()),
        "epochs": [f.best_epoch for f in folds], "thresholds": thresholds,
    }
    return FinalModel(cpu_state(FoldEnsemble(members, temperatures)), calibration, record, ensemble)


def retrained(cfg: TrainConfig, prep: Prepared, folds: Sequence[FoldResult], dev: pd.DataFrame,
              thresholds: ThresholdsRecord, *, name: str, fingerprint: str) -> FinalModel:
    best_epochs = [f.best_epoch for f in folds]
    epochs = max(1, int(round(statistics.median(best_epochs))))
    final = fit(cfg, prep, dev["row_id"].to_numpy(), None, name=name, label="final", fingerprint=fingerprint,
                epochs=epochs)
    temperatures = [f.temperature for f in folds]
    calibration = CalibrationRecord(method="temperature", temperature=float(statistics.median(temperatures)),
                                    per_fold=temperatures,
                                    fitted_on="median of the folds' validation-fitted temperatures")
    record = {
        "trained_on": "all development (non-test) images: every fold, no validation carve",
        "images": int(len(dev)), "patients": int(dev["group"].nunique()),
        "epochs": epochs, "epochs_rule": f"median of the folds' kept epochs {best_epochs}",
        "thresholds": thresholds, "run": final.record(),
    }
    return FinalModel(final.best_state, calibration, record, None, final.history)

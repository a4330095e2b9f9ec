"""Evaluate a model artifact on a labelled set: metrics.json, predictions.csv and plots
(ROC, confusion matrix, and ``heatmaps.png``: Grad-CAM on a few images per class).

The data are listed, decoded and preprocessed exactly as for training
(:mod:`cxr_ray.train.ingest`, the artifact's own preprocessing), predicted on
the cluster (:mod:`cxr_ray.train.predict`) and scored with
:func:`cxr_ray.evaluate.metrics.classification_report` at the artifact's
operating threshold (the one chosen on validation data at training time).
``metrics.json["report"]`` is exactly that report of the probabilities in
``predictions.csv``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from cxr_ray.data.labelled import grouping_key, read_labelled
from cxr_ray.data.splits import patient_groups
from cxr_ray.engines.tta import check_views
from cxr_ray.errors import UsageError
from cxr_ray.evaluate.calibration import expected_calibration_error, reliability
from cxr_ray.evaluate.metrics import classification_report
from cxr_ray.evaluate.report import (
    ReportFigures,
    headline,
    pick_samples,
    report_directory,
    write_report,
)
from cxr_ray.models.artifact import ensemble_temperatures, load_model
from cxr_ray.models.card import Decisions, ModelCard
from cxr_ray.train.ingest import decode_dataset, deterministic_order, subset
from cxr_ray.train.predict import predict_probs
from cxr_ray.train.prepare import label_frame, undecodable_report


def _decode_and_predict(frame: pd.DataFrame, model: nn.Module, card: ModelCard, data: str, *,
                        s3_endpoint: str | None, use_gpu: bool, batch_size: int, tta: int
                        ) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]:
    """(decodable rows, undecodable rows, predicted row ids, their probabilities), on the cluster."""
    frame = label_frame(frame.reset_index(drop=True), list(card.classes))
    with deterministic_order():
        decoded, meta = decode_dataset(frame, dict(card.preprocessing), s3_endpoint=s3_endpoint,
                                       pseudonym_key=grouping_key())
    frame = frame.merge(meta[["row_id", "status", "error_code", "patient_pseudonym"]], on="row_id")
    ok, bad = frame[frame["status"] == "ok"], frame[frame["status"] != "ok"]
    if ok.empty:
        raise UsageError(f"{data}: none of the {len(frame)} files could be decoded")
    row_ids, probs = predict_probs(subset(decoded, ok["row_id"].to_numpy()), model.state_dict(), card.arch,
                                   len(card.classes), preprocessing=dict(card.preprocessing), use_gpu=use_gpu,
                                   batch_size=batch_size, temperatures=ensemble_temperatures(card), tta=tta)
    return ok, bad, row_ids, probs


def _predictions(rows: pd.DataFrame, card: ModelCard, decisions: Decisions) -> pd.DataFrame:
    """``predictions.csv``: path, label, prob_<class>, predicted_label (and score, flagged)."""
    predictions = pd.DataFrame({"path": rows["path"].to_numpy(), "label": rows["label_name"].to_numpy()})
    for i, name in enumerate(card.classes):
        predictions[f"prob_{name}"] = decisions.probabilities[:, i]
    predictions["predicted_label"] = decisions.labels
    if decisions.scores is not None:
        predictions["score"] = decisions.scores
        predictions["flagged"] = decisions.flagged
    return predictions


def _scored_report(card: ModelCard, labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray,
                   groups: np.ndarray, *, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """The classification report of calibrated probabilities (CIs over patients) with the ECE before/after."""
    report = classification_report(labels, calibrated, list(card.classes), positive_class=card.positive_class,
                                   threshold=card.threshold if card.positive_class else None,
                                   n_bootstrap=n_bootstrap, seed=seed, groups=groups)
    report["calibration"] = {"temperature": card.temperature,
                             "ece": expected_calibration_error(calibrated, labels),
                             "ece_uncalibrated": expected_calibration_error(raw, labels)}
    return report


def _by_group(rows: pd.DataFrame, card: ModelCard, labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray,
              groups: np.ndarray, column: str, *, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Per value of a manifest column: n, the binary (or multi-class) figures with patient-level CIs.

    Differences between sources are the first sign that a model learned
    where a film came from rather than what it shows.
    """
    out: dict[str, Any] = {}
    values = rows[column].fillna("").astype(str).to_numpy()
    for value in sorted(set(values)):
        mask = values == value
        report = _scored_report(card, labels[mask], raw[mask], calibrated[mask], groups[mask],
                                n_bootstrap=n_bootstrap, seed=seed)
        out[value or "(blank)"] = {"n": int(mask.sum()), "patients": int(len(set(groups[mask]))),
                                   **{k: report.get(k) for k in ("accuracy", "balanced_accuracy", "ci95")},
                                   "binary": report.get("binary"),
                                   "per_class": {c: {k: v[k] for k in ("sensitivity", "specificity", "auc", "support")}
                                                 for c, v in report["per_class"].items()},
                                   "ece": report["calibration"]["ece"]}
    return out


def _patient_groups(rows: pd.DataFrame) -> np.ndarray:
    """The bootstrap's units: manifest patient ids, else DICOM patient pseudonyms, else one file each."""
    groups, _ = patient_groups(rows.reset_index())
    return groups.to_numpy()


def evaluate_artifact(
    model_uri: str,
    data: str,
    out: str,
    *,
    s3_endpoint: str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    use_gpu: bool = False,
    batch_size: int = 64,
    group_by: list[str] | None = None,
    tta: int = 1,
) -> dict[str, Any]:
    """Metrics, predictions and plots of the artifact at ``model_uri`` on the labelled set ``data``, at ``out``."""
    started = time.perf_counter()
    check_views(tta)
    model, card = load_model(model_uri, s3_endpoint=s3_endpoint)
    source = read_labelled(data, s3_endpoint=s3_endpoint, classes=list(card.classes), keep_columns=group_by)
    ok, bad, row_ids, raw = _decode_and_predict(source.frame, model, card, data, s3_endpoint=s3_endpoint,
                                                use_gpu=use_gpu, batch_size=batch_size, tta=tta)
    rows = ok.set_index("row_id").loc[row_ids]
    labels, groups = rows["label"].to_numpy(), _patient_groups(rows)
    decisions = card.decide(raw)
    report = _scored_report(card, labels, raw, decisions.probabilities, groups, n_bootstrap=n_bootstrap, seed=seed)
    by_group = {column: _by_group(rows, card, labels, raw, decisions.probabilities, groups, column,
                                  n_bootstrap=n_bootstrap, seed=seed) for column in group_by or []}
    undecodable = undecodable_report(bad)
    undecodable_counts = {k: undecodable[k] for k in ("count", "by_code")}
    document: dict[str, Any] = {
        "report": report,
        "by_group": by_group,
        "tta_views": tta,
        "model": {"uri": model_uri, "name": card.name, "version": card.version, "arch": card.arch,
                  "classes": list(card.classes), "positive_class": card.positive_class,
                  "threshold": card.threshold if card.positive_class else None, "thresholds": card.thresholds,
                  "calibration": card.calibration, "ensemble": card.ensemble},
        "data": {"source": data, "listing": source.report, "evaluated": int(len(ok)),
                 "patients": int(len(set(groups))), "undecodable": undecodable_counts},
    }
    with report_directory(out, s3_endpoint, prefix="cxr-evaluate-") as local:
        _predictions(rows, card, decisions).to_csv(os.path.join(local, "predictions.csv"), index=False,
                                                   float_format="%.9g")
        figures = ReportFigures(labels=labels, probs=decisions.probabilities, confusion=report["confusion_matrix"],
                                reliability={"before calibration": reliability(raw, labels),
                                             f"after (T = {card.temperature:.2f})":
                                                 reliability(decisions.probabilities, labels)})
        document, files = write_report(
            local, document, model=model, card=card, figures=figures,
            heatmap_samples=("evaluated images", pick_samples(rows.reset_index(), list(card.classes))),
            s3_endpoint=s3_endpoint,
        )
    return {
        "out": out, "model": {"name": card.name, "version": card.version}, "evaluated": int(len(ok)),
        "undecodable": undecodable_counts, "metrics": headline(report),
        "ece": {k: report["calibration"][k] for k in ("ece_uncalibrated", "ece")},
        "by_group": {column: {value: {k: v.get(k) for k in ("n", "balanced_accuracy", "binary")}
                              for value, v in groups_.items()} for column, groups_ in by_group.items()},
        "tta_views": tta, "files": ["predictions.csv", *files], "seconds": round(time.perf_counter() - started, 2),
    }

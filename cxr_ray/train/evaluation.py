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
from cxr_ray.errors import UsageError
from cxr_ray.evaluate.metrics import classification_report
from cxr_ray.evaluate.report import (
    HEATMAP_GRID_FILE,
    ReportFigures,
    headline,
    pick_samples,
    report_directory,
    write_report,
)
from cxr_ray.models.artifact import load_model
from cxr_ray.models.card import Decisions, ModelCard
from cxr_ray.train.ingest import decode_dataset, deterministic_order, subset
from cxr_ray.train.predict import predict_probs
from cxr_ray.train.prepare import label_frame, undecodable_report


def _decode_and_predict(frame: pd.DataFrame, model: nn.Module, card: ModelCard, data: str, *,
                        s3_endpoint: str | None, use_gpu: bool, batch_size: int
                        ) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]:
    """(decodable rows, undecodable rows, predicted row ids, their probabilities), on the cluster."""
    frame = label_frame(frame.reset_index(drop=True), list(card.classes))
    with deterministic_order():
        decoded, meta = decode_dataset(frame, dict(card.preprocessing), s3_endpoint=s3_endpoint,
                                       pseudonym_key=grouping_key())
    frame = frame.merge(meta[["row_id", "status", "error_code"]], on="row_id")
    ok, bad = frame[frame["status"] == "ok"], frame[frame["status"] != "ok"]
    if ok.empty:
        raise UsageError(f"{data}: none of the {len(frame)} files could be decoded")
    row_ids, probs = predict_probs(subset(decoded, ok["row_id"].to_numpy()), model.state_dict(), card.arch,
                                   len(card.classes), use_gpu=use_gpu, batch_size=batch_size)
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
) -> dict[str, Any]:
    """Metrics, predictions and plots of the artifact at ``model_uri`` on the labelled set ``data``, at ``out``."""
    started = time.perf_counter()
    model, card = load_model(model_uri, s3_endpoint=s3_endpoint)
    source = read_labelled(data, s3_endpoint=s3_endpoint, classes=list(card.classes))
    ok, bad, row_ids, probs = _decode_and_predict(source.frame, model, card, data, s3_endpoint=s3_endpoint,
                                                  use_gpu=use_gpu, batch_size=batch_size)
    rows = ok.set_index("row_id").loc[row_ids]
    labels = rows["label"].to_numpy()
    threshold = card.threshold if card.positive_class else None
    decisions = card.decide(probs)
    report = classification_report(labels, decisions.probabilities, list(card.classes),
                                   positive_class=card.positive_class, threshold=threshold,
                                   n_bootstrap=n_bootstrap, seed=seed)
    predictions = _predictions(rows, card, decisions)
    undecodable = undecodable_report(bad)
    document = {
        "report": report,
        "model": {"uri": model_uri, "name": card.name, "version": card.version, "arch": card.arch,
                  "classes": list(card.classes), "positive_class": card.positive_class,
                  "threshold": threshold, "thresholds": card.thresholds},
        "data": {
            "source": data,
            "listing": source.report,
            "evaluated": int(len(ok)),
            "undecodable": {k: undecodable[k] for k in ("count", "by_code")},
        },
    }
    with report_directory(out, s3_endpoint, prefix="cxr-evaluate-") as local:
        predictions.to_csv(os.path.join(local, "predictions.csv"), index=False, float_format="%.9g")
        document, _ = write_report(
            local, document, model=model, card=card,
            figures=ReportFigures(labels=labels, probs=decisions.probabilities, confusion=report["confusion_matrix"]),
            heatmap_samples=("evaluated images", pick_samples(rows.reset_index(), list(card.classes))),
            s3_endpoint=s3_endpoint,
        )
    return {
        "out": out,
        "model": {"name": card.name, "version": card.version},
        "evaluated": int(len(ok)),
        "undecodable": document["data"]["undecodable"],
        "metrics": headline(report),
        "files": ["metrics.json", "predictions.csv", "roc.png", "confusion.png"]
        + ([] if "error" in document["heatmaps"] else [HEATMAP_GRID_FILE]),
        "seconds": round(time.perf_counter() - started, 2),
    }

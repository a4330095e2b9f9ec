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

import json
import logging
import os
import tempfile
import time

import numpy as np
import pandas as pd

from cxr_ray.errors import UsageError

log = logging.getLogger(__name__)

HEATMAP_GRID_FILE = "heatmaps.png"
HEATMAPS_PER_CLASS = 2  # a handful of images: Grad-CAM costs a backward pass each
GRID_DECODE_SIZE = 512  # decode hint for grid images: a figure cell is ~260 px wide


def pick_samples(frame: pd.DataFrame, classes: list[str], per_class: int = HEATMAPS_PER_CLASS) -> list[tuple[str, str]]:
    """``(path, class)`` of the first ``per_class`` rows of each class (by ``row_id`` when present):
    the same images every time for the same data."""
    if "row_id" in frame.columns:
        frame = frame.sort_values("row_id")
    out: list[tuple[str, str]] = []
    for name in classes:
        rows = frame[frame["label_name"] == name].head(per_class)
        out += [(str(path), name) for path in rows["path"]]
    return out


def write_heatmap_grid(
    model,
    card,
    samples: list[tuple[str, str]],
    path: str,
    *,
    what: str,
    s3_endpoint: str | None = None,
    per_class: int = HEATMAPS_PER_CLASS,
) -> dict:
    """``heatmaps.png`` for a report: Grad-CAM of the predicted class on ``samples`` (a row per
    class, each panel titled with its true and predicted class); ``what`` says which images
    they are (figure title, and ``images`` in the returned record).

    A report is worth having without it: any failure is logged as a warning and returned as
    ``{"error": ...}``, never raised. An image that no longer decodes is left out.
    """
    from cxr_ray.explain.overlay import heatmap_grid
    from cxr_ray.io.decode import decode_image
    from cxr_ray.io.storage import read_bytes

    try:
        images = []
        for uri, label in samples:
            try:
                data = read_bytes(uri, s3_endpoint=s3_endpoint)
                target = max(GRID_DECODE_SIZE, card.image_size)
                images.append((decode_image(data, os.path.basename(uri), target_size=target).pixels, label))
            except Exception as exc:  # noqa: BLE001 - one unreadable image: a gap in the grid
                log.warning("heatmap grid: an image was left out (%s)", type(exc).__name__)
        if not images:
            raise ValueError(f"none of the {len(samples)} sample images could be read")
        summary = heatmap_grid(model, card, images, path, method="gradcam", per_class=per_class,
                               target="predicted", title=f"{card.name} ({card.arch}): Grad-CAM of the predicted class, {what}")
    except Exception as exc:  # noqa: BLE001 - the grid is optional; the report is not
        log.warning("heatmap grid not written: %s: %s", type(exc).__name__, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"file": HEATMAP_GRID_FILE, "method": "gradcam", "target": "predicted class", "images": what,
            "per_class": summary["per_class"], "cells": summary["cells"]}


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
) -> dict:
    from cxr_ray.data.labelled import grouping_key, read_labelled
    from cxr_ray.evaluate.metrics import classification_report
    from cxr_ray.evaluate.plots import plot_confusion, plot_roc
    from cxr_ray.io.storage import get_filesystem, is_remote
    from cxr_ray.models.artifact import load_model
    from cxr_ray.train.ingest import decode_dataset, deterministic_order, subset
    from cxr_ray.train.predict import predict_probs

    started = time.perf_counter()
    model, card = load_model(model_uri, s3_endpoint=s3_endpoint)
    source = read_labelled(data, s3_endpoint=s3_endpoint, classes=list(card.classes))
    frame = source.frame.reset_index(drop=True)
    frame["row_id"] = np.arange(len(frame), dtype=np.int64)
    frame["label_name"] = frame["label"]
    frame["label"] = frame["label_name"].map({c: i for i, c in enumerate(card.classes)}).astype(np.int64)
    with deterministic_order():
        decoded, meta = decode_dataset(frame, card.preprocessing, s3_endpoint=s3_endpoint, pseudonym_key=grouping_key())
    frame = frame.merge(meta[["row_id", "status", "error_code"]], on="row_id")
    ok = frame[frame["status"] == "ok"]
    bad = frame[frame["status"] != "ok"]
    if ok.empty:
        raise UsageError(f"{data}: none of the {len(frame)} files could be decoded")
    state = model.state_dict()
    row_ids, probs = predict_probs(subset(decoded, ok["row_id"].to_numpy()), state, card.arch, len(card.classes),
                                   use_gpu=use_gpu, batch_size=batch_size)
    rows = ok.set_index("row_id").loc[row_ids]
    labels = rows["label"].to_numpy()
    threshold = card.threshold if card.positive_class else None
    report = classification_report(labels, probs, list(card.classes), positive_class=card.positive_class,
                                   threshold=threshold, n_bootstrap=n_bootstrap, seed=seed)

    predictions = pd.DataFrame({"path": rows["path"].to_numpy(), "label": rows["label_name"].to_numpy()})
    for i, name in enumerate(card.classes):
        predictions[f"prob_{name}"] = probs[:, i]
    predictions["predicted_label"] = [card.classes[i] for i in probs.argmax(1)]
    if card.positive_class:
        predictions["score"] = probs[:, card.positive_index]
        predictions["flagged"] = predictions["score"] >= card.threshold

    document = {
        "report": report,
        "model": {"uri": model_uri, "name": card.name, "version": card.version, "arch": card.arch,
                  "classes": list(card.classes), "positive_class": card.positive_class,
                  "threshold": threshold, "thresholds": card.thresholds},
        "data": {
            "source": data,
            "listing": source.report,
            "evaluated": int(len(ok)),
            "undecodable": {"count": int(len(bad)),
                            "by_code": {str(k): int(v) for k, v in bad["error_code"].value_counts().sort_index().items()}},
        },
    }
    remote = is_remote(out)
    local = tempfile.mkdtemp(prefix="cxr-evaluate-") if remote else os.path.abspath(os.path.expanduser(out))
    os.makedirs(local, exist_ok=True)
    document["heatmaps"] = write_heatmap_grid(model, card, pick_samples(rows.reset_index(), list(card.classes)),
                                              os.path.join(local, HEATMAP_GRID_FILE), what="evaluated images",
                                              s3_endpoint=s3_endpoint)
    with open(os.path.join(local, "metrics.json"), "w") as handle:
        json.dump(document, handle, indent=2, sort_keys=True)
    predictions.to_csv(os.path.join(local, "predictions.csv"), index=False, float_format="%.9g")
    plot_roc(labels, probs, list(card.classes), os.path.join(local, "roc.png"))
    plot_confusion(report["confusion_matrix"], list(card.classes), os.path.join(local, "confusion.png"))
    if remote:
        import shutil

        fs, root = get_filesystem(out, s3_endpoint)
        fs.put(local.rstrip("/") + "/", root.rstrip("/") + "/", recursive=True)
        shutil.rmtree(local, ignore_errors=True)

    from cxr_ray.train.runner import headline

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

"""Evaluate a model artifact on a labelled set: metrics.json, predictions.csv and plots.

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
import os
import tempfile
import time

import numpy as np
import pandas as pd

from cxr_ray.errors import UsageError


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
    from cxr_ray.artifact import load_model
    from cxr_ray.data.labelled import grouping_key, read_labelled
    from cxr_ray.evaluate.metrics import classification_report
    from cxr_ray.evaluate.plots import plot_confusion, plot_roc
    from cxr_ray.io.storage import get_filesystem, is_remote
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
        "files": ["metrics.json", "predictions.csv", "roc.png", "confusion.png"],
        "seconds": round(time.perf_counter() - started, 2),
    }

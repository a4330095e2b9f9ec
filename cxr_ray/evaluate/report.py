"""The one report writer: ``metrics.json``, ROC / confusion / training-curve plots and ``heatmaps.png``.

Training (every run and the cross-validation final model) and ``cxr-ray
evaluate`` write their reports through :func:`write_report`, so the files, their
names and the headline numbers a person reads first are the same everywhere.
Reports go to a local directory or an ``s3://`` prefix (:func:`report_directory`
writes locally and uploads at the end).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from cxr_ray.errors import DecodeError
from cxr_ray.evaluate.plots import plot_confusion, plot_reliability, plot_roc, plot_training_curves
from cxr_ray.explain.grid import heatmap_grid
from cxr_ray.io.inputs import InputPolicy, load_input
from cxr_ray.io.storage import get_filesystem, is_remote
from cxr_ray.models.card import ModelCard

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
HEATMAP_GRID_FILE = "heatmaps.png"
RELIABILITY_FILE = "reliability.png"
HEATMAPS_PER_CLASS = 2  # a handful of images: Grad-CAM costs a backward pass each
GRID_DECODE_SIZE = 512  # decode hint for grid images: a figure cell is ~260 px wide
HEADLINE_METRICS = (
    "accuracy", "balanced_accuracy", "macro_auc", "binary.sensitivity", "binary.specificity", "binary.auc",
)


# --------------------------------------------------------------------------- the numbers read first


def headline(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The few numbers a person reads first."""
    if not report:
        return None
    out = {k: report.get(k) for k in ("n", "accuracy", "balanced_accuracy", "macro_auc")}
    if "ci95" in report:
        out["ci95"] = report["ci95"]
    if "binary" in report:
        b = report["binary"]
        out["binary"] = {k: b.get(k) for k in ("positive_class", "threshold", "sensitivity", "specificity", "auc")}
    return out


def mean_std_table(summary: dict[str, Any]) -> dict[str, Any]:
    """``{metric: {"mean", "std"}}`` for the headline metrics and every per-class sensitivity/specificity."""
    out = {}
    for name, value in summary["metrics"].items():
        if name in HEADLINE_METRICS or name.endswith((".sensitivity", ".specificity")):
            out[name] = {"mean": value["mean"], "std": value["std"]}
    return out


# --------------------------------------------------------------------------- heatmaps.png


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
    model: nn.Module,
    card: ModelCard,
    samples: list[tuple[str, str]],
    path: str,
    *,
    what: str,
    s3_endpoint: str | None = None,
    per_class: int = HEATMAPS_PER_CLASS,
) -> dict[str, Any]:
    """``heatmaps.png`` for a report: Grad-CAM of the predicted class on ``samples`` (a row per
    class, each panel titled with its true and predicted class); ``what`` says which images
    they are (figure title, and ``images`` in the returned record).

    A report is worth having without it: any failure is logged as a warning and returned as
    ``{"error": ...}``, never raised. An image that no longer decodes is left out.
    """
    reading = InputPolicy(target_size=max(GRID_DECODE_SIZE, card.image_size), s3_endpoint=s3_endpoint)
    try:
        images = []
        for uri, label in samples:
            try:
                images.append((load_input(uri, reading).image.pixels, label))
            except DecodeError as exc:  # one unreadable image: a gap in the grid
                log.warning("heatmap grid: an image was left out (%s)", exc.code)
        if not images:
            raise ValueError(f"none of the {len(samples)} sample images could be read")
        summary = heatmap_grid(model, card, images, path, method="gradcam", per_class=per_class,
                               target="predicted", title=f"{card.name} ({card.arch}): Grad-CAM of the predicted class, {what}")
    except Exception as exc:  # noqa: BLE001 - the grid is optional; the report is not
        log.warning("heatmap grid not written: %s: %s", type(exc).__name__, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"file": HEATMAP_GRID_FILE, "method": "gradcam", "target": "predicted class", "images": what,
            "per_class": summary["per_class"], "cells": summary["cells"]}


# --------------------------------------------------------------------------- files


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json(path: str, content: dict[str, Any]) -> None:
    """Pretty, sorted JSON written atomically (numpy values allowed)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(content, handle, indent=2, sort_keys=True, default=_json_default)
    os.replace(tmp, path)


@contextlib.contextmanager
def report_directory(out: str, s3_endpoint: str | None = None, *, prefix: str = "cxr-report-") -> Iterator[str]:
    """A local directory to write ``out``'s files into: ``out`` itself, or (s3://) a temporary one
    uploaded to ``out`` when the block succeeds."""
    if not is_remote(out):
        local = os.path.abspath(os.path.expanduser(out))
        os.makedirs(local, exist_ok=True)
        yield local
        return
    local = tempfile.mkdtemp(prefix=prefix)
    try:
        yield local
        fs, root = get_filesystem(out, s3_endpoint)
        fs.put(local.rstrip("/") + "/", root.rstrip("/") + "/", recursive=True)
    finally:
        shutil.rmtree(local, ignore_errors=True)


@dataclass
class ReportFigures:
    """What the plots show: the scored cases (labels, probabilities, confusion) and the training history."""

    labels: np.ndarray | None = None
    probs: np.ndarray | None = None
    confusion: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    # reliability diagrams: {"before calibration": reliability record, "after": ...}
    reliability: dict[str, dict[str, Any]] | None = None


def write_report(
    local: str,
    metrics_doc: dict[str, Any],
    *,
    model: nn.Module,
    card: ModelCard,
    figures: ReportFigures,
    heatmap_samples: tuple[str, list[tuple[str, str]]] | None = None,
    extra_files: dict[str, dict[str, Any]] | None = None,
    text_files: dict[str, str] | None = None,
    s3_endpoint: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """``metrics.json`` (``metrics_doc`` plus the heatmap record), extra JSON and text files (the
    CV tables), the plots and ``heatmaps.png`` in ``local``; returns the document written and the
    file names, in order.

    ``heatmap_samples``: ``(what they are, [(path, class), ...])``; when the grid cannot be
    drawn, ``metrics.json["heatmaps"]["error"]`` says why and the report is still written.
    """
    doc = dict(metrics_doc)
    if heatmap_samples is not None:
        what, samples = heatmap_samples
        doc["heatmaps"] = write_heatmap_grid(model, card, samples, os.path.join(local, HEATMAP_GRID_FILE),
                                             what=what, s3_endpoint=s3_endpoint)
    write_json(os.path.join(local, METRICS_FILE), doc)
    files = [METRICS_FILE]
    for filename, content in (extra_files or {}).items():
        write_json(os.path.join(local, filename), content)
        files.append(filename)
    for filename, text in (text_files or {}).items():
        with open(os.path.join(local, filename), "w") as handle:
            handle.write(text)
        files.append(filename)
    files += _write_plots(local, card.classes, figures)
    if "error" not in doc.get("heatmaps", {"error": None}):
        files.append(HEATMAP_GRID_FILE)
    return doc, files


def _write_plots(local: str, classes: list[str], figures: ReportFigures) -> list[str]:
    files = []
    if figures.history:
        files.append(os.path.basename(plot_training_curves(figures.history, os.path.join(local, "training_curves.png"))))
    if figures.labels is not None and figures.probs is not None and len(figures.labels) and figures.confusion is not None:
        files.append(os.path.basename(plot_roc(figures.labels, figures.probs, classes, os.path.join(local, "roc.png"))))
        files.append(os.path.basename(plot_confusion(figures.confusion, classes, os.path.join(local, "confusion.png"))))
    if figures.reliability:
        files.append(os.path.basename(plot_reliability(figures.reliability, os.path.join(local, RELIABILITY_FILE))))
    return files

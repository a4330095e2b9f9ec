"""The two training protocols, sharing one tail: data -> splits -> Ray Train run(s) -> threshold -> metrics -> artifact.

One run (``folds=0``)
    Patients are split train / validation / test (``test_fraction``, then
    ``val_fraction``; stratified, patient-level). The model of the best
    validation epoch (``monitor``; early stopping after ``patience`` epochs
    without improvement) is kept, its operating threshold is chosen on the
    validation split (:func:`choose_threshold`, ``target_sensitivity``) and
    its metrics are measured on the test split with that threshold.

k-fold CV (``folds=K``)
    A test split is held out first (``test_fraction``; 0 = none). The other
    patients (the *development* set) are split into K stratified patient-level
    folds; run *i* tests on fold *i*, trains on the other folds minus a
    patient-level validation carve (``val_fraction`` of them) that picks its
    best epoch and threshold. ``cv_summary.json`` holds every fold's test
    report and mean ± std (:func:`summarize_folds`).

    The **final model** (the artifact) is trained on ALL development patients
    (every non-test image, no validation carve) for the median of the folds'
    best epochs, with the same schedule; its threshold is the median of the
    folds' validation-chosen thresholds (never chosen on test data); its
    metrics are measured on the held-out test split (none when
    ``test_fraction=0``).

Both end in :func:`_finish`: the artifact, ``metrics.json`` and plots
(:func:`cxr_ray.evaluate.report.write_report`) and the JSON summary.
Duplicates: byte-identical files (same sha256) are reported; one copy is
kept, in the split that trains first (so no evaluation split holds an image a
model trained on).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cxr_ray.data.splits import (
    carve,
    check_disjoint,
    data_fingerprint,
    deduplicate,
    kfold_assign,
    train_val_test_split,
)
from cxr_ray.evaluate.metrics import summarize_folds
from cxr_ray.evaluate.report import (
    ReportFigures,
    headline,
    mean_std_table,
    pick_samples,
    report_directory,
    write_report,
)
from cxr_ray.models.artifact import save_artifact
from cxr_ray.models.build import build_model
from cxr_ray.models.card import ModelCard, ThresholdsRecord, new_card
from cxr_ray.train.config import TrainConfig
from cxr_ray.train.drift import validation_fingerprint
from cxr_ray.train.fit import FitOutcome, fit
from cxr_ray.train.ingest import deterministic_order
from cxr_ray.train.prepare import Prepared, log, prepare, split_sizes
from cxr_ray.train.scoring import pick_threshold, predict_parts, report


@dataclass
class RunResult:
    """What a protocol hands the shared tail: the model to keep and what to say about it."""

    state: dict[str, Any]
    thresholds: ThresholdsRecord
    test_report: dict[str, Any] | None
    figures: ReportFigures
    heatmap_samples: tuple[str, list[tuple[str, str]]]
    duplicates: dict[str, Any]
    fingerprint: str
    sizes_key: str  # "splits" (one run) | "partitions" (CV)
    sizes: dict[str, Any]
    card_metrics: dict[str, Any] = field(default_factory=dict)  # besides "test"
    metrics_doc: dict[str, Any] = field(default_factory=dict)  # besides test, thresholds, data
    training: dict[str, Any] = field(default_factory=dict)  # besides config, init, data
    summary: dict[str, Any] = field(default_factory=dict)  # besides artifact, test, data, files
    extra_files: dict[str, dict[str, Any]] = field(default_factory=dict)
    validation: tuple[np.ndarray, np.ndarray] | None = None  # (row ids, probs): the drift fingerprint's data


def _fingerprinted(cfg: TrainConfig, prep: Prepared, table: pd.DataFrame, column: str, order: list[str]
                   ) -> tuple[pd.DataFrame, dict[str, Any], str]:
    """De-duplicated, leak-checked table (stored in ``prep``), the duplicate report and the data fingerprint."""
    table, duplicates = deduplicate(table, column, order)
    check_disjoint(table, column)
    prep.table = table
    if duplicates["duplicate_sets"]:
        log(f"duplicates: {duplicates['duplicate_sets']} set(s) of byte-identical files "
            f"({duplicates['across_splits']} across splits); removed {duplicates['files_removed']}", cfg)
    return table, duplicates, data_fingerprint(table["sha256"], table["label_name"])


def _samples(prep: Prepared, row_ids: np.ndarray, what: str) -> tuple[str, list[tuple[str, str]]]:
    """``(what, [(path, class), ...])``: the first images of each class among ``row_ids``."""
    rows = prep.table[prep.table["row_id"].isin(np.asarray(row_ids, dtype=np.int64))]
    return what, pick_samples(rows, prep.classes)


# --------------------------------------------------------------------------- one run


def run_single(cfg: TrainConfig, prep: Prepared) -> dict[str, Any]:
    table = prep.table
    table["split"] = train_val_test_split(table, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                                          seed=cfg.seed)
    table, duplicates, fingerprint = _fingerprinted(cfg, prep, table, "split", ["train", "val", "test"])
    ids = {s: table.loc[table["split"] == s, "row_id"].to_numpy() for s in ("train", "val", "test")}
    name = cfg.run_name or cfg.default_run_name()
    outcome = fit(cfg, prep, ids["train"], ids["val"], name=name, label="train", fingerprint=fingerprint)

    predicted = predict_parts(cfg, prep, outcome.best_state, val=ids["val"], test=ids["test"])
    val_labels, val_probs = predicted["val"]
    thresholds = pick_threshold(cfg, prep, val_labels, val_probs)
    val_report = report(cfg, prep, val_labels, val_probs, thresholds)
    test_report, scored = None, (val_labels, val_probs, val_report)
    if len(ids["test"]):
        test_labels, test_probs = predicted["test"]
        test_report = report(cfg, prep, test_labels, test_probs, thresholds)
        scored = (test_labels, test_probs, test_report)
    run = outcome.record()
    splits = split_sizes(table, "split", prep.classes)
    return _finish(cfg, prep, RunResult(
        state=outcome.best_state, thresholds=thresholds, test_report=test_report,
        figures=ReportFigures(labels=scored[0], probs=scored[1], confusion=scored[2]["confusion_matrix"],
                              history=outcome.history),
        heatmap_samples=_samples(prep, ids["val"], "validation images"),
        duplicates=duplicates, fingerprint=fingerprint, sizes_key="splits", sizes=splits,
        card_metrics={"val": headline(val_report)},
        metrics_doc={"val": val_report, "history": outcome.history, "run": run},
        training={"run": run, "splits": splits},
        summary={"thresholds": thresholds, "val": headline(val_report), "run": run},
        validation=(np.sort(ids["val"]), val_probs),
    ))


# --------------------------------------------------------------------------- k-fold


@dataclass
class _Fold:
    record: dict[str, Any]
    report: dict[str, Any]
    threshold: float | None  # validation-chosen, else None
    best_epoch: int
    validation: tuple[np.ndarray, np.ndarray]  # (sorted val row ids, their probs)


def _run_fold(cfg: TrainConfig, prep: Prepared, dev: pd.DataFrame, i: int, base: str, fingerprint: str) -> _Fold:
    held = dev[dev["partition"] == f"fold{i}"]
    rest = dev[dev["partition"] != f"fold{i}"]
    val_mask = carve(rest["label"].to_numpy(), rest["group"].to_numpy(), cfg.val_fraction, cfg.seed + 1 + i,
                     "validation")
    train_ids, val_ids = rest["row_id"].to_numpy()[~val_mask], rest["row_id"].to_numpy()[val_mask]
    outcome = fit(cfg, prep, train_ids, val_ids, name=f"{base}-fold{i}", label=f"fold {i + 1}/{cfg.folds}",
                  fingerprint=fingerprint)
    predicted = predict_parts(cfg, prep, outcome.best_state, val=val_ids, test=held["row_id"].to_numpy())
    thresholds = pick_threshold(cfg, prep, *predicted["val"])
    fold_report = report(cfg, prep, *predicted["test"], thresholds)
    log(f"[fold {i + 1}/{cfg.folds}] test accuracy {fold_report['accuracy']:.4f} balanced "
        f"{fold_report['balanced_accuracy']:.4f} (best epoch {outcome.best_epoch})", cfg)
    record = {
        "fold": i,
        "sizes": {"train": int(len(train_ids)), "val": int(len(val_ids)), "test": int(len(held)),
                  "test_patients": int(held["group"].nunique())},
        "thresholds": thresholds,
        "run": outcome.record(),
        "history": outcome.history,
        "test": fold_report,
    }
    chosen = thresholds["positive"] if thresholds.get("chosen_on") == "validation" else None
    return _Fold(record, fold_report, chosen, outcome.best_epoch, (np.sort(val_ids), predicted["val"][1]))


def _final_threshold(cfg: TrainConfig, prep: Prepared, folds: list[_Fold]) -> ThresholdsRecord:
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


def _cv_partitions(cfg: TrainConfig, prep: Prepared) -> tuple[pd.DataFrame, dict[str, Any], str]:
    """``partition`` = ``test`` or ``fold<i>`` per row, de-duplicated; (table, duplicates, fingerprint)."""
    table = prep.table
    labels, groups = table["label"].to_numpy(), table["group"].to_numpy()
    test_mask = (carve(labels, groups, cfg.test_fraction, cfg.seed, "test") if cfg.test_fraction > 0
                 else np.zeros(len(table), bool))
    table["partition"] = "test"
    dev = table[~test_mask]
    table.loc[~test_mask, "partition"] = "fold" + kfold_assign(dev, cfg.folds, seed=cfg.seed).astype(str)
    order = [f"fold{i}" for i in range(cfg.folds)] + ["test"]
    return _fingerprinted(cfg, prep, table, "partition", order)


def _final_record(final: FitOutcome, dev: pd.DataFrame, epochs: int, best_epochs: list[int],
                  thresholds: ThresholdsRecord, tested: bool) -> dict[str, Any]:
    return {
        "trained_on": "all development (non-test) images: every fold, no validation carve",
        "images": int(len(dev)),
        "patients": int(dev["group"].nunique()),
        "epochs": epochs,
        "epochs_rule": f"median of the folds' best epochs {best_epochs}",
        "thresholds": thresholds,
        "evaluated_on": "held-out test split" if tested else "nothing (--test-fraction 0)",
        "run": final.record(),
    }


def run_cv(cfg: TrainConfig, prep: Prepared) -> dict[str, Any]:
    table, duplicates, fingerprint = _cv_partitions(cfg, prep)
    base = cfg.run_name or cfg.default_run_name()
    dev = table[table["partition"] != "test"]
    folds = [_run_fold(cfg, prep, dev, i, base, fingerprint) for i in range(cfg.folds)]
    summary = summarize_folds([f.report for f in folds])
    best_epochs = [f.best_epoch for f in folds]
    final_epochs = max(1, int(round(statistics.median(best_epochs))))
    final_threshold = _final_threshold(cfg, prep, folds)
    dev_ids = dev["row_id"].to_numpy()
    final = fit(cfg, prep, dev_ids, None, name=f"{base}-final", label="final", fingerprint=fingerprint,
                epochs=final_epochs)
    test_ids = table.loc[table["partition"] == "test", "row_id"].to_numpy()
    test_report, figures = None, ReportFigures(history=final.history)
    if len(test_ids):
        test_labels, test_probs = predict_parts(cfg, prep, final.best_state, test=test_ids)["test"]
        test_report = report(cfg, prep, test_labels, test_probs, final_threshold)
        figures = ReportFigures(test_labels, test_probs, test_report["confusion_matrix"], final.history)
    sizes = split_sizes(table, "partition", prep.classes)
    final_record = _final_record(final, dev, final_epochs, best_epochs, final_threshold, bool(len(test_ids)))
    table_cv = mean_std_table(summary)
    cv_doc = {
        "n_folds": cfg.folds,
        "protocol": ("patient-level StratifiedGroupKFold over the development set; per fold, validation = "
                     f"about {cfg.val_fraction:.0%} of the training patients (best epoch, threshold); "
                     f"test = the held-out fold"),
        "folds": [f.record for f in folds], "summary": summary, "table": table_cv, "final_model": final_record,
        "partitions": sizes, "duplicates": duplicates,
    }
    samples = (_samples(prep, test_ids, "held-out test images") if len(test_ids)
               else _samples(prep, dev_ids, "training images (no test split)"))
    return _finish(cfg, prep, RunResult(
        state=final.best_state, thresholds=final_threshold, test_report=test_report, figures=figures,
        heatmap_samples=samples, duplicates=duplicates, fingerprint=fingerprint, sizes_key="partitions", sizes=sizes,
        card_metrics={"cv": table_cv},
        metrics_doc={"cv": table_cv, "history": final.history, "final_model": final_record},
        training={"run": final.record(), "final_model": final_record},
        validation=(np.concatenate([f.validation[0] for f in folds]),  # the folds' validation splits, as
                    np.concatenate([f.validation[1] for f in folds])),  # the threshold is their median
        summary={"folds": cfg.folds, "cv": table_cv,
                 "final_model": {k: final_record[k] for k in ("trained_on", "images", "epochs", "thresholds")}},
        extra_files={"cv_summary.json": cv_doc},
    ))


# --------------------------------------------------------------------------- the shared tail


def _training_record(cfg: TrainConfig, prep: Prepared, **more: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"config": {k: v for k, v in cfg.to_dict().items() if k not in ("fail_after_epoch", "quiet")}}
    record["image_size"] = cfg.resolved_image_size
    if prep.init_report:
        record["init"] = {k: v for k, v in prep.init_report.items() if k != "source_tensors_unused_names"}
    record.update(more)
    return record


def _write_outputs(cfg: TrainConfig, prep: Prepared, result: RunResult, metrics_doc: dict[str, Any],
                   training: dict[str, Any]) -> tuple[ModelCard, list[str]]:
    """The artifact (safetensors + model.json) and its report at ``cfg.out``."""
    model = build_model(cfg.arch, len(prep.classes))
    model.load_state_dict(result.state)
    name = os.path.basename(cfg.out.rstrip("/")) or "model"
    card = new_card(name=name, arch=cfg.arch, classes=prep.classes, image_size=cfg.resolved_image_size,
                    positive_class=prep.positive_class, thresholds=result.thresholds,
                    metrics={"test": result.test_report, **result.card_metrics, "split_used_for_metrics": "test"},
                    training=training, data_fingerprint=result.fingerprint)
    if result.validation is not None:
        card.drift_fingerprint = validation_fingerprint(card, prep.table, *result.validation)
    with report_directory(cfg.out, cfg.s3_endpoint, prefix="cxr-artifact-") as local:
        card = save_artifact(local, model.eval(), card)
        doc = {**metrics_doc, "model": {"name": card.name, "version": card.version, "arch": card.arch,
                                        "classes": card.classes, "positive_class": card.positive_class}}
        written, files = write_report(local, doc, model=model, card=card, figures=result.figures,
                                      heatmap_samples=result.heatmap_samples, extra_files=result.extra_files,
                                      s3_endpoint=cfg.s3_endpoint)
    if "error" in written.get("heatmaps", {}):
        log(f"warning: heatmaps.png not written ({written['heatmaps']['error']})", cfg)
    return card, ["model.safetensors", "model.json", *files]


def _finish(cfg: TrainConfig, prep: Prepared, result: RunResult) -> dict[str, Any]:
    """Write the artifact and its report; return the JSON summary (both protocols)."""
    table, duplicates = prep.table, result.duplicates
    data = {**prep.report, "duplicates": duplicates, result.sizes_key: result.sizes, "used": int(len(table))}
    training = _training_record(cfg, prep, **result.training,
                                data={k: data[k] for k in ("decoded", "used", "undecodable", "patients")}
                                | {"duplicates_removed": duplicates["files_removed"]})
    metrics_doc = {"test": result.test_report, "thresholds": result.thresholds, "data": data, **result.metrics_doc}
    card, files = _write_outputs(cfg, prep, result, metrics_doc, training)
    return {
        "artifact": cfg.out, "name": card.name, "version": card.version, "arch": cfg.arch,
        "mode": cfg.mode, "classes": prep.classes, "positive_class": prep.positive_class,
        **result.summary,
        "test": headline(result.test_report),
        "data": {"files": prep.report["listing"]["files"], "decoded": prep.report["decoded"], "used": int(len(table)),
                 "undecodable": prep.report["undecodable"]["by_code"], "duplicates_removed": duplicates["files_removed"],
                 "files_without_patient_id": prep.report["patients"]["files_without_patient_id"],
                 result.sizes_key: {k: v["images"] for k, v in result.sizes.items()}, "fingerprint": result.fingerprint},
        "files": files,
    }


# --------------------------------------------------------------------------- entry point


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run what ``cfg`` asks for (one run or k-fold CV); returns the JSON summary."""
    cfg.validate()
    started = time.perf_counter()
    with deterministic_order():
        prep = prepare(cfg)
        summary = run_cv(cfg, prep) if cfg.folds else run_single(cfg, prep)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary

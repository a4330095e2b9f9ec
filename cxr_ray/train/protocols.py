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
from cxr_ray.evaluate.calibration import reliability
from cxr_ray.evaluate.cv_table import to_csv, to_markdown
from cxr_ray.evaluate.metrics import classification_report, summarize_folds
from cxr_ray.evaluate.report import (
    ReportFigures,
    headline,
    mean_std_table,
    pick_samples,
    report_directory,
    write_report,
)
from cxr_ray.models.artifact import save_artifact
from cxr_ray.models.card import (
    CalibrationRecord,
    EnsembleRecord,
    ModelCard,
    ThresholdsRecord,
    new_card,
)
from cxr_ray.models.ensemble import build_network
from cxr_ray.train.config import TrainConfig
from cxr_ray.train.drift import validation_fingerprint
from cxr_ray.train.final_model import FinalModel, ensemble_of, final_threshold, retrained
from cxr_ray.train.fit import fit
from cxr_ray.train.ingest import deterministic_order
from cxr_ray.train.prepare import Prepared, log, prepare, split_sizes
from cxr_ray.train.scoring import (
    Scored,
    fit_calibration,
    pick_threshold,
    predict_parts,
    reliability_curves,
    report,
)


@dataclass
class RunResult:
    """What a protocol hands the shared tail: the model to keep and what to say about it."""

    state: dict[str, Any]  # the network's (a FoldEnsemble's when ``ensemble`` is set)
    thresholds: ThresholdsRecord
    calibration: CalibrationRecord
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
    text_files: dict[str, str] = field(default_factory=dict)
    ensemble: EnsembleRecord | None = None
    # (row ids, probs, calibrated?): the drift fingerprint's data
    validation: tuple[np.ndarray, np.ndarray, bool] | None = None


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
    val = predicted["val"]
    calibration = fit_calibration(val)
    temperature = float(calibration["temperature"])
    thresholds = pick_threshold(cfg, prep, val.labels, val.calibrated(temperature))
    val_report = report(cfg, prep, val, thresholds, temperature)
    test_report, scored, scored_report = None, val, val_report
    if len(ids["test"]):
        scored = predicted["test"]
        test_report = scored_report = report(cfg, prep, scored, thresholds, temperature)
    run = outcome.record()
    splits = split_sizes(table, "split", prep.classes)
    return _finish(cfg, prep, RunResult(
        state=outcome.best_state, thresholds=thresholds, calibration=calibration, test_report=test_report,
        figures=ReportFigures(labels=scored.labels, probs=scored.calibrated(temperature),
                              confusion=scored_report["confusion_matrix"], history=outcome.history,
                              reliability=reliability_curves(scored, temperature)),
        heatmap_samples=_samples(prep, ids["val"], "validation images"),
        duplicates=duplicates, fingerprint=fingerprint, sizes_key="splits", sizes=splits,
        card_metrics={"val": headline(val_report)},
        metrics_doc={"val": val_report, "history": outcome.history, "run": run},
        training={"run": run, "splits": splits},
        summary={"thresholds": thresholds, "val": headline(val_report), "run": run},
        validation=(val.row_ids, val.probs, False),
    ))


# --------------------------------------------------------------------------- k-fold


@dataclass
class _Fold:
    record: dict[str, Any]
    report: dict[str, Any]
    threshold: float | None  # validation-chosen, else None
    best_epoch: int
    state: dict[str, Any]  # the fold model (an ensemble member with --final ensemble)
    temperature: float  # fitted on this fold's validation patients
    test: Scored  # its held-out fold, uncalibrated
    val: Scored  # its validation patients, uncalibrated (the drift fingerprint's data)


def _run_fold(cfg: TrainConfig, prep: Prepared, dev: pd.DataFrame, i: int, base: str, fingerprint: str) -> _Fold:
    held = dev[dev["partition"] == f"fold{i}"]
    rest = dev[dev["partition"] != f"fold{i}"]
    val_mask = carve(rest["label"].to_numpy(), rest["group"].to_numpy(), cfg.val_fraction, cfg.seed + 1 + i,
                     "validation")
    train_ids, val_ids = rest["row_id"].to_numpy()[~val_mask], rest["row_id"].to_numpy()[val_mask]
    outcome = fit(cfg, prep, train_ids, val_ids, name=f"{base}-fold{i}", label=f"fold {i + 1}/{cfg.folds}",
                  fingerprint=fingerprint)
    predicted = predict_parts(cfg, prep, outcome.best_state, val=val_ids, test=held["row_id"].to_numpy())
    val = predicted["val"]
    calibration = fit_calibration(val)
    temperature = float(calibration["temperature"])
    thresholds = pick_threshold(cfg, prep, val.labels, val.calibrated(temperature))
    fold_report = report(cfg, prep, predicted["test"], thresholds, temperature)
    log(f"[fold {i + 1}/{cfg.folds}] test accuracy {fold_report['accuracy']:.4f} balanced "
        f"{fold_report['balanced_accuracy']:.4f}, ECE {fold_report['calibration']['ece_uncalibrated']:.3f} -> "
        f"{fold_report['calibration']['ece']:.3f} (T = {temperature:.2f}, kept epoch {outcome.best_epoch})", cfg)
    record = {
        "fold": i,
        "sizes": {"train": int(len(train_ids)), "val": int(len(val_ids)), "test": int(len(held)),
                  "test_patients": int(held["group"].nunique())},
        "thresholds": thresholds,
        "calibration": calibration,
        "run": outcome.record(),
        "history": outcome.history,
        "test": fold_report,
    }
    chosen = thresholds["positive"] if thresholds.get("chosen_on") == "validation" else None
    return _Fold(record, fold_report, chosen, outcome.best_epoch, outcome.best_state, temperature, predicted["test"],
                 val)


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


def _pooled_out_of_fold(folds: list[_Fold], prep: Prepared) -> tuple[Scored, np.ndarray]:
    """Every development image predicted by the one fold model that did not train on it: (raw, calibrated)."""
    pooled = Scored(*(np.concatenate([getattr(f.test, k) for f in folds])
                      for k in ("row_ids", "labels", "probs", "groups")))
    calibrated = np.concatenate([f.test.calibrated(f.temperature) for f in folds])
    return pooled, calibrated


def _cv_figures(cfg: TrainConfig, prep: Prepared, folds: list[_Fold], final: FinalModel,
                test_ids: np.ndarray) -> tuple[dict[str, Any] | None, ReportFigures, str]:
    """(test report of the final model, the figures, what they show): held-out test, else the pooled folds."""
    if len(test_ids):
        test = predict_parts(cfg, prep, final.state, temperatures=final.temperatures, test=test_ids)["test"]
        test_report = report(cfg, prep, test, final.record["thresholds"], final.temperature)
        return test_report, ReportFigures(test.labels, test.calibrated(final.temperature),
                                          test_report["confusion_matrix"], final.history,
                                          reliability_curves(test, final.temperature)), "held-out test split"
    pooled, calibrated = _pooled_out_of_fold(folds, prep)
    confusion = classification_report(pooled.labels, calibrated, prep.classes, n_bootstrap=0)["confusion_matrix"]
    curves = {"before calibration": reliability(pooled.probs, pooled.labels),
              "after (each fold's T)": reliability(calibrated, pooled.labels)}
    return None, ReportFigures(pooled.labels, calibrated, confusion, final.history, curves), \
        "pooled out-of-fold predictions (each image by the fold model that did not train on it)"


def run_cv(cfg: TrainConfig, prep: Prepared) -> dict[str, Any]:
    table, duplicates, fingerprint = _cv_partitions(cfg, prep)
    base = cfg.run_name or cfg.default_run_name()
    dev = table[table["partition"] != "test"]
    folds = [_run_fold(cfg, prep, dev, i, base, fingerprint) for i in range(cfg.folds)]
    reports = [f.report for f in folds]
    summary = summarize_folds(reports)
    thresholds = final_threshold(cfg, prep, folds)
    if cfg.final == "ensemble":
        final = ensemble_of(cfg, prep, folds, dev, thresholds)
    else:
        final = retrained(cfg, prep, folds, dev, thresholds, name=f"{base}-final",
                          fingerprint=fingerprint)
    test_ids = table.loc[table["partition"] == "test", "row_id"].to_numpy()
    test_report, figures, shown = _cv_figures(cfg, prep, folds, final, test_ids)
    final.record["evaluated_on"] = "held-out test split" if len(test_ids) else "nothing (--test-fraction 0)"
    final.record["figures_show"] = shown
    sizes = split_sizes(table, "partition", prep.classes)
    table_cv = mean_std_table(summary)
    cv_doc = {
        "n_folds": cfg.folds,
        "protocol": ("patient-level StratifiedGroupKFold over the development set; per fold, validation = "
                     f"about {cfg.val_fraction:.0%} of the training patients (temperature, threshold"
                     f"{', best epoch' if cfg.select == 'best' else ''}); test = the held-out fold"),
        "folds": [f.record for f in folds], "summary": summary, "table": table_cv, "final_model": final.record,
        "partitions": sizes, "duplicates": duplicates,
    }
    dev_ids = dev["row_id"].to_numpy()
    samples = (_samples(prep, test_ids, "held-out test images") if len(test_ids)
               else _samples(prep, dev_ids, "training images (no test split)"))
    title = f"{cfg.folds}-fold patient-level CV, {cfg.arch}, recipe {cfg.recipe}"
    return _finish(cfg, prep, RunResult(
        state=final.state, thresholds=thresholds, calibration=final.calibration, ensemble=final.ensemble,
        test_report=test_report, figures=figures,
        heatmap_samples=samples, duplicates=duplicates, fingerprint=fingerprint, sizes_key="partitions", sizes=sizes,
        card_metrics={"cv": table_cv},
        metrics_doc={"cv": table_cv, "history": final.history, "final_model": final.record},
        training={"final_model": final.record, **({"run": final.record["run"]} if "run" in final.record else {})},
        validation=(np.concatenate([f.val.row_ids for f in folds]),  # the folds' validation splits, each
                    np.concatenate([f.val.calibrated(f.temperature) for f in folds]), True),  # by its own T
        summary={"folds": cfg.folds, "cv": table_cv,
                 "final_model": {k: final.record[k] for k in ("trained_on", "images", "epochs", "thresholds")}},
        extra_files={"cv_summary.json": cv_doc},
        text_files={"cv_table.md": to_markdown(reports, positive_class=prep.positive_class, title=title),
                    "cv_table.csv": to_csv(reports)},
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
    temperatures = None if result.ensemble is None else list(result.ensemble["temperatures"])
    model = build_network(cfg.arch, len(prep.classes), temperatures)
    model.load_state_dict(result.state)
    name = os.path.basename(cfg.out.rstrip("/")) or "model"
    card = new_card(name=name, arch=cfg.arch, classes=prep.classes, image_size=cfg.resolved_image_size,
                    positive_class=prep.positive_class, thresholds=result.thresholds,
                    normalization=cfg.normalization or "fixed", calibration=result.calibration,
                    ensemble=result.ensemble,
                    metrics={"test": result.test_report, **result.card_metrics, "split_used_for_metrics": "test"},
                    training=training, data_fingerprint=result.fingerprint)
    if result.validation is not None:
        ids, probs, calibrated = result.validation
        card.drift_fingerprint = validation_fingerprint(card, prep.table, ids, probs, calibrated=calibrated)
    with report_directory(cfg.out, cfg.s3_endpoint, prefix="cxr-artifact-") as local:
        card = save_artifact(local, model.eval(), card)
        doc = {**metrics_doc, "model": {"name": card.name, "version": card.version, "arch": card.arch,
                                        "classes": card.classes, "positive_class": card.positive_class}}
        written, files = write_report(local, doc, model=model, card=card, figures=result.figures,
                                      heatmap_samples=result.heatmap_samples, extra_files=result.extra_files,
                                      text_files=result.text_files, s3_endpoint=cfg.s3_endpoint)
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
    metrics_doc = {"test": result.test_report, "thresholds": result.thresholds, "calibration": result.calibration,
                   "data": data, **result.metrics_doc}
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
    cfg = cfg.resolved()  # the recipe's values for every setting left unset: what runs, and what model.json says
    cfg.validate()
    started = time.perf_counter()
    with deterministic_order():
        prep = prepare(cfg)
        summary = run_cv(cfg, prep) if cfg.folds else run_single(cfg, prep)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary

"""The training driver: data -> splits -> Ray Train run(s) -> threshold -> metrics -> artifact.

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

Duplicates: byte-identical files (same sha256) are reported; one copy is
kept, in the split that trains first (so no evaluation split holds an image a
model trained on). Undecodable files are reported by error code and left out.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cxr_ray.data.labelled import grouping_key, read_labelled
from cxr_ray.data.splits import (
    carve,
    check_disjoint,
    class_weights,
    data_fingerprint,
    deduplicate,
    kfold_assign,
    patient_groups,
    train_val_test_split,
)
from cxr_ray.errors import CxrRayError, UsageError
from cxr_ray.train.config import TrainConfig

RUN_MARKER = "cxr_run.json"


class TrainingError(CxrRayError):
    """A Ray Train run failed (after its retries); re-running the command resumes it."""


def _log(message: str, cfg: TrainConfig | None = None) -> None:
    if cfg is None or not cfg.quiet:
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


@dataclass
class Prepared:
    """Everything about the data the runs share: decoded cache, metadata, reports."""

    classes: list[str]
    positive_class: str | None
    preprocessing: dict
    table: pd.DataFrame  # decodable rows: row_id, path, label, label_name, patient_id, sha256, group
    decoded: object  # ray.data.Dataset (materialized)
    report: dict
    initial_state: dict
    init_report: dict | None = None
    source_classes: list[str] | None = None
    extra: dict = field(default_factory=dict)


def resolve_classes(cfg: TrainConfig, data_classes: list[str]) -> tuple[list[str], list[str] | None]:
    """(the model's classes, the source model's classes or None).

    ``--label-space keep``: the data's classes. ``extend`` (DETL): the source
    artifact's classes in their order, then the data's new ones.
    """
    if not cfg.init:
        return data_classes, None
    from cxr_ray.errors import ArtifactError
    from cxr_ray.models.artifact import load_card

    try:
        source_classes = list(load_card(cfg.init, cfg.s3_endpoint).classes)
    except ArtifactError:
        if cfg.label_space == "extend":
            raise UsageError(f"--label-space extend needs --init to be a cxr-ray artifact; {cfg.init} is not") from None
        return data_classes, None
    if cfg.label_space == "extend":
        from cxr_ray.models.transfer import extended_classes

        return extended_classes(source_classes, data_classes), source_classes
    return data_classes, source_classes


def _positive_class(cfg: TrainConfig, classes: list[str]) -> str | None:
    if cfg.positive_class in (None, "", "none"):
        return None
    if cfg.positive_class == "auto":
        return "covid" if "covid" in classes else None
    if cfg.positive_class not in classes:
        raise UsageError(f"--positive-class {cfg.positive_class!r} is not one of the classes {classes}")
    return cfg.positive_class


def initial_weights(cfg: TrainConfig, classes: list[str], source_classes: list[str] | None) -> tuple[dict, dict | None]:
    """The starting weights, built once on the driver (errors surface before any worker starts)."""
    import torch

    from cxr_ray.models.registry import build_model

    torch.manual_seed(cfg.seed)
    imagenet = None
    if cfg.pretrained:
        from cxr_ray.models.weights import imagenet_state_dict

        imagenet = imagenet_state_dict(cfg.arch, cfg.pretrained, s3_endpoint=cfg.s3_endpoint)
    model = build_model(cfg.arch, len(classes), imagenet_state_dict=imagenet)
    report = None
    if cfg.init:
        from cxr_ray.models.transfer import init_from_source

        report = init_from_source(model, cfg.arch, classes, cfg.init, s3_endpoint=cfg.s3_endpoint,
                                  source_classes=source_classes)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, report


def prepare(cfg: TrainConfig) -> Prepared:
    """List, decode (Ray Data, cached), drop undecodable files, assign patient groups."""
    from cxr_ray.models.card import new_card
    from cxr_ray.train.ingest import decode_dataset

    started = time.perf_counter()
    source = read_labelled(cfg.data, s3_endpoint=cfg.s3_endpoint)
    classes, source_classes = resolve_classes(cfg, source.classes)
    positive = _positive_class(cfg, classes)
    preprocessing = new_card(name="x", arch=cfg.arch, classes=classes, image_size=cfg.resolved_image_size).preprocessing
    initial_state, init_report = initial_weights(cfg, classes, source_classes)

    frame = source.frame.sample(frac=1.0, random_state=cfg.seed).reset_index(drop=True)  # blocks in random order
    frame["row_id"] = np.arange(len(frame), dtype=np.int64)
    frame["label_name"] = frame["label"]
    frame["label"] = frame["label_name"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)
    _log(f"decoding {len(frame)} images at {preprocessing['image_size']} px (Ray Data, cached once)", cfg)
    decoded, meta = decode_dataset(frame, preprocessing, s3_endpoint=cfg.s3_endpoint,
                                   pseudonym_key=grouping_key(cfg.pseudonym_key_env))
    table = frame.merge(meta, on="row_id", how="left")
    bad = table[table["status"] != "ok"]
    table = table[table["status"] == "ok"].copy()
    table["group"], group_report = patient_groups(table)
    undecodable = {
        "count": int(len(bad)),
        "by_code": {str(k): int(v) for k, v in bad["error_code"].value_counts().sort_index().items()},
        "examples": [
            {"file": str(p).rsplit("/", 1)[-1], "error_code": str(c)}
            for p, c in zip(bad["path"].head(20), bad["error_code"].head(20), strict=True)
        ],
    }
    if undecodable["count"]:
        _log(f"left out {undecodable['count']} undecodable file(s): {undecodable['by_code']}", cfg)
    if table.empty:
        raise UsageError(f"{cfg.data}: none of the {len(frame)} files could be decoded ({undecodable['by_code']})")
    report = {
        "listing": source.report,
        "undecodable": undecodable,
        "patients": group_report,
        "decoded": int(len(table)),
        "decode_seconds": round(time.perf_counter() - started, 2),
    }
    return Prepared(classes=classes, positive_class=positive, preprocessing=preprocessing, table=table,
                    decoded=decoded, report=report, initial_state=initial_state, init_report=init_report,
                    source_classes=source_classes)


def _split_sizes(table: pd.DataFrame, column: str, classes: list[str]) -> dict:
    out = {}
    for name, part in table.groupby(column, sort=True):
        out[str(name)] = {
            "images": int(len(part)),
            "patients": int(part["group"].nunique()),
            "per_class": {c: int((part["label"] == i).sum()) for i, c in enumerate(classes)},
        }
    return out


# --------------------------------------------------------------------------- one Ray Train run


@dataclass
class FitOutcome:
    best_state: dict
    history: list[dict]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    resumed: bool
    run_name: str
    storage_path: str
    seconds: float
    monitor: str


def _storage(cfg: TrainConfig) -> tuple[str, object | None, object, str]:
    """(storage_path for RunConfig, pyarrow filesystem or None, fsspec fs, root path)."""
    from cxr_ray.io.storage import get_filesystem, is_remote, to_pyarrow_filesystem

    uri = cfg.storage_path or cfg.default_storage_path()
    fs, root = get_filesystem(uri, cfg.s3_endpoint)
    if is_remote(uri):
        return root, to_pyarrow_filesystem(fs), fs, root
    os.makedirs(root, exist_ok=True)
    return root, None, fs, root


def _check_run_marker(fs, root: str, name: str, fingerprint: str, classes: list[str]) -> bool:
    """Refuse to resume a run that trained on other data; True when the run existed."""
    path = f"{root.rstrip('/')}/{name}/{RUN_MARKER}"
    if fs.exists(path):
        with fs.open(path, "rb") as handle:
            marker = json.loads(handle.read())
        if marker.get("data_fingerprint") != fingerprint or marker.get("classes") != classes:
            raise UsageError(
                f"run {name!r} in {root} was trained on other data (fingerprint {marker.get('data_fingerprint', '?')[:12]}, "
                f"now {fingerprint[:12]}); pass a new --run-name or remove that run directory"
            )
        return True
    fs.makedirs(f"{root.rstrip('/')}/{name}", exist_ok=True)
    with fs.open(path, "wb") as handle:
        handle.write(json.dumps({"data_fingerprint": fingerprint, "classes": classes}).encode())
    return False


def _cluster_cpus() -> tuple[float, float]:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = [float(n.get("Resources", {}).get("CPU", 0)) for n in nodes] or [1.0]
    return float(sum(per_node)), max(per_node)


def fit(
    cfg: TrainConfig,
    prep: Prepared,
    train_ids: np.ndarray,
    val_ids: np.ndarray | None,
    *,
    name: str,
    label: str,
    fingerprint: str,
    epochs: int | None = None,
) -> FitOutcome:
    """One ``TorchTrainer.fit`` on the given rows; resumes a run of the same name."""
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cxr_ray.data.augment import AugmentConfig
    from cxr_ray.train.ingest import subset
    from cxr_ray.train.loop import load_state, train_loop_per_worker

    started = time.perf_counter()
    table = prep.table.set_index("row_id")
    train_labels = table.loc[train_ids, "label"].to_numpy()
    k = len(prep.classes)
    datasets = {"train": subset(prep.decoded, train_ids)}
    monitor = cfg.monitor
    if val_ids is not None and len(val_ids):
        datasets["val"] = subset(prep.decoded, val_ids)
        if monitor == "val_auc" and not _auc_defined(table.loc[val_ids, "label"].to_numpy(), prep, k):
            _log(f"[{label}] val_auc is undefined on this validation split; monitoring val_loss", cfg)
            monitor = "val_loss"
    workers = cfg.num_workers
    rows_per_worker = len(train_ids) // workers
    if rows_per_worker < 2:
        raise UsageError(f"{len(train_ids)} training images cannot feed {workers} worker(s)")
    batch = max(2, min(cfg.batch_size, rows_per_worker))
    steps = max(1, rows_per_worker // batch)
    total_cpus, node_cpus = _cluster_cpus()
    cpus = cfg.cpus_per_worker or (1.0 if cfg.use_gpu else max(1.0, min(node_cpus, total_cpus // workers)))
    config = {
        "train": {**cfg.to_dict(), **({"epochs": epochs} if epochs else {})},
        "classes": prep.classes,
        "positive_index": prep.classes.index(prep.positive_class) if prep.positive_class else None,
        "class_weights": class_weights(train_labels, k) if cfg.class_weighting == "balanced" else None,
        "initial_state": [ray.put(prep.initial_state)],
        "preprocessing": prep.preprocessing,
        "augment": AugmentConfig(enabled=cfg.augment, hflip=cfg.hflip).to_dict(),
        "steps_per_epoch": steps,
        "batch_size": batch,
        "shuffle_buffer": int(min(rows_per_worker, max(8 * batch, 256))),
        "has_val": "val" in datasets,
        "monitor": monitor,
        "label": label,
        "fingerprint": fingerprint,
        "threads": int(cpus),
    }
    storage_path, storage_fs, fs, root = _storage(cfg)
    existed = _check_run_marker(fs, root, name, fingerprint, prep.classes)
    resources = {"CPU": cpus, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    total_epochs = epochs or cfg.epochs
    _log(
        f"[{label}] Ray Train run {name!r}{' (resuming)' if existed else ''}: {len(train_ids)} train / "
        f"{0 if val_ids is None else len(val_ids)} val images, {workers} worker(s) x {cpus:g} CPU"
        f"{' + 1 GPU' if cfg.use_gpu else ''}, {total_epochs} epochs, batch {batch}/worker",
        cfg,
    )
    try:
        result = trainer.fit()  # RAY
    except Exception as exc:
        raise TrainingError(
            f"[{label}] training run {name!r} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            f"Re-run the same command to resume from its last checkpoint (storage {cfg.storage_path or cfg.default_storage_path()})."
        ) from exc
    if result.checkpoint is None:
        raise TrainingError(f"[{label}] run {name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        saved = load_state(directory)
    history = list(saved["history"])
    return FitOutcome(
        best_state=saved["best_model"],
        history=history,
        best_epoch=int(saved["best_epoch"]),
        epochs_run=int(saved["epoch"]),
        stopped_early=bool(saved["stopped"]),
        resumed=any(int(row.get("attempt", 1)) > 1 for row in history),
        run_name=name,
        storage_path=cfg.storage_path or cfg.default_storage_path(),
        seconds=round(time.perf_counter() - started, 2),
        monitor=monitor,
    )


def _auc_defined(labels: np.ndarray, prep: Prepared, k: int) -> bool:
    if prep.positive_class is not None:
        pos = labels == prep.classes.index(prep.positive_class)
        return bool(pos.any() and not pos.all())
    return any(0 < (labels == c).sum() < len(labels) for c in range(k))


# --------------------------------------------------------------------------- evaluation


def _predict(cfg: TrainConfig, prep: Prepared, state: dict, **parts: np.ndarray) -> dict[str, tuple]:
    """``{part: (labels, probs)}`` for each named set of row ids, in ONE pass (one actor pool start)."""
    from cxr_ray.train.ingest import subset
    from cxr_ray.train.predict import predict_probs

    wanted = np.concatenate([np.asarray(v, dtype=np.int64) for v in parts.values()]) if parts else np.zeros(0, np.int64)
    ids, probs = predict_probs(subset(prep.decoded, wanted), state, cfg.arch, len(prep.classes), use_gpu=cfg.use_gpu)
    position = {int(r): i for i, r in enumerate(ids)}
    labels = prep.table.set_index("row_id")["label"]
    out = {}
    for name, rows in parts.items():
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        index = np.array([position[int(r)] for r in rows], dtype=np.int64)
        out[name] = (labels.loc[rows].to_numpy(), probs[index] if len(index) else np.zeros((0, len(prep.classes)), np.float32))
    return out


def pick_threshold(cfg: TrainConfig, prep: Prepared, labels: np.ndarray, probs: np.ndarray) -> dict:
    """The validation-chosen operating point, or a recorded 0.5 default when it cannot be chosen."""
    from cxr_ray.evaluate.metrics import choose_threshold

    if prep.positive_class is None:
        return {}
    pos = prep.classes.index(prep.positive_class)
    try:
        return choose_threshold(labels == pos, probs[:, pos], target_sensitivity=cfg.target_sensitivity)
    except ValueError as exc:
        return {"positive": 0.5, "target_sensitivity": cfg.target_sensitivity, "chosen_on": "default", "note": str(exc)}


def _report(cfg: TrainConfig, prep: Prepared, labels: np.ndarray, probs: np.ndarray, threshold: dict) -> dict:
    from cxr_ray.evaluate.metrics import classification_report

    return classification_report(labels, probs, prep.classes, positive_class=prep.positive_class,
                                 threshold=threshold.get("positive"), n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)


def headline(report: dict | None) -> dict | None:
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


# --------------------------------------------------------------------------- artifact


def _write_outputs(
    cfg: TrainConfig,
    prep: Prepared,
    state: dict,
    *,
    thresholds: dict,
    card_metrics: dict,
    metrics_doc: dict,
    training: dict,
    fingerprint: str,
    plots: dict,
    extra_files: dict | None = None,
    heatmap_samples: tuple[str, list[tuple[str, str]]] | None = None,
):
    """Artifact (save_artifact) + metrics.json + PNG plots (+ extra JSON files) at ``cfg.out``.

    ``heatmap_samples``: ``(what they are, [(path, class), ...])`` for ``heatmaps.png``, a
    Grad-CAM grid (:func:`~cxr_ray.train.evaluation.write_heatmap_grid`); when it cannot be
    drawn, a warning and ``metrics.json["heatmaps"]["error"]``, never a failed run.
    """
    from cxr_ray.evaluate.plots import plot_confusion, plot_roc, plot_training_curves
    from cxr_ray.io.storage import get_filesystem, is_remote
    from cxr_ray.models.artifact import save_artifact
    from cxr_ray.models.card import new_card
    from cxr_ray.models.registry import build_model
    from cxr_ray.train.evaluation import HEATMAP_GRID_FILE, write_heatmap_grid

    model = build_model(cfg.arch, len(prep.classes))
    model.load_state_dict(state)
    name = os.path.basename(cfg.out.rstrip("/")) or "model"
    card = new_card(name=name, arch=cfg.arch, classes=prep.classes, image_size=cfg.resolved_image_size,
                    positive_class=prep.positive_class, thresholds=thresholds, metrics=card_metrics,
                    training=training, data_fingerprint=fingerprint)
    remote = is_remote(cfg.out)
    local = tempfile.mkdtemp(prefix="cxr-artifact-") if remote else os.path.abspath(os.path.expanduser(cfg.out))
    card = save_artifact(local, model.eval(), card)
    files = ["model.safetensors", "model.json", "metrics.json"]
    doc = {**metrics_doc, "model": {"name": card.name, "version": card.version, "arch": card.arch,
                                    "classes": card.classes, "positive_class": card.positive_class}}
    if heatmap_samples is not None:
        what, samples = heatmap_samples
        doc["heatmaps"] = write_heatmap_grid(model, card, samples, os.path.join(local, HEATMAP_GRID_FILE), what=what,
                                             s3_endpoint=cfg.s3_endpoint)
        if "error" in doc["heatmaps"]:
            _log(f"warning: {HEATMAP_GRID_FILE} not written ({doc['heatmaps']['error']})", cfg)
    _write_json(os.path.join(local, "metrics.json"), doc)
    for filename, content in (extra_files or {}).items():
        _write_json(os.path.join(local, filename), content)
        files.append(filename)
    if plots.get("history"):
        files.append(os.path.basename(plot_training_curves(plots["history"], os.path.join(local, "training_curves.png"))))
    if plots.get("labels") is not None and len(plots["labels"]):
        files.append(os.path.basename(plot_roc(plots["labels"], plots["probs"], prep.classes, os.path.join(local, "roc.png"))))
        files.append(os.path.basename(plot_confusion(plots["confusion"], prep.classes, os.path.join(local, "confusion.png"))))
    if "error" not in doc.get("heatmaps", {"error": None}):
        files.append(HEATMAP_GRID_FILE)
    if remote:
        fs, root = get_filesystem(cfg.out, cfg.s3_endpoint)
        fs.put(local.rstrip("/") + "/", root.rstrip("/") + "/", recursive=True)
        shutil.rmtree(local, ignore_errors=True)
    return card, files


def _heatmap_samples(prep: Prepared, row_ids: np.ndarray, what: str) -> tuple[str, list[tuple[str, str]]]:
    """``(what, [(path, class), ...])``: the first images of each class among ``row_ids``."""
    from cxr_ray.train.evaluation import pick_samples

    rows = prep.table[prep.table["row_id"].isin(np.asarray(row_ids, dtype=np.int64))]
    return what, pick_samples(rows, prep.classes)


def _write_json(path: str, content: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(content, handle, indent=2, sort_keys=True, default=_json_default)
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _training_record(cfg: TrainConfig, prep: Prepared, **more) -> dict:
    record = {"config": {k: v for k, v in cfg.to_dict().items() if k not in ("fail_after_epoch", "quiet")}}
    record["image_size"] = cfg.resolved_image_size
    if prep.init_report:
        record["init"] = {k: v for k, v in prep.init_report.items() if k != "source_tensors_unused_names"}
    record.update(more)
    return record


# --------------------------------------------------------------------------- one run


def _artifact_summary(cfg: TrainConfig, prep: Prepared, card) -> dict:
    """What every training summary says about the artifact it wrote."""
    return {
        "artifact": cfg.out, "name": card.name, "version": card.version, "arch": cfg.arch,
        "mode": cfg.mode, "classes": prep.classes, "positive_class": prep.positive_class,
    }


def run_single(cfg: TrainConfig, prep: Prepared) -> dict:
    table = prep.table
    table["split"] = train_val_test_split(table, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                                          seed=cfg.seed)
    table, duplicates = deduplicate(table, "split", ["train", "val", "test"])
    check_disjoint(table, "split")
    prep.table = table
    fingerprint = data_fingerprint(table["sha256"], table["label_name"])
    if duplicates["duplicate_sets"]:
        _log(f"duplicates: {duplicates['duplicate_sets']} set(s) of byte-identical files "
             f"({duplicates['across_splits']} across splits); removed {duplicates['files_removed']}", cfg)
    ids = {s: table.loc[table["split"] == s, "row_id"].to_numpy() for s in ("train", "val", "test")}
    name = cfg.run_name or cfg.default_run_name()
    outcome = fit(cfg, prep, ids["train"], ids["val"], name=name, label="train", fingerprint=fingerprint)

    predicted = _predict(cfg, prep, outcome.best_state, val=ids["val"], test=ids["test"])
    val_labels, val_probs = predicted["val"]
    thresholds = pick_threshold(cfg, prep, val_labels, val_probs)
    val_report = _report(cfg, prep, val_labels, val_probs, thresholds)
    test_report, test_labels, test_probs = None, None, None
    if len(ids["test"]):
        test_labels, test_probs = predicted["test"]
        test_report = _report(cfg, prep, test_labels, test_probs, thresholds)

    splits = _split_sizes(table, "split", prep.classes)
    data = {**prep.report, "duplicates": duplicates, "splits": splits, "used": int(len(table))}
    training = _training_record(cfg, prep, run=_run_record(outcome), splits=splits,
                                data={k: data[k] for k in ("decoded", "used", "undecodable", "patients")}
                                | {"duplicates_removed": duplicates["files_removed"]})
    card_metrics = {"test": test_report, "val": headline(val_report), "split_used_for_metrics": "test"}
    metrics_doc = {"test": test_report, "val": val_report, "thresholds": thresholds, "history": outcome.history,
                   "data": data, "run": _run_record(outcome)}
    plot_labels, plot_probs, plot_report = ((test_labels, test_probs, test_report) if test_report
                                            else (val_labels, val_probs, val_report))
    card, files = _write_outputs(
        cfg, prep, outcome.best_state, thresholds=thresholds, card_metrics=card_metrics, metrics_doc=metrics_doc,
        training=training, fingerprint=fingerprint,
        plots={"history": outcome.history, "labels": plot_labels, "probs": plot_probs,
               "confusion": plot_report["confusion_matrix"]},
        heatmap_samples=_heatmap_samples(prep, ids["val"], "validation images"),
    )
    return {
        **_artifact_summary(cfg, prep, card),
        "thresholds": thresholds,
        "test": headline(test_report),
        "val": headline(val_report),
        "run": _run_record(outcome),
        "data": {"files": prep.report["listing"]["files"], "decoded": prep.report["decoded"], "used": int(len(table)),
                 "undecodable": prep.report["undecodable"]["by_code"], "duplicates_removed": duplicates["files_removed"],
                 "files_without_patient_id": prep.report["patients"]["files_without_patient_id"],
                 "splits": {k: v["images"] for k, v in splits.items()}, "fingerprint": fingerprint},
        "files": files,
    }


def _run_record(outcome: FitOutcome) -> dict:
    return {
        "run_name": outcome.run_name,
        "storage_path": outcome.storage_path,
        "epochs_run": outcome.epochs_run,
        "best_epoch": outcome.best_epoch,
        "stopped_early": outcome.stopped_early,
        "resumed": outcome.resumed,
        "monitor": outcome.monitor,
        "seconds": outcome.seconds,
    }


# --------------------------------------------------------------------------- k-fold


def run_cv(cfg: TrainConfig, prep: Prepared) -> dict:
    from cxr_ray.evaluate.metrics import summarize_folds

    table = prep.table
    labels, groups = table["label"].to_numpy(), table["group"].to_numpy()
    test_mask = carve(labels, groups, cfg.test_fraction, cfg.seed, "test") if cfg.test_fraction > 0 else np.zeros(len(table), bool)
    table["partition"] = "test"
    dev = table[~test_mask]
    table.loc[~test_mask, "partition"] = "fold" + kfold_assign(dev, cfg.folds, seed=cfg.seed).astype(str)
    order = [f"fold{i}" for i in range(cfg.folds)] + ["test"]
    table, duplicates = deduplicate(table, "partition", order)
    check_disjoint(table, "partition")
    prep.table = table
    fingerprint = data_fingerprint(table["sha256"], table["label_name"])
    base = cfg.run_name or cfg.default_run_name()
    dev = table[table["partition"] != "test"]

    folds, reports, thresholds_per_fold, best_epochs = [], [], [], []
    for i in range(cfg.folds):
        held = dev[dev["partition"] == f"fold{i}"]
        rest = dev[dev["partition"] != f"fold{i}"]
        val_mask = carve(rest["label"].to_numpy(), rest["group"].to_numpy(), cfg.val_fraction, cfg.seed + 1 + i,
                         "validation")
        train_ids, val_ids = rest["row_id"].to_numpy()[~val_mask], rest["row_id"].to_numpy()[val_mask]
        outcome = fit(cfg, prep, train_ids, val_ids, name=f"{base}-fold{i}", label=f"fold {i + 1}/{cfg.folds}",
                      fingerprint=fingerprint)
        predicted = _predict(cfg, prep, outcome.best_state, val=val_ids, test=held["row_id"].to_numpy())
        val_labels, val_probs = predicted["val"]
        thresholds = pick_threshold(cfg, prep, val_labels, val_probs)
        test_labels, test_probs = predicted["test"]
        report = _report(cfg, prep, test_labels, test_probs, thresholds)
        reports.append(report)
        if thresholds.get("chosen_on") == "validation":
            thresholds_per_fold.append(thresholds["positive"])
        best_epochs.append(outcome.best_epoch)
        folds.append({
            "fold": i,
            "sizes": {"train": int(len(train_ids)), "val": int(len(val_ids)), "test": int(len(held)),
                      "test_patients": int(held["group"].nunique())},
            "thresholds": thresholds,
            "run": _run_record(outcome),
            "history": outcome.history,
            "test": report,
        })
        _log(f"[fold {i + 1}/{cfg.folds}] test accuracy {report['accuracy']:.4f} balanced "
             f"{report['balanced_accuracy']:.4f} (best epoch {outcome.best_epoch})", cfg)
    summary = summarize_folds(reports)

    final_epochs = max(1, int(round(statistics.median(best_epochs))))
    final_threshold = {}
    if prep.positive_class is not None:
        if thresholds_per_fold:
            final_threshold = {
                "positive": float(statistics.median(thresholds_per_fold)),
                "target_sensitivity": cfg.target_sensitivity,
                "chosen_on": "validation",
                "method": f"median of the {len(thresholds_per_fold)} folds' validation-chosen thresholds",
                "per_fold": thresholds_per_fold,
            }
        else:
            final_threshold = {"positive": 0.5, "chosen_on": "default",
                               "note": "no fold could choose a threshold on its validation split"}
    dev_ids = dev["row_id"].to_numpy()
    final = fit(cfg, prep, dev_ids, None, name=f"{base}-final", label="final", fingerprint=fingerprint,
                epochs=final_epochs)
    test_ids = table.loc[table["partition"] == "test", "row_id"].to_numpy()
    test_report, test_labels, test_probs = None, None, None
    if len(test_ids):
        test_labels, test_probs = _predict(cfg, prep, final.best_state, test=test_ids)["test"]
        test_report = _report(cfg, prep, test_labels, test_probs, final_threshold)

    sizes = _split_sizes(table, "partition", prep.classes)
    final_record = {
        "trained_on": "all development (non-test) images: every fold, no validation carve",
        "images": int(len(dev_ids)),
        "patients": int(dev["group"].nunique()),
        "epochs": final_epochs,
        "epochs_rule": f"median of the folds' best epochs {best_epochs}",
        "thresholds": final_threshold,
        "evaluated_on": "held-out test split" if len(test_ids) else "nothing (--test-fraction 0)",
        "run": _run_record(final),
    }
    cv_doc = {
        "n_folds": cfg.folds,
        "protocol": ("patient-level StratifiedGroupKFold over the development set; per fold, validation = "
                     f"about {cfg.val_fraction:.0%} of the training patients (best epoch, threshold); "
                     f"test = the held-out fold"),
        "folds": folds,
        "summary": summary,
        "table": _mean_std_table(summary),
        "final_model": final_record,
        "partitions": sizes,
        "duplicates": duplicates,
    }
    data = {**prep.report, "duplicates": duplicates, "partitions": sizes, "used": int(len(table))}
    training = _training_record(cfg, prep, run=_run_record(final), final_model=final_record,
                                data={k: data[k] for k in ("decoded", "used", "undecodable", "patients")}
                                | {"duplicates_removed": duplicates["files_removed"]})
    card_metrics = {"test": test_report, "cv": _mean_std_table(summary), "split_used_for_metrics": "test"}
    metrics_doc = {"test": test_report, "cv": _mean_std_table(summary), "thresholds": final_threshold,
                   "history": final.history, "data": data, "final_model": final_record}
    plots = {"history": final.history}
    if test_report:
        plots.update(labels=test_labels, probs=test_probs, confusion=test_report["confusion_matrix"])
    card, files = _write_outputs(cfg, prep, final.best_state, thresholds=final_threshold, card_metrics=card_metrics,
                                 metrics_doc=metrics_doc, training=training, fingerprint=fingerprint, plots=plots,
                                 extra_files={"cv_summary.json": cv_doc},
                                 heatmap_samples=(_heatmap_samples(prep, test_ids, "held-out test images")
                                                  if len(test_ids) else
                                                  _heatmap_samples(prep, dev_ids, "training images (no test split)")))
    return {
        **_artifact_summary(cfg, prep, card),
        "folds": cfg.folds,
        "cv": _mean_std_table(summary),
        "final_model": {k: final_record[k] for k in ("trained_on", "images", "epochs", "thresholds")},
        "test": headline(test_report),
        "data": {"files": prep.report["listing"]["files"], "decoded": prep.report["decoded"], "used": int(len(table)),
                 "undecodable": prep.report["undecodable"]["by_code"], "duplicates_removed": duplicates["files_removed"],
                 "files_without_patient_id": prep.report["patients"]["files_without_patient_id"],
                 "partitions": {k: v["images"] for k, v in sizes.items()}, "fingerprint": fingerprint},
        "files": files,
    }


HEADLINE_METRICS = (
    "accuracy", "balanced_accuracy", "macro_auc", "binary.sensitivity", "binary.specificity", "binary.auc",
)


def _mean_std_table(summary: dict) -> dict:
    """``{metric: {"mean", "std"}}`` for the headline metrics and every per-class sensitivity/specificity."""
    out = {}
    for name, value in summary["metrics"].items():
        if name in HEADLINE_METRICS or name.endswith((".sensitivity", ".specificity")):
            out[name] = {"mean": value["mean"], "std": value["std"]}
    return out


# --------------------------------------------------------------------------- entry point


def train(cfg: TrainConfig) -> dict:
    """Run what ``cfg`` asks for (one run or k-fold CV); returns the JSON summary."""
    from cxr_ray.train.ingest import deterministic_order

    cfg.validate()
    started = time.perf_counter()
    with deterministic_order():
        prep = prepare(cfg)
        summary = run_cv(cfg, prep) if cfg.folds else run_single(cfg, prep)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary

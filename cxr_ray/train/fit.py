"""One Ray Train run (``TorchTrainer.fit``) on given rows: its plan, resources, storage and outcome.

A run of the same name under the same storage path resumes (Ray Train's
checkpoint); a marker next to it refuses to resume a run that trained on
other data.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray
import ray.train
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from cxr_ray.console import ray_train_log_level
from cxr_ray.data.augment import AugmentConfig
from cxr_ray.data.splits import class_weights
from cxr_ray.errors import CxrRayError, UsageError
from cxr_ray.io.storage import get_filesystem, is_remote, to_pyarrow_filesystem
from cxr_ray.train.config import TrainConfig, settled
from cxr_ray.train.epoch_state import load_state
from cxr_ray.train.ingest import subset
from cxr_ray.train.loop import train_loop_per_worker
from cxr_ray.train.plan import WorkerPlan
from cxr_ray.train.prepare import Prepared, log

RUN_MARKER = "cxr_run.json"


class TrainingError(CxrRayError):
    """A Ray Train run failed (after its retries); re-running the command resumes it."""


@dataclass
class FitOutcome:
    best_state: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    resumed: bool
    run_name: str
    storage_path: str
    seconds: float
    monitor: str
    warning: str | None = None

    def record(self) -> dict[str, Any]:
        """What reports say about the run."""
        return {
            "run_name": self.run_name,
            "storage_path": self.storage_path,
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "resumed": self.resumed,
            "monitor": self.monitor,
            "seconds": self.seconds,
            **({"warning": self.warning} if self.warning else {}),
        }


def _storage(cfg: TrainConfig) -> tuple[str, Any, Any, str]:
    """(storage_path for RunConfig, pyarrow filesystem or None, fsspec fs, root path)."""
    uri = cfg.storage_path or cfg.default_storage_path()
    fs, root = get_filesystem(uri, cfg.s3_endpoint)
    if is_remote(uri):
        return root, to_pyarrow_filesystem(fs), fs, root
    os.makedirs(root, exist_ok=True)
    return root, None, fs, root


def _check_run_marker(fs: Any, root: str, name: str, fingerprint: str, classes: list[str]) -> bool:
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
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = [float(n.get("Resources", {}).get("CPU", 0)) for n in nodes] or [1.0]
    return float(sum(per_node)), max(per_node)


def _auc_defined(labels: np.ndarray, prep: Prepared) -> bool:
    if prep.positive_class is not None:
        pos = labels == prep.classes.index(prep.positive_class)
        return bool(pos.any() and not pos.all())
    return any(0 < (labels == c).sum() < len(labels) for c in range(len(prep.classes)))


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    """The augmentation a (resolved) config asks for."""
    return AugmentConfig(
        enabled=cfg.augment, hflip=cfg.hflip, crop_scale=tuple(cfg.crop_scale or (1.0, 1.0)),  # type: ignore[arg-type]
        crop_ratio=tuple(cfg.crop_ratio or (1.0, 1.0)),  # type: ignore[arg-type]
        rotation=float(cfg.rotation or 0.0), translate=float(cfg.translate or 0.0),
        brightness=float(cfg.brightness or 0.0), contrast=float(cfg.contrast or 0.0), gamma=float(cfg.exposure_gamma or 0.0))


def _plan(cfg: TrainConfig, prep: Prepared, train_ids: np.ndarray, val_ids: np.ndarray | None, *,
          label: str, fingerprint: str, epochs: int | None) -> tuple[WorkerPlan, float]:
    """The workers' plan and the CPUs each worker asks for."""
    table = prep.table.set_index("row_id")
    monitor = settled(cfg.monitor)
    has_val = val_ids is not None and len(val_ids) > 0
    if has_val and monitor == "val_auc" and not _auc_defined(table.loc[val_ids, "label"].to_numpy(), prep):
        log(f"[{label}] val_auc is undefined on this validation split; monitoring val_loss", cfg)
        monitor = "val_loss"
    workers = cfg.num_workers
    rows_per_worker = len(train_ids) // workers
    if rows_per_worker < 2:
        raise UsageError(f"{len(train_ids)} training images cannot feed {workers} worker(s)")
    batch = max(2, min(cfg.batch_size, rows_per_worker))
    total_cpus, node_cpus = _cluster_cpus()
    cpus = cfg.cpus_per_worker or (1.0 if cfg.use_gpu else max(1.0, min(node_cpus, total_cpus // workers)))
    train_labels = table.loc[train_ids, "label"].to_numpy()
    plan = WorkerPlan(
        train=replace(cfg, epochs=epochs) if epochs else cfg,
        classes=prep.classes,
        positive_index=prep.classes.index(prep.positive_class) if prep.positive_class else None,
        class_weights=class_weights(train_labels, len(prep.classes)) if cfg.class_weighting == "balanced" else None,
        initial_state=[ray.put(prep.initial_state)],
        preprocessing=dict(prep.preprocessing),
        augment=augment_config(cfg).to_dict(),
        steps_per_epoch=max(1, rows_per_worker // batch),
        batch_size=batch,
        shuffle_buffer=int(min(rows_per_worker, max(8 * batch, 256))),
        has_val=has_val,
        monitor=monitor,
        label=label,
        fingerprint=fingerprint,
        threads=int(cpus),
    )
    return plan, cpus


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
    started = time.perf_counter()
    plan, cpus = _plan(cfg, prep, train_ids, val_ids, label=label, fingerprint=fingerprint, epochs=epochs)
    datasets = {"train": subset(prep.decoded, train_ids)}
    if plan.has_val and val_ids is not None:
        datasets["val"] = subset(prep.decoded, val_ids)
    storage_path, storage_fs, fs, root = _storage(cfg)
    existed = _check_run_marker(fs, root, name, fingerprint, prep.classes)
    resources = {"CPU": cpus, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            logging_config=LoggingConfig(log_level=ray_train_log_level()),  # type: ignore[call-arg]  # Train V2 RunConfig; mypy sees the ray.air one
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    log(
        f"[{label}] Ray Train run {name!r}{' (resuming)' if existed else ''}: {len(train_ids)} train / "
        f"{0 if val_ids is None else len(val_ids)} val images, {cfg.num_workers} worker(s) x {cpus:g} CPU"
        f"{' + 1 GPU' if cfg.use_gpu else ''}, {plan.train.epochs} epochs, batch {plan.batch_size}/worker",
        cfg,
    )
    outcome = _outcome(cfg, trainer, name=name, label=label, monitor=plan.monitor, started=started)
    outcome.warning = chance_warning(outcome.history, len(prep.classes), plan.steps_per_epoch)
    if outcome.warning:
        log(f"[{label}] warning: {outcome.warning}", cfg)
    return outcome


CHANCE_MARGIN = 0.05  # balanced accuracy within this of 1/K reads as "learned nothing"


def chance_warning(history: list[dict[str, Any]], num_classes: int, steps_per_epoch: int) -> str | None:
    """A plain-language warning when a run ended at chance level on its validation split, else None."""
    rows = [r for r in history if r.get("val_balanced_accuracy") is not None]
    if not rows:
        return None
    last, chance = float(rows[-1]["val_balanced_accuracy"]), 1.0 / num_classes
    if last > chance + CHANCE_MARGIN:
        return None
    steps = steps_per_epoch * len(history)
    return (f"validation balanced accuracy {last:.2f} \u2248 chance {chance:.2f} after {len(history)} epochs "
            f"({steps} optimizer steps): too few steps? Try more --epochs or a smaller --batch-size")


def _outcome(cfg: TrainConfig, trainer: TorchTrainer, *, name: str, label: str, monitor: str,
             started: float) -> FitOutcome:
    storage = cfg.storage_path or cfg.default_storage_path()
    try:
        result = trainer.fit()  # RAY
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise TrainingError(
            f"[{label}] training run {name!r} failed: {type(exc).__name__}: {first_line}. "
            f"Re-run the same command to resume from its last checkpoint (storage {storage})."
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
        storage_path=storage,
        seconds=round(time.perf_counter() - started, 2),
        monitor=monitor,
    )

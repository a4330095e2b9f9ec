"""The function every Ray Train worker runs: plain PyTorch, Ray calls marked ``# RAY``.

One epoch = :func:`~cxr_ray.train.steps.train_one_epoch` over this worker's
shard of the training set, then :func:`~cxr_ray.train.steps.predict_shard`
over the validation set (each worker predicts every ``world_size``-th batch,
the predictions are gathered so every rank computes the same metrics and
takes the same early-stopping decision), then one ``ray.train.report`` with
the metrics and a checkpoint (rank 0 writes it). Before validation the
BatchNorm statistics are re-estimated on the epoch's last training images
("precise BN", :func:`~cxr_ray.train.steps.recalibrate_batchnorm`) and made
identical across ranks, so validation, the checkpoint and the artifact all use
the same, current statistics. Resuming: :class:`~cxr_ray.train.epoch_state.EpochState`.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train  # RAY
import ray.train.torch  # RAY
import torch
import torch.distributed as dist
from torch import nn

from cxr_ray.models.build import build_model
from cxr_ray.models.transfer import configure_mode, set_train_mode
from cxr_ray.progress import epoch_eta
from cxr_ray.train.batches import BatchPreparer
from cxr_ray.train.config import MONITORS, settled
from cxr_ray.train.epoch_state import EpochState, improved
from cxr_ray.train.plan import WorkerPlan
from cxr_ray.train.steps import (
    amp_settings,
    average_batchnorm_buffers,
    decay_groups,
    lr_factor_fn,
    predict_shard,
    recalibrate_batchnorm,
    train_one_epoch,
    val_metrics,
)


def _log(line: str) -> None:
    # Not print(): Ray Train patches it to log AND tee, so every line would show twice.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@dataclass
class _Worker:
    """One worker's model, optimisation objects and place in the cluster."""

    plan: WorkerPlan
    rank: int
    world: int
    device: torch.device
    raw_model: nn.Module  # the network itself (the checkpoint's, BatchNorm passes)
    model: nn.Module  # what trains: raw_model, wrapped in DDP when world > 1
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    criterion: nn.Module
    batches: BatchPreparer
    ema: torch.optim.swa_utils.AveragedModel | None  # the weights that are evaluated and kept, when on

    @property
    def kept_model(self) -> nn.Module:
        """What validation scores and the checkpoint keeps: the EMA weights when on, else the network."""
        return self.ema.module if self.ema is not None else self.raw_model


def _build_worker(plan: WorkerPlan, state: EpochState) -> _Worker:
    cfg = plan.train
    context = ray.train.get_context()  # RAY
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed * 1000 + rank)
    torch.set_num_threads(max(1, plan.threads))
    device = ray.train.torch.get_device()  # RAY
    model = build_model(cfg.arch, len(plan.classes))
    model.load_state_dict(ray.get(plan.initial_state[0]))  # RAY: weights the driver built
    if state.saved is not None:
        model.load_state_dict(state.saved["model"])
    lr, epochs = settled(cfg.lr), settled(cfg.epochs)
    groups = configure_mode(model, cfg.arch, cfg.train_mode, lr=lr, backbone_lr_factor=cfg.backbone_lr_factor,
                            finetune_blocks=cfg.finetune_blocks)
    model = model.to(memory_format=torch.channels_last)  # the inputs are channels_last too (steps._to_device)
    wrapped = ray.train.torch.prepare_model(model)  # RAY: to device, DDP when world > 1
    optimizer = torch.optim.AdamW(decay_groups(groups, settled(cfg.weight_decay)), lr=lr)
    steps = plan.steps_per_epoch
    warmup = int(round(settled(cfg.warmup_epochs) * steps)) if epochs > 1 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_factor_fn(settled(cfg.schedule), total_steps=epochs * steps, warmup_steps=warmup, steps_per_epoch=steps,
                     step_size=cfg.step_size, gamma=cfg.gamma),
    )
    amp_dtype, needs_scaler = amp_settings(device, cfg.cpu_bf16)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)
    ema = _ema(model, float(cfg.ema_decay or 0.0))
    if state.saved is not None:
        optimizer.load_state_dict(state.saved["optimizer"])
        scheduler.load_state_dict(state.saved["scheduler"])
        scaler.load_state_dict(state.saved["scaler"])
        if ema is not None and state.saved.get("ema") is not None:
            ema.load_state_dict(state.saved["ema"])
    weights = torch.tensor(plan.class_weights, dtype=torch.float32, device=device) if plan.class_weights else None
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=float(cfg.label_smoothing or 0.0))
    batches = BatchPreparer(dict(plan.preprocessing), plan.augment if cfg.augment else None,
                            num_classes=len(plan.classes), mixup=float(cfg.mixup or 0.0),
                            cutmix=float(cfg.cutmix or 0.0))
    return _Worker(plan, rank, world, device, model, wrapped, optimizer, scheduler, scaler, amp_dtype,
                   criterion, batches, ema)


def _ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the weights AND BatchNorm buffers (``use_buffers``), or None."""
    if not decay:
        return None
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)


def _train_epoch(w: _Worker, epoch: int, attempt: int) -> dict[str, Any]:
    """Train on this worker's shard, re-estimate BatchNorm, and the epoch's row (all ranks summed)."""
    cfg = w.plan.train
    torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + w.rank)  # per epoch: a resumed run draws the same
    set_train_mode(w.raw_model, cfg.arch, cfg.train_mode)
    shard = ray.train.get_dataset_shard("train")  # RAY: this worker's streamed shard
    batches = shard.iter_torch_batches(
        batch_size=w.plan.batch_size, drop_last=True, device="cpu",
        local_shuffle_buffer_size=w.plan.shuffle_buffer, local_shuffle_seed=cfg.seed * 1000 + epoch * 10 + w.rank,
    )
    recent: list[torch.Tensor] = []
    ema = w.ema
    stats = train_one_epoch(w.model, batches, w.criterion, w.optimizer, w.scheduler, w.scaler, w.device,
                            prepare=w.batches.train, amp_dtype=w.amp_dtype, keep_inputs=recent,
                            keep_images=cfg.precise_bn_images,
                            after_step=None if ema is None else lambda: ema.update_parameters(w.raw_model))
    if cfg.precise_bn_images:
        w.kept_model.train()  # precise BN re-estimates the statistics of the weights that are kept
        recalibrate_batchnorm(w.kept_model, recent, w.device, w.amp_dtype)
    del recent
    average_batchnorm_buffers(w.kept_model, w.world)
    totals = torch.tensor([stats["loss_sum"], stats["correct"], stats["n"]], dtype=torch.float64, device=w.device)
    if w.world > 1:
        dist.all_reduce(totals)
    loss_sum, correct, seen = totals.tolist()
    return {
        "epoch": epoch,
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "lr": max(group["lr"] for group in w.optimizer.param_groups),
        "images": int(seen),
        "seconds": round(stats["seconds"], 3),
        "images_per_s": round(seen / max(stats["seconds"], 1e-9), 2),  # all workers together
        "attempt": attempt,
    }


def _validate(w: _Worker) -> dict[str, Any]:
    """Validation metrics, the same on every rank (each predicts a share, all gather)."""
    w.kept_model.eval()
    val_batches = ray.train.get_dataset_shard("val").iter_torch_batches(  # RAY: full val set on every rank
        batch_size=max(w.plan.batch_size, 64), device="cpu")
    part = predict_shard(w.kept_model, val_batches, w.device, rank=w.rank, world=w.world, amp_dtype=w.amp_dtype,
                         prepare=w.batches.evaluate)
    parts: list[Any] = [None] * w.world
    if w.world > 1:
        dist.all_gather_object(parts, part)
    else:
        parts = [part]
    labels = np.concatenate([p[1] for p in parts if len(p[1])])
    probs = np.concatenate([p[2] for p in parts if len(p[1])])
    return val_metrics(labels, probs, w.plan.positive_index)


def _report(w: _Worker, state: EpochState, row: dict[str, Any]) -> None:
    """Metrics and (rank 0) the checkpoint to Ray Train."""
    metrics = {k: v for k, v in row.items() if v is not None}
    metrics.update({"stopped": state.stopped, "attempt": state.attempt})
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if w.rank == 0:
            state.save(directory, w.raw_model, w.optimizer, w.scheduler, w.scaler, w.plan.fingerprint,
                       ema=w.ema)
            checkpoint = ray.train.Checkpoint.from_directory(directory)  # RAY
        ray.train.report(metrics, checkpoint=checkpoint)  # RAY: metrics + checkpoint to storage_path


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config`` is ``{"plan": WorkerPlan}`` from :mod:`cxr_ray.train.fit`."""
    plan: WorkerPlan = config["plan"]
    cfg, label, monitor = plan.train, plan.label, plan.monitor
    checkpoint = ray.train.get_checkpoint()  # RAY: set when resuming
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = EpochState.restore(directory)
    else:
        state = EpochState()
    w = _build_worker(plan, state)
    start_epoch = state.epoch + 1
    if start_epoch > 1 and w.rank == 0:
        _log(f"[{label}] resumed from checkpoint after epoch {start_epoch - 1} (attempt {state.attempt})")
    epochs = settled(cfg.epochs)
    for epoch in range(start_epoch, epochs + 1):
        if state.stopped:
            break
        row = _train_epoch(w, epoch, state.attempt)
        if plan.has_val:
            row.update(_validate(w))
        # "last" keeps every epoch's weights in turn (the schedule's end wins); "best" the best --monitor epoch
        is_better = (cfg.select == "last" or not plan.has_val
                     or improved(row.get(monitor), state.best, MONITORS[monitor]))
        state.record(row, is_better=is_better, value=row.get(monitor) if plan.has_val else None,
                     patience=cfg.patience if plan.has_val else None, model=w.kept_model)
        _report(w, state, row)
        if w.rank == 0 and not cfg.quiet:
            _log(_progress_line(label, row, epochs, is_better))
        if cfg.fail_after_epoch == epoch and start_epoch <= epoch:
            raise RuntimeError(f"injected failure after epoch {epoch} (--fail-after-epoch, for resume tests)")
        if state.stopped:
            if w.rank == 0 and not cfg.quiet:
                _log(f"[{label}] early stop: no {monitor} improvement for {cfg.patience} epochs; "
                     f"best epoch {state.best_epoch}")
            break


def _progress_line(label: str, row: dict[str, Any], epochs: int, is_better: bool) -> str:
    parts = [f"[{label}] epoch {row['epoch']}/{epochs}", f"train_loss={row['train_loss']:.4f}",
             f"train_acc={row['train_accuracy']:.3f}"]
    for key, short in (("val_loss", "val_loss"), ("val_accuracy", "val_acc"),
                       ("val_balanced_accuracy", "val_bacc"), ("val_auc", "val_auc")):
        if row.get(key) is not None:
            parts.append(f"{short}={row[key]:.4f}")
    parts.append(f"lr={row['lr']:.2e}")
    parts.append(f"{row['seconds']:.1f}s {row['images_per_s']:.0f} img/s")
    parts.append(epoch_eta(row["epoch"], epochs, row["seconds"]))
    if is_better and "val_loss" in row:
        parts.append("*")
    return " ".join(parts)

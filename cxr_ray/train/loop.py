"""The function every Ray Train worker runs: plain PyTorch, Ray calls marked ``# RAY``.

One epoch = :func:`train_one_epoch` over this worker's shard of the training
set, then :func:`predict_shard` over the validation set (each worker predicts
every ``world_size``-th batch, the predictions are gathered so every rank
computes the same metrics and takes the same early-stopping decision), then
one ``ray.train.report`` with the metrics and a checkpoint (rank 0 writes it).
Before validation the BatchNorm statistics are re-estimated on the epoch's
last training images ("precise BN", :func:`recalibrate_batchnorm`) and made
identical across ranks, so validation, the checkpoint and the artifact all
use the same, current statistics.

Resuming: the checkpoint holds the model, optimizer, LR scheduler, AMP scaler,
early-stopping state, the best weights so far and the per-epoch history.
``ray.train.get_checkpoint()`` returns it after a worker failure (within one
``fit``, up to ``FailureConfig.max_failures``) and when the same command is
run again (same ``RunConfig(name, storage_path)``); training continues at the
next unfinished epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from cxr_ray.train.config import MONITORS

STATE_FILE = "state.pt"


# --------------------------------------------------------------------------- schedule


def lr_factor_fn(
    schedule: str, *, total_steps: int, warmup_steps: int, steps_per_epoch: int, step_size: int = 10,
    gamma: float = 0.1, min_factor: float = 0.01,
) -> Callable[[int], float]:
    """Multiplier of each group's base LR at optimizer step ``i``: linear warmup, then the schedule."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "step":
            return gamma ** ((step // max(1, steps_per_epoch)) // max(1, step_size))
        return 1.0

    return factor


# --------------------------------------------------------------------------- one epoch


def amp_settings(device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, needs GradScaler): bf16 where supported, else fp16; none on CPU."""
    if device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    amp_dtype: torch.dtype | None = None,
    keep_inputs: list[torch.Tensor] | None = None,
    keep_images: int = 0,
) -> dict:
    """One pass over ``batches``; returns summed loss, correct count, images and seconds.

    The last inputs, up to ``keep_images``, are appended to ``keep_inputs``
    (CPU) for :func:`recalibrate_batchnorm`.
    """
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    kept = 0
    for batch in batches:
        images, labels = batch["image"], batch["label"]
        if augment is not None:
            images = augment(images)
        if keep_inputs is not None and keep_images:
            keep_inputs.append(images)
            kept += len(images)
            while keep_inputs and kept - len(keep_inputs[0]) >= keep_images:
                kept -= len(keep_inputs.pop(0))
        images, labels = _to_device(images, device), labels.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(images)
            loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += float(loss.detach()) * len(labels)
        correct += int((logits.detach().argmax(1) == labels).sum())
        seen += len(labels)
    return {"loss_sum": loss_sum, "correct": correct, "n": seen, "seconds": time.perf_counter() - start}


_BATCHNORM = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs: list[torch.Tensor], device: torch.device,
                          amp_dtype: torch.dtype | None = None) -> int:
    """"Precise BN": re-estimate the running statistics of the TRAINING BatchNorm layers.

    Running averages (momentum 0.1) trail weights that change fast, which is
    what a short run from scratch does: evaluation-mode outputs then lag the
    model. This replaces them by the plain average over ``inputs`` (training
    images of this epoch, augmented as trained) with the current weights
    (Wu & Johnson 2021, "Rethinking batch in BatchNorm"). BatchNorm layers in
    eval mode (frozen parts, see ``set_train_mode``) keep their statistics.
    Call with the model in training mode; returns the images used.
    """
    layers = [m for m in model.modules() if isinstance(m, _BATCHNORM) and m.training and m.track_running_stats]
    if not layers or not inputs:
        return 0
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches below
    used = 0
    for images in inputs:
        if len(images) < 2:
            continue
        with _autocast(device, amp_dtype):
            model(_to_device(images, device))
        used += len(images)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    return used


def average_batchnorm_buffers(model: nn.Module, world: int) -> None:
    """Make BatchNorm running statistics identical on every rank (their mean)."""
    import torch.distributed as dist

    if world < 2:
        return
    for layer in model.modules():
        if isinstance(layer, _BATCHNORM) and layer.track_running_stats and layer.running_mean is not None:
            for buffer in (layer.running_mean, layer.running_var):
                dist.all_reduce(buffer)
                buffer.div_(world)


@torch.inference_mode()
def predict_shard(
    model: nn.Module, batches: Iterable[dict], device: torch.device, *, rank: int = 0, world: int = 1,
    amp_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row_ids, labels, probabilities) of every ``world``-th batch starting at ``rank``."""
    ids, labels, probs = [], [], []
    for i, batch in enumerate(batches):
        if i % world != rank:
            continue
        with _autocast(device, amp_dtype):
            logits = model(_to_device(batch["image"], device))
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        ids.append(batch["row_id"].numpy())
        labels.append(batch["label"].numpy())
    if not probs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(ids), np.concatenate(labels), np.concatenate(probs)


def val_metrics(labels: np.ndarray, probs: np.ndarray, positive_index: int | None) -> dict:
    """Validation loss (unweighted CE), accuracy, balanced accuracy and AUC (positive class, else macro)."""
    from sklearn.metrics import roc_auc_score

    eps = 1e-7
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], eps, 1.0))))
    pred = probs.argmax(1)
    recalls = [float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)]
    balanced = float(np.mean(recalls)) if recalls else None
    auc = None
    classes = [positive_index] if positive_index is not None else range(probs.shape[1])
    aucs = []
    for c in classes:
        positive = labels == c
        if 0 < positive.sum() < len(labels):
            aucs.append(float(roc_auc_score(positive, probs[:, c])))
    if aucs:
        auc = float(np.mean(aucs))
    return {
        "val_loss": loss,
        "val_accuracy": float(np.mean(pred == labels)),
        "val_balanced_accuracy": balanced,
        "val_auc": auc,
    }


# --------------------------------------------------------------------------- checkpoints


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_state(directory: str) -> dict:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def _improved(value: float | None, best: float | None, direction: str) -> bool:
    if value is None:
        return False
    if best is None:
        return True
    return value < best - 1e-6 if direction == "min" else value > best + 1e-6


def _log(line: str) -> None:
    # Not print(): Ray Train patches it to log AND tee, so every line would show twice.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- the worker function


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config`` is built by :mod:`cxr_ray.train.runner`."""
    import ray
    import ray.train  # RAY
    import ray.train.torch  # RAY
    import torch.distributed as dist

    from cxr_ray.data.augment import AugmentConfig, RadiographAugment
    from cxr_ray.models.registry import build_model
    from cxr_ray.models.transfer import configure_mode, set_train_mode
    from cxr_ray.train.config import TrainConfig

    cfg = TrainConfig.from_dict(config["train"])
    context = ray.train.get_context()  # RAY
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed * 1000 + rank)
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    device = ray.train.torch.get_device()  # RAY
    classes, label = config["classes"], config["label"]
    has_val = config["has_val"]

    model = build_model(cfg.arch, len(classes))
    model.load_state_dict(ray.get(config["initial_state"][0]))  # RAY: weights the driver built
    state = {"epoch": 0, "best": None, "best_epoch": 0, "bad_epochs": 0, "stopped": False, "history": [],
             "attempt": 1, "best_model": None}
    checkpoint = ray.train.get_checkpoint()  # RAY: set when resuming
    saved = None
    if checkpoint:
        with checkpoint.as_directory() as directory:
            saved = load_state(directory)
        model.load_state_dict(saved["model"])
        state.update({k: saved[k] for k in ("epoch", "best", "best_epoch", "bad_epochs", "stopped", "history")})
        state["best_model"] = saved["best_model"]
        state["attempt"] = int(saved["attempt"]) + 1
    start_epoch = state["epoch"] + 1

    groups = configure_mode(model, cfg.arch, cfg.mode, lr=cfg.lr, backbone_lr_factor=cfg.backbone_lr_factor,
                            finetune_blocks=cfg.finetune_blocks)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    raw_model = model
    model = ray.train.torch.prepare_model(model)  # RAY: to device, DDP when world > 1
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = int(config["steps_per_epoch"])
    warmup = int(round(cfg.warmup_epochs * steps)) if cfg.epochs > 1 else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_factor_fn(cfg.schedule, total_steps=cfg.epochs * steps, warmup_steps=warmup, steps_per_epoch=steps,
                     step_size=cfg.step_size, gamma=cfg.gamma),
    )
    amp_dtype, needs_scaler = amp_settings(device)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_scaler)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])

    weights = torch.tensor(config["class_weights"], dtype=torch.float32, device=device) if config["class_weights"] else None
    criterion = nn.CrossEntropyLoss(weight=weights)
    preprocessing = config["preprocessing"]
    augment = RadiographAugment(AugmentConfig.from_dict(config["augment"]), preprocessing["mean"], preprocessing["std"])
    monitor = config["monitor"]  # cfg.monitor, or val_loss where the driver found it undefined
    batch_size = int(config["batch_size"])

    if start_epoch > 1 and rank == 0:
        _log(f"[{label}] resumed from checkpoint after epoch {start_epoch - 1} (attempt {state['attempt']})")
    for epoch in range(start_epoch, cfg.epochs + 1):
        if state["stopped"]:
            break
        torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + rank)  # per epoch: a resumed run draws the same
        set_train_mode(raw_model, cfg.arch, cfg.mode)
        shard = ray.train.get_dataset_shard("train")  # RAY: this worker's streamed shard
        batches = shard.iter_torch_batches(
            batch_size=batch_size, drop_last=True, device="cpu",
            local_shuffle_buffer_size=int(config["shuffle_buffer"]), local_shuffle_seed=cfg.seed * 1000 + epoch * 10 + rank,
        )
        recent: list[torch.Tensor] = []
        stats = train_one_epoch(model, batches, criterion, optimizer, scheduler, scaler, device,
                                augment=augment if cfg.augment else None, amp_dtype=amp_dtype,
                                keep_inputs=recent, keep_images=cfg.precise_bn_images)
        if cfg.precise_bn_images:
            recalibrate_batchnorm(raw_model, recent, device, amp_dtype)
        del recent
        average_batchnorm_buffers(raw_model, world)
        totals = torch.tensor([stats["loss_sum"], stats["correct"], stats["n"]], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(totals)
        loss_sum, correct, seen = totals.tolist()
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "lr": max(group["lr"] for group in optimizer.param_groups),
            "images": int(seen),
            "seconds": round(stats["seconds"], 3),
            "images_per_s": round(seen / max(stats["seconds"], 1e-9), 2),  # all workers together
            "attempt": state["attempt"],
        }
        if has_val:
            raw_model.eval()
            val_batches = ray.train.get_dataset_shard("val").iter_torch_batches(  # RAY: full val set on every rank
                batch_size=max(batch_size, 64), device="cpu")
            part = predict_shard(raw_model, val_batches, device, rank=rank, world=world, amp_dtype=amp_dtype)
            parts = [None] * world
            if world > 1:
                dist.all_gather_object(parts, part)
            else:
                parts = [part]
            labels = np.concatenate([p[1] for p in parts if len(p[1])])
            probs = np.concatenate([p[2] for p in parts if len(p[1])])
            row.update(val_metrics(labels, probs, config["positive_index"]))
            improved = _improved(row.get(monitor), state["best"], MONITORS[monitor])
        else:
            improved = True
        if improved:
            state["best"] = row.get(monitor) if has_val else None
            state["best_epoch"] = epoch
            state["bad_epochs"] = 0
            state["best_model"] = _cpu_state(raw_model)
        else:
            state["bad_epochs"] += 1
        row["best_epoch"] = state["best_epoch"]
        if has_val and cfg.patience and state["bad_epochs"] >= cfg.patience:
            state["stopped"] = True
            row["early_stopped"] = True
        state["epoch"] = epoch
        state["history"].append(row)

        metrics = {k: v for k, v in row.items() if v is not None}
        metrics.update({"stopped": state["stopped"], "attempt": state["attempt"]})
        with tempfile.TemporaryDirectory() as directory:
            ckpt = None
            if rank == 0:
                torch.save(
                    {
                        **{k: state[k] for k in ("epoch", "best", "best_epoch", "bad_epochs", "stopped", "history",
                                                 "attempt", "best_model")},
                        "model": _cpu_state(raw_model),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "fingerprint": config["fingerprint"],
                    },
                    os.path.join(directory, STATE_FILE),
                )
                ckpt = ray.train.Checkpoint.from_directory(directory)  # RAY
            ray.train.report(metrics, checkpoint=ckpt)  # RAY: metrics + checkpoint to storage_path
        if rank == 0 and not cfg.quiet:
            _log(_progress_line(label, row, cfg.epochs, improved))
        if cfg.fail_after_epoch == epoch and start_epoch <= epoch:
            raise RuntimeError(f"injected failure after epoch {epoch} (--fail-after-epoch, for resume tests)")
        if state["stopped"]:
            if rank == 0 and not cfg.quiet:
                _log(f"[{label}] early stop: no {monitor} improvement for {cfg.patience} epochs; "
                     f"best epoch {state['best_epoch']}")
            break


def _progress_line(label: str, row: dict, epochs: int, improved: bool) -> str:
    parts = [f"[{label}] epoch {row['epoch']}/{epochs}", f"train_loss={row['train_loss']:.4f}",
             f"train_acc={row['train_accuracy']:.3f}"]
    for key, short in (("val_loss", "val_loss"), ("val_accuracy", "val_acc"),
                       ("val_balanced_accuracy", "val_bacc"), ("val_auc", "val_auc")):
        if row.get(key) is not None:
            parts.append(f"{short}={row[key]:.4f}")
    parts.append(f"lr={row['lr']:.2e}")
    parts.append(f"{row['seconds']:.1f}s {row['images_per_s']:.0f} img/s")
    if improved and "val_loss" in row:
        parts.append("*")
    return " ".join(parts)

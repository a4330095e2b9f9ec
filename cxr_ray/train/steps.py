"""The steps of one training epoch, plain PyTorch: schedule, optimizer steps, precise BN, validation.

Used by the Ray Train worker (:mod:`cxr_ray.train.loop`) and by ``cxr-ray bench
train``'s plain loop, so both time the same step function.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import roc_auc_score
from torch import nn

from cxr_ray.engines.torch.runtime import cpu_has_native_bf16

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


def amp_settings(device: torch.device, cpu_bf16: str = "off") -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, needs GradScaler): on GPUs bf16 where supported, else fp16.

    On the CPU, bf16 with ``cpu_bf16="on"``, or ``"auto"`` where this CPU has
    bf16 instructions (AVX512-BF16 / AMX; emulated bf16 is slower than fp32).
    """
    if device.type != "cuda":
        if cpu_bf16 == "on" or (cpu_bf16 == "auto" and cpu_has_native_bf16()):
            return torch.bfloat16, False
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    # channels_last on CPU too: oneDNN convolutions ran resnet18 training 1.27x faster in it (128 px, 2 cores)
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def decay_groups(groups: list[dict[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """Each param group split in two: weights decay, biases and norm-layer parameters (1-D) do not.

    Decaying BatchNorm scales and biases only pulls them towards 0 (the
    usual exclusion of timm / torchvision's reference recipes).
    """
    out = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        for decayed, part in ((True, [p for p in params if p.ndim > 1]), (False, [p for p in params if p.ndim <= 1])):
            if part:
                out.append({**group, "params": part, "weight_decay": weight_decay if decayed else 0.0})
    return out


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    prepare: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    amp_dtype: torch.dtype | None = None,
    keep_inputs: list[torch.Tensor] | None = None,
    keep_images: int = 0,
    after_step: Callable[[], None] | None = None,
) -> dict:
    """One pass over ``batches``; returns summed loss, correct count, images and seconds.

    ``prepare(images, labels) -> (inputs, targets)`` turns a cached batch into
    network inputs (augmentation, mixing, standardisation; targets may be soft,
    (N, K)). ``after_step`` runs after every optimizer step (the weight EMA).
    The last inputs, up to ``keep_images``, are appended to ``keep_inputs``
    (CPU) for :func:`recalibrate_batchnorm`.
    """
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    kept = 0
    for batch in batches:
        images, labels = batch["image"], batch["label"]
        targets = labels
        if prepare is not None:
            images, targets = prepare(images, labels)
        if keep_inputs is not None and keep_images:
            keep_inputs.append(images)
            kept += len(images)
            while keep_inputs and kept - len(keep_inputs[0]) >= keep_images:
                kept -= len(keep_inputs.pop(0))
        images, targets = _to_device(images, device), targets.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(images)
            loss = criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if after_step is not None:
            after_step()
        loss_sum += float(loss.detach()) * len(labels)
        correct += int((logits.detach().argmax(1).cpu() == labels).sum())
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

    if world < 2:
        return
    for layer in model.modules():
        if isinstance(layer, _BATCHNORM) and layer.track_running_stats and layer.running_mean is not None:
            for buffer in (layer.running_mean, layer.running_var):
                dist.all_reduce(buffer)  # type: ignore[arg-type]
                buffer.div_(world)  # type: ignore[union-attr]


@torch.inference_mode()
def predict_shard(
    model: nn.Module, batches: Iterable[dict], device: torch.device, *, rank: int = 0, world: int = 1,
    amp_dtype: torch.dtype | None = None, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row_ids, labels, probabilities) of every ``world``-th batch starting at ``rank``.

    ``prepare`` turns a cached batch into network inputs (standardisation).
    """
    ids, labels, probs = [], [], []
    for i, batch in enumerate(batches):
        if i % world != rank:
            continue
        images = batch["image"] if prepare is None else prepare(batch["image"])
        with _autocast(device, amp_dtype):
            logits = model(_to_device(images, device))
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        ids.append(batch["row_id"].numpy())
        labels.append(batch["label"].numpy())
    if not probs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(ids), np.concatenate(labels), np.concatenate(probs)


def val_metrics(labels: np.ndarray, probs: np.ndarray, positive_index: int | None) -> dict:
    """Validation loss (unweighted CE), accuracy, balanced accuracy and AUC (positive class, else macro)."""

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

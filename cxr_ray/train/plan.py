"""What the driver hands every Ray Train worker: one frozen record, built once per run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cxr_ray.train.config import TrainConfig


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs besides its data shards (``train_loop_config={"plan": plan}``)."""

    train: TrainConfig  # with ``epochs`` already set for this run
    classes: list[str]
    positive_index: int | None
    class_weights: list[float] | None
    initial_state: list[Any]  # [ObjectRef of the starting state dict] (a list: Ray passes nested refs as refs)
    preprocessing: dict[str, Any]
    augment: dict[str, Any]
    steps_per_epoch: int
    batch_size: int
    shuffle_buffer: int
    has_val: bool
    monitor: str  # cfg.monitor, or val_loss where the driver found it undefined
    label: str  # "train", "fold 2/5", "final": the prefix of progress lines
    fingerprint: str
    threads: int

"""The training modes of the source papers, by name (plain data: the CLI reads it; see :mod:`cxr_ray.models.transfer`)."""

from __future__ import annotations

from typing import Literal, get_args

TrainMode = Literal["scratch", "frozen", "finetune"]
TRAIN_MODES: tuple[str, ...] = get_args(TrainMode)

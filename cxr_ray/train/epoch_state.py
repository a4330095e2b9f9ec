"""Where a worker is in its run, and the checkpoint that carries it across failures and re-runs.

The checkpoint (``state.pt``) holds the model, optimizer, LR scheduler, AMP
scaler, early-stopping state, the best weights so far and the per-epoch
history. ``ray.train.get_checkpoint()`` returns it after a worker failure
(within one ``fit``, up to ``FailureConfig.max_failures``) and when the same
command is run again (same ``RunConfig(name, storage_path)``); training then
continues at the next unfinished epoch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

STATE_FILE = "state.pt"
_MIN_IMPROVEMENT = 1e-6


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_state(directory: str) -> dict[str, Any]:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def improved(value: float | None, best: float | None, direction: str) -> bool:
    if value is None:
        return False
    if best is None:
        return True
    return value < best - _MIN_IMPROVEMENT if direction == "min" else value > best + _MIN_IMPROVEMENT


@dataclass
class EpochState:
    """Early stopping, best weights and history: what the checkpoint restores."""

    epoch: int = 0
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    attempt: int = 1
    best_model: dict[str, torch.Tensor] | None = None
    saved: dict[str, Any] | None = None  # the checkpoint restored from (optimizer, scheduler, scaler states)

    @classmethod
    def restore(cls, directory: str | None) -> EpochState:
        """A fresh state, or the one in the checkpoint ``directory`` (its attempt counted up)."""
        if directory is None:
            return cls()
        saved = load_state(directory)
        names = ("epoch", "best", "best_epoch", "bad_epochs", "stopped", "history", "best_model")
        return cls(**{k: saved[k] for k in names}, attempt=int(saved["attempt"]) + 1, saved=saved)

    def record(self, row: dict[str, Any], *, is_better: bool, value: float | None, patience: int | None,
               model: nn.Module) -> None:
        """Book the epoch ``row`` (mutated: ``best_epoch``, ``early_stopped``) into the state."""
        if is_better:
            self.best, self.best_epoch, self.bad_epochs = value, row["epoch"], 0
            self.best_model = cpu_state(model)
        else:
            self.bad_epochs += 1
        row["best_epoch"] = self.best_epoch
        if patience and self.bad_epochs >= patience:
            self.stopped = True
            row["early_stopped"] = True
        self.epoch = row["epoch"]
        self.history.append(row)

    def save(self, directory: str, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any,
             fingerprint: str, ema: nn.Module | None = None) -> None:
        names = ("epoch", "best", "best_epoch", "bad_epochs", "stopped", "history", "attempt", "best_model")
        state = {name: getattr(self, name) for name in names}
        torch.save(
            {**state, "model": cpu_state(model), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "fingerprint": fingerprint,
             "ema": None if ema is None else cpu_state(ema)},
            os.path.join(directory, STATE_FILE),
        )

"""The one interface every engine's runtime implements.

A backend turns a batch of *preprocessed* images (``cxr_ray.preprocess``:
float32, shape (N, 1, S, S)) into class probabilities (float32, (N, K), rows
summing to 1). Screening and serving only ever talk to this interface, so the
same artifact gives the same numbers whichever engine runs it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class InputSpec:
    channels: int
    image_size: int
    dtype: str = "float32"
    max_batch: int | None = None  # None: any batch size

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)


class Backend(ABC):
    """Predict class probabilities from preprocessed batches."""

    name: str
    input_spec: InputSpec
    classes: list[str]

    @abstractmethod
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, S, S) float32 -> (N, K) float32 probabilities."""

    def predict_tensor(self, batch: Any) -> np.ndarray:
        """The same for a torch tensor on any device (GPU-decoded batches).

        Engines that run on that device take it as it is (torch, TensorRT: no host round trip);
        this default copies it to the host and calls :meth:`predict`.
        """
        return self.predict(batch.detach().to("cpu").numpy())

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        """Validate shape/dtype once, here, so every backend fails the same way."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != self.input_spec.shape:
            raise ValueError(
                f"{self.name}: expected a batch of shape (N, {', '.join(map(str, self.input_spec.shape))}), got {batch.shape}"
            )
        return batch

    @property
    def label(self) -> str:
        """What outputs record as the backend: the name, plus the precision when it is not fp32."""
        precision = getattr(self, "precision", None)
        return self.name if precision in (None, "fp32") else f"{self.name}-{precision}"

    def describe(self) -> dict:
        return {"backend": self.name, "input": self.input_spec.shape, "classes": self.classes}

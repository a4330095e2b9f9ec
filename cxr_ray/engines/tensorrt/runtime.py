"""TensorRT runtime: a verified plan from the artifact's ``engines/``, run with ``execute_async_v3``.

The plan's bytes are checked against the sha256 recorded in ``model.json``
before TensorRT sees them (:func:`cxr_ray.engines.cache.verify_engine_file`).
Device buffers for the profile's largest batch are allocated once (torch CUDA
tensors) and bound with ``set_tensor_address``; host staging buffers are
pinned so the copies are asynchronous on the backend's CUDA stream. Batches
larger than the profile's maximum are run in chunks, batches smaller than its
minimum are padded. ``predict`` is serialised by a lock: one execution context
has one set of buffers.

``tensorrt`` itself is imported only when a backend is built
(:func:`import_tensorrt`, through :func:`cxr_ray.optional.require`), so this
module imports on a CPU-only machine.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np
import torch

from cxr_ray.engines.base import Backend, InputSpec
from cxr_ray.engines.cache import verify_engine_file
from cxr_ray.engines.contract import INPUT_NAME, OUTPUT_NAME
from cxr_ray.errors import ArtifactError, BackendUnavailableError, UsageError
from cxr_ray.optional import TENSORRT_HINT, available, require

TRT_INSTALL_HINT = TENSORRT_HINT


def import_tensorrt() -> ModuleType:
    """``tensorrt`` (>= 10), or :class:`BackendUnavailableError` saying how to install it."""
    return require("tensorrt", TENSORRT_HINT, min_major=10)


def tensorrt_available() -> bool:
    """TensorRT importable and a CUDA GPU visible (what ``auto`` backend selection asks)."""
    return available("tensorrt") and torch.cuda.is_available()


@lru_cache(maxsize=1)
def trt_logger() -> Any:
    """One process-wide TensorRT logger (TensorRT expects a single logger per process)."""
    trt = import_tensorrt()
    return trt.Logger(trt.Logger.WARNING)


def cuda_device(device: str | int | None) -> torch.device:
    """``torch.device("cuda", index)`` for None / N / "cuda" / "cuda:N"; refuses CPU and GPU-less machines."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs a CUDA GPU; torch sees none")
    if isinstance(device, str):
        dev = torch.device(device)
        if dev.type != "cuda":
            raise UsageError(f"TensorRT runs on CUDA devices only, got {device!r}")
        return torch.device("cuda", dev.index or 0)
    return torch.device("cuda", device or 0)


class TensorRTBackend(Backend):
    """Runs a serialised TensorRT engine (``image`` -> ``probabilities``) on one GPU."""

    name = "tensorrt"

    def __init__(
        self,
        plan: bytes,
        classes: list[str],
        image_size: int,
        *,
        device: str | int | None = None,
        precision: str | None = None,
    ) -> None:
        trt = import_tensorrt()
        self.device = cuda_device(device)  # torch.device("cuda", N); refuses CPU / no GPU
        torch.cuda.set_device(self.device)
        self._runtime = trt.Runtime(trt_logger())
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise ArtifactError(
                "TensorRT could not deserialise the engine (built by another TensorRT version or for another GPU?)"
            )
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        if INPUT_NAME not in names or OUTPUT_NAME not in names:
            raise ArtifactError(f"engine tensors are {names}; expected {INPUT_NAME!r} and {OUTPUT_NAME!r}")
        for tensor in (INPUT_NAME, OUTPUT_NAME):
            if self._engine.get_tensor_dtype(tensor) != trt.float32:
                raise ArtifactError(f"engine tensor {tensor!r} is {self._engine.get_tensor_dtype(tensor)}, expected float32")
        min_shape, _opt_shape, max_shape = self._engine.get_tensor_profile_shape(INPUT_NAME, 0)
        if tuple(max_shape)[1:] != (1, image_size, image_size):
            raise ArtifactError(f"engine input profile {tuple(max_shape)} does not take (N, 1, {image_size}, {image_size})")
        self.min_batch, self.max_batch = int(min_shape[0]), int(max_shape[0])
        self.classes = list(classes)
        self.input_spec = InputSpec(channels=1, image_size=int(image_size), max_batch=None)
        self.precision = precision

        k = len(self.classes)
        shape = (self.max_batch, 1, image_size, image_size)
        self._d_input = torch.empty(shape, dtype=torch.float32, device=self.device)
        self._d_output = torch.empty((self.max_batch, k), dtype=torch.float32, device=self.device)
        self._h_input = torch.empty(shape, dtype=torch.float32).pin_memory()
        self._h_output = torch.empty((self.max_batch, k), dtype=torch.float32).pin_memory()
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise ArtifactError("TensorRT could not create an execution context (out of GPU memory?)")
        self._context.set_tensor_address(INPUT_NAME, int(self._d_input.data_ptr()))
        self._context.set_tensor_address(OUTPUT_NAME, int(self._d_output.data_ptr()))
        self._stream = torch.cuda.Stream(device=self.device)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # buffers allocated on the default stream
        self._lock = threading.Lock()

    @classmethod
    def from_engine_file(
        cls,
        path: str | os.PathLike,
        sha256: str,
        classes: list[str],
        image_size: int,
        *,
        device: str | int | None = None,
        precision: str | None = None,
    ) -> TensorRTBackend:
        """Check the plan against its recorded sha256, then deserialise it."""
        return cls(verify_engine_file(path, sha256), classes, image_size, device=device, precision=precision)

    def _execute(self, n: int, fill) -> np.ndarray:
        """Fill the first ``n`` input rows on the stream (``fill``), pad to the profile minimum, run, copy out."""
        run = max(n, self.min_batch)
        with torch.cuda.stream(self._stream):
            fill()
            if run > n:
                self._d_input[n:run].zero_()
            if not self._context.set_input_shape(INPUT_NAME, (run, 1, *self.input_spec.shape[1:])):
                raise RuntimeError(f"TensorRT refused input shape ({run}, 1, ...)")
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            self._h_output[:n].copy_(self._d_output[:n], non_blocking=True)
        self._stream.synchronize()
        return self._h_output[:n].numpy().copy()

    def _run_chunk(self, chunk: np.ndarray) -> np.ndarray:
        n = len(chunk)
        self._h_input[:n].numpy()[...] = chunk  # pinned: the copy below is asynchronous
        return self._execute(n, lambda: self._d_input[:n].copy_(self._h_input[:n], non_blocking=True))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = self.check_batch(batch)
        if len(batch) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        with self._lock:
            parts = [self._run_chunk(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def predict_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """A batch already on this GPU (GPU decode) is copied device to device; anything else goes through the host."""
        if batch.device != self.device:
            return self.predict(batch.detach().to("cpu").numpy())
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_spec.shape:
            raise ValueError(f"{self.name}: expected a batch of shape (N, 1, S, S), got {tuple(batch.shape)}")
        if len(batch) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        batch = batch.to(torch.float32).contiguous()
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the batch was made on torch's stream
        parts = []
        with self._lock:
            for i in range(0, len(batch), self.max_batch):
                chunk = batch[i : i + self.max_batch]
                parts.append(self._execute(len(chunk), lambda c=chunk: self._d_input[: len(c)].copy_(c)))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def describe(self) -> dict:
        return {
            **super().describe(),
            "device": str(self.device),
            "precision": self.precision,
            "batch_profile": [self.min_batch, self.max_batch],
        }

"""PyTorch runtime: the reference implementation, and the one to use where nothing else is installed.

* ``device``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``;
* ``channels_last`` (default on): NHWC weights and activations, the layout
  oneDNN (CPU) and cuDNN tensor cores (GPU) are fastest with;
* ``precision``: on CUDA, ``"fp16"`` / ``"bf16"`` run under autocast and
  ``"fp32"`` runs in full precision; on CPU the model runs in fp32 (``"bf16"``
  autocast on request: on CPUs with AVX512-BF16 / AMX it is about 2.4x faster
  than fp32 for DenseNet-121, see :func:`cpu_has_native_bf16`; ``"fp16"`` falls
  back to fp32 because CPU fp16 convolutions are slower than fp32), and
  :meth:`describe` says which was used;
* ``compile``: ``torch.compile`` (Inductor, with weight freezing), compiled
  lazily at the first batch of each new shape;
* ``cuda_graphs`` (CUDA only): one captured CUDA graph per batch shape
  (:mod:`~cxr_ray.engines.torch.graphs`), replayed; launches instead of kernels;
* on CUDA, batches from the host are copied into a pinned staging buffer (kept
  and grown, never re-allocated per call) and sent with a non-blocking copy;
  :meth:`TorchBackend.predict_tensor` takes a batch already on the device (GPU
  decode) without any host round trip. ``"fp32"`` on CUDA runs with TF32 off,
  so it means fp32, as the TensorRT fp32 plans and the fp32 reference do;
* ``num_threads``: passed to ``torch.set_num_threads`` (process-wide); None
  leaves the current setting alone.

Every call runs under ``torch.inference_mode`` and returns softmax
probabilities computed in fp32, like the exported graphs.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch
from torch import nn

from cxr_ray.engines.base import Backend, InputSpec
from cxr_ray.engines.contract import fp32_reference, max_abs_diff_vs_fp32
from cxr_ray.engines.torch.graphs import CudaGraphs
from cxr_ray.errors import BackendUnavailableError, UsageError

TORCH_PRECISIONS = ("fp32", "fp16", "bf16")


def cpu_has_native_bf16() -> bool:
    """True when oneDNN has bf16 instructions here (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the probe: assume not
        return False


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> CUDA when torch sees a GPU, else CPU; a CUDA device without a GPU is refused."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device} requested but torch sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}; valid: cpu, cuda, cuda:N")
    return device


class TorchBackend(Backend):
    """Eager (or compiled) PyTorch over the artifact's network."""

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        classes: list[str],
        image_size: int,
        *,
        device: str | torch.device | None = "cpu",
        precision: str = "fp32",
        channels_last: bool = True,
        compile: bool = False,
        cuda_graphs: bool = False,
        num_threads: int | None = None,
    ) -> None:
        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(TORCH_PRECISIONS)}")
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        self.device = resolve_device(device)
        if cuda_graphs and (self.device.type != "cuda" or compile):
            raise UsageError("CUDA graphs need a CUDA device and exclude torch.compile (it brings its own)")
        if self.device.type == "cuda":
            # Batch shapes repeat (fixed model size, a few batch sizes): let cuDNN time its algorithms
            # once per shape and keep the fastest, instead of its heuristic pick (process-wide setting).
            torch.backends.cudnn.benchmark = True
        self.classes = list(classes)
        self.input_spec = InputSpec(channels=1, image_size=int(image_size))
        self.channels_last = channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.precision = self._effective_precision(precision)
        model = model.eval().to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.model = model
        self.compiled = compile
        self._forward = torch.compile(model, options={"freezing": True}) if compile else model
        self._graphs = CudaGraphs(model, lambda: self._autocast(cache=False)) if cuda_graphs else None
        self._staging: torch.Tensor | None = None  # pinned host buffer (CUDA), grown to the largest batch
        self._lock = threading.Lock()  # one staging buffer and one set of graphs: one caller at a time

    def _effective_precision(self, requested: str) -> str:
        if self.device.type == "cpu" and requested == "fp16":
            return "fp32"
        return requested

    def _autocast(self, cache: bool = True):
        if self.precision == "fp32":
            if self.device.type == "cuda":  # fp32 means fp32: no TF32 tensor-core convolutions
                return torch.backends.cudnn.flags(enabled=True, benchmark=torch.backends.cudnn.benchmark,
                                                  allow_tf32=False)
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=cache)

    def _to_device(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch)
        if self.device.type != "cuda":
            return x
        if self._staging is None or self._staging.numel() < x.numel():
            self._staging = torch.empty(x.numel(), dtype=torch.float32, pin_memory=True)
        # The previous batch's copy has finished: predict() waited for its probabilities.
        staged = self._staging[: x.numel()].view(x.shape)
        staged.copy_(x)
        return staged.to(self.device, non_blocking=True)

    def _run(self, x: torch.Tensor) -> np.ndarray:
        x = x.contiguous(memory_format=self.memory_format)
        if self._graphs is not None:
            logits = self._graphs(x)
        else:
            with self._autocast():
                logits = self._forward(x)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = self.check_batch(batch)
        if len(batch) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        with self._lock, torch.inference_mode():
            return self._run(self._to_device(batch))

    def predict_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """(N, 1, S, S) tensor on any device; one already on this backend's GPU is used in place."""
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_spec.shape:
            raise ValueError(f"{self.name}: expected a batch of shape (N, {', '.join(map(str, self.input_spec.shape))}), "
                             f"got {tuple(batch.shape)}")
        if len(batch) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        with self._lock, torch.inference_mode():
            return self._run(batch.to(self.device, torch.float32, non_blocking=True))

    def verify_against_fp32(self, atol: float, batch_sizes: tuple[int, ...] = (1, 4)) -> float:
        """Max |probability difference| vs this model in fp32 on sample batches; raises above ``atol``.

        For a reduced precision the fp32 reference is computed on the same device
        with the same weights, so the check measures the precision alone.
        """
        worst = 0.0
        if self.precision != "fp32" or self.compiled or self._graphs is not None:
            reference = fp32_reference(self.model, self.device, self.memory_format)
            worst = max_abs_diff_vs_fp32(self.predict, reference, self.input_spec.image_size,
                                         batch_sizes=batch_sizes, what=f"torch {self.precision}")
        self.verified_max_abs_diff = worst
        if worst > atol:
            raise BackendUnavailableError(
                f"torch {self.precision} on {self.device} differs from fp32 by {worst:.3g} (> {atol:.3g}) on sample "
                "batches; use precision fp32 for this model"
            )
        return worst

    def describe(self) -> dict:
        return {
            **super().describe(),
            "device": str(self.device),
            "precision": self.precision,
            "verified_max_abs_diff_vs_fp32": getattr(self, "verified_max_abs_diff", None),
            "channels_last": self.channels_last,
            "compiled": self.compiled,
            "cuda_graphs": None if self._graphs is None else [list(shape) for shape in self._graphs.shapes],
            "num_threads": torch.get_num_threads(),
        }

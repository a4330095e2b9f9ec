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
* ``num_threads``: passed to ``torch.set_num_threads`` (process-wide); None
  leaves the current setting alone.

Every call runs under ``torch.inference_mode`` and returns softmax
probabilities computed in fp32, like the exported graphs.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from cxr_ray.engines.base import Backend, InputSpec
from cxr_ray.engines.contract import fp32_reference, max_abs_diff_vs_fp32
from cxr_ray.errors import BackendUnavailableError

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
        num_threads: int | None = None,
    ) -> None:
        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(TORCH_PRECISIONS)}")
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        self.device = resolve_device(device)
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

    def _effective_precision(self, requested: str) -> str:
        if self.device.type == "cpu" and requested == "fp16":
            return "fp32"
        return requested

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = self.check_batch(batch)
        if len(batch) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        with torch.inference_mode():
            x = torch.from_numpy(batch)
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=self.memory_format)
            with self._autocast():
                logits = self._forward(x)
            probabilities = torch.softmax(logits.float(), dim=1)
            return probabilities.cpu().numpy()

    def verify_against_fp32(self, atol: float, batch_sizes: tuple[int, ...] = (1, 4)) -> float:
        """Max |probability difference| vs this model in fp32 on sample batches; raises above ``atol``.

        For a reduced precision the fp32 reference is computed on the same device
        with the same weights, so the check measures the precision alone.
        """
        worst = 0.0
        if self.precision != "fp32":
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
            "num_threads": torch.get_num_threads(),
        }

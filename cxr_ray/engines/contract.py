"""What every engine agrees on: the graph's I/O, how it is checked against fp32 PyTorch, and how close is close.

The graph contract, shared by every engine:

* input ``image``: float32 (N, 1, S, S), the output of :func:`cxr_ray.preprocess.preprocess`,
  with a dynamic batch axis and a fixed image size S (the card's ``image_size``);
* output ``probabilities``: float32 (N, K), rows summing to 1. The softmax is
  *inside* the graph, so torch, ONNX Runtime and TensorRT all return the same
  quantity and no caller re-implements the head.

:func:`max_abs_diff_vs_fp32` is the one comparison with eager fp32 PyTorch on
sample batches (ONNX export, TensorRT build, reduced-precision torch at load),
and :data:`TOLERANCES` the one table of how far each engine and precision may be.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Collection, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from cxr_ray.errors import ArtifactError

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
VERIFY_BATCH_SIZES = (1, 3)  # neither is the batch of 2 the ONNX graph is traced with

# Largest |probability difference| vs eager fp32 PyTorch on sample batches, by (engine, precision).
# ONNX Runtime fp32: CPU kernels differ from eager in the last few bits only. TensorRT is compared
# on its own GPU; torch bf16 on the CPU uses the TensorRT fp16 figure (0.0015-0.0028 measured); torch
# fp16 on CUDA and ONNX Runtime's TensorRT provider use it too (not measured on a GPU yet).
TOLERANCES: dict[tuple[str, str], float] = {
    ("onnxruntime", "fp32"): 1e-4,
    ("onnxruntime-trt", "fp32"): 1e-3,
    ("onnxruntime-trt", "fp16"): 2e-2,
    ("tensorrt", "fp32"): 1e-3,
    ("tensorrt", "fp16"): 2e-2,
    ("tensorrt", "int8"): 1e-1,
    # OpenVINO is compared with ONNX Runtime fp32 on the same graph (cxr_ray.engines.verify); fp32 measured
    # 3e-7 on DenseNet-121; bf16 and int8 at the limit for reduced precision on the CPU.
    ("openvino", "fp32"): 1e-4,
    ("openvino", "bf16"): 2e-2,
    ("openvino", "int8"): 2e-2,
    ("torch", "fp32"): 1e-4,  # CUDA graphs / torch.compile against eager, TF32 off on both
    ("torch", "fp16"): 2e-2,
    ("torch", "bf16"): 2e-2,
}

Predict = Callable[[np.ndarray], np.ndarray]


def check_graph_io(source: str | os.PathLike, inputs: Collection[str], outputs: Collection[str],
                   input_shape: Sequence[object], image_size: int) -> None:
    """The graph contract every ONNX-reading engine checks at load: an ``image`` input of
    (N, 1, S, S) and a ``probabilities`` output. ``input_shape``: the runtime's own dims (a
    dynamic batch dim is whatever it reports), compared from dim 1 on."""

    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ArtifactError(
            f"{source}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
            f"found inputs {sorted(inputs)} and outputs {sorted(outputs)} (re-export with `cxr-ray export`)"
        )
    if list(input_shape[1:]) != [1, image_size, image_size]:
        raise ArtifactError(f"{source}: input shape {list(input_shape)} does not take (N, 1, {image_size}, {image_size})")


def tolerance(engine: str, precision: str) -> float:
    """The accepted difference for ``engine`` at ``precision`` (see :data:`TOLERANCES`)."""
    try:
        return TOLERANCES[(engine, precision)]
    except KeyError:
        known = ", ".join(f"{e}/{p}" for e, p in TOLERANCES)
        raise ValueError(f"no tolerance for {engine}/{precision}; known: {known}") from None


def tolerance_help() -> str:
    """The table as one line for ``--help``."""
    return "; ".join(f"{engine} {precision} {atol:g}" for (engine, precision), atol in TOLERANCES.items())


def sample_inputs(image_size: int, batch_sizes: Sequence[int] = VERIFY_BATCH_SIZES, seed: int = 0) -> list[np.ndarray]:
    """Deterministic standard-normal batches: what standardised images look like to the network."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, 1, image_size, image_size), dtype=np.float32) for n in batch_sizes]


@contextlib.contextmanager
def _true_fp32(device: torch.device) -> Iterator[None]:
    # A true fp32 reference: cuDNN would otherwise use TF32 tensor cores for convolutions.
    if device.type == "cuda":
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    else:
        yield


def fp32_reference(
    model: nn.Module, device: str | torch.device = "cpu", memory_format: torch.memory_format | None = None
) -> Predict:
    """Eager fp32 PyTorch probabilities of ``model`` (eval mode) on ``device``."""
    device = torch.device(device)
    net = model.eval().to(device)

    def predict(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(device)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        with torch.inference_mode(), _true_fp32(device):
            return torch.softmax(net(x).float(), dim=1).cpu().numpy()

    return predict


def max_abs_diff_vs_fp32(
    candidate: Predict,
    reference: Predict,
    image_size: int,
    *,
    batch_sizes: Sequence[int] = VERIFY_BATCH_SIZES,
    what: str = "engine",
) -> float:
    """Largest |candidate - reference| over :func:`sample_inputs`; a shape mismatch is a ``ValueError``."""
    worst = 0.0
    for batch in sample_inputs(image_size, batch_sizes):
        got, expected = np.asarray(candidate(batch)), np.asarray(reference(batch))
        if got.shape != expected.shape:
            raise ValueError(f"{what}: output shape {got.shape}, PyTorch gives {expected.shape}")
        worst = max(worst, float(np.max(np.abs(got - expected))))
    return worst

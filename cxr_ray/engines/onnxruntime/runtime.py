"""ONNX Runtime runtime: the fastest engine measured on CPU, and the default where TensorRT is absent.

Session settings (measured with ``cxr-ray bench backends``):

* ``graph_optimization_level = ORT_ENABLE_ALL``: constant folding, Conv+BN+ReLU
  fusion and, on x86, the NCHWc blocked layout that makes CNNs fast on AVX2/512;
* ``intra_op_num_threads`` = the CPUs this process may use (ORT's own default
  counts physical cores, which leaves SMT siblings / container vCPUs idle);
  ``inter_op_num_threads = 1`` with sequential execution (a CNN is one chain);
* CUDA execution provider when asked for (``device="cuda[:N]"``) and installed
  (``onnxruntime-gpu``); the CPU provider stays as fallback for unsupported ops.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from cxr_ray.engines.base import Backend, InputSpec
from cxr_ray.engines.cache import read_verified
from cxr_ray.engines.contract import INPUT_NAME, OUTPUT_NAME
from cxr_ray.errors import ArtifactError, BackendUnavailableError


def available_cpus() -> int:
    """CPUs this process may run on (affinity / cgroup cpuset aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def session_options(num_threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = int(num_threads or available_cpus())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT warns about every initializer it folds
    return options


def providers_for(device: str | None) -> list[str | tuple[str, dict[str, int]]]:
    """ONNX Runtime execution providers for ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or None (CUDA if installed)."""
    available = ort.get_available_providers()
    if device is None:
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise BackendUnavailableError(
                f"onnxruntime on {device} needs the CUDA execution provider (pip install onnxruntime-gpu); "
                f"installed providers: {available}"
            )
        index = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise ValueError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N")


def create_session(
    onnx: str | os.PathLike | bytes,
    *,
    device: str | None = "cpu",
    num_threads: int | None = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` with the settings above, from a path or the model's bytes."""
    model = onnx if isinstance(onnx, bytes) else os.fspath(onnx)
    return ort.InferenceSession(model, session_options(num_threads), providers=providers_for(device))


class OnnxRuntimeBackend(Backend):
    """Runs the artifact's probabilities graph (``image`` -> ``probabilities``) with ONNX Runtime."""

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        classes: list[str],
        image_size: int,
        *,
        device: str | None = "cpu",
        num_threads: int | None = None,
        expected_sha256: str | None = None,
    ) -> None:
        data = read_verified(onnx_path, expected_sha256, what="ONNX graph", remedy="refusing to load a modified model")
        self.session = create_session(data, device=device, num_threads=num_threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise ArtifactError(
                f"{onnx_path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                f"found inputs {list(inputs)} and outputs {outputs} (re-export with `cxr-ray export`)"
            )
        shape = inputs[INPUT_NAME].shape
        if list(shape[1:]) != [1, image_size, image_size]:
            raise ArtifactError(f"{onnx_path}: input shape {shape} does not take (N, 1, {image_size}, {image_size})")
        self.classes = list(classes)
        self.input_spec = InputSpec(channels=1, image_size=int(image_size))
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.num_threads = int(num_threads or available_cpus())
        self.onnx_path = str(onnx_path)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = self.check_batch(batch)
        if len(batch) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        (probabilities,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        return np.asarray(probabilities, dtype=np.float32)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "device": self.device,
            "precision": "fp32",
            "providers": self.session.get_providers(),
            "num_threads": self.num_threads,
        }

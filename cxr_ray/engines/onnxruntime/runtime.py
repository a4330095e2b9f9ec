"""ONNX Runtime runtime: the fastest engine measured on CPU, and the default where TensorRT is absent.

Session settings (measured with ``cxr-ray bench backends``):

* ``graph_optimization_level = ORT_ENABLE_ALL``: constant folding, Conv+BN+ReLU
  fusion and, on x86, the NCHWc blocked layout that makes CNNs fast on AVX2/512;
* ``intra_op_num_threads`` = the CPUs this process may use (ORT's own default
  counts physical cores, which leaves SMT siblings / container vCPUs idle);
  ``inter_op_num_threads = 1`` with sequential execution (a CNN is one chain);
* CUDA execution provider when asked for (``device="cuda[:N]"``) and installed
  (``onnxruntime-gpu``), with TF32 off so that fp32 means fp32; the CPU provider
  stays as fallback for unsupported ops;
* TensorRT execution provider (``execution="tensorrt"``, the ``onnxruntime-trt``
  engine): fp16 on request, CUDA then CPU behind it for what TensorRT does not
  take. Its own engine cache stays off: ONNX Runtime would load those plans
  without the sha256 check every TensorRT plan here gets, so the plan is built
  when the session starts (each actor / replica start pays for it).
"""

from __future__ import annotations

import ctypes.util
import os

import numpy as np
import onnxruntime as ort
import torch

from cxr_ray.engines.base import Backend, InputSpec
from cxr_ray.engines.cache import read_verified
from cxr_ray.engines.contract import INPUT_NAME, OUTPUT_NAME, check_graph_io
from cxr_ray.errors import BackendUnavailableError, UsageError
from cxr_ray.optional import available


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


CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
Provider = str | tuple[str, dict[str, object]]


def cuda_provider_available() -> bool:
    """onnxruntime-gpu's CUDA provider is installed and torch sees a GPU (``auto``'s probe)."""
    return CUDA_PROVIDER in ort.get_available_providers() and torch.cuda.is_available()


def tensorrt_provider_available() -> bool:
    """ONNX Runtime's TensorRT provider is built in and TensorRT's libraries are there (``auto``'s probe):
    the provider is listed whenever onnxruntime-gpu was built with it, installed TensorRT or not."""
    has_libs = available("tensorrt") or ctypes.util.find_library("nvinfer") is not None
    return TENSORRT_PROVIDER in ort.get_available_providers() and has_libs and torch.cuda.is_available()


def providers_for(device: str | None, *, execution: str = "cuda", fp16: bool = False) -> list[Provider]:
    """ONNX Runtime execution providers for ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or None (CUDA if installed).

    ``execution="tensorrt"``: the TensorRT provider first (``fp16``: its fp16 kernels), on a CUDA device.
    """
    installed = ort.get_available_providers()
    if device is None:
        device = "cuda" if CUDA_PROVIDER in installed else "cpu"
    if device == "cpu":
        if execution == "tensorrt":
            raise UsageError("ONNX Runtime's TensorRT provider runs on CUDA devices only, got device=cpu")
        return ["CPUExecutionProvider"]
    if not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N")
    wanted = TENSORRT_PROVIDER if execution == "tensorrt" else CUDA_PROVIDER
    if wanted not in installed or CUDA_PROVIDER not in installed:
        raise BackendUnavailableError(
            f"onnxruntime on {device} needs the {wanted} (pip install onnxruntime-gpu"
            f"{'; and TensorRT' if execution == 'tensorrt' else ''}); installed providers: {installed}"
        )
    index = int(device.partition(":")[2] or 0)
    cuda: Provider = (CUDA_PROVIDER, {"device_id": index, "use_tf32": 0})
    if execution != "tensorrt":
        return [cuda, "CPUExecutionProvider"]
    options: dict[str, object] = {"device_id": index, "trt_fp16_enable": bool(fp16), "trt_engine_cache_enable": False}
    return [(TENSORRT_PROVIDER, options), cuda, "CPUExecutionProvider"]


def create_session(
    onnx: str | os.PathLike | bytes,
    *,
    device: str | None = "cpu",
    num_threads: int | None = None,
    providers: list[Provider] | None = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` with the settings above, from a path or the model's bytes."""
    model = onnx if isinstance(onnx, bytes) else os.fspath(onnx)
    chosen = providers if providers is not None else providers_for(device)
    return ort.InferenceSession(model, session_options(num_threads), providers=chosen)


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
        execution: str = "cuda",
        precision: str = "fp32",
    ) -> None:
        data = read_verified(onnx_path, expected_sha256, what="ONNX graph", remedy="refusing to load a modified model")
        providers = providers_for(device, execution=execution, fp16=precision == "fp16")
        self.session = create_session(data, num_threads=num_threads, providers=providers)
        if execution == "tensorrt":
            self.name = "onnxruntime-trt"
        self.precision = precision
        self.verified_max_abs_diff: float | None = None  # set by provisioning where it compares with fp32
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        shape = inputs[INPUT_NAME].shape if INPUT_NAME in inputs else []
        check_graph_io(onnx_path, inputs, outputs, shape, image_size)
        self.classes = list(classes)
        self.input_spec = InputSpec(channels=1, image_size=int(image_size))
        self.device = "cuda" if CUDA_PROVIDER in self.session.get_providers() else "cpu"
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
            "precision": self.precision,
            "providers": self.session.get_providers(),
            "verified_max_abs_diff_vs_fp32": self.verified_max_abs_diff,
            "num_threads": self.num_threads,
        }

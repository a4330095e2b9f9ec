"""OpenVINO runtime: the artifact's ONNX graph on OpenVINO's CPU plugin, fp32 or bf16.

OpenVINO reads the same ``model.onnx`` every ONNX engine uses (sha256-checked
bytes, parsed in memory), so there is no second export to keep in step.
Compile settings:

* ``INFERENCE_PRECISION_HINT`` is always set: the CPU plugin's *default* on a
  CPU with AVX512-BF16 / AMX is bf16, so without ``f32`` here an "fp32" engine
  would silently run bf16 there. ``bf16`` is refused (by provisioning) on CPUs
  without those instructions, where it would be emulated and slower;
* ``PERFORMANCE_HINT = LATENCY`` (one stream, every thread on one request): a
  screening actor sends one batch at a time, as with ONNX Runtime's sequential
  session; ``INFERENCE_NUM_THREADS`` = the CPUs this process may use unless set.

``openvino`` is an optional package (``pip install 'cxr-ray[openvino]'``):
this module imports without it, and the first real use says what to install.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from cxr_ray.engines.base import Backend, InputSpec
from cxr_ray.engines.cache import read_verified
from cxr_ray.engines.contract import INPUT_NAME, OUTPUT_NAME, check_graph_io
from cxr_ray.engines.onnxruntime.runtime import available_cpus
from cxr_ray.errors import BackendUnavailableError
from cxr_ray.optional import OPENVINO_HINT, available, require

# Our precision names -> the CPU plugin's element types for INFERENCE_PRECISION_HINT.
OV_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def openvino_available() -> bool:
    """The ``openvino`` package is installed here (``auto``'s CPU probe; nothing is imported)."""
    return available("openvino")


def import_openvino() -> Any:
    return require("openvino", OPENVINO_HINT)


def openvino_version() -> str | None:
    return str(import_openvino().__version__) if openvino_available() else None


def compile_config(precision: str, num_threads: int | None) -> dict[str, str]:
    """The CPU plugin's compile properties for ``precision`` (see the module docstring)."""
    if precision not in OV_PRECISIONS:
        raise ValueError(f"OpenVINO CPU runs {', '.join(OV_PRECISIONS)} here, got {precision!r}")
    return {
        "INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision],
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": str(int(num_threads or available_cpus())),
    }


class OpenVinoBackend(Backend):
    """Runs the probabilities graph (``image`` -> ``probabilities``) on OpenVINO's CPU plugin."""

    name = "openvino"

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        classes: list[str],
        image_size: int,
        *,
        precision: str = "fp32",
        num_threads: int | None = None,
        expected_sha256: str | None = None,
        model: Any = None,
    ) -> None:
        """``model``: an ``openvino.Model`` to compile instead of the graph at ``onnx_path``
        (NNCF's quantised copy of it); ``onnx_path`` then only names it."""
        ov = import_openvino()
        core = ov.Core()
        if model is None:
            data = read_verified(onnx_path, expected_sha256, what="ONNX graph", remedy="refusing to load a modified model")
            try:
                model = core.read_model(data)  # ONNX from memory: the bytes just hashed
            except RuntimeError as exc:  # an op its ONNX frontend cannot convert: auto falls back to ONNX Runtime
                raise BackendUnavailableError(f"{onnx_path}: OpenVINO cannot convert this graph: "
                                              f"{str(exc).strip().splitlines()[-1]}") from exc
        inputs = {name for port in model.inputs for name in port.get_names()}
        outputs = {name for port in model.outputs for name in port.get_names()}
        dims = list(model.input(INPUT_NAME).get_partial_shape()) if INPUT_NAME in inputs else []
        check_graph_io(onnx_path, inputs, outputs, [d.get_length() if d.is_static else None for d in dims], image_size)
        self.config = compile_config("bf16" if precision == "bf16" else "fp32", num_threads)
        self.compiled = core.compile_model(model, "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: Serve may call from several threads
        self.precision = precision
        self.classes = list(classes)
        self.input_spec = InputSpec(channels=1, image_size=int(image_size))
        self.num_threads = int(self.config["INFERENCE_NUM_THREADS"])
        self.onnx_path = str(onnx_path)
        self.openvino_version = str(ov.__version__)
        self.verification: dict[str, Any] | None = None  # set by provisioning (vs ONNX Runtime fp32)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = self.check_batch(batch)
        if len(batch) == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        with self._lock:
            result = self.request.infer({INPUT_NAME: batch})
            return np.array(result[self.compiled.output(OUTPUT_NAME)], dtype=np.float32)  # copy: the buffer is reused

    def describe(self) -> dict:
        return {
            **super().describe(),
            "device": "cpu",
            "precision": self.precision,
            "openvino": self.openvino_version,
            "inference_precision_hint": self.config["INFERENCE_PRECISION_HINT"],
            "num_threads": self.num_threads,
            "verification": self.verification,
        }

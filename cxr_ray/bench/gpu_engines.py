"""Engine rows of ``cxr-ray bench gpu``: images/s of each torch / ONNX Runtime / TensorRT variant.

Every variant is built the way screening and serving build it (:func:`~cxr_ray.engines.load.load_backend`,
or :class:`~cxr_ray.engines.torch.runtime.TorchBackend` for the NCHW baseline that no surface uses),
so its load-time fp32 check runs too, and is timed on ``predict`` of host batches (pinned staging,
copy, model, probabilities back) after a warm-up. ``max_abs_diff_vs_cpu_fp32`` compares each with
eager fp32 PyTorch on the CPU on one fixed sample batch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr_ray.engines.base import Backend
from cxr_ray.engines.contract import sample_inputs
from cxr_ray.engines.load import load_backend
from cxr_ray.engines.onnxruntime.runtime import cuda_provider_available, tensorrt_provider_available
from cxr_ray.engines.tensorrt.runtime import tensorrt_available
from cxr_ray.engines.torch.runtime import TorchBackend, cpu_has_native_bf16
from cxr_ray.models.artifact import load_model


@dataclass(frozen=True)
class Variant:
    name: str
    make: Callable[[str, str], Backend]  # (artifact, device) -> backend
    why_not: str | None = None  # set: skipped here, with this reason


def _torch_nchw(artifact: str, device: str) -> Backend:
    model, card = load_model(artifact)
    return TorchBackend(model, card.classes, card.image_size, device=device, precision="fp32", channels_last=False)


def _loaded(engine: str, **request: Any) -> Callable[[str, str], Backend]:
    return lambda artifact, device: load_backend(artifact, engine, device=device, **request)


def variants(device: str, *, compile: bool, max_batch: int) -> list[Variant]:
    """The variants for ``device`` (``cuda`` or ``cpu``), those that cannot run here with the reason."""
    if device == "cpu":
        bf16 = None if cpu_has_native_bf16() else "this CPU has no AVX512-BF16 / AMX"
        return [
            Variant("torch-cpu-fp32-nchw", _torch_nchw),
            Variant("torch-cpu-fp32-cl", _loaded("torch", precision="fp32")),
            Variant("torch-cpu-bf16-cl", _loaded("torch", precision="bf16"), bf16),
            Variant("torch-cuda-fp16-cl", _loaded("torch"), "fp16 autocast runs on CUDA only"),
            Variant("torch-cuda-fp16-cl-graphs", _loaded("torch"), "CUDA graphs need a CUDA device"),
        ]
    found = [
        Variant("torch-cuda-fp32-nchw", _torch_nchw),
        Variant("torch-cuda-fp32-cl", _loaded("torch", precision="fp32")),
        Variant("torch-cuda-fp16-cl", _loaded("torch", precision="fp16")),
        Variant("torch-cuda-fp16-cl-graphs", _loaded("torch", precision="fp16", cuda_graphs=True)),
        Variant("torch-cuda-fp16-cl-compile", _loaded("torch", precision="fp16", compile=True),
                None if compile else "torch.compile is opt-in (--compile): minutes of compiling per batch shape"),
        Variant("onnxruntime-cuda-fp32", _loaded("onnxruntime", precision="fp32"),
                None if cuda_provider_available() else "onnxruntime-gpu (CUDA provider) is not installed"),
        Variant("onnxruntime-trt-fp16", _loaded("onnxruntime-trt", precision="fp16"),
                None if tensorrt_provider_available() else "ONNX Runtime's TensorRT provider and TensorRT are not both here"),
        Variant("tensorrt-fp16", _loaded("tensorrt", precision="fp16", max_batch=max_batch),
                None if tensorrt_available() else "tensorrt is not importable (its wheels are on NVIDIA's index)"),
    ]
    return found


def _timed(backend: Backend, batch: np.ndarray, seconds: float, warmup: int) -> list[float]:
    for _ in range(warmup):  # first calls: cuDNN autotuning, graph capture, allocator growth
        backend.predict(batch)
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < 2 or time.perf_counter() - begin < seconds:
        start = time.perf_counter()
        backend.predict(batch)  # returns host probabilities: the device work is finished
        times.append(time.perf_counter() - start)
    return times


def measure_variant(backend: Backend, sizes: list[int], image_size: int, seconds: float, warmup: int,
                    reference: tuple[np.ndarray, np.ndarray]) -> list[dict[str, Any]]:
    """One row per batch size; a size that fails (out of memory) is a row with its error."""
    sample, expected = reference
    diff = float(np.max(np.abs(backend.predict(sample) - expected)))
    rng = np.random.default_rng(0)
    rows = []
    for size in sizes:
        batch = rng.standard_normal((size, 1, image_size, image_size), dtype=np.float32)
        try:
            times = _timed(backend, batch, seconds, warmup)
        except Exception as exc:  # noqa: BLE001 - reported in the row, the other sizes go on
            rows.append({"batch_size": size, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        rows.append({
            "batch_size": size,
            "images_per_s": round(size * len(times) / sum(times), 2),
            "latency_ms_median": round(1000 * statistics.median(times), 3),
            "iterations": len(times),
            "max_abs_diff_vs_cpu_fp32": diff,
        })
    return rows


def cpu_reference(artifact: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed sample batch and eager fp32 PyTorch's probabilities for it on the CPU."""
    (sample,) = sample_inputs(image_size, batch_sizes=(8,), seed=7)
    return sample, _torch_nchw(artifact, "cpu").predict(sample)


def engine_rows(artifact: str, device: str, sizes: list[int], image_size: int, *, seconds: float, warmup: int,
                compile: bool = False) -> dict[str, Any]:
    """``{"rows": [...], "skipped": [...]}`` for every variant on ``device``."""
    reference = cpu_reference(artifact, image_size)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for variant in variants(device, compile=compile, max_batch=max(sizes)):
        if variant.why_not is not None:
            skipped.append({"variant": variant.name, "reason": variant.why_not})
            continue
        started = time.perf_counter()
        try:
            backend = variant.make(artifact, device)
        except Exception as exc:  # noqa: BLE001 - a variant that does not load here is reported, not fatal
            skipped.append({"variant": variant.name, "reason": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        load_s = round(time.perf_counter() - started, 2)
        info = backend.describe()
        for row in measure_variant(backend, sizes, image_size, seconds, warmup, reference):
            rows.append({"variant": variant.name, "backend": backend.label, "load_s": load_s,
                         "verified_max_abs_diff_vs_fp32": info.get("verified_max_abs_diff_vs_fp32"), **row})
        del backend
    return {"rows": rows, "skipped": skipped}

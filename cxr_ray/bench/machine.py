"""What machine a benchmark ran on: CPU model and the instruction sets the engines' speed depends on, versions."""

from __future__ import annotations

import importlib.util
import os
import platform

import numpy as np
import onnxruntime
import torch

from cxr_ray.engines.onnxruntime.runtime import available_cpus
from cxr_ray.engines.openvino.runtime import openvino_version
from cxr_ray.engines.torch.runtime import cpu_has_native_bf16

# The /proc/cpuinfo flags that decide which CPU kernels run: AVX2 / AVX-512 fp32, VNNI int8, bf16, AMX.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """Which of :data:`CPU_FLAGS` this CPU has (empty where /proc/cpuinfo is not there)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in CPU_FLAGS if flag in present]
    except OSError:
        pass
    return []


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    """The machine's CPU, its relevant flags, and the versions of every engine here."""
    trt_version = None
    if importlib.util.find_spec("tensorrt") is not None:
        import tensorrt

        trt_version = tensorrt.__version__
    info = {
        "cpu_count": os.cpu_count(),
        "available_cpus": available_cpus(),
        "cpu_model": _cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino_version(),
        "numpy": np.__version__,
        "tensorrt": trt_version,
        "device": device,
        "cuda_available": torch.cuda.is_available(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info

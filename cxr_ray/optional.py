"""Heavy optional packages (TensorRT, CUDA bits), imported only when used, with an install hint.

Like MONAI's ``optional_import``: a module that mentions TensorRT still imports
on a CPU-only machine, and the first real use raises
:class:`~cxr_ray.errors.BackendUnavailableError` saying what to install. This
is the one place such imports are written; everything else calls
:func:`require` or :func:`available`.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from cxr_ray.errors import BackendUnavailableError

TENSORRT_HINT = (
    "TensorRT is not installed. Its wheels are on NVIDIA's package index: "
    "pip install 'cxr-ray[tensorrt]' --extra-index-url https://pypi.nvidia.com "
    "(or run in an NVIDIA container such as nvcr.io/nvidia/pytorch or nvcr.io/nvidia/tensorrt)"
)
OPENVINO_HINT = "the openvino backend needs OpenVINO: pip install 'cxr-ray[openvino]' (or pip install openvino)"
NNCF_HINT = "openvino int8 is quantised with NNCF: pip install 'cxr-ray[openvino]' (or pip install nncf)"
ONNXSCRIPT_HINT = "the dynamo ONNX exporter needs onnxscript: pip install onnxscript"


def available(module: str) -> bool:
    """Whether ``module`` could be imported here (nothing is imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken __spec__
        return False


def require(module: str, hint: str, *, min_major: int | None = None) -> ModuleType:
    """``import module``, or :class:`BackendUnavailableError` carrying ``hint``.

    ``min_major``: refuse an installed version whose major number is lower.
    """
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailableError(hint) from exc
    if min_major is not None:
        version = str(getattr(imported, "__version__", "0"))
        if int(version.split(".")[0]) < min_major:
            raise BackendUnavailableError(f"{module} {version} found; cxr-ray needs {module} >= {min_major}. {hint}")
    return imported

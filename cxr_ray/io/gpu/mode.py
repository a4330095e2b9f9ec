"""``--decode gpu|cpu|auto``: the names and what ``auto`` means, light enough for the CLI's flags.

* ``cpu``: Pillow / pydicom on CPUs, as always;
* ``gpu``: nvImageCodec on the GPU of the process that runs the model (screening's GPU predict
  actors, a fused Serve replica on a GPU); refused at start where there is no GPU or no nvImageCodec;
* ``auto``: ``gpu`` where both are there, else ``cpu`` (the process says why in its log and in
  each row's or response's ``warnings``).

Either way an input the GPU codecs do not take is decoded on the CPU, with the reason in its
``warnings`` (:mod:`cxr_ray.io.gpu.routes`).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Any

from cxr_ray.errors import UsageError
from cxr_ray.optional import available

DECODE_MODES = ("auto", "cpu", "gpu")
NVIMGCODEC_MODULE = "nvidia.nvimgcodec"


def check_decode_mode(mode: str) -> None:
    if mode not in DECODE_MODES:
        raise UsageError(f"decode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")


def join_nvidia_namespace() -> None:
    """Let ``nvidia.*`` be found in every ``nvidia`` folder on ``sys.path``.

    NVIDIA's wheels share the ``nvidia`` package, and some of them (nvjpeg2k's, CUDA 12 libraries')
    ship an ``nvidia/__init__.py`` that turns it into a regular package confined to one folder: then
    nvImageCodec installed in another folder (``pip install --target``, a user site) is invisible.
    ``pkgutil.extend_path`` is the standard cure for such split packages.
    """
    package: Any = sys.modules.get("nvidia")
    if package is None:
        try:
            package = importlib.import_module("nvidia")
        except ImportError:
            return
    path = getattr(package, "__path__", None)
    if path is not None and not isinstance(path, list):  # a namespace package already spans them all
        return
    if path is not None:
        package.__path__ = pkgutil.extend_path(path, "nvidia")


def nvimgcodec_available() -> bool:
    """nvImageCodec importable here (nothing of it is imported)."""
    join_nvidia_namespace()
    return available(NVIMGCODEC_MODULE)


def gpu_decode_planned(mode: str, *, on_gpu: bool) -> bool:
    """Whether a pipeline whose model runs ``on_gpu`` should decode there (the driver's view).

    ``gpu`` without a GPU is a :class:`UsageError`; ``auto`` asks for nvImageCodec here (the
    driver), and each actor checks again when it starts.
    """
    check_decode_mode(mode)
    if mode == "gpu" and not on_gpu:
        raise UsageError("--decode gpu decodes in the GPU predict actors, and this run has none "
                         "(no GPUs in the cluster, or --gpus-per-actor 0); use --decode cpu or auto")
    return mode == "gpu" or (mode == "auto" and on_gpu and nvimgcodec_available())

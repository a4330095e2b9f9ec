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

from cxr_ray.errors import UsageError
from cxr_ray.optional import available

DECODE_MODES = ("auto", "cpu", "gpu")
NVIMGCODEC_MODULE = "nvidia.nvimgcodec"


def check_decode_mode(mode: str) -> None:
    if mode not in DECODE_MODES:
        raise UsageError(f"decode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")


def nvimgcodec_available() -> bool:
    """nvImageCodec importable here (nothing is imported)."""
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

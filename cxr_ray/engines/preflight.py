"""Driver-side checks, before any Ray job or actor starts: can the asked engine run at the asked precision?

Without them an impossible request (bf16 on a CPU without bf16 instructions,
TensorRT or CUDA on a machine without a GPU) is found by every actor in turn,
each retried with its traceback, and only then does the run stop. Each check
here raises one :class:`~cxr_ray.errors.BackendUnavailableError` or
:class:`~cxr_ray.errors.UsageError` whose message names the option and the fix.

The rules themselves stay where they are written once: the registry's
precision rules, the engines' GPU probes and
:func:`~cxr_ray.engines.torch.runtime.cpu_has_native_bf16`.
"""

from __future__ import annotations

from cxr_ray.engines.load import probe_engine
from cxr_ray.engines.registry import AUTO, Engine, auto_candidates, check_precision, get_engine
from cxr_ray.engines.torch.runtime import cpu_has_native_bf16
from cxr_ray.errors import BackendUnavailableError, UsageError

# Precisions that are only worth running on a CPU with native instructions for them.
NATIVE_ONLY_ON_CPU = {"bf16": (cpu_has_native_bf16, "AVX512-BF16 or AMX")}


def _engine(backend: str) -> Engine:
    try:
        return get_engine(backend)
    except ValueError as exc:  # the registry's message lists the valid names and the closest one
        raise UsageError(f"--backend: {exc}") from None


def _cpu_engine(backend: str, precision: str) -> Engine:
    """The engine ``backend`` means on a CPU (``auto``: the first CPU candidate that runs ``precision``)."""
    if backend != AUTO:
        return _engine(backend)
    candidates = auto_candidates(on_gpu=False)
    for engine in candidates:
        if engine.runs(precision, on_cpu=True) and probe_engine(engine, on_gpu=False):
            return engine
    return candidates[0]  # its precision refusal below says what would run it


def check_engine(
    backend: str, precision: str, *, gpus: float, local: bool = True, device: str | None = None,
    calibration: str | None = None,
) -> None:
    """Refuse, now, what the workers would refuse at load.

    ``gpus``: GPUs the workers will have (0: CPU workers). ``local``: the
    workers run on this machine, so its CPU instructions and installed
    packages are theirs (False for a remote ``--address``: only the rules that
    do not depend on the machine are checked). ``device``: an explicit
    ``--device`` (``cpu``, ``cuda[:N]``). ``calibration``: the images an int8 CPU engine
    (OpenVINO + NNCF) is calibrated on; int8 on a CPU without them is refused.
    """
    check_precision(precision)
    if device is not None and device.startswith("cuda") and gpus <= 0:
        raise BackendUnavailableError(
            f"--device {device}: no CUDA GPU is visible here; drop --device (CPU) or run on a GPU machine"
        )
    on_gpu = gpus > 0 and device != "cpu"
    if on_gpu:
        _check_gpu_engine(backend, precision, local)
        return
    engine = _cpu_engine(backend, precision)
    if engine.gpu_only:
        raise BackendUnavailableError(
            f"--backend {engine.name} needs an NVIDIA GPU and none is visible here; "
            "use --backend onnxruntime (or auto) on a CPU, or run on a GPU machine"
        )
    try:
        resolved = engine.resolve_precision(precision, on_cpu=True)
    except UsageError as exc:
        raise UsageError(f"--precision {precision}: {exc}") from None
    if local and not probe_engine(engine, on_gpu=False):
        raise BackendUnavailableError(
            f"--backend {engine.name} is not installed here ({engine.cpu_probe} is false); "
            f"pip install 'cxr-ray[{engine.name}]', or use --backend auto"
        )
    if resolved == "int8" and not calibration:
        raise UsageError(
            f"--precision int8 on the CPU ({engine.name}, NNCF) is calibrated on real images, and none were given; "
            "give --calibration SPEC (a manifest, folder or glob of real images), or use --precision fp32 (or auto)"
        )
    native = NATIVE_ONLY_ON_CPU.get(resolved)
    if native is not None and local and not native[0]():
        raise BackendUnavailableError(
            f"--precision {resolved}: this CPU has no {native[1]} instructions, so {resolved} would be emulated "
            "and slower than fp32; use --precision fp32 (or auto), or a CPU that has them"
        )


def _check_gpu_engine(backend: str, precision: str, local: bool) -> None:
    if backend == AUTO:
        return  # the actors try the GPU engines in rank order, each with its probe
    engine = _engine(backend)
    try:
        engine.resolve_precision(precision, on_cpu=False)
    except UsageError as exc:
        raise UsageError(f"--precision {precision}: {exc}") from None
    if local and not probe_engine(engine):
        raise BackendUnavailableError(
            f"--backend {engine.name}: what it needs on a GPU is not installed here ({engine.gpu_probe} is "
            "false); install it (see README 'GPUs and TensorRT') or use --backend auto"
        )

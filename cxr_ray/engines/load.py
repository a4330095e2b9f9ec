"""``load_backend``: one artifact in, one ready :class:`Backend` out, whichever engine runs it.

``name="auto"`` picks, without measuring anything at load time, by the ranks
and probes of the registry entries (:func:`~cxr_ray.engines.registry.auto_candidates`):

* on a GPU (torch sees one and ``device`` is not ``"cpu"``): ``tensorrt`` when the
  ``tensorrt`` package imports, else ``onnxruntime-trt`` where onnxruntime-gpu has
  its TensorRT provider and TensorRT's libraries, else ``torch`` on CUDA (fp16
  autocast, checked against fp32 at load); for an explicit fp32, ``tensorrt`` or
  ``torch``, ONNX Runtime's CUDA provider last;
* on a CPU: ``openvino`` where the optional ``openvino`` package is installed
  (fp32 on par with ONNX Runtime on AVX-512, faster on AVX2-only CPUs; bf16
  1.87x ONNX Runtime fp32 on DenseNet-121 where the CPU has AVX512-BF16:
  ``cxr-ray bench backends``), and only when it passes its check against ONNX Runtime fp32 at
  load: a failed check is one warning line and ``auto`` goes on to the next
  engine; then ``onnxruntime``, a plain dependency, so ``auto`` never fails for
  want of an optional package; ``torch`` for ``precision="bf16"`` where OpenVINO
  is absent (oneDNN bf16 kernels).

``precision="auto"`` means what each engine's registry entry says: fp16 on a
GPU (TensorRT / torch autocast) and fp32 on the CPU. Reduced precision on the
CPU is opt-in, because it changes the numbers a site may have validated. A
reduced-precision engine is checked against fp32 PyTorch on sample batches
when it is built (TensorRT) or loaded (torch bf16 on the CPU) and refused
above its tolerance (:data:`cxr_ray.engines.contract.TOLERANCES`).

Provisioning: everything is loaded from the artifact (local, or s3:// copied
once into the local cache); nothing is fetched from the network. An artifact
without ``model.onnx`` gets a verified export into ``$CXR_RAY_CACHE`` the
first time an ONNX-based engine needs it; a TensorRT engine missing for this
GPU is built into the (local copy of the) artifact's ``engines/`` once per node.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from cxr_ray.engines.base import Backend
from cxr_ray.engines.contract import TOLERANCES
from cxr_ray.engines.registry import (
    AUTO,
    BACKEND_NAMES,
    PRECISION_NAMES,
    Engine,
    auto_candidates,
    check_precision,
    get_engine,
)
from cxr_ray.engines.request import EngineRequest
from cxr_ray.engines.tta import TTABackend, check_views
from cxr_ray.errors import BackendUnavailableError, UsageError
from cxr_ray.models.artifact import load_card, localize
from cxr_ray.models.card import ModelCard

__all__ = ["BACKEND_NAMES", "PRECISION_NAMES", "REDUCED_PRECISION_ATOL", "load_backend", "resolve_backend_name"]

# The accepted bf16-vs-fp32 difference of the torch engine on the CPU (tests and the README quote it).
REDUCED_PRECISION_ATOL = TOLERANCES[("torch", "bf16")]

log = logging.getLogger(__name__)

Provision = Callable[[Path, ModelCard, EngineRequest], Backend]


def cuda_visible() -> bool:
    """torch sees a CUDA GPU (Ray gives actors without GPUs none: ``CUDA_VISIBLE_DEVICES`` is empty there)."""
    return bool(torch.cuda.is_available())


def probe_engine(engine: Engine, *, on_gpu: bool = True) -> bool:
    """The engine's ``gpu_probe`` (or ``cpu_probe``), ``module:function``, imported only now."""
    probe = engine.gpu_probe if on_gpu else engine.cpu_probe
    if probe is None:
        return True
    module, _, function = probe.partition(":")
    return bool(getattr(importlib.import_module(module), function)())


def auto_engines(device: str | None = None, precision: str = AUTO) -> list[str]:
    """What ``auto`` tries here, in order: the candidates that run ``precision`` and whose probe passes.

    On a GPU only the first is tried (as before); on a CPU all of them, each after the previous
    one failed to load (:func:`load_backend`). Empty: nothing here runs ``precision``.
    """
    on_gpu = device != "cpu" and cuda_visible()
    names = [
        engine.name
        for engine in auto_candidates(on_gpu=on_gpu)
        if engine.runs(precision, on_cpu=not on_gpu) and probe_engine(engine, on_gpu=on_gpu)
    ]
    return names[:1] if on_gpu else names


def resolve_backend_name(name: str, device: str | None = None, precision: str = AUTO) -> str:
    """The concrete engine ``name`` stands for on this machine.

    ``auto``: on a GPU (``device`` None or ``cuda[:N]`` and torch sees one), the first of
    :func:`~cxr_ray.engines.registry.auto_candidates` that runs ``precision`` there and whose probe
    finds what it needs installed; on a CPU, the first that runs ``precision`` on a CPU.
    """
    if name != AUTO:
        return get_engine(name).name  # unknown names: the closest valid one is suggested
    on_gpu = device != "cpu" and cuda_visible()
    names = auto_engines(device, precision)
    if names:
        return names[0]
    auto_candidates(on_gpu=on_gpu)[0].resolve_precision(precision, on_cpu=not on_gpu)  # its refusal says why
    raise UsageError(f"no engine installed here runs precision={precision} on the {'GPU' if on_gpu else 'CPU'}")


def _provisioner(engine: str) -> Provision:
    """The engine's ``provision`` function, named in its registry entry (``module:function``)."""
    module, _, function = get_engine(engine).provision.partition(":")
    provision: Provision = getattr(importlib.import_module(module), function)
    return provision


def load_backend(artifact_uri: str, name: str = AUTO, request: EngineRequest | None = None, **options: object) -> Backend:
    """Build the engine ``name`` for the artifact at ``artifact_uri``.

    ``request`` (or its fields as keyword arguments: ``device``, ``precision``,
    ``num_threads``, ``s3_endpoint``, ``max_batch``, ``compile``, ``tta``) says how to
    run it; see :class:`~cxr_ray.engines.request.EngineRequest`.
    """
    request = replace(request or EngineRequest(), **options)  # type: ignore[arg-type]
    check_precision(request.precision)
    engine = resolve_backend_name(name, request.device, request.precision)
    if name == AUTO and request.device is None:  # where auto decided to run it, said to the engine
        request = replace(request, device="cuda" if cuda_visible() else "cpu")
    request = replace(request, auto=name == AUTO)
    check_views(request.tta)
    root = localize(artifact_uri, request.s3_endpoint)
    card = load_card(str(root))
    if name != AUTO:
        backend = _provisioner(engine)(root, card, request)
    else:
        backend = _first_that_loads(auto_engines(request.device, request.precision), root, card, request)
    return TTABackend(backend, request.tta) if request.tta > 1 else backend


def _first_that_loads(names: list[str], root: Path, card: ModelCard, request: EngineRequest) -> Backend:
    """``auto``: the first engine of ``names`` that provisions (an engine checked at load, such as
    OpenVINO against ONNX Runtime fp32, refuses with :class:`BackendUnavailableError`); one log line
    per engine passed over, and the last one's error if none loads."""
    for i, engine in enumerate(names):
        try:
            return _provisioner(engine)(root, card, request)
        except BackendUnavailableError as exc:
            if i == len(names) - 1:
                raise
            log.warning("backend auto: %s not used (%s); falling back to %s", engine, exc, names[i + 1])
    raise AssertionError("unreachable: auto_engines is never empty after resolve_backend_name")

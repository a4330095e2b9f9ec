"""``load_backend``: one artifact in, one ready :class:`Backend` out, whichever engine runs it.

``name="auto"`` picks, without measuring anything at load time (the one place
this policy is written):

* ``tensorrt`` when the ``tensorrt`` package imports and torch sees a CUDA GPU
  (and ``device`` is not ``"cpu"``);
* otherwise ``onnxruntime`` on the CPU: measured fastest fp32 engine on CPU
  for every registered architecture (``cxr-ray bench backends``), and it is a
  plain dependency, so ``auto`` never fails for want of an optional package;
* except when ``precision="bf16"`` is asked for on the CPU: then ``torch``
  (oneDNN bf16 kernels), the only engine here that runs bf16 natively.

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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from cxr_ray.engines.base import Backend
from cxr_ray.engines.contract import TOLERANCES
from cxr_ray.engines.registry import (
    AUTO,
    BACKEND_NAMES,
    PRECISION_NAMES,
    check_precision,
    get_engine,
)
from cxr_ray.engines.request import EngineRequest
from cxr_ray.engines.tensorrt.runtime import tensorrt_available
from cxr_ray.engines.tta import TTABackend, check_views
from cxr_ray.models.artifact import load_card, localize
from cxr_ray.models.card import ModelCard

__all__ = ["BACKEND_NAMES", "PRECISION_NAMES", "REDUCED_PRECISION_ATOL", "load_backend", "resolve_backend_name"]

# The accepted bf16-vs-fp32 difference of the torch engine on the CPU (tests and the README quote it).
REDUCED_PRECISION_ATOL = TOLERANCES[("torch", "bf16")]

Provision = Callable[[Path, ModelCard, EngineRequest], Backend]


def resolve_backend_name(name: str, device: str | None = None, precision: str = AUTO) -> str:
    """The concrete engine ``name`` stands for on this machine."""
    if name != AUTO:
        return get_engine(name).name  # unknown names: the closest valid one is suggested
    if device != "cpu" and tensorrt_available():
        return "tensorrt"
    return "torch" if precision == "bf16" else "onnxruntime"


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
    request = replace(request, auto=name == AUTO)
    check_views(request.tta)
    root = localize(artifact_uri, request.s3_endpoint)
    card = load_card(str(root))
    backend = _provisioner(engine)(root, card, request)
    return TTABackend(backend, request.tta) if request.tta > 1 else backend

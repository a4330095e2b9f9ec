"""``load_backend``: one artifact in, one :class:`Backend` out, whichever engine runs it.

``name="auto"`` picks, without measuring anything at load time:

* ``tensorrt`` when the ``tensorrt`` package imports and torch sees a CUDA GPU
  (and ``device`` is not ``"cpu"``);
* otherwise ``onnxruntime`` on the CPU: measured fastest on CPU for every
  registered architecture (``cxr-ray bench backends``), and it is a plain
  dependency, so ``auto`` never fails for want of an optional package.

Everything is loaded from the artifact (local, or s3:// copied once into the
local cache); nothing is fetched from the network. An artifact without
``model.onnx`` gets a verified export into ``$CXR_RAY_CACHE`` the first time an
ONNX-based backend needs it; a TensorRT engine missing for this GPU is built
into the (local copy of the) artifact's ``engines/`` once per node.
"""

from __future__ import annotations

import difflib

from cxr_ray.backends.base import Backend

BACKEND_NAMES = ("auto", "tensorrt", "onnxruntime", "torch")


def resolve_backend_name(name: str, device: str | None = None) -> str:
    """The concrete backend ``name`` stands for on this machine."""
    if name not in BACKEND_NAMES:
        close = difflib.get_close_matches(name, BACKEND_NAMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(BACKEND_NAMES)}.{hint}")
    if name != "auto":
        return name
    from cxr_ray.export.tensorrt import tensorrt_available

    if device != "cpu" and tensorrt_available():
        return "tensorrt"
    return "onnxruntime"


def load_backend(
    artifact_uri: str,
    name: str = "auto",
    *,
    device: str | None = None,
    precision: str = "fp16",
    num_threads: int | None = None,
    s3_endpoint: str | None = None,
    max_batch: int | None = None,
    compile: bool = False,
) -> Backend:
    """Build the backend ``name`` for the artifact at ``artifact_uri``.

    ``device``: None picks per backend (TensorRT: ``cuda:0``; ONNX Runtime:
    CUDA provider if installed, else CPU — but ``auto`` without TensorRT means
    CPU; torch: CUDA if visible). ``precision`` applies to GPU engines
    (TensorRT ``fp32|fp16|int8``, torch autocast ``fp32|fp16|bf16``); CPU
    engines run fp32. ``num_threads`` sets the CPU threads of ONNX Runtime /
    torch. ``max_batch`` is the TensorRT profile's largest batch (default 32;
    bigger batches are chunked). ``compile`` applies ``torch.compile`` to the
    torch backend.
    """
    from cxr_ray.artifact import load_card, localize

    requested = name
    name = resolve_backend_name(name, device)
    root = localize(artifact_uri, s3_endpoint)
    card = load_card(str(root))

    if name == "torch":
        from cxr_ray.artifact import load_model
        from cxr_ray.backends.torch_backend import TorchBackend

        model, _ = load_model(str(root))
        torch_precision = precision if precision in ("fp32", "fp16", "bf16") else "fp32"
        return TorchBackend(
            model, card.classes, card.image_size, device=device, precision=torch_precision,
            compile=compile, num_threads=num_threads,
        )

    from cxr_ray.export.onnx import ensure_onnx

    onnx_path, onnx_sha256 = ensure_onnx(root, card)

    if name == "onnxruntime":
        from cxr_ray.backends.onnxruntime_backend import OnnxRuntimeBackend

        ort_device = "cpu" if requested == "auto" and device is None else device
        return OnnxRuntimeBackend(
            onnx_path, card.classes, card.image_size, device=ort_device, num_threads=num_threads,
            expected_sha256=onnx_sha256,
        )

    from cxr_ray.backends.tensorrt_backend import TensorRTBackend
    from cxr_ray.export.tensorrt import DEFAULT_MAX_BATCH, get_engine

    record, _built = get_engine(
        root, card, onnx_path, onnx_sha256, precision=precision, max_batch=max_batch or DEFAULT_MAX_BATCH,
        device=device, s3_endpoint=s3_endpoint,
    )
    return TensorRTBackend.from_engine_file(
        root / record["file"], record["sha256"], card.classes, card.image_size, device=device, precision=precision,
    )

"""``load_backend``: one artifact in, one :class:`Backend` out, whichever engine runs it.

``name="auto"`` picks, without measuring anything at load time:

* ``tensorrt`` when the ``tensorrt`` package imports and torch sees a CUDA GPU
  (and ``device`` is not ``"cpu"``);
* otherwise ``onnxruntime`` on the CPU: measured fastest fp32 engine on CPU
  for every registered architecture (``cxr-ray bench backends``), and it is a
  plain dependency, so ``auto`` never fails for want of an optional package;
* except when ``precision="bf16"`` is asked for on the CPU: then ``torch``
  (oneDNN bf16 kernels), the only engine here that runs bf16 natively.

``precision="auto"`` means fp16 on a GPU (TensorRT / torch autocast) and fp32
on the CPU: reduced precision on the CPU is opt-in, because it changes the
numbers a site may have validated. A reduced-precision engine is checked
against fp32 PyTorch on sample batches when it is built (TensorRT) or loaded
(torch bf16 on the CPU) and refused above :data:`REDUCED_PRECISION_ATOL`.

Everything is loaded from the artifact (local, or s3:// copied once into the
local cache); nothing is fetched from the network. An artifact without
``model.onnx`` gets a verified export into ``$CXR_RAY_CACHE`` the first time an
ONNX-based backend needs it; a TensorRT engine missing for this GPU is built
into the (local copy of the) artifact's ``engines/`` once per node.
"""

from __future__ import annotations

import difflib

from cxr_ray.backends.base import Backend
from cxr_ray.errors import BackendUnavailableError, UsageError

BACKEND_NAMES = ("auto", "tensorrt", "onnxruntime", "torch")
PRECISION_NAMES = ("auto", "fp32", "fp16", "bf16", "int8")
# Largest |probability difference| vs fp32 accepted for a torch bf16 model on the CPU
# (the TensorRT fp16 tolerance, cxr_ray.export.tensorrt.DEFAULT_ATOL).
REDUCED_PRECISION_ATOL = 2e-2


def check_precision(precision: str) -> None:
    """Refuse a precision name no backend knows (a :class:`UsageError` naming the valid ones)."""
    if precision not in PRECISION_NAMES:
        raise UsageError(f"unknown precision {precision!r}; valid: {', '.join(PRECISION_NAMES)}")


def resolve_backend_name(name: str, device: str | None = None, precision: str = "auto") -> str:
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
    return "torch" if precision == "bf16" else "onnxruntime"


def load_backend(
    artifact_uri: str,
    name: str = "auto",
    *,
    device: str | None = None,
    precision: str = "auto",
    num_threads: int | None = None,
    s3_endpoint: str | None = None,
    max_batch: int | None = None,
    compile: bool = False,
) -> Backend:
    """Build the backend ``name`` for the artifact at ``artifact_uri``.

    ``device``: None picks per backend (TensorRT: ``cuda:0``; ONNX Runtime:
    CUDA provider if installed, else CPU — but ``auto`` without TensorRT means
    CPU; torch: CUDA if visible). ``precision``: ``auto`` (fp16 on GPUs, fp32
    on the CPU), TensorRT ``fp32|fp16|int8``, torch ``fp32|fp16|bf16`` (on the
    CPU only ``fp32``, or ``bf16`` where the CPU has bf16 instructions, checked
    against fp32), ONNX Runtime ``fp32``. ``num_threads`` sets the CPU threads of ONNX Runtime /
    torch. ``max_batch`` is the TensorRT profile's largest batch (default 32;
    bigger batches are chunked). ``compile`` applies ``torch.compile`` to the
    torch backend.
    """
    from cxr_ray.artifact import load_card, localize

    check_precision(precision)
    requested = name
    name = resolve_backend_name(name, device, precision)
    root = localize(artifact_uri, s3_endpoint)
    card = load_card(str(root))

    if name == "torch":
        return _torch_backend(root, card, device=device, precision=precision, num_threads=num_threads, compile=compile)
    if name == "onnxruntime" and precision not in ("auto", "fp32"):
        raise UsageError(
            f"onnxruntime runs fp32 only; for precision={precision} use the torch backend "
            "(bf16 on CPUs with bf16 instructions, fp16 / bf16 on GPUs) or tensorrt (fp16 / int8)"
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

    precision = "fp16" if precision == "auto" else precision
    if precision == "bf16":
        raise UsageError("TensorRT engines here are fp32, fp16 or int8; bf16 is for the torch backend")
    record, _built = get_engine(
        root, card, onnx_path, onnx_sha256, precision=precision, max_batch=max_batch or DEFAULT_MAX_BATCH,
        device=device, s3_endpoint=s3_endpoint,
    )
    return TensorRTBackend.from_engine_file(
        root / record["file"], record["sha256"], card.classes, card.image_size, device=device, precision=precision,
    )


def _torch_backend(root, card, *, device, precision: str, num_threads, compile: bool) -> Backend:
    """The torch backend at the requested precision; CPU bf16 is checked against fp32 first."""
    from cxr_ray.artifact import load_model
    from cxr_ray.backends.torch_backend import TorchBackend, cpu_has_native_bf16, resolve_device

    if precision == "int8":
        raise UsageError("int8 needs a calibrated TensorRT engine (--backend tensorrt); torch runs fp32 / fp16 / bf16")
    on_cpu = resolve_device(device).type == "cpu"
    if precision == "auto":
        precision = "fp32" if on_cpu else "fp16"
    if on_cpu and precision == "fp16":
        raise UsageError("fp16 on the CPU is slower than fp32 (no fp16 convolution kernels); use fp32 or bf16")
    if on_cpu and precision == "bf16" and not cpu_has_native_bf16():
        raise BackendUnavailableError(
            "bf16 on this CPU would be emulated (no AVX512-BF16 / AMX instructions) and slower than fp32; "
            "use precision fp32"
        )
    model, _ = load_model(str(root))
    backend = TorchBackend(
        model, card.classes, card.image_size, device=device, precision=precision,
        compile=compile, num_threads=num_threads,
    )
    if on_cpu and precision == "bf16":
        backend.verify_against_fp32(atol=REDUCED_PRECISION_ATOL)
    return backend

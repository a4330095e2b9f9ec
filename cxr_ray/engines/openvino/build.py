"""Provisioning of the OpenVINO engine: the artifact's ONNX graph compiled for the CPU, then checked.

Every OpenVINO engine is compared with ONNX Runtime fp32 on the same graph
before it is used (:func:`cxr_ray.engines.verify.verify_against`: sample
batches, plus probabilities and AUC on a labelled sample when the request names
one) and refused above its tolerance (:data:`cxr_ray.engines.contract.TOLERANCES`,
or the request's ``max_prob_diff``). A refusal is a
:class:`~cxr_ray.engines.verify.EngineVerificationError`, so ``--backend auto``
falls back to ONNX Runtime with one log line.

bf16 runs only on CPUs with AVX512-BF16 / AMX (the torch engine's probe of
oneDNN, :func:`~cxr_ray.engines.torch.runtime.cpu_has_native_bf16`); int8 is
NNCF post-training quantisation of the graph, calibrated on the request's
``calibration`` images (:mod:`cxr_ray.engines.openvino.quantize`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from cxr_ray.engines.contract import tolerance
from cxr_ray.engines.onnxruntime.build import ensure_onnx
from cxr_ray.engines.onnxruntime.runtime import OnnxRuntimeBackend
from cxr_ray.engines.openvino.quantize import quantized_model
from cxr_ray.engines.openvino.runtime import OpenVinoBackend
from cxr_ray.engines.registry import get_engine
from cxr_ray.engines.request import EngineRequest
from cxr_ray.engines.torch.runtime import cpu_has_native_bf16
from cxr_ray.engines.verify import LabelledSample, labelled_sample, verify_against
from cxr_ray.errors import BackendUnavailableError
from cxr_ray.models.card import ModelCard

log = logging.getLogger(__name__)


def _check_request(request: EngineRequest) -> str:
    precision = get_engine("openvino").resolve_precision(request.precision, on_cpu=True)
    if request.device is not None and request.device != "cpu":
        raise BackendUnavailableError(f"openvino runs on the CPU here (its CPU plugin); got device={request.device}")
    if precision == "bf16" and not cpu_has_native_bf16():
        raise BackendUnavailableError(
            "openvino bf16: this CPU has no AVX512-BF16 or AMX instructions, so bf16 would be emulated and "
            "slower than fp32; use --precision fp32"
        )
    return precision


def provision(root: Path, card: ModelCard, request: EngineRequest) -> OpenVinoBackend:
    """The OpenVINO engine for the artifact, verified against ONNX Runtime fp32 (see the module docstring)."""
    precision = _check_request(request)
    onnx_path, onnx_sha256 = ensure_onnx(root, card)
    reference = OnnxRuntimeBackend(onnx_path, card.classes, card.image_size, device="cpu",
                                   num_threads=request.num_threads, expected_sha256=onnx_sha256)
    model, calibration_images = quantized_model(onnx_path, onnx_sha256, card, request) if precision == "int8" else (None, None)
    backend = OpenVinoBackend(onnx_path, card.classes, card.image_size, precision=precision,
                              num_threads=request.num_threads, expected_sha256=onnx_sha256, model=model)
    sample = None
    if request.verify_labels:
        sample = labelled_sample(request.verify_labels, card, limit=request.verify_images,
                                 s3_endpoint=request.s3_endpoint)
    elif calibration_images is not None:  # int8 without labels: checked on its real calibration images
        sample = LabelledSample(calibration_images[: request.verify_images], None, str(request.calibration))
    atol = tolerance("openvino", precision) if request.max_prob_diff is None else request.max_prob_diff
    # int8 is calibrated on real images: noise batches lie outside its ranges, so it is checked on real ones
    backend.verification = verify_against(backend, reference, card, atol=atol, sample=sample,
                                          synthetic=precision != "int8")
    log.info("openvino %s: max abs diff vs onnxruntime fp32 %.3g", precision, backend.verification["max_abs_diff"])
    return backend
